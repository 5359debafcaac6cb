"""Batch-1 latency of the Inferencer against the raw model, side by side in one process.

    PYTHONPATH=src python benchmarks/inferencer_overhead.py                 # padim, 256 px
    PYTHONPATH=src python benchmarks/inferencer_overhead.py --model patchcore --n 100

A model is fitted on the synthetic set's training images (the ``fabric`` category, RGB at
``--size``), calibrated on a 20 % validation split and saved; the Inferencer loads that directory.
Timed, interleaved call by call so that a drift of the machine hits all alike (median of ``--n``
calls after a warm-up, ``torch.set_num_threads(--threads)``):

* ``raw``: ``model.predict(x)`` on an already preprocessed tensor ``[1, 3, H, W]``;
* ``inferencer (tensor)``: ``Inferencer.predict`` on the same tensor ``[3, H, W]`` (input checks,
  lock, normalisation, verdict, mask, maps to numpy);
* ``inferencer (array)``: on a uint8 ``H x W x 3`` numpy array at the model's size (conversion too);
* ``inferencer (path)``: on a PNG file (decoding and resizing too, the file being larger).

Writes a JSON record (``--out``, default ``defectscope-bench/inferencer_overhead.json``) and prints
a table with the ratio of each to ``raw``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="padim")
    ap.add_argument("--size", type=int, default=256, help="model input side (default 256)")
    ap.add_argument("--n", type=int, default=60, help="timed calls per variant (default 60)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--n-train", type=int, default=40, help="training images (default 40)")
    ap.add_argument("--out", default="defectscope-bench/inferencer_overhead.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from defectscope import Inferencer, create_model
    from defectscope.data import load_dataset, make_synthetic
    from defectscope.deploy import calibrate
    from defectscope.data.validation import validation_split
    from defectscope.engine import hardware
    from defectscope.models.io import versions

    with tempfile.TemporaryDirectory() as tmp:
        root = make_synthetic(Path(tmp) / "synth", categories=["fabric"], image_size=args.size, channels=3,
                              n_train=args.n_train, n_test_good=2, n_test_defect=1, seed=0, progress=False)
        model = create_model(args.model, image_size=args.size)
        train, val = validation_split(load_dataset(f"mvtec:{root}", "fabric", "train", image_size=args.size))
        model.fit(train, val)
        model.calibration = calibrate(model, val)
        model.save(Path(tmp) / "model")
        inf = Inferencer(Path(tmp) / "model", device="cpu")
        raw = inf.model
        path = sorted((root / "fabric" / "test" / "good").glob("*.png"))[0]
        x = inf.load(path)[0]
        arr = (x.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        variants = {
            "raw model.predict": lambda: raw.predict(x[None]),
            "inferencer (tensor)": lambda: inf.predict(x),
            "inferencer (array)": lambda: inf.predict(arr),
            "inferencer (path)": lambda: inf.predict(path),
        }
        for f in variants.values():  # warm-up
            for _ in range(5):
                f()
        times: dict[str, list[float]] = {k: [] for k in variants}
        for _ in range(args.n):
            for k, f in variants.items():
                t0 = time.perf_counter()
                f()
                times[k].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) * 1000 for k, v in times.items()}
    base = med["raw model.predict"]
    record = {
        "model": args.model, "image_size": args.size, "threads": args.threads, "n": args.n,
        "median_ms": med, "ratio_to_raw": {k: v / base for k, v in med.items()},
        "hardware": hardware(), "versions": versions(),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2))
    print(f"{args.model} at {args.size} px, batch 1, {args.threads} threads, median of {args.n} interleaved calls")
    print(f"{'variant':<22}{'ms':>10}{'x raw':>8}")
    for k, v in med.items():
        print(f"{k:<22}{v:>10.2f}{v / base:>8.3f}")
    print(f"-> {out}")


if __name__ == "__main__":
    main()
