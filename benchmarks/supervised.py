"""SuperSimpleNet unsupervised vs supervised: 0 / 5 / 10 labelled defects on the synthetic set.

For each category of the built-in synthetic set (``washer``, ``fabric``; 128 px grayscale PNGs, 200
normal training images, test = 40 good + 4 x 10 defective, read as RGB), SuperSimpleNet is fitted
on the normal training images alone (0 labelled defects: the unsupervised mode) and with 5 and 10
labelled defective images and their masks (the supervised mode, ``fit(..., anomalies=...)``, the
path of ``defectscope fit --train-anomalies DIR --train-masks DIR``), then evaluated on the SAME
test split for every row.

Where the labelled defects come from: new defective images rendered by the synthetic generator
(:func:`defectscope.data.synthetic.render_pair`) with the **train** split's seeds (the test images
use the test split's seeds), the four defect types in turn (scratch, stain, missing, discolor);
the 5 are the first 5 of the 10. They are written as PNG + mask files and read back through
:func:`defectscope.data.validation.image_folder_dataset`, exactly as the CLI reads them, and checked
byte for byte against every test image (none may be equal).

    python benchmarks/supervised.py                              # 10 epochs, 128 px, 2 threads
    python benchmarks/supervised.py --epochs 30 --size 256 --out defectscope-bench/supervised

Columns: image AUROC, pixel AUROC, AUPRO (FPR <= 0.3), fit seconds (features, training; not the
evaluation). A supervised epoch holds every normal image and as many labelled-defect draws
(the official balanced loader), so it costs about twice an unsupervised one.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))


def labelled_defects(category: str, n: int, size: int, folder: Path) -> tuple[Path, Path]:
    """``n`` defective images of the train split's seeds and their masks, written under ``folder``."""
    import numpy as np
    from PIL import Image

    from defectscope.data.synthetic import DEFECT_TYPES, render_pair

    images, masks = folder / f"{category}-{n}" / "images", folder / f"{category}-{n}" / "masks"
    images.mkdir(parents=True), masks.mkdir(parents=True)
    for i in range(n):
        kind = DEFECT_TYPES[i % len(DEFECT_TYPES)]
        _, img, mask = render_pair(category, kind, index=i // len(DEFECT_TYPES), split="train", image_size=size,
                                   channels=1)
        Image.fromarray(img).save(images / f"{kind}_{i:03d}.png")
        Image.fromarray(mask.astype(np.uint8) * 255).save(masks / f"{kind}_{i:03d}_mask.png")
    return images, masks


def check_disjoint(anomalies, test) -> None:
    """No labelled defect is a test image (path or bytes)."""
    digest = {hashlib.sha256(Path(p).read_bytes()).hexdigest() for p in test.paths}
    for p in anomalies.paths:
        if Path(p).resolve() in {Path(t).resolve() for t in test.paths} or \
                hashlib.sha256(Path(p).read_bytes()).hexdigest() in digest:
            raise SystemExit(f"{p} is a test image")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--categories", default="washer,fabric")
    ap.add_argument("--shots", default="0,5,10", help="numbers of labelled defects (0 = unsupervised)")
    ap.add_argument("--size", type=int, default=128, help="model input side (default 128)")
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--n-train", type=int, default=200, help="normal training images used (first N)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, help="folder for supervised.md and supervised.json")
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    from defectscope.data import load_dataset
    from defectscope.data.synthetic import synthetic_root
    from defectscope.data.validation import image_folder_dataset
    from defectscope.engine import evaluate
    from defectscope.models import create_model

    root = synthetic_root(progress=False)  # the default set of the 'synthetic' spec (128 px, seed 0)
    data = f"mvtec:{root}"
    params = {"image_size": args.size, "epochs": args.epochs, "batch_size": args.batch_size, "seed": args.seed}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for category in args.categories.split(","):
            train = load_dataset(data, category, "train", image_size=args.size, channels=3)
            train = train.subset(range(min(args.n_train, len(train))))
            test = load_dataset(data, category, "test", image_size=args.size, channels=3)
            for shots in (int(s) for s in args.shots.split(",")):
                anomalies = None
                if shots:
                    images, masks = labelled_defects(category, shots, 128, Path(tmp))
                    anomalies = image_folder_dataset(images, 1, masks=masks, image_size=args.size, channels=3)
                    check_disjoint(anomalies, test)
                model = create_model("supersimplenet", **params)
                t0 = time.perf_counter()
                model.fit(train, anomalies=anomalies)
                fit_s = time.perf_counter() - t0
                metrics, _ = evaluate(model, test)
                row = {"category": category, "labelled_defects": shots, "image_auroc": metrics["image_auroc"],
                       "pixel_auroc": metrics["pixel_auroc"], "aupro": metrics["aupro"], "fit_s": fit_s}
                rows.append(row)
                print(json.dumps(row), flush=True)
    head = (f"SuperSimpleNet on the synthetic set ({args.n_train} normal training images, {args.size} px RGB, "
            f"{args.epochs} epochs, batch {args.batch_size}, the paper's defaults otherwise; "
            f"{torch.get_num_threads()} threads; test split identical for every row; labelled defects rendered "
            "with the train split's seeds)")
    lines = [head, "", "| category | labelled defects | image AUROC | pixel AUROC | AUPRO | fit s |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        lines.append(f"| {r['category']} | {r['labelled_defects']} | {r['image_auroc']:.3f} | {r['pixel_auroc']:.3f} "
                     f"| {r['aupro']:.3f} | {r['fit_s']:.0f} |")
    table = "\n".join(lines)
    print(table)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "supervised.md").write_text(table + "\n")
        (args.out / "supervised.json").write_text(json.dumps({"args": vars(args) | {"out": str(args.out)},
                                                              "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
