"""Tiled vs plain resize on the high-resolution synthetic set: image and pixel AUROC.

The set: the built-in synthetic categories rendered at 1024 px with defects of an absolute size,
at most 16 px across (``make_synthetic(image_size=1024, defect_px=16)``; see
``defectscope.data.synthetic``), generated once into the cache. A plain resize to 256 px shrinks a
defect to 2-4 px, about one cell of a stride-8 feature grid.

For each method and category, two fits on the same training images:

* ``plain``: ``image_size=256`` (the whole image resized to 256 px, the default way);
* ``tiled``: ``image_size=256, tile_from=1024`` (the image kept at 1024 px and cut into 16 tiles of
  256 px, no overlap; ``--stride`` for overlapping tiles, ``--merge`` how they merge).

Both are scored at full resolution: image AUROC of the image scores, pixel AUROC of the maps at
1024 px against the 1024 px masks (the plain maps are upsampled bilinearly, as a user would show
them). Fit and predict seconds are reported too (wall time, on this machine's threads).

    python benchmarks/tiling.py                             # patchcore, padim; washer, fabric (42 min, loaded)
    python benchmarks/tiling.py --methods padim --categories fabric --n-train 5
    python benchmarks/tiling.py --param patchcore.coreset_ratio=0.05 --out defectscope-bench/tiling.md
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))


def _parse_params(items: list[str]) -> dict[str, dict]:
    out: dict[str, dict] = {}
    for item in items:
        key, sep, value = item.partition("=")
        method, dot, name = key.partition(".")
        if not sep or not dot:
            raise SystemExit(f"--param {item}: expected METHOD.NAME=VALUE")
        out.setdefault(method, {})[name] = value
    return out


def run_one(method: str, params: dict, root: Path, category: str, full: int, batch_size: int) -> dict:
    """Fit ``method`` with ``params`` on the training images of ``category`` and score its test
    images at ``full`` px; returns the figures of one row."""
    import numpy as np
    import torch

    from defectscope.data import load_dataset
    from defectscope.engine.evaluate import predict_dataset
    from defectscope.metrics import image_auroc, pixel_auroc
    from defectscope.models import create_model
    from defectscope.ops import upsample

    model = create_model(method, **params)
    spec = f"mvtec:{root}"
    train = load_dataset(spec, category, "train", image_size=model.input_size, channels=model.channels)
    t0 = time.perf_counter()
    model.fit(train)
    fit_s = time.perf_counter() - t0
    test = load_dataset(spec, category, "test", image_size=model.input_size, channels=model.channels)
    t0 = time.perf_counter()
    out = predict_dataset(model, test, batch_size=batch_size, desc=f"{method} predict")
    predict_s = time.perf_counter() - t0
    maps = torch.from_numpy(out["maps"])
    if maps.shape[-1] != full:  # the plain model's maps, shown at the image's size
        maps = torch.cat([upsample(m, full) for m in maps.split(8)])
    masks = out["masks"]
    if masks.shape[-1] != full:  # the masks at the image's size, not the plain model's
        whole = load_dataset(spec, category, "test", image_size=full, channels=1)
        masks = np.stack([whole[i]["mask"].numpy() for i in range(len(whole))]).astype(bool)
    return {"method": method, "category": category, "params": model.params,
            "mode": "tiled" if model.tiling else "plain", "n_train": len(train), "n_test": len(test),
            "n_test_anomalous": int(out["labels"].sum()),
            "image_auroc": image_auroc(out["scores"], out["labels"]),
            "pixel_auroc": pixel_auroc(maps.numpy(), masks), "fit_s": fit_s,
            "predict_s_per_image": predict_s / len(test)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--methods", default="patchcore,padim")
    ap.add_argument("--categories", default="washer,fabric")
    ap.add_argument("--size", type=int, default=1024, help="side of the generated images (default 1024)")
    ap.add_argument("--defect-px", type=float, default=16, help="largest defect extent in px (default 16)")
    ap.add_argument("--tile", type=int, default=256, help="the network's input side: plain resize and tile (256)")
    ap.add_argument("--stride", type=int, default=None, help="tile stride (default: the tile, no overlap)")
    ap.add_argument("--merge", default="mean", choices=("mean", "max"))
    ap.add_argument("--n-train", type=int, default=10, help="training images per category (default 10)")
    ap.add_argument("--n-test-good", type=int, default=10)
    ap.add_argument("--n-test-defect", type=int, default=5, help="test images per defect type (4 types)")
    ap.add_argument("--param", action="append", default=[], metavar="METHOD.NAME=VALUE",
                    help="extra hyper-parameter of one method, both modes (repeatable)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=4, help="test images per predict call (default 4)")
    ap.add_argument("--out", default=str(REPO / "defectscope-bench" / "tiling.md"))
    args = ap.parse_args(argv)

    os.environ.setdefault("TQDM_DISABLE", "1")
    import torch

    from defectscope.data.synthetic import synthetic_root

    torch.set_num_threads(args.threads)
    cats = [c for c in args.categories.split(",") if c]
    t0 = time.perf_counter()
    root = synthetic_root(categories=cats, image_size=args.size, channels=1, defect_px=args.defect_px,
                          n_train=args.n_train, n_test_good=args.n_test_good, n_test_defect=args.n_test_defect)
    print(f"data: {root} ({time.perf_counter() - t0:.0f} s, cached after the first run)", flush=True)
    extra = _parse_params(args.param)
    tiled = {"tile_from": args.size, "tile_merge": args.merge}
    if args.stride:
        tiled["tile_stride"] = args.stride
    rows = []
    for method in [m for m in args.methods.split(",") if m]:
        for cat in cats:
            for mode in ({}, tiled):
                params = {"image_size": args.tile, **extra.get(method, {}), **mode}
                row = run_one(method, params, root, cat, args.size, args.batch_size)
                rows.append(row)
                print(f"{method:10s} {cat:7s} {row['mode']:6s} image AUROC {row['image_auroc']:.4f}  "
                      f"pixel AUROC {row['pixel_auroc']:.4f}  fit {row['fit_s']:.0f} s  "
                      f"predict {row['predict_s_per_image']:.2f} s/img", flush=True)

    lines = [f"Tiled vs plain resize, synthetic {args.size} px images with defects of at most {args.defect_px:g} px; "
             f"{args.n_train} training images, {rows[0]['n_test']} test images ({rows[0]['n_test_anomalous']} "
             f"defective) per category; network input {args.tile} px; tiled = {args.size // args.tile}x"
             f"{args.size // args.tile} tiles" + (f", stride {args.stride}" if args.stride else ", no overlap")
             + f", merge {args.merge}; {args.threads} threads, {os.cpu_count()} cores.", "",
             "| method | category | image AUROC plain | image AUROC tiled | pixel AUROC plain | pixel AUROC tiled "
             "| fit s plain / tiled | predict s/img plain / tiled |",
             "|---|---|---|---|---|---|---|---|"]
    for i in range(0, len(rows), 2):
        p, t = rows[i], rows[i + 1]
        lines.append(f"| {p['method']} | {p['category']} | {p['image_auroc']:.3f} | {t['image_auroc']:.3f} | "
                     f"{p['pixel_auroc']:.3f} | {t['pixel_auroc']:.3f} | {p['fit_s']:.0f} / {t['fit_s']:.0f} | "
                     f"{p['predict_s_per_image']:.2f} / {t['predict_s_per_image']:.2f} |")
    text = "\n".join(lines) + "\n"
    print("\n" + text)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    out.with_suffix(".jsonl").write_text("".join(json.dumps(r, default=str) + "\n" for r in rows))
    print(f"wrote {out} and {out.with_suffix('.jsonl')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
