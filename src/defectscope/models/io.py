"""Saving and loading models: a directory with ``config.json`` and ``weights.safetensors``.

Nothing is ever unpickled: tensors go through safetensors, everything else through JSON. The
config records the model name, its hyper-parameters, the backbone id, the library versions that
wrote it, the input preprocessing, the calibrated thresholds (:class:`defectscope.models.calibration.Calibration`,
``null`` if not calibrated), the SHA-256 of the weights file and the SHA-256 of the config itself
(``config_sha256``, over its canonical JSON without that key). Loading verifies both checksums and
the format version and refuses a tampered, truncated, mismatched or newer file with a clear error.
Writing is atomic: the directory is written under a temporary name and renamed into place.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..errors import ModelFileError
from .base import AnomalyModel, get_model_class
from .calibration import Calibration

FORMAT = "defectscope-model"
FORMAT_VERSION = 2  # 2: config_sha256, calibration, backbone (version 1 files still load)
CONFIG = "config.json"
WEIGHTS = "weights.safetensors"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _config_digest(config: dict) -> str:
    """SHA-256 of the canonical JSON of ``config`` without its ``config_sha256`` key."""
    body = {k: v for k, v in config.items() if k != "config_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def versions() -> dict[str, str]:
    """Versions of defectscope and of the libraries that shape its numbers."""
    import numpy

    from .._version import __version__

    return {"defectscope": __version__, "torch": torch.__version__.split("+")[0], "numpy": numpy.__version__}


def save_model(model: AnomalyModel, path) -> Path:
    """Write ``model`` to the directory ``path`` atomically; returns the path."""
    if not model.fitted:
        raise ModelFileError(f"{model.name}: cannot save a model that has not been fitted")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        save_file(tensors, str(tmp / WEIGHTS))
        config = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "model": model.name,
            "params": model.params,
            "extra": model.extra_config(),
            "preprocess": {**input_spec(model),
                           "value_range": [0.0, 1.0], "resize": "bilinear, antialiased, no crop"},
            "backbone": _backbone_id(model),
            "calibration": model.calibration.to_dict() if getattr(model, "calibration", None) else None,
            "versions": versions(),
            "sha256": {WEIGHTS: _sha256(tmp / WEIGHTS)},
        }
        config["config_sha256"] = _config_digest(config)
        (tmp / CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True))
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def input_spec(model: AnomalyModel) -> dict:
    """``{"image_size": [H, W], "channels": C}``: the input a model expects, as its config stores
    it (the form :meth:`defectscope.data.Preprocess.from_dict` reads). With tiling, the size is
    ``tile_from`` (:attr:`~defectscope.models.base.AnomalyModel.input_size`), not the tile's."""
    return {"image_size": [model.input_size, model.input_size], "channels": model.channels}


def _stored_input(pre: dict) -> dict:
    size = pre.get("image_size")
    size = [size, size] if isinstance(size, int) else (list(size) if size is not None else None)
    return {"image_size": size, "channels": int(pre.get("channels", 3))}


def _backbone_id(model: AnomalyModel) -> dict | None:
    """``{"name", "layers"}`` of a model built on a pretrained backbone, else None."""
    name = model.params.get("backbone")
    if not name:
        return None
    layers = getattr(model, "layers", None)
    return {"name": str(name), "layers": list(layers) if layers is not None else None}


def read_config(path) -> dict:
    """The verified ``config.json`` of a model directory."""
    path = Path(path)
    cfg_file = path / CONFIG
    if not path.is_dir():
        raise ModelFileError(f"{path}: no such model directory (make one with 'defectscope fit')")
    if not cfg_file.is_file():
        raise ModelFileError(f"{cfg_file}: missing; {path} is not a defectscope model directory")
    try:
        config = json.loads(cfg_file.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelFileError(f"{cfg_file}: not valid JSON ({e}); the model directory is damaged") from None
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise ModelFileError(f"{cfg_file}: not a defectscope model config")
    if int(config.get("format_version", 0)) > FORMAT_VERSION:
        raise ModelFileError(
            f"{cfg_file}: written by a newer defectscope (format {config['format_version']}, "
            f"this one reads {FORMAT_VERSION}); upgrade defectscope"
        )
    if int(config.get("format_version", 0)) >= 2 and config.get("config_sha256") != _config_digest(config):
        raise ModelFileError(f"{cfg_file}: checksum mismatch; the config was modified after it was saved "
                             "(save the model again, or re-run 'defectscope calibrate' to change its threshold)")
    for key in ("model", "params"):
        if key not in config:
            raise ModelFileError(f"{cfg_file}: no {key!r} entry; the model directory is damaged")
    return config


def load_model(path, map_location: str | torch.device = "cpu") -> AnomalyModel:
    """Load a model saved with :func:`save_model`, verifying its checksum; never unpickles."""
    path = Path(path)
    config = read_config(path)
    weights = path / WEIGHTS
    if not weights.is_file():
        raise ModelFileError(f"{weights}: missing; the model directory is incomplete")
    expected = config.get("sha256", {}).get(WEIGHTS)
    if expected and _sha256(weights) != expected:
        raise ModelFileError(f"{weights}: checksum mismatch; the file was modified or truncated")
    try:
        tensors = load_file(str(weights), device=str(map_location))
    except (SafetensorError, OSError, ValueError) as e:
        raise ModelFileError(f"{weights}: unreadable ({e})") from None
    model = get_model_class(config["model"])(**config.get("params", {}))
    model._build(pretrained=False)
    _assign_state(model, tensors, weights)
    model.load_extra_config(config.get("extra", {}))
    pre = config.get("preprocess") or {}
    if pre and _stored_input(pre) != input_spec(model):
        raise ModelFileError(f"{path / CONFIG}: preprocessing {pre} does not match the model's parameters "
                             f"(input size {model.input_size}, channels {model.channels}); the directory is damaged")
    if config.get("calibration") is not None:
        model.calibration = Calibration.from_dict(config["calibration"], source=path / CONFIG)
    model.fitted = True
    return model.freeze()


def _assign_state(model: AnomalyModel, tensors: dict[str, torch.Tensor], source: Path) -> None:
    """Load ``tensors`` into ``model``; buffers whose shape depends on the data are resized."""
    own = model.state_dict()
    missing = sorted(set(own) - set(tensors))
    extra = sorted(set(tensors) - set(own))
    if missing or extra:
        raise ModelFileError(
            f"{source}: does not match model {model.name!r} "
            f"(missing {missing[:3]}, unexpected {extra[:3]})"
        )
    buffers = dict(model.named_buffers())
    for key, value in tensors.items():
        if key in buffers and buffers[key].shape != value.shape:
            module_name, _, attr = key.rpartition(".")
            module = model.get_submodule(module_name) if module_name else model
            module._buffers[attr] = torch.empty_like(value)
    try:
        model.load_state_dict(tensors, strict=True)
    except RuntimeError as e:
        raise ModelFileError(f"{source}: does not match model {model.name!r}: {str(e).splitlines()[0]}") from None
