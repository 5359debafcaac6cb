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
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

from tqdm.auto import tqdm

from ..errors import DefectscopeError

RESULTS = "results.jsonl"
CELLS = "cells"


@dataclass(frozen=True)
class Cell:
    """One run of the grid."""

    model: str
    data: str
    category: str | None
    seed: int = 0
    params: tuple = field(default_factory=tuple)  # sorted (key, value) pairs, hashable
    setting: str = "one-class"  # or blind-mix, blind-test, blind-ano (defectscope.data.blind)
    contamination: float | None = None  # blind-mix: fraction of the anomalous test images trained on

    @property
    def blind(self) -> list:
        """``[setting, contamination]`` for a blind cell, ``[]`` for one-class (whose key stays as before)."""
        return [] if self.setting == "one-class" else [self.setting, self.contamination]

    @property
    def key(self) -> str:
        return json.dumps([self.model, self.data, self.category, self.seed, list(self.params)] + self.blind,
                          sort_keys=True)

    @property
    def cell_id(self) -> str:
        """A short, file-system-safe, unique name: ``model_dataset_category_s<seed>_<hash>``."""
        kind = self.data.split(":", 1)[0]
        blind = ""
        if self.blind:
            blind = f"_{self.setting}" + ("" if self.contamination is None else f"{self.contamination:g}")
        name = re.sub(r"[^A-Za-z0-9_.-]+", "-", f"{self.model}_{kind}_{self.category or 'all'}_s{self.seed}{blind}")
        return f"{name[:80]}_{hashlib.sha1(self.key.encode()).hexdigest()[:8]}"

    def to_json(self) -> dict:
        return {"model": self.model, "data": self.data, "category": self.category, "seed": self.seed,
                "params": [list(p) for p in self.params], "setting": self.setting,
                "contamination": self.contamination}

    @classmethod
    def from_json(cls, d: dict) -> "Cell":
        return cls(d["model"], d["data"], d["category"], int(d["seed"]), tuple(tuple(p) for p in d["params"]),
                   d.get("setting") or "one-class", d.get("contamination"))


def record_key(rec: dict) -> str:
    """The cell key of a finished record (matches :attr:`Cell.key`)."""
    return rec.get("cell_key") or ""


def read_results(out_dir) -> list[dict]:
    """The records of ``OUT/results.jsonl``; a torn line (a killed writer) is ignored."""
    path = Path(out_dir) / RESULTS
    if not path.exists():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def append_result(out_dir, record: dict) -> None:
    """Append one record as a single line, flushed and synced to disk."""
    path = Path(out_dir) / RESULTS
    path.parent.mkdir(parents=True, exist_ok=True)
    line = json.dumps(record, default=str) + "\n"
    torn = False
    if path.exists() and path.stat().st_size:
        with open(path, "rb") as f:  # a torn line from a killed earlier run must not glue onto this one
            f.seek(-1, os.SEEK_END)
            torn = f.read(1) != b"\n"
    with open(path, "a", encoding="utf-8") as f:
        f.write(("\n" if torn else "") + line)
        f.flush()
        os.fsync(f.fileno())


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


# -- one cell ----------------------------------------------------------------------------------
def execute_cell(cell: Cell, threads: int | None = None, artifacts_dir=None, n_latency: int = 50) -> dict[str, Any]:
    """Run ``cell`` in this process and return its record; any exception becomes ``error``."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    from ..engine.evaluate import run_experiment

    try:
        return run_experiment(cell.model, dict(cell.params), cell.data, cell.category, cell.seed,
                              setting=cell.setting, contamination=cell.contamination,
                              n_latency=n_latency, artifacts_dir=artifacts_dir)
    except Exception as e:  # noqa: BLE001 - the row must record any failure
        rec: dict[str, Any] = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc(limit=8)}
        try:
            rec.update(_environment())
            rec["threads"] = torch.get_num_threads()
        except Exception:  # noqa: BLE001
            pass
        return rec


def _package_parent() -> str | None:
    """The folder to put on the child's path so that it imports this very package, or None when
    the package is installed (a site-packages folder must not go before the standard library)."""
    parent = Path(__file__).resolve().parents[2]
    return None if parent.name in ("site-packages", "dist-packages") else str(parent)


@dataclass
class _Running:
    cell: Cell
    proc: subprocess.Popen
    tmp: str
    result_file: str
    t0: float
    timeout: float | None


def _start(cell: Cell, threads: int | None, artifacts_dir, n_latency: int, timeout: float | None) -> _Running:
    tmp = tempfile.mkdtemp(prefix="defectscope-cell-")
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
    proc = subprocess.Popen([sys.executable, "-m", "defectscope.bench.worker", job_file], env=env,
                            stdin=subprocess.DEVNULL)
    return _Running(cell, proc, tmp, result_file, time.perf_counter(), timeout)


def _stop(run: _Running) -> None:
    if run.proc.poll() is None:
        run.proc.kill()
    run.proc.wait()
    shutil.rmtree(run.tmp, ignore_errors=True)


def _collect(run: _Running, timed_out: bool = False) -> dict[str, Any]:
    code = run.proc.wait()
    try:
        rec = json.loads(Path(run.result_file).read_text())
    except (OSError, json.JSONDecodeError):
        if timed_out:
            why = f"timed out after {run.timeout:g} s"
        elif code is not None and code < 0:
            why = f"killed by signal {-code}" + (" (out of memory?)" if -code == 9 else "")
        else:
            why = f"exit code {code}"
        rec = {"error": f"process died: {why}"}
    finally:
        shutil.rmtree(run.tmp, ignore_errors=True)
    return rec


def _finish_record(cell: Cell, rec: dict, t0: float, artifacts_dir=None, out_dir=None) -> dict[str, Any]:
    base = {"model": cell.model, "params": dict(cell.params), "dataset": cell.data.split(":", 1)[0],
            "data": cell.data, "category": cell.category, "setting": cell.setting,
            "contamination": 0.0 if cell.setting == "one-class" else cell.contamination, "seed": cell.seed}
    rec = {**base, **rec}
    rec.setdefault("error", None)
    if rec["error"] and "versions" not in rec:
        try:
            rec.update(_environment())
        except Exception:  # noqa: BLE001
            pass
    rec["cell_key"] = cell.key
    rec["wall_s"] = time.perf_counter() - t0
    if artifacts_dir is not None and out_dir is not None:
        from ..report.artifacts import ARTIFACT_FILE

        if (Path(artifacts_dir) / ARTIFACT_FILE).is_file():
            rec["artifacts"] = Path(os.path.relpath(artifacts_dir, out_dir)).as_posix()
    return rec


def run_cell(cell: Cell, threads: int | None = None, isolate: bool = True, artifacts_dir=None,
             n_latency: int = 50, timeout: float | None = None) -> dict[str, Any]:
    """Run one cell (in a fresh process when ``isolate``) and return its record, never raising."""
    t0 = time.perf_counter()
    if not isolate:
        return _finish_record(cell, execute_cell(cell, threads, artifacts_dir, n_latency), t0)
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
    return _finish_record(cell, _collect(run, timed_out), t0)


# -- backends ----------------------------------------------------------------------------------
Deliver = Callable[[Cell, dict, float], None]


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
                running.append(_start(cell, threads, _cell_dir(out, cell), n_latency, timeout))
            time.sleep(0.05)
            for run in list(running):
                late = run.timeout is not None and time.perf_counter() - run.t0 > run.timeout
                if run.proc.poll() is None and not late:
                    continue
                if late and run.proc.poll() is None:
                    run.proc.kill()
                running.remove(run)
                deliver(run.cell, _collect(run, timed_out=late), run.t0)
    finally:
        for run in running:  # interrupted: no orphan keeps running (its cell is simply not recorded)
            _stop(run)


def _ray_cell(cell_json: dict, threads: int | None, n_latency: int, timeout: float | None):
    """A Ray task: run one cell in a fresh process on the node that got it; return its record and
    the bytes of its artifact files (the node's disk is not the driver's)."""
    cell = Cell.from_json(cell_json)
    with tempfile.TemporaryDirectory(prefix="defectscope-ray-") as tmp:
        rec = run_cell(cell, threads=threads, isolate=True, artifacts_dir=tmp, n_latency=n_latency, timeout=timeout)
        files = {p.name: p.read_bytes() for p in Path(tmp).iterdir() if p.is_file()}
    rec.pop("artifacts", None)
    return rec, files


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
                rec, files = ray.get(done[0])
            except Exception as e:  # noqa: BLE001 - a lost node or a worker that cannot import us
                first = str(e).strip().splitlines()[0] if str(e).strip() else ""
                rec, files = {"error": f"ray task failed: {type(e).__name__}: {first} (every Ray node must "
                                       "have defectscope and its dependencies installed)"}, {}
            cdir = _cell_dir(out, cell)
            for name, data in files.items():
                (cdir / Path(name).name).write_bytes(data)
            deliver(cell, rec, t0)
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
             ray_address: str | None = None, n_latency: int = 50, timeout: float | None = None) -> list[dict]:
    """Run every cell not already in ``OUT/results.jsonl`` (when ``resume``), appending each
    record as it finishes. Returns the records of this grid (old and new), in cell order.

    ``jobs``: cells at once (default 1 locally; for Ray, as many as the cluster schedules);
    ``threads``: torch threads per cell (default: the cores divided by ``jobs`` when jobs > 1,
    torch's default for one job, 1 for Ray, each Ray task then asking for ``threads`` CPUs); ``backend``: ``"local"`` or ``"ray"`` (``ray_address``: an
    existing cluster, default a local instance); ``timeout``: seconds a cell may take.
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
    done = {record_key(r): r for r in read_results(out)} if resume else {}
    todo = [c for c in cells if c.key not in done]
    if threads is None and backend == "local" and (jobs or 1) > 1:
        threads = max(1, available_cores() // jobs)
    elif threads is None and backend == "ray":
        threads = 1  # Ray's own convention for a task of one CPU; ask for more with threads=
    bar = tqdm(total=len(todo), desc="bench", disable=None)

    def deliver(cell: Cell, rec: dict, t0: float) -> None:
        rec = _finish_record(cell, rec, t0, out / CELLS / cell.cell_id, out)
        rec["jobs"] = jobs or (1 if backend == "local" else None)
        rec["backend"] = backend
        rec["latency_runs"] = n_latency
        append_result(out, rec)
        done[cell.key] = rec
        bar.update(1)
        bar.set_postfix_str(f"{cell.model} {cell.category or ''}")
        if on_result:
            on_result(rec)

    try:
        if backend == "ray":
            _run_ray(todo, out, jobs, threads, n_latency, timeout, deliver, ray_address)
        else:
            _run_local(todo, out, jobs or 1, threads, isolate, n_latency, timeout, deliver)
    finally:
        bar.close()
    return [done[c.key] for c in cells if c.key in done]


def cells_for(models: list[str], data: str, categories: list[str | None], seeds: list[int],
              params: dict[str, dict] | None = None, setting: str = "one-class",
              contaminations: list[float | None] | None = None) -> list[Cell]:
    """The grid's cells in a stable order (model-major, then category, contamination, seed).
    ``contaminations``: the blind-mix fractions (one cell each; ``[None]`` for other settings)."""
    params = params or {}
    levels = list(contaminations) if contaminations else [None]
    return [Cell(m, data, c, s, tuple(sorted(params.get(m, {}).items())), setting, lvl)
            for m in models for c in categories for lvl in levels for s in seeds]


__all__ = ["Cell", "run_cell", "run_grid", "cells_for", "read_results", "append_result", "execute_cell",
           "available_cores", "RESULTS", "CELLS"]
