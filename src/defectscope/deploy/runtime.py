"""Runtimes: run a fitted model through PyTorch, ONNX Runtime or OpenVINO (FP32, or full INT8).

``torch`` is the model's own ``predict``. The others run the model's exported inference graph
(:mod:`defectscope.deploy.export`, without the resize: inputs at the model's size, as the
Inferencer and the benchmark prepare them), which holds the calibration too, so a verdict comes
out of the runtime itself:

* ``onnx``: ONNX Runtime, CPU execution provider, FP32.
* ``openvino``: OpenVINO, CPU, FP32 (``INFERENCE_PRECISION_HINT=f32``).
* ``openvino-int8``: OpenVINO with the weights *and* activations of the model's networks
  (backbone, teacher/student...) in INT8, from NNCF's post-training quantization calibrated on
  normal training images (``calibration_images``; never the test set); the method's own code after
  them (distances, statistics, PCA, KDE, k-NN, upsampling, blur) stays float (see
  :mod:`defectscope.deploy.export`).

The graph is exported once and cached: in ``MODEL_DIR/runtimes/`` for a model loaded from a
directory (else in ``$DEFECTSCOPE_CACHE/runtimes`` or ``~/.cache/defectscope/runtimes``), under a
name keyed by the model's config checksum (which covers its weights and calibration), the
runtime, its version and the export format version; a JSON file beside it records the SHA-256 of
the graph files and the parity found at export. Before use the files are verified against those
checksums (a modified or truncated file is exported again) and, for the FP32 runtimes, the parity
is checked again on :func:`~defectscope.deploy.export.check_images`: the verdicts must be
identical and the scores and maps equal to PyTorch's within :data:`TOLERANCE` (relative to the
larger of 1 and the threshold, or the largest value when uncalibrated), the masks different in at
most :data:`MASK_TOLERANCE` of the pixels. A mismatch refuses the runtime with one line
(:class:`RuntimeMismatch`). INT8 changes the numbers by design: its parity is reported, not
enforced; the benchmark measures what it costs in AUROC.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from ..errors import DefectscopeError
from .export import ExportError, ExportedModel, check_images, check_parity, export_model

__all__ = ["RUNTIMES", "Runtime", "RuntimeMismatch", "load_runtime", "runtime_version", "TOLERANCE",
           "MASK_TOLERANCE", "EXPORT_VERSION"]

#: The runtimes a model can run on.
RUNTIMES = ("torch", "onnx", "openvino", "openvino-int8")
#: Largest difference of scores and maps against PyTorch, relative to max(1, threshold) (FP32).
TOLERANCE = 1e-3
#: Largest share of mask pixels that may differ from PyTorch's (pixels at the threshold) (FP32).
MASK_TOLERANCE = 1e-3
#: Bumped when the exported graph changes meaning, so that cached graphs are made again.
EXPORT_VERSION = 3  # 2: INT8 kept the matrix products in float; 3: INT8 quantizes the networks only
_FORMAT = {"onnx": ("onnx", ".onnx"), "openvino": ("openvino", ".xml"), "openvino-int8": ("openvino", ".xml")}


class RuntimeMismatch(ExportError):
    """The runtime's results differ from PyTorch's beyond the tolerances: it is refused."""


def runtime_version(name: str) -> str:
    """The version of the package behind runtime ``name`` (``torch`` for torch)."""
    try:
        if name == "torch":
            return torch.__version__
        if name == "onnx":
            import onnxruntime

            return onnxruntime.__version__
        import openvino

        version = openvino.get_version()
        if name == "openvino-int8":
            import nncf

            version = f"{version}+nncf{nncf.__version__}"
        return version
    except ImportError as e:
        raise ExportError(f"runtime {name!r} needs {e.name}: pip install 'defectscope[export]'") from None


def _cache_root() -> Path:
    env = os.environ.get("DEFECTSCOPE_CACHE")
    return (Path(env).expanduser() if env else Path.home() / ".cache" / "defectscope") / "runtimes"


def _files(graph: Path) -> list[Path]:
    return [graph] + ([graph.with_suffix(".bin")] if graph.suffix == ".xml" else [])


def _digest(graph: Path) -> str:
    h = hashlib.sha256()
    for f in _files(graph):
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def _model_key(model, model_dir: Optional[Path]) -> str:
    if model_dir is not None:
        cfg = json.loads((model_dir / "config.json").read_text())
        if cfg.get("config_sha256"):
            return cfg["config_sha256"][:16]
    # a model in memory: its parameters, calibration and every tensor
    h = hashlib.sha256(json.dumps({"name": model.name, "params": model.params,
                                   "calibration": model.calibration.to_dict() if model.calibration else None},
                                  sort_keys=True, default=str).encode())
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def _within_tolerance(parity: dict, model) -> Optional[str]:
    """None when ``parity`` (:func:`check_parity`) is within the tolerances, else why not."""
    cal = model.calibration
    for out, thr in (("score", cal.image_threshold if cal else None),
                     ("anomaly_map", cal.pixel_threshold if cal else None)):
        diff = parity.get(f"max_abs_{out}")
        if diff is None:
            continue
        scale = max(1.0, abs(thr)) if thr is not None else max(1.0, parity.get(f"max_{out}", 1.0))
        if diff > TOLERANCE * scale:
            return f"{out} differs by {diff:.3g} (tolerance {TOLERANCE * scale:.3g})"
    if parity.get("verdicts_identical") is False:
        return "verdicts differ"
    if parity.get("mask_pixels_different") and parity["mask_pixels_different"] > MASK_TOLERANCE * parity["mask_pixels"]:
        return f"{parity['mask_pixels_different']} mask pixels differ"
    return None


@dataclass
class Runtime:
    """A model ready to run on one runtime. :meth:`run` maps images ``[B, C, S, S]`` (float in
    [0, 1], the model's size and channels) to the graph's outputs (numpy): ``score``, and when
    calibrated ``normalized`` and ``defect``; for pixel-level methods ``anomaly_map`` and, with a
    pixel threshold, ``normalized_map`` and ``mask``."""

    name: str
    model: Any
    path: Optional[Path] = None
    parity: dict = field(default_factory=dict)
    _exported: Optional[ExportedModel] = None

    def run(self, images: torch.Tensor) -> dict[str, np.ndarray]:
        if self._exported is None:
            from .export import InferenceGraph

            graph = InferenceGraph(self.model, resize=False).eval()
            with torch.no_grad():
                return {n: t.cpu().numpy() for n, t in zip(graph.output_names, graph(images.float()))}
        return self._exported.run(images)

    def predict(self, images: torch.Tensor):
        """As ``model.predict``: a :class:`~defectscope.models.base.Prediction` (raw score and map),
        so that the evaluation code runs unchanged on any runtime."""
        from ..models.base import Prediction

        if self._exported is None:
            return self.model.predict(images)
        out = self.run(images)
        amap = out.get("anomaly_map")
        return Prediction(score=torch.from_numpy(np.asarray(out["score"], dtype=np.float32)),
                          anomaly_map=None if amap is None else torch.from_numpy(np.asarray(amap, dtype=np.float32)))


def load_runtime(model, name: str = "torch", *, model_dir=None, calibration_images: Optional[torch.Tensor] = None,
                 threads: Optional[int] = None, cache_dir=None) -> Runtime:
    """``model`` (fitted) ready to run on runtime ``name`` (:data:`RUNTIMES`); see the module
    docstring for the cache and the checks. ``model_dir``: the directory it was loaded from (the
    cache goes there). ``calibration_images``: normal training images ``[N, C, S, S]`` for
    ``openvino-int8`` (needed the first time, when nothing is cached)."""
    if name not in RUNTIMES:
        raise DefectscopeError(f"unknown runtime {name!r}; use one of {', '.join(RUNTIMES)}")
    if name == "torch":
        return Runtime(name, model)
    model = model.to("cpu").eval()
    fmt, suffix = _FORMAT[name]
    version = runtime_version(name)
    model_dir = Path(model_dir) if model_dir is not None else None
    stem = f"{model.name}-{_model_key(model, model_dir)}-{name}-{version}-v{EXPORT_VERSION}".replace("/", "_")
    folder = Path(cache_dir) if cache_dir else (model_dir / "runtimes" if model_dir is not None else _cache_root())
    if model_dir is not None and cache_dir is None and not os.access(model_dir, os.W_OK):
        folder = _cache_root()  # a read-only model directory: the user's cache
    graph = folder / f"{stem}{suffix}"
    record_file = folder / f"{stem}.json"
    record = None
    if graph.is_file() and record_file.is_file():
        try:
            record = json.loads(record_file.read_text())
            if record.get("sha256") != _digest(graph):
                record = None  # modified or truncated: made again below
        except (OSError, json.JSONDecodeError):
            record = None
    if record is None:
        if name == "openvino-int8" and calibration_images is None:
            raise DefectscopeError(f"runtime openvino-int8 of {model.name}: no INT8 graph cached in {folder} and no "
                                   "calibration images; quantize it once from normal training images "
                                   "(defectscope predict MODEL_DIR IMAGES --runtime openvino-int8 "
                                   "--calibration-data SPEC [--category C])")
        folder.mkdir(parents=True, exist_ok=True)
        for f in _files(graph):
            f.unlink(missing_ok=True)
        quantize = calibration_images.float() if name == "openvino-int8" else None
        export_model(model, graph, fmt, resize=False, check=False, quantize=quantize)
        record = {"model": model.name, "runtime": name, "version": version, "sha256": _digest(graph)}
    try:
        exported = ExportedModel(graph, threads=threads)
    except ExportError as e:  # not runnable here: nothing kept that would be used next time
        for f in _files(graph) + [record_file]:
            f.unlink(missing_ok=True)
        raise ExportError(f"runtime {name} refused for {model.name}: {e}; use --runtime "
                          f"{'openvino' if name == 'openvino-int8' else 'torch'}") from None
    images = check_images(model, resize=False)
    parity = check_parity(model, exported, images, resize=False)
    parity["mask_pixels"] = int(images.shape[0] * images.shape[-1] * images.shape[-2])
    with torch.no_grad():
        pred = model.predict(images)
    parity["max_score"] = float(pred.score.abs().max())
    if pred.anomaly_map is not None:
        parity["max_anomaly_map"] = float(pred.anomaly_map.abs().max())
    why = _within_tolerance(parity, model)
    if why is not None and name != "openvino-int8":
        for f in _files(graph) + [record_file]:
            f.unlink(missing_ok=True)
        raise RuntimeMismatch(f"runtime {name} refused for {model.name}: its results differ from PyTorch's "
                              f"({why}); use --runtime torch")
    record["parity"] = parity
    tmp = record_file.with_name(record_file.name + ".tmp")
    tmp.write_text(json.dumps(record, indent=2))
    tmp.replace(record_file)
    return Runtime(name, model, graph, parity, exported)


def clear_cache(model_dir) -> None:
    """Remove the runtime graphs cached in ``model_dir`` (they are made again when needed)."""
    shutil.rmtree(Path(model_dir) / "runtimes", ignore_errors=True)
