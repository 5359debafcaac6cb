"""What the offline teacher costs EfficientAD, and what folding the normalisations buys.

    python benchmarks/efficientad_teacher.py --out results/efficientad_teacher.json --teacher-image-size 128

1. Teacher choice. The paper distils its PDN teacher from WideResNet-101 on ImageNet; offline,
   defectscope distils from EfficientNet-Lite0 on generic procedural images (the default) or on
   the target category's own training images. For each synthetic category: distil both
   teachers with the same budget, train EfficientAD with each (same steps, seed, penalty images)
   and compare image / pixel AUROC on the test split.
2. Inference: batch-1 latency of the folded networks (``predict``) against the unfolded formula
   (``reference_maps`` + the same resize), A/B interleaved in one process, median of ``--n``.

The networks are shrunk (``--width``, ``--out-channels``) so the whole run fits a few minutes on
two CPU cores; the figures are about the *difference* between the teachers, not the paper's
absolute accuracy. Timings under load are inflated: read the ratio, not the milliseconds.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from _harness import import_defectscope


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--categories", default="washer,fabric")
    p.add_argument("--n-train", type=int, default=40)
    p.add_argument("--steps", type=int, default=600, help="EfficientAD training steps")
    p.add_argument("--lr", type=float, default=1e-3, help="EfficientAD Adam learning rate (the paper's 1e-4 "
                   "learns next to nothing in a few hundred steps: 0.54 image AUROC at 100 steps in the tests)")
    p.add_argument("--teacher-steps", type=int, default=150)
    p.add_argument("--teacher-batch", type=int, default=8)
    p.add_argument("--teacher-image-size", type=int, default=256,
                   help="PDN input side during distillation (its weights do not depend on it)")
    p.add_argument("--width", type=float, default=0.125)
    p.add_argument("--out-channels", type=int, default=128)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--n", type=int, default=30, help="latency repetitions")
    p.add_argument("--full-latency", action=argparse.BooleanOptionalAction, default=True,
                   help="also time the paper-size networks (width 1, 384 channels, untrained weights)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    import_defectscope("defectscope")  # from a checkout: puts its src/ on the path

    from defectscope.data import load_dataset
    from defectscope.data.synthetic import make_synthetic
    from defectscope.models.distillation.teacher import distill_teacher, save_teacher
    from defectscope.training import load_images
    from defectscope.metrics import image_auroc, pixel_auroc
    from defectscope.models import create_model

    work = Path(tempfile.mkdtemp(prefix="ead-teacher-"))
    cats = [c for c in args.categories.split(",") if c]
    root = make_synthetic(work / "synth", categories=cats, image_size=256, channels=3, n_train=args.n_train,
                          n_test_good=20, n_test_defect=10, seed=0, progress=False)
    spec = f"synthetic:{root}"
    small = dict(image_size=256, width=args.width, out_channels=args.out_channels)
    tkw = dict(size="S", steps=args.teacher_steps, batch_size=args.teacher_batch, image_size=args.teacher_image_size,
               out_channels=args.out_channels, width=args.width, seed=0)
    record = {"command": "benchmarks/efficientad_teacher.py " + " ".join(f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items()),
              "torch_threads": torch.get_num_threads(), "loadavg_start": os.getloadavg(), "results": []}

    def run(teacher_path, cat, label):
        train = load_dataset(spec, cat, "train", image_size=256, channels=3)
        test = load_dataset(spec, cat, "test", image_size=256, channels=3)
        model = create_model("efficientad", teacher=str(teacher_path), steps=args.steps, lr=args.lr, **small)
        t0 = time.perf_counter()
        model.fit(train)
        fit_s = time.perf_counter() - t0
        x = load_images(test)
        y = np.array([test[i]["label"] for i in range(len(test))])
        masks = torch.stack([test[i]["mask"] for i in range(len(test))]).numpy() > 0.5
        pred = torch.cat([model.predict(x[i:i + 8]).anomaly_map for i in range(0, len(x), 8)])
        score = pred.flatten(1).amax(1).numpy()
        row = {"category": cat, "teacher": label, "image_auroc": image_auroc(score, y),
               "pixel_auroc": pixel_auroc(pred.numpy(), masks), "fit_s": fit_s,
               "loss_first": model.info["loss_first"], "loss_last": model.info["loss_last"]}
        print(json.dumps(row), flush=True)
        return model, row

    t0 = time.perf_counter()
    generic, ginfo = distill_teacher("generic", **tkw)
    gpath = save_teacher(generic, work / "generic.safetensors", ginfo)
    record["teacher_generic"] = {"loss_first": ginfo["loss"][0], "loss_last": ginfo["loss"][-1],
                                 "steps": ginfo["steps"], "s": time.perf_counter() - t0}
    model = None
    for cat in cats:
        t0 = time.perf_counter()
        own_images = load_images(load_dataset(spec, cat, "train", image_size=2 * args.teacher_image_size, channels=3))
        own, oinfo = distill_teacher(own_images, **tkw)
        opath = save_teacher(own, work / f"{cat}.safetensors", oinfo)
        record[f"teacher_{cat}"] = {"loss_first": oinfo["loss"][0], "loss_last": oinfo["loss"][-1],
                                    "steps": oinfo["steps"], "s": time.perf_counter() - t0}
        model, row = run(gpath, cat, "generic")
        record["results"].append(row)
        _, row = run(opath, cat, "category")
        record["results"].append(row)

    # latency: folded (predict) vs unfolded (reference_maps + resize), A/B interleaved
    def latency(m):
        x = torch.rand(1, 3, 256, 256)
        fold = lambda: m.predict(x)  # noqa: E731
        unfold = lambda: m.to_image_map(m.reference_maps(x), (256, 256))  # noqa: E731
        for _ in range(3):
            fold(), unfold()
        a, b = [], []
        with torch.inference_mode():
            for _ in range(args.n):
                t = time.perf_counter(); fold(); a.append(time.perf_counter() - t)  # noqa: E702
                t = time.perf_counter(); unfold(); b.append(time.perf_counter() - t)  # noqa: E702
        return {"folded_ms": 1e3 * statistics.median(a), "unfolded_ms": 1e3 * statistics.median(b),
                "ratio_unfolded_over_folded": statistics.median(b) / statistics.median(a)}

    record["latency_small"] = latency(model)
    if args.full_latency:
        for size in ("S", "M"):
            full = create_model("efficientad", size=size, image_size=256)
            full._build()
            full.quantiles = torch.tensor([0.1, 1.0, 0.1, 1.0], dtype=torch.float64)
            full.fitted = True
            full.eval()
            record[f"latency_paper_{size}"] = latency(full)
            print(size, record[f"latency_paper_{size}"], flush=True)
    record["loadavg_end"] = os.getloadavg()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2, default=str))
    print(json.dumps(record, indent=2, default=str))


if __name__ == "__main__":
    main()
