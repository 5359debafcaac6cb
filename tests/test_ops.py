"""The shared kernels of defectscope.ops against slow, obviously correct references."""

from __future__ import annotations

import math
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from defectscope.ops import (
    CoresetResult,
    cholesky_inverse_factor,
    coreset_projection,
    coreset_size,
    fit_gaussian,
    blur_operator,
    gaussian_blur,
    gaussian_kernel1d,
    greedy_coreset,
    inverse_covariance,
    knn,
    ledoit_wolf,
    mahalanobis,
    upsample,
)



pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------------------------------- blur


def _mirror(i: int, n: int) -> int:
    """scipy 'mirror' / torch 'reflect' index, for any offset."""
    if n == 1:
        return 0
    i = i % (2 * n - 2)
    return 2 * n - 2 - i if i >= n else i


def _dense_blur_loop(img: np.ndarray, sigma: float) -> np.ndarray:
    """Explicit 2-D convolution with the outer product of the 1-D kernels, pixel by pixel."""
    r = int(4 * sigma + 0.5)
    g = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2)
    g /= g.sum()
    h, w = img.shape
    out = np.zeros((h, w))
    for y in range(h):
        for x in range(w):
            s = 0.0
            for dy in range(-r, r + 1):
                for dx in range(-r, r + 1):
                    s += g[dy + r] * g[dx + r] * img[_mirror(y + dy, h), _mirror(x + dx, w)]
            out[y, x] = s
    return out


def test_kernel_size_is_anomalib_convention():
    assert gaussian_kernel1d(4.0).numel() == 2 * int(4 * 4.0 + 0.5) + 1 == 33
    assert gaussian_kernel1d(1.3).numel() == 2 * int(4 * 1.3 + 0.5) + 1
    assert abs(float(gaussian_kernel1d(2.5).sum()) - 1) < 1e-6


@pytest.mark.parametrize(("shape", "sigma"), [
    ((3, 64, 48), 4.0),
    ((2, 33, 31), 1.3),
    ((2, 9, 9), 0.5),
    ((2, 20, 7), 4.0),  # narrower than the kernel (radius 16): repeated mirroring
    ((1, 1, 5), 2.0),
])
@pytest.mark.parametrize("path", ["matmul", "conv"])
def test_gaussian_blur_matches_scipy(shape, sigma, path, monkeypatch):
    ndimage = pytest.importorskip("scipy.ndimage")
    import defectscope.ops.blur as blur_module

    if path == "conv":  # the path of maps over MATMUL_MAX_SIDE
        monkeypatch.setattr(blur_module, "MATMUL_MAX_SIDE", 0)
    torch.manual_seed(0)
    maps = torch.rand(shape)
    out = gaussian_blur(maps, sigma)
    assert out.shape == maps.shape and out.dtype == torch.float32
    ref = np.stack([ndimage.gaussian_filter(m.double().numpy(), sigma, mode="mirror", truncate=4.0)
                    for m in maps])
    np.testing.assert_allclose(out.numpy(), ref, rtol=0, atol=1e-5)


def test_gaussian_blur_matches_dense_loop_and_keeps_4d_shape():
    torch.manual_seed(1)
    maps = torch.rand(2, 1, 11, 6)  # [B, 1, H, W]; sigma 1.5 -> radius 6 >= W
    out = gaussian_blur(maps, 1.5)
    assert out.shape == (2, 1, 11, 6)
    for b in range(2):
        ref = _dense_blur_loop(maps[b, 0].double().numpy(), 1.5)
        np.testing.assert_allclose(out[b, 0].numpy(), ref, rtol=0, atol=1e-5)
    assert torch.equal(gaussian_blur(maps, 1.5)[:, 0], gaussian_blur(maps[:, 0], 1.5))


def test_blur_operator_is_the_blur_of_the_identity_and_cached():
    op = blur_operator(9, 1.5)
    assert op is blur_operator(9, 1.5) and op.shape == (9, 9)
    rows = torch.rand(3, 9)
    torch.testing.assert_close(rows @ op, gaussian_blur(rows[:, None, :].expand(3, 9, 9), 1.5)[:, 0])  # blur along W
    torch.testing.assert_close(op.sum(dim=0), torch.ones(9))  # each output is a weighted mean of the input


def test_gaussian_blur_float64_and_zero_sigma():
    maps = torch.rand(2, 16, 16, dtype=torch.float64)
    assert gaussian_blur(maps, 2.0).dtype == torch.float64
    assert gaussian_blur(maps, 0) is maps
    const = torch.full((1, 10, 12), 3.0)
    torch.testing.assert_close(gaussian_blur(const, 4.0), const)


def test_upsample():
    maps = torch.rand(3, 8, 8)
    up = upsample(maps, (32, 24))
    assert up.shape == (3, 32, 24)
    ref = F.interpolate(maps[:, None], size=(32, 24), mode="bilinear", align_corners=False)[:, 0]
    torch.testing.assert_close(up, ref)
    assert upsample(maps[:, None], 16).shape == (3, 1, 16, 16)


# ----------------------------------------------------------------------------------------- knn


def _knn_reference(q, b, k):
    d = torch.cdist(q.double(), b.double())
    dist, idx = torch.sort(d, dim=1)
    return dist[:, :k], idx[:, :k]


@pytest.mark.parametrize("k", [1, 9])
@pytest.mark.parametrize("kwargs", [
    {"block_size": 96},  # 1000 queries: not a multiple of the block
    {},  # block from the memory budget
    {"memory_budget": 64 * 4 * 200},  # tiny budget: the bank is split, the top-k merged
])
def test_knn_matches_cdist(k, kwargs):
    g = torch.Generator().manual_seed(k)
    q = torch.randn(1000, 24, generator=g) + 3.0  # offset: the centring has work to do
    b = torch.randn(700, 24, generator=g) + 3.0
    dist, idx = knn(q, b, k, backend="torch", **kwargs)
    rd, ri = _knn_reference(q, b, k)
    assert dist.shape == idx.shape == (1000, k) and idx.dtype == torch.int64
    assert torch.equal(idx, ri)
    torch.testing.assert_close(dist.double(), rd, rtol=1e-5, atol=1e-5)
    assert bool((dist[:, 1:] >= dist[:, :-1]).all())


@pytest.mark.parametrize("k", [1, 9])
def test_knn_bank_tiles_outermost_match_cdist_and_keep_the_first_of_equal_rows(k, monkeypatch):
    """The tiled loop large banks take (tiles shrunk so that a small bank is tiled, with a last
    partial tile in both directions) against torch.cdist; on a bank that is two copies of itself
    the nearest row is always in the first copy, as torch.min's first index."""
    K = sys.modules["defectscope.ops.knn"]  # the module (defectscope.ops.knn is the function)
    monkeypatch.setattr(K, "_TILED_MIN_BANK", 0)
    monkeypatch.setattr(K, "_TILE_ROWS", 96)
    monkeypatch.setattr(K, "_TILE_COLS", 128)
    g = torch.Generator().manual_seed(20 + k)
    q = torch.randn(1000, 24, generator=g) + 3.0
    b = torch.randn(700, 24, generator=g) + 3.0
    dist, idx = knn(q, b, k, backend="torch")
    rd, ri = _knn_reference(q, b, k)
    assert torch.equal(idx, ri)
    torch.testing.assert_close(dist.double(), rd, rtol=1e-5, atol=1e-5)
    if k == 1:
        _, idx2 = knn(q, torch.cat([b, b]), 1, backend="torch")
        assert torch.equal(idx2, ri)


@pytest.mark.parametrize("m", [100, 512, 700, 1300])
def test_two_level_argmin_equals_torch_min_with_ties(m):
    from defectscope.ops.knn import _argmin_rows

    g = torch.Generator().manual_seed(m)
    d = torch.randint(0, 40, (300, m), generator=g).float()  # many ties: first index must win
    d[5, :] = 7.0  # a row of equal values
    d[6, -3] = -1.0  # minimum in the remainder columns
    vals, ids = _argmin_rows(d)
    rv, ri = torch.min(d, dim=1, keepdim=True)
    assert torch.equal(vals, rv) and torch.equal(ids, ri)


def test_knn_float64_exact_match_and_errors():
    g = torch.Generator().manual_seed(3)
    q, b = torch.randn(50, 7, generator=g, dtype=torch.float64), torch.randn(40, 7, generator=g,
                                                                              dtype=torch.float64)
    dist, idx = knn(q, b, 5)
    rd, ri = _knn_reference(q, b, 5)
    assert dist.dtype == torch.float64 and torch.equal(idx, ri)
    torch.testing.assert_close(dist, rd, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError):
        knn(q, b, 41)
    with pytest.raises(ValueError):
        knn(q, b[:, :3])
    d0, i0 = knn(q[:0], b, 2)
    assert d0.shape == i0.shape == (0, 2)


@pytest.mark.parametrize("k", [1, 9])
def test_knn_faiss_backend_same_results(k):
    pytest.importorskip("faiss")
    g = torch.Generator().manual_seed(10 + k)
    q, b = torch.randn(777, 32, generator=g), torch.randn(1500, 32, generator=g)
    d_t, i_t = knn(q, b, k, backend="torch")
    d_f, i_f = knn(q, b, k, backend="faiss")
    assert torch.equal(i_t, i_f)
    torch.testing.assert_close(d_t, d_f, rtol=0, atol=0)


# ------------------------------------------------------------------------------------- coreset


def _coreset_reference(features, n, projection_dim, seed):
    """Algorithm 1 as written: full distances to the newest centre with torch.cdist (float64,
    direct differences) at every step, running minimum, argmax over the points not yet picked.

    Also returns, for every pick, the relative gap between the best and the second-best
    candidate: where it is below float32 resolution the pick is a near-tie, which float32
    arithmetic (ours, or anomalib's, or a float32 cdist) cannot decide reliably."""
    x, gen = coreset_projection(features, projection_dim, seed)
    num = x.shape[0]
    c = int(torch.randint(num, (1,), generator=gen))
    x = x.double()
    mind = torch.full((num,), math.inf, dtype=torch.float64)
    picked = torch.zeros(num, dtype=torch.bool)
    sel, gaps = [c], [math.inf]
    for _ in range(n - 1):
        picked[c] = True
        d = torch.cdist(x, x[c : c + 1], compute_mode="donot_use_mm_for_euclid_dist")[:, 0]
        mind = torch.minimum(mind, d)
        cand = torch.where(picked, -1.0, mind)
        top = torch.topk(cand, 2).values
        gaps.append(float((top[0] - top[1]) / top[0]) if top[0] > 0 else math.inf)
        c = int(torch.argmax(cand))
        sel.append(c)
    return torch.tensor(sel), gaps


def _assert_same_picks(idx, ref, gaps, tol=1e-6):
    """Equal picks up to (and including) the first near-tie, if any; there must be none in the
    first half, so that the equality tested is substantial."""
    first_tie = next((i for i, gp in enumerate(gaps) if 0 < gp < tol), len(gaps))
    assert first_tie >= len(gaps) // 2, f"near-tie at pick {first_tie}: choose another seed"
    stop = min(len(gaps), first_tie + 1)
    assert torch.equal(idx[:stop], ref[:stop]), (idx[:stop] != ref[:stop]).nonzero()[:1]


@pytest.mark.parametrize(("num", "dim", "n", "pdim"), [
    (2000, 48, 200, 128),  # D <= projection_dim: no projection
    (3000, 200, 300, 32),  # projected 200 -> 32
])
def test_greedy_coreset_matches_naive_reference(num, dim, n, pdim):
    g = torch.Generator().manual_seed(num + dim)
    feats = torch.randn(num, dim, generator=g) * torch.rand(dim, generator=g) + 5 * torch.randn(
        dim, generator=g)
    ref, gaps = _coreset_reference(feats, n, pdim, seed=3)
    for kw in (
        {"method": "lazy"},
        {"method": "dense"},
        # tiny flush period and frontier: every path of the lazy method (frontier extension,
        # flush, growth of the candidate list) runs many times
        {"method": "lazy", "flush_every": 7, "max_frontier": 128},
        {"method": "lazy", "level": 0.0},  # no dormant points
        {"method": "lazy", "level": 0.98, "flush_every": 16},  # many level changes
    ):
        idx = greedy_coreset(feats, n, projection_dim=pdim, seed=3, **kw)
        assert idx.dtype == torch.int64 and idx.shape == (n,)
        _assert_same_picks(idx, ref, gaps)


def test_greedy_coreset_exact_duplicates():
    g = torch.Generator().manual_seed(5)
    base = torch.randn(600, 16, generator=g)
    feats = torch.cat([base, base, base[:300]])  # exact duplicates: exact ties at every step
    ref, gaps = _coreset_reference(feats, 300, 128, seed=1)
    assert int(ref[1:].max()) < 600  # after the random start, ties go to the first copy
    # dense: one computation path for all points, ties go to the lowest index as in the reference
    assert torch.equal(greedy_coreset(feats, 300, seed=1, method="dense"), ref)
    # lazy: the copies' distances may come from different products (last-bit differences), so
    # a tie may go to another copy of the same vector; the picked vectors are the same
    for kw in ({}, {"flush_every": 5, "max_frontier": 64}):
        idx = greedy_coreset(feats, 300, seed=1, method="lazy", **kw)
        assert torch.equal(feats[idx], feats[ref])


def test_greedy_coreset_min_distances_ratio_and_projection():
    g = torch.Generator().manual_seed(7)
    feats = torch.randn(1500, 300, generator=g)
    res = greedy_coreset(feats, ratio=0.1, projection_dim=64, seed=0, return_min_distances=True,
                         flush_every=16)
    assert isinstance(res, CoresetResult) and res.indices.shape == (150,)
    assert torch.equal(res.indices, greedy_coreset(feats, 150, projection_dim=64, seed=0))
    x, _ = coreset_projection(feats, 64, seed=0)
    assert x.shape == (1500, 64)
    ref = torch.cdist(x.double(), x[res.indices].double()).min(dim=1).values
    torch.testing.assert_close(res.min_distances.double(), ref, rtol=1e-4, atol=1e-3)
    assert float(res.min_distances[res.indices].abs().max()) == 0.0
    assert len(set(res.indices.tolist())) == 150
    # D <= projection_dim: features used as they are; float64 stays float64 (and is exact)
    small = torch.randn(400, 20, generator=g, dtype=torch.float64)
    assert torch.equal(coreset_projection(small, 128)[0], small)
    ref, gaps = _coreset_reference(small, 100, 128, seed=2)
    _assert_same_picks(greedy_coreset(small, 100, seed=2), ref, gaps, tol=1e-12)
    # the whole set: every point once
    assert sorted(greedy_coreset(small, 400, seed=2).tolist()) == list(range(400))


def test_coreset_size_and_errors():
    assert coreset_size(100, ratio=0.29) == 29  # not 28 from 0.29 * 100 = 28.999999999999996
    assert coreset_size(204_800, ratio=0.1) == 20_480
    assert coreset_size(10, ratio=0.01) == 1
    assert coreset_size(10, n=10) == 10
    for bad in ({"n": 3, "ratio": 0.1}, {}, {"n": 11}, {"n": 0}, {"ratio": 1.5}):
        with pytest.raises(ValueError):
            coreset_size(10, **bad)
    with pytest.raises(ValueError):
        greedy_coreset(torch.randn(10, 3), 2, method="magic")


# ------------------------------------------------------------------------------------ gaussian


def test_fit_gaussian_matches_numpy_per_position():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 6, 5, generator=g) * torch.rand(6, 5, generator=g) + torch.randn(6, 5,
                                                                                        generator=g)
    mean, cov = fit_gaussian(x, reg=0.01)
    assert mean.shape == (6, 5) and cov.shape == (6, 5, 5)
    xn = x.double().numpy()
    for p in range(6):
        np.testing.assert_allclose(mean[p].numpy(), xn[:, p].mean(0), rtol=1e-5, atol=1e-6)
        ref = np.cov(xn[:, p], rowvar=False) + 0.01 * np.eye(5)
        np.testing.assert_allclose(cov[p].numpy(), ref, rtol=1e-5, atol=1e-6)
    m2, c2 = fit_gaussian(x[:, 2], dtype=torch.float64)  # [N, D], float64 accumulation
    assert c2.dtype == torch.float64
    np.testing.assert_allclose(c2.numpy(), np.cov(xn[:, 2], rowvar=False) + 0.01 * np.eye(5),
                               rtol=1e-12)
    with pytest.raises(ValueError):
        fit_gaussian(x[:1])


def test_mahalanobis_forms_agree_with_numpy_loop():
    g = torch.Generator().manual_seed(1)
    train = torch.randn(30, 7, 6, generator=g, dtype=torch.float64)
    mean, cov = fit_gaussian(train)
    prec = inverse_covariance(cov)
    fac = cholesky_inverse_factor(cov)
    assert torch.equal(fac, torch.tril(fac))
    x = torch.randn(4, 7, 6, generator=g, dtype=torch.float64)
    d_prec = mahalanobis(x, mean, prec)
    d_fac = mahalanobis(x, mean, factor=fac)
    assert d_prec.shape == (4, 7)
    ref = np.zeros((4, 7))
    for p in range(7):
        inv = np.linalg.inv(cov[p].numpy())
        np.testing.assert_allclose(prec[p].numpy(), inv, rtol=1e-9, atol=1e-12)
        for b in range(4):
            dlt = x[b, p].numpy() - mean[p].numpy()
            ref[b, p] = math.sqrt(dlt @ inv @ dlt)
    np.testing.assert_allclose(d_prec.numpy(), ref, rtol=1e-9)
    np.testing.assert_allclose(d_fac.numpy(), ref, rtol=1e-9)
    sq = mahalanobis(x, mean, factor=fac, squared=True)
    np.testing.assert_allclose(sq.numpy(), ref**2, rtol=1e-9)
    # float32, and the single-position [B, D] form
    d32 = mahalanobis(x.float(), mean.float(), prec.float())
    np.testing.assert_allclose(d32.numpy(), ref, rtol=1e-4)
    one = mahalanobis(x[:, 3], mean[3], factor=fac[3])
    np.testing.assert_allclose(one.numpy(), ref[:, 3], rtol=1e-9)
    with pytest.raises(ValueError):
        mahalanobis(x, mean, prec, factor=fac)


@pytest.mark.parametrize(("n", "d"), [(200, 10), (15, 40), (50, 1)])
def test_ledoit_wolf_matches_sklearn(n, d):
    covariance = pytest.importorskip("sklearn.covariance")
    rng = np.random.default_rng(n + d)
    a = rng.standard_normal((d, d))
    x = rng.standard_normal((n, d)) @ a + rng.standard_normal(d)
    mean, cov, shrink = ledoit_wolf(torch.from_numpy(x))
    lw = covariance.LedoitWolf().fit(x)
    assert abs(shrink - lw.shrinkage_) <= 1e-6 * max(1e-12, abs(lw.shrinkage_)) + 1e-12
    np.testing.assert_allclose(mean.numpy(), lw.location_, rtol=1e-6, atol=1e-12)
    np.testing.assert_allclose(cov.numpy(), lw.covariance_, rtol=1e-6,
                               atol=1e-6 * np.abs(lw.covariance_).max())
