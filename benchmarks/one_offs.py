"""Two accuracy checks behind sentences of the README (accuracy only; no timing):

* ``cflow-blur``: CFLOW fitted as ``flows.py --models cflow --epochs 20`` does (fiber batch 256,
  constant lr 2e-4), scored with the library's sigma-4 map blur (the flows' default until
  2026-12-02) and without it (the paper's and anomalib's map, now the default).
* ``cfa-radius``: CFA fitted as ``adaptation.py --models cfa --epochs 3 --n-train 64`` does, with the
  radius learnt (the authors' code, defectscope) and held constant (anomalib).

    python benchmarks/one_offs.py cflow-blur --data-dir DIR   # DIR: a flows.py --data-dir (MVTec layout)
    python benchmarks/one_offs.py cfa-radius --data-dir DIR
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("check", choices=("cflow-blur", "cfa-radius"))
    ap.add_argument("--data-dir", required=True, help="MVTec-layout folder holding the category")
    ap.add_argument("--category", default="washer")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    from defectscope.data import load_dataset
    from defectscope.engine.evaluate import evaluate
    from defectscope.models import create_model, get_model_class

    def data(split):
        return load_dataset(f"mvtec:{args.data_dir}", args.category, split, image_size=256, channels=3)

    train, test = data("train"), data("test")
    keys = ("image_auroc", "pixel_auroc", "aupro")
    out = {}
    if args.check == "cflow-blur":
        model = create_model("cflow", image_size=256, epochs=20, fiber_batch=256, lr=2e-4,
                             lr_schedule="constant").fit(train)
        for sigma in (4.0, 0.0):
            model.params["blur_sigma"] = sigma
            metrics, _ = evaluate(model, test)
            out[f"blur_sigma={sigma:g}"] = {k: metrics[k] for k in keys}
    else:
        cfa = get_model_class("cfa")

        class ConstantRadius(cfa):
            def _fit(self, dataset, val_dataset=None):
                self.radius.requires_grad_(False)
                return super()._fit(dataset, val_dataset)

        for name, cls in (("learnt radius", cfa), ("constant radius", ConstantRadius)):
            model = cls(image_size=256, epochs=3).fit(train.subset(range(min(64, len(train)))))
            metrics, _ = evaluate(model, test)
            out[name] = {**{k: metrics[k] for k in keys}, "radius": float(model.radius.detach())}
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
