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

Tiling (every method, declared here once: ``tile_from``, ``tile_stride``, ``tile_merge``): with
``tile_from=S`` the data is resized to ``S`` px (:attr:`AnomalyModel.input_size`) instead of
``image_size``; :meth:`AnomalyModel.fit` cuts each training image into tiles of ``image_size`` px
(:class:`~defectscope.ops.tiling.TiledDataset`: tiles are just more training images) and
:meth:`AnomalyModel.predict` cuts the batch into tiles, runs the method's ``_predict`` on all the
tiles as one batch and stitches the tile maps back to the whole image
(:func:`~defectscope.ops.tiling.stitch_maps`, overlaps merged by ``tile_merge``). The image score
is the maximum over the tiles of the method's own tile scores. For the methods whose score is the
maximum of their map (PaDiM, STFPM, Reverse Distillation, EfficientAD, the autoencoders) that is
exactly the maximum of the stitched map when tiles do not overlap (the default stride) or merge by
``max``; with ``mean`` over overlaps it is the maximum before averaging. For the others
(PatchCore's and PatchCluster's re-weighted nearest-neighbour score, SPADE's image-level k-NN,
DFM's score of the whole feature map, FRE's summed error) and the image-only methods, it is the
method's rule applied to each tile, then the maximum: an image is as anomalous as its most
anomalous tile. A method may set ``score_from_map = True`` to get the
maximum of the stitched map instead. The methods themselves are not aware of tiling.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from ..errors import DefectscopeError
from ..training import seed_everything
from .calibration import Calibration
from .cost import Cost, estimate_fit, estimate_predict
from .params import Param, ParamError, Tags, check_params, collect

__all__ = ["AnomalyModel", "FitContext", "Prediction", "register", "create_model", "list_models", "get_model_class",
           "MODELS"]


@dataclass
class Prediction:
    """What a model says about a batch of images.

    Attributes:
        score: ``[B]`` float tensor, higher = more anomalous.
        anomaly_map: ``[B, H, W]`` float tensor at the input resolution, or ``None`` for methods
            that only score whole images (they never return a fake map).
        explanation: one text per image saying why (VLM-AD's answer; a failed image:
            ``"error: ..."`` with a NaN score), or ``None`` for methods that do not explain.
    """

    score: torch.Tensor
    anomaly_map: torch.Tensor | None = None
    explanation: list[str] | None = None


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


def _check_tiling(owner: str, p: dict[str, Any]) -> None:
    """Refuse tiling parameters that do not fit together (each alone is checked by its Param)."""
    if p.get("tile_from") is None:
        if p.get("tile_stride") is not None:
            raise ParamError(f"{owner}: tile_stride={p['tile_stride']} needs tile_from (the side images are "
                             "cut from); set tile_from, or drop tile_stride")
        return
    if p["tile_from"] < p["image_size"]:
        raise ParamError(f"{owner}: tile_from={p['tile_from']} is smaller than the tile (image_size="
                         f"{p['image_size']}); use tile_from >= image_size, or none for no tiling")
    if (p.get("tile_stride") or 0) > p["image_size"]:
        raise ParamError(f"{owner}: tile_stride={p['tile_stride']} is larger than the tile (image_size="
                         f"{p['image_size']}) and would leave pixels unseen; use tile_stride <= image_size")


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
        cost: what a fit and a prediction cost at the defaults on the reference CPU
            (:class:`~defectscope.models.cost.Cost`, measured by ``benchmarks/costs.py``).
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
        # tiling (see the module docstring and defectscope.ops.tiling)
        Param("tile_from", "int", None, "tiling: images are resized to this side and cut into tiles of image_size "
              "px; none = no tiling (images resized to image_size)", optional=True, ge=8),
        Param("tile_stride", "int", None, "tiling: step between tiles in px (<= image_size; the last tile is shifted "
              "to the border); none = image_size (no overlap)", optional=True, ge=1),
        Param("tile_merge", "str", "mean", "tiling: how the maps of overlapping tiles are merged",
              choices=("mean", "max")),
    )
    overrides: ClassVar[dict[str, Any]] = {}
    tags: ClassVar[Tags] = Tags()
    smoke: ClassVar[dict[str, Any]] = {}
    cost: ClassVar[Cost | None] = None
    param_specs: ClassVar[dict[str, Param]] = {}
    defaults: ClassVar[dict[str, Any]] = {}
    pixel_level: ClassVar[bool] = True
    #: Tiling: the image score of a tiled prediction is the maximum of the stitched map (True) or
    #: the maximum over the tiles of the method's tile scores (False, the default).
    score_from_map: ClassVar[bool] = False

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
        _check_tiling(cls.name, full)
        return {k: full[k] for k in values}

    @classmethod
    def estimate_fit(cls, params: dict[str, Any], n_train: int) -> float | None:
        """Estimated seconds of a fit with ``params`` on ``n_train`` images on the reference CPU
        (:func:`~defectscope.models.cost.estimate_fit`); None without a declared ``cost``."""
        return estimate_fit(cls, params, n_train)

    @classmethod
    def estimate_predict(cls, params: dict[str, Any]) -> float | None:
        """Estimated seconds per image of ``predict`` at batch 1 on the reference CPU."""
        return estimate_predict(cls, params)

    def __init__(self, **params: Any) -> None:
        super().__init__()
        self.params: dict[str, Any] = check_params(self.name or type(self).__name__, self.param_specs, params)
        _check_tiling(self.name or type(self).__name__, self.params)
        self.fitted = False
        #: The decision rule (:class:`~defectscope.models.calibration.Calibration`), filled in by
        #: ``defectscope.deploy.calibrate`` on validation data of the training side and saved with
        #: the model; None until then.
        self.calibration: Calibration | None = None
        #: What :meth:`fit` was told besides the images (:class:`FitContext`).
        self.context = FitContext()
        #: Labelled anomalous training images during :meth:`fit` of a supervised method, else None.
        self.train_anomalies = None

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

    # -- tiling -----------------------------------------------------------------------------------
    @property
    def tiling(self) -> bool:
        """Whether images are cut into tiles (``tile_from`` set)."""
        return self.params.get("tile_from") is not None

    @property
    def input_size(self) -> int:
        """The side images are resized to for this model: ``tile_from`` when tiling, else
        ``image_size`` (every loader of data for a model uses it)."""
        return self.params["tile_from"] if self.tiling else self.image_size

    @property
    def tile_stride(self) -> int:
        """The step between tiles (``tile_stride``, default ``image_size``: no overlap)."""
        return self.params.get("tile_stride") or self.image_size

    def _tiles_of(self, dataset):
        """``dataset`` as the dataset of its tiles (:class:`~defectscope.ops.tiling.TiledDataset`)."""
        from ..ops.tiling import TiledDataset

        try:
            return TiledDataset(dataset, self.image_size, self.tile_stride)
        except ValueError as e:
            raise DefectscopeError(f"{self.name}: cannot cut the training images into {self.image_size} px tiles "
                                   f"({e}); load them at the model's input_size ({self.input_size} px)") from None

    def _infer(self, images: torch.Tensor) -> Prediction:
        """The method's ``_predict``, through tiles when tiling is on: what :meth:`predict` runs and
        what export traces (``images [B, C, H, W]`` on the model's device; no checks).

        Tiling: the batch is cut into tiles (:func:`~defectscope.ops.tiling.tile_images`), all
        tiles go through ``_predict`` as one batch, the tile maps are stitched back
        (:func:`~defectscope.ops.tiling.stitch_maps`) and the image score is the maximum over tiles
        of the tile scores (or of the stitched map, with ``score_from_map``)."""
        if not self.tiling:
            return self._predict(images)
        from ..ops.tiling import stitch_maps, tile_grid, tile_images

        h, w = int(images.shape[-2]), int(images.shape[-1])
        ny, nx = tile_grid(h, w, self.image_size, self.tile_stride)
        pred = self._predict(tile_images(images, self.image_size, self.tile_stride))
        amap = None
        if pred.anomaly_map is not None:
            amap = stitch_maps(pred.anomaly_map, (h, w), self.image_size, self.tile_stride, self.params["tile_merge"])
        if self.score_from_map and amap is not None:
            score = amap.flatten(1).amax(dim=1)
        else:
            score = pred.score.reshape(-1, ny * nx).amax(dim=1)
        return Prediction(score=score, anomaly_map=amap)

    @property
    def device(self) -> torch.device:
        for t in itertools.chain(self.parameters(), self.buffers()):  # the first one; no list of all
            return t.device
        return torch.device("cpu")

    def fit(self, dataset=None, val_dataset=None, *, context: FitContext | None = None,
            anomalies=None) -> "AnomalyModel":
        """Learn what normal looks like from ``dataset`` (items: dicts with an ``"image"``).

        ``val_dataset``, when given, holds normal images for early stopping or calibration,
        taken from the training side (never the test set). ``context``: the setting and the
        categories (:class:`FitContext`). A method tagged zero-shot may be fitted with no data set
        (``dataset=None`` or empty); every other method refuses that.

        ``anomalies``: labelled anomalous TRAINING images (never the test set), for a method tagged
        ``supervised`` (:class:`~defectscope.models.params.Tags`): a data set whose items are dicts
        with an ``"image"`` (at the model's :attr:`input_size`) and optionally a ``"mask"``
        (``[1, H, W]`` or ``[H, W]``; absent or all zero = an image-level label only). The other
        methods refuse them, and so does a tiled fit (the masks are not cut into tiles). The method
        reads them as ``self.train_anomalies`` in ``_fit`` (None when not given or empty).
        """
        self.context = context or FitContext()
        if anomalies is not None and len(anomalies) == 0:
            anomalies = None
        if anomalies is not None and not self.tags.supervised:
            able = ", ".join(n for n in sorted(MODELS) if MODELS[n].tags.supervised) or "none"
            raise DefectscopeError(f"{self.name}: cannot use labelled anomalous training images (not a supervised "
                                   f"method; those that are: {able})")
        if anomalies is not None and self.tiling:
            raise DefectscopeError(f"{self.name}: labelled anomalous training images cannot be used with tiling "
                                   f"(tile_from={self.params['tile_from']}): their masks are not cut into tiles; "
                                   "drop tile_from or the anomalies")
        self.train_anomalies = anomalies
        if dataset is None or len(dataset) == 0:
            if "zero-shot" not in self.tags.settings:
                raise DefectscopeError(f"{self.name}: the training set is empty (this method is not zero-shot: "
                                       "it needs normal training images)")
            dataset = None
        if self.tiling and dataset is not None:
            dataset = self._tiles_of(dataset)
            if val_dataset is not None and len(val_dataset):
                val_dataset = self._tiles_of(val_dataset)
        seed_everything(self.params["seed"])  # what _build draws (initial weights) depends on the seed only
        self._build()
        try:
            self._fit(dataset, val_dataset)
        finally:
            self.train_anomalies = None  # read by _fit only: the model keeps no reference to the images
        self.fitted = True
        self.freeze()
        return self

    def freeze(self) -> "AnomalyModel":
        """Evaluation mode with no parameter requiring a gradient: the state of a fitted model and
        of a loaded one alike (with ``requires_grad``, ``F.linear`` takes another kernel whose last
        bits differ, so a reloaded model would not score exactly as the one in memory). A new
        ``fit`` rebuilds the networks, trainable again."""
        self.requires_grad_(False)
        return self.eval()

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> Prediction:
        """Score a batch ``[B, C, H, W]`` (floats in [0, 1], the model's channels and
        :attr:`input_size`); with tiling, the maps come back at the whole image's size."""
        if not self.fitted:
            raise DefectscopeError(f"{self.name}: predict() called before fit() or load")
        if images.ndim == 3:
            images = images.unsqueeze(0)
        if images.ndim != 4 or images.shape[1] != self.channels:
            raise DefectscopeError(
                f"{self.name}: expected images [B, {self.channels}, H, W], got {list(images.shape)}"
            )
        if self.tiling and min(images.shape[-2:]) < self.image_size:
            raise DefectscopeError(f"{self.name}: expected images of at least {self.image_size} px a side to cut into "
                                   f"tiles, got {list(images.shape)}; resize them to the model's input_size "
                                   f"({self.input_size} px)")
        self.eval()
        pred = self._infer(images.to(self.device, torch.float32))
        score = pred.score.detach().float().cpu()
        amap = None if pred.anomaly_map is None else pred.anomaly_map.detach().float().cpu()
        return Prediction(score=score, anomaly_map=amap,
                          explanation=None if pred.explanation is None else [str(t) for t in pred.explanation])

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
