"""AUPRO: the normalised area under the per-region-overlap curve.

Definition (Bergmann, Batzner, Fauser, Sattlegger, Steger, "The MVTec Anomaly Detection Dataset:
A Comprehensive Real-World Dataset for Unsupervised Anomaly Detection", IJCV 129, 2021; and the
official MVTec AD evaluation code, ``compute_pro`` / ``trapezoid``):

* The ground-truth regions are the connected components of each mask, with 8-connectivity
  (``scipy.ndimage.label`` with a 3x3 structure of ones), found image by image.
* At a threshold ``t`` (a pixel is anomalous when ``score >= t``):
  ``FPR(t)`` = fraction of *all* normal pixels of *all* images with ``score >= t``;
  ``PRO(t)`` = mean over *all* regions of
  (pixels of the region with ``score >= t``) / (region size).
* The curve has one point per distinct score, starts at ``(0, 0)`` and ends at ``(1, 1)``.
  ``PRO`` is integrated over ``FPR`` from 0 to ``fpr_limit`` with the trapezoid rule, the curve
  being interpolated linearly exactly at ``fpr_limit``, and the area is divided by
  ``fpr_limit`` so that a perfect detector scores 1.

Computation, with no loop over thresholds (only over images, for the connected components):
``FPR`` only changes at thresholds equal to a normal score, and a stretch of the curve where
``FPR`` does not change has no area, so the exact area is the sum, over the distinct normal
scores ``v``, of the trapezoid from ``(FPR(>v), PRO(>v))`` to ``(FPR(>=v), PRO(>=v))`` (cut at
``fpr_limit``). The normal scores need only a plain sort (no index array), and only the highest
``fpr_limit`` fraction of them, which ``np.partition`` finds first; the counts ``FPR(>=v)`` are
positions in that sorted array. The defect pixels (a few percent) are argsorted; each carries
the weight ``1 / size(its region)``; a binary search puts each defect pixel among the distinct
normal scores, ``np.bincount`` adds the weights per slot and a reversed cumulative sum gives
``K * PRO`` at every ``v`` at once.
The result equals the official code's (which argsorts all pixels together and takes the
cumulative sums at the end of each group of tied scores) to rounding.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage

from ._inputs import maps_and_masks

NAN = float("nan")
_STRUCTURE = np.ones((3, 3), dtype=bool)


def component_weights(masks: np.ndarray) -> tuple[np.ndarray, int]:
    """Weights of the anomalous pixels, and the number of ground-truth regions.

    Args:
        masks: bool array ``[N, H, W]``.

    Returns:
        ``(weights, n_regions)``: ``weights`` (float64) holds, for every ``True`` pixel in the
        order of ``maps[masks]``, one over the size of its 8-connected region in its own image.
    """
    parts = []
    n_regions = 0
    for i in range(masks.shape[0]):
        mask = masks[i]
        if not mask.any():
            continue
        labelled, n = ndimage.label(mask, structure=_STRUCTURE)
        sizes = np.bincount(labelled.ravel())
        inverse = 1.0 / np.maximum(sizes, 1)
        parts.append(inverse[labelled[mask]])
        n_regions += int(n)
    weights = np.concatenate(parts) if parts else np.empty(0, dtype=np.float64)
    return weights, n_regions


def check_fpr_limit(fpr_limit) -> float:
    try:
        limit = float(fpr_limit)
    except (TypeError, ValueError):
        raise ValueError(f"fpr_limit must be a number in (0, 1], got {fpr_limit!r}") from None
    if not 0.0 < limit <= 1.0:
        raise ValueError(f"fpr_limit must be in (0, 1], got {fpr_limit!r}")
    return limit


def top_normal_scores(neg: np.ndarray, fpr_limit: float) -> np.ndarray:
    """Every normal score that can matter below ``fpr_limit``, sorted ascending.

    Returns all the scores ``>= c``, where ``c`` is the ``(ceil(fpr_limit * n) + 2)``-th largest
    one; any lower score ``v`` has ``FPR(>v) > fpr_limit``. ``neg`` is reordered in place.
    """
    n = neg.size
    needed = math.ceil(fpr_limit * n) + 2
    if needed >= n:
        neg.sort()
        return neg
    k = n - needed
    neg.partition(k)
    cut = neg[k]
    top = np.concatenate((neg[:k][neg[:k] == cut], neg[k:]))
    top.sort()
    return top


def aupro_core(
    neg_top: np.ndarray,
    n_neg: int,
    pos: np.ndarray,
    weights: np.ndarray,
    n_regions: int,
    fpr_limit: float,
) -> float:
    """AUPRO from prepared arrays (see the module docstring).

    Args:
        neg_top: normal scores sorted ascending, holding every normal score ``>= c`` for some
            ``c`` low enough that ``FPR(>=c) >= fpr_limit`` (or all of them).
        n_neg: the total number of normal pixels.
        pos: the scores of all anomalous pixels, in any order (ascending is much faster).
        weights: their weights ``1 / region size``, in the same order.
        n_regions: the number of ground-truth regions.
        fpr_limit: upper integration limit, in (0, 1].
    """
    if n_regions == 0 or n_neg == 0:
        return NAN
    # Only the highest normal scores can start a segment below fpr_limit (see top_normal_scores).
    needed = math.ceil(fpr_limit * n_neg) + 2
    if needed < neg_top.size:
        first = int(np.searchsorted(neg_top, neg_top[neg_top.size - needed], side="left"))
        higher = neg_top.size - first
    else:
        first, higher = 0, neg_top.size
    top = neg_top[first:]

    # The distinct normal scores v_0 < v_1 < ... (ascending) and FPR just above / at each.
    starts = np.flatnonzero(np.concatenate(([True], top[1:] != top[:-1])))
    ends = np.append(starts[1:], higher)
    x0 = (higher - ends) / n_neg  # FPR(> v)
    keep = x0 < fpr_limit
    starts, x0 = starts[keep], x0[keep]
    x1 = (higher - starts) / n_neg  # FPR(>= v)
    values = top[starts]
    n_values = values.size

    # A defect pixel of score p counts in PRO(>= v_j) for j < #(values <= p) and in PRO(> v_j)
    # for j < #(values < p): bucket the weights by those counts, then take suffix sums.
    def pro_at(side: str) -> np.ndarray:
        bucket = np.searchsorted(values, pos, side=side)
        per_bucket = np.bincount(bucket, weights=weights, minlength=n_values + 1)
        suffix = np.cumsum(per_bucket[::-1])[::-1]  # suffix[k] = sum of per_bucket[k:]
        return np.minimum(suffix[1:] / n_regions, 1.0)  # entry j: suffix[j + 1]

    y1 = pro_at("right")  # PRO(>= v)
    y0 = pro_at("left")  # PRO(> v)

    # Each segment runs from (x0, y0) to (x1, y1) with x1 > x0; the one crossing fpr_limit is
    # cut there, with y interpolated linearly.
    xr = np.minimum(x1, fpr_limit)
    cut = x1 > fpr_limit
    yr = y1.copy()
    yr[cut] = y0[cut] + (y1[cut] - y0[cut]) * (fpr_limit - x0[cut]) / (x1[cut] - x0[cut])
    area = float(np.sum((xr - x0) * (y0 + yr))) / 2.0
    return area / fpr_limit


def aupro(maps, masks, fpr_limit: float = 0.3) -> float:
    """Normalised area under the per-region-overlap (PRO) curve up to a false positive rate.

    The localisation metric of Bergmann et al., "The MVTec Anomaly Detection Dataset: A
    Comprehensive Real-World Dataset for Unsupervised Anomaly Detection" (IJCV 2021; also
    CVPR 2019), computed exactly as the official MVTec AD evaluation code does: regions are
    the 8-connected components of each ground-truth mask; at each distinct threshold the FPR is
    over all normal pixels of all images and the PRO is the mean, over all regions, of the
    fraction of the region scoring ``>= threshold``; the curve, from ``(0, 0)``, is integrated
    with the trapezoid rule up to ``fpr_limit`` (interpolating at ``fpr_limit``) and divided by
    ``fpr_limit``. Every region counts equally, whatever its size.

    Args:
        maps: anomaly maps ``[N, H, W]`` (or one ``[H, W]`` map), numpy or torch, any float
            dtype; higher means more anomalous.
        masks: ground truth of the same shape, castable to bool (non-zero = defect).
        fpr_limit: upper limit of the integration, in (0, 1]; 0.3 is the usual one.

    Returns:
        A Python float in [0, 1]; NaN when there is no defect pixel or no normal pixel.

    Raises:
        ValueError: shapes that differ or are not ``[N, H, W]``, non-finite scores, or a
            ``fpr_limit`` outside (0, 1].
    """
    limit = check_fpr_limit(fpr_limit)
    maps, masks = maps_and_masks(maps, masks)
    weights, n_regions = component_weights(masks)
    n_neg = masks.size - weights.size
    if n_regions == 0 or n_neg == 0:
        return NAN
    pos = maps[masks]
    order = np.argsort(pos, kind="stable")  # sorted queries make the binary searches fast
    pos, weights = pos[order], weights[order]
    del order
    neg_top = top_normal_scores(maps[~masks], limit)
    return aupro_core(neg_top, n_neg, pos, weights, n_regions, limit)
