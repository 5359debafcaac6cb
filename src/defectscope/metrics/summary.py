"""All the standard metrics of an evaluation in one call, sharing the sorting work."""

from __future__ import annotations

import numpy as np

from ._inputs import maps_and_masks, scores_and_labels
from .pro import aupro_core, check_fpr_limit, component_weights
from .ranking import SortedSplit

METRIC_KEYS = (
    "image_auroc",
    "image_ap",
    "image_f1_max",
    "pixel_auroc",
    "pixel_ap",
    "pixel_f1_max",
    "aupro",
)


def compute_metrics(
    scores=None, labels=None, maps=None, masks=None, fpr_limit: float = 0.3
) -> dict[str, float | None]:
    """Image-level and pixel-level metrics of an anomaly detector on a test set.

    Args:
        scores: image anomaly scores ``[N]`` (numpy or torch, any float dtype), or None.
        labels: image labels ``[N]``, castable to bool (non-zero = anomalous), or None.
        maps: anomaly maps ``[N, H, W]``, or None.
        masks: ground-truth masks ``[N, H, W]``, castable to bool (non-zero = defect), or None.
        fpr_limit: FPR limit of the AUPRO integration (default 0.3).

    Returns:
        A dict with the keys ``image_auroc``, ``image_ap``, ``image_f1_max`` (see
        :func:`~defectscope.metrics.auroc`, :func:`~defectscope.metrics.average_precision`,
        :func:`~defectscope.metrics.f1_max`), ``pixel_auroc``, ``pixel_ap``, ``pixel_f1_max``
        (the same metrics over all pixels) and ``aupro`` (:func:`~defectscope.metrics.aupro`).
        The image ones are None when ``scores``/``labels`` are None, the pixel ones when
        ``maps``/``masks`` are None; undefined values (a single class present) are NaN.

    Raises:
        ValueError: one of a pair given without the other, shapes that differ, or non-finite
            scores.
    """
    out: dict[str, float | None] = dict.fromkeys(METRIC_KEYS)
    if (scores is None) != (labels is None):
        raise ValueError("scores and labels must be given together (or both left out)")
    if (maps is None) != (masks is None):
        raise ValueError("maps and masks must be given together (or both left out)")

    if scores is not None:
        s, y = scores_and_labels(scores, labels)
        split = SortedSplit.from_flat(s, y)
        out["image_auroc"] = split.auroc()
        out["image_ap"] = split.average_precision()
        out["image_f1_max"] = split.f1_max_threshold()[0]

    if maps is not None:
        limit = check_fpr_limit(fpr_limit)
        m, g = maps_and_masks(maps, masks)
        weights, n_regions = component_weights(g)
        pos = m[g]
        order = np.argsort(pos, kind="stable")
        pos, weights = pos[order], weights[order]
        del order
        neg = m[~g]  # boolean indexing copies: sorting in place is safe
        neg.sort()
        out["aupro"] = aupro_core(neg, neg.size, pos, weights, n_regions, limit)
        del weights
        split = SortedSplit(neg, pos)
        out["pixel_auroc"] = split.auroc()
        out["pixel_ap"] = split.average_precision()
        out["pixel_f1_max"] = split.f1_max_threshold()[0]
    return out
