"""What bounds a method's batch-1 latency: its arithmetic, against this machine's measured peak.

For each method: build it at its defaults (the training length cut to one pass or one step, random
weights where the real ones cannot be had offline: Dinomaly's DINOv2, WinCLIP's CLIP; the same
architecture, so the same arithmetic), fit it on a few synthetic images, then

* count the floating-point operations of one ``predict`` at batch 1 with
  ``torch.utils.flop_counter.FlopCounterMode`` (matrix products and convolutions; element-wise work
  is not counted, so the floor is a lower bound),
* time ``predict`` at batch 1 (median of ``--n`` calls after two warm-up calls),
* divide the operations by the peak of a float32 2048x2048 matrix product measured at the same
  thread count: the *arithmetic floor*, the latency no implementation of the same network at fp32
  can beat on this machine.

When the measured latency is within a small factor of the floor, a 1.5x speed-up over another
implementation of the same network is out of reach without changing the arithmetic (precision,
architecture); when it is far above, the time goes elsewhere (memory traffic, small kernels,
Python) and there is room. Run it on a quiet machine (the benchmark alone):

    python benchmarks/flop_floor.py --models fastflow,cflow,uflow,csflow,uninet,winclip,cfa,supersimplenet
    python benchmarks/flop_floor.py --models draem,ganomaly --image-size 64 --out flop-floor.md
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))
sys.path.insert(0, str(HERE))


def short_params(cls, image_size: int | None) -> dict:
    """The defaults with the training length cut to one pass / one step, and random weights for
    the methods whose weights are not on this machine (same architecture)."""
    params = {"image_size": image_size or cls.defaults["image_size"]}
    cost = getattr(cls, "cost", None)
    if cost is not None and cost.passes:
        params[cost.passes] = 1
    for name, _ in (cost.steps if cost is not None else ()):
        params[name] = 1
    if "pretrained" in cls.param_specs:
        model = cls(**params)
        ok, _ = model.weights_available()
        if not ok:
            params["pretrained"] = False
    return params


def measure(name: str, image_size: int | None, n_train: int, n: int) -> dict:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from defectscope.data import load_dataset
    from defectscope.engine.evaluate import measure_speed
    from defectscope.models import get_model_class

    cls = get_model_class(name)
    params = short_params(cls, image_size)
    channels, image_size = cls.defaults["channels"], params["image_size"]
    train = load_dataset("synthetic", "washer", "train", image_size=image_size, channels=channels)
    test = load_dataset("synthetic", "washer", "test", image_size=image_size, channels=channels)
    model = cls(**params)
    model.fit(train.subset(range(min(n_train, len(train)))))
    image = test[0]["image"]
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        model.predict(image.unsqueeze(0))
    speed = measure_speed(model, image, n_latency=n, warmup=2, throughput=False)
    return {"model": name, "params": params, "gflop": fc.get_total_flops() / 1e9, "latency_ms": speed["latency_ms"]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", required=True, help="comma-separated methods")
    ap.add_argument("--image-size", type=int, help="input side (default: each method's own)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--n-train", type=int, default=8, help="training images of the (short) fit")
    ap.add_argument("--n", type=int, default=10, help="timed batch-1 calls (median)")
    ap.add_argument("--out", help="also write the table (markdown) here")
    args = ap.parse_args(argv)

    os.environ.setdefault("DEFECTSCOPE_PROGRESS", "off")
    import torch

    torch.set_num_threads(args.threads)
    from runtime import measured_peak_gflops

    peak = measured_peak_gflops(args.threads)
    rows = [f"Peak: {peak:.1f} GFLOP/s (float32 2048x2048 matrix product, {args.threads} threads); "
            "batch 1.", "",
            "| method | px | GFLOP per image | floor ms (GFLOP / peak) | measured ms | measured / floor |",
            "|---|---:|---:|---:|---:|---:|"]
    for name in [m.strip() for m in args.models.split(",") if m.strip()]:
        try:
            r = measure(name, args.image_size, args.n_train, args.n)
        except Exception as exc:  # one method's failure must not lose the others' rows
            rows.append(f"| {name} | | error: {type(exc).__name__}: {str(exc)[:120]} | | | |")
            print(rows[-1], flush=True)
            continue
        floor = r["gflop"] / peak * 1000
        note = " (random weights)" if r["params"].get("pretrained") is False else ""
        rows.append(f"| {name}{note} | {r['params']['image_size']} | {r['gflop']:.2f} | {floor:.1f} | {r['latency_ms']:.1f} | "
                    f"{r['latency_ms'] / floor:.2f} |")
        print(rows[-1], flush=True)
    text = "\n".join(rows) + "\n"
    print()
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
