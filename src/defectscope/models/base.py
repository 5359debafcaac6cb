"""The model contract every method follows, and the registry that names them.

A method is a class derived from :class:`AnomalyModel`, registered under a short name with
:func:`register`. Its constructor only stores hyper-parameters (defaults = the paper's, listed in
the class attribute ``defaults``); :meth:`AnomalyModel.fit` learns from a data set of normal
images (or an unlabelled mix in the blind setting); :meth:`AnomalyModel.predict` maps a batch of
images ``[B, C, H, W]`` in ``[0, 1]`` to a :class:`Prediction`.

Example::

    model = create_model("sae", epochs=5)
    model.fit(train_dataset)
    pred = model.predict(images)        # pred.score [B], pred.anomaly_map [B, H, W]
    model.save("out/sae"); model = load_model("out/sae")
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from ..errors import DefectscopeError

__all__ = ["AnomalyModel", "Prediction", "register", "create_model", "list_models", "get_model_class", "MODELS"]


@dataclass
class Prediction:
    """What a model says about a batch of images.

    Attributes:
        score: ``[B]`` float tensor, higher = more anomalous.
        anomaly_map: ``[B, H, W]`` float tensor at the input resolution, or ``None`` for methods
            that only score whole images (they never return a fake map).
    """

    score: torch.Tensor
    anomaly_map: torch.Tensor | None = None


MODELS: dict[str, type["AnomalyModel"]] = {}


def register(cls: type["AnomalyModel"]) -> type["AnomalyModel"]:
    """Class decorator: make a method available under ``cls.name`` to :func:`create_model`."""
    if not getattr(cls, "name", None):
        raise TypeError(f"{cls.__name__} has no 'name'")
    if cls.name in MODELS and MODELS[cls.name] is not cls:
        raise TypeError(f"model name {cls.name!r} registered twice")
    MODELS[cls.name] = cls
    return cls


def _ensure_loaded() -> None:
    # Importing the models package registers every method module it imports.
    from .. import models  # noqa: F401


def get_model_class(name: str) -> type["AnomalyModel"]:
    """The class registered under ``name``; a clear error listing the known names otherwise."""
    _ensure_loaded()
    key = name.strip().lower().replace("-", "_")
    if key not in MODELS:
        raise DefectscopeError(f"unknown model {name!r}; known models: {', '.join(sorted(MODELS))}")
    return MODELS[key]


def create_model(name: str, **params: Any) -> "AnomalyModel":
    """Instantiate the method registered under ``name`` with hyper-parameters ``params``."""
    return get_model_class(name)(**params)


def list_models() -> list[type["AnomalyModel"]]:
    """Every registered method class, sorted by name."""
    _ensure_loaded()
    return [MODELS[k] for k in sorted(MODELS)]


class AnomalyModel(nn.Module):
    """Base class of every method.

    Subclasses set the class attributes below, implement :meth:`_build` (create the sub-modules
    and buffers from ``self.params``), :meth:`_fit` and :meth:`_predict`.

    Class attributes:
        name: registry name (``"patchcore"``).
        paradigm: family (``"reconstruction"``, ``"memory"``, ``"distillation"``...).
        description: one line for ``defectscope models``.
        defaults: hyper-parameters and their paper defaults. Every method also has
            ``image_size`` and ``channels`` (its input) and ``seed``.
        pixel_level: False for methods that only score whole images.
    """

    name: ClassVar[str] = ""
    paradigm: ClassVar[str] = ""
    description: ClassVar[str] = ""
    defaults: ClassVar[dict[str, Any]] = {}
    pixel_level: ClassVar[bool] = True

    def __init__(self, **params: Any) -> None:
        super().__init__()
        unknown = sorted(set(params) - set(self.defaults))
        if unknown:
            raise DefectscopeError(
                f"{self.name}: unknown parameter(s) {', '.join(unknown)}; "
                f"known: {', '.join(sorted(self.defaults))}"
            )
        self.params: dict[str, Any] = {**self.defaults, **params}
        self.fitted = False
        #: The decision rule (:class:`defectscope.deploy.Calibration`), set by calibration on a
        #: validation split of the training side and saved with the model; None until then.
        self.calibration = None

    # -- what subclasses implement ------------------------------------------------------------
    def _build(self, pretrained: bool = True) -> None:
        """Create sub-modules and buffers from ``self.params`` (called by fit and by load).

        ``pretrained=False`` when loading: every tensor then comes from the saved file, so no
        pretrained weights are looked up.
        """

    def _fit(self, dataset, val_dataset=None) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def _predict(self, images: torch.Tensor) -> Prediction:  # pragma: no cover - abstract
        raise NotImplementedError

    def weights_available(self) -> tuple[bool, str]:
        """Whether the pretrained weights this method needs can be found offline, and a note."""
        return True, "no pretrained weights needed"

    # -- the contract ---------------------------------------------------------------------------
    @property
    def image_size(self) -> int:
        return int(self.params["image_size"])

    @property
    def channels(self) -> int:
        return int(self.params["channels"])

    @property
    def device(self) -> torch.device:
        for t in list(self.parameters()) + list(self.buffers()):
            return t.device
        return torch.device("cpu")

    def fit(self, dataset, val_dataset=None) -> "AnomalyModel":
        """Learn what normal looks like from ``dataset`` (items: dicts with an ``"image"``).

        ``val_dataset``, when given, holds normal images for early stopping or calibration,
        taken from the training side (never the test set).
        """
        if len(dataset) == 0:
            raise DefectscopeError(f"{self.name}: the training set is empty")
        self._build()
        self._fit(dataset, val_dataset)
        self.fitted = True
        self.eval()
        return self

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> Prediction:
        """Score a batch ``[B, C, H, W]`` (floats in [0, 1], the model's channels and size)."""
        if not self.fitted:
            raise DefectscopeError(f"{self.name}: predict() called before fit() or load")
        if images.ndim == 3:
            images = images.unsqueeze(0)
        if images.ndim != 4 or images.shape[1] != self.channels:
            raise DefectscopeError(
                f"{self.name}: expected images [B, {self.channels}, H, W], got {list(images.shape)}"
            )
        self.eval()
        pred = self._predict(images.to(self.device, torch.float32))
        score = pred.score.detach().float().cpu()
        amap = None if pred.anomaly_map is None else pred.anomaly_map.detach().float().cpu()
        return Prediction(score=score, anomaly_map=amap)

    # -- persistence (see defectscope.models.io) ------------------------------------------------
    def save(self, path) -> None:
        """Write the model to directory ``path`` (JSON config + safetensors weights)."""
        from .io import save_model

        save_model(self, path)

    def extra_config(self) -> dict[str, Any]:
        """JSON-able state learnt at fit time that is not a tensor (saved with the config)."""
        return {}

    def load_extra_config(self, extra: dict[str, Any]) -> None:
        """Restore what :meth:`extra_config` returned."""

    def __repr__(self) -> str:  # short and useful, not nn.Module's tree
        args = ", ".join(f"{k}={v!r}" for k, v in sorted(self.params.items()))
        return f"{type(self).__name__}({args})"
