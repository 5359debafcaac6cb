"""Exported models against PyTorch: parity, accuracy and batch-1 latency, side by side in one run.

    PYTHONPATH=src python benchmarks/export_parity.py                          # sae, padim, patchcore
    PYTHONPATH=src python benchmarks/export_parity.py --models all --size 128  # every registered method

For each method: fit on the synthetic set's ``--category`` (RGB, rendered at 1.5x ``--size`` so the
resize inside the exported graph is exercised), calibrate on a 20 % validation split of the
training images, export the whole inference path (:mod:`defectscope.deploy.export`) to

* ``onnx``: ONNX, run by onnxruntime;
* ``ov-fp32``: OpenVINO IR with FP32 weights;
* ``ov-int8``: OpenVINO IR with INT8 weights (``nncf.compress_weights``),

and run PyTorch (the same :class:`~defectscope.deploy.export.InferenceGraph`) and each export on
the test images. Reported per variant: the largest absolute difference of the raw image scores, of
the normalised scores and of the raw maps against PyTorch; how many verdicts differ; image AUROC
and pixel AUROC on the test split; the median batch-1 latency over ``--n`` calls, the variants
interleaved call by call (so a drift of the machine hits all alike), after a warm-up, with
``--threads`` threads everywhere; the file size. A method that cannot be exported keeps its row
with the error.

Writes ``--out`` (JSON, default ``defectscope-bench/export_parity.json``) and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np
import torch

QUICK = {"epochs": 5}  # trainable methods: a short schedule (parity, not accuracy, is the point)


def _params(cls, size: int, epochs: int | None) -> dict:
    params = {"image_size": size}
    if "channels" in cls.defaults:
        params["channels"] = 3
    if epochs is not None and "epochs" in cls.defaults:
        params["epochs"] = epochs
    return params


def _run_graph(graph, images: torch.Tensor, batch: int = 8) -> dict[str, np.ndarray]:
    outs = []
    with torch.no_grad():
        for i in range(0, len(images), batch):
            outs.append([t.numpy() for t in graph(images[i:i + batch])])
    return {n: np.concatenate([o[k] for o in outs]) for k, n in enumerate(graph.output_names)}


def bench_model(name: str, args, root: Path, work: Path) -> dict:
    from defectscope.data import load_dataset
    from defectscope.deploy import calibrate
    from defectscope.deploy.export import InferenceGraph, export_model, load_exported
    from defectscope.data.validation import validation_split
    from defectscope.metrics import image_auroc, pixel_auroc
    from defectscope.models import get_model_class

    cls = get_model_class(name)
    model = cls(**_params(cls, args.size, args.epochs))
    train_all = load_dataset(f"mvtec:{root}", args.category, "train", image_size=args.size, channels=model.channels)
    train, val = validation_split(train_all, 0.2)
    t0 = time.perf_counter()
    model.fit(train, val)
    fit_s = time.perf_counter() - t0
    model.calibration = calibrate(model, val)
    model.save(work / name)
    # test images at their own (larger) size: the exported graphs resize them, as PyTorch does
    test = load_dataset(f"mvtec:{root}", args.category, "test", image_size=None, channels=model.channels)
    images = torch.stack([test[i]["image"] for i in range(len(test))])
    labels = np.asarray(test.labels)
    sized = load_dataset(f"mvtec:{root}", args.category, "test", image_size=args.size, channels=model.channels)
    masks = np.stack([sized[i]["mask"].numpy() for i in range(len(sized))])
    graph = InferenceGraph(model).eval()
    ref = _run_graph(graph, images)
    row = {"model": name, "fit_s": fit_s, "image_threshold": model.calibration.image_threshold, "variants": {}}

    def metrics(out):
        m = {"image_auroc": image_auroc(out["score"], labels)}
        if "anomaly_map" in out:
            m["pixel_auroc"] = pixel_auroc(out["anomaly_map"], masks)
        return m

    row["variants"]["pytorch"] = {**metrics(ref), "size_mb": sum(
        p.stat().st_size for p in (work / name).iterdir()) / 2**20}
    runners = {"pytorch": lambda x: graph(x)}
    for variant, fmt, int8 in (("onnx", "onnx", False), ("ov-fp32", "openvino", False), ("ov-int8", "openvino", True)):
        if fmt == "openvino" and not args.openvino:
            continue
        try:
            rep = export_model(model, work / f"{name}-{variant}", fmt, int8=int8, check=False)
            exported = load_exported(rep.path, threads=args.threads)
            got = exported.run(images)
        except Exception as e:  # noqa: BLE001 - recorded, the run goes on
            row["variants"][variant] = {"error": f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"}
            continue
        v = {**metrics(got), "size_mb": rep.size_mb, "batch": rep.batch,
             "max_abs_score": float(np.abs(got["score"] - ref["score"]).max()),
             "verdicts_different": int((got["defect"] != ref["defect"]).sum()) if "defect" in ref else None}
        if "normalized" in ref:
            v["max_abs_normalized"] = float(np.abs(got["normalized"] - ref["normalized"]).max())
        if "anomaly_map" in ref:
            v["max_abs_map"] = float(np.abs(got["anomaly_map"] - ref["anomaly_map"]).max())
            v["mask_pixels_different"] = int((got["mask"] != ref["mask"]).sum()) if "mask" in ref else None
        row["variants"][variant] = v
        runners[variant] = exported.run

    # batch-1 latency, interleaved
    times = {k: [] for k in runners}
    with torch.no_grad():
        for i in range(args.warmup + args.n):
            x = images[i % len(images)][None]
            for k, fn in runners.items():
                t = time.perf_counter()
                fn(x)
                if i >= args.warmup:
                    times[k].append((time.perf_counter() - t) * 1e3)
    for k, ts in times.items():
        row["variants"][k]["latency_ms"] = statistics.median(ts)
    return row


def table(rows: list[dict]) -> str:
    head = ("| model | variant | image AUROC | pixel AUROC | max abs score diff | max abs normalised diff | "
            "max abs map diff | verdicts different | latency b1 (ms) | vs PyTorch | size (MB) |")
    lines = [head, "|" + "---|" * 11]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | - | error: {r['error'][:120]} |" + " |" * 8)
            continue
        base = r["variants"]["pytorch"].get("latency_ms")
        for k, v in r["variants"].items():
            if "error" in v:
                lines.append(f"| {r['model']} | {k} | error: {v['error'][:150]} |" + " |" * 8)
                continue

            def f(key, fmt):
                return fmt.format(v[key]) if v.get(key) is not None else "-"
            ratio = f"{v['latency_ms'] / base:.2f}x" if base and v.get("latency_ms") else "-"
            lines.append(f"| {r['model']} | {k} | {f('image_auroc', '{:.4f}')} | {f('pixel_auroc', '{:.4f}')} | "
                         f"{f('max_abs_score', '{:.2e}')} | {f('max_abs_normalized', '{:.2e}')} | "
                         f"{f('max_abs_map', '{:.2e}')} | {f('verdicts_different', '{}')} | "
                         f"{f('latency_ms', '{:.1f}')} | {ratio} | {f('size_mb', '{:.1f}')} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="sae,padim,patchcore", help="comma-separated, or 'all'")
    ap.add_argument("--size", type=int, default=128, help="model input side (default 128)")
    ap.add_argument("--category", default="washer")
    ap.add_argument("--n-train", type=int, default=60)
    ap.add_argument("--epochs", type=int, default=QUICK["epochs"], help="epochs of trainable methods (default 5)")
    ap.add_argument("--n", type=int, default=50, help="timed batch-1 calls per variant (default 50)")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-openvino", dest="openvino", action="store_false")
    ap.add_argument("--out", default="defectscope-bench/export_parity.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from defectscope.data import make_synthetic
    from defectscope.engine.evaluate import hardware
    from defectscope.models import list_models
    from defectscope.models.io import versions

    names = [c.name for c in list_models()] if args.models == "all" else [m.strip() for m in args.models.split(",")]
    rows = []
    with tempfile.TemporaryDirectory(prefix="export-parity-") as tmp:
        root = make_synthetic(Path(tmp) / "synth", categories=[args.category], image_size=args.size * 3 // 2,
                              channels=3, n_train=args.n_train, n_test_good=20, n_test_defect=5, seed=0,
                              progress=False)
        for name in names:
            print(f"[{name}]", file=sys.stderr, flush=True)
            try:
                rows.append(bench_model(name, args, root, Path(tmp)))
            except Exception as e:  # noqa: BLE001
                traceback.print_exc()
                rows.append({"model": name, "error": f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"})
    versions_ = versions()
    for pkg in ("onnx", "onnxruntime", "openvino", "nncf"):
        try:
            versions_[pkg] = __import__(pkg).__version__
        except Exception:  # noqa: BLE001
            pass
    record = {"command": " ".join(["python"] + sys.argv), "args": vars(args), "hardware": hardware(),
              "versions": versions_, "rows": rows}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2, default=str))
    print(table(rows))
    print(f"\nwritten {out}")


if __name__ == "__main__":
    main()
