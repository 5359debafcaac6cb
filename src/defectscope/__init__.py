"""defectscope: industrial visual anomaly detection, faithful methods benchmarked side by side."""

from ._version import __version__
from .errors import DefectscopeError  # noqa: E402
from .models import Prediction, create_model, list_models, load_model  # noqa: E402
from .deploy import Calibration, Inferencer  # noqa: E402

__all__ = ["__version__", "DefectscopeError", "Prediction", "create_model", "list_models", "load_model", "Calibration", "Inferencer"]
