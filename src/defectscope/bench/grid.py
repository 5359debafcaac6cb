"""The benchmark grid: models x data sets x categories x seeds, each cell in its own process.

Each cell runs :func:`defectscope.engine.run_experiment` in a fresh interpreter
(``python -m defectscope.bench.worker``), so a crash or an out-of-memory kill becomes an ``error``
in that cell's row and the grid goes on, and the peak memory recorded is the cell's own. Cells
run one at a time, or ``jobs`` at a time on this machine, or as Ray tasks on a cluster
(``backend="ray"``); in every case the parent alone appends each finished record, as one whole
line, to ``OUT/results.jsonl``. With ``resume=True`` the cells already there are skipped, so an
interrupted benchmark continues where it stopped and never loses or duplicates a row.

What the report draws for a cell (image scores, a few example maps) goes to
``OUT/cells/<cell id>/`` (see :mod:`defectscope.report.artifacts`); the record names that
folder in ``artifacts``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import threading
import traceback
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

from tqdm.auto import tqdm

from ..progress import WeightedProgress

from ..engine.record import RESULTS, ResultRecord, append_result, read_results
from ..errors import DefectscopeError

CELLS = "cells"


@dataclass(frozen=True)
class Cell:
    """One run of the grid: one fit, evaluated on one category (or, multi-class, on each of
    ``categories``), giving one record per evaluated category."""

    model: str
    data: str
    category: str | None
    seed: int = 0
    params: tuple = field(default_factory=tuple)  # sorted (key, value) pairs
    setting: str = "one-class"  # see defectscope.data.settings.SETTINGS
    contamination: float | None = None  # blind-mix: fraction of the anomalous test images trained on
    shots: int | None = None  # few-shot: normal training images
    categories: tuple = ()  # multi-class: the categories whose union is learnt
    runtime: str = "torch"  # what runs the fitted model (defectscope.deploy.runtime.RUNTIMES)

    @property
    def setting_key(self) -> list:
        """What the setting adds to the key: ``[]`` for one-class (whose key stays as before),
        ``[setting, contamination]`` otherwise, then the shots and the multi-class categories."""
        if self.setting == "one-class":
            return []
        extra = [self.setting, self.contamination]
        if self.shots is not None:
            extra.append(self.shots)
        if self.categories:
            extra.append(list(self.categories))
        return extra

    @property
    def key(self) -> str:
        extra = [] if self.runtime == "torch" else [{"runtime": self.runtime}]  # torch keys stay as before
        return json.dumps([self.model, self.data, self.category, self.seed, list(self.params)] + self.setting_key
                          + extra, sort_keys=True)

    @property
    def cell_id(self) -> str:
        """A short, file-system-safe, unique name: ``model_dataset_category_s<seed>_<hash>``."""
        kind = self.data.split(":", 1)[0]
        tail = ""
        if self.setting != "one-class":
            tail = f"_{self.setting}" + ("" if self.contamination is None else f"{self.contamination:g}") + (
                "" if self.shots is None else f"{self.shots}")
        if self.runtime != "torch":
            tail += f"_{self.runtime}"
        name = re.sub(r"[^A-Za-z0-9_.-]+", "-", f"{self.model}_{kind}_{self.category or 'all'}_s{self.seed}{tail}")
        return f"{name[:80]}_{hashlib.sha1(self.key.encode()).hexdigest()[:8]}"

    def to_json(self) -> dict:
        return {"model": self.model, "data": self.data, "category": self.category, "seed": self.seed,
                "params": [list(p) for p in self.params], "setting": self.setting,
                "contamination": self.contamination, "shots": self.shots, "categories": list(self.categories),
                "runtime": self.runtime}

    @classmethod
    def from_json(cls, d: dict) -> "Cell":
        return cls(d["model"], d["data"], d["category"], int(d["seed"]), tuple(tuple(p) for p in d["params"]),
                   d.get("setting") or "one-class", d.get("contamination"), d.get("shots"),
                   tuple(d.get("categories") or ()), d.get("runtime") or "torch")


#: Seconds a cell spends besides fitting and predicting: a fresh interpreter importing torch and
#: defectscope, opening the split, saving the model. Measured on the reference CPU with the quick
#: benchmark (2026-12-02): wall time less fit less 199 predictions, 2-3 s for SAE and STFPM, 6 s
#: for PaDiM (whose saved model is 87 MB).
CELL_OVERHEAD_S = 5.0


def estimate_cell(cell: Cell, counts: dict[str, tuple[int, int]], n_latency: int = 50) -> float | None:
    """Estimated seconds of ``cell`` on the reference CPU, from its method's declared cost
    (:mod:`defectscope.models.cost`): the fit on its training images, its predictions on the test
    images and the latency runs (``n_latency`` + 5 warm-up at batch 1, 4 batches of 16 for the
    throughput), plus :data:`CELL_OVERHEAD_S`. ``counts``: ``{category: (n_train, n_test)}``.
    None when the method declares no cost."""
    from ..models import get_model_class

    cls = get_model_class(cell.model)
    params = dict(cell.params)
    cats = cell.categories or (cell.category,)
    n_train = sum(counts.get(c, (0, 0))[0] for c in cats)
    n_test = sum(counts.get(c, (0, 0))[1] for c in cats)
    if cell.shots is not None:
        n_train = cell.shots
    if cell.setting == "zero-shot":
        n_train = 0
    fit, pred = cls.estimate_fit(params, n_train), cls.estimate_predict(params)
    if fit is None or pred is None:
        return None
    timed = 0 if getattr(cls, "remote", False) else n_latency + 5 + 4 * 16  # a model server's method is not timed
    return CELL_OVERHEAD_S + fit + pred * (n_test + timed)


def record_key(rec: dict) -> str:
    """The cell key of a finished record (matches :attr:`Cell.key`)."""
    return rec.get("cell_key") or ""


def available_cores() -> int:
    """CPU cores this process may use (its affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _environment() -> dict[str, Any]:
    from ..engine.evaluate import hardware
    from ..models.io import versions

    return {"versions": versions(), "hardware": hardware()}


# -- stopping on a signal ------------------------------------------------------------------------
class Interrupted(KeyboardInterrupt):
    """The benchmark was stopped by a signal (SIGINT, SIGTERM): raised in the main thread, so the
    grid stops its workers and removes their temporary folders on the way out."""

    def __init__(self, signum: int):
        self.signum = int(signum)
        super().__init__(self.name)

    @property
    def name(self) -> str:
        try:
            return signal.Signals(self.signum).name
        except ValueError:
            return f"signal {self.signum}"

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


@contextmanager
def stop_on_signals(signums=(signal.SIGINT, signal.SIGTERM)):
    """Within this block, the first SIGINT or SIGTERM raises :class:`Interrupted`; further ones are
    ignored until the block ends (the clean-up must not be cut short), then the previous handlers
    come back. Outside the main thread it does nothing (Python delivers signals there only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    fired: list[int] = []

    def handler(signum, frame):  # noqa: ARG001
        if not fired:
            fired.append(signum)
            raise Interrupted(signum)

    previous = {}
    try:
        for s in signums:
            previous[s] = signal.signal(s, handler)
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


# -- one cell ----------------------------------------------------------------------------------
def execute_cell(cell: Cell, threads: int | None = None, artifacts_dir=None, n_latency: int = 50) -> list[dict[str, Any]]:
    """Run ``cell`` in this process and return its records (one per evaluated category); any
    exception becomes one record with ``error`` set."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    from ..engine.evaluate import run_experiments
    from ..report.artifacts import save_artifacts

    def keep(category, predictions, test) -> None:
        if artifacts_dir is not None:
            where = Path(artifacts_dir) / category if cell.setting == "multi-class" else Path(artifacts_dir)
            save_artifacts(where, predictions, test)

    predictor = None
    if cell.runtime != "torch":
        def predictor(model, train):
            """The fitted model on the cell's runtime; INT8 calibrated on up to 64 training images."""
            from ..deploy.runtime import load_runtime

            pick = torch.randperm(len(train), generator=torch.Generator().manual_seed(cell.seed))[:64]
            images = torch.stack([train[int(i)]["image"] for i in pick]) if cell.runtime == "openvino-int8" else None
            # the graph is loaded into the runtime's memory, so its file (hundreds of MB for PaDiM
            # at 256 px) need not outlive the load
            with tempfile.TemporaryDirectory(prefix="defectscope-runtime-") as cache:
                return load_runtime(model, cell.runtime, calibration_images=images, cache_dir=cache)

    try:
        from ..models import get_model_class

        # a method that asks a model server per image (VLM-AD) is not timed: 119 more requests per cell
        remote = getattr(get_model_class(cell.model), "remote", False)
        return run_experiments(cell.model, dict(cell.params), cell.data, cell.category, cell.seed,
                               setting=cell.setting, contamination=cell.contamination, shots=cell.shots,
                               categories=list(cell.categories) or None, n_latency=n_latency, keep=keep,
                               runtime=cell.runtime, predictor=predictor, measure=not remote)
    except Exception as e:  # noqa: BLE001 - the row must record any failure
        rec: dict[str, Any] = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc(limit=8),
                               "runtime": cell.runtime}
        try:
            rec.update(_environment())
            rec["threads"] = torch.get_num_threads()
        except Exception:  # noqa: BLE001
            pass
        return [rec]


def _package_parent() -> str | None:
    """The folder to put on the child's path so that it imports this very package, or None when
    the package is installed (a site-packages folder must not go before the standard library)."""
    parent = Path(__file__).resolve().parents[2]
    return None if parent.name in ("site-packages", "dist-packages") else str(parent)


@dataclass
class _Running:
    cell: Cell
    proc: subprocess.Popen | None
    tmp: str
    result_file: str
    t0: float
    timeout: float | None


CELL_TMP_PREFIX = "defectscope-cell-"
OWNER_FILE = "owner.pid"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


def sweep_stale_cell_dirs(root: str | None = None) -> int:
    """Remove the per-cell temporary folders left behind by a bench process that was killed
    outright (SIGKILL gives it no chance to clean up): those whose ``owner.pid`` names a process
    that no longer exists. Returns how many were removed."""
    n = 0
    for d in Path(root or tempfile.gettempdir()).glob(CELL_TMP_PREFIX + "*"):
        try:
            pid = int((d / OWNER_FILE).read_text().strip())
        except (OSError, ValueError):
            continue  # not ours to judge (no owner recorded, or not readable)
        if pid != os.getpid() and not _pid_alive(pid):
            shutil.rmtree(d, ignore_errors=True)
            n += 1
    return n


def _start(cell: Cell, threads: int | None, artifacts_dir, n_latency: int, timeout: float | None,
           running: list | None = None) -> _Running:
    """Start ``cell``'s worker process in its own temporary folder. With ``running``, the run is
    appended to it before the process starts, so an interruption at any point finds (and stops,
    and cleans up) everything started."""
    tmp = tempfile.mkdtemp(prefix=CELL_TMP_PREFIX)
    try:
        Path(tmp, OWNER_FILE).write_text(str(os.getpid()))
        result_file = os.path.join(tmp, "record.json")
        job = {"cell": cell.to_json(), "threads": threads, "n_latency": n_latency, "result": result_file,
               "artifacts_dir": str(artifacts_dir) if artifacts_dir is not None else None}
        job_file = os.path.join(tmp, "job.json")
        Path(job_file).write_text(json.dumps(job))
        env = dict(os.environ)
        # the child imports the very package this process runs (also when it came from sys.path, not an install)
        extra = _package_parent()
        if extra:
            env["PYTHONPATH"] = os.pathsep.join([extra] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
        if threads:
            env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
        if env.get("DEFECTSCOPE_PROGRESS", "auto").lower() != "off":
            # the cell's own progress (epochs, steps) as plain lines once a minute: a bar of its own
            # would fight the bench's line for the same terminal row
            env["DEFECTSCOPE_PROGRESS"] = "lines"
        run = _Running(cell, None, tmp, result_file, time.perf_counter(), timeout)
        if running is not None:
            running.append(run)
        # SIGINT (Ctrl-C reaches the whole process group) stays blocked while the worker starts: it
        # inherits the mask and ignores SIGINT before unblocking it (the parent decides what stops a
        # cell), and a Ctrl-C here reaches this process as soon as the mask is restored
        blocking = hasattr(signal, "pthread_sigmask")
        old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT}) if blocking else None
        try:
            run.proc = subprocess.Popen([sys.executable, "-m", "defectscope.bench.worker", job_file], env=env,
                                        stdin=subprocess.DEVNULL)
        finally:
            if blocking:
                signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
        run.t0 = time.perf_counter()
        return run
    except BaseException:
        if running is not None and running and running[-1].tmp == tmp:
            _stop(running.pop())
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _stop(run: _Running) -> None:
    if run.proc is not None:
        if run.proc.poll() is None:
            run.proc.kill()
        run.proc.wait()
    shutil.rmtree(run.tmp, ignore_errors=True)


def _collect(run: _Running, timed_out: bool = False) -> list[dict[str, Any]]:
    code = run.proc.wait()
    try:
        recs = json.loads(Path(run.result_file).read_text())["records"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError):
        if timed_out:
            why = f"timed out after {run.timeout:g} s"
        elif code is not None and code < 0:
            why = f"killed by signal {-code}" + (" (out of memory?)" if -code == 9 else "")
        else:
            why = f"exit code {code}"
        recs = [{"error": f"process died: {why}"}]
    finally:
        shutil.rmtree(run.tmp, ignore_errors=True)
    return recs


def _finish_record(cell: Cell, rec: dict, t0: float, artifacts_dir=None, out_dir=None) -> dict[str, Any]:
    """The cell's :class:`~defectscope.engine.record.ResultRecord` with the worker's ``rec`` over it."""
    base = ResultRecord(model=cell.model, params=dict(cell.params), dataset=cell.data.split(":", 1)[0],
                        data=cell.data, category=cell.category, setting=cell.setting,
                        contamination=cell.contamination, shots=cell.shots, seed=cell.seed)
    record = base.update(rec)
    if record.error and record.versions is None:
        try:
            record.update(_environment())
        except Exception:  # noqa: BLE001
            pass
    record.run.update(cell_key=cell.key, wall_s=time.perf_counter() - t0)
    if artifacts_dir is not None and out_dir is not None:
        from ..report.artifacts import ARTIFACT_FILE

        where = Path(artifacts_dir)
        if cell.setting == "multi-class" and record.category:
            where = where / record.category
        if (where / ARTIFACT_FILE).is_file():
            record.run["artifacts"] = Path(os.path.relpath(where, out_dir)).as_posix()
    return record.to_dict()


def run_cell(cell: Cell, threads: int | None = None, isolate: bool = True, artifacts_dir=None,
             n_latency: int = 50, timeout: float | None = None) -> list[dict[str, Any]]:
    """Run one cell (in a fresh process when ``isolate``) and return its records, never raising."""
    t0 = time.perf_counter()
    if not isolate:
        recs = execute_cell(cell, threads, artifacts_dir, n_latency)
    else:
        run = _start(cell, threads, artifacts_dir, n_latency, timeout)
        try:
            run.proc.wait(timeout=timeout)
            timed_out = False
        except subprocess.TimeoutExpired:
            run.proc.kill()
            timed_out = True
        except BaseException:
            _stop(run)
            raise
        recs = _collect(run, timed_out)
    return [_finish_record(cell, rec, t0) for rec in recs]


# -- backends ----------------------------------------------------------------------------------
Deliver = Callable[[Cell, list, float], None]


def _run_local(todo: list[Cell], out: Path, jobs: int, threads: int | None, isolate: bool, n_latency: int,
               timeout: float | None, deliver: Deliver) -> None:
    if not isolate:
        for cell in todo:
            t0 = time.perf_counter()
            deliver(cell, execute_cell(cell, threads, _cell_dir(out, cell), n_latency), t0)
        return
    queue = list(todo)
    running: list[_Running] = []
    try:
        while queue or running:
            while queue and len(running) < jobs:
                cell = queue.pop(0)
                _start(cell, threads, _cell_dir(out, cell), n_latency, timeout, running)
            time.sleep(0.05)
            for run in list(running):
                late = run.timeout is not None and time.perf_counter() - run.t0 > run.timeout
                if run.proc.poll() is None and not late:
                    continue
                if late and run.proc.poll() is None:
                    run.proc.kill()
                recs = _collect(run, timed_out=late)
                running.remove(run)
                deliver(run.cell, recs, run.t0)
    finally:
        while running:  # interrupted: no orphan keeps running (its cell is simply not recorded)
            _stop(running.pop())


def _ray_cell(cell_json: dict, threads: int | None, n_latency: int, timeout: float | None):
    """A Ray task: run one cell in a fresh process on the node that got it; return its record and
    the bytes of its artifact files (the node's disk is not the driver's)."""
    cell = Cell.from_json(cell_json)
    with tempfile.TemporaryDirectory(prefix="defectscope-ray-") as tmp:
        recs = run_cell(cell, threads=threads, isolate=True, artifacts_dir=tmp, n_latency=n_latency, timeout=timeout)
        files = {p.relative_to(tmp).as_posix(): p.read_bytes() for p in Path(tmp).rglob("*") if p.is_file()}
    return [{k: v for k, v in r.items() if k not in ("artifacts", "cell_key", "wall_s")} for r in recs], files


def _run_ray(todo: list[Cell], out: Path, jobs: int | None, threads: int | None, n_latency: int,
             timeout: float | None, deliver: Deliver, address: str | None) -> None:
    try:
        import ray
    except ImportError as e:
        raise DefectscopeError("--backend ray needs Ray: pip install 'defectscope[ray]'") from e
    started = not ray.is_initialized()
    if started:
        ray.init(address=address, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    try:
        task = ray.remote(num_cpus=threads or 1, max_retries=0)(_ray_cell)
        queue = list(todo)
        pending: dict = {}
        limit = jobs or len(queue)
        while queue or pending:
            while queue and len(pending) < limit:
                cell = queue.pop(0)
                pending[task.remote(cell.to_json(), threads, n_latency, timeout)] = (cell, time.perf_counter())
            done, _ = ray.wait(list(pending), num_returns=1)
            cell, t0 = pending.pop(done[0])
            try:
                recs, files = ray.get(done[0])
            except Exception as e:  # noqa: BLE001 - a lost node or a worker that cannot import us
                first = str(e).strip().splitlines()[0] if str(e).strip() else ""
                recs, files = [{"error": f"ray task failed: {type(e).__name__}: {first} (every Ray node must "
                                         "have defectscope and its dependencies installed)"}], {}
            cdir = _cell_dir(out, cell)
            for name, data in files.items():
                target = cdir / name
                if cdir.resolve() not in target.resolve().parents:
                    continue  # never write outside the cell's folder
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(data)
            deliver(cell, recs, t0)
    finally:
        if started:
            ray.shutdown()


def _cell_dir(out: Path, cell: Cell) -> Path:
    d = out / CELLS / cell.cell_id
    shutil.rmtree(d, ignore_errors=True)  # nothing stale from an interrupted earlier attempt
    d.mkdir(parents=True, exist_ok=True)
    return d


def run_grid(cells: Iterable[Cell], out_dir, resume: bool = False, threads: int | None = None,
             isolate: bool = True, on_result=None, jobs: int | None = None, backend: str = "local",
             ray_address: str | None = None, n_latency: int = 50, timeout: float | None = None,
             estimates: dict[str, float] | None = None) -> list[dict]:
    """Run every cell not already in ``OUT/results.jsonl`` (when ``resume``), appending each
    record as it finishes. Returns the records of this grid (old and new), in cell order.

    ``jobs``: cells at once (default 1 locally; for Ray, as many as the cluster schedules);
    ``threads``: torch threads per cell (default: the cores divided by ``jobs`` when jobs > 1,
    torch's default for one job, 1 for Ray, each Ray task then asking for ``threads`` CPUs); ``backend``: ``"local"`` or ``"ray"`` (``ray_address``: an
    existing cluster, default a local instance); ``timeout``: seconds a cell may take;
    ``estimates``: each cell's estimated seconds by key (:func:`estimate_cell`), which weight the
    progress line's ETA (equal weights without them).
    """
    if backend not in ("local", "ray"):
        raise DefectscopeError(f"unknown backend {backend!r}; use local or ray")
    if jobs is not None and jobs < 1:
        raise DefectscopeError(f"jobs must be >= 1, got {jobs}")
    cells = list({c.key: c for c in cells}.values())  # the same cell twice runs once
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if not resume and (out / RESULTS).exists():
        (out / RESULTS).rename(out / f"results.{time.strftime('%Y%m%d-%H%M%S')}.jsonl")
    if backend == "local" and isolate:
        try:
            sweep_stale_cell_dirs()
        except OSError:
            pass
    done: dict[str, list] = {}
    for r in read_results(out) if resume else []:
        done.setdefault(record_key(r), []).append(r)
    todo = [c for c in cells if c.key not in done]
    if threads is None and backend == "local" and (jobs or 1) > 1:
        threads = max(1, available_cores() // jobs)
    elif threads is None and backend == "ray":
        threads = 1  # Ray's own convention for a task of one CPU; ask for more with threads=
    known = [e for e in ((estimates or {}).get(c.key) for c in todo) if e]
    fill = sum(known) / len(known) if known else 1.0  # a cell of a method with no cost: the mean
    weight = {c.key: (estimates or {}).get(c.key) or fill for c in todo}
    bar = WeightedProgress([weight[c.key] for c in todo], desc="bench", unit="cell", calibrated=bool(known))

    def deliver(cell: Cell, recs: list, t0: float) -> None:
        finished = []
        for rec in recs:
            rec = _finish_record(cell, rec, t0, out / CELLS / cell.cell_id, out)
            rec["jobs"] = jobs or (1 if backend == "local" else None)
            rec["backend"] = backend
            rec["latency_runs"] = n_latency
            append_result(out, rec)
            finished.append(rec)
        done[cell.key] = finished
        if on_result:
            # the bar is cleared while the lines are printed, then drawn again below them (printed
            # over the bar, they made tqdm draw its final state twice: before them and on close)
            with tqdm.external_write_mode():
                for rec in finished:
                    on_result(rec)
        bar.done(weight[cell.key], f"{cell.model} {cell.category or ''}".strip())

    try:
        if backend == "ray":
            _run_ray(todo, out, jobs, threads, n_latency, timeout, deliver, ray_address)
        else:
            _run_local(todo, out, jobs or 1, threads, isolate, n_latency, timeout, deliver)
    finally:
        bar.close()
    return [r for c in cells for r in done.get(c.key, [])]


def cells_for(models: list[str], data: str, categories: list[str | None], seeds: list[int],
              params: dict[str, dict] | None = None, setting: str = "one-class",
              contaminations: list[float | None] | None = None, shots: list[int] | None = None) -> list[Cell]:
    """The grid's cells in a stable order (model-major, then category, contamination or shots, seed).

    ``contaminations``: the blind-mix fractions (one cell each); ``shots``: the few-shot image
    counts (one cell each). In the multi-class setting a model has one cell per seed, learning
    the union of ``categories`` (its records: one per category).
    """
    params = params or {}
    ps = {m: tuple(sorted(params.get(m, {}).items())) for m in models}
    if setting == "multi-class":
        cats = tuple(c for c in categories if c is not None)
        return [Cell(m, data, None, s, ps[m], setting, categories=cats) for m in models for s in seeds]
    if setting == "few-shot":
        if not shots:
            raise DefectscopeError("the few-shot setting needs shots, e.g. --shots 1,2,4,8")
        return [Cell(m, data, c, s, ps[m], setting, shots=k) for m in models for c in categories for k in shots
                for s in seeds]
    levels = list(contaminations) if contaminations else [None]
    return [Cell(m, data, c, s, ps[m], setting, lvl) for m in models for c in categories for lvl in levels for s in seeds]


__all__ = ["Cell", "CELL_OVERHEAD_S", "estimate_cell", "Interrupted", "stop_on_signals", "sweep_stale_cell_dirs", "run_cell", "run_grid", "cells_for", "read_results", "append_result", "execute_cell",
           "available_cores", "RESULTS", "CELLS"]
