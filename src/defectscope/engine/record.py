"""The result record: one typed structure for every evaluation, built here and nowhere else.

``defectscope test``, :func:`defectscope.engine.run_experiment` and every benchmark cell (also a
failed one) yield a :class:`ResultRecord`; its :meth:`~ResultRecord.to_dict` is the flat JSON object
of the design (one line of ``results.jsonl``): fractions in [0, 1], times in the unit the key says,
metrics ``None`` where they do not apply or the run failed. Fields may be added, never renamed.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from ..metrics.summary import METRIC_KEYS

__all__ = ["ResultRecord", "METRIC_KEYS", "RESULTS", "read_results", "append_result"]

#: The file a benchmark appends its records to, one JSON object a line.
RESULTS = "results.jsonl"


@dataclass
class ResultRecord:
    """One evaluation of one model on one data set, category, setting and seed.

    What was run: ``model``, ``params`` (the hyper-parameters given), ``dataset`` (the kind:
    ``synthetic``, ``mvtec``...), ``data`` (the full spec), ``category`` (``None`` for a
    multi-class model over several), ``setting``, ``contamination`` (blind-mix), ``shots``
    (few-shot), ``seed``. The split (``split``: training and test counts) and the metrics
    (``metrics``: the keys of :data:`METRIC_KEYS`, flattened into the dict). Cost: ``fit_s``,
    ``latency_ms``, ``throughput_ips``, ``peak_rss_mb``, ``model_mb``. Where: ``device``,
    ``threads``, ``runtime`` (what ran the fitted model: ``torch``, ``onnx``, ``openvino``,
    ``openvino-int8``), ``image_size``, ``versions``, ``hardware``. ``error`` (``None`` when it ran) and
    its ``traceback``. ``run``: what the benchmark adds (cell key, wall time, artifacts folder,
    jobs, backend...), flattened as well.
    """

    model: str | None = None
    params: dict[str, Any] = field(default_factory=dict)
    dataset: str | None = None
    data: str | None = None
    category: str | None = None
    setting: str = "one-class"
    contamination: float | None = None
    shots: int | None = None
    seed: int = 0
    split: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, float | None] = field(default_factory=lambda: dict.fromkeys(METRIC_KEYS))
    fit_s: float | None = None
    latency_ms: float | None = None
    throughput_ips: float | None = None
    peak_rss_mb: float | None = None
    model_mb: float | None = None
    device: str | None = None
    threads: int | None = None
    runtime: str = "torch"
    image_size: int | None = None
    versions: dict[str, str] | None = None
    hardware: dict[str, Any] | None = None
    error: str | None = None
    traceback: str | None = None
    run: dict[str, Any] = field(default_factory=dict)

    _NESTED = ("split", "metrics", "run")

    def to_dict(self) -> dict[str, Any]:
        """The flat JSON object of the design (``split``, ``metrics`` and ``run`` flattened)."""
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in self._NESTED:
                out.update(value)
            elif f.name == "shots" and value is None:
                continue  # only few-shot rows carry it
            elif f.name == "traceback" and value is None:
                continue
            else:
                out[f.name] = value
        if out["setting"] == "one-class" and out["contamination"] is None:
            out["contamination"] = 0.0
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ResultRecord":
        """Inverse of :meth:`to_dict` (keys it does not know go to ``run``; nothing is lost)."""
        own = {f.name for f in fields(cls)} - set(cls._NESTED)
        rec = cls(**{k: v for k, v in d.items() if k in own})
        rec.metrics = {k: d.get(k) for k in METRIC_KEYS}
        from_split = ("n_train", "n_train_anomalous", "train_anomaly_rate", "n_test", "n_test_anomalous")
        rec.split = {k: d[k] for k in from_split if k in d}
        rec.run = {k: v for k, v in d.items() if k not in own and k not in METRIC_KEYS and k not in from_split}
        return rec

    def update(self, d: dict[str, Any]) -> "ResultRecord":
        """Overlay the flat dict ``d`` (e.g. what a worker process returned) on this record."""
        merged = {**self.to_dict(), **d}
        new = ResultRecord.from_dict(merged)
        for f in fields(self):
            setattr(self, f.name, getattr(new, f.name))
        return self


def read_results(out_dir) -> list[dict]:
    """The records of ``OUT/results.jsonl``; a torn line (a killed writer) is ignored."""
    path = Path(out_dir) / RESULTS
    if not path.exists():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def append_result(out_dir, record: dict) -> None:
    """Append one record as a single line, flushed and synced to disk."""
    path = Path(out_dir) / RESULTS
    path.parent.mkdir(parents=True, exist_ok=True)
    line = json.dumps(record, default=str) + "\n"
    torn = False
    if path.exists() and path.stat().st_size:
        with open(path, "rb") as f:  # a torn line from a killed earlier run must not glue onto this one
            f.seek(-1, os.SEEK_END)
            torn = f.read(1) != b"\n"
    with open(path, "a", encoding="utf-8") as f:
        f.write(("\n" if torn else "") + line)
        f.flush()
        os.fsync(f.fileno())
