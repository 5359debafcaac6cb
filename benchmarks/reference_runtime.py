"""The reference library's (anomalib 2.7.0) best CPU inference path, timed on real-size image files.

Run by ``benchmarks/runtime.py`` with the reference venv's Python; it never imports defectscope.
One run = one model: fit with anomalib's ``Engine`` on an MVTec-layout folder (``--data``,
``--category``), export with ``engine.export`` to OpenVINO at FP32 and (``--int8``) with
``CompressionType.INT8_PTQ`` (NNCF post-training quantization on the datamodule's training
images), then time anomalib's own ``OpenVINOInferencer`` on every test file, split in columns:

* ``decode``: ``anomalib.data.utils.read_image(path)`` (PIL decode, RGB, float in [0, 1]), which
  is what ``OpenVINOInferencer.predict(path)`` does first;
* ``model``: ``OpenVINOInferencer.predict(array)`` on the decoded full-size array: its numpy
  pre-processing and the compiled graph, which holds anomalib's pre-processor (the resize to
  ``--image-size`` and the normalisation), the model and its post-processor;
* ``resize``: the part of ``model`` the in-graph resize takes, estimated as ``model`` minus the
  same call of the same model exported at ``--image-size`` on an input of that size (FP32; its
  resize is the identity).

The graphs are static (batch 1, the files' size): with anomalib's default dynamic axes, torch
2.13's dynamo exporter specialises the batch to 2 for DFM, and NNCF refuses dynamic shapes.

Both OpenVINO graphs are compiled with ``INFERENCE_NUM_THREADS = --threads`` and
``INFERENCE_PRECISION_HINT = f32`` (defectscope's runtime uses the same; without the hint
OpenVINO may run bf16 on CPUs that have it, which is not "equal precision"), on device ``CPU``.
``--speed-only`` skips the fit (random weights: EfficientAD cannot fit offline without its
teacher and imagenette downloads; its latency does not depend on the weights).

Output (``--out``): JSON with ``fit_s``, per precision the per-image medians of the columns,
the verdicts (``pred_label``) and scores of every test file, and their image AUROC.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, choices=["patchcore", "padim", "dfm", "dfkde", "stfpm", "efficientad"])
    p.add_argument("--data", required=True)
    p.add_argument("--category", required=True)
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--epochs", type=int, default=1, help="trainable models (STFPM)")
    p.add_argument("--int8", action="store_true", help="also export and time INT8_PTQ")
    p.add_argument("--speed-only", action="store_true", help="no fit: random weights, latency only")
    p.add_argument("--repeats", type=int, default=3, help="passes over the test files (medians over all)")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    args.normalize = "backbone"  # what reference_anomalib.build_pre_processor reads
    return args


ARGS = parse_args() if __name__ == "__main__" else None
if ARGS is not None:  # before torch / huggingface_hub are imported
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["HF_HUB_CACHE"] = str((Path(sys.prefix) / "hf-cache").resolve())
    for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[_var] = str(ARGS.threads)
    os.environ.setdefault("TQDM_DISABLE", "1")

import numpy as np  # noqa: E402

sys.path.insert(0, str(HERE))
import reference_anomalib as ra  # noqa: E402  (weights conversion, pre-processor, evaluator, timer)


def build(args, mean, std):
    from anomalib import models as am

    pre = ra.build_pre_processor(args, mean, std)
    common = {"pre_processor": pre, "evaluator": ra.build_evaluator(), "visualizer": False}
    bb = "tf_efficientnet_lite0"
    if args.model == "patchcore":
        return am.Patchcore(backbone=bb, layers=["blocks.2", "blocks.4"], coreset_sampling_ratio=0.1,
                            num_neighbors=9, **common)
    if args.model == "padim":
        return am.Padim(backbone=bb, layers=["blocks.1", "blocks.2", "blocks.4"], n_features=100, **common)
    if args.model == "dfm":
        return am.Dfm(backbone=bb, layer="blocks.4", pooling_kernel_size=4, pca_level=0.97, score_type="fre", **common)
    if args.model == "dfkde":
        return am.Dfkde(backbone=bb, layers=["blocks.6"], n_pca_components=16, max_training_points=40000, **common)
    if args.model == "stfpm":
        return am.Stfpm(backbone=bb, layers=["blocks.1", "blocks.2", "blocks.4"], **common)
    return am.EfficientAd(model_size="small", imagenet_dir="/nonexistent", **common)


def files(data: Path, category: str) -> list[tuple[Path, int]]:
    test = data / category / "test"
    return [(f, int(d.name != "good")) for d in sorted(test.iterdir()) if d.is_dir()
            for f in sorted(d.iterdir()) if f.suffix.lower() in {".png", ".jpg", ".bmp"}]


def auroc(scores, labels):
    s, y = np.asarray(scores, float), np.asarray(labels, int)
    pos, neg = s[y == 1], s[y == 0]
    if not len(pos) or not len(neg):
        return None
    return float(((pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum())
                 / (len(pos) * len(neg)))


def compile_ov(xml: Path, args):
    from anomalib.deploy import OpenVINOInferencer

    return OpenVINOInferencer(xml, device="CPU",
                              config={"INFERENCE_NUM_THREADS": str(args.threads), "INFERENCE_PRECISION_HINT": "f32"})


def time_inferencer(xml: Path, test, args, at_size: Path | None) -> dict:
    import torch
    from anomalib.data.utils import read_image
    from anomalib.deploy import OpenVINOInferencer

    inf = compile_ov(xml, args)
    inf_small = compile_ov(at_size, args) if at_size is not None else None
    small = np.random.default_rng(0).random((args.image_size, args.image_size, 3))
    for _ in range(3):  # warm-up
        inf.predict(read_image(test[0][0], as_tensor=False))
        if inf_small is not None:
            inf_small.predict(small)
    dec, mod, mod_small, scores, labels = [], [], [], [], []
    for rep in range(args.repeats):
        for path, label in test:
            t0 = time.perf_counter()
            arr = read_image(path, as_tensor=False)
            t1 = time.perf_counter()
            out = inf.predict(arr)
            t2 = time.perf_counter()
            if inf_small is not None:
                inf_small.predict(small)
            t3 = time.perf_counter()
            dec.append(t1 - t0), mod.append(t2 - t1), mod_small.append(t3 - t2)
            if rep == 0:
                scores.append(float(np.asarray(out.pred_score).reshape(-1)[0]))
                labels.append(bool(np.asarray(out.pred_label).reshape(-1)[0]) if out.pred_label is not None else None)
    med = lambda v: statistics.median(v) * 1000  # noqa: E731
    split = {"graph_at_size_ms": med(mod_small), "resize_ms": max(0.0, med(mod) - med(mod_small))} if inf_small else {}
    return {"decode_ms": med(dec), "model_ms": med(mod), **split, "total_ms": med(dec) + med(mod),
            "scores": scores, "verdicts": labels, "true_labels": [y for _, y in test],
            "image_auroc": auroc(scores, [y for _, y in test]), "torch_threads": torch.get_num_threads()}


def main(args) -> dict:
    import warnings

    warnings.filterwarnings("ignore")
    import logging

    import torch

    torch.set_num_threads(args.threads)
    from anomalib.data import MVTecAD
    from anomalib.deploy import CompressionType, ExportType
    from anomalib.engine import Engine
    from lightning.pytorch import seed_everything

    for name in ("lightning", "lightning.pytorch", "anomalib", "lightning.fabric", "nncf"):
        logging.getLogger(name).setLevel(logging.ERROR)
    rec: dict = {"library": "anomalib", "model": args.model, "image_size": args.image_size, "threads": args.threads}
    seed_everything(0, workers=True)
    if args.model == "efficientad":
        mean = std = None
    else:
        w = ra.ensure_hf_weights("tf_efficientnet_lite0")
        mean, std = w["mean"], w["std"]
    lm = build(args, mean, std)
    work = Path(tempfile.mkdtemp(prefix="anomalib-runtime-"))
    dm = MVTecAD(root=args.data, category=args.category, train_batch_size=32, eval_batch_size=32,
                 num_workers=0, seed=0)
    timer = ra.FitTimer()
    engine = Engine(accelerator="cpu", devices=1, logger=False, barebones=True, default_root_dir=str(work), callbacks=[timer],
                    enable_progress_bar=False, enable_checkpointing=False, enable_model_summary=False,
                    max_epochs=args.epochs)
    if not args.speed_only:
        t0 = time.perf_counter()
        engine.fit(model=lm, datamodule=dm)
        t1 = time.perf_counter()
        from anomalib.models.components import MemoryBankMixin

        if isinstance(lm, MemoryBankMixin):
            key = next((k for k in ("first_validation_batch", "train_end") if k in timer.t), None)
            rec["fit_s"] = (timer.t[key] if key else t1) - t0
        else:
            rec["fit_s"] = (t1 - t0) - timer.validation_total
        rec["fit_includes"] = "engine.fit until fitted: decode + resize of the training files, features, statistics"
    else:
        dm.setup()
    test = files(Path(args.data), args.category)
    # A static graph, batch 1 at the files' size: with anomalib's default dynamic axes, torch
    # 2.13's dynamo exporter specialises the batch to 2 for some models (DFM) and NNCF refuses the
    # dynamic shapes ("to_shape was called on a dynamic shape").
    from PIL import Image

    with Image.open(test[0][0]) as im:
        size = (im.height, im.width)
    # INT8_PTQ calibrates on the datamodule's *validation* loader, which anomalib takes from the
    # test set by default: calibrate on training images instead (as defectscope does), one at a
    # time (the graph's batch is 1).
    calib = MVTecAD(root=args.data, category=args.category, train_batch_size=1, eval_batch_size=1,
                    num_workers=0, seed=0, val_split_mode="from_train", val_split_ratio=0.5)
    def export(prec, comp, input_size):
        root = work / f"{prec}-{input_size[0]}"
        engine.export(model=lm, export_type=ExportType.OPENVINO, export_root=root, input_size=input_size,
                      onnx_kwargs={"dynamic_axes": {}}, compression_type=comp, datamodule=calib if comp else None)
        return next(root.rglob("*.xml"))

    # The FP32 graph also at the model's own size, so that the in-graph resize can be told apart.
    at_size = export("fp32", None, (args.image_size, args.image_size))
    precisions = [("fp32", None)] + ([("int8", CompressionType.INT8_PTQ)] if args.int8 else [])
    for prec, comp in precisions:
        try:
            t0 = time.perf_counter()
            xml = export(prec, comp, size)
            rec[f"export_{prec}_s"] = time.perf_counter() - t0
            rec[prec] = time_inferencer(xml, test, args, at_size)
        except Exception as exc:  # report what failed, keep the other precision
            rec[prec] = {"error": repr(exc)[:500]}
    return rec


if __name__ == "__main__":
    out = Path(ARGS.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        record = main(ARGS)
    except BaseException as exc:  # leave a record saying what failed
        import traceback

        traceback.print_exc()
        record = {"library": "anomalib", "model": ARGS.model, "error": repr(exc)[:1000]}
    out.write_text(json.dumps(record, indent=1))
