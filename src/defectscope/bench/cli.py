"""``defectscope bench``: argument parsing, the presets, the data check and the run's outputs.

Everything is written to ``OUT/``: ``results.jsonl`` (one record per cell, as each finishes),
``cells/`` (what the report draws), ``bench.json`` (the command and settings of the last run),
the tables, the figures and ``report.html`` (see :func:`defectscope.report.build_report`).

``bench.json`` holds the plan (``planned``, ``planned_cells``) from the start. SIGINT or SIGTERM stops
the run cleanly: the running cells' workers are stopped, the tables and the report are written
from the finished cells ("N of M planned cells finished", the missing ones listed), bench.json
gets ``interrupted``, ``signal`` and ``cells_left``, and the exit code is 128 + the signal
(130, 143); ``--resume`` continues it.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import importlib.util
import json
import shlex
import time
from pathlib import Path

from ..arguments import parse_assignments, split_list
from ..errors import DatasetError, DefectscopeError
from ..report.tables import NUMERIC, blind_markdown, markdown_table, mean_rows, partial_markdown, planned_cell
from .grid import Interrupted, cells_for, estimate_cell, run_grid, stop_on_signals

__all__ = ["PRESETS", "NUMERIC", "LONG_RUN_S", "add_bench_arguments", "bench_main", "blind_levels", "check_data",
           "command_line", "mean_rows", "print_plan", "resolve_models"]

# Presets are model filters (:func:`defectscope.models.catalog.select_models`): names, patterns and
# tag filters. A, B and C are the scenario presets of the benchmark guide (shared/seeds/003, section 5).
PRESETS: dict[str, str] = {
    "quick": "padim,sae,stfpm",
    "A": "sae,dae,patchcore,efficientad,padim",
    "B": "sae,dae,patchcore,efficientad,padim,stfpm,fastflow,reverse_distillation",
    "C": "efficientad,patchcore",
    "no-training": "trains=false",
    "zero-shot": "setting=zero-shot",
    "few-shot": "setting=few-shot",
    "multi-class": "setting=multi-class",
}

#: The budgets of the ``quick`` preset, which is what ``defectscope bench`` runs without
#: ``--preset``/``--models``: one method of each family that has landed, untrained (PaDiM, memory)
#: and trained (SAE, reconstruction; STFPM, distillation), short enough to finish in minutes on
#: 2 CPU cores. ``--param`` overrides them; the paper-length grids are behind --preset and --models.
QUICK_BUDGETS: dict[str, dict] = {"padim": {}, "sae": {"epochs": 5}, "stfpm": {"epochs": 10, "image_size": 128}}
PAPER_LENGTHS = {"sae": "epochs=50", "stfpm": "epochs=100, image_size=256"}

FOLDER_LAYOUT = (
    "expected folder layout:\n"
    "  <DIR>/good/*.png                 normal images (20 % of them held out for the test split)\n"
    "  <DIR>/<defect_type>/*.png        anomalous test images (every other sub-folder)\n"
    "  <DIR>/masks/<stem>.png           optional masks (or <stem>_mask.png, or masks/<defect_type>/)\n"
    "or one such folder per category: <DIR>/<category>/good/..."
)


def _layout(kind: str) -> str:
    from ..data import mvtec, visa

    return {"mvtec": mvtec.LAYOUT, "synthetic": mvtec.LAYOUT, "visa": visa.LAYOUT, "folder": FOLDER_LAYOUT}.get(kind, "")


def add_bench_arguments(p) -> None:
    p.add_argument("--preset", choices=sorted(PRESETS),
                   help="quick (the default without --models: padim, sae 5 epochs, stfpm 10 epochs at 128 px; "
                        "minutes), or a scenario preset of the guide at the papers' lengths: A (sae, dae, patchcore, "
                        "efficientad, padim), B (A + stfpm, fastflow, reverse_distillation), C (efficientad, "
                        "patchcore); or a tag filter: no-training, zero-shot, few-shot, multi-class")
    p.add_argument("--models", help="comma-separated methods, patterns (patch*) and tag filters (trains=false, "
                                    "setting=few-shot, paradigm=memory...; '*' = every method at its paper's length); default: "
                                    "the quick preset")
    p.add_argument("--data", default="synthetic", help="synthetic (default), mvtec:DIR, visa:DIR or folder:DIR")
    p.add_argument("--categories", help="comma-separated categories (default: all of the data set)")
    p.add_argument("--seeds", default="0", help="comma-separated seeds (default 0)")
    p.add_argument("--setting", default="normal",
                   choices=("normal", "one-class", "multi-class", "few-shot", "zero-shot", "blind-mix", "blind-test",
                            "blind-ano"),
                   help="normal = one-class (train on train/good of each category, the default); multi-class (one "
                        "model learns the union of the categories' training images, evaluated per category, beside "
                        "the one-class cells of the same models, and the drop between them); "
                        "few-shot (--shots K normal training images, drawn by seed); zero-shot (no training image, "
                        "methods tagged zero-shot only); blind-mix (train/good plus a fraction "
                        "of the anomalous test images, unlabelled; evaluate on the rest); blind-test (the unlabelled "
                        "test set is the training and the evaluation set); blind-ano (anomalous test images only, "
                        "pixel metrics). The split depends on the seed only, the same for every model")
    p.add_argument("--contamination", metavar="F[,F...]",
                   help="blind-mix: fraction(s) of the anomalous test images moved into training, one cell each, "
                        "e.g. 0.1 or 0,0.05,0.1,0.2 (default 0.1)")
    p.add_argument("--shots", metavar="K[,K...]", help="few-shot: training images per cell, e.g. 1,2,4,8 (one cell "
                   "each)")
    p.add_argument("--image-size", type=int, help="input side for every method (default: each method's own)")
    p.add_argument("--param", action="append", metavar="MODEL.NAME=VALUE",
                   help="hyper-parameter for one method, e.g. sae.epochs=10 (repeatable)")
    p.add_argument("--out", default="defectscope-bench", help="output directory (default ./defectscope-bench)")
    p.add_argument("--resume", action="store_true", help="skip the cells already in OUT/results.jsonl")
    p.add_argument("--jobs", type=int, default=None, metavar="N",
                   help="cells run at once, each in its own process (default 1; with --backend ray: as many as "
                        "the cluster schedules)")
    p.add_argument("--threads", type=int,
                   help="torch threads per cell (default: cores / jobs; torch's default for one job; 1 with Ray)")
    p.add_argument("--backend", choices=("local", "ray"), default="local",
                   help="local processes (default) or tasks on a Ray cluster (pip install 'defectscope[ray]')")
    p.add_argument("--ray-address", metavar="ADDRESS",
                   help="Ray cluster to join, e.g. auto or ray://head:10001 (default: start a local Ray instance)")
    p.add_argument("--mlflow", nargs="?", const="", default=None, metavar="URI",
                   help="log each cell and the report to MLflow (pip install 'defectscope[mlflow]'); "
                        "default store: OUT/mlruns")
    p.add_argument("--latency-runs", type=int, default=50, metavar="N",
                   help="single-image predictions timed per cell (default 50, the protocol's minimum)")
    p.add_argument("--timeout", type=float, metavar="S", help="seconds a cell may run before it is stopped")
    p.add_argument("--runtime", default="torch", metavar="R[,R...]",
                   help="what runs each fitted model for evaluation and latency: torch (default), onnx, openvino, "
                        "openvino-int8 (full INT8 calibrated on training images); several = one cell each")
    p.add_argument("--no-report", action="store_true", help="write the tables only, not the figures and report.html")


def resolve_models(preset: str | None, models: str | None, setting: str = "one-class"
                   ) -> tuple[list[str], list[str], list[str]]:
    """(models to run, requested models that do not exist yet, models skipped because their tags
    do not include ``setting``)."""
    from ..data.settings import family
    from ..models import get_model_class
    from ..models.catalog import select_models

    found, missing = select_models(models or (PRESETS[preset] if preset else ""))
    needed = family(setting)
    run = [m for m in found if needed in get_model_class(m).tags.settings]
    return run, missing, [m for m in found if m not in run]


def check_data(spec: str, categories: list[str] | None) -> dict[str, tuple[int, int]]:
    """The categories to run for ``spec`` with their image counts, ``{category: (n_train,
    n_test)}``, after opening each one's train and test split once (which also generates the
    synthetic set before any cell needs it). A missing or malformed data set raises one
    :class:`DatasetError` that shows the expected layout."""
    from ..data import list_categories, load_dataset, parse_spec

    kind, _ = parse_spec(spec)
    try:
        found = list_categories(spec)
        cats = categories or found
        if not cats:
            raise DatasetError(f"no category found in data set {spec}")
        counts = {cat: (len(load_dataset(spec, cat, "train")), len(load_dataset(spec, cat, "test"))) for cat in cats}
    except DatasetError as e:
        text = str(e)
        layout = _layout(kind)
        if layout and "layout" not in text:
            text = f"{text}\n{layout}"
        raise DatasetError(text) from None
    return counts


def _runtimes(spec: str | None) -> list[str]:
    from ..deploy.runtime import RUNTIMES

    names = split_list(spec) or ["torch"]
    bad = [n for n in names if n not in RUNTIMES]
    if bad:
        raise DefectscopeError(f"--runtime {','.join(bad)}: unknown; use one or more of {', '.join(RUNTIMES)}")
    return list(dict.fromkeys(names))


def blind_levels(setting: str | None, contamination: str | None) -> tuple[str, list[float | None]]:
    """The canonical setting and its contamination levels from ``--setting``/``--contamination``."""
    from ..data.settings import normalize_setting

    setting = normalize_setting(setting or "normal")
    if setting != "blind-mix":
        if contamination:
            raise DefectscopeError(f"--contamination applies to --setting blind-mix only, not {setting}")
        return setting, [None]
    try:
        levels = [float(x) for x in split_list(contamination)] if contamination else [0.1]
    except ValueError:
        raise DefectscopeError(f"--contamination {contamination!r}: expected fractions such as 0.1 or "
                               "0,0.05,0.1,0.2") from None
    bad = [x for x in levels if not 0.0 <= x < 1.0]
    if bad or not levels:
        raise DefectscopeError(f"--contamination must be fractions in [0, 1), got {contamination!r}")
    return setting, list(dict.fromkeys(levels))


def _shots(setting: str, text: str | None) -> list[int] | None:
    if setting != "few-shot":
        if text:
            raise DefectscopeError(f"--shots applies to --setting few-shot only, not {setting}")
        return None
    try:
        shots = [int(x) for x in split_list(text)] if text else [1, 2, 4, 8]
    except ValueError:
        raise DefectscopeError(f"--shots {text!r}: expected image counts such as 1,2,4,8") from None
    if not shots or min(shots) < 1:
        raise DefectscopeError(f"--shots must be positive image counts, got {text!r}")
    return list(dict.fromkeys(shots))


def command_line(args) -> str:
    """The ``defectscope bench`` command that runs this benchmark again (from parsed ``args``)."""
    words = ["defectscope", "bench"]
    for flag, value in (("--preset", args.preset), ("--models", args.models), ("--data", args.data),
                        ("--categories", args.categories), ("--seeds", args.seeds if args.seeds != "0" else None),
                        ("--setting", getattr(args, "setting", None) if getattr(args, "setting", None) not in
                         (None, "normal") else None), ("--contamination", getattr(args, "contamination", None)),
                        ("--shots", getattr(args, "shots", None)),
                        ("--image-size", args.image_size)):
        if value is not None:
            words += [flag, str(value)]
    for item in args.param or []:
        words += ["--param", item]
    words += ["--out", str(args.out)]
    for flag, value in (("--jobs", args.jobs), ("--threads", args.threads),
                        ("--backend", args.backend if args.backend != "local" else None),
                        ("--ray-address", args.ray_address),
                        ("--latency-runs", args.latency_runs if args.latency_runs != 50 else None),
                        ("--timeout", args.timeout),
                        ("--runtime", getattr(args, "runtime", None) if getattr(args, "runtime", "torch") != "torch"
                         else None)):
        if value is not None:
            words += [flag, str(value)]
    if args.mlflow is not None:
        words += ["--mlflow"] + ([args.mlflow] if args.mlflow else [])
    return shlex.join(words)


def bench_main(args) -> int:

    setting, levels = blind_levels(getattr(args, "setting", None), getattr(args, "contamination", None))
    shots = _shots(setting, getattr(args, "shots", None))
    quick = not args.models and (args.preset or "quick") == "quick"
    run, missing, skipped = resolve_models("quick" if quick else args.preset, args.models, setting)
    if quick:
        budgets = ", ".join(f"{m} ({', '.join(f'{k}={v}' for k, v in QUICK_BUDGETS[m].items()) or 'paper defaults'}"
                            + (f"; paper: {PAPER_LENGTHS[m]})" if m in PAPER_LENGTHS else ")") for m in run)
        print(f"quick benchmark, a few minutes on 2 CPU cores: {budgets}; the paper-length grids: "
              "--preset A|B|C or --models '*'")
    for name in missing:
        print(f"not implemented yet: {name} (listed, not run)")
    for name in skipped:
        print(f"skipped: {name} does not support the {setting} setting (see 'defectscope models {name}')")
    if not run:
        raise DefectscopeError(f"no implemented model to run in the {setting} setting; see 'defectscope models'")
    if args.jobs is not None and args.jobs < 1:
        raise DefectscopeError(f"--jobs must be at least 1, got {args.jobs}")
    if args.latency_runs < 1:
        raise DefectscopeError(f"--latency-runs must be at least 1, got {args.latency_runs}")
    params: dict[str, dict] = {m: dict(QUICK_BUDGETS.get(m, {})) if quick else {} for m in run}
    for m in run if args.image_size else []:
        params[m]["image_size"] = args.image_size  # over the quick budgets, under --param
    for key, value in parse_assignments(args.param).items():
        model, _, name = key.partition(".")
        if model not in params or not name:
            raise DefectscopeError(f"--param {key}: expected MODEL.NAME=VALUE with MODEL one of {', '.join(run)}")
        params[model][name] = value
    from ..models import get_model_class

    params = {m: get_model_class(m).convert_params(p) for m, p in params.items()}
    for m in [m for m in run if "zero-shot" in get_model_class(m).tags.settings]:
        # methods needing what the user points to (CLIP weights, a model server): skipped when absent
        ok, note = get_model_class(m)(**params[m]).weights_available()
        if not ok:
            print(f"skipped: {m}: {note}", flush=True)
            run.remove(m)
            params.pop(m)
    if not run:
        raise DefectscopeError(f"no model left to run in the {setting} setting (the others were skipped above)")
    if args.backend == "ray" and importlib.util.find_spec("ray") is None:
        raise DefectscopeError("--backend ray needs Ray: pip install 'defectscope[ray]'")
    counts = check_data(args.data, split_list(args.categories))
    categories = list(counts)
    seeds = [int(s) for s in split_list(args.seeds)] or [0]
    cells = cells_for(run, args.data, categories, seeds, params, setting, levels, shots)
    if setting == "multi-class":  # the baseline the report compares with: one model per category
        cells = cells_for(run, args.data, categories, seeds, params, "one-class") + cells
    runtimes = _runtimes(getattr(args, "runtime", None))
    if runtimes != ["torch"]:
        cells = [dataclasses.replace(c, runtime=r) for c in cells for r in runtimes]
    estimates = {c.key: estimate_cell(c, counts, args.latency_runs) for c in cells}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"command": command_line(args),
            "started": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
            "models": run, "not_implemented": missing, "data": args.data, "categories": categories, "seeds": seeds,
            "setting": setting, "contamination": levels if setting == "blind-mix" else None, "shots": shots,
            "jobs": args.jobs or (1 if args.backend == "local" else None), "backend": args.backend,
            "latency_runs": args.latency_runs, "resume": bool(args.resume), "finished": None,
            "planned": len(cells),
            "planned_cells": [{**planned_cell(c.model, c.category, c.setting, c.seed, c.contamination, c.shots,
                                              c.categories, key=c.key, cell_id=c.cell_id),
                               "estimated_s": estimates[c.key], "runtime": c.runtime} for c in cells]}
    _write_meta(out, meta)
    tracker = None
    if args.mlflow is not None:
        from .tracking import MlflowTracker, default_uri

        tracker = MlflowTracker(args.mlflow or default_uri(out), meta)
    print(f"{len(cells)} cell(s): {', '.join(run)} x {len(categories)} categor{'y' if len(categories) == 1 else 'ies'} "
          f"x {len(seeds)} seed(s){'' if setting == 'one-class' else f' x {len(shots or levels)} level(s), setting {setting}'} "
          f"-> {out / 'results.jsonl'}")
    print_plan(cells, estimates, _done_keys(out) if args.resume else set(), args.jobs or 1)
    t0 = time.perf_counter()

    def show(rec):
        status = f"error: {rec['error']}" if rec.get("error") else (
            f"image AUROC {rec['image_auroc']:.3f}" if isinstance(rec.get("image_auroc"), (int, float))
            else f"pixel AUROC {rec.get('pixel_auroc') or float('nan'):.3f} (no image metric)")
        where = "" if setting == "one-class" else f" {setting}" + (
            f" {rec.get('contamination'):g}" if isinstance(rec.get("contamination"), (int, float)) else "") + (
            f" {rec['shots']} shot(s)" if rec.get("shots") else "")
        rt = "" if (rec.get("runtime") or "torch") == "torch" else f" [{rec['runtime']}]"
        print(f"  {rec['model']:<12} {str(rec.get('category')):<12}{where}{rt} {status}", flush=True)
        if tracker:
            tracker.log_cell(rec)

    stopped: Interrupted | None = None
    try:
        with stop_on_signals():  # SIGINT / SIGTERM: the grid stops its workers and cleans up, we report
            records = run_grid(cells, out, resume=args.resume, threads=args.threads, on_result=show, jobs=args.jobs,
                               backend=args.backend, ray_address=args.ray_address, n_latency=args.latency_runs,
                               timeout=args.timeout, estimates=estimates)
    except Interrupted as e:
        stopped = e
        if tracker:
            tracker.fail()
            tracker = None
        records = _finished_records(out, cells)
    except BaseException:
        if tracker:
            tracker.fail()
        raise
    now = _dt.datetime.now().astimezone().isoformat(timespec="seconds")
    if stopped is None:
        meta["finished"] = now
    else:
        keys = {r.get("cell_key") for r in records}
        left = [c.cell_id for c in cells if c.key not in keys]
        meta.update(finished=None, interrupted=now, signal=stopped.name, cells_finished=len(cells) - len(left),
                    cells_left=left)
    _write_meta(out, meta)
    if not (out / "results.jsonl").exists():
        (out / "results.jsonl").touch()  # interrupted before any cell finished: an empty report
    if args.no_report:
        from ..report.tables import csv_table

        partial = partial_markdown(records, meta)
        (out / "results.md").write_text((f"{partial}\n" if partial else "") +
                                        f"# Per category\n\n{markdown_table(records)}\n\n# Mean over categories\n\n"
                                        f"{markdown_table(mean_rows(records))}\n\n{blind_markdown(records)}")
        (out / "results.csv").write_text(csv_table(records))
        (out / "results_mean.csv").write_text(csv_table(mean_rows(records)))
        report = None
    else:
        from ..report.html import build_report

        report = build_report(out)
    print("\nPer category\n")
    print(markdown_table(records))
    print("\nMean over categories\n")
    print(markdown_table(mean_rows(records)))
    if setting != "one-class":
        print()
        print(blind_markdown(records))
    if missing:
        print(f"\nnot implemented yet (not run): {', '.join(missing)}")
    if tracker:
        tracker.finish(records, [p for p in (report, out / "results.jsonl", out / "results.md",
                                             out / "speed_accuracy.png") if p])
        print(f"MLflow: {tracker.uri}")
    print(f"\nwall time {time.perf_counter() - t0:.0f} s; results in {out}/ (results.jsonl, results.md, results.csv"
          f"{', report.html' if report else ''})")
    if stopped is not None:
        print(f"interrupted by {stopped.name}: {meta['cells_finished']} of {len(cells)} planned cells finished; "
              f"continue with: {command_line(args)} --resume", flush=True)
        return stopped.exit_code
    return 1 if any(r.get("error") for r in records) else 0


#: Above this estimated time the bench warns before it starts.
LONG_RUN_S = 3600.0


def print_plan(cells, estimates: dict[str, float | None], done: set[str], jobs: int = 1) -> float:
    """Print the planned cells (per method: its categories and its estimated time) and the
    estimated total, with a warning when it is over :data:`LONG_RUN_S`; return the total (seconds,
    of the cells still to run, divided among ``jobs``)."""
    from ..models.cost import REFERENCE_CPU, human_seconds

    todo = [c for c in cells if c.key not in done]
    by_model: dict[str, list] = {}
    for c in todo:
        by_model.setdefault(c.model, []).append(c)
    unknown = sorted({c.model for c in todo if estimates.get(c.key) is None})
    total = sum(estimates.get(c.key) or 0.0 for c in todo) / max(1, min(jobs, len(todo) or 1))
    head = f"planned: {len(todo)} cell(s)" + (f" ({len(cells) - len(todo)} already done)" if done else "")
    print(f"{head}, estimated {human_seconds(total)} on the reference CPU ({REFERENCE_CPU})"
          + (f" with {jobs} jobs" if jobs > 1 else "") + (f"; no estimate for {', '.join(unknown)}" if unknown else ""))
    for model, cs in by_model.items():
        where = sorted({c.category for c in cs if c.category}) + sorted(
            {"+".join(c.categories) + " (one model)" for c in cs if not c.category})
        est = sum(estimates.get(c.key) or 0.0 for c in cs)
        print(f"  {model:<20} {len(cs)} cell(s): {', '.join(where)}; ~{human_seconds(est) if est else '?'}")
    if total > LONG_RUN_S:
        print(f"warning: the estimate is over an hour ({human_seconds(total)}). Shorter runs: the quick "
              "benchmark (no --models/--preset), fewer --categories, or shorter training "
              "(--param MODEL.epochs=N); 'defectscope models' shows each method's cost.", flush=True)
    return total


def _done_keys(out: Path) -> set[str]:
    from ..engine.record import read_results

    return {r.get("cell_key") for r in read_results(out) if r.get("cell_key")}


def _write_meta(out: Path, meta: dict) -> None:
    """``OUT/bench.json``, replaced whole (a reader never sees half of it)."""
    tmp = out / ".bench.json.tmp"
    tmp.write_text(json.dumps(meta, indent=2))
    tmp.replace(out / "bench.json")


def _finished_records(out: Path, cells) -> list[dict]:
    """The records in ``OUT/results.jsonl`` of the cells of this run, in cell order (the last
    attempt of each cell)."""
    from ..engine.record import read_results

    by_key: dict[str, list] = {}
    for r in read_results(out):
        key = r.get("cell_key")
        if key:
            by_key.setdefault(key, []).append(r)
    return [r for c in cells for r in by_key.get(c.key, [])]
