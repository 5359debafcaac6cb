"""Latency and fit side by side on real-size image files: defectscope's runtimes against the
reference library's (anomalib 2.7.0) own best CPU path, and against defectscope's torch path.

    python benchmarks/runtime.py [--models patchcore,padim,dfm,dfkde,spade,stfpm,efficientad]
                                 [--file-size 900] [--n-train 64] [--threads 2] [--out DIR]

The data are defectscope's synthetic washer images written as ``--file-size`` px RGB PNG files
(as MVTec AD ships its images: 700-1024 px PNGs), in the MVTec layout; both sides read the very
same files. Every model runs at 256 px, batch 1, ``--threads`` threads, one process per side and
model (``OMP_NUM_THREADS`` too), on the same EfficientNet-Lite0 ImageNet weights.

Per test file, three columns on each side, medians over ``--repeats`` passes over the test files:

* **decode**: the PNG file to an array / tensor (ours :func:`defectscope.imageio.read_image`;
  the reference's ``anomalib.data.utils.read_image``, what its ``OpenVINOInferencer`` calls);
* **resize**: to 256 px (ours: the Inferencer's ``Preprocess``, antialiased bilinear in torch;
  the reference resizes inside its exported graph: estimated as its graph at the file size minus
  the same graph exported at 256 px);
* **model**: the runtime call on the resized image (ours: ``Inferencer.predict_tensor`` with
  ``--runtime torch|onnx|openvino|openvino-int8``; the reference: ``OpenVINOInferencer.predict``,
  which includes its resize, so its model column is ``model - resize``).

The reference's best CPU path is its OpenVINO export at FP32 and with its ``INT8_PTQ``
compression (NNCF, full INT8), both compiled with ``INFERENCE_PRECISION_HINT=f32`` as ours, so
the precision is equal. Verdicts: ours are compared runtime against torch (the same calibration,
from separate normal images never used for training nor testing: ``calib/``); the reference's
verdicts come from its own post-processor (threshold fitted on its validation set).

Arithmetic floor: the FLOPs of one 256 px image on our torch path
(``torch.utils.flop_counter``, convolutions and matrix products, multiply-add = 2 FLOPs), over the
peak this machine measured for a large float32 matrix product at ``--threads`` threads: no
runtime can do that arithmetic faster at fp32.

Fit (DFM, DFKDE, STFPM at ``--stfpm-epochs``; the others too, for information): ours
``model.fit`` on the training files including their decode and resize; the reference's
``engine.fit`` until the model is fitted (its validation passes excluded), which also decodes and
resizes the files. SPADE has no reference implementation (anomalib has none); EfficientAD is
timed at random weights on both sides (``--speed-only`` for the reference: it cannot fit
offline; ours after 1 training step from a random teacher file), latency only.

Writes ``runtime.md`` and ``runtime.json`` under ``--out`` (default ``defectscope-bench/runtime``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import textwrap
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
import _harness as H  # noqa: E402

ALL = ["patchcore", "padim", "dfm", "dfkde", "spade", "stfpm", "efficientad"]
NO_REFERENCE = {"spade": "anomalib has no SPADE"}
FIT_COMPARED = {"dfm", "dfkde", "stfpm"}
RUNTIMES = ["torch", "onnx", "openvino", "openvino-int8"]

# ------------------------------------------------------------------------------------------------
# our side: one subprocess per model (this interpreter, src/ on the path)

OURS = r'''
import json, os, statistics, sys, time
from pathlib import Path
import numpy as np
import torch
torch.set_num_threads(THREADS)
from defectscope.models import create_model
from defectscope.data import load_dataset
from defectscope.deploy.inferencer import Inferencer
from defectscope.deploy.threshold import calibrate
from defectscope.imageio import read_image

rec = {"library": "defectscope", "model": MODEL}
root, calib_root = Path(ROOT), Path(CALIB)
train = load_dataset(f"mvtec:{root}", "washer", "train", image_size=256, channels=3)
params = dict(PARAMS)
if MODEL == "efficientad":  # random teacher file, 1 step: latency only (the weights do not change it)
    from defectscope.models.distillation.teacher import save_teacher
    from defectscope.models.distillation._pdn import PDN
    teacher = PDN("S", out_channels=384)
    params["teacher"] = str(save_teacher(teacher, Path(OUT).with_suffix(".teacher.safetensors"), {"source": "random"}))
model = create_model(MODEL, image_size=256, channels=3, **params)
t0 = time.perf_counter()
model.fit(train if MODEL != "efficientad" else train.subset(range(8)))
rec["fit_s"] = time.perf_counter() - t0
calib = load_dataset(f"mvtec:{calib_root}", "washer", "train", image_size=256, channels=3)
model.calibration = calibrate(model, calib)
x1 = torch.stack([calib[0]["image"]])
from torch.utils.flop_counter import FlopCounterMode
with FlopCounterMode(display=False) as fc, torch.no_grad():
    model.predict(x1)
rec["gflop"] = fc.get_total_flops() / 1e9
files = sorted((f, int(d.name != "good")) for d in (root / "washer" / "test").iterdir() if d.is_dir()
               for f in d.iterdir() if f.suffix == ".png")
calib_images = torch.stack([calib[i]["image"] for i in range(len(calib))])
for runtime in RUNTIMES:
    try:
        inf = Inferencer(model, runtime=runtime, calibration_images=calib_images if runtime == "openvino-int8" else None)
    except Exception as exc:
        rec[runtime] = {"error": f"{type(exc).__name__}: {exc}"[:400]}
        continue
    for _ in range(3):
        inf.predict_tensor(inf.preprocess(read_image(files[0][0], 3))[None])
    dec, res, mod, scores, verdicts = [], [], [], [], []
    for rep in range(REPEATS):
        for f, _ in files:
            t0 = time.perf_counter()
            t = read_image(f, 3)
            t1 = time.perf_counter()
            x = inf.preprocess(t)[None]
            t2 = time.perf_counter()
            r = inf.predict_tensor(x)[0]
            t3 = time.perf_counter()
            dec.append(t1 - t0); res.append(t2 - t1); mod.append(t3 - t2)
            if rep == 0:
                scores.append(r.score); verdicts.append(bool(r.defect))
    med = lambda v: statistics.median(v) * 1000
    labels = [y for _, y in files]
    from defectscope.metrics import image_auroc
    rec[runtime] = {"decode_ms": med(dec), "resize_ms": med(res), "model_ms": med(mod),
                    "total_ms": med(dec) + med(res) + med(mod), "scores": scores, "verdicts": verdicts,
                    "image_auroc": float(image_auroc(np.array(scores), np.array(labels)))}
    print(f"[ours] {MODEL} {runtime}: model {med(mod):.1f} ms", file=sys.stderr, flush=True)
rec["true_labels"] = [y for _, y in files]
import resource
rec["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
Path(OUT).write_text(json.dumps(rec))
'''

#: Our parameters per method (the defaults, except training length for the benchmark's budget).
def our_params(model: str, args) -> dict:
    if model == "stfpm":
        return {"epochs": args.stfpm_epochs}
    if model == "efficientad":
        return {"steps": 1}
    return {}


def run_ours(model: str, root: Path, calib: Path, args, out: Path) -> dict:
    code = textwrap.dedent(OURS)
    for key, value in {"THREADS": args.threads, "MODEL": repr(model), "ROOT": repr(str(root)),
                       "CALIB": repr(str(calib)), "PARAMS": repr(our_params(model, args)),
                       "OUT": repr(str(out)), "REPEATS": args.repeats, "RUNTIMES": repr(RUNTIMES)}.items():
        code = code.replace(key, str(value))
    env = H._env(args.threads)
    env["PYTHONPATH"] = str(REPO / "src") + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    if proc.returncode != 0 or not out.is_file():
        return {"error": H._tail(proc.stderr)}
    return json.loads(out.read_text())


def run_reference(model: str, root: Path, args, out: Path) -> dict:
    if model in NO_REFERENCE:
        return {"error": NO_REFERENCE[model]}
    cmd = [str(H.reference_python()), str(HERE / "reference_runtime.py"), "--model", model, "--data", str(root),
           "--category", "washer", "--threads", str(args.threads), "--int8", "--repeats", str(args.repeats),
           "--epochs", str(args.stfpm_epochs), "--out", str(out)]
    if model == "efficientad":
        cmd.append("--speed-only")
    # cwd: anomalib writes an openvino_cache/ and a results/ folder into the working directory
    proc = subprocess.run(cmd, env=H._env(args.threads), capture_output=True, text=True, cwd=out.parent)
    if not out.is_file():
        return {"error": H._tail(proc.stderr)}
    return json.loads(out.read_text())


# ------------------------------------------------------------------------------------------------
# the machine's peak


def measured_peak_gflops(threads: int, n: int = 2048, reps: int = 10) -> float:
    """Float32 matrix product of ``n x n`` matrices at ``threads`` threads: the best of ``reps``."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    torch.set_num_threads(old)
    return 2 * n**3 / best / 1e9


# ------------------------------------------------------------------------------------------------
# table


def _f(v, fmt="{:.1f}") -> str:
    return "-" if v is None else fmt.format(v)


def agreement(a: list, b: list) -> str:
    if not a or not b or len(a) != len(b):
        return "-"
    return f"{sum(x == y for x, y in zip(a, b))}/{len(a)}"


def table(results: dict, peak: float, args) -> str:
    lines = [
        f"Files {args.file_size}x{args.file_size} RGB PNG, model at 256 px, batch 1, {args.threads} threads; "
        f"medians over {args.repeats} passes of the test files (ms). Peak measured: {peak:.0f} GFLOP/s "
        "(float32 matrix product). floor = FLOPs / peak.",
        "",
        "| method | side | runtime | decode | resize | model | total | model floor | image AUROC % | verdicts = torch |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for model, r in results.items():
        ours, ref = r["ours"], r["reference"]
        floor = ours.get("gflop") and ours["gflop"] / peak * 1000
        torch_v = (ours.get("torch") or {}).get("verdicts")
        for rt in RUNTIMES:
            row = ours.get(rt) or {}
            if "error" in row or not row:
                lines.append(f"| {model} | defectscope | {rt} | {row.get('error', 'not run')[:80]} |||||||")
                continue
            au = row.get("image_auroc")
            lines.append(f"| {model} | defectscope | {rt} | {_f(row['decode_ms'])} | {_f(row['resize_ms'])} | "
                         f"{_f(row['model_ms'])} | {_f(row['total_ms'])} | {_f(floor)} | "
                         f"{_f(au and au * 100)} | {agreement(row.get('verdicts'), torch_v)} |")
        if "error" in ref and not any(k in ref for k in ("fp32", "int8")):
            lines.append(f"| {model} | anomalib | - | {ref['error'][:100]} |||||||")
            continue
        for prec in ("fp32", "int8"):
            row = ref.get(prec) or {}
            if "error" in row or not row:
                lines.append(f"| {model} | anomalib | openvino {prec} | {str(row.get('error', 'not run'))[:80]} |||||||")
                continue
            resize = row.get("resize_ms")
            model_only = row["model_ms"] - (resize or 0)
            au = row.get("image_auroc")
            lines.append(f"| {model} | anomalib | openvino {prec} | {_f(row['decode_ms'])} | {_f(resize)} | "
                         f"{_f(model_only)} | {_f(row['total_ms'])} | {_f(floor)} | {_f(au and au * 100)} | - |")
    lines += ["", "Fit (s), the same training files on both sides:", "",
              "| method | defectscope | anomalib | ratio |", "|---|---:|---:|---:|"]
    for model, r in results.items():
        a, b = r["ours"].get("fit_s"), r["reference"].get("fit_s")
        if model == "efficientad":
            continue
        ratio = f"{b / a:.2f}x" if a and b else "-"
        lines.append(f"| {model}{'' if model in FIT_COMPARED else ' (information)'} | {_f(a)} | {_f(b)} | {ratio} |")
    lines += ["", "Best runtime against the reference's best at equal precision (total per image, decode included):", "",
              "| method | precision | defectscope best | anomalib best | ratio |", "|---|---|---:|---:|---:|"]
    for model, r in results.items():
        ours, ref = r["ours"], r["reference"]
        for prec, mine, theirs in (("fp32", ["torch", "onnx", "openvino"], ["fp32"]), ("int8", ["openvino-int8"], ["int8"])):
            a = [(ours[k]["total_ms"], k) for k in mine if isinstance(ours.get(k), dict) and "total_ms" in ours[k]]
            b = [ref[k]["total_ms"] for k in theirs if isinstance(ref.get(k), dict) and "total_ms" in ref[k]]
            if not a:
                continue
            best, name = min(a)
            ratio = f"{min(b) / best:.2f}x" if b else "-"
            lines.append(f"| {model} | {prec} | {best:.1f} ({name}) | {_f(min(b) if b else None)} | {ratio} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default=",".join(ALL))
    p.add_argument("--file-size", type=int, default=900)
    p.add_argument("--n-train", type=int, default=64)
    p.add_argument("--n-calib", type=int, default=16)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--stfpm-epochs", type=int, default=2)
    p.add_argument("--no-reference", action="store_true")
    p.add_argument("--out", default=str(REPO / "defectscope-bench" / "runtime"))
    args = p.parse_args(argv)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = sorted(set(models) - set(ALL))
    if unknown:
        p.error(f"unknown models {unknown}; choose from {ALL}")
    out = Path(args.out).resolve()  # the reference side runs in another working directory
    out.mkdir(parents=True, exist_ok=True)
    syn = H.import_defectscope("defectscope.data.synthetic")
    root = out / f"data-{args.file_size}"
    calib = out / f"calib-{args.file_size}"
    syn.make_synthetic(root, categories=["washer"], image_size=args.file_size, channels=3, n_train=args.n_train,
                       n_test_good=12, n_test_defect=3, seed=0, progress=False)
    syn.make_synthetic(calib, categories=["washer"], image_size=args.file_size, channels=3, n_train=args.n_calib,
                       n_test_good=1, n_test_defect=1, seed=1, progress=False)
    peak = measured_peak_gflops(args.threads)
    results = {}
    for model in models:
        H._log(f"{model}: defectscope")
        ours = run_ours(model, root, calib, args, out / f"{model}.ours.json")
        H._log(f"{model}: anomalib")
        ref = {"error": "--no-reference"} if args.no_reference else run_reference(model, root, args, out / f"{model}.ref.json")
        results[model] = {"ours": ours, "reference": ref}
        (out / "runtime.json").write_text(json.dumps({"peak_gflops": peak, "args": vars(args), "hardware": H.hardware(),
                                                      "load": os.getloadavg(), "results": results}, default=str))
    md = table(results, peak, args)
    (out / "runtime.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
