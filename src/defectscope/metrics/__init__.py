"""Evaluation metrics of anomaly detection, exact with ties and vectorised.

Image level (one score per image, ``[N]``) and pixel level (anomaly maps ``[N, H, W]`` against
ground-truth masks):

* :func:`roc_curve`, :func:`auroc`, :func:`image_auroc`, :func:`pixel_auroc` -- area under the
  ROC curve (equals ``sklearn.metrics.roc_auc_score``);
* :func:`average_precision` -- the step-sum average precision of
  ``sklearn.metrics.average_precision_score``;
* :func:`f1_max`, :func:`f1_max_threshold` -- the best F1 over all thresholds (and where);
* :func:`aupro` -- the normalised area under the per-region-overlap curve up to FPR 0.3
  (Bergmann et al., "The MVTec Anomaly Detection Dataset", IJCV 2021);
* :func:`compute_metrics` -- all of them at once, as a dict.

Inputs may be numpy arrays or torch tensors of any float dtype; labels and masks are anything
castable to bool (non-zero = anomalous); a sample is anomalous at threshold ``t`` when
``score >= t``. Scalar metrics return Python floats, NaN when undefined (a single class
present). Shapes that disagree, and NaN or inf scores, raise ``ValueError``.
"""

from .pro import aupro
from .ranking import (
    auroc,
    average_precision,
    f1_max,
    f1_max_threshold,
    image_auroc,
    pixel_auroc,
    roc_curve,
)
from .summary import METRIC_KEYS, compute_metrics

__all__ = [
    "METRIC_KEYS",
    "aupro",
    "auroc",
    "average_precision",
    "compute_metrics",
    "f1_max",
    "f1_max_threshold",
    "image_auroc",
    "pixel_auroc",
    "roc_curve",
]
