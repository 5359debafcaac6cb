"""Fit, evaluate and measure a model: everything that turns a model and a data set into the
result record of the design (one flat dict, fractions in [0, 1], times in the unit the key says).

Speed follows the benchmark protocol: after warm-up, the median of ``n_latency`` (>= 50)
single-image predictions (batch 1), and the throughput at batch 16; the thread count and the
hardware are recorded with it. Peak memory is the process's peak resident set size (the
benchmark runs each cell in a fresh process so that it is the cell's own).
"""

from __future__ import annotations

import os
import platform
import resource
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from ..data import load_setting
from ..metrics import compute_metrics
from ..models.base import create_model
from ..models.base import AnomalyModel
from ..models.io import versions

__all__ = ["predict_dataset", "evaluate", "measure_speed", "peak_rss_mb", "hardware", "run_experiment", "dir_size_mb"]


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, in MB."""
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb / 1024 if sys.platform != "darwin" else kb / 2**20


def hardware() -> dict[str, Any]:
    """The machine a figure was measured on."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {"cpu": cpu, "cores": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def dir_size_mb(path) -> float:
    """Total size of the files under ``path`` in MB."""
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file()) / 1e6


def predict_dataset(model: AnomalyModel, dataset, batch_size: int = 16, desc: str = "predict") -> dict[str, np.ndarray]:
    """Run ``model`` over ``dataset``; returns scores [N], labels [N], maps [N,H,W] and masks."""
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=0)
    scores, labels, maps, masks = [], [], [], []
    for batch in tqdm(loader, desc=desc, leave=False, disable=None):
        pred = model.predict(batch["image"])
        scores.append(pred.score.numpy())
        labels.append(np.asarray(batch["label"]))
        masks.append(batch["mask"].numpy().astype(bool))
        if pred.anomaly_map is not None:
            maps.append(pred.anomaly_map.numpy().astype(np.float32))
    return {
        "scores": np.concatenate(scores),
        "labels": np.concatenate(labels).astype(int),
        "maps": np.concatenate(maps) if maps else None,
        "masks": np.concatenate(masks),
    }


def evaluate(model: AnomalyModel, dataset, batch_size: int = 16) -> tuple[dict[str, float | None], dict]:
    """All metrics of ``model`` on the labelled ``dataset``; also returns the raw predictions.

    Pixel metrics are computed only when the model makes maps and the data set has masks;
    otherwise they are ``None`` (never a fake figure).
    """
    out = predict_dataset(model, dataset, batch_size)
    pixel = out["maps"] is not None and getattr(dataset, "has_masks", True)
    metrics = compute_metrics(
        scores=out["scores"], labels=out["labels"],
        maps=out["maps"] if pixel else None, masks=out["masks"] if pixel else None,
    )
    return metrics, out


def measure_speed(model: AnomalyModel, image: torch.Tensor, n_latency: int = 50, warmup: int = 5,
                  batch: int = 16, n_batches: int = 3) -> dict[str, float]:
    """Median batch-1 latency (ms) over ``n_latency`` calls after ``warmup``, and throughput
    (images/s) at batch ``batch``. ``image`` is one input ``[C, H, W]``."""
    x1 = image.unsqueeze(0)
    for _ in range(warmup):
        model.predict(x1)
    times = []
    for _ in range(n_latency):
        t0 = time.perf_counter()
        model.predict(x1)
        times.append(time.perf_counter() - t0)
    xb = x1.expand(batch, *image.shape).contiguous()
    model.predict(xb)
    t0 = time.perf_counter()
    for _ in range(n_batches):
        model.predict(xb)
    dt = time.perf_counter() - t0
    return {"latency_ms": statistics.median(times) * 1000, "throughput_ips": batch * n_batches / dt}


def run_experiment(model_name: str, params: dict | None = None, data: str = "synthetic", category: str | None = None,
                   seed: int = 0, setting: str = "one-class", save_to=None, measure: bool = True,
                   n_latency: int = 50, artifacts_dir=None, contamination: float | None = None) -> dict[str, Any]:
    """Fit ``model_name`` on the training split of ``data``/``category``, evaluate on its test
    split, time it, and return the result record. Errors are raised (the benchmark catches
    them per cell). ``artifacts_dir``: also save there what the report draws (image scores and a
    few example images, masks and maps; see :mod:`defectscope.report.artifacts`). ``setting`` and
    ``contamination``: the one-class setting or a blind one (:mod:`defectscope.data.blind`; the
    split depends on ``seed`` and the data only, never on the model)."""
    params = dict(params or {})
    params.setdefault("seed", seed)
    model = create_model(model_name, **params)
    split = load_setting(data, category, setting, contamination, seed, image_size=model.image_size,
                         channels=model.channels)
    train, test = split.train, split.test
    t0 = time.perf_counter()
    model.fit(train)
    fit_s = time.perf_counter() - t0
    metrics, predictions = evaluate(model, test)
    if len(set(predictions["labels"].tolist())) < 2:  # blind-ano: one class, image metrics undefined
        metrics.update({k: None for k in metrics if k.startswith("image_")})
    if artifacts_dir is not None:
        from ..report.artifacts import save_artifacts

        save_artifacts(artifacts_dir, predictions, test)
    record: dict[str, Any] = {
        "model": model.name, "params": model.params, "dataset": data.split(":", 1)[0],
        "data": data, "category": train.category, "seed": seed, **split.info(),
        **metrics, "fit_s": fit_s,
    }
    if measure:
        record.update(measure_speed(model, test[0]["image"], n_latency=n_latency))
    tmp = None
    try:
        target = Path(save_to) if save_to else Path(tmp := tempfile.mkdtemp(prefix="defectscope-"))
        model.save(target)
        record["model_mb"] = dir_size_mb(target)
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    record.update({
        "peak_rss_mb": peak_rss_mb(), "device": str(model.device.type), "threads": torch.get_num_threads(),
        "image_size": model.image_size,
        "versions": versions(), "hardware": hardware(), "error": None,
    })
    return record
