"""Every anomaly-detection method of defectscope, one module each, behind one contract.

A method is one module in its family's folder (``models/<family>/<method>.py``); importing this
package imports every public module of every family, which registers the methods they define, so
adding a method needs no edit here or in the family's ``__init__.py``.
"""

import pkgutil
from importlib import import_module

#: The families, one folder each (a method's ``paradigm``).
FAMILIES = ("memory", "flow", "distillation", "reconstruction", "adaptation", "foundation")


def _import_methods() -> None:
    for family in FAMILIES:
        package = import_module(f"{__name__}.{family}")
        for info in pkgutil.iter_modules(package.__path__):
            if not info.name.startswith("_"):
                import_module(f"{package.__name__}.{info.name}")


_import_methods()
from .base import MODELS, AnomalyModel, FitContext, Prediction, create_model, get_model_class, list_models, register
from .calibration import Calibration
from .params import Param, Tags
from .io import load_model, save_model

__all__ = ["FAMILIES", "AnomalyModel", "Calibration", "FitContext", "Param", "Prediction", "Tags", "create_model", "get_model_class", "list_models", "register",
           "load_model", "save_model", "MODELS"]
