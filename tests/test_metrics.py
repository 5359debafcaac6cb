"""Tests of defectscope.metrics against scikit-learn and slow, obviously-correct references."""

from __future__ import annotations

import bisect
import math

import numpy as np
import pytest
import torch
from scipy import ndimage
from sklearn.metrics import average_precision_score, roc_auc_score
from sklearn.metrics import roc_curve as sk_roc_curve

from defectscope.metrics import (
    METRIC_KEYS,
    aupro,
    auroc,
    average_precision,
    compute_metrics,
    f1_max,
    f1_max_threshold,
    image_auroc,
    pixel_auroc,
    roc_curve,
)

SEEDS = [0, 1, 2, 3, 4]


# --------------------------------------------------------------------------- helpers / references


def _random_scores_labels(seed, n=300, ties=False, p=0.3):
    rng = np.random.default_rng(seed)
    labels = rng.random(n) < p
    scores = rng.normal(size=n) + 0.8 * labels
    if ties:
        scores = np.round(scores, 1)
    return scores, labels


def _blob_masks(rng, n_images, h, w, max_blobs=4, p_normal=0.3):
    """Random ellipse and rectangle defects, several per image, some images all normal."""
    masks = np.zeros((n_images, h, w), dtype=bool)
    yy, xx = np.mgrid[:h, :w]
    for i in range(n_images):
        if rng.random() < p_normal:
            continue
        for _ in range(rng.integers(1, max_blobs + 1)):
            cy, cx = rng.integers(0, h), rng.integers(0, w)
            ry, rx = rng.uniform(0.5, h / 6), rng.uniform(0.5, w / 6)
            if rng.random() < 0.5:
                masks[i] |= ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
            else:
                masks[i] |= (abs(yy - cy) <= ry) & (abs(xx - cx) <= rx)
    return masks


def _maps_for(rng, masks, signal=1.0, quantise=None):
    maps = rng.normal(size=masks.shape) + signal * masks * rng.uniform(0, 2, size=masks.shape)
    if quantise is not None:
        maps = np.round(maps, quantise)
    return maps.astype(np.float32)


def _reference_f1_max(scores, labels):
    """Loop over every distinct threshold; precision and recall counted directly."""
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels, dtype=bool)
    best, best_t = -1.0, None
    for t in np.unique(scores)[::-1]:  # descending: keep the highest threshold on ties
        pred = scores >= t
        tp = np.sum(pred & labels)
        fp = np.sum(pred & ~labels)
        fn = np.sum(~pred & labels)
        if tp == 0:
            f1 = 0.0
        else:
            precision, recall = tp / (tp + fp), tp / (tp + fn)
            f1 = 2 * precision * recall / (precision + recall)
        if f1 > best + 1e-12:
            best, best_t = f1, t
    return best, best_t


def _official_trapezoid(x, y, x_max):
    """The trapezoid rule of the MVTec AD evaluation code (interpolation exactly at x_max)."""
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    correction = 0.0
    if x_max not in x:
        ins = bisect.bisect(list(x), x_max)
        assert 0 < ins < len(x)
        y_interp = y[ins - 1] + (y[ins] - y[ins - 1]) * (x_max - x[ins - 1]) / (x[ins] - x[ins - 1])
        correction = 0.5 * (y_interp + y[ins - 1]) * (x_max - x[ins - 1])
    keep = x <= x_max
    x, y = x[keep], y[keep]
    return float(np.sum(0.5 * (y[1:] + y[:-1]) * (x[1:] - x[:-1])) + correction)


def _reference_aupro(maps, masks, fpr_limit=0.3):
    """One threshold at a time, one region at a time: the PRO curve straight from its definition."""
    maps = np.asarray(maps, dtype=np.float64)
    masks = np.asarray(masks, dtype=bool)
    regions = []  # (image index, region mask)
    for i in range(len(masks)):
        labelled, n = ndimage.label(masks[i], structure=np.ones((3, 3), dtype=int))
        regions += [(i, labelled == k) for k in range(1, n + 1)]
    normal = ~masks
    fprs, pros = [0.0], [0.0]
    for t in np.unique(maps)[::-1]:
        above = maps >= t
        fprs.append(np.sum(above & normal) / np.sum(normal))
        pros.append(np.mean([np.sum(above[i] & r) / np.sum(r) for i, r in regions]))
    fprs.append(1.0)
    pros.append(1.0)
    return _official_trapezoid(fprs, pros, fpr_limit) / fpr_limit


# --------------------------------------------------------------------------- ROC / AUROC / AP


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("ties", [False, True])
def test_auroc_and_ap_match_sklearn(seed, ties):
    scores, labels = _random_scores_labels(seed, ties=ties)
    assert auroc(scores, labels) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    assert image_auroc(scores, labels) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    assert average_precision(scores, labels) == pytest.approx(
        average_precision_score(labels, scores), abs=1e-12
    )


@pytest.mark.parametrize("seed", SEEDS)
def test_heavy_ties_small_sets(seed):
    rng = np.random.default_rng(100 + seed)
    n = int(rng.integers(2, 40))
    labels = rng.random(n) < 0.5
    labels[0], labels[1] = True, False
    scores = rng.integers(0, 3, size=n).astype(np.float32)  # three distinct values only
    assert auroc(scores, labels) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    assert average_precision(scores, labels) == pytest.approx(
        average_precision_score(labels, scores), abs=1e-12
    )


@pytest.mark.parametrize("seed", SEEDS)
def test_roc_curve_matches_sklearn(seed):
    scores, labels = _random_scores_labels(seed, ties=seed % 2 == 0)
    fpr, tpr, thr = roc_curve(scores, labels)
    sk_fpr, sk_tpr, sk_thr = sk_roc_curve(labels, scores, drop_intermediate=False)
    np.testing.assert_allclose(fpr, sk_fpr, atol=1e-15)
    np.testing.assert_allclose(tpr, sk_tpr, atol=1e-15)
    np.testing.assert_array_equal(thr, sk_thr)
    assert len(thr) == len(np.unique(scores)) + 1
    assert (fpr[0], tpr[0], fpr[-1], tpr[-1]) == (0.0, 0.0, 1.0, 1.0)
    area = np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2)
    assert area == pytest.approx(auroc(scores, labels), abs=1e-12)


def test_all_equal_scores_give_half():
    labels = np.array([0, 1, 1, 0, 1, 0, 0])
    scores = np.full(7, 0.25)
    assert auroc(scores, labels) == 0.5
    assert average_precision(scores, labels) == pytest.approx(3 / 7)
    assert f1_max(scores, labels) == pytest.approx(2 * 3 / (3 + 7))


def test_known_values():
    scores = np.array([0.1, 0.4, 0.35, 0.8])
    labels = np.array([0, 0, 1, 1])
    assert auroc(scores, labels) == 0.75
    assert average_precision(scores, labels) == pytest.approx(0.5 * 1 + 0.5 * (2 / 3))
    assert f1_max_threshold(scores, labels) == pytest.approx((0.8, 0.35))
    assert auroc(-scores, labels) == 0.25


@pytest.mark.parametrize("labels", [np.zeros(6, dtype=int), np.ones(6, dtype=int), np.zeros(0)])
def test_single_class_or_empty_is_nan(labels):
    scores = np.linspace(0, 1, labels.size)
    for metric in (auroc, image_auroc, average_precision, f1_max):
        assert math.isnan(metric(scores, labels))
    f1, t = f1_max_threshold(scores, labels)
    assert math.isnan(f1) and math.isnan(t)
    value = pixel_auroc(scores.reshape(1, 1, -1), labels.reshape(1, 1, -1))
    assert math.isnan(value)


@pytest.mark.parametrize("seed", SEEDS[:3])
def test_pixel_auroc_matches_sklearn(seed):
    rng = np.random.default_rng(seed)
    masks = _blob_masks(rng, 6, 32, 40)
    masks[0, 0, 0] = True
    maps = _maps_for(rng, masks, quantise=2 if seed == 1 else None)
    expected = roc_auc_score(masks.ravel(), maps.ravel())
    assert pixel_auroc(maps, masks) == pytest.approx(expected, abs=1e-12)
    assert pixel_auroc(torch.from_numpy(maps), torch.from_numpy(masks)) == pytest.approx(
        expected, abs=1e-12
    )


def test_pixel_auroc_on_synthetic_masks_with_saturated_maps():
    """Masks of the synthetic fabric set at 128 px (faint "discolor" edges, empty normal masks,
    defects reaching the border) against float32 maps with heavy ties: a floor at 0, a saturated
    plateau and a constant image border. Our pixel AUROC equals scikit-learn's, and it splits
    exactly into per-defect-type parts, each type's positives against ALL negatives, weighted by
    its share of defect pixels (the decomposition used to explain near-equal pixel AUROCs)."""
    from defectscope.data.synthetic import DEFECT_TYPES, render_pair

    rng = np.random.default_rng(9)
    masks, change, types = [], [], []
    for kind in (None, *DEFECT_TYPES, None):
        for index in range(2):
            clean, image, mask = render_pair("fabric", kind, index=index, image_size=128)
            masks.append(mask)
            change.append(np.abs(image.astype(np.int16) - clean.astype(np.int16)))
            types.append(kind or "good")
    masks, change, types = np.stack(masks), np.stack(change).astype(np.float32), np.array(types)
    assert masks[types == "good"].sum() == 0 and masks.mean() < 0.05
    # a detector that sees the strong changes but not the faint (MIN_STEP) ones
    maps = rng.normal(size=masks.shape).astype(np.float32) + 0.2 * np.maximum(change - 6, 0)
    maps = np.clip(np.round(maps, 1), 0.0, 2.5)  # floor at 0 and saturated at 2.5: heavy ties
    maps[:, :3, :] = maps[:, -3:, :] = maps[:, :, :3] = maps[:, :, -3:] = 1.0  # constant border
    assert np.unique(maps).size <= 30 and (maps == 0.0).mean() > 0.3 and (maps == 2.5).any()

    expected = roc_auc_score(masks.ravel(), maps.ravel())
    assert 0.5 < expected < 1.0
    assert pixel_auroc(maps, masks) == pytest.approx(expected, abs=1e-12)
    out = compute_metrics(maps=maps, masks=masks)
    assert out["pixel_auroc"] == pytest.approx(expected, abs=1e-12)

    negatives = maps[~masks]
    parts = 0.0
    for kind in DEFECT_TYPES:
        pos = maps[masks & (types == kind)[:, None, None]]
        scores = np.concatenate([pos, negatives])
        labels = np.concatenate([np.ones(pos.size, bool), np.zeros(negatives.size, bool)])
        parts += pos.size / masks.sum() * roc_auc_score(labels, scores)
    assert parts == pytest.approx(expected, abs=1e-12)


def test_torch_and_dtypes_and_label_kinds():
    scores, labels = _random_scores_labels(7, n=200)
    s32 = scores.astype(np.float32)
    expected = roc_auc_score(labels, s32)
    value = auroc(torch.from_numpy(s32), torch.from_numpy(labels))
    assert value == pytest.approx(expected, abs=1e-12)
    value = auroc(torch.from_numpy(scores), torch.from_numpy(labels.astype(np.int64)))
    assert value == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    # masks as 0/255 bytes, labels as floats
    assert auroc(s32, labels.astype(np.uint8) * 255) == pytest.approx(expected, abs=1e-12)
    assert average_precision(s32, labels.astype(np.float32)) == pytest.approx(
        average_precision_score(labels, s32), abs=1e-12
    )
    for dtype in (torch.float16, torch.bfloat16):
        t = torch.from_numpy(scores).to(dtype)
        reference = t.float().numpy()
        assert auroc(t, labels) == pytest.approx(roc_auc_score(labels, reference), abs=1e-12)
    result = auroc(s32, labels)
    assert type(result) is float
    assert type(average_precision(s32, labels)) is float
    assert all(type(v) is float for v in f1_max_threshold(s32, labels))


# --------------------------------------------------------------------------- F1-max


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("ties", [False, True])
def test_f1_max_matches_reference(seed, ties):
    scores, labels = _random_scores_labels(seed, n=150, ties=ties)
    f1, threshold = f1_max_threshold(scores, labels)
    ref_f1, ref_t = _reference_f1_max(scores, labels)
    assert f1 == pytest.approx(ref_f1, abs=1e-12)
    assert threshold == ref_t
    assert f1_max(scores, labels) == f1
    pred = scores >= threshold  # the threshold really achieves the F1
    tp = np.sum(pred & labels)
    assert 2 * tp / (pred.sum() + labels.sum()) == pytest.approx(f1, abs=1e-12)


def test_f1_max_perfect_and_pixel_level():
    labels = np.array([0, 0, 1, 1, 1])
    assert f1_max_threshold([0.1, 0.2, 0.5, 0.7, 0.9], labels) == (1.0, 0.5)
    rng = np.random.default_rng(3)
    masks = _blob_masks(rng, 4, 24, 24, p_normal=0.0)
    maps = _maps_for(rng, masks, quantise=1)
    ref_f1, _ = _reference_f1_max(maps.ravel(), masks.ravel())
    assert f1_max(maps, masks) == pytest.approx(ref_f1, abs=1e-12)


# --------------------------------------------------------------------------- AUPRO


@pytest.mark.parametrize("seed", SEEDS)
def test_aupro_matches_reference_random_blobs(seed):
    rng = np.random.default_rng(seed)
    masks = _blob_masks(rng, 5, 20, 24, p_normal=0.3)
    masks[0, 2:6, 3:8] = True  # at least one region
    masks[-1] = False  # at least one all-normal image
    maps = _maps_for(rng, masks, signal=1.5)
    expected = _reference_aupro(maps, masks)
    assert 0.0 < expected < 1.0
    assert aupro(maps, masks) == pytest.approx(expected, abs=1e-9)


@pytest.mark.parametrize("seed", SEEDS[:3])
@pytest.mark.parametrize("fpr_limit", [0.05, 0.3, 1.0])
def test_aupro_matches_reference_with_ties(seed, fpr_limit):
    rng = np.random.default_rng(50 + seed)
    masks = _blob_masks(rng, 4, 18, 18, p_normal=0.25)
    masks[1, 5:9, 5:7] = True
    maps = _maps_for(rng, masks, signal=1.0, quantise=1)  # heavy ties
    expected = _reference_aupro(maps, masks, fpr_limit)
    assert aupro(maps, masks, fpr_limit=fpr_limit) == pytest.approx(expected, abs=1e-9)
    assert compute_metrics(maps=maps, masks=masks, fpr_limit=fpr_limit)["aupro"] == pytest.approx(
        expected, abs=1e-9
    )


@pytest.mark.parametrize("seed", SEEDS[:3])
def test_aupro_one_pixel_defects(seed):
    rng = np.random.default_rng(200 + seed)
    masks = np.zeros((4, 16, 16), dtype=bool)
    for _ in range(7):  # isolated single pixels (every second row and column: never touching)
        masks[rng.integers(0, 4), 2 * rng.integers(0, 8), 2 * rng.integers(0, 8)] = True
    masks[2, 4:10, 4:12] = True  # and one big region, to weigh against them
    maps = _maps_for(rng, masks, signal=1.0)
    assert aupro(maps, masks) == pytest.approx(_reference_aupro(maps, masks), abs=1e-9)


def test_aupro_fpr_limit_hit_exactly():
    # 10 normal pixels, so FPR takes the value 0.3 exactly (no interpolation at the limit)
    maps = np.array([[[0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1, 0.0, 0.75, 0.05]]])
    masks = np.zeros_like(maps, dtype=bool)
    masks[0, 0, 10:] = True
    expected = _reference_aupro(maps, masks, 0.3)
    assert aupro(maps, masks, 0.3) == pytest.approx(expected, abs=1e-12)
    # regions {0.75} and {0.05} are separate (not adjacent): PRO is 0.5 from FPR 0.2 on
    assert expected == pytest.approx(0.5 * 0.1 / 0.3)


def test_aupro_uses_8_connectivity():
    masks = np.zeros((1, 4, 4), dtype=bool)
    masks[0, 0, 0] = masks[0, 1, 1] = masks[0, 1, 2] = True  # one region diagonally (8-conn)
    maps = np.full((1, 4, 4), 0.5)
    maps[0, 0, 0], maps[0, 1, 1], maps[0, 1, 2] = 1.0, 0.0, 0.0
    # 8-connected: a single region of 3 pixels, 1/3 of it found before any false positive.
    # (4-connectivity would see two regions and give 0.5.)
    assert aupro(maps, masks) == pytest.approx(1 / 3, abs=1e-12)
    assert _reference_aupro(maps, masks) == pytest.approx(1 / 3, abs=1e-12)


def test_aupro_regions_are_per_image():
    # the same pixels in two images are two regions, not one
    masks = np.zeros((2, 3, 3), dtype=bool)
    masks[:, 1, 1] = True
    maps = np.zeros((2, 3, 3))
    maps[0, 1, 1] = 1.0  # found in the first image only (the other scores below all normals)
    maps[1, 1, 1] = -1.0
    assert aupro(maps, masks) == pytest.approx(0.5, abs=1e-12)


def test_aupro_perfect_and_inverted():
    rng = np.random.default_rng(11)
    masks = _blob_masks(rng, 6, 32, 32, p_normal=0.2)
    masks[0, 3:9, 3:9] = True
    base = rng.random(masks.shape).astype(np.float32)
    perfect = base * 0.5 + masks  # every defect pixel above every normal pixel
    assert aupro(perfect, masks) == pytest.approx(1.0, abs=1e-12)
    assert aupro(-perfect, masks) == pytest.approx(0.0, abs=1e-12)
    assert aupro(masks.astype(np.float32), masks) == pytest.approx(1.0, abs=1e-12)


def test_aupro_undefined_is_nan_and_bad_limit_raises():
    maps = np.random.default_rng(0).random((2, 8, 8))
    assert math.isnan(aupro(maps, np.zeros((2, 8, 8), dtype=bool)))
    assert math.isnan(aupro(maps, np.ones((2, 8, 8), dtype=bool)))
    masks = np.zeros((2, 8, 8), dtype=bool)
    masks[0, 2, 2] = True
    for bad in (0.0, -0.1, 1.5, float("nan"), "x"):
        with pytest.raises(ValueError, match="fpr_limit"):
            aupro(maps, masks, fpr_limit=bad)


def test_aupro_torch_and_single_map():
    rng = np.random.default_rng(5)
    masks = _blob_masks(rng, 3, 16, 16, p_normal=0.0)
    maps = _maps_for(rng, masks)
    expected = aupro(maps, masks)
    assert aupro(torch.from_numpy(maps), torch.from_numpy(masks).to(torch.uint8)) == expected
    value = aupro(torch.from_numpy(maps).to(torch.float64), masks)
    assert value == pytest.approx(expected, abs=1e-12)
    single = _reference_aupro(maps[:1], masks[:1])
    assert aupro(maps[0], masks[0]) == pytest.approx(single, abs=1e-9)


def test_aupro_partition_path_equals_full_sort_path():
    # aupro sorts only the top of the normal scores; compute_metrics sorts them all
    rng = np.random.default_rng(9)
    masks = _blob_masks(rng, 10, 64, 64)
    masks[0, 10:20, 10:20] = True
    for quantise in (None, 2, 1):
        maps = _maps_for(rng, masks, quantise=quantise)
        for limit in (0.01, 0.3, 0.9):
            a = aupro(maps, masks, limit)
            b = compute_metrics(maps=maps, masks=masks, fpr_limit=limit)["aupro"]
            assert a == pytest.approx(b, abs=1e-12)


# --------------------------------------------------------------------------- compute_metrics


def test_compute_metrics_matches_individual_functions():
    rng = np.random.default_rng(21)
    masks = _blob_masks(rng, 8, 24, 24)
    masks[0, 4:8, 4:8] = True
    maps = _maps_for(rng, masks, quantise=1)
    labels = masks.any(axis=(1, 2))
    scores = maps.max(axis=(1, 2))
    out = compute_metrics(scores, labels, maps, masks)
    assert tuple(out) == METRIC_KEYS
    assert out["image_auroc"] == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    assert out["image_ap"] == pytest.approx(average_precision_score(labels, scores), abs=1e-12)
    assert out["image_f1_max"] == pytest.approx(_reference_f1_max(scores, labels)[0], abs=1e-12)
    pixel_ref = roc_auc_score(masks.ravel(), maps.ravel())
    assert out["pixel_auroc"] == pytest.approx(pixel_ref, abs=1e-12)
    assert out["pixel_ap"] == pytest.approx(
        average_precision_score(masks.ravel(), maps.ravel()), abs=1e-12
    )
    assert out["pixel_f1_max"] == pytest.approx(f1_max(maps, masks), abs=1e-12)
    assert out["aupro"] == pytest.approx(_reference_aupro(maps, masks), abs=1e-9)
    assert all(type(v) is float for v in out.values())

    image_only = compute_metrics(torch.from_numpy(scores), torch.from_numpy(labels))
    assert image_only["image_auroc"] == out["image_auroc"]
    assert all(image_only[k] is None for k in ("pixel_auroc", "pixel_ap", "pixel_f1_max", "aupro"))
    pixel_only = compute_metrics(maps=maps, masks=masks)
    assert pixel_only["image_auroc"] is None and pixel_only["aupro"] == out["aupro"]

    with pytest.raises(ValueError, match="together"):
        compute_metrics(scores=scores)
    with pytest.raises(ValueError, match="together"):
        compute_metrics(maps=maps)


# --------------------------------------------------------------------------- bad input


def test_shape_mismatch_raises_naming_both_shapes():
    with pytest.raises(ValueError, match=r"\(10,\).*\(9,\)"):
        auroc(np.zeros(10), np.zeros(9))
    with pytest.raises(ValueError, match=r"\(10,\).*\(10, 1\)"):
        average_precision(np.zeros(10), np.zeros((10, 1)))
    with pytest.raises(ValueError, match=r"\(2, 4, 4\).*\(2, 4, 5\)"):
        pixel_auroc(np.zeros((2, 4, 4)), np.zeros((2, 4, 5)))
    with pytest.raises(ValueError, match=r"\(2, 4, 4\).*\(2, 5, 4\)"):
        aupro(np.zeros((2, 4, 4)), np.zeros((2, 5, 4)))
    with pytest.raises(ValueError, match=r"\(3,\).*\(4,\)"):
        compute_metrics(np.zeros(3), np.zeros(4))
    with pytest.raises(ValueError, match=r"\[N, H, W\]"):
        aupro(np.zeros((2, 1, 4, 4)), np.zeros((2, 1, 4, 4)))
    for fn in (f1_max, f1_max_threshold, roc_curve, image_auroc):
        with pytest.raises(ValueError, match="same shape"):
            fn(np.zeros(5), np.zeros(4))


def test_non_finite_scores_raise_with_count():
    scores = np.linspace(0, 1, 10)
    labels = np.arange(10) % 2
    scores[[2, 5]] = np.nan
    for fn in (auroc, average_precision, f1_max, f1_max_threshold, roc_curve):
        with pytest.raises(ValueError, match="2 non-finite"):
            fn(scores, labels)
    with pytest.raises(ValueError, match="1 non-finite"):
        auroc(torch.tensor([0.1, float("inf"), 0.3]), torch.tensor([0, 1, 1]))
    maps = np.zeros((2, 4, 4), dtype=np.float32)
    maps[1, 2, 3] = -np.inf
    masks = np.zeros((2, 4, 4), dtype=bool)
    masks[0, 0, 0] = True
    for fn in (aupro, pixel_auroc):
        with pytest.raises(ValueError, match="1 non-finite"):
            fn(maps, masks)
    with pytest.raises(ValueError, match="1 non-finite"):
        compute_metrics(maps=maps, masks=masks)
