"""The model contract every method follows, and the registry that names them.

A method is a class derived from :class:`AnomalyModel`, registered under a short name with
:func:`register`. It declares its hyper-parameters once (:class:`~defectscope.models.params.Param`
in ``hparams``: type, the paper's default, allowed values, meaning) and its capabilities
(:class:`~defectscope.models.params.Tags` in ``tags``). Its constructor only converts and checks the
hyper-parameters; :meth:`AnomalyModel.fit` learns from a data set of normal images (an unlabelled
mix in the blind setting, the union of categories in the multi-class setting, a few images in the
few-shot setting, nothing but the context in the zero-shot setting);
:meth:`AnomalyModel.predict` maps a batch of images ``[B, C, H, W]`` in ``[0, 1]`` to a
:class:`Prediction`.

Example::

    model = create_model("sae", epochs=5)
    model.fit(train_dataset)
    pred = model.predict(images)        # pred.score [B], pred.anomaly_map [B, H, W]
    model.save("out/sae"); model = load_model("out/sae")
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from ..errors import DefectscopeError
from ..training import seed_everything
from .calibration import Calibration
from .params import Param, Tags, check_params, collect

__all__ = ["AnomalyModel", "FitContext", "Prediction", "register", "create_model", "list_models", "get_model_class",
           "MODELS"]


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


@dataclass(frozen=True)
class FitContext:
    """What a method may know besides its training images.

    Attributes:
        setting: the learning setting (``"one-class"``, ``"multi-class"``, ``"few-shot"``,
            ``"zero-shot"``, ``"blind-mix"``...).
        categories: the categories the training images come from (one, or several in the
            multi-class setting; a zero-shot method's only input, e.g. for its text prompts).
    """

    setting: str = "one-class"
    categories: tuple[str, ...] = field(default_factory=tuple)


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


def list_models(**tags: Any) -> list[type["AnomalyModel"]]:
    """Every registered method class whose tags match ``tags``, sorted by name.

    ``list_models(setting="zero-shot")``, ``list_models(trains=False, pixel_level=True)``: the
    filters are :meth:`Tags.matches`; ``paradigm="memory"`` filters by family.
    """
    _ensure_loaded()
    family = tags.pop("paradigm", None)
    return [MODELS[k] for k in sorted(MODELS)
            if MODELS[k].tags.matches(**tags) and (family is None or MODELS[k].paradigm == family)]


class AnomalyModel(nn.Module):
    """Base class of every method.

    Subclasses set the class attributes below, implement :meth:`_build` (create the sub-modules
    and buffers from ``self.params``), :meth:`_fit` and :meth:`_predict`.

    Class attributes:
        name: registry name (``"patchcore"``).
        paradigm: family (``"memory"``, ``"flow"``, ``"distillation"``, ``"reconstruction"``,
            ``"adaptation"``, ``"foundation"``): the folder of its module.
        description: one line for ``defectscope models``.
        paper: the paper (or source) it implements; notes: its defaults and every deviation from the
            paper, in a sentence or two (both feed the README's methods table).
        hparams: the method's own :class:`Param` declarations (the shared ones, declared here and
            on the family base classes, are inherited).
        overrides: ``{name: default}`` for an inherited parameter whose paper default differs.
        tags: what it can do (:class:`Tags`).
        smoke: parameter values for the tiniest meaningful fit (seconds on a CPU), used by the
            conformance suite (``tests/test_conformance.py``) and nowhere else.
        param_specs, defaults, pixel_level: derived from the above when the class is created.
    """

    name: ClassVar[str] = ""
    paradigm: ClassVar[str] = ""
    description: ClassVar[str] = ""
    paper: ClassVar[str] = ""
    notes: ClassVar[str] = ""
    hparams: ClassVar[tuple[Param, ...]] = (
        Param("image_size", "int", 256, "input side in pixels (images are resized to it, no crop)", ge=8),
        Param("channels", "int", 3, "input channels: 3 = RGB, 1 = grayscale", choices=(1, 3)),
        Param("seed", "int", 0, "random seed of everything the fit draws", ge=0),
        Param("device", "str", None, "torch device (cpu, cuda, cuda:1...); none = CUDA when present, else CPU",
              optional=True),
        Param("blur_sigma", "float", 4.0, "sigma of the Gaussian blur of the anomaly map (0 = none)", ge=0),
    )
    overrides: ClassVar[dict[str, Any]] = {}
    tags: ClassVar[Tags] = Tags()
    smoke: ClassVar[dict[str, Any]] = {}
    param_specs: ClassVar[dict[str, Param]] = {}
    defaults: ClassVar[dict[str, Any]] = {}
    pixel_level: ClassVar[bool] = True

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls.param_specs = collect(cls)
        cls.defaults = {n: p.default for n, p in cls.param_specs.items()}
        cls.pixel_level = cls.tags.pixel_level
        bad = sorted(set(cls.smoke) - set(cls.param_specs))
        if bad:
            raise TypeError(f"{cls.__name__}: smoke names undeclared parameter(s) {bad}")

    @classmethod
    def convert_params(cls, values: dict[str, Any]) -> dict[str, Any]:
        """``values`` (from Python, JSON or the command line) converted and checked against the
        declarations, without the defaults: what a benchmark cell records as its parameters."""
        full = check_params(cls.name, cls.param_specs, values)
        return {k: full[k] for k in values}

    def __init__(self, **params: Any) -> None:
        super().__init__()
        self.params: dict[str, Any] = check_params(self.name or type(self).__name__, self.param_specs, params)
        self.fitted = False
        #: The decision rule (:class:`~defectscope.models.calibration.Calibration`), filled in by
        #: ``defectscope.deploy.calibrate`` on validation data of the training side and saved with
        #: the model; None until then.
        self.calibration: Calibration | None = None
        #: What :meth:`fit` was told besides the images (:class:`FitContext`).
        self.context = FitContext()

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

    def check_weights(self) -> None:
        """Raise the one-line error that names the weights file expected and where to put it, when
        the pretrained weights this method needs are absent; called before any work (loading data,
        fitting) by the CLI and the benchmark. Default: nothing needed."""

    # -- the contract ---------------------------------------------------------------------------
    @property
    def image_size(self) -> int:
        return self.params["image_size"]

    @property
    def channels(self) -> int:
        return self.params["channels"]

    @property
    def device(self) -> torch.device:
        for t in list(self.parameters()) + list(self.buffers()):
            return t.device
        return torch.device("cpu")

    def fit(self, dataset=None, val_dataset=None, *, context: FitContext | None = None) -> "AnomalyModel":
        """Learn what normal looks like from ``dataset`` (items: dicts with an ``"image"``).

        ``val_dataset``, when given, holds normal images for early stopping or calibration,
        taken from the training side (never the test set). ``context``: the setting and the
        categories (:class:`FitContext`). A method tagged zero-shot may be fitted with no data set
        (``dataset=None`` or empty); every other method refuses that.
        """
        self.context = context or FitContext()
        if dataset is None or len(dataset) == 0:
            if "zero-shot" not in self.tags.settings:
                raise DefectscopeError(f"{self.name}: the training set is empty (this method is not zero-shot: "
                                       "it needs normal training images)")
            dataset = None
        seed_everything(self.params["seed"])  # what _build draws (initial weights) depends on the seed only
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
