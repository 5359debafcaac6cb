"""The decision rule a model carries: calibrated thresholds and the normalised score.

A plain value type that travels with the model (saved in its ``config.json``); it is *filled in*
by :func:`defectscope.deploy.calibrate` on validation data of the training side, and read by the
Inferencer, ``predict`` and export. It lives here, beside the model contract, so that models and
their files need nothing from ``deploy/``. See :mod:`defectscope.deploy.threshold` for how the
thresholds are learnt.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any, Mapping, Optional

import torch

from ..errors import DefectscopeError, ModelFileError

__all__ = ["Calibration", "normalize", "DEFAULT_FPR", "METHODS"]

#: Default false-alarm rate for thresholds learnt from normal images only (1 % of normal images).
DEFAULT_FPR = 0.01

#: How a threshold is learnt: at a false-alarm rate on normal images, F1-optimal with labelled
#: anomalies, or a-contrario (log10 NFA < 0, for a map that is -log10 NFA).
METHODS = ("fpr", "f1", "nfa")


def normalize(score: torch.Tensor, threshold: float, scale: float) -> torch.Tensor:
    """``sigmoid((score - threshold) / scale)``: 0.5 at the threshold; any shape, pure torch."""
    return torch.sigmoid((score - threshold) / scale)


@dataclass(frozen=True)
class Calibration:
    """A model's decision rule, learnt on validation data of the training side.

    Attributes:
        image_threshold: raw image score at and above which an image is a defect.
        image_scale: scale of the normalisation (``> 0``): ``sigmoid((s - t) / scale)``.
        pixel_threshold: raw map value at and above which a pixel is in the mask (``None`` for
            methods without maps).
        pixel_scale: the maps' normalisation scale (``None`` without maps).
        method: ``"fpr"`` (normal images only), ``"f1"`` (labelled anomalies given) or ``"nfa"``
            (the a-contrario threshold of a map that is ``-log10 NFA``, U-Flow's: both thresholds
            0, i.e. log10 NFA < 0, learnt from no image at all); the pixel threshold's method is
            ``pixel_method`` (``"f1"`` needs masks).
        fpr: the false-alarm rate asked for (``None`` for ``"f1"`` and ``"nfa"``); ``pixel_fpr`` likewise.
        n_normal, n_anomalous: validation images used.
        val_fpr: false-alarm rate reached on the normal validation images; ``val_f1``: F1 on the
            validation images (``None`` without anomalies); ``val_pixel_fpr`` / ``val_pixel_f1``
            the same for pixels.
    """

    image_threshold: float
    image_scale: float
    pixel_threshold: Optional[float] = None
    pixel_scale: Optional[float] = None
    method: str = "fpr"
    pixel_method: Optional[str] = None
    fpr: Optional[float] = DEFAULT_FPR
    pixel_fpr: Optional[float] = None
    n_normal: int = 0
    n_anomalous: int = 0
    val_fpr: Optional[float] = None
    val_f1: Optional[float] = None
    val_pixel_fpr: Optional[float] = None
    val_pixel_f1: Optional[float] = None

    def __post_init__(self) -> None:
        for name in ("image_threshold", "image_scale"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ValueError(f"calibration: {name} must be a finite number, got {v!r}")
        if self.image_scale <= 0:
            raise ValueError(f"calibration: image_scale must be > 0, got {self.image_scale!r}")
        if (self.pixel_threshold is None) != (self.pixel_scale is None):
            raise ValueError("calibration: pixel_threshold and pixel_scale go together")
        if self.pixel_threshold is not None:
            if not (math.isfinite(self.pixel_threshold) and math.isfinite(self.pixel_scale) and self.pixel_scale > 0):
                raise ValueError(f"calibration: bad pixel threshold/scale {self.pixel_threshold!r}/{self.pixel_scale!r}")
        if self.method not in METHODS:
            raise ValueError(f"calibration: method must be one of {', '.join(map(repr, METHODS))}, got {self.method!r}")

    # -- the rule ---------------------------------------------------------------------------------
    def normalize(self, score: torch.Tensor) -> torch.Tensor:
        """Normalised image scores (any shape), 0.5 at :attr:`image_threshold`. Pure torch."""
        return normalize(score, self.image_threshold, self.image_scale)

    def normalize_map(self, amap: torch.Tensor) -> torch.Tensor:
        """Normalised anomaly maps (any shape), 0.5 at :attr:`pixel_threshold`. Pure torch."""
        if self.pixel_threshold is None:
            raise DefectscopeError("this calibration has no pixel threshold (the model makes no maps)")
        return normalize(amap, self.pixel_threshold, self.pixel_scale)

    def verdict(self, score: torch.Tensor) -> torch.Tensor:
        """``score >= image_threshold`` (bool, same shape): True = defect."""
        return score >= self.image_threshold

    def mask(self, amap: torch.Tensor) -> torch.Tensor:
        """``amap >= pixel_threshold`` (bool, same shape): the defect mask."""
        if self.pixel_threshold is None:
            raise DefectscopeError("this calibration has no pixel threshold (the model makes no maps)")
        return amap >= self.pixel_threshold

    # -- JSON -------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict (all fields); inverse of :meth:`from_dict`."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], source: object = "calibration") -> "Calibration":
        """Rebuild from :meth:`to_dict`; a missing or invalid field raises :class:`ModelFileError`."""
        if not isinstance(d, Mapping):
            raise ModelFileError(f"{source}: calibration is not a JSON object")
        known = {f.name for f in fields(cls)}
        try:
            return cls(**{k: v for k, v in d.items() if k in known})
        except (TypeError, ValueError) as e:
            raise ModelFileError(f"{source}: invalid calibration ({e}); re-run 'defectscope calibrate'") from None

    def describe(self) -> str:
        """One line for people: the rule and how it was learnt."""
        if self.method == "nfa":
            how = ("a-contrario: log10 NFA < 0, expected false detections per normal image <= 1 under the "
                   "null hypothesis; no validation image needed")
        elif self.method == "f1":
            how = f"F1-optimal on {self.n_normal} normal + {self.n_anomalous} anomalous validation images"
        else:
            how = f"false-alarm rate <= {self.fpr:g} on {self.n_normal} normal validation images"
        px = "" if self.pixel_threshold is None else f", pixel threshold {self.pixel_threshold:.6g} ({self.pixel_method})"
        return f"image threshold {self.image_threshold:.6g} ({how}){px}"
