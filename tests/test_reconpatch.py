"""ReConPatch: the pairwise and contextual similarities and the relaxed contrastive loss against
direct per-pair formulations of their definitions, the moving-average update, that the training
moves the representation and lowers the loss, that scoring is PatchCore's own (an identity
adaptation gives PatchCore's scores exactly), and an accuracy floor on the synthetic set."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from defectscope.data import load_dataset
from defectscope.engine import evaluate
from defectscope.errors import DefectscopeError
from defectscope.models import create_model
from defectscope.models.adaptation.reconpatch import (contextual_similarity, ema_update_, pairwise_similarity,
                                                       relaxed_contrastive_loss, train_representation)


# ------------------------------------------------------------------------------------------------
# direct references: one pair at a time, sets as Python sets, float64


def _dist(z, i, j):
    return float(torch.sqrt(((z[i] - z[j]) ** 2).sum()))


def _knn(z, i, k):
    """N_k(i): the k nearest rows of i, i itself included (random inputs: no ties)."""
    d = [(_dist(z, i, j), j) for j in range(len(z))]
    return {j for _, j in sorted(d)[:k]}


def _contextual_direct(z, k):
    n = len(z)
    nk = [_knn(z, i, k) for i in range(n)]
    half = max(1, k // 2)
    nh = [_knn(z, i, half) for i in range(n)]
    w_tilde = [[len(nk[i] & nk[j]) / len(nk[i]) if j in nk[i] else 0.0 for j in range(n)] for i in range(n)]
    recip = [{j for j in nh[i] if i in nh[j]} for i in range(n)]
    w_hat = [[sum(w_tilde[l][j] for l in recip[i]) / len(recip[i]) for j in range(n)] for i in range(n)]
    return torch.tensor([[0.5 * (w_hat[i][j] + w_hat[j][i]) for j in range(n)] for i in range(n)], dtype=torch.float64)


def _loss_direct(z, w, margin):
    n = len(z)
    total = z.new_zeros(())
    for i in range(n):
        dists = [torch.sqrt(((z[i] - z[j]) ** 2).sum()) if j != i else z.new_zeros(()) for j in range(n)]
        mean = sum(dists) / n
        for j in range(n):
            delta = dists[j] / mean
            total = total + w[i, j] * delta ** 2 + (1 - w[i, j]) * torch.clamp(margin - delta, min=0) ** 2
    return total / n


def test_pairwise_similarity_equals_the_gaussian_of_each_pair():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(11, 5, generator=g, dtype=torch.float64)
    for sigma in (1.0, 3.5):
        want = torch.tensor([[math.exp(-_dist(z, i, j) ** 2 / sigma) for j in range(11)]
                             for i in range(11)], dtype=torch.float64)
        torch.testing.assert_close(pairwise_similarity(z, sigma), want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("k", [1, 2, 3, 5, 8])
def test_contextual_similarity_equals_the_set_definition(k):
    g = torch.Generator().manual_seed(k)
    # clustered points, so the neighbour sets overlap in interesting ways
    centres = torch.randn(4, 3, generator=g, dtype=torch.float64) * 4
    z = centres[torch.arange(18) % 4] + torch.randn(18, 3, generator=g, dtype=torch.float64)
    got = contextual_similarity(z, k)
    torch.testing.assert_close(got, _contextual_direct(z, k), rtol=1e-12, atol=1e-12)
    assert torch.allclose(got, got.T) and got.min() >= 0 and got.max() <= 1
    assert (got.diagonal() > 0).all()  # every row is in its own neighbourhood


def test_contextual_similarity_caps_k_at_the_batch():
    z = torch.randn(3, 4, dtype=torch.float64)
    torch.testing.assert_close(contextual_similarity(z, 10), _contextual_direct(z, 3))


@pytest.mark.parametrize("margin", [0.5, 1.0])
def test_relaxed_loss_and_its_gradient_equal_the_per_pair_sum(margin):
    g = torch.Generator().manual_seed(1)
    z = torch.randn(9, 4, generator=g, dtype=torch.float64)
    w = torch.rand(9, 9, generator=g, dtype=torch.float64)
    w = 0.5 * (w + w.T)
    a = z.clone().requires_grad_(True)
    b = z.clone().requires_grad_(True)
    got, want = relaxed_contrastive_loss(a, w, margin), _loss_direct(b, w, margin)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    got.backward()
    want.backward()
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-8, atol=1e-10)


def test_relaxed_loss_pulls_similar_pairs_and_pushes_the_others():
    z = torch.tensor([[0.0, 0.0], [0.1, 0.0], [3.0, 0.0], [3.1, 0.0]], dtype=torch.float64)
    same = torch.tensor([[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 1], [0, 0, 1, 1]], dtype=torch.float64)
    crossed = torch.tensor([[1, 0, 1, 0], [0, 1, 0, 1], [1, 0, 1, 0], [0, 1, 0, 1]], dtype=torch.float64)
    assert relaxed_contrastive_loss(z, same) < relaxed_contrastive_loss(z, crossed)


def test_coincident_rows_give_a_finite_gradient():
    z = torch.zeros(4, 3, dtype=torch.float64)
    z[2:] = 1.0
    z.requires_grad_(True)
    relaxed_contrastive_loss(z, torch.eye(4, dtype=torch.float64)).backward()
    assert torch.isfinite(z.grad).all()


def test_ema_update_is_the_moving_average():
    torch.manual_seed(0)
    online, average = nn.Linear(3, 2), nn.Linear(3, 2)
    before = [p.detach().clone() for p in average.parameters()]
    ema_update_(average, online, 0.9)
    for a, b, o in zip(average.parameters(), before, online.parameters()):
        torch.testing.assert_close(a, 0.9 * b + 0.1 * o)


def test_training_keeps_the_ema_and_moves_the_representation():
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(3, 8, generator=g) * 3
    feats = centres[torch.arange(64) % 3] + torch.randn(64, 8, generator=g)
    torch.manual_seed(0)
    rep, proj = nn.Linear(8, 8), nn.Linear(8, 8)
    start = copy.deepcopy(nn.Sequential(rep, proj))
    # one step (one batch of all 64 rows, one epoch): average = gamma * theta_0 + (1 - gamma) * theta_1
    _, average = train_representation(feats, rep, proj, epochs=1, batch_size=64, lr=1e-2, momentum=0.9,
                                      generator=torch.Generator().manual_seed(0))
    online = nn.Sequential(rep, proj)
    for a, s, o in zip(average.parameters(), start.parameters(), online.parameters()):
        assert not torch.equal(s, o)
        torch.testing.assert_close(a, 0.9 * s + 0.1 * o)
    # a longer run lowers the loss (lr raised so that a few epochs move the weights)
    history, _ = train_representation(feats, rep, proj, epochs=15, batch_size=32, lr=1e-2,
                                      generator=torch.Generator().manual_seed(0))
    assert history["loss"][-1] < history["loss"][0], history["loss"]


# ------------------------------------------------------------------------------------------------
# the method


@pytest.fixture(scope="module")
def rgb_synth(tmp_path_factory):
    from defectscope.data.synthetic import make_synthetic

    return make_synthetic(tmp_path_factory.mktemp("rgb"), image_size=64, channels=3, n_train=40, n_test_good=20,
                          n_test_defect=5, seed=0, progress=False)


def _split(root, category, split):
    return load_dataset(f"mvtec:{root}", category, split, image_size=64, channels=3)


def test_identity_adaptation_gives_patchcore_scores(rgb_synth, one_thread):
    train, test = _split(rgb_synth, "washer", "train"), _split(rgb_synth, "washer", "test")
    x = torch.stack([test[i]["image"] for i in range(0, len(test), 5)])
    core = create_model("patchcore", image_size=64).fit(train)
    model = create_model("reconpatch", image_size=64, epochs=0, init="identity").fit(train)
    torch.testing.assert_close(model.representation.weight, torch.eye(112), rtol=0, atol=0)
    torch.testing.assert_close(model.memory_bank, core.memory_bank, rtol=0, atol=0)  # PatchCore's coreset code
    a, b = model.predict(x), core.predict(x)
    torch.testing.assert_close(a.score, b.score, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(a.anomaly_map, b.anomaly_map, rtol=1e-6, atol=1e-6)


# Floors on this 64 px set (40 training images, 20 good + 20 defective test images per category),
# EfficientNet-Lite0, a short schedule: 3 epochs of 256-patch batches (the paper's 120 epochs of
# lr 1e-5 are left to benchmarks/reconpatch_vs_patchcore.py). Measured (image / pixel AUROC):
# washer 0.710 / 0.819, fabric 0.813 / 0.715 (PatchCore on the same set: washer 0.860 / 0.861,
# fabric 0.928 / 0.712: at this length the randomly initialised layer costs image AUROC).
# Floors a few points below; chance is 0.5.
FLOORS = {"washer": (0.66, 0.77), "fabric": (0.76, 0.67)}


@pytest.mark.parametrize("category", sorted(FLOORS))
def test_reconpatch_beats_its_floor(rgb_synth, category, one_thread):
    img_floor, px_floor = FLOORS[category]
    model = create_model("reconpatch", image_size=64, epochs=3, patch_batch=256)
    model.fit(_split(rgb_synth, category, "train"))
    assert len(model.history["loss"]) == 3 and all(torch.isfinite(torch.tensor(model.history["loss"])))
    metrics, _ = evaluate(model, _split(rgb_synth, category, "test"))
    assert metrics["image_auroc"] >= img_floor, metrics
    assert metrics["pixel_auroc"] >= px_floor, metrics


def test_ray_backend_and_a_non_square_identity_are_refused_in_one_line(rgb_synth):
    train = _split(rgb_synth, "washer", "train")
    with pytest.raises(DefectscopeError, match="backend=ray is not supported"):
        create_model("reconpatch", image_size=64, backend="ray", epochs=0).fit(train)
    with pytest.raises(DefectscopeError, match="init=identity needs representation_dim"):
        create_model("reconpatch", image_size=64, init="identity", representation_dim=64, epochs=0).fit(train)
