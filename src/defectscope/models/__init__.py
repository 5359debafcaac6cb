"""Every anomaly-detection method of defectscope, one module each, behind one contract."""

from . import dae, padim, patchcore, sae  # noqa: F401  (importing registers the methods)
from . import fre, reverse_distillation, stfpm  # noqa: F401  (distillation family)
from . import efficientad  # noqa: F401  (distillation family: EfficientAD)
from . import dfkde, dfm, gaussian_ad, spade  # noqa: F401  (feature-statistics memory family)
from . import patchcluster  # noqa: F401  (blind setting)
from .base import MODELS, AnomalyModel, Prediction, create_model, get_model_class, list_models, register
from .io import load_model, save_model

__all__ = ["AnomalyModel", "Prediction", "create_model", "get_model_class", "list_models", "register",
           "load_model", "save_model", "MODELS"]
