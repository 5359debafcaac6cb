"""CS-Flow's log-determinant term: per image (the paper's NLL, the authors' code, defectscope) against
summed over the batch (anomalib 2.7.0), on defectscope's CS-Flow, accuracy only.

    python benchmarks/csflow_loss.py --data-dir DIR --epochs 20 --seeds 0,1,2 [--variants batch-sum]

anomalib's ``ParallelGlowCouplingLayer.forward`` returns ``torch.stack([jac0, jac1, jac2], 1).sum()``:
the log-determinants of *all images of the batch* summed into one number, which its ``CsFlowLoss``
then subtracts from every image's ``||z||^2 / 2``. Averaged over the batch that weighs the
log-determinant B times (16 at batch 16) more than the paper's per-image NLL (Rudolph et al., WACV
2022), which the authors' code and defectscope compute. This script trains defectscope's
CS-Flow with either term, everything else unchanged (the ``batch-sum`` variant swaps
``defectscope.models.flow.csflow.csflow_loss`` in its own process only), on the data of
``benchmarks/flows.py`` (``--data-dir``, a synthetic MVTec-layout root made by that script), with the
same settings as its CS-Flow case (batch 16, 3 channels), one fresh process per run. It answers
whether anomalib's higher AUROC at 20 epochs comes from that term. Timings are not reported: run
it beside other work if you like.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _harness import SRC, _env  # noqa: E402

_RUN = r"""
import json, sys
import torch
threads, variant, root, epochs, seed = int(sys.argv[1]), sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
torch.set_num_threads(threads)
import defectscope.models.flow.csflow as cs
from defectscope.engine import run_experiment
if variant == "batch-sum":
    def batch_sum_loss(zs, logdet):
        z = cs._flat(zs)
        return (0.5 * z.pow(2).sum(1).mean() - logdet.sum()) / z.shape[1]
    cs.csflow_loss = batch_sum_loss
rec = run_experiment("csflow", {"epochs": epochs, "batch_size": 16, "channels": 3}, data=f"mvtec:{root}",
                     category="washer", seed=seed, n_latency=1)
print(json.dumps({k: rec.get(k) for k in ("image_auroc", "pixel_auroc", "aupro")}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data-dir", required=True, help="the MVTec-layout root benchmarks/flows.py wrote")
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--variants", default="per-image,batch-sum")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    env = _env(args.threads)
    env["PYTHONPATH"] = str(SRC)
    rows = {}
    for variant in args.variants.split(","):
        for seed in (int(s) for s in args.seeds.split(",")):
            proc = subprocess.run([sys.executable, "-c", _RUN, str(args.threads), variant, args.data_dir,
                                   str(args.epochs), str(seed)], env=env, capture_output=True, text=True)
            if proc.returncode:
                sys.exit(f"csflow_loss: {variant} seed {seed} failed:\n{proc.stderr[-3000:]}")
            rec = json.loads(proc.stdout.strip().splitlines()[-1])
            rows.setdefault(variant, []).append((seed, rec))
            print(f"[csflow_loss] {variant} seed {seed}: {rec}", file=sys.stderr, flush=True)
    print(f"CS-Flow, {args.epochs} epochs, batch 16, data {args.data_dir}; % per seed, then the median\n")
    print("| log-determinant term | seeds | image AUROC | pixel AUROC | AUPRO | median image AUROC |")
    print("|---|---|---|---|---|---:|")
    for variant, runs in rows.items():
        cell = lambda key: ", ".join(f"{100 * r[key]:.1f}" for _, r in runs)  # noqa: E731
        med = statistics.median(100 * r["image_auroc"] for _, r in runs)
        print(f"| {variant} | {', '.join(str(s) for s, _ in runs)} | {cell('image_auroc')} | {cell('pixel_auroc')} "
              f"| {cell('aupro')} | {med:.1f} |")


if __name__ == "__main__":
    main()
