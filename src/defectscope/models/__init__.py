"""Every anomaly-detection method of defectscope, one module each, behind one contract."""

from . import adaptation, distillation, flow, foundation, memory, reconstruction  # noqa: F401  (registers)
from .base import MODELS, AnomalyModel, FitContext, Prediction, create_model, get_model_class, list_models, register
from .calibration import Calibration
from .params import Param, Tags
from .io import load_model, save_model

__all__ = ["AnomalyModel", "Calibration", "FitContext", "Param", "Prediction", "Tags", "create_model", "get_model_class", "list_models", "register",
           "load_model", "save_model", "MODELS"]
