"""The PCA and Gaussian-KDE kernels of defectscope.ops (DFM, DFKDE) against numpy's SVD and
scipy's ``gaussian_kde``."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import gaussian_kde

from defectscope.ops import (
    fit_gaussian_kde,
    fit_pca,
    kde_bandwidth,
    kde_log_density,
    pca_inverse_transform,
    pca_transform,
)


def _data(n, d, seed=0):
    rng = np.random.default_rng(seed)
    scales = np.linspace(3.0, 0.1, d)  # distinct variances: a well-defined order of the axes
    mix = np.linalg.qr(rng.normal(size=(d, d)))[0]
    return (rng.normal(size=(n, d)) * scales) @ mix.T + rng.normal(size=d)


@pytest.mark.parametrize("n,d", [(60, 8), (12, 40)])  # more samples than dimensions, and fewer (DFM)
def test_pca_matches_numpy_svd(n, d):
    x = _data(n, d)
    xc = x - x.mean(0)
    _, s, vt = np.linalg.svd(xc, full_matrices=False)
    k = 5
    pca = fit_pca(torch.from_numpy(x), k)
    v = pca.components.numpy()
    assert v.shape == (d, k) and pca.mean.dtype == torch.float64
    # the same axes up to sign, the sign fixed by the largest-magnitude loading
    for j in range(k):
        ref = vt[j] * np.sign(vt[j][np.argmax(np.abs(vt[j]))])
        assert np.allclose(v[:, j], ref, atol=1e-10)
    assert np.allclose(pca.variances.numpy(), s[:k] ** 2 / n)
    assert np.allclose(pca.variance_ratio.numpy(), s[:k] ** 2 / (s**2).sum())
    z = pca_transform(torch.from_numpy(x), pca)
    recon = pca_inverse_transform(z, pca).numpy()
    ref_recon = xc @ vt[:k].T @ vt[:k] + x.mean(0)
    assert np.allclose(recon, ref_recon, atol=1e-10)
    # a float32 input gives float32 results
    assert fit_pca(torch.from_numpy(x).float(), k).components.dtype == torch.float32


@pytest.mark.parametrize("level", [0.5, 0.9, 0.97, 0.999])
def test_pca_variance_level_keeps_the_smallest_count_reaching_it(level):
    x = _data(80, 10, seed=1)
    s = np.linalg.svd(x - x.mean(0), compute_uv=False)
    cum = np.cumsum(s**2) / (s**2).sum()
    expected = next(i + 1 for i, c in enumerate(cum) if c >= level)
    pca = fit_pca(torch.from_numpy(x), level)
    assert pca.components.shape[1] == expected
    assert float(pca.variance_ratio.sum()) >= level > float(pca.variance_ratio[:-1].sum())


def test_pca_rejects_bad_input():
    x = torch.randn(10, 4)
    for bad in (0, 5, 11, 1.5, -0.2):
        with pytest.raises(ValueError):
            fit_pca(x, bad)
    with pytest.raises(ValueError, match="identical"):
        fit_pca(torch.ones(5, 3), 0.9)
    with pytest.raises(ValueError):
        fit_pca(torch.randn(1, 3), 1)


@pytest.mark.parametrize("bandwidth", ["scott", "silverman", 0.4])
@pytest.mark.parametrize("d", [1, 3, 16])
def test_kde_matches_scipy_gaussian_kde(bandwidth, d):
    rng = np.random.default_rng(d)
    n = 300
    x = _data(n, d, seed=d) if d > 1 else rng.normal(size=(n, 1))
    q = np.concatenate([x[:5] + 0.1 * rng.normal(size=(5, d)), rng.normal(size=(20, d)) * 3])
    ref = gaussian_kde(x.T, bw_method=bandwidth)
    kde = fit_gaussian_kde(torch.from_numpy(x), bandwidth)
    ours = kde_log_density(torch.from_numpy(q), kde).numpy()
    assert np.allclose(ours, ref.logpdf(q.T), rtol=1e-9, atol=1e-9)
    assert kde_bandwidth(n, d, bandwidth) == pytest.approx(ref.factor)


def test_kde_log_density_stays_finite_far_from_the_data():
    x = torch.randn(100, 2, dtype=torch.float64)
    kde = fit_gaussian_kde(x)
    far = kde_log_density(torch.tensor([[1e3, -1e3]], dtype=torch.float64), kde)
    assert torch.isfinite(far).all() and float(far[0]) < -1e4  # exp() of it underflows; its log does not


def test_kde_blocks_give_the_same_result(monkeypatch):
    import defectscope.ops.kde as kde_mod

    x = torch.randn(50, 3, dtype=torch.float64)
    q = torch.randn(40, 3, dtype=torch.float64)
    kde = fit_gaussian_kde(x)
    whole = kde_log_density(q, kde)
    monkeypatch.setattr(kde_mod, "_BUDGET_ELEMS", 50 * 3 * 7)  # blocks of 7 queries
    assert torch.allclose(kde_log_density(q, kde), whole, rtol=0, atol=1e-12)


def test_kde_rejects_bad_input():
    with pytest.raises(ValueError, match="singular"):
        fit_gaussian_kde(torch.randn(3, 5))  # fewer points than dimensions
    with pytest.raises(ValueError):
        kde_bandwidth(10, 2, "nope")
    with pytest.raises(ValueError):
        kde_bandwidth(10, 2, -1.0)
    kde = fit_gaussian_kde(torch.randn(20, 2))
    with pytest.raises(ValueError):
        kde_log_density(torch.randn(3, 4), kde)
