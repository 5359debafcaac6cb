"""Shared machinery of the side-by-side benchmarks (defectscope vs the reference library, anomalib).

Both sides run as subprocesses on the very same data, image size, thread count and backbone
weights, one model and category at a time, interleaved A/B (ours, reference, ours, reference...)
when ``repeats > 1`` so that slow drifts of the machine hit both alike; the table reports medians.

* defectscope: ``python -c`` calling :func:`defectscope.engine.run_experiment` (this interpreter,
  ``src/`` on ``PYTHONPATH``), after ``torch.set_num_threads(threads)``.
* reference: ``benchmarks/reference_anomalib.py`` run by the reference venv's Python
  (``$DEFECTSCOPE_REFERENCE_VENV``, default ``benchmarks/.venv-reference``; made by
  ``benchmarks/setup_reference.sh``). It dumps raw scores, labels, maps and masks as ``.npy``;
  the metrics of both sides are then computed by the same code,
  :func:`defectscope.metrics.compute_metrics` (anomalib's own values are reported beside them).

Subprocess environment of both sides: ``OMP_NUM_THREADS`` = ``MKL_NUM_THREADS`` = threads,
``TQDM_DISABLE=1``. Each run is a fresh process, so its peak RSS is its own.
"""

from __future__ import annotations

import importlib
import json
import os
import platform
import statistics
import subprocess
import sys
import textwrap
import time
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
SRC = REPO / "src"
RUNNER = HERE / "reference_anomalib.py"
DEFAULT_VENV = HERE / ".venv-reference"
#: Where tables, JSON records and arrays go by default (ignored by git: /defectscope-bench/).
DEFAULT_OUT_DIR = REPO / "defectscope-bench" / "compare"

#: Rows of the table: (key, label, how to format, whether lower is better).
ROWS: list[tuple[str, str, str, bool]] = [
    ("fit_s", "fit time (s)", "{:.1f}", True),
    ("latency_ms", "latency, batch 1 (ms)", "{:.1f}", True),
    ("throughput_ips", "throughput, batch 16 (img/s)", "{:.1f}", False),
    ("peak_rss_mb", "peak RSS (MB)", "{:.0f}", True),
    ("model_mb", "model size (MB)", "{:.1f}", True),
    ("image_auroc", "image AUROC", "{:.4f}", False),
    ("pixel_auroc", "pixel AUROC", "{:.4f}", False),
    ("aupro", "AUPRO (FPR <= 0.3)", "{:.4f}", False),
]


# ------------------------------------------------------------------------------------------------
# defectscope imports that survive a package being edited


def import_defectscope(modname: str) -> types.ModuleType:
    """Import ``defectscope.<...>``; if the package's ``__init__`` fails to import (work in
    progress elsewhere in the package), load the module with bare parent packages instead, so
    self-contained modules (metrics, data.synthetic) still work."""
    if str(SRC) not in sys.path:
        sys.path.insert(0, str(SRC))
    try:
        return importlib.import_module(modname)
    except Exception as first:  # noqa: BLE001
        for key in [k for k in sys.modules if k == "defectscope" or k.startswith("defectscope.")]:
            del sys.modules[key]
        parts = modname.split(".")
        for i in range(1, len(parts)):
            name = ".".join(parts[:i])
            mod = types.ModuleType(name)
            mod.__path__ = [str(SRC.joinpath(*parts[:i]))]
            mod.__package__ = name
            sys.modules[name] = mod
        try:
            return importlib.import_module(modname)
        except Exception as second:  # noqa: BLE001
            raise ImportError(f"cannot import {modname}: {first!r}; bare import: {second!r}") from second


# ------------------------------------------------------------------------------------------------
# data


def make_data(n_train: int = 200, categories: Sequence[str] | None = None, image_size: int = 256,
              channels: int = 3, seed: int = 0, out_dir: str | os.PathLike | None = None) -> Path:
    """The benchmark set: defectscope's synthetic set (MVTec layout), made once and reused.

    With ``out_dir`` it is written there (:func:`make_synthetic`, a no-op when the folder already
    holds the same set); otherwise it lives in defectscope's cache (:func:`synthetic_root`).
    """
    syn = import_defectscope("defectscope.data.synthetic")
    params = dict(image_size=image_size, channels=channels, n_train=n_train, seed=seed,
                  categories=list(categories) if categories else None)
    if out_dir is not None:
        return Path(syn.make_synthetic(out_dir, progress=False, **params))
    return Path(syn.synthetic_root(progress=False, **params))


# ------------------------------------------------------------------------------------------------
# machine


def hardware() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                mem = round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_gb": mem, "platform": platform.platform(),
            "python": platform.python_version()}


def _env(threads: int) -> dict[str, str]:
    env = dict(os.environ)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[var] = str(threads)
    env["TQDM_DISABLE"] = "1"
    env["PYTHONUNBUFFERED"] = "1"
    return env


def wait_for_quiet(max_load: float | None, max_wait: float = 1800.0, poll: float = 10.0) -> float:
    """Wait until the 1-minute load average is at most ``max_load`` (other processes competing
    for the cores distort every timing; on a shared machine, see the load recorded with each
    run), at most ``max_wait`` seconds; returns the load average at the end. ``None``: no wait."""
    load = os.getloadavg()[0]
    if max_load is None:
        return load
    t0 = time.monotonic()
    while load > max_load and time.monotonic() - t0 < max_wait:
        time.sleep(poll)
        load = os.getloadavg()[0]
    if load > max_load:
        _log(f"load average still {load:.2f} > {max_load} after {max_wait:.0f}s; running anyway")
    return load


def _log(msg: str) -> None:
    print(f"[harness {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _tail(text: str, n: int = 2500) -> str:
    return text[-n:] if text else ""


# ------------------------------------------------------------------------------------------------
# the two sides

_OURS = r"""
import json, os, sys, time, traceback
threads, out = int(sys.argv[1]), sys.argv[2]
spec = json.loads(sys.argv[3])
record = {"library": "defectscope", "model": spec["model"], "category": spec["category"]}
try:
    import torch
    torch.set_num_threads(threads)
    try:
        import defectscope
        from defectscope.engine import run_experiment
        from defectscope.models import get_model_class
    except Exception as exc:
        record.update(error="not implemented: defectscope does not import (" + repr(exc) + ")",
                      not_implemented=True)
        raise SystemExit(0)
    try:
        cls = get_model_class(spec["model"])
    except Exception as exc:
        record.update(error="not implemented: " + str(exc), not_implemented=True)
        raise SystemExit(0)
    params = {k: v for k, v in spec["params"].items() if k in cls.defaults}
    dropped = sorted(set(spec["params"]) - set(params))
    record["loadavg_before"] = os.getloadavg()
    t0 = time.perf_counter()
    record.update(run_experiment(spec["model"], params, data=spec["data"], category=spec["category"],
                                 seed=spec["seed"], n_latency=spec.get("n_latency") or 50))
    record["wall_s"] = time.perf_counter() - t0
    record["params_dropped"] = dropped
    record["torch_threads"] = torch.get_num_threads()
    record["loadavg_after"] = os.getloadavg()
except SystemExit:
    pass
except BaseException as exc:
    traceback.print_exc()
    record["error"] = repr(exc)
finally:
    with open(out, "w") as fh:
        json.dump(record, fh, indent=2, default=str)
"""


def run_ours(model: str, params: dict, root: Path, category: str, threads: int, out_json: Path,
             seed: int = 0, timeout: float | None = 7200, quiet_load: float | None = None,
             n_latency: int | None = None) -> dict:
    """defectscope's side in a fresh process; ``{"error": "not implemented: ...",
    "not_implemented": True}`` when the model (or the package) is not there yet. ``n_latency``:
    batch-1 calls timed (default 50, the runner's default too)."""
    out_json.parent.mkdir(parents=True, exist_ok=True)
    spec = {"model": model, "params": params, "data": f"mvtec:{root}", "category": category, "seed": seed,
            "n_latency": n_latency}
    env = _env(threads)
    env["PYTHONPATH"] = str(SRC) + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [sys.executable, "-c", _OURS, str(threads), str(out_json), json.dumps(spec)]
    load = wait_for_quiet(quiet_load)
    out_json.unlink(missing_ok=True)
    _log(f"defectscope {model} {category} (load average {load:.2f}) ...")
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"library": "defectscope", "model": model, "error": f"timed out after {timeout} s"}
    rec = json.loads(out_json.read_text()) if out_json.is_file() else {"error": "no record written"}
    rec["returncode"] = proc.returncode
    if proc.returncode < 0:  # e.g. the OOM killer, or someone else's kill
        rec["error"] = f"killed by signal {-proc.returncode} ({rec.get('error') or 'no record written'})"
    elif proc.returncode != 0 and not rec.get("error"):
        rec["error"] = f"exit {proc.returncode}"
    if rec.get("error") and not rec.get("not_implemented"):
        rec["stderr_tail"] = _tail(proc.stderr)
    rec["load_at_start"] = load
    _log(f"defectscope {model} {category}: {time.perf_counter() - t0:.0f}s "
         f"{'-> ' + rec['error'] if rec.get('error') else ''}")
    return rec


def reference_python() -> Path:
    venv = Path(os.environ.get("DEFECTSCOPE_REFERENCE_VENV", DEFAULT_VENV)).expanduser()
    py = venv / "bin" / "python"
    if not py.exists():
        raise FileNotFoundError(f"no reference venv at {venv}: run `bash benchmarks/setup_reference.sh` "
                                "(or set DEFECTSCOPE_REFERENCE_VENV)")
    return py


def run_reference(model: str, args: dict, root: Path, category: str, threads: int, out_json: Path,
                  image_size: int = 256, seed: int = 0, timeout: float | None = 7200,
                  quiet_load: float | None = None) -> dict:
    """anomalib's side (``reference_anomalib.py`` in the reference venv); its metrics are then
    recomputed from the dumped arrays with defectscope's ``compute_metrics``."""
    out_json.parent.mkdir(parents=True, exist_ok=True)
    cmd = [str(reference_python()), str(RUNNER), "--model", model, "--data", str(root),
           "--category", category, "--image-size", str(image_size), "--threads", str(threads),
           "--seed", str(seed), "--out", str(out_json)]
    for key, value in args.items():
        if value is None or value is False:
            continue
        flag = "--" + key.replace("_", "-")
        if value is True:
            cmd.append(flag)
        else:
            cmd += [flag, ",".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)]
    load = wait_for_quiet(quiet_load)
    out_json.unlink(missing_ok=True)
    _log(f"anomalib {model} {category} (load average {load:.2f}) ...")
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, env=_env(threads), cwd=REPO, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"library": "anomalib", "model": model, "error": f"timed out after {timeout} s"}
    rec = json.loads(out_json.read_text()) if out_json.is_file() else {"error": "no record written"}
    rec["returncode"] = proc.returncode
    if proc.returncode < 0:  # e.g. the OOM killer, or someone else's kill
        rec["error"] = f"killed by signal {-proc.returncode} ({rec.get('error') or 'no record written'})"
    elif proc.returncode != 0 and not rec.get("error"):
        rec["error"] = f"exit {proc.returncode}"
    if rec.get("error"):
        rec["stderr_tail"] = _tail(proc.stderr)
    else:
        rec["anomalib_raw_metrics"] = {k: rec.get(k) for k in ("image_auroc", "pixel_auroc", "aupro")}
        rec.update(reference_metrics(rec))
    rec["command"] = " ".join(cmd)
    rec["load_at_start"] = load
    _log(f"anomalib {model} {category}: {time.perf_counter() - t0:.0f}s "
         f"{'-> ' + rec['error'] if rec.get('error') else ''}")
    return rec


def reference_metrics(rec: dict) -> dict:
    """defectscope's metrics of the reference's dumped raw arrays."""
    import numpy as np

    metrics = import_defectscope("defectscope.metrics")
    arr = {k: np.load(p) for k, p in rec["arrays"].items()}
    return metrics.compute_metrics(scores=arr["scores"], labels=arr["labels"], maps=arr.get("maps"),
                                   masks=arr.get("masks") if "maps" in arr else None)  # image-only: no maps


# ------------------------------------------------------------------------------------------------
# a comparison


@dataclass
class Case:
    """One model compared on both sides.

    ``ours`` are defectscope's hyper-parameters (those its model does not know are dropped and
    reported), ``reference`` the runner's options (``coreset_ratio`` -> ``--coreset-ratio``).
    ``link`` maps a key of defectscope's resolved ``params`` to a runner option, filled from our
    first run (e.g. the feature count PaDiM keeps), so both sides use the same value.
    ``image_size``: this case's side on both sides, in place of the run's (e.g. GANomaly at 64 px).
    ``n_latency``: batch-1 calls timed on both sides (default 50) for slow models.
    """

    name: str
    ours_model: str
    ref_model: str
    ours: dict = field(default_factory=dict)
    reference: dict = field(default_factory=dict)
    link: dict = field(default_factory=dict)
    notes: list = field(default_factory=list)
    image_size: int | None = None
    n_latency: int | None = None


def _median(values: list) -> float | None:
    vals = [v for v in values if isinstance(v, (int, float)) and v == v]
    return statistics.median(vals) if vals else None


def run_case(case: Case, root: Path, category: str, *, threads: int = 2, repeats: int = 1,
             image_size: int = 256, seed: int = 0, skip_reference: bool = False,
             skip_ours: bool = False, out_dir: Path = DEFAULT_OUT_DIR,
             timeout: float | None = 7200, quiet_load: float | None = None,
             model_seeds: Sequence[int] | None = None) -> dict:
    """Run ``case`` ``repeats`` times on both sides, interleaved: ours, reference, ours, ...

    ``model_seeds``: one run per side and seed instead (``repeats`` is then ignored); each run's
    model is seeded with its seed on both sides, on the same data: the spread over seeds tells a
    difference between the implementations from the luck of one initialisation."""
    runs_dir = Path(out_dir) / "runs"
    image_size = case.image_size or image_size
    ours_runs, ref_runs = [], []
    ref_args = dict(case.reference)
    if case.n_latency:
        ref_args.setdefault("n_latency", case.n_latency)
    run_seeds = list(model_seeds) if model_seeds else [seed] * repeats
    for i, run_seed in enumerate(run_seeds):
        tag = f"{case.name}_{category}_r{i}"
        if not skip_ours:
            rec = run_ours(case.ours_model, {**case.ours, "image_size": image_size}, root, category,
                           threads, runs_dir / f"ours_{tag}.json", seed=run_seed, timeout=timeout,
                           quiet_load=quiet_load, n_latency=case.n_latency)
            ours_runs.append(rec)
            for our_key, ref_key in case.link.items():
                value = (rec.get("params") or {}).get(our_key)
                if value is not None and ref_args.get(ref_key) is None:
                    ref_args[ref_key] = value
            if rec.get("not_implemented"):
                skip_ours = True  # no point retrying
        if not skip_reference:
            ref_runs.append(run_reference(case.ref_model, ref_args, root, category, threads,
                                          runs_dir / f"anomalib_{tag}.json", image_size=image_size,
                                          seed=run_seed, timeout=timeout, quiet_load=quiet_load))
    return {"case": case.name, "category": category, "ours": ours_runs, "reference": ref_runs,
            "reference_args": ref_args, "notes": case.notes, "image_size": image_size,
            "model_seeds": list(model_seeds) if model_seeds else None}


def summarize(runs: list[dict]) -> dict:
    ok = [r for r in runs if not r.get("error")]
    out = {key: _median([r.get(key) for r in ok]) for key, *_ in ROWS}
    out["n_ok"] = len(ok)
    out["errors"] = sorted({r["error"] for r in runs if r.get("error")})
    return out


def _fmt(fmt: str, v) -> str:
    return "n/a" if v is None else fmt.format(v)


def markdown(results: list[dict], title: str, threads: int, extra_header: Sequence[str] = ()) -> str:
    hw = hardware()
    lines = [f"# {title}", "",
             f"- hardware: {hw['cpu']}, {hw['cores']} cores, {hw['memory_gb']} GB RAM; "
             f"{hw['platform']}, Python {hw['python']}",
             f"- threads: {threads} (`torch.set_num_threads` and `OMP_NUM_THREADS`, both sides), "
             "CPU, one fresh process per run",
             "- metrics of both sides computed by `defectscope.metrics.compute_metrics` on the raw "
             "scores / maps (anomalib's: dumped by `benchmarks/reference_anomalib.py`)",
             "- ratio = defectscope / anomalib (times, memory, size: < 1 is better for defectscope; "
             "metrics: > 1 is better); figures are medians over the repeats",
             *[f"- {h}" for h in extra_header], ""]
    for res in results:
        ours, ref = summarize(res["ours"]), summarize(res["reference"])
        n_rep = max(len(res["ours"]), len(res["reference"]))
        size = f", {res['image_size']} px" if res.get("image_size") else ""
        lines += [f"## {res['case']} / {res['category']} ({n_rep} run{'s' if n_rep != 1 else ''} per side{size})", ""]
        lines += ["| metric | defectscope | anomalib | ratio |", "|---|---:|---:|---:|"]
        for key, label, fmt, _lower in ROWS:
            a, b = ours.get(key), ref.get(key)
            ratio = f"{a / b:.2f}" if a is not None and b not in (None, 0) else "n/a"
            lines.append(f"| {label} | {_fmt(fmt, a)} | {_fmt(fmt, b)} | {ratio} |")
        lines.append("")
        if ours["errors"]:
            lines.append(f"- defectscope: {'; '.join(ours['errors'])}")
        if not res["ours"]:
            lines.append("- defectscope: not run")
        if ref["errors"]:
            lines.append(f"- anomalib: {'; '.join(ref['errors'])}")
        if not res["reference"]:
            lines.append("- anomalib: not run (--skip-reference)")
        good = [r for r in res["reference"] if not r.get("error")]
        if good:
            r = good[-1]
            own = r.get("anomalib_engine_test") or {}
            lines.append(
                f"- anomalib details (last run): engine.fit {r.get('engine_fit_s', 0):.1f} s in all "
                f"(includes a validation pass over the test set: {_fmt('{:.1f}', r.get('validation_s'))} s); "
                f"fit CPU time {_fmt('{:.1f}', r.get('fit_cpu_s'))} s; "
                f"pipeline latency (pre-processor + model + post-processor) "
                f"{_fmt('{:.1f}', r.get('latency_ms_pipeline'))} ms; load average before fit "
                f"{_fmt('{:.1f}', (r.get('loadavg_before_fit') or [None])[0])}")
            lines.append(
                "- anomalib's own metric code: raw arrays "
                + ", ".join(f"{k} {_fmt('{:.4f}', v)}" for k, v in (r.get("anomalib_raw_metrics") or {}).items())
                + "; engine.test (post-processed outputs) "
                + ", ".join(f"{k} {_fmt('{:.4f}', v)}" for k, v in own.items() if not isinstance(v, str)))
            lines.append(f"- anomalib parameters: {json.dumps(r.get('params'), default=str)}")
        ok_ours = [r for r in res["ours"] if not r.get("error")]
        if ok_ours:
            r = ok_ours[-1]
            lines.append(f"- defectscope parameters: {json.dumps(r.get('params'), default=str)}"
                         + (f" (dropped, unknown to the model: {r['params_dropped']})" if r.get("params_dropped") else ""))
        loads = [f"{side} " + ", ".join(f"{r['load_at_start']:.2f}" for r in res[key] if "load_at_start" in r)
                 for side, key in (("defectscope", "ours"), ("anomalib", "reference"))
                 if any("load_at_start" in r for r in res[key])]
        if loads:
            lines.append("- 1-min load average at the start of each run (other processes on the cores "
                         "inflate every timing): " + "; ".join(loads))
        if n_rep > 1:
            per_run = [f"{side} " + ", ".join(_fmt("{:.2f}", 100 * r["image_auroc"]) for r in res[key]
                                              if not r.get("error") and r.get("image_auroc") is not None)
                       for side, key in (("defectscope", "ours"), ("anomalib", "reference"))]
            seeds = f" (model seeds {', '.join(map(str, res['model_seeds']))})" if res.get("model_seeds") else ""
            lines.append(f"- image AUROC % per run{seeds}: " + "; ".join(per_run))
        for note in res.get("notes") or []:
            lines.append(f"- {note}")
        lines.append("")
    return "\n".join(lines)


def run_comparison(cases: Sequence[Case], *, title: str, n_train: int = 200,
                   categories: Sequence[str] = ("washer",), repeats: int = 1, threads: int = 2,
                   image_size: int = 256, seed: int = 0, skip_reference: bool = False,
                   skip_ours: bool = False, out: str | os.PathLike | None = None,
                   data_dir: str | os.PathLike | None = None, timeout: float | None = 7200,
                   select: Callable[[Case], bool] | None = None, quiet_load: float | None = None,
                   model_seeds: Sequence[int] | None = None) -> str:
    """Make the data, run every case on every category, write the table (Markdown) to ``out``
    and a JSON of all records next to it, print the table, and return it."""
    out_path = Path(out) if out else DEFAULT_OUT_DIR / f"{title.split()[0].lower()}.md"
    out_path.parent.mkdir(parents=True, exist_ok=True)
    if not skip_reference:
        reference_python()  # fail early with the setup hint
    _log(f"data: synthetic, {n_train} training images, {image_size} px, 3 channels, seed {seed}")
    root = make_data(n_train=n_train, categories=categories, image_size=image_size, seed=seed,
                     out_dir=data_dir)
    _log(f"data root: {root}")
    results: list[dict] = []
    text = markdown(results, title, threads)
    for category in categories:
        for case in cases:
            if select is not None and not select(case):
                continue
            results.append(run_case(case, root, category, threads=threads, repeats=repeats,
                                    image_size=image_size, seed=seed, skip_reference=skip_reference,
                                    skip_ours=skip_ours, out_dir=out_path.parent, timeout=timeout,
                                    quiet_load=quiet_load, model_seeds=model_seeds))
            text = markdown(results, title, threads,
                            [f"data: {root} (synthetic, {n_train} training images, {image_size}x{image_size}, RGB)"])
            out_path.write_text(text + "\n")  # after every case, so a long run shows progress
            out_path.with_suffix(".json").write_text(json.dumps(results, indent=2, default=str))
    print(text)
    _log(f"wrote {out_path} and {out_path.with_suffix('.json')}")
    return text


__all__ = ["Case", "ROWS", "hardware", "import_defectscope", "make_data", "markdown", "reference_metrics",
           "reference_python", "run_case", "run_comparison", "run_ours", "run_reference", "summarize"]

if __name__ == "__main__":  # pragma: no cover
    print(textwrap.dedent(__doc__))


def add_common_args(p, *, n_train: int, models: str, out_name: str) -> None:
    """The options every side-by-side script shares (data, threads, repeats, runs, output)."""
    p.add_argument("--n-train", type=int, default=n_train, help=f"training images per category (default {n_train})")
    p.add_argument("--repeats", type=int, default=1, help="runs per side, interleaved A/B (default 1)")
    p.add_argument("--categories", default="washer", help="comma-separated synthetic categories "
                   "(washer, fabric; default washer)")
    p.add_argument("--models", default=models, help=f"comma-separated subset of {models}")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--seed", type=int, default=0, help="seed of the data and of the models (default 0)")
    p.add_argument("--model-seeds", default=None, help="comma-separated model seeds: one run per side and seed "
                   "on the same data (--seed's), instead of --repeats; the table gives medians and lists "
                   "each run's image AUROC")
    p.add_argument("--skip-reference", action="store_true", help="run defectscope only")
    p.add_argument("--skip-ours", action="store_true", help="run the reference only")
    p.add_argument("--data-dir", default=None, help="write / reuse the synthetic set here "
                   "(default: defectscope's cache)")
    p.add_argument("--timeout", type=float, default=7200, help="seconds per run (default 7200)")
    p.add_argument("--quiet-load", type=float, default=None, help="before each run, wait (up to 30 "
                   "min) until the 1-min load average is at most this (e.g. 0.5 on a shared machine)")
    p.add_argument("--out", default=str(DEFAULT_OUT_DIR / out_name), help="Markdown table")


def run_from_args(cases: list, title: str, args) -> int:
    """:func:`run_comparison` of the cases named by ``--models``, with the options of
    :func:`add_common_args`."""
    wanted = {m.strip() for m in args.models.split(",") if m.strip()}
    run_comparison(
        cases, title=title, n_train=args.n_train,
        categories=[c.strip() for c in args.categories.split(",") if c.strip()],
        repeats=args.repeats, threads=args.threads, image_size=args.image_size, seed=args.seed,
        skip_reference=args.skip_reference, skip_ours=args.skip_ours, out=args.out,
        data_dir=args.data_dir, timeout=args.timeout, select=lambda c: c.name in wanted,
        quiet_load=args.quiet_load,
        model_seeds=[int(x) for x in args.model_seeds.split(",")] if getattr(args, "model_seeds", None) else None,
    )
    return 0
