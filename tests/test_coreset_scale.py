"""PatchCore at scale: the two-stage coreset against slow references, the streaming bank against
the whole-bank formulation, the typed selection parameter, and feature extraction on Ray."""

from __future__ import annotations

import math

import pytest
import torch

from defectscope.errors import DefectscopeError
from defectscope.models import create_model
from defectscope.models.memory.patchcore import AUTO_EXACT_MAX, build_memory_bank
from defectscope.ops import greedy_coreset
from defectscope.ops.coreset import (
    coreset_min_distances,
    project,
    projection_matrix,
    stage_one,
    two_stage_coreset,
)


def _naive_greedy(x: torch.Tensor, n: int, start: int) -> list[int]:
    """Algorithm 1 of PatchCore, literally: float64 distances to every picked centre, argmax."""
    x = x.double()
    picks = [start]
    d = torch.linalg.vector_norm(x - x[start], dim=1)
    for _ in range(n - 1):
        c = int(torch.argmax(d))
        picks.append(c)
        d = torch.minimum(d, torch.linalg.vector_norm(x - x[c], dim=1))
    return picks


def _naive_radius_to(x: torch.Tensor, idx) -> torch.Tensor:
    """Distance of every row to its nearest picked row: the full [N, n] matrix, float64."""
    x = x.double()
    return torch.cdist(x, x[torch.as_tensor(idx)], compute_mode="donot_use_mm_for_euclid_dist").min(dim=1).values


def _clustered(num: int, dim: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(12, dim, generator=g, dtype=torch.float64) * 4
    return centres[torch.randint(12, (num,), generator=g)] + torch.randn(num, dim, generator=g, dtype=torch.float64)


def test_coreset_min_distances_matches_cdist():
    x = _clustered(700, 9, 0)
    idx = torch.tensor([3, 100, 650, 7])
    ours = coreset_min_distances(x, idx)
    assert torch.allclose(ours.double(), _naive_radius_to(x, idx), atol=1e-9)
    assert float(ours[idx].abs().max()) == 0.0


def test_stage_one_is_the_greedy_of_the_chunk_with_its_quota():
    x = _clustered(500, 6, 1)
    g = torch.Generator().manual_seed(5)
    start = int(torch.randint(500, (1,), generator=torch.Generator().manual_seed(5)))
    idx = stage_one(x, ratio=0.03, oversample=2.0, generator=g)
    assert idx.numel() == math.ceil(2.0 * 0.03 * 500)  # 30
    assert idx.tolist() == _naive_greedy(x, 30, start)
    assert torch.equal(stage_one(x, ratio=0.6, oversample=2.0), torch.arange(500))  # quota >= chunk
    with pytest.raises(ValueError, match="oversample"):
        stage_one(x, 0.1, oversample=0.5)


@pytest.mark.parametrize("num,chunk,ratio,oversample,max_exact", [
    (1500, 400, 0.05, 2.0, 10_000),   # stage 2 exact
    (1200, 250, 0.1, 1.5, 100),       # stage 2 chunked as well
    (999, 1000, 0.1, 3.0, 10_000),    # one chunk
])
def test_two_stage_against_a_naive_two_stage(num, chunk, ratio, oversample, max_exact):
    x = _clustered(num, 5, 2)  # d <= projection_dim: no projection
    res = two_stage_coreset(x, ratio=ratio, chunk_size=chunk, oversample=oversample, max_exact=max_exact,
                            seed=4, return_min_distances=True)
    n = int(num * ratio)
    idx = res.indices.tolist()
    # picks: n distinct rows of the input
    assert len(idx) == n == len(set(idx)) and 0 <= min(idx) and max(idx) < num
    # the same picks as the literal composition of naive greedy runs, starts drawn in order
    g = torch.Generator().manual_seed(4)
    survivors, radius1 = [], 0.0
    for lo in range(0, num, chunk):
        part = x[lo:lo + chunk]
        k = min(part.shape[0], math.ceil(oversample * (n / num) * part.shape[0] - 1e-9))
        picks = _naive_greedy(part, k, int(torch.randint(part.shape[0], (1,), generator=g))) if k < part.shape[0] \
            else list(range(part.shape[0]))
        radius1 = max(radius1, float(_naive_radius_to(part, picks).max()))
        survivors += [lo + p for p in picks]
    u = x[survivors]
    if len(survivors) <= max_exact:
        second = _naive_greedy(u, n, int(torch.randint(len(survivors), (1,), generator=g)))
        assert idx == [survivors[i] for i in second]
    # coverage radius: the triangle-inequality bound of the docstring, and min_distances are exact
    r2 = float(_naive_radius_to(u, [survivors.index(i) for i in idx]).max())
    true = _naive_radius_to(x, idx)
    assert torch.allclose(res.min_distances.double(), true, atol=1e-6)
    assert float(true.max()) <= radius1 + r2 + 1e-9
    # determinism with a seed; another seed another start
    again = two_stage_coreset(x, ratio=ratio, chunk_size=chunk, oversample=oversample, max_exact=max_exact, seed=4)
    assert torch.equal(again, res.indices)


def test_two_stage_radius_is_close_to_the_exact_greedys():
    # a loose bound (the benchmark reports the measured ratio): on clustered data in 128-d
    # projection of 200-d features, the two-stage coverage radius stays within 1.25x the exact one
    # (measured 1.03-1.06 over seeds 0-2)
    x = _clustered(3000, 200, 3).float()
    exact = greedy_coreset(x, ratio=0.05, seed=0, return_min_distances=True).min_distances.max()
    approx = two_stage_coreset(x, ratio=0.05, chunk_size=500, seed=0, return_min_distances=True).min_distances.max()
    assert float(approx) <= 1.25 * float(exact)
    # oversampling that keeps every point in stage 1 gives the exact greedy itself
    assert torch.equal(two_stage_coreset(x, ratio=0.05, chunk_size=500, oversample=20.0, seed=0),
                       greedy_coreset(x, ratio=0.05, seed=0))


def test_greedy_on_projected_chunks_equals_greedy_on_the_whole():
    x = _clustered(1200, 150, 4)  # float64: exact picks, projection applies (150 > 128)
    w, g = projection_matrix(150, 128, seed=7)
    xp = torch.cat([project(x[lo:lo + 333], w) for lo in range(0, 1200, 333)])
    assert torch.equal(greedy_coreset(xp, 90, generator=g, overwrite=True), greedy_coreset(x, 90, seed=7))


def _batches(x, bs_rows):
    for lo in range(0, x.shape[0], bs_rows):
        yield x[lo:lo + bs_rows]


def test_streaming_bank_equals_the_whole_bank_formulations():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(10 * 64, 40, generator=g)  # 10 images of an 8x8 grid, batches of 3 images
    exact = build_memory_bank(_batches(x, 3 * 64), 10, 3, ratio=0.1, seed=2)
    assert torch.equal(exact, x[greedy_coreset(x, ratio=0.1, seed=2)])  # bit for bit: no projection
    two = build_memory_bank(_batches(x, 3 * 64), 10, 3, ratio=0.1, seed=2, method="two-stage", chunk=150)
    assert torch.equal(two, x[two_stage_coreset(x, ratio=0.1, seed=2, chunk_size=150)])
    assert torch.equal(build_memory_bank(_batches(x, 3 * 64), 10, 3, ratio=1.0), x)
    assert torch.equal(build_memory_bank(_batches(x, 3 * 64), 10, 3, ratio=0.1, seed=2, method="auto"), exact)
    assert x.shape[0] <= AUTO_EXACT_MAX
    with pytest.raises(DefectscopeError, match="different numbers of patches"):
        build_memory_bank(_batches(x[:-5], 3 * 64), 10, 3, ratio=0.1)
    with pytest.raises(DefectscopeError, match="different numbers of patches"):
        build_memory_bank(_batches(x[:-64], 3 * 64), 10, 3, ratio=0.1, method="two-stage", chunk=150)


def test_patchcore_coreset_method_param_and_fit(tmp_path):
    from defectscope.models import load_model

    assert create_model("patchcore").params["coreset_method"] == "exact"  # the paper's greedy by default
    with pytest.raises(DefectscopeError, match="coreset_method"):
        create_model("patchcore", coreset_method="fast")
    torch.manual_seed(0)
    images = torch.rand(6, 3, 32, 32)
    data = [{"image": im} for im in images]
    kw = dict(image_size=32, batch_size=4)
    a = create_model("patchcore", coreset_method="two-stage", coreset_chunk=40, **kw).fit(data)
    b = create_model("patchcore", coreset_method="exact", **kw).fit(data)
    assert a.memory_bank.shape == b.memory_bank.shape == (6 * 16 // 10, 112)
    a.save(tmp_path / "m")
    again = load_model(tmp_path / "m")
    assert again.params["coreset_method"] == "two-stage"
    assert torch.equal(again.predict(images[:2]).score, a.predict(images[:2]).score)


def test_patchcore_features_on_a_local_ray_instance():
    ray = pytest.importorskip("ray")
    torch.manual_seed(0)
    images = torch.rand(5, 3, 32, 32)
    data = [{"image": im} for im in images]
    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    try:
        remote = create_model("patchcore", image_size=32, batch_size=2, coreset_ratio=1.0, backend="ray").fit(data)
    finally:
        ray.shutdown()
    local = create_model("patchcore", image_size=32, batch_size=2, coreset_ratio=1.0).fit(data)
    assert remote.memory_bank.shape == (5 * 16, 112)  # every patch, in image order
    assert torch.allclose(remote.memory_bank, local.memory_bank, atol=1e-5)
