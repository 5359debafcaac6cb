"""Optional experiment tracking of a benchmark in MLflow (``defectscope bench --mlflow [URI]``).

One MLflow run per benchmark (the summary run: the command, the mean metrics of every model as
``<model>.<metric>``, and the report, tables and map as artifacts) and, nested under it, one run
per finished cell (its hyper-parameters and settings as params, its numeric results as metrics,
model / category / dataset / error as tags; a failed cell's run ends FAILED). Needs
``pip install 'defectscope[mlflow]'`` (``mlflow-skinny``). The default store is a local folder,
``OUT/mlruns``; MLflow 3 keeps such file stores in maintenance mode behind
``MLFLOW_ALLOW_FILE_STORE``, which is set for file URIs only. Any other URI (``http://server``,
``sqlite:///mlflow.db`` with the full ``mlflow``) goes to MLflow as given.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import Any, Iterable

from ..errors import DefectscopeError
from ..report.tables import NUMERIC, mean_rows

__all__ = ["MlflowTracker", "default_uri"]

EXPERIMENT = "defectscope-bench"
_SETTINGS = ("model", "data", "dataset", "category", "seed", "setting", "image_size", "threads", "device", "jobs",
             "backend")


def default_uri(out_dir) -> str:
    """The local directory store of a benchmark: ``file:<OUT>/mlruns`` (absolute)."""
    return Path(out_dir, "mlruns").resolve().as_uri()


def _is_file_store(uri: str) -> bool:
    return uri.startswith("file:") or "://" not in uri


def _clean(text: Any, limit: int = 5000) -> str:
    text = str(text)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _metrics(rec: dict) -> dict[str, float]:
    out = {}
    for key, value in rec.items():
        if key in ("seed", "threads", "jobs", "image_size") or isinstance(value, bool):
            continue
        if isinstance(value, (int, float)) and math.isfinite(value):
            out[key] = float(value)
    return out


class MlflowTracker:
    """Logs a benchmark to MLflow as it runs (see the module docstring)."""

    def __init__(self, uri: str, meta: dict | None = None, experiment: str = EXPERIMENT):
        if _is_file_store(uri):
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        try:
            from mlflow.tracking import MlflowClient
        except ImportError as e:
            raise DefectscopeError("--mlflow needs MLflow: pip install 'defectscope[mlflow]'") from e
        self.uri = uri
        self.client = MlflowClient(tracking_uri=uri)
        exp = self.client.get_experiment_by_name(experiment)
        self.experiment_id = exp.experiment_id if exp else self.client.create_experiment(experiment)
        meta = meta or {}
        tags = {"defectscope.kind": "bench-summary", "mlflow.note.content": _clean(meta.get("command", ""))}
        run = self.client.create_run(self.experiment_id, run_name=f"bench {time.strftime('%Y-%m-%d %H:%M')}",
                                     tags={k: v for k, v in tags.items() if v})
        self.parent_id = run.info.run_id
        params = {k: _clean(v if isinstance(v, str) else ",".join(map(str, v)), 500)
                  for k, v in meta.items() if k in ("data", "categories", "models", "seeds", "not_implemented", "backend")
                  and v}
        self._batch(self.parent_id, {}, params, {})

    def _batch(self, run_id: str, metrics: dict[str, float], params: dict[str, str], tags: dict[str, str]) -> None:
        from mlflow.entities import Metric, Param, RunTag

        now = int(time.time() * 1000)
        self.client.log_batch(run_id, metrics=[Metric(k, v, now, 0) for k, v in metrics.items()],
                              params=[Param(k, _clean(v, 6000)) for k, v in params.items()],
                              tags=[RunTag(k, _clean(v)) for k, v in tags.items()])

    def log_cell(self, rec: dict) -> str:
        """One nested run for one finished cell; returns its run id."""
        name = f"{rec.get('model')} {rec.get('category') or ''} s{rec.get('seed')}".strip()
        run = self.client.create_run(self.experiment_id, run_name=name,
                                     tags={"mlflow.parentRunId": self.parent_id, "defectscope.kind": "bench-cell"})
        params = {f"param.{k}": v for k, v in (rec.get("params") or {}).items()}
        params.update({k: rec[k] for k in _SETTINGS if rec.get(k) is not None})
        versions = rec.get("versions") or {}
        params.update({f"version.{k}": v for k, v in versions.items()})
        tags = {k: rec.get(k) for k in ("model", "category", "dataset") if rec.get(k) is not None}
        tags["error"] = rec.get("error") or ""
        tags["cell_key"] = rec.get("cell_key") or ""
        hw = rec.get("hardware") or {}
        if hw.get("cpu"):
            tags["hardware.cpu"] = hw["cpu"]
        self._batch(run.info.run_id, _metrics(rec), {k: str(v) for k, v in params.items()}, tags)
        self.client.set_terminated(run.info.run_id, "FAILED" if rec.get("error") else "FINISHED")
        return run.info.run_id

    def finish(self, records: Iterable[dict], files: Iterable[Path] = ()) -> None:
        """Mean metrics of every model and the report files on the summary run, which then ends."""
        metrics = {}
        for row in mean_rows(list(records)):
            for key in NUMERIC:
                v = row.get(key)
                if isinstance(v, (int, float)) and math.isfinite(v):
                    metrics[f"{row['model']}.{key}"] = float(v)
        self._batch(self.parent_id, metrics, {}, {})
        for f in files:
            if Path(f).is_file():
                self.client.log_artifact(self.parent_id, str(f))
        self.client.set_terminated(self.parent_id, "FINISHED")

    def fail(self) -> None:
        self.client.set_terminated(self.parent_id, "KILLED")
