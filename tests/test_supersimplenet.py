"""SuperSimpleNet: feature-space noise only inside the Perlin masks (against a direct reference), the
losses against the official formulas, the stop-gradient, the labelled-anomaly contract (supervised
mode consumes the defects; other methods, tiling and the CLI refuse what they must), and an
accuracy floor after a short unsupervised schedule on the synthetic set."""

from __future__ import annotations

import math
import shutil

import pytest
import torch
import torch.nn.functional as F

from defectscope.cli import main
from defectscope.errors import DefectscopeError
from defectscope.models import create_model
from defectscope.models.adaptation.supersimplenet import (
    SegDec,
    downsample_masks,
    feature_anomalies,
    sigmoid_focal_loss,
    ssn_loss,
    truncated_l1,
    upscaled_features,
)
from defectscope.ops.synth import perlin_masks

pytestmark = pytest.mark.usefixtures("one_thread")


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


class _Items(torch.utils.data.Dataset):
    def __init__(self, images, masks=None):
        self.images, self.masks = images, masks

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        item = {"image": self.images[i]}
        if self.masks is not None:
            item["mask"] = self.masks[i]
        return item


# ------------------------------------------------------------------------------ features and noise


def test_upscaled_features_are_the_papers_construction():
    a, b = torch.randn(2, 3, 4, 4, generator=_gen(1)), torch.randn(2, 5, 2, 2, generator=_gen(2))
    out = upscaled_features([a, b], 3)
    assert out.shape == (2, 8, 8, 8)
    up = torch.cat([F.interpolate(t, size=(8, 8), mode="bilinear") for t in (a, b)], dim=1)
    padded = F.pad(up, (1, 1, 1, 1))  # zero padding, counted in the mean (nn.AvgPool2d's default)
    naive = torch.stack([torch.stack([padded[..., i:i + 3, j:j + 3].mean(dim=(-2, -1)) for j in range(8)], -1)
                         for i in range(8)], -2)
    torch.testing.assert_close(out, naive)


@pytest.mark.parametrize("grid", [(16, 16), (12, 10)])
def test_feature_noise_only_inside_the_perlin_mask_and_outside_labelled_defects(grid):
    h, w = grid
    b, c, std, thr = 6, 7, 0.015, 0.2
    adapted = torch.randn(b, c, h, w, generator=_gen(3))
    raw = torch.randn(b, c, h, w, generator=_gen(4))
    gt = torch.zeros(b, 1, h, w)
    gt[0, :, : h // 2] = 1  # a labelled defect: no synthetic noise may land on it
    labels = torch.tensor([1.0, 0, 0, 0, 0, 0])
    a2, r2, masks, y, noise_mask = feature_anomalies(adapted, raw, gt, labels, noise_std=std, threshold=thr,
                                                     generator=_gen(5))
    # direct reference: the same draws in the same order
    g = _gen(5)
    ph, pw = 16, 16  # next power of two of the grid
    perlin = perlin_masks(2 * b, (ph, pw), generator=g, threshold=thr, rotate=(0.0, 0.0), empty_p=0.5)
    if (ph, pw) != (h, w):
        perlin = (F.interpolate(perlin, size=(h, w), mode="bilinear") >= 0.5).float()
    noise = std * torch.randn(2 * b, c, h, w, generator=g)
    gt2 = torch.cat((gt, gt))
    ref_mask = perlin * (1 - gt2)
    torch.testing.assert_close(noise_mask, ref_mask)
    torch.testing.assert_close(a2, torch.cat((adapted, adapted)) + noise * ref_mask)
    torch.testing.assert_close(r2, torch.cat((raw, raw)) + noise * ref_mask)  # the same noise on both
    delta = a2 - torch.cat((adapted, adapted))
    assert (delta[(noise_mask == 0).expand_as(delta)] == 0).all()  # nothing outside the mask
    assert (delta[(noise_mask == 1).expand_as(delta)] != 0).all()  # noise everywhere inside
    assert (noise_mask * gt2).sum() == 0 and noise_mask.sum() > 0
    assert abs(float(delta[(noise_mask == 1).expand_as(delta)].std()) - std) < 0.2 * std
    torch.testing.assert_close(masks, ((gt2 + ref_mask) > 0).float())
    torch.testing.assert_close(y, torch.maximum(torch.cat((labels, labels)), ref_mask.flatten(1).amax(1)))


def test_masks_are_downsampled_as_the_official_code():
    m = torch.zeros(1, 1, 8, 8)
    m[..., :3, :3] = 1
    small = downsample_masks(m, (4, 4))
    ref = torch.where(F.interpolate(m, size=(4, 4), mode="bilinear") < 0.5, 0.0, 1.0)
    # a 3x3 corner on 8 px -> 2x2 cells: the half-covered cells (0.5) count as defect, the quarter one not
    assert torch.equal(small, ref) and small.sum() == 3 and small[0, 0, 1, 1] == 0


# ------------------------------------------------------------------------------ losses


def _official_focal(probs, targets, gamma=4):
    """blaz-r/SuperSimpleNet ``common/loss.py`` (DestSeg's): on probabilities, alpha off, mean."""
    ce = F.binary_cross_entropy(probs, targets, reduction="none")
    p_t = probs * targets + (1 - probs) * (1 - targets)
    return (ce * ((1 - p_t) ** gamma)).mean()


def _official_trunc_l1(pred, target, th=0.5):
    """The official ``train.py`` / anomalib ``SSNLoss.trunc_l1_loss``."""
    normal, anomalous = pred[target == 0], pred[target > 0]
    t = torch.clip(normal + th, min=0)
    f = torch.clip(-anomalous + th, min=0)
    return (t.mean() if len(t) else 0) + (f.mean() if len(f) else 0)


def test_losses_are_the_official_formulas():
    logits = 3 * torch.randn(4, 1, 6, 5, generator=_gen(6))
    target = (torch.rand(4, 1, 6, 5, generator=_gen(7)) > 0.7).float()
    torch.testing.assert_close(sigmoid_focal_loss(logits, target), _official_focal(torch.sigmoid(logits), target))
    torch.testing.assert_close(sigmoid_focal_loss(logits, target, gamma=2), _official_focal(torch.sigmoid(logits),
                                                                                           target, gamma=2))
    torch.testing.assert_close(truncated_l1(logits, target), _official_trunc_l1(logits, target))
    torch.testing.assert_close(truncated_l1(logits, torch.zeros_like(target)), _official_trunc_l1(logits, 0 * target))
    # a hand value: one pixel, logit 0 (p = 0.5), target 1: BCE = log 2, (1 - 0.5)^4 = 1/16
    z = torch.zeros(1, 1, 1, 1)
    assert sigmoid_focal_loss(z, z + 1).item() == pytest.approx(math.log(2) / 16)
    assert truncated_l1(z, z + 1).item() == pytest.approx(0.5)
    score, labels = torch.randn(4, generator=_gen(8)), torch.tensor([0.0, 1, 1, 0])
    total = ssn_loss(logits, score, target, labels)
    torch.testing.assert_close(total, _official_focal(torch.sigmoid(logits), target)
                               + _official_trunc_l1(logits, target) + _official_focal(torch.sigmoid(score), labels))
    # an image-level label only (no mask): its pixels are out of the map terms, its label stays in
    valid = torch.tensor([1.0, 0, 1, 1]).view(4, 1, 1, 1)
    keep = valid.view(-1).bool()
    weak = ssn_loss(logits, score, target, labels, pixel_valid=valid)
    torch.testing.assert_close(weak, _official_focal(torch.sigmoid(logits[keep]), target[keep])
                               + _official_trunc_l1(logits[keep], target[keep])
                               + _official_focal(torch.sigmoid(score), labels))


def test_stop_grad_keeps_the_classification_loss_off_the_segmentation_head():
    torch.manual_seed(0)
    net = SegDec(6, hidden=8)
    x = torch.randn(3, 6, 5, 5, generator=_gen(9))
    for stop, reaches in ((True, False), (False, True)):
        net.zero_grad()
        _, score = net(x, x, stop_grad=stop)
        score.sum().backward()
        grad = net.seg_head[0].weight.grad
        assert (grad is not None and grad.abs().sum() > 0) == reaches


# ------------------------------------------------------------------------------ the labelled-anomaly contract

SMALL = {"image_size": 64, "epochs": 2, "batch_size": 4, "hidden_dim": 32}


def test_supervised_mode_consumes_the_labelled_defects():
    x = torch.rand(8, 3, 64, 64, generator=_gen(10))
    bad = torch.rand(3, 3, 64, 64, generator=_gen(11))
    masks = torch.zeros(3, 1, 64, 64)
    masks[:, :, 16:40, 20:44] = 1
    probe = torch.rand(2, 3, 64, 64, generator=_gen(12))
    plain = create_model("supersimplenet", **SMALL).fit(_Items(x))
    sup = create_model("supersimplenet", **SMALL).fit(_Items(x), anomalies=_Items(bad, masks))
    weak = create_model("supersimplenet", **SMALL).fit(_Items(x), anomalies=_Items(bad))  # image labels only
    assert plain.history["train_anomalies"] == 0 and sup.history["train_anomalies"] == 3
    assert plain.train_anomalies is None and sup.train_anomalies is None  # read by _fit only, not kept
    assert sup.history["loss"] != plain.history["loss"] and weak.history["loss"] != sup.history["loss"]
    a, b, c = (m.predict(probe) for m in (plain, sup, weak))
    assert not torch.equal(a.score, b.score) and not torch.equal(b.anomaly_map, c.anomaly_map)
    again = create_model("supersimplenet", **SMALL).fit(_Items(x), anomalies=_Items(bad, masks))
    assert torch.equal(again.predict(probe).score, b.score)  # seeded
    with pytest.raises(DefectscopeError, match="labelled anomalous image 0 has shape"):
        create_model("supersimplenet", **SMALL).fit(_Items(x), anomalies=_Items(bad[:, :, :32]))


def test_training_layout_is_undone_after_fit_and_after_a_failed_fit(monkeypatch):
    """fit trains in channels_last; the weights go back to the default layout afterwards (saved files
    stay contiguous), also when training stops on an error."""
    import defectscope.models.adaptation.supersimplenet as ssn

    x = torch.rand(4, 3, 64, 64, generator=_gen(14))
    model = create_model("supersimplenet", **{**SMALL, "epochs": 1}).fit(_Items(x))
    conv = model.segdec.cls_conv[0].weight  # 5x5: its layouts differ
    assert conv.is_contiguous() and not conv.is_contiguous(memory_format=torch.channels_last)
    monkeypatch.setattr(ssn, "ssn_loss", lambda *a, **k: torch.tensor(float("nan"), requires_grad=True))
    failed = create_model("supersimplenet", **{**SMALL, "epochs": 1})
    with pytest.raises(FloatingPointError, match="loss became nan"):
        failed.fit(_Items(x))
    assert failed.segdec.cls_conv[0].weight.is_contiguous()


def test_methods_not_tagged_supervised_and_tiling_refuse_anomalies():
    x = torch.rand(4, 3, 32, 32, generator=_gen(13))
    with pytest.raises(DefectscopeError, match=r"padim: cannot use labelled anomalous training images.*supersimplenet"):
        create_model("padim", image_size=32).fit(_Items(x), anomalies=_Items(x[:1]))
    tiled = create_model("supersimplenet", image_size=32, tile_from=64)
    with pytest.raises(DefectscopeError, match="tiling"):
        tiled.fit(_Items(torch.rand(2, 3, 64, 64)), anomalies=_Items(torch.rand(1, 3, 64, 64)))
    assert create_model("supersimplenet").tags.to_dict()["supervised"] is True
    assert create_model("padim").tags.to_dict()["supervised"] is False


def _run(capsys, *argv):
    code = main([str(a) for a in argv])
    return code, capsys.readouterr().err


def test_cli_refuses_test_images_masks_alone_and_unsupervised_methods(capsys, synth_root, tmp_path):
    data = f"mvtec:{synth_root}"
    base = ("fit", "supersimplenet", "--data", data, "--category", "washer", "--out", tmp_path / "m",
            "--image-size", 32, "--param", "epochs=1")
    test_dir = synth_root / "washer" / "test" / "scratch"
    code, err = _run(capsys, *base, "--train-anomalies", test_dir)  # the test split itself, by path
    assert code != 0 and "is an image of the test split" in err and any(f.name in err for f in test_dir.iterdir())
    assert len(err.strip().splitlines()) == 1
    copy = tmp_path / "mine"
    copy.mkdir()
    shutil.copy(next(iter(sorted(test_dir.iterdir()))), copy / "renamed_defect.png")  # same bytes, another name
    code, err = _run(capsys, *base, "--train-anomalies", copy)
    assert code != 0 and "renamed_defect.png has the same content as the test image" in err
    code, err = _run(capsys, *base, "--train-masks", copy)
    assert code != 0 and "--train-masks needs --train-anomalies" in err
    code, err = _run(capsys, "fit", "padim", "--data", data, "--category", "washer", "--out", tmp_path / "p",
                     "--train-anomalies", copy)
    assert code != 0 and "padim cannot learn from labelled defects" in err
    assert not (tmp_path / "m").exists() and not (tmp_path / "p").exists()


def test_cli_fits_on_labelled_defects_from_outside_the_test_split(capsys, synth_root, tmp_path):
    import numpy as np
    from PIL import Image

    from defectscope.data.synthetic import render_pair

    images, masks = tmp_path / "defects", tmp_path / "masks"
    images.mkdir(), masks.mkdir()
    for i, kind in enumerate(("scratch", "stain")):  # the TRAIN split's seeds: never a test image
        _, img, mask = render_pair("washer", kind, index=i, split="train", image_size=64, channels=1)
        Image.fromarray(img).save(images / f"d{i}.png")
        Image.fromarray(mask.astype(np.uint8) * 255).save(masks / f"d{i}_mask.png")
    code = main(["fit", "supersimplenet", "--data", f"mvtec:{synth_root}", "--category", "washer", "--out",
                 str(tmp_path / "m"), "--image-size", "32", "--param", "epochs=1", "--param", "hidden_dim=16",
                 "--val-fraction", "0", "--train-anomalies", str(images), "--train-masks", str(masks)])
    out = capsys.readouterr().out
    assert code == 0 and "fitted supersimplenet" in out and (tmp_path / "m").is_dir()


# ------------------------------------------------------------------------------ a floor on the synthetic set

# Short unsupervised schedule on the 64 px synthetic washer (RGB; the first 16 of 40 training images;
# test 20 good + 20 defective): 5 epochs of batch 8 at the paper's learning rates and noise, against
# the paper's 300 epochs of hundreds of images at 256 px (about 10 s of one core). Measured (seed 0,
# torch 2.13 CPU, 1 thread): image AUROC 0.672, pixel AUROC 0.710 (noise std 0.5: 0.672 / 0.703;
# learning rates x10: 0.593 / 0.618). So short a schedule is seed-sensitive (seed 1: 0.46 / 0.51):
# the floors check the whole pipeline (an inverted or broken map or score falls below them), not
# convergence, which takes the paper's schedule.
FLOOR_RUN = {"image_size": 64, "epochs": 5, "batch_size": 8}
FLOOR, PIXEL_FLOOR = 0.6, 0.65


@pytest.fixture(scope="module")
def rgb_synth(tmp_path_factory):
    from defectscope.data.synthetic import make_synthetic

    return make_synthetic(tmp_path_factory.mktemp("rgb"), image_size=64, channels=3, n_train=40, n_test_good=20,
                          n_test_defect=5, seed=0, progress=False)


def test_unsupervised_short_schedule_beats_its_floor_and_round_trips(rgb_synth, tmp_path):
    from defectscope.data import load_dataset
    from defectscope.engine import evaluate
    from defectscope.models import load_model

    data = f"mvtec:{rgb_synth}"
    train = load_dataset(data, "washer", "train", image_size=64, channels=3).subset(range(16))
    test = load_dataset(data, "washer", "test", image_size=64, channels=3)
    model = create_model("supersimplenet", **FLOOR_RUN).fit(train)
    assert len(model.history["loss"]) == FLOOR_RUN["epochs"]
    metrics, out = evaluate(model, test)
    assert metrics["image_auroc"] >= FLOOR and metrics["pixel_auroc"] >= PIXEL_FLOOR, metrics
    maps = torch.as_tensor(out["maps"])
    assert maps.shape == (len(test), 64, 64) and float(maps.min()) >= 0 and float(maps.max()) <= 1  # sigmoids
    x = torch.stack([test[i]["image"] for i in (0, 25)])
    pred = model.predict(x)
    model.save(tmp_path / "ssn")
    back = load_model(tmp_path / "ssn").predict(x)
    assert torch.equal(back.score, pred.score) and torch.equal(back.anomaly_map, pred.anomaly_map)
