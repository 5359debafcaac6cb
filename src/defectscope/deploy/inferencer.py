"""The :class:`Inferencer`: a saved model loaded once, for embedding in a line application.

>>> from defectscope import Inferencer
>>> inf = Inferencer("models/washer")              # loads and verifies the model directory once
>>> r = inf.predict("part_0001.png")               # or a numpy array, a PIL image, a tensor
>>> r.score, r.normalized, r.defect                # raw score, 0..1 with 0.5 = threshold, verdict
>>> r.anomaly_map, r.mask                          # [H, W] float32 map and bool mask (model size)
>>> results = inf.predict([img1, img2, img3])      # a batch: a list of results, in order

A model without calibration (saved from Python before calibrating, by the benchmark, or by
``defectscope fit --val-fraction 0``) gives raw scores only: ``normalized``, ``defect`` and
``mask`` are None. The Inferencer says so once per model with an :class:`UncalibratedWarning`
(calibrate it with ``defectscope calibrate MODEL_DIR --normal DIR``).

Inputs (each goes through the preprocessing stored with the model, the same as in training: read
as float in [0, 1], channels converted, resized with antialiased bilinear filtering, no crop):

* a path (``str`` / ``os.PathLike``): read with :func:`defectscope.imageio.read_image`;
* a PIL image: :func:`defectscope.imageio.pil_to_tensor`, exactly what reading its file gives;
* a numpy array ``H x W`` (grayscale) or ``H x W x C`` with ``C`` = 1, 3 (RGB) or 4 (RGBA, alpha
  dropped), or a batch ``N x H x W x C``. ``uint8`` (and ``uint16`` grayscale) go through PIL, so
  they give exactly what the same pixels read from a PNG give; ``uint16`` colour is divided by
  65535; ``bool`` is 0/1; floats must be finite and within ``[0, 1]`` (kept) or ``[0, 255]``
  (divided by 255), the rule of the file reader;
* a torch tensor ``[C, H, W]`` or ``[N, C, H, W]``, float in ``[0, 1]``.

A list or tuple, a 4-D array or a 4-D tensor is a batch (a list of :class:`Result` comes back);
anything else is one image (one :class:`Result`). Maps and masks are at the model's input size
(``result.input_size`` is the original ``(H, W)``).

Thread safety: one Inferencer may be shared by any number of threads. Reading and preprocessing
run concurrently; the model's forward pass runs under a lock (some methods fill caches lazily on
their first call; torch already uses its intra-op threads inside each call), and a warm-up call at
load time fills those caches before the first request.
"""

from __future__ import annotations

import os
import threading
import warnings
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional, Sequence

import numpy as np
import torch

from ..imageio import pil_to_tensor
from ..data.transforms import Preprocess
from ..errors import DefectscopeError, ImageReadError

__all__ = ["Inferencer", "Result", "UncalibratedWarning", "array_to_tensor", "warn_if_uncalibrated"]


class UncalibratedWarning(UserWarning):
    """The model has no calibrated thresholds: scores are raw, with no verdict, normalised score or mask."""


_WARNED: "weakref.WeakSet" = weakref.WeakSet()  # models already warned about (once per model object)


def uncalibrated_message(model, where=None) -> str:
    """The text of the :class:`UncalibratedWarning` for ``model`` (``where``: its directory, if known)."""
    from ..data.validation import DEFAULT_VAL_FRACTION

    d = str(where) if where is not None else "MODEL_DIR"
    return (f"{model.name}{f' ({where})' if where is not None else ''}: the model has no calibrated thresholds: "
            "scores are raw, with no verdict (defect, normalized score and mask are None); calibrate it with "
            f"'defectscope calibrate {d} --normal DIR' (DIR: normal images not used for training), or fit it with "
            f"'defectscope fit' and its default --val-fraction {DEFAULT_VAL_FRACTION:g}")


def warn_if_uncalibrated(model, where=None, stacklevel: int = 2) -> bool:
    """Issue one :class:`UncalibratedWarning` per model object without calibration; True if uncalibrated."""
    if getattr(model, "calibration", None) is not None:
        return False
    try:
        seen = model in _WARNED
    except TypeError:  # not weak-referenceable: warn every time
        seen = False
    if not seen:
        try:
            _WARNED.add(model)
        except TypeError:
            pass
        warnings.warn(uncalibrated_message(model, where), UncalibratedWarning, stacklevel=stacklevel + 1)
    return True


@dataclass
class Result:
    """What the Inferencer says about one image.

    Attributes:
        score: raw image score (the model's scale; higher = more anomalous).
        normalized: ``sigmoid((score - t) / scale)`` in (0, 1), 0.5 at the threshold (None if the
            model has no calibration).
        defect: the verdict, ``score >= threshold`` (None if the model has no calibration).
        anomaly_map: ``[H, W]`` float32 raw map at the model's input size (None for image-only
            methods); ``normalized_map`` the same through the pixel normalisation (0.5 = pixel
            threshold); ``mask``: ``[H, W]`` bool, ``anomaly_map >= pixel threshold``.
        source: the path, for path inputs; ``input_size``: the input's ``(H, W)`` before resizing.
        image: the preprocessed input ``[C, H, W]`` (only with ``keep_inputs=True`` or ``"original"``);
            ``original``: the input as read, ``[C, H, W]`` in [0, 1] before resizing (only with
            ``keep_inputs="original"``).
        error: why this input could not be scored (the other fields are then None / NaN): an
            unreadable input (:meth:`Inferencer.stream` only), or a method that failed on this
            image alone (VLM-AD: the server's error; its score is NaN).
        explanation: the method's words on this image (VLM-AD's answer), or None for methods that
            do not explain.
    """

    score: float
    normalized: Optional[float] = None
    defect: Optional[bool] = None
    anomaly_map: Optional[np.ndarray] = None
    normalized_map: Optional[np.ndarray] = None
    mask: Optional[np.ndarray] = None
    source: Optional[str] = None
    input_size: Optional[tuple] = None
    image: Optional[torch.Tensor] = None
    error: Optional[str] = None
    original: Optional[torch.Tensor] = None
    explanation: Optional[str] = None

    @property
    def verdict(self) -> str:
        """``"defect"``, ``"good"``, ``""`` (not calibrated) or ``"error"``."""
        if self.error is not None:
            return "error"
        return "" if self.defect is None else ("defect" if self.defect else "good")


def _float_range(arr: np.ndarray) -> np.ndarray:
    a = arr.astype(np.float32, copy=False)
    if a.size and not np.all(np.isfinite(a)):
        raise ImageReadError("image array contains NaN or infinite values")
    lo, hi = (float(a.min()), float(a.max())) if a.size else (0.0, 0.0)
    if lo >= 0.0 and hi <= 1.0:
        return a
    if lo >= 0.0 and hi <= 255.0:
        return a / 255.0
    raise ImageReadError(f"float image array with values {lo:g}..{hi:g} outside [0, 1] and [0, 255]; "
                         "rescale it to [0, 1]")


def array_to_tensor(arr: np.ndarray, channels: int) -> torch.Tensor:
    """One numpy image (``H x W`` or ``H x W x C``, C in 1/3/4) -> float ``[channels, H, W]`` in [0, 1].

    ``uint8`` and grayscale ``uint16`` go through PIL (the file reader's own conversion); other
    dtypes are scaled as the module docstring says. Raises :class:`ImageReadError` otherwise.
    """
    from PIL import Image

    from ..data.transforms import to_channels

    a = np.asarray(arr)
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[:, :, 0]
    if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[2] not in (3, 4)):
        raise ImageReadError(f"image array of shape {a.shape}: expected H x W or H x W x C with C = 1, 3 or 4 "
                             "(a batch: N x H x W x C or a list)")
    if a.shape[0] == 0 or a.shape[1] == 0:
        raise ImageReadError(f"image array of shape {a.shape} is empty")
    if a.dtype == np.uint8 or (a.dtype == np.uint16 and a.ndim == 2):
        return pil_to_tensor(Image.fromarray(np.ascontiguousarray(a)), channels, path="<array>")
    if a.dtype == np.bool_:
        f = a.astype(np.float32)
    elif a.dtype == np.uint16:
        f = a.astype(np.float32) / 65535.0
    elif a.dtype.kind == "f":
        f = _float_range(a)
    elif a.dtype.kind in "iu":
        lo, hi = int(a.min()), int(a.max())
        if lo < 0 or hi > 65535:
            raise ImageReadError(f"integer image array with values {lo}..{hi}; use uint8, uint16 or float in [0, 1]")
        f = a.astype(np.float32) / (255.0 if hi <= 255 else 65535.0)
    else:
        raise ImageReadError(f"image array of dtype {a.dtype}; use uint8, uint16 or float in [0, 1]")
    t = torch.from_numpy(np.ascontiguousarray(f))
    t = t[None] if t.ndim == 2 else t[:, :, :3].permute(2, 0, 1)
    return to_channels(t.contiguous(), channels)


def _is_batch(x: Any) -> bool:
    if isinstance(x, (list, tuple)):
        return True
    return isinstance(x, (np.ndarray, torch.Tensor)) and x.ndim == 4


class Inferencer:
    """A fitted model with its preprocessing and calibration, ready to score images.

    Args:
        model: a model directory (loaded and verified once) or a fitted :class:`AnomalyModel`.
        device: ``"cpu"``, ``"cuda"``...; default: CUDA when present, else CPU.
        warmup: run one blank image through the model at load time (fills lazy caches, so the
            first real request is not slower).
        runtime: ``torch`` (the model's own predict), ``onnx``, ``openvino`` or ``openvino-int8``
            (its exported graph, cached in the model directory and checked against PyTorch: see
            :mod:`defectscope.deploy.runtime`); ``calibration_images``: normal training images for
            a first ``openvino-int8`` quantization.
    """

    def __init__(self, model, device: str | None = None, warmup: bool = True, runtime: str = "torch",
                 calibration_images=None) -> None:
        from ..training import auto_device
        from ..models.base import AnomalyModel
        from ..models.io import load_model

        dev = auto_device(device)
        if isinstance(model, AnomalyModel):
            if not model.fitted:
                raise DefectscopeError(f"{model.name}: the Inferencer needs a fitted model")
            self.model = model.to(dev).eval()
        else:
            self.model = load_model(model).to(dev).eval()  # loaded on the CPU, then moved whole
        self.source = None if isinstance(model, AnomalyModel) else str(model)
        self.preprocess = Preprocess(self.model.input_size, self.model.channels)  # tile_from when tiling
        self.calibration = self.model.calibration
        warn_if_uncalibrated(self.model, self.source, stacklevel=2)
        self.runtime = None
        if runtime != "torch":
            from .runtime import load_runtime

            if dev.type != "cpu":
                raise DefectscopeError(f"runtime {runtime} runs on the CPU; leave --device out or use runtime torch")
            self.runtime = load_runtime(self.model, runtime, model_dir=self.source,
                                        calibration_images=calibration_images)
        self._lock = threading.Lock()
        if warmup and not getattr(self.model, "remote", False):  # no blank image sent to a model server
            self.predict(torch.zeros(self.model.channels, *self.preprocess.image_size))

    def __repr__(self) -> str:
        cal = self.calibration.describe() if self.calibration else "not calibrated"
        rt = f", runtime {self.runtime.name}" if self.runtime is not None else ""
        return f"Inferencer({self.model.name}, {self.preprocess.image_size}, {cal}{rt})"

    # -- inputs -----------------------------------------------------------------------------------
    def load(self, x: Any) -> tuple[torch.Tensor, tuple, Optional[str]]:
        """One input -> (preprocessed ``[C, H, W]``, original ``(H, W)``, source path or None)."""
        return self._load(x)[:3]

    def _load(self, x: Any) -> tuple[torch.Tensor, tuple, Optional[str], torch.Tensor]:
        """:meth:`load`, plus the input as read (``[C, H, W]`` in [0, 1], before resizing)."""
        from PIL import Image

        source = None
        c = self.model.channels
        if isinstance(x, (str, os.PathLike)):
            from ..imageio import read_image

            source = str(x)
            t = read_image(Path(x), c)
        elif isinstance(x, Image.Image):
            t = pil_to_tensor(x, c)
        elif isinstance(x, np.ndarray):
            t = array_to_tensor(x, c)
        elif isinstance(x, torch.Tensor):
            if x.ndim != 3 or x.shape[0] not in (1, 3) or not x.is_floating_point():
                raise ImageReadError(f"image tensor {x.dtype} {list(x.shape)}: expected float [C, H, W], C = 1 or 3")
            t = x.detach().cpu().float()
            if t.numel() and not (torch.isfinite(t).all() and t.min() >= 0 and t.max() <= 1):
                raise ImageReadError("image tensor values must be finite and within [0, 1]")
        else:
            raise ImageReadError(f"cannot read an image from a {type(x).__name__}; pass a path, a numpy array, "
                                 "a PIL image or a tensor")
        size = tuple(int(v) for v in t.shape[-2:])
        return self.preprocess(t), size, source, t

    # -- scoring ----------------------------------------------------------------------------------
    def predict_tensor(self, images: torch.Tensor) -> list[Result]:
        """Score preprocessed images ``[B, C, H, W]`` (the model's size and channels)."""
        if self.runtime is not None:
            return self._from_graph(self.runtime.run(images))
        with self._lock:
            pred = self.model.predict(images)
        cal = self.calibration
        score = pred.score
        norm = cal.normalize(score).tolist() if cal else [None] * len(score)
        defect = cal.verdict(score).tolist() if cal else [None] * len(score)
        amap = pred.anomaly_map
        nmap = mask = None
        if amap is not None and cal is not None and cal.pixel_threshold is not None:
            nmap, mask = cal.normalize_map(amap).numpy(), cal.mask(amap).numpy()
        amap = amap.numpy() if amap is not None else None
        words = pred.explanation
        results = [Result(score=float(score[i]), normalized=norm[i], defect=defect[i],
                          anomaly_map=None if amap is None else amap[i],
                          normalized_map=None if nmap is None else nmap[i],
                          mask=None if mask is None else mask[i],
                          explanation=None if words is None else words[i]) for i in range(len(score))]
        for r in results:  # a method that failed on one image (VLM-AD): NaN score, no verdict, the reason
            if r.score != r.score:
                r.normalized = r.defect = None
                r.error = (r.explanation or "").removeprefix("error: ") or "the method gave no score"
        return results

    def _from_graph(self, out: dict) -> list[Result]:
        """Results from the outputs of an exported graph (the calibration is inside it)."""
        n = len(out["score"])

        def get(key, i, cast=None):
            if key not in out:
                return None
            v = out[key][i]
            return cast(v) if cast else v

        return [Result(score=float(out["score"][i]), normalized=get("normalized", i, float),
                       defect=get("defect", i, bool), anomaly_map=get("anomaly_map", i),
                       normalized_map=get("normalized_map", i), mask=get("mask", i)) for i in range(n)]

    def predict(self, x: Any, keep_inputs=False):
        """Score one image (a :class:`Result`) or a batch (a list of them); see the module doc.

        A bad input raises :class:`~defectscope.errors.DefectscopeError` naming it; use
        :meth:`stream` to score many inputs where bad ones are reported and skipped.
        """
        if not _is_batch(x):
            return self._score([self._load(x)], keep_inputs)[0]
        items = list(x)
        if not items:
            return []
        return self._score([self._load(item) for item in items], keep_inputs)

    def _score(self, loaded: Sequence[tuple], keep_inputs) -> list[Result]:
        results = self.predict_tensor(torch.stack([t for t, _, _, _ in loaded]))
        for r, (t, size, source, original) in zip(results, loaded):
            r.input_size, r.source = size, source
            if keep_inputs:
                r.image = t
            if keep_inputs == "original":
                r.original = original
        return results

    def stream(self, inputs: Iterable[Any], batch_size: int = 8, keep_inputs=False) -> Iterator[Result]:
        """Score any number of inputs lazily, in order, holding at most ``batch_size`` of them.

        An input that cannot be read gives a :class:`Result` with ``error`` set (and ``score``
        NaN) and the stream goes on; errors other than bad input propagate.
        """
        if batch_size < 1:
            raise DefectscopeError(f"batch size must be >= 1, got {batch_size}")
        pending: list = []  # in input order: (loaded tuple) or an error Result
        n_ok = 0
        for x in inputs:
            try:
                pending.append(self._load(x))
                n_ok += 1
            except DefectscopeError as e:
                src = str(x) if isinstance(x, (str, os.PathLike)) else None
                pending.append(Result(score=float("nan"), source=src, error=str(e)))
            if n_ok >= batch_size:
                yield from self._flush(pending, keep_inputs)
                pending, n_ok = [], 0
        yield from self._flush(pending, keep_inputs)

    def _flush(self, pending: list, keep_inputs) -> Iterator[Result]:
        loaded = [p for p in pending if not isinstance(p, Result)]
        scored = iter(self._score(loaded, keep_inputs) if loaded else [])
        for p in pending:
            yield p if isinstance(p, Result) else next(scored)
