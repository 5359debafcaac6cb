"""Fit, evaluate and measure a model: everything that turns a model and a data set into the
result record of the design (one flat dict, fractions in [0, 1], times in the unit the key says).

Speed follows the benchmark protocol: after warm-up, the median of ``n_latency`` (>= 50)
single-image predictions (batch 1), and the throughput at batch 16; the thread count and the
hardware are recorded with it. Peak memory is the process's peak resident set size (the
benchmark runs each cell in a fresh process so that it is the cell's own).
"""

from __future__ import annotations

import dataclasses
import os
import platform
import resource
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from ..data.settings import family as setting_tag
from ..data.settings import load_split
from ..errors import DefectscopeError
from ..metrics import compute_metrics
from ..models.base import AnomalyModel, FitContext, create_model
from ..models.io import versions
from ..progress import progress
from .record import ResultRecord

__all__ = ["predict_dataset", "evaluate", "measure_speed", "peak_rss_mb", "hardware", "run_experiment",
           "run_experiments", "test_saved_model", "dir_size_mb"]


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
    scores, labels, maps, masks, words = [], [], [], [], []
    for batch in progress(loader, desc=desc, unit="batch"):
        pred = model.predict(batch["image"])
        scores.append(pred.score.numpy())
        explanation = getattr(pred, "explanation", None)  # an exported graph's outputs have none
        words += list(explanation) if explanation is not None else [""] * len(pred.score)
        labels.append(np.asarray(batch["label"]))
        masks.append(batch["mask"].numpy().astype(bool))
        if pred.anomaly_map is not None:
            maps.append(pred.anomaly_map.numpy().astype(np.float32))
    return {
        "scores": np.concatenate(scores),
        "labels": np.concatenate(labels).astype(int),
        "maps": np.concatenate(maps) if maps else None,
        "masks": np.concatenate(masks),
        "explanations": words if any(words) else None,  # per image, for the methods that explain (VLM-AD)
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
                  batch: int = 16, n_batches: int = 3, throughput: bool = True) -> dict[str, float]:
    """Median batch-1 latency (ms) over ``n_latency`` calls after ``warmup``, and throughput
    (images/s) at batch ``batch`` (left out with ``throughput=False``). ``image`` is one input
    ``[C, H, W]``."""
    x1 = image.unsqueeze(0)
    for _ in range(warmup):
        model.predict(x1)
    times = []
    for _ in range(n_latency):
        t0 = time.perf_counter()
        model.predict(x1)
        times.append(time.perf_counter() - t0)
    if not throughput:
        return {"latency_ms": statistics.median(times) * 1000}
    xb = x1.expand(batch, *image.shape).contiguous()
    model.predict(xb)
    t0 = time.perf_counter()
    for _ in range(n_batches):
        model.predict(xb)
    dt = time.perf_counter() - t0
    return {"latency_ms": statistics.median(times) * 1000, "throughput_ips": batch * n_batches / dt}


def run_experiments(model_name: str, params: dict | None = None, data: str = "synthetic", category: str | None = None,
                    seed: int = 0, setting: str = "one-class", contamination: float | None = None,
                    shots: int | None = None, categories: list[str] | None = None, save_to=None,
                    measure: bool = True, n_latency: int = 50,
                    keep: Callable[[str | None, dict, Any], None] | None = None, runtime: str = "torch",
                    predictor: Callable[[AnomalyModel, Any], Any] | None = None) -> list[dict[str, Any]]:
    """Build ``setting`` from ``data`` (:func:`defectscope.data.settings.load_split`), fit
    ``model_name`` once on its training side, evaluate it on each of its evaluation sets (one, or
    one per category in the multi-class setting), time it, and return one result record (a flat
    dict, :class:`~defectscope.engine.record.ResultRecord`) per evaluation set. Errors are raised
    (the benchmark catches them per cell). The split depends on ``seed`` and the data only, never
    on the model. ``keep(category, predictions, test_set)``: called with the raw predictions of each
    evaluation set (the benchmark saves what its report draws). ``predictor(model, train)``: what
    predicts once the model is fitted (anything with the model's ``predict``; the benchmark passes
    an exported graph on another runtime, :mod:`defectscope.deploy.runtime`), recorded as
    ``runtime``; the model itself by default.
    """
    params = dict(params or {})
    params.setdefault("seed", seed)
    model = create_model(model_name, **params)
    model.check_weights()
    needed = setting_tag(setting)
    if needed not in model.tags.settings:
        raise DefectscopeError(f"{model.name} does not support the {setting} setting (its settings: "
                               f"{', '.join(sorted(model.tags.settings))})")
    split = load_split(data, category, setting, contamination=contamination, shots=shots, seed=seed,
                       categories=categories, image_size=model.input_size, channels=model.channels)
    context = FitContext(setting=split.setting, categories=tuple(
        split.info.get("categories") or [t.category for t in split.tests.values()]))
    t0 = time.perf_counter()
    model.fit(split.train, context=context)
    fit_s = time.perf_counter() - t0
    runner = predictor(model, split.train) if predictor is not None else model
    base = ResultRecord(runtime=runtime, model=model.name, params=dict(model.params), dataset=data.split(":", 1)[0], data=data,
                        setting=split.setting, contamination=split.info.get("contamination"),
                        shots=split.info.get("shots"), seed=seed, fit_s=fit_s)
    counts = {k: v for k, v in split.info.items() if k not in ("contamination", "shots", "categories")}
    records = []
    for cat, test in split.tests.items():
        metrics, predictions = evaluate(runner, test)
        if len(set(predictions["labels"].tolist())) < 2:  # blind-ano: one class, image metrics undefined
            metrics.update({k: None for k in metrics if k.startswith("image_")})
        if keep is not None:
            keep(cat, predictions, test)
        if len(split.tests) > 1:  # multi-class: the counts of this category's evaluation
            counts = {**counts, "n_test": len(test), "n_test_anomalous": int(predictions["labels"].sum())}
        records.append(dataclasses.replace(base, category=cat, metrics=metrics, split=counts))
    first_test = next(iter(split.tests.values()))
    cost: dict[str, Any] = {}
    if measure:
        cost.update(measure_speed(runner, first_test[0]["image"], n_latency=n_latency))
    tmp = None
    try:
        target = Path(save_to) if save_to else Path(tmp := tempfile.mkdtemp(prefix="defectscope-"))
        model.save(target)
        cost["model_mb"] = dir_size_mb(target)
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    cost.update(peak_rss_mb=peak_rss_mb(), device=str(model.device.type), threads=torch.get_num_threads(),
                image_size=model.image_size, versions=versions(), hardware=hardware(), error=None)
    return [rec.update(cost).to_dict() for rec in records]


def test_saved_model(model_dir, data: str = "synthetic", category: str | None = None, measure: bool = True,
                     n_latency: int = 50) -> dict[str, Any]:
    """Evaluate the model saved in ``model_dir`` on the test split of ``data``/``category``: its
    result record (``fit_s`` is None: the fit happened elsewhere). With the same seed and data, a
    model fitted by ``defectscope fit --val-fraction 0`` gives the metrics of the benchmark cell."""
    from ..data import load_dataset
    from ..models.io import load_model

    model = load_model(model_dir)
    test = load_dataset(data, category, "test", image_size=model.input_size, channels=model.channels)
    metrics, _ = evaluate(model, test)
    rec = ResultRecord(model=model.name, params=dict(model.params), dataset=data.split(":", 1)[0], data=data,
                       category=test.category, seed=model.params["seed"], metrics=metrics,
                       split={"n_test": len(test), "n_test_anomalous": int(sum(test.labels))},
                       model_mb=dir_size_mb(model_dir), device=str(model.device.type),
                       threads=torch.get_num_threads(), image_size=model.image_size, versions=versions(),
                       hardware=hardware())
    if measure:
        rec.update(measure_speed(model, test[0]["image"], n_latency=n_latency))
    return rec.to_dict()


def run_experiment(model_name: str, params: dict | None = None, data: str = "synthetic", category: str | None = None,
                   seed: int = 0, setting: str = "one-class", save_to=None, measure: bool = True,
                   n_latency: int = 50, contamination: float | None = None, shots: int | None = None,
                   keep=None) -> dict[str, Any]:
    """:func:`run_experiments` for a setting with one evaluation set (every setting but
    multi-class): its one result record."""
    if setting_tag(setting) == "multi-class":
        raise DefectscopeError("the multi-class setting gives one record per category: use run_experiments")
    return run_experiments(model_name, params, data, category, seed, setting, contamination, shots, None,
                           save_to, measure, n_latency, keep)[0]
