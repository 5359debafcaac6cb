"""Dinomaly side by side with anomalib 2.7.0: speed at the same ViT with random weights.

DINOv2 weights cannot be downloaded on these machines, so (as for Reverse Distillation at ResNet18)
both implementations are timed at the same architecture with random weights; speed does not
depend on the weights' values. Both load the very same random file: a random initialisation of
timm's ``vit_base_patch14_reg4_dinov2`` (or ``vit_small_...`` with ``--encoder small``) written by
the reference venv's timm as ``model.safetensors`` into a private Hugging Face hub cache
(``<out dir>/dinomaly-hf-cache/models--timm--vit_base_patch14_reg4_dinov2.lvd142m/snapshots/random/``,
``refs/main`` = ``random``). anomalib's Dinomaly loads its encoder through
``timm.create_model(..., pretrained=True)``, which reads that file when the anomalib process runs with
``HF_HUB_OFFLINE=1`` and ``HF_HUB_CACHE`` pointing there: nothing of anomalib's code is patched.
defectscope reads the same file with ``weights=PATH`` (timm naming, through its own loader).

Measured per side, each in a fresh process (A/B interleaved with ``--repeats``), same threads,
same image size (392 = the official crop; both networks are fed the crop, so defectscope runs
with ``image_size=392 crop_size=none``):

* batch-1 latency: the median of ``--n-latency`` calls after 2 warm-up calls (defectscope:
  ``model.predict``, the whole method: normalisation, encoder, decoder, map, blur, score;
  anomalib: ``DinomalyModel.eval()(x)`` under ``no_grad``: encoder, decoder, map, resize to 256,
  blur, score; its pre-processing (resize, crop, normalisation) is outside the timed call);
* one training step at ``--batch`` (default 16, the official): forward, the hard-mining loss,
  backward, gradient clipping to 0.1 and the StableAdamW step (each side's own optimiser and loss;
  anomalib's as its Lightning module configures them), the median of ``--steps`` steps after 1
  warm-up step;
* peak RSS of the process and the trainable parameter count (anomalib's bottleneck and decoder
  MLPs have no biases, the authors' do: 61,390,848 against 61,425,408 at ViT-B).

    bash benchmarks/setup_reference.sh                 # once: the reference venv
    python benchmarks/dinomaly_speed.py                # ViT-B/14 reg, 392 px, 2 threads, batch 16
    python benchmarks/dinomaly_speed.py --encoder small --n-latency 5 --steps 2 --repeats 2
    python benchmarks/dinomaly_speed.py --interleaved --encoder small --batch 4 --steps 1 --threads 1

``--interleaved`` runs both implementations in one process of the reference venv (defectscope's
``src`` on ``PYTHONPATH``; both venvs have torch 2.13.0+cpu) and alternates their calls on the same
input, swapping the order every pair, and reports the median of the per-pair ratios: on a machine
whose load drifts, that is the figure to read (it gives no RSS). On a heavily loaded 2-core machine
use ``--threads 1``: with 2 threads, OpenMP's barrier waits made calls up to 14x slower here.

A ViT-B step at batch 16 is about 6 TFLOP: a minute or more on 2 CPU cores; the default run takes
about 10 minutes. The result (``--out``, default ``defectscope-bench/compare/dinomaly_speed.md``,
and a JSON beside it) records the 1-min load average at the start of each run: on a shared
machine the absolute figures are "loaded"; read the ratios of a paired run.

**Real weights** (not needed here): put ``model.safetensors`` of
``facebook/dinov2-with-registers-base`` (or timm's ``vit_base_patch14_reg4_dinov2.lvd142m``, or
Meta's ``dinov2_vitb14_reg4_pretrain.pth``) in the Hugging Face hub cache
(``~/.cache/huggingface/hub/models--facebook--dinov2-with-registers-base/snapshots/main/``), in
``~/.cache/torch/hub/checkpoints/`` for Meta's file, or pass ``--param weights=PATH`` to
``defectscope fit dinomaly``; see ``defectscope backbones`` and the module docstring of
``defectscope.models.foundation.dinomaly``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _harness import DEFAULT_OUT_DIR, REPO, SRC, _env, hardware, reference_python  # noqa: E402

TIMM_NAMES = {"base": "vit_base_patch14_reg4_dinov2", "small": "vit_small_patch14_reg4_dinov2"}
OURS_NAMES = {"base": "dinov2_vitb14_reg", "small": "dinov2_vits14_reg"}

_MAKE_WEIGHTS = """
import sys, torch, timm
from safetensors.torch import save_file
torch.manual_seed(0)
m = timm.create_model(sys.argv[1], pretrained=False)
save_file({k: v.contiguous() for k, v in m.state_dict().items()}, sys.argv[2])
"""

_HEAD = """
import json, resource, statistics, sys, time
import torch
threads, size, n_latency, batch, steps = (int(a) for a in sys.argv[1:6])
weights = sys.argv[6]
torch.set_num_threads(threads)
torch.manual_seed(0)
"""

_OURS = _HEAD + """
from defectscope.models import create_model
m = create_model("dinomaly", encoder=sys.argv[7], weights=weights, image_size=size, crop_size=None, batch_size=batch)
m._build()
m.fitted = True
m.eval()
def infer(x):
    return m.predict(x)
opt = m.make_optimizer()
def train(xb, it):
    return m.train_step(xb, it, opt)
n_trainable = sum(p.numel() for p in m.trainable_parameters())
"""

# anomalib's side, defining infer / train / n_trainable; its encoder name is in sys.argv[REF_ARG]
_REF_SIDE = """
from anomalib.models.image.dinomaly.lightning_model import Dinomaly, TRAINING_CONFIG
from anomalib.models.image.dinomaly.components import StableAdamW
lm = Dinomaly(encoder_name=sys.argv[REF_ARG])
m = lm.model
opt = StableAdamW(lm.trainable_modules.parameters(), **TRAINING_CONFIG["optimizer"])
m.eval()
def infer(x):
    with torch.no_grad():
        return m(x)
def train(xb, it):
    m.train()
    loss = m(xb, global_step=it)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(lm.trainable_modules.parameters(), max_norm=0.1)
    opt.step()
    m.eval()
    return loss.item()
n_trainable = sum(p.numel() for p in lm.trainable_modules.parameters())
"""

_REF = _HEAD + _REF_SIDE.replace("REF_ARG", "7")

_TAIL = """
x = torch.rand(1, 3, size, size)
for _ in range(2):
    infer(x)
times = []
for _ in range(n_latency):
    t0 = time.perf_counter(); infer(x); times.append(time.perf_counter() - t0)
xb = torch.rand(batch, 3, size, size)
step_times = []
for it in range(1 + steps):
    t0 = time.perf_counter(); loss = train(xb, it); dt = time.perf_counter() - t0
    if it:
        step_times.append(dt)
print(json.dumps({"latency_ms": statistics.median(times) * 1000, "latencies_ms": [t * 1000 for t in times],
                  "step_s": statistics.median(step_times), "step_times_s": step_times, "loss": loss,
                  "trainable_parameters": n_trainable,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


# --interleaved: both implementations in one process of the reference venv (defectscope's src on
# PYTHONPATH; both venvs have torch 2.13.0+cpu), calls alternated ours / anomalib on the same input,
# so that a loaded machine's drift hits both alike; per-pair ratios.
_INTERLEAVED = _HEAD + """
import os
from defectscope.models import create_model
ours = create_model("dinomaly", encoder=sys.argv[7], weights=weights, image_size=size, crop_size=None, batch_size=batch)
ours._build()
ours.fitted = True
ours.eval()
ours_opt = ours.make_optimizer()
""" + _REF_SIDE.replace("REF_ARG", "8") + """
ref_infer, ref_train = infer, train
sides = {"defectscope": (ours.predict, lambda xb, it: ours.train_step(xb, it, ours_opt)),
         "anomalib": (ref_infer, ref_train)}
x = torch.rand(1, 3, size, size)
for infer, _ in sides.values():
    infer(x); infer(x)
lat = {k: [] for k in sides}
for i in range(n_latency):
    for k in (list(sides) if i % 2 == 0 else list(sides)[::-1]):
        t0 = time.perf_counter(); sides[k][0](x); lat[k].append(time.perf_counter() - t0)
xb = torch.rand(batch, 3, size, size)
step = {k: [] for k in sides}
for it in range(1 + steps):
    for k in (list(sides) if it % 2 == 0 else list(sides)[::-1]):
        t0 = time.perf_counter(); sides[k][1](xb, it); dt = time.perf_counter() - t0
        if it:
            step[k].append(dt)
ratios = {"latency": [a / b for a, b in zip(lat["defectscope"], lat["anomalib"])],
          "step": [a / b for a, b in zip(step["defectscope"], step["anomalib"])]}
print(json.dumps({"latency_s": lat, "step_s": step, "ratios": ratios, "load_end": os.getloadavg()[0]}))
"""


def interleaved(args, cache: Path, file: Path) -> str:
    """Both sides in one process, calls alternated; returns a Markdown section."""
    env = _env(args.threads)
    env.update(HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(cache))
    env["PYTHONPATH"] = str(SRC) + os.pathsep + env.get("PYTHONPATH", "")
    argv = [str(reference_python()), "-c", _INTERLEAVED, str(args.threads), str(args.image_size), str(args.n_latency),
            str(args.batch), str(args.steps), str(file), OURS_NAMES[args.encoder], TIMM_NAMES[args.encoder]]
    load = os.getloadavg()[0]
    proc = subprocess.run(argv, env=env, cwd=REPO, capture_output=True, text=True, timeout=7200)
    if proc.returncode:
        return f"interleaved run failed: {proc.stderr.strip().splitlines()[-1][:300] if proc.stderr.strip() else proc.returncode}\n"
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    (args.out.parent / (args.out.stem + "_interleaved.json")).write_text(json.dumps(r, indent=1))
    med = statistics.median
    lines = [f"Interleaved in one process (reference venv + defectscope's src; calls alternated, order swapped "
             f"every pair; load average {load:.2f} at the start, {r['load_end']:.2f} at the end):", "",
             "| metric | defectscope | anomalib | median of per-pair ratios (ours / anomalib) |", "|---|---:|---:|---:|"]
    for key, label, scale, fmt in (("latency", "latency, batch 1 (ms)", 1000, "{:.0f}"),
                                   ("step", f"training step, batch {args.batch} (s)", 1, "{:.1f}")):
        data = r["latency_s" if key == "latency" else "step_s"]
        a, b, q = med(data["defectscope"]) * scale, med(data["anomalib"]) * scale, med(r["ratios"][key])
        lines.append(f"| {label} | {fmt.format(a)} | {fmt.format(b)} | {q:.2f}"
                     + (f" ({1 / q:.2f}x faster)" if q < 1 else "") + " |")
    return "\n".join(lines) + "\n"


def _log(msg: str) -> None:
    print(f"[dinomaly_speed {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def random_weights(encoder: str, out_dir: Path) -> tuple[Path, Path]:
    """The random timm checkpoint in a private hub cache (made once by the reference venv's timm);
    returns (hub cache dir, file)."""
    cache = out_dir / "dinomaly-hf-cache"
    repo = cache / f"models--timm--{TIMM_NAMES[encoder]}.lvd142m"
    file = repo / "snapshots" / "random" / "model.safetensors"
    if not file.is_file():
        file.parent.mkdir(parents=True, exist_ok=True)
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / "main").write_text("random")
        _log(f"writing a random {TIMM_NAMES[encoder]} to {file}")
        subprocess.run([str(reference_python()), "-c", _MAKE_WEIGHTS, TIMM_NAMES[encoder], str(file)], check=True,
                       env={**os.environ, "HF_HUB_OFFLINE": "1"})
    return cache, file


def run_side(side: str, args, cache: Path, file: Path) -> dict:
    env = _env(args.threads)
    if side == "defectscope":
        env["PYTHONPATH"] = str(SRC) + os.pathsep + env.get("PYTHONPATH", "")
        python, code, name = sys.executable, _OURS + _TAIL, OURS_NAMES[args.encoder]
    else:
        env.update(HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(cache))
        python, code, name = str(reference_python()), _REF + _TAIL, TIMM_NAMES[args.encoder]
    argv = [python, "-c", code, str(args.threads), str(args.image_size), str(args.n_latency), str(args.batch),
            str(args.steps), str(file), name]
    load = os.getloadavg()[0]
    t0 = time.time()
    proc = subprocess.run(argv, env=env, cwd=REPO, capture_output=True, text=True, timeout=7200)
    wall = time.time() - t0
    if proc.returncode:
        tail = proc.stderr.strip().splitlines()
        return {"error": tail[-1][:300] if tail else f"exit {proc.returncode}", "load": load, "wall_s": wall}
    return {**json.loads(proc.stdout.strip().splitlines()[-1]), "load": load, "wall_s": wall}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--encoder", choices=("base", "small"), default="base", help="ViT-B/14 or ViT-S/14 with registers")
    p.add_argument("--image-size", type=int, default=392, help="side fed to both networks (default 392, the crop)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch", type=int, default=16, help="training batch (official 16)")
    p.add_argument("--n-latency", type=int, default=10, help="batch-1 calls timed (median)")
    p.add_argument("--steps", type=int, default=2, help="training steps timed after 1 warm-up step (median)")
    p.add_argument("--repeats", type=int, default=1, help="fresh processes per side, A/B interleaved")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT_DIR / "dinomaly_speed.md")
    p.add_argument("--interleaved", action="store_true", help="instead: both sides in one process of the "
                   "reference venv, calls alternated (robust to a loaded machine's drift; no RSS figures)")
    args = p.parse_args(argv)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    cache, file = random_weights(args.encoder, args.out.parent)
    if args.interleaved:
        arch = {"base": "ViT-B/14 + 4 registers", "small": "ViT-S/14 + 4 registers"}[args.encoder]
        text = (f"# Dinomaly speed, interleaved: defectscope vs anomalib 2.7.0 ({arch}, random weights)\n\n"
                f"{args.image_size}x{args.image_size} input, {args.threads} thread(s), {args.n_latency} batch-1 calls "
                f"and {args.steps} training step(s) at batch {args.batch} per side (after warm-up). "
                f"Hardware: {json.dumps(hardware())}\n\n" + interleaved(args, cache, file)
                + f"\n- command: python benchmarks/dinomaly_speed.py {' '.join(sys.argv[1:] if argv is None else argv)}\n")
        args.out.write_text(text)
        print(text)
        return 0
    runs: dict[str, list[dict]] = {"defectscope": [], "anomalib": []}
    for r in range(args.repeats):
        for side in ("defectscope", "anomalib"):
            _log(f"run {r + 1}/{args.repeats}: {side}")
            runs[side].append(run_side(side, args, cache, file))
            _log(json.dumps({k: v for k, v in runs[side][-1].items() if not k.endswith("s_ms") and k != "step_times_s"}))

    def med(side, key):
        vals = [x[key] for x in runs[side] if key in x]
        return statistics.median(vals) if vals else None

    arch = {"base": "ViT-B/14 + 4 registers", "small": "ViT-S/14 + 4 registers"}[args.encoder]
    lines = [f"# Dinomaly speed: defectscope vs anomalib 2.7.0 ({arch}, random weights)", "",
             f"{args.image_size}x{args.image_size} input, {args.threads} threads, batch-1 latency = median of "
             f"{args.n_latency} calls, training step at batch {args.batch} = median of {args.steps} steps after 1 "
             f"warm-up; {args.repeats} fresh process(es) per side. Hardware: {json.dumps(hardware())}", "",
             "| metric | defectscope | anomalib | ratio (ours / anomalib) |", "|---|---:|---:|---:|"]
    for key, label, fmt in (("latency_ms", "latency, batch 1 (ms)", "{:.0f}"),
                            ("step_s", f"training step, batch {args.batch} (s)", "{:.1f}"),
                            ("peak_rss_mb", "peak RSS (MB)", "{:.0f}"),
                            ("trainable_parameters", "trainable parameters", "{:,.0f}")):
        a, b = med("defectscope", key), med("anomalib", key)
        ratio = f"{a / b:.2f}" if a is not None and b else "n/a"
        if ratio != "n/a" and key in ("latency_ms", "step_s") and a < b:
            ratio += f" ({b / a:.2f}x faster)"
        lines.append(f"| {label} | {'n/a' if a is None else fmt.format(a)} | {'n/a' if b is None else fmt.format(b)} "
                     f"| {ratio} |")
    lines.append("")
    lines += [f"- {side} error: {x['error']}" for side, xs in runs.items() for x in xs if "error" in x]
    lines.append("- loaded machine: 1-min load average at the start of each run: " + "; ".join(
        f"{side} " + ", ".join(f"{x['load']:.2f}" for x in xs) for side, xs in runs.items()))
    lines.append(f"- command: python benchmarks/dinomaly_speed.py {' '.join(sys.argv[1:] if argv is None else argv)}")
    text = "\n".join(lines) + "\n"
    args.out.write_text(text)
    args.out.with_suffix(".json").write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                                         "runs": runs}, indent=1))
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
