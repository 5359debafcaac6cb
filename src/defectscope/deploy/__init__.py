"""Deployment: calibrated thresholds (:mod:`.threshold`), the :class:`Inferencer` for line
applications (:mod:`.inferencer`) and batch inference over files (:mod:`.predict`)."""

from .inferencer import Inferencer, Result, UncalibratedWarning
from .threshold import DEFAULT_FPR, Calibration, calibrate, calibrate_scores

__all__ = ["DEFAULT_FPR", "Calibration", "Inferencer", "Result", "UncalibratedWarning", "calibrate", "calibrate_scores"]
