"""GANomaly: the networks' shapes, the three generator losses and the discriminator loss against
their formulas written out, the score against the latent distance computed by hand, the
discriminator's re-initialisation, the image-only contract, and an accuracy floor after a short
schedule on the synthetic set."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from defectscope.errors import DefectscopeError
from defectscope.data import load_dataset
from defectscope.engine import evaluate
from defectscope.models import create_model, get_model_class, list_models, load_model
from defectscope.models.reconstruction.ganomaly import (
    GanomalyDiscriminator,
    GanomalyGenerator,
    dcgan_init,
    discriminator_loss,
    generator_losses,
    latent_distance,
)

SIZE = 32


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("side", [16, 32, 64])
def test_generator_and_discriminator_shapes(side):
    gen = GanomalyGenerator(side, latent=10, channels=3, features=8)
    disc = GanomalyDiscriminator(side, channels=3, features=8)
    x = torch.rand(2, 3, side, side) * 2 - 1
    fake, z, z_hat = gen(x)
    assert fake.shape == x.shape and fake.abs().max() <= 1  # Tanh output, in the input's range
    assert z.shape == z_hat.shape == (2, 10, 1, 1)
    pred, feat = disc(x)
    halvings = int(math.log2(side)) - 2  # side -> 4 by stride-2 convolutions
    assert pred.shape == (2,) and ((pred > 0) & (pred < 1)).all()
    assert feat.shape == (2, 8 * 2 ** (halvings - 1), 4, 4)
    # the official DCGAN layout: one stride-2 conv per halving, no bias, then a 4x4 conv to the code
    convs = [m for m in gen.encoder1 if isinstance(m, nn.Conv2d)]
    assert [c.stride for c in convs] == [(2, 2)] * halvings + [(1, 1)]
    assert all(c.bias is None for c in convs) and convs[-1].kernel_size == (4, 4)
    # extra layers add a 3x3 conv + BN block to each encoder and to the decoder
    extra = GanomalyGenerator(side, 10, 3, 8, extra_layers=1)
    assert sum(isinstance(m, nn.BatchNorm2d) for m in extra.modules()) == \
        sum(isinstance(m, nn.BatchNorm2d) for m in gen.modules()) + 3
    assert extra(x)[0].shape == x.shape


def test_image_size_must_be_a_power_of_two():
    for bad in (48, 100, 8):
        with pytest.raises(DefectscopeError, match="power of two"):
            GanomalyGenerator(bad, 10, 3, 8)
    model = create_model("ganomaly", image_size=48, epochs=1)
    with pytest.raises(DefectscopeError, match="power of two.*--image-size 32"):
        model.fit([{"image": torch.rand(3, 48, 48)}])


def test_dcgan_initialisation():
    torch.manual_seed(0)
    gen = dcgan_init(GanomalyGenerator(64, 100, 3, 64))
    w = torch.cat([m.weight.flatten() for m in gen.modules() if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d))])
    bn = [m for m in gen.modules() if isinstance(m, nn.BatchNorm2d)]
    assert abs(w.mean()) < 1e-3 and abs(w.std() - 0.02) < 1e-3
    g = torch.cat([m.weight for m in bn])
    assert abs(g.mean() - 1) < 5e-3 and abs(g.std() - 0.02) < 5e-3
    assert all((m.bias == 0).all() for m in bn)


def test_losses_against_their_formulas():
    gen = torch.Generator().manual_seed(0)
    x, fake = torch.rand(3, 3, 8, 8, generator=gen) * 2 - 1, torch.rand(3, 3, 8, 8, generator=gen) * 2 - 1
    z, z_hat = torch.randn(3, 5, 1, 1, generator=gen), torch.randn(3, 5, 1, 1, generator=gen)
    fr, ff = torch.randn(3, 4, 4, 4, generator=gen), torch.randn(3, 4, 4, 4, generator=gen)
    out = generator_losses(x, fake, z, z_hat, fr, ff, weights=(1.0, 50.0, 1.0))
    # written out element by element, in float64
    adv = sum((float(a) - float(b)) ** 2 for a, b in zip(fr.flatten(), ff.flatten())) / fr.numel()
    con = sum(abs(float(a) - float(b)) for a, b in zip(x.flatten(), fake.flatten())) / x.numel()
    enc = sum((float(a) - float(b)) ** 2 for a, b in zip(z.flatten(), z_hat.flatten())) / z.numel()
    assert out["adv"].item() == pytest.approx(adv, rel=1e-5)
    assert out["con"].item() == pytest.approx(con, rel=1e-5)
    assert out["enc"].item() == pytest.approx(enc, rel=1e-5)
    assert out["total"].item() == pytest.approx(adv + 50 * con + enc, rel=1e-5)
    assert generator_losses(x, fake, z, z_hat, fr, ff, weights=(2.0, 0.0, 3.0))["total"].item() == \
        pytest.approx(2 * adv + 3 * enc, rel=1e-5)

    p_real, p_fake = torch.rand(6, generator=gen) * 0.98 + 0.01, torch.rand(6, generator=gen) * 0.98 + 0.01
    ref = 0.5 * (-sum(math.log(float(p)) for p in p_real) / 6 - sum(math.log(1 - float(p)) for p in p_fake) / 6)
    assert discriminator_loss(p_real, p_fake).item() == pytest.approx(ref, rel=1e-5)


def test_ganomaly_declares_the_paper_defaults_and_image_only():
    cls = get_model_class("ganomaly")
    d = cls.defaults
    assert (d["w_adv"], d["w_con"], d["w_enc"]) == (1.0, 50.0, 1.0)
    assert d["lr"] == 2e-4 and d["betas"] == (0.5, 0.999) and d["latent"] == 100 and d["features"] == 64
    assert d["batch_size"] == 64 and d["epochs"] == 15 and d["channels"] == 3
    assert cls.paradigm == "reconstruction" and cls.tags.input == "rgb" and cls.tags.trains
    assert not cls.tags.pixel_level and not cls.pixel_level and cls.tags.weights is None
    assert cls in list_models(pixel_level=False) and cls not in list_models(pixel_level=True)


class _Images(torch.utils.data.Dataset):
    def __init__(self, images):
        self.images = images

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return {"image": self.images[i]}


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    images = torch.rand(10, 3, 16, 16)
    model = create_model("ganomaly", image_size=16, epochs=2, batch_size=4, features=8, latent=12)
    return model.fit(_Images(images)), images


def test_score_is_the_latent_distance_computed_by_hand(tiny):
    model, images = tiny
    pred = model.predict(images[:4])
    assert pred.anomaly_map is None and pred.score.shape == (4,)
    g = model.generator
    with torch.no_grad():
        x = images[:4] * 2 - 1  # [0, 1] -> [-1, 1], the official Normalize(0.5, 0.5)
        z = g.encoder1(x)
        z_hat = g.encoder2(g.decoder(z))
    by_hand = ((z - z_hat) ** 2).sum(dim=(1, 2, 3)) / z.shape[1]
    torch.testing.assert_close(pred.score, by_hand, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(latent_distance(z, z_hat), by_hand)
    with pytest.raises(DefectscopeError, match="expected images of 16x16 px"):
        model.predict(torch.rand(1, 3, 32, 32))
    for i in range(4):  # a score does not depend on the rest of the batch (BN in eval mode)
        torch.testing.assert_close(model.predict(images[i : i + 1]).score, pred.score[i : i + 1], rtol=1e-5, atol=1e-7)


def test_fit_history_and_saved_model_without_the_discriminator(tiny, tmp_path):
    model, images = tiny
    h = model.history
    assert all(len(h[k]) == 2 for k in ("loss_g", "adv", "con", "enc", "loss_d"))
    for e in range(2):  # the epoch's generator loss is the weighted sum of its terms
        assert h["loss_g"][e] == pytest.approx(h["adv"][e] + 50 * h["con"][e] + h["enc"][e], rel=1e-4)
    assert not any("disc" in k for k in model.state_dict())  # D is only needed for training
    model.save(tmp_path / "m")
    back = load_model(tmp_path / "m")
    assert torch.equal(back.predict(images).score, model.predict(images).score)


def test_the_discriminator_is_reinitialised_when_its_loss_collapses(monkeypatch):
    images = torch.rand(8, 3, 16, 16)
    cls = get_model_class("ganomaly")
    params = dict(image_size=16, epochs=1, batch_size=4, features=8, latent=8)
    assert cls.d_reinit_below == 1e-5  # the official threshold
    assert create_model("ganomaly", **params).fit(_Images(images)).history["d_reinit"] == 0
    reinit = []
    monkeypatch.setattr(cls, "d_reinit_below", math.inf)  # every step counts as a collapse
    import defectscope.models.reconstruction.ganomaly as mod

    real_init = mod.dcgan_init
    monkeypatch.setattr(mod, "dcgan_init", lambda m: reinit.append(type(m).__name__) or real_init(m))
    model = create_model("ganomaly", **params).fit(_Images(images))
    assert model.history["d_reinit"] == 2  # 8 images / batch 4
    # the generator and D once at the start, then D after each of the two steps
    assert reinit == ["GanomalyGenerator", "GanomalyGenerator", "GanomalyDiscriminator",
                      "GanomalyDiscriminator", "GanomalyDiscriminator"]


def test_two_training_steps_match_the_official_procedure():
    """The fit's loop against the official ``optimize_params`` (samet-akcay/ganomaly lib/model.py)
    re-typed line by line on networks with the same initial weights: forward_g, forward_d on the
    detached fake, backward_g (feature matching through D, L1 x 50, latent L2), G's step, then
    backward_d (BCE on the predictions of forward_d) and D's step. (Done once with the official
    NetG / NetD themselves: the same weights to the last bit.)"""
    from defectscope.training import seed_everything

    side, b, seed = 16, 4, 3
    imgs = torch.rand(2 * b, 3, side, side, generator=torch.Generator().manual_seed(11))
    ours = create_model("ganomaly", image_size=side, epochs=1, batch_size=b, features=8, latent=12,
                        seed=seed).fit(_Images(imgs))
    seed_everything(seed)  # the initial weights of the fit: the generator, then the discriminator
    netg, netd = dcgan_init(GanomalyGenerator(side, 12, 3, 8)), dcgan_init(GanomalyDiscriminator(side, 3, 8))
    l2 = lambda a, c: torch.mean(torch.pow(a - c, 2))  # noqa: E731 (the official lib/loss.py l2_loss)
    opt_g = torch.optim.Adam(netg.parameters(), lr=2e-4, betas=(0.5, 0.999))
    opt_d = torch.optim.Adam(netd.parameters(), lr=2e-4, betas=(0.5, 0.999))
    order = torch.randperm(2 * b, generator=torch.Generator().manual_seed(seed))
    errs_g, errs_d = [], []
    for k in range(2):
        inp = imgs[order[k * b:(k + 1) * b]] * 2 - 1
        fake, latent_i, latent_o = netg(inp)
        pred_real, _ = netd(inp)
        pred_fake, _ = netd(fake.detach())
        opt_g.zero_grad()
        err_g = l2(netd(inp)[1], netd(fake)[1]) + nn.L1Loss()(fake, inp) * 50 + l2(latent_o, latent_i)
        err_g.backward(retain_graph=True)
        opt_g.step()
        opt_d.zero_grad()
        err_d = (nn.BCELoss()(pred_real, torch.ones(b)) + nn.BCELoss()(pred_fake, torch.zeros(b))) * 0.5
        err_d.backward()
        opt_d.step()
        errs_g.append(err_g.item())
        errs_d.append(err_d.item())
    assert ours.history["loss_g"][0] == pytest.approx(sum(errs_g) / 2, rel=1e-5)
    assert ours.history["loss_d"][0] == pytest.approx(sum(errs_d) / 2, rel=1e-5)
    for name, ref in netg.state_dict().items():  # weights and BN statistics after the two steps
        torch.testing.assert_close(ours.generator.state_dict()[name], ref, rtol=1e-5, atol=1e-6)


# The floor. GANomaly's score is a distance between two global latent codes; the paper evaluates it
# on whole-class anomalies (one MNIST / CIFAR-10 class normal, the others anomalous), and that is
# the floor's protocol here: trained on the synthetic fabric (40 images, 32 px), it must score the
# synthetic washer higher than unseen fabric. Measured (seeds 0, 1, 2; torch 2.13 CPU, 1 thread,
# 15 epochs of batch 8, features 16): class AUROC 1.000, 1.000, 1.000 (about 6 s a fit).
# On the small synthetic *defects* at 32 px it is near chance: image AUROC 0.38, 0.37, 0.64 on the
# fabric and 0.55, 0.50, 0.56 on the washer for the same schedules (0.35-0.36 at 64 px with 60
# images), so no defect floor is asserted; the reference library reports 0.42 on MVTec AD.
SCHEDULE = {"epochs": 15, "batch_size": 8, "features": 16}
CLASS_FLOOR = 0.9


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    from defectscope.data.synthetic import make_synthetic

    return make_synthetic(tmp_path_factory.mktemp("rgb"), image_size=SIZE, channels=3, n_train=40, n_test_good=20,
                          n_test_defect=5, seed=0, progress=False)


def test_ganomaly_beats_its_floor_on_the_synthetic_set(synth):
    from defectscope.metrics import auroc

    data = f"mvtec:{synth}"
    train = load_dataset(data, "fabric", "train", image_size=SIZE, channels=3)
    test = load_dataset(data, "fabric", "test", image_size=SIZE, channels=3)
    other = load_dataset(data, "washer", "test", image_size=SIZE, channels=3)
    model = create_model("ganomaly", image_size=SIZE, **SCHEDULE).fit(train)
    metrics, out = evaluate(model, test)  # image-only: the pixel metrics are absent, not faked
    assert out["maps"] is None and metrics["pixel_auroc"] is None and metrics["aupro"] is None
    assert 0 <= metrics["image_auroc"] <= 1
    good = torch.stack([test[i]["image"] for i in range(len(test)) if test[i]["label"] == 0])
    washers = torch.stack([other[i]["image"] for i in range(len(other)) if other[i]["label"] == 0])
    scores = torch.cat([model.predict(good).score, model.predict(washers).score])
    labels = torch.cat([torch.zeros(len(good)), torch.ones(len(washers))])
    assert auroc(scores.numpy(), labels.numpy()) >= CLASS_FLOOR
