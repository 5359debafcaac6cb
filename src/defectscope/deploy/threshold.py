"""Calibrated thresholds and normalised scores, stored with the model.

A model's raw scores have no fixed scale (a PaDiM image score may be 13.6, an autoencoder's 0.002).
:func:`calibrate` turns them into a decision learnt on a **validation split taken from the
training side** (never the test set), and a normalised score in ``(0, 1)`` whose 0.5 is the
threshold:

* **Image threshold** ``t``: with labelled anomalous validation images, the F1-optimal threshold
  (:func:`defectscope.metrics.f1_max_threshold`, moved down to the midpoint towards the next lower
  validation score, which keeps the same F1 and leaves a margin); otherwise, from normal images
  only, the lowest threshold that keeps the false-alarm rate on the normal validation images at or
  below ``fpr`` (default :data:`DEFAULT_FPR` = 1 %): with ``k = floor(fpr * n)`` allowed false
  alarms among ``n`` normal scores, ``t`` lies midway between the ``(k+1)``-th and the ``k``-th
  largest normal score (above the largest, by half the last gap, when ``k = 0``).
* **Pixel (mask) threshold** ``t_px``, separately, the same way over the pixels of the anomaly
  maps: F1-optimal over the pixels when anomalous validation images come with masks, otherwise at
  the pixel false-alarm rate ``pixel_fpr`` (default: ``fpr``) over the pixels of the normal
  validation maps.
* **Normalisation** (one formula for scores and maps, pure torch, traceable by an ONNX exporter)::

      normalised(s) = sigmoid((s - t) / scale)        # exactly 0.5 at s = t
      scale = (t - median of the normal validation scores) / ln 9

  so the typical normal image scores 0.1, the threshold 0.5, and the scale never saturates or
  clips (unlike min-max normalisation, which flags everything once a score exceeds the
  validation maximum). If the threshold is not above the normal median (a model that cannot
  separate), ``scale`` falls back to the standard deviation of the validation scores.
* **A-contrario** (``threshold="nfa"``, U-Flow only): for a model whose map is ``-log10 NFA``
  (Tailanian et al.: the number of false alarms of the region around each pixel under the null
  hypothesis that the image is normal), both thresholds are 0, i.e. a detection where
  ``log10 NFA < 0`` (NFA below ``epsilon = 1``), and an image is a defect when it has one. The
  guarantee is the a-contrario one: under the null hypothesis the expected number of false
  detections per image is at most ``epsilon = 1``. Nothing is learnt from images (no validation
  image is needed; normal ones, when given, only set the normalisation scale and report the
  false-alarm rates reached). A method offers it by declaring ``log_nfa_map = (parameter, value)``,
  the parameter value that makes its map and score ``-log10 NFA`` (:func:`use_nfa_map` sets it).
* **Verdict**: ``score >= t`` is a defect (the convention of :mod:`defectscope.metrics`), the same
  as ``normalised >= 0.5`` up to float rounding at the threshold itself; a mask pixel is a
  defect when ``map >= t_px``.

Example::

    cal = calibrate(model, normal_val)                 # or anomalous=labelled_val_set
    cal.normalize(torch.tensor([cal.image_threshold])) # tensor([0.5])
    model.calibration = cal; model.save("out/model")   # stored in config.json
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from ..errors import DefectscopeError
from ..models.calibration import DEFAULT_FPR, Calibration, normalize

__all__ = ["DEFAULT_FPR", "Calibration", "calibrate", "calibrate_scores", "calibrate_nfa", "normalize",
           "fpr_threshold", "f1_threshold", "check_rate", "use_nfa_map", "THRESHOLDS", "MAX_CALIBRATION_PIXELS"]

#: The threshold rules :func:`calibrate` offers: ``"auto"`` (F1-optimal with labelled anomalies,
#: else at a false-alarm rate on normal images) and ``"nfa"`` (a-contrario, log10 NFA < 0).
THRESHOLDS = ("auto", "nfa")

#: At most this many pixel scores enter a pixel quantile (a seeded random subset beyond it).
MAX_CALIBRATION_PIXELS = 1 << 23
_LN9 = math.log(9.0)  # sigmoid(-ln 9) = 0.1: where the median normal score lands


# -- thresholds from scores --------------------------------------------------------------------------
def _as_float_array(x, name: str) -> np.ndarray:
    a = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    a = a.astype(np.float64, copy=False).ravel()
    if a.size and not np.all(np.isfinite(a)):
        raise DefectscopeError(f"calibration: {name} contain NaN or infinite values")
    return a


def _strictly_above(value: float, t: float) -> float:
    """``t`` as float32 (the dtype scores come in), nudged up if rounding put it at ``value``."""
    t32 = np.float32(t)
    if t32 <= np.float32(value):
        t32 = np.nextafter(np.float32(value), np.float32(np.inf))
    return float(t32)


def check_rate(rate, name: str = "false-alarm rate") -> None:
    """Raise :class:`DefectscopeError` unless ``rate`` is None or in ``[0, 1)``."""
    if rate is not None and not (isinstance(rate, (int, float)) and 0.0 <= rate < 1.0):
        raise DefectscopeError(f"{name} must be in [0, 1) (0.01 = 1 %), got {rate!r}")


def fpr_threshold(normal_scores, fpr: float = DEFAULT_FPR) -> float:
    """Lowest-risk threshold with false-alarm rate ``<= fpr`` on ``normal_scores``.

    With ``k = floor(fpr * n)`` allowed false alarms, the result lies midway between the
    ``(k+1)``-th largest score (which must stay below it) and the ``k``-th largest (which may be
    flagged); for ``k = 0``, above the maximum by half the gap to the second largest. So the
    fraction of ``normal_scores >= threshold`` is at most ``fpr``.
    """
    check_rate(fpr)
    s = np.sort(_as_float_array(normal_scores, "normal scores"))[::-1]
    if s.size == 0:
        raise DefectscopeError("calibration needs at least one normal validation image")
    k = int(math.floor(fpr * s.size + 1e-9))
    lo = s[k]  # must stay below the threshold
    if k >= 1:
        hi = s[k - 1]
    else:
        gap = s[0] - s[1] if s.size > 1 else 0.0
        hi = lo + (gap if gap > 0 else max(abs(lo), 1.0) * 1e-6)
    return _strictly_above(lo, lo + 0.5 * (hi - lo))


def f1_threshold(scores, labels) -> tuple[float, float]:
    """F1-optimal threshold ``(f1, t)``: :func:`defectscope.metrics.f1_max_threshold`'s threshold
    moved down to the midpoint towards the next lower score (same F1 on these scores, a margin
    below the lowest flagged anomaly)."""
    from ..metrics import f1_max_threshold

    s = _as_float_array(scores, "scores")
    y = np.asarray(labels.cpu().numpy() if isinstance(labels, torch.Tensor) else labels).ravel().astype(bool)
    f1, t = f1_max_threshold(s, y)
    if not math.isfinite(t):
        raise DefectscopeError("F1 calibration needs both normal and anomalous validation images")
    below = s[s < t]
    if below.size:
        lower = float(below.max())
        t = _strictly_above(lower, lower + 0.5 * (t - lower))  # float32 midpoint: still <= t
    return float(f1), float(t)


def _scale(threshold: float, normal: np.ndarray, every: np.ndarray) -> float:
    """``(t - median(normal)) / ln 9``, else the spread of ``every``, else a tiny positive number."""
    med = float(np.median(normal)) if normal.size else threshold
    scale = (threshold - med) / _LN9
    if not scale > 0:
        scale = float(np.std(every)) if every.size > 1 else 0.0
    if not scale > 0:
        scale = max(abs(threshold), 1.0) * 1e-6
    return float(scale)


def _subsample(a: np.ndarray, limit: int, seed: int = 0) -> np.ndarray:
    if a.size <= limit:
        return a
    return a[np.random.default_rng(seed).choice(a.size, size=limit, replace=False)]


def calibrate_scores(normal_scores, anomalous_scores=None, *, normal_maps=None, anomalous_maps=None,
                     anomalous_masks=None, fpr: float = DEFAULT_FPR, pixel_fpr: float | None = None) -> Calibration:
    """The :class:`Calibration` of validation predictions (see the module docstring).

    Args:
        normal_scores: ``[N]`` raw image scores of normal validation images.
        anomalous_scores: ``[M]`` raw scores of labelled anomalous validation images, or None /
            empty for the normal-only rule at ``fpr``.
        normal_maps: ``[N, H, W]`` maps of the normal images (None for image-only methods).
        anomalous_maps, anomalous_masks: ``[M, H, W]`` maps and 0/1 masks of the anomalous images;
            with masks that mark some defect pixels the pixel threshold is F1-optimal, else it is
            set at ``pixel_fpr`` (default ``fpr``) on the normal maps' pixels.
    """
    pixel_fpr = fpr if pixel_fpr is None else pixel_fpr
    normal = _as_float_array(normal_scores, "normal scores")
    anomal = _as_float_array(anomalous_scores if anomalous_scores is not None else [], "anomalous scores")
    if normal.size == 0:
        raise DefectscopeError("calibration needs at least one normal validation image")
    if anomal.size:
        val_f1, t = f1_threshold(np.concatenate([normal, anomal]),
                                 np.concatenate([np.zeros(normal.size, bool), np.ones(anomal.size, bool)]))
        method, used_fpr = "f1", None
    else:
        t, val_f1, method, used_fpr = fpr_threshold(normal, fpr), None, "fpr", float(fpr)
    everything = np.concatenate([normal, anomal])
    cal: dict[str, Any] = dict(
        image_threshold=t, image_scale=_scale(t, normal, everything), method=method, fpr=used_fpr,
        n_normal=int(normal.size), n_anomalous=int(anomal.size),
        val_fpr=float(np.mean(normal >= t)), val_f1=val_f1,
    )
    if normal_maps is not None:
        npix = _subsample(_as_float_array(normal_maps, "normal maps"), MAX_CALIBRATION_PIXELS)
        masks = None if anomalous_masks is None else _as_float_array(anomalous_masks, "masks") > 0
        if anomalous_maps is not None and masks is not None and masks.any():
            apix = _as_float_array(anomalous_maps, "anomalous maps")
            if apix.size != masks.size:
                raise DefectscopeError(f"calibration: {apix.size} map pixels but {masks.size} mask pixels")
            keep = _subsample(np.arange(apix.size), MAX_CALIBRATION_PIXELS, seed=1)
            apix, masks = apix[keep], masks[keep]
            pix_f1, tp = f1_threshold(np.concatenate([npix, apix]),
                                      np.concatenate([np.zeros(npix.size, bool), masks]))
            cal.update(pixel_method="f1", val_pixel_f1=pix_f1)
        else:
            tp = fpr_threshold(npix, pixel_fpr)
            cal.update(pixel_method="fpr", pixel_fpr=float(pixel_fpr))
        cal.update(pixel_threshold=tp, pixel_scale=_scale(tp, npix, npix),
                   val_pixel_fpr=float(np.mean(npix >= tp)))
    return Calibration(**cal)


def use_nfa_map(model) -> None:
    """Switch ``model`` to its ``-log10 NFA`` map (its ``log_nfa_map`` parameter value), or raise
    the error that says which methods offer the a-contrario threshold. The map is read at
    prediction only, so a fitted model may be switched."""
    decl = getattr(type(model), "log_nfa_map", None)
    if not decl:
        from ..models import list_models

        offer = [c.name for c in list_models() if getattr(c, "log_nfa_map", None)]
        raise DefectscopeError(f"{model.name} has no a-contrario (NFA) map, so --threshold nfa does not apply to it; "
                               f"it is offered by: {', '.join(offer) or 'no method'}. Use the default threshold "
                               "(--threshold auto: a false-alarm rate on normal images, or F1 with --val-anomalies)")
    name, value = decl
    if model.params.get(name) != value:
        model.params[name] = model.param_specs[name].convert(value, model.name)


def calibrate_nfa(normal_scores=None, normal_maps=None) -> Calibration:
    """The a-contrario :class:`Calibration` of a model whose scores and maps are ``-log10 NFA``:
    both thresholds 0 (a detection where log10 NFA < 0). ``normal_scores`` / ``normal_maps``, when
    given (normal validation images), only set the normalisation scales and the false-alarm rates
    reported; without them the scale is 1 (one decade of NFA)."""
    normal = _as_float_array(normal_scores if normal_scores is not None else [], "normal scores")
    cal: dict[str, Any] = dict(image_threshold=0.0, method="nfa", fpr=None, n_normal=int(normal.size),
                               image_scale=_scale(0.0, normal, normal) if normal.size else 1.0,
                               val_fpr=float(np.mean(normal >= 0.0)) if normal.size else None,
                               pixel_threshold=0.0, pixel_method="nfa", pixel_scale=1.0)
    if normal_maps is not None:
        npix = _subsample(_as_float_array(normal_maps, "normal maps"), MAX_CALIBRATION_PIXELS)
        if npix.size:
            cal.update(pixel_scale=_scale(0.0, npix, npix), val_pixel_fpr=float(np.mean(npix >= 0.0)))
    return Calibration(**cal)


def calibrate(model, normal, anomalous=None, *, fpr: float = DEFAULT_FPR, pixel_fpr: float | None = None,
              batch_size: int = 16, threshold: str = "auto") -> Calibration:
    """Predict the validation data sets with ``model`` and return their :class:`Calibration`.

    ``normal``: a data set of normal validation images (items with ``"image"``), taken from the
    training side, never the test set. ``anomalous``: optional data set of labelled anomalous
    validation images (items with ``"image"`` and, for an F1-optimal pixel threshold, ``"mask"``;
    a data set with ``has_masks == False`` gives the pixel threshold at ``pixel_fpr``).
    ``threshold="nfa"``: the a-contrario threshold (see the module docstring): ``model`` is switched
    to its ``-log10 NFA`` map (:func:`use_nfa_map`); ``normal`` may then be None or empty, and
    ``anomalous`` is refused (nothing is learnt from labels).
    """
    from ..engine.evaluate import predict_dataset

    if threshold not in THRESHOLDS:
        raise DefectscopeError(f"unknown threshold rule {threshold!r}; use one of {', '.join(THRESHOLDS)}")
    if threshold == "nfa":
        if anomalous is not None and len(anomalous):
            raise DefectscopeError("--threshold nfa is unsupervised (log10 NFA < 0): it takes no labelled anomalous "
                                   "images; drop --val-anomalies, or use --threshold auto for an F1-optimal threshold")
        use_nfa_map(model)
        if normal is None or len(normal) == 0:
            return calibrate_nfa()
        n = predict_dataset(model, normal, batch_size, desc="calibrate (normal)")
        return calibrate_nfa(n["scores"], n["maps"])
    if normal is None or len(normal) == 0:
        raise DefectscopeError("calibration needs normal validation images (use a validation split > 0)")
    n = predict_dataset(model, normal, batch_size, desc="calibrate (normal)")
    a = None
    if anomalous is not None and len(anomalous):
        a = predict_dataset(model, anomalous, batch_size, desc="calibrate (anomalous)")
    with_masks = a is not None and a["maps"] is not None and getattr(anomalous, "has_masks", True)
    return calibrate_scores(
        n["scores"], a["scores"] if a is not None else None,
        normal_maps=n["maps"], anomalous_maps=a["maps"] if with_masks else None,
        anomalous_masks=a["masks"] if with_masks else None, fpr=fpr, pixel_fpr=pixel_fpr,
    )
