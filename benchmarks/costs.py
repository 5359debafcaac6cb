"""Calibrate the per-method cost models (``defectscope.models.cost``) from measured runs.

For each method: fits on the built-in synthetic set (category ``washer``, RGB 256 px PNGs) at the
method's defaults except its training length, which is measured at two short values and
extrapolated linearly (the cost model is linear in the length: see ``defectscope.models.cost``),
then times ``predict`` at batch 1. Prints, per method, the measured figures, the declared ones,
their ratio, and the ``Cost(...)`` literal to declare. Run it on a quiet machine (nothing else
running), on the reference CPU (2 cores):

    python benchmarks/costs.py                      # every method (~15 min on 2 cores)
    python benchmarks/costs.py --models padim,stfpm
    python benchmarks/costs.py --out defectscope-bench/costs.md

How each fit is measured (``n`` training images):
* no length parameter (memory methods, DFM): one fit on 200 images; ``fit = t / 200``.
* a ``passes`` parameter (epochs): fits at 1 and 3 passes on 32 images (EfficientAD-free methods);
  ``epoch = (t3 - t1) / (2 n)``, ``fit = t1 / n - epoch``.
* step parameters (EfficientAD's ``steps``, ``teacher_steps``): a base fit on 9 images (one held
  out) with every step count at ``n`` = 8, then one fit per parameter with it at 3 n; seconds per step = difference / 2 n. The
  fit-time teacher cache goes to a temporary folder, never to the user's. ``--step-n`` and
  ``--step-images`` change ``n`` and the image count (Dinomaly: ``--step-n 2 --step-images 17``, so
  each step holds a full batch of 16).
* methods whose weights cannot be had offline (Dinomaly, WinCLIP) need ``--random-weights``:
  random weights of the same architecture, so the same arithmetic.
Timings include image decoding and resizing, as a benchmark cell's do.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))


class Subset:
    """The first ``n`` items of a data set (what ``fit`` needs: ``len`` and indexing)."""

    def __init__(self, ds, n: int):
        self.ds, self.n = ds, min(n, len(ds))

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i):
        if not 0 <= i < self.n:
            raise IndexError(i)
        return self.ds[i]


def timed_fit(cls, train, params: dict, extra: dict | None = None):
    """Seconds of one fit of ``cls(**params, **extra)`` on ``train``, and the fitted model."""
    model = cls(**params, **(extra or {}))
    t0 = time.perf_counter()
    model.fit(train)
    return time.perf_counter() - t0, model


def measure(cls, data: str, category: str, extra: dict | None = None, step_n: int = 8,
            step_images: int = 9) -> dict:
    """The measured Cost figures of ``cls`` (see the module docstring); ``extra`` parameters are
    passed to every fit (``pretrained=False`` for the weights that cannot be had here)."""
    from defectscope.data import load_dataset
    from defectscope.engine.evaluate import measure_speed

    d = cls.defaults
    cost = cls.cost
    train_all = load_dataset(data, category, "train", image_size=d["image_size"], channels=d["channels"])
    test = load_dataset(data, category, "test", image_size=d["image_size"], channels=d["channels"])
    out = {"fit": 0.0, "epoch": 0.0, "steps": {}}
    if cost.steps:
        n = step_n  # steps; 9 images: EfficientAD holds 1 out, so each pass is 8 steps (no rounding up)
        train = Subset(train_all, max(n + 1, step_images))
        base = {name: n for name, _ in cost.steps}
        t_base, model = timed_fit(cls, train, base, extra)
        for name, _ in cost.steps:
            t, _ = timed_fit(cls, train, {**base, name: 3 * n}, extra)
            out["steps"][name] = max(0.0, (t - t_base) / (2 * n))
        out["fit"] = max(0.0, t_base - sum(s * n for s in out["steps"].values())) / n
    elif cost.passes:
        n = 32
        train = Subset(train_all, n)
        t1, model = timed_fit(cls, train, {cost.passes: 1}, extra)
        t3, _ = timed_fit(cls, train, {cost.passes: 3}, extra)
        out["epoch"] = max(0.0, (t3 - t1) / (2 * n))
        out["fit"] = max(0.0, t1 / n - out["epoch"])
    else:
        n = min(200, len(train_all))
        t, model = timed_fit(cls, Subset(train_all, n), {}, extra)
        out["fit"] = t / n
    out["n"] = n
    speed = measure_speed(model, test[0]["image"], n_latency=15, warmup=3, throughput=False)
    out["predict"] = speed["latency_ms"] / 1000
    return out


def literal(cls, m: dict, stamp: str) -> str:
    c = cls.cost
    parts = [f"predict={m['predict']:.3g}"]
    if m["fit"]:
        parts.append(f"fit={m['fit']:.3g}")
    if c.passes:
        parts += [f"epoch={m['epoch']:.3g}", f"passes={c.passes!r}"]
    if c.steps:
        parts.append("steps=(" + ", ".join(f"({k!r}, {v:.3g})" for k, v in m["steps"].items()) + ",)")
    parts.append(f"measured={stamp!r}")
    return f"Cost({', '.join(parts)})"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="*", help="model filter, as the bench's --models (default: every method)")
    ap.add_argument("--data", default="synthetic")
    ap.add_argument("--category", default="washer")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", help="also write the table (markdown) here")
    ap.add_argument("--random-weights", action="store_true",
                    help="time methods whose weights cannot be had offline (Dinomaly's DINOv2, WinCLIP's CLIP) "
                         "with random weights of the same architecture (pretrained=false): the same arithmetic")
    ap.add_argument("--step-n", type=int, default=8,
                    help="step methods: the base step count n (the fits run n and 3n steps; default 8)")
    ap.add_argument("--step-images", type=int, default=9,
                    help="step methods: training images of those fits (default 9; at least the method's batch "
                         "size, e.g. 17 for Dinomaly's batch of 16)")
    args = ap.parse_args(argv)

    os.environ.setdefault("DEFECTSCOPE_PROGRESS", "off")
    import torch

    torch.set_num_threads(args.threads)
    from defectscope.models import get_model_class
    from defectscope.models.catalog import select_models
    from defectscope.models.cost import estimate_fit, estimate_predict, human_seconds

    names, missing = select_models(args.models)
    if missing:
        print(f"unknown: {', '.join(missing)}", file=sys.stderr)
        return 2
    day = time.strftime("%Y-%m-%d")
    rows = ["| method | n | fit s/img at defaults (measured / declared) | predict (measured / declared) | "
            "fit of 200 images at defaults (measured / declared) |", "|---|---|---|---|---|"]
    literals = []
    with tempfile.TemporaryDirectory(prefix="defectscope-costs-") as cache:
        os.environ["DEFECTSCOPE_CACHE"] = cache  # fit-time teachers of short schedules stay out of the user's cache
        for name in names:
            cls = get_model_class(name)
            if getattr(cls, "cost", None) is None:
                print(f"{name}: declares no cost; skipped", file=sys.stderr)
                continue
            t0 = time.perf_counter()
            random = args.random_weights and "pretrained" in cls.param_specs
            m = measure(cls, args.data, args.category, {"pretrained": False} if random else None,
                        args.step_n, args.step_images)
            d = cls.defaults
            per = m["fit"] + m["epoch"] * (float(d[cls.cost.passes]) if cls.cost.passes else 0.0)
            total = per * 200 + sum(s * float(d[k]) for k, s in m["steps"].items())
            rows.append(f"| {name} | {m['n']} | {human_seconds(per)} / {human_seconds(cls.cost.fit_per_image(d))} | "
                        f"{human_seconds(m['predict'])} / {human_seconds(estimate_predict(cls, {}))} | "
                        f"{human_seconds(total)} / {human_seconds(estimate_fit(cls, {}, 200))} |")
            rw = ", random weights of the same architecture" if random else ""
            size = f"{cls.defaults['image_size']} px" + (" gray" if cls.defaults["channels"] == 1 else "")
            literals.append(f"{name}: cost = {literal(cls, m, f'benchmarks/costs.py, {args.data}:{args.category} {size}{rw}, {day}')}")
            print(rows[-1], f"({time.perf_counter() - t0:.0f} s)", flush=True)
    text = "\n".join(rows) + "\n\n" + "\n".join(literals) + "\n"
    print()
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
