"""``defectscope bench``: argument parsing and the printed/written tables of the benchmark."""

from __future__ import annotations

import math
import time
from pathlib import Path

from ..errors import DefectscopeError
from ..report.tables import csv_table, markdown_table
from .grid import cells_for, run_grid

# Scenario presets of the benchmark guide (shared/seeds/003, section 5).
PRESETS: dict[str, list[str]] = {
    "A": ["sae", "dae", "patchcore", "efficientad", "padim"],
    "B": ["sae", "dae", "patchcore", "efficientad", "padim", "stfpm", "fastflow", "reverse_distillation"],
    "C": ["efficientad", "patchcore"],
}

NUMERIC = ("image_auroc", "pixel_auroc", "aupro", "image_f1_max", "pixel_f1_max", "image_ap", "pixel_ap",
           "latency_ms", "throughput_ips", "fit_s", "peak_rss_mb", "model_mb")


def add_bench_arguments(p) -> None:
    p.add_argument("--preset", choices=sorted(PRESETS), help="scenario preset of the guide: A (5 models), B (8), C (2)")
    p.add_argument("--models", help="comma-separated methods (default: every available method)")
    p.add_argument("--data", default="synthetic", help="synthetic (default), mvtec:DIR, visa:DIR or folder:DIR")
    p.add_argument("--categories", help="comma-separated categories (default: all of the data set)")
    p.add_argument("--seeds", default="0", help="comma-separated seeds (default 0)")
    p.add_argument("--image-size", type=int, help="input side for every method (default: each method's own)")
    p.add_argument("--param", action="append", metavar="MODEL.NAME=VALUE",
                   help="hyper-parameter for one method, e.g. sae.epochs=10 (repeatable)")
    p.add_argument("--out", default="defectscope-bench", help="output directory (default ./defectscope-bench)")
    p.add_argument("--resume", action="store_true", help="skip the cells already in OUT/results.jsonl")
    p.add_argument("--threads", type=int, help="torch threads per cell (default: torch's)")


def resolve_models(preset: str | None, models: str | None) -> tuple[list[str], list[str]]:
    """(implemented models to run, requested models that do not exist yet)."""
    from ..models import MODELS, list_models

    list_models()
    if models:
        wanted = [m.strip().lower().replace("-", "_") for m in models.split(",") if m.strip()]
    elif preset:
        wanted = PRESETS[preset]
    else:
        wanted = sorted(MODELS)
    return [m for m in wanted if m in MODELS], [m for m in wanted if m not in MODELS]


def mean_rows(records: list[dict]) -> list[dict]:
    """One row per model: the mean of each numeric field over its successful cells."""
    out = []
    for model in dict.fromkeys(r["model"] for r in records):
        rows = [r for r in records if r["model"] == model and not r.get("error")]
        row: dict = {"model": model, "category": "mean" if rows else "-"}
        for key in NUMERIC:
            vals = [r[key] for r in rows if isinstance(r.get(key), (int, float)) and not math.isnan(r[key])]
            row[key] = sum(vals) / len(vals) if vals else None
        errors = [r["error"] for r in records if r["model"] == model and r.get("error")]
        row["error"] = errors[0] if errors else None
        out.append(row)
    return out


def bench_main(args) -> int:
    from ..data import list_categories
    from ..cli import _parse_params, _split

    run, missing = resolve_models(args.preset, args.models)
    for name in missing:
        print(f"not implemented yet: {name} (listed, not run)")
    if not run:
        raise DefectscopeError("no implemented model to run; see 'defectscope models'")
    categories = _split(args.categories) or list_categories(args.data)
    seeds = [int(s) for s in _split(args.seeds)] or [0]
    params: dict[str, dict] = {m: {} for m in run}
    for key, value in _parse_params(args.param).items():
        model, _, name = key.partition(".")
        if model not in params or not name:
            raise DefectscopeError(f"--param {key}: expected MODEL.NAME=VALUE with MODEL one of {', '.join(run)}")
        params[model][name] = value
    if args.image_size:
        for m in run:
            params[m].setdefault("image_size", args.image_size)
    cells = cells_for(run, args.data, categories, seeds, params)
    out = Path(args.out)
    print(f"{len(cells)} cell(s): {', '.join(run)} x {len(categories)} categor{'y' if len(categories) == 1 else 'ies'} "
          f"x {len(seeds)} seed(s) -> {out / 'results.jsonl'}")
    t0 = time.perf_counter()

    def show(rec):
        status = f"error: {rec['error']}" if rec.get("error") else (
            f"image AUROC {rec.get('image_auroc', float('nan')):.3f}")
        print(f"  {rec['model']:<12} {str(rec.get('category')):<12} {status}", flush=True)

    records = run_grid(cells, out, resume=args.resume, threads=args.threads, on_result=show)
    table = markdown_table(records)
    means = markdown_table(mean_rows(records))
    (out / "results.md").write_text(f"# Per category\n\n{table}\n\n# Mean over categories\n\n{means}\n")
    (out / "results.csv").write_text(csv_table(records))
    (out / "results_mean.csv").write_text(csv_table(mean_rows(records)))
    print()
    print(table)
    print()
    print(means)
    print(f"\nwall time {time.perf_counter() - t0:.0f} s; results in {out}/ (results.jsonl, results.md, results.csv)")
    return 1 if any(r.get("error") for r in records) else 0
