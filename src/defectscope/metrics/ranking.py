"""Threshold-free ranking metrics: ROC curve, AUROC, average precision, F1-max.

Conventions shared by every function here:

* A sample (image or pixel) is called anomalous at threshold ``t`` when ``score >= t``; a higher
  score means "more anomalous".
* Labels (or masks) are anything castable to ``bool``: non-zero means anomalous (positive).
* Inputs may be numpy arrays or torch tensors of any floating dtype and any shape, as long as
  scores and labels have the same shape; they are flattened.
* Every metric is exact with ties: the curves have one point per *distinct* score.
* Undefined cases (a single class present, or no samples) give ``float('nan')`` rather than an
  error; NaN or inf in the scores raise ``ValueError``.

The scalar metrics never build the full curve: the scores of the negatives and of the positives
are sorted separately (a plain sort, no index array) and every count "how many negatives score
``>= t``" is a binary search into the sorted negatives. This is exact, vectorised, and light on
memory for pixel-level evaluation (tens of millions of pixels).
"""

from __future__ import annotations

import numpy as np

from ._inputs import scores_and_labels

NAN = float("nan")


class SortedSplit:
    """The scores of the negatives and of the positives, each sorted ascending.

    Built once and shared by every scalar metric (and by AUPRO through :mod:`.pro`).
    """

    __slots__ = ("neg", "pos")

    def __init__(self, neg: np.ndarray, pos: np.ndarray):
        self.neg = neg
        self.pos = pos

    @classmethod
    def from_flat(cls, scores: np.ndarray, labels: np.ndarray) -> "SortedSplit":
        neg = scores[~labels]  # boolean indexing copies, so sorting in place is safe
        neg.sort()
        pos = scores[labels]
        pos.sort()
        return cls(neg, pos)

    def defined(self) -> bool:
        return self.neg.size > 0 and self.pos.size > 0

    def positive_groups(self):
        """For each distinct positive score ``u`` (ascending): ``(u, n_pos == u, TP(u), FP(u))``.

        ``TP(u)`` and ``FP(u)`` count the positives and negatives with ``score >= u``.
        """
        pos, neg = self.pos, self.neg
        n_pos = pos.size
        starts = np.flatnonzero(np.concatenate(([True], pos[1:] != pos[:-1])))
        values = pos[starts]
        counts = np.diff(np.append(starts, n_pos))
        tp = n_pos - starts
        fp = neg.size - np.searchsorted(neg, values, side="left")
        return values, counts, tp, fp

    def auroc(self) -> float:
        if not self.defined():
            return NAN
        # Mann-Whitney U with ties counted as one half: identical to the trapezoid under the
        # exact ROC curve (one point per distinct score), computed in integers.
        below = np.searchsorted(self.neg, self.pos, side="left").sum(dtype=np.int64)
        below_or_tied = np.searchsorted(self.neg, self.pos, side="right").sum(dtype=np.int64)
        return (int(below) + int(below_or_tied)) / (2 * self.pos.size * self.neg.size)

    def average_precision(self) -> float:
        if not self.defined():
            return NAN
        # Recall only moves at thresholds equal to a positive score, so the sum over all
        # distinct thresholds reduces to the distinct positive scores.
        _, counts, tp, fp = self.positive_groups()
        return float(np.sum(counts * (tp / (tp + fp))) / self.pos.size)

    def f1_max_threshold(self) -> tuple[float, float]:
        if not self.defined():
            return NAN, NAN
        # F1 = 2 TP / (TP + FP + P). Between two consecutive positive scores TP is constant and
        # FP only grows as the threshold drops, so the best threshold is a positive score.
        values, _, tp, fp = self.positive_groups()
        f1 = 2.0 * tp / (tp + fp + self.pos.size)
        j = f1.size - 1 - int(np.argmax(f1[::-1]))  # the highest threshold among ties
        return float(f1[j]), float(values[j])


def _split(scores, labels, name_s="scores", name_l="labels") -> SortedSplit:
    s, y = scores_and_labels(scores, labels, name_s, name_l)
    return SortedSplit.from_flat(s, y)


def roc_curve(scores, labels) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Exact receiver operating characteristic curve.

    One point per distinct score, in order of decreasing threshold, preceded by ``(0, 0)`` at
    threshold ``+inf``: the same arrays as ``sklearn.metrics.roc_curve(labels, scores,
    drop_intermediate=False)``.

    Args:
        scores: anomaly scores, any shape (flattened); higher means more anomalous.
        labels: same shape, castable to bool (non-zero = anomalous).

    Returns:
        ``(fpr, tpr, thresholds)`` float64 numpy arrays; point ``i`` classifies
        ``score >= thresholds[i]`` as anomalous. ``fpr`` (``tpr``) is all NaN when there are no
        negatives (positives).
    """
    s, y = scores_and_labels(scores, labels)
    order = np.argsort(s, kind="stable")[::-1]
    s_sorted = s[order]
    y_sorted = y[order]
    del order
    ends = np.append(np.flatnonzero(s_sorted[1:] != s_sorted[:-1]), s_sorted.size - 1)
    ends = ends[ends >= 0]  # empty input
    tps = np.cumsum(y_sorted, dtype=np.int64)[ends]
    fps = ends + 1 - tps
    thresholds = np.concatenate(([np.inf], s_sorted[ends].astype(np.float64)))
    tps = np.concatenate(([0], tps)).astype(np.float64)
    fps = np.concatenate(([0], fps)).astype(np.float64)
    fpr = fps / fps[-1] if fps[-1] > 0 else np.full(fps.shape, np.nan)
    tpr = tps / tps[-1] if tps[-1] > 0 else np.full(tps.shape, np.nan)
    return fpr, tpr, thresholds


def auroc(scores, labels) -> float:
    """Area under the ROC curve, exact with ties.

    The trapezoid under the curve of :func:`roc_curve` (one point per distinct score), which is
    the probability that a random anomalous sample scores higher than a random normal one, ties
    counting one half (Mann-Whitney U / (P N)). Equals ``sklearn.metrics.roc_auc_score``.

    Args:
        scores: anomaly scores, any shape (flattened).
        labels: same shape, castable to bool (non-zero = anomalous).

    Returns:
        A Python float in [0, 1]; NaN when only one class (or nothing) is present.
    """
    return _split(scores, labels).auroc()


def image_auroc(scores, labels) -> float:
    """Image-level AUROC: :func:`auroc` of per-image scores ``[N]`` against image labels ``[N]``."""
    return _split(scores, labels).auroc()


def pixel_auroc(maps, masks) -> float:
    """Pixel-level AUROC over all pixels of all maps.

    Args:
        maps: anomaly maps ``[N, H, W]`` (any shape is accepted, it is flattened).
        masks: ground-truth masks of the same shape, castable to bool (non-zero = defect).

    Returns:
        :func:`auroc` of every pixel score against its mask value; NaN when the masks are all
        defect or all normal.
    """
    return _split(maps, masks, "maps", "masks").auroc()


def average_precision(scores, labels) -> float:
    """Average precision, the area under the precision-recall curve as a step sum.

    ``AP = sum_n (R_n - R_{n-1}) P_n`` over the distinct thresholds in decreasing order, where
    ``P_n`` and ``R_n`` are the precision and recall of ``score >= t_n`` and ``R_0 = 0``: the
    definition of ``sklearn.metrics.average_precision_score`` (no interpolation), exact with
    ties.

    Args:
        scores: anomaly scores, any shape (flattened).
        labels: same shape, castable to bool (non-zero = anomalous).

    Returns:
        A Python float in [0, 1]; NaN when only one class (or nothing) is present. (scikit-learn
        returns 1.0 when every label is positive and 0.0 when none is; here both are NaN.)
    """
    return _split(scores, labels).average_precision()


def f1_max_threshold(scores, labels) -> tuple[float, float]:
    """Best F1 score over all thresholds, and the threshold that reaches it.

    ``F1(t) = 2 TP / (2 TP + FP + FN)`` for the rule ``score >= t`` is anomalous, maximised over
    every distinct score ``t``. Used for both image-level and pixel-level F1-max.

    Args:
        scores: anomaly scores, any shape (flattened).
        labels: same shape, castable to bool (non-zero = anomalous).

    Returns:
        ``(f1, threshold)`` as Python floats; among thresholds with the same best F1, the
        highest. ``(nan, nan)`` when only one class (or nothing) is present.
    """
    return _split(scores, labels).f1_max_threshold()


def f1_max(scores, labels) -> float:
    """Best F1 score over all thresholds (see :func:`f1_max_threshold`); NaN if undefined."""
    return _split(scores, labels).f1_max_threshold()[0]
