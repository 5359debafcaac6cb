"""UniNet: the contrastive loss, the feature selection and the weighted decision score against direct
transcriptions of the official code; the two teachers; image AUROC floors on the synthetic set in the
one-class and the multi-class setting."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from defectscope.data import load_dataset
from defectscope.data.settings import load_split
from defectscope.engine import evaluate
from defectscope.errors import DefectscopeError
from defectscope.models import create_model
from defectscope.models.base import FitContext
from defectscope.models.distillation.uninet import (AttentionBlock, FeatureSelection, _RowLogSumExp,
                                                    decision_score, uninet_loss)

SIZE = 96  # a multiple of 32 (the code is at stride 32); 64 px learns too slowly for a floor (below)


def _pairs(gen, n=6, b=2, shapes=((5, 8, 8), (7, 4, 4), (3, 2, 2))):
    shapes = [shapes[i % len(shapes)] for i in range(n)]
    return ([torch.randn(b, *s, generator=gen, dtype=torch.float64) for s in shapes],
            [torch.randn(b, *s, generator=gen, dtype=torch.float64) for s in shapes])


def _reference_loss(students, teachers, temperature, lam=0.7, margin=1.0):
    """The official ``UniNet_lib/Loss.py`` ``losses`` (unsupervised branch), transcribed."""
    loss = 0.0
    for s_, t_ in zip(students, teachers):
        n, c, h, w = s_.shape
        s = F.normalize(s_.view(n, c, -1).transpose(1, 2), p=2, dim=2)
        t = F.normalize(t_.view(n, c, -1).transpose(1, 2), p=2, dim=2)
        cos_loss = (1 - F.cosine_similarity(s, t, dim=2)).mean()
        simi = torch.exp(torch.matmul(s, t.transpose(1, 2)) / temperature)
        simi = simi / (simi.sum(dim=2, keepdim=True) + 1e-8)
        diag = torch.diagonal(simi, dim1=1, dim2=2)
        contra = -torch.log(diag + 1e-8).mean()
        margin_loss = F.relu(margin - diag).mean()
        loss = loss + cos_loss * lam + contra * (1 - lam) + margin_loss
    return loss


@pytest.mark.parametrize("temperature,rows", [(0.1, None), (2.0, None), (0.1, 5)])
def test_loss_equals_the_official_formula(temperature, rows, monkeypatch):
    if rows:  # the similarities by blocks of 5 rows (the default block holds every row at these sizes)
        monkeypatch.setattr(_RowLogSumExp, "_rows", staticmethod(lambda p, q: rows))
    gen = torch.Generator().manual_seed(0)
    students, teachers = _pairs(gen)
    ours = uninet_loss(students, teachers, temperature)
    assert torch.allclose(ours, _reference_loss(students, teachers, temperature), rtol=1e-9, atol=1e-9)
    # gradients too (the student learns through the logsumexp form)
    s = [x.clone().requires_grad_() for x in students]
    s2 = [x.clone().requires_grad_() for x in students]
    uninet_loss(s, teachers, temperature).backward()
    _reference_loss(s2, teachers, temperature).backward()
    for a, b in zip(s, s2):
        assert torch.allclose(a.grad, b.grad, rtol=1e-7, atol=1e-10)
    # perfectly matching, well separated features: cosine term 0, q_p close to 1
    eye = torch.eye(16, dtype=torch.float64).view(1, 16, 4, 4)
    assert uninet_loss([eye], [eye], 0.1) < 2e-3


def _reference_selection(students, teachers, phis):
    """The official ``DomainRelated_Feature_Selection.forward`` (``max=True``), element by element."""
    out = []
    for idx, (x, prior) in enumerate(zip(students, teachers)):
        phi = phis[idx] if idx < 3 else phis[idx - 3]
        y = torch.empty_like(x)
        b, c, h, w = x.shape
        for i in range(b):
            for j in range(c):
                theta = min(1 / (1 + math.exp(-float(phi[0, j, 0, 0]))) + 0.5, 1.0)
                p = prior[i, j]
                e = torch.exp(p - p.max())
                y[i, j] = x[i, j] * (e / e.sum()) * (theta + float(p.mean()))
        out.append(y)
    return out


def test_feature_selection_equals_the_official_formula():
    gen = torch.Generator().manual_seed(1)
    students, teachers = _pairs(gen)
    sel = FeatureSelection((5, 7, 3)).double()
    with torch.no_grad():
        for t in sel.thetas:
            t.copy_(torch.randn(t.shape, generator=gen, dtype=torch.float64) * 2)
    ours = sel(students, teachers)
    ref = _reference_selection(students, teachers, [t.detach() for t in sel.thetas])
    for a, b in zip(ours, ref):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-12)
    # theta enters with a gradient where sigmoid(phi) + 0.5 < 1
    sum(x.sum() for x in sel(students, teachers)).backward()
    assert all(t.grad is not None and t.grad.abs().sum() > 0 for t in sel.thetas)


def _reference_score(level_maps, amap, alpha, beta):
    """The official ``weighted_decision_mechanism`` per image (``int`` of the pixel count, but at
    least 1), on an already blurred map."""
    scores = []
    hw = amap.shape[-2] * amap.shape[-1]
    for i in range(amap.shape[0]):
        maxima = torch.tensor([float(m[i].max()) for m in level_maps])
        probs = F.softmax(maxima, 0)
        kept = [float(v) for v, p in zip(maxima, probs) if p > probs.mean()]
        weight = max(sum(kept) / len(kept) * alpha, beta)
        k = max(1, int(hw * weight))
        scores.append(float(amap[i].flatten().sort(descending=True).values[:k].mean()))
    return torch.tensor(scores, dtype=amap.dtype)


def test_decision_score_equals_the_official_mechanism():
    gen = torch.Generator().manual_seed(2)
    maps = [torch.rand(3, s, s, generator=gen, dtype=torch.float64) * 2 for s in (16, 8, 4, 16, 8, 4)]
    amap = torch.rand(3, 64, 64, generator=gen, dtype=torch.float64)
    for alpha, beta in ((0.01, 3e-5), (0.05, 1e-3), (1e-4, 1e-2)):
        ours = decision_score(maps, amap, alpha, beta)
        assert torch.allclose(ours, _reference_score(maps, amap, alpha, beta), rtol=1e-10)
    # a weight below one pixel still averages the maximum (the official int() would give 0)
    assert torch.allclose(decision_score(maps, amap, 1e-9, 1e-9), amap.flatten(1).amax(1))


def test_attention_block_shapes_and_widths():
    block = AttentionBlock(336, 224, stride=2, downsample=torch.nn.Sequential(
        torch.nn.Conv2d(336, 224, 1, 2, bias=False), torch.nn.BatchNorm2d(224)))
    assert block(torch.randn(2, 336, 8, 8)).shape == (2, 224, 4, 4)
    assert block.branch_a[0].in_channels == 168 and block.branch_a[0].out_channels == 56  # width C3/2
    assert block.branch_b[0].kernel_size == (3, 3)
    with pytest.raises(DefectscopeError, match="multiple of 32"):
        create_model("uninet", image_size=48, epochs=1).fit(_tiny(48))


def _tiny(size):
    class _DS(torch.utils.data.Dataset):
        def __len__(self):
            return 2

        def __getitem__(self, i):
            return {"image": torch.rand(3, size, size)}

    return _DS()


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    from defectscope.data.synthetic import make_synthetic

    return make_synthetic(tmp_path_factory.mktemp("uninet"), image_size=SIZE, channels=3, n_train=24,
                          n_test_good=12, n_test_defect=4, seed=0, progress=False)


# Short schedules on the 96 px synthetic set (24 training images per category), far from the
# official ones (100 epochs / 5000 steps at 256 px, thousands of steps): the contrastive objective
# learns the normal structure slowly, and at these lengths the outcome depends on the CPU's float
# rounding (the same seed gave one-class fabric 0.625 at 10 epochs on one 2-core machine and 0.406
# on another). Measured on the second (seed 0, torch 2.13 CPU, one thread): one-class fabric
# image AUROC 0.406 / 0.703 / 0.672 at 10 / 30 / 60 epochs (pixel 0.569 / 0.656 / 0.634);
# multi-class (one model on fabric + washer) at 30 steps fabric 0.776 / washer 0.245, at 90 steps
# fabric 0.818 / washer 0.427 (washer's small defects are not separated yet at this length).
# Floors about 8 points under the 30-epoch / 90-step values; chance is 0.5. ~60 s of CPU for both fits.
ONE_CLASS = ("fabric", {"epochs": 30}, 0.62, 0.60)
MULTI_CLASS = ({"steps": 90}, {"fabric": 0.74}, 0.56)  # per-category floors; floor of the category mean


def test_one_class_floor_and_the_two_teachers(synth, one_thread):
    category, params, floor, px_floor = ONE_CLASS
    train = load_dataset(f"mvtec:{synth}", category, "train", image_size=SIZE, channels=3)
    test = load_dataset(f"mvtec:{synth}", category, "test", image_size=SIZE, channels=3)
    model = create_model("uninet", image_size=SIZE, **params).fit(train)
    assert model.history["schedule"] == "one-class" and len(model.history["loss"]) == params["epochs"]
    assert model.history["loss"][-1] < model.history["loss"][0]
    metrics, _ = evaluate(model, test)
    assert metrics["image_auroc"] >= floor and metrics["pixel_auroc"] >= px_floor, metrics
    # the source teacher is frozen; the target teacher moved slowly (lr 1e-6) and its BatchNorm
    # statistics followed the training images
    fresh = create_model("uninet", image_size=SIZE)
    fresh._build()
    src, tgt, ref = model.backbone.state_dict(), model.target.state_dict(), fresh.backbone.state_dict()
    assert all(torch.equal(src[k], ref[k]) for k in ref)
    weights = [k for k in ref if k.endswith("weight") and ref[k].ndim == 4]
    drift = max(float((tgt[k] - ref[k]).abs().max()) for k in weights)
    assert 0 < drift < 1e-3
    running = [k for k in ref if k.endswith("running_mean")]
    assert any(not torch.allclose(tgt[k], ref[k]) for k in running)


def test_multi_class_floor_one_model_per_category(synth, one_thread):
    params, floors, mean_floor = MULTI_CLASS
    split = load_split(f"mvtec:{synth}", None, "multi-class", image_size=SIZE, channels=3)
    assert split.categories == ("fabric", "washer")
    model = create_model("uninet", image_size=SIZE, **params)
    model.fit(split.train, context=FitContext("multi-class", split.categories))
    per_epoch = math.ceil(len(split.train) / model.params["batch_size"])
    assert model.history["schedule"] == "multi-class"
    assert len(model.history["loss"]) == math.ceil(params["steps"] / per_epoch)
    aurocs = {category: evaluate(model, test)[0]["image_auroc"] for category, test in split.tests.items()}
    assert all(aurocs[c] >= f for c, f in floors.items()), aurocs
    assert sum(aurocs.values()) / len(aurocs) >= mean_floor, aurocs
