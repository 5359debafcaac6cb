"""GANomaly: Akcay, Atapour-Abarghouei and Breckon, "GANomaly: Semi-Supervised Anomaly Detection
via Adversarial Training", ACCV 2018 (arXiv 1805.06725); official code samet-akcay/ganomaly.

Networks (Sec. 3.1, Fig. 2), DCGAN-style as the official ``lib/networks.py``:

* generator G = encoder G_E -> decoder G_D, then a second encoder E of the same architecture:
  ``z = G_E(x)``, ``x_hat = G_D(z)``, ``z_hat = E(x_hat)``. An encoder is a 4x4 stride-2
  convolution to ``features`` channels + LeakyReLU(0.2), then 4x4 stride-2 convolution + BN +
  LeakyReLU(0.2) blocks doubling the channels until the map is 4x4, then a 4x4 convolution to the
  ``latent``-dimensional code ``[B, latent, 1, 1]``. The decoder mirrors it with transposed
  convolutions, BN + ReLU, and a final Tanh (images live in [-1, 1]; inputs in [0, 1] are mapped
  by ``2x - 1``, the official ``Normalize(0.5, 0.5)``). ``extra_layers`` adds 3x3 conv + BN +
  activation blocks after the first encoder layer and before the last decoder layer (official
  ``n_extra_layers``). Convolutions have no bias; DCGAN initialisation (conv weights N(0, 0.02),
  BN weights N(1, 0.02), BN biases 0). Checked once against the official ``NetG`` / ``NetD``: the
  same parameter shapes in the same order, and with the official weights copied in, the same
  outputs to the last bit (32 and 64 px, with and without an extra layer).
* discriminator D: the same encoder with a 1-dimensional code and a Sigmoid; its features
  ``f(.)`` are the output of the last block before that final convolution (``[B, 8F, 4, 4]`` at
  64 px with ``F = features``).

Training (Sec. 3.2), one step per mini-batch as the official ``optimize_params``:

    L_adv = E || f(x) - f(G(x)) ||_2                                (eq. 1, feature matching)
    L_con = E || x - G(x) ||_1                                      (eq. 2, contextual)
    L_enc = E || G_E(x) - E(G(x)) ||_2                              (eq. 3, encoder)
    L_G   = w_adv L_adv + w_con L_con + w_enc L_enc,  w = (1, 50, 1)   (eq. 4)
    L_D   = (BCE(D(x), 1) + BCE(D(G(x)), 0)) / 2

each term computed as the official code does: the mean over all elements of the squared (eq. 1,
3) or absolute (eq. 2) difference. G is updated first, then D on the detached reconstruction;
when L_D falls below 1e-5 (D has won) D is re-initialised with the DCGAN initialisation (the
official ``reinit_d``; its Adam state is kept, as there). Adam, learning rate 2e-4, betas
(0.5, 0.999) for both networks, batch 64 with the last incomplete batch dropped, 15 epochs
(the official ``options.py``).

Score (Sec. 3.3, eq. 5): the latent distance ``A(x) = mean_k (G_E(x)_k - E(G(x))_k)^2``, the
mean over the ``latent`` dimensions of the squared difference, as the official code and the
reference library compute it. GANomaly scores whole images: it has no anomaly map (its tags say
``pixel_level=False``; predictions carry ``anomaly_map=None``, and no pixel metrics are reported).

Defaults and deviations:

* ``image_size`` 64. The official default is 32 (its CIFAR-10 / MNIST experiments); the
  reference library uses 256 px (padded to the next power of two), where the DCGAN pyramid ends in
  a 2048-channel 4x4 layer: 144 M parameters in the generator and 45 M in the discriminator, far
  too slow for a CPU. At 64 px they have 10.7 M and 2.8 M, and a defect of 2-3 % of the image side
  still covers a pixel or two, which 32 px loses. Any power of two >= 16 works (the pyramid halves to 4x4).
* Score: eq. 5 writes the L1 norm; the official code (and the reference library) use the mean
  squared difference, which we follow. Eq. 6 then min-max scales the scores over the test set; we
  return the raw distance (a deployable score cannot depend on the test set, and the scaling does
  not change the ranking, so AUROC is the same).
* The official training keeps the epoch with the best AUROC on the test set; we keep the last
  epoch (no test data is seen during a fit).
* The discriminator is needed only for training: it is not kept in the fitted model (smaller
  files, the same predictions).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ...errors import DefectscopeError
from ...progress import progress
from ...training import auto_device, batches, load_images, seed_everything
from ..base import AnomalyModel, Prediction, register
from ..cost import Cost
from ..params import Param, Tags

__all__ = ["Ganomaly", "GanomalyGenerator", "GanomalyDiscriminator", "dcgan_encoder", "dcgan_decoder", "dcgan_init",
           "generator_losses", "discriminator_loss", "latent_distance"]


def _check_side(image_size: int) -> None:
    if image_size < 16 or image_size & (image_size - 1):
        lower = 1 << max(4, image_size.bit_length() - 1)
        raise DefectscopeError(f"ganomaly: image_size must be a power of two >= 16 (the DCGAN pyramid halves it to "
                               f"4x4), got {image_size}; pass --image-size {lower}")


def dcgan_encoder(image_size: int, latent: int, channels: int, features: int, extra_layers: int = 0,
                  final_conv: bool = True) -> nn.Sequential:
    """The official DCGAN encoder: ``[B, channels, S, S]`` -> ``[B, latent, 1, 1]`` (without
    ``final_conv``: the ``[B, features * S / 8, 4, 4]`` map before the last convolution)."""
    _check_side(image_size)
    layers: list[nn.Module] = [nn.Conv2d(channels, features, 4, 2, 1, bias=False), nn.LeakyReLU(0.2, inplace=True)]
    side, width = image_size // 2, features
    for _ in range(extra_layers):
        layers += [nn.Conv2d(width, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.LeakyReLU(0.2, inplace=True)]
    while side > 4:
        layers += [nn.Conv2d(width, width * 2, 4, 2, 1, bias=False), nn.BatchNorm2d(width * 2),
                   nn.LeakyReLU(0.2, inplace=True)]
        width, side = width * 2, side // 2
    if final_conv:
        layers.append(nn.Conv2d(width, latent, 4, 1, 0, bias=False))
    return nn.Sequential(*layers)


def dcgan_decoder(image_size: int, latent: int, channels: int, features: int, extra_layers: int = 0) -> nn.Sequential:
    """The official DCGAN decoder: ``[B, latent, 1, 1]`` -> ``[B, channels, S, S]`` in [-1, 1]."""
    _check_side(image_size)
    width = features // 2 * (image_size // 4)  # features/2 doubled once per doubling from 4 to S
    layers: list[nn.Module] = [nn.ConvTranspose2d(latent, width, 4, 1, 0, bias=False), nn.BatchNorm2d(width),
                               nn.ReLU(inplace=True)]
    side = 4
    while side < image_size // 2:
        layers += [nn.ConvTranspose2d(width, width // 2, 4, 2, 1, bias=False), nn.BatchNorm2d(width // 2),
                   nn.ReLU(inplace=True)]
        width, side = width // 2, side * 2
    for _ in range(extra_layers):
        layers += [nn.Conv2d(width, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True)]
    layers += [nn.ConvTranspose2d(width, channels, 4, 2, 1, bias=False), nn.Tanh()]
    return nn.Sequential(*layers)


@torch.no_grad()
def dcgan_init(module: nn.Module) -> nn.Module:
    """DCGAN initialisation of every (transposed) convolution and batch norm in ``module``."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            m.weight.normal_(0.0, 0.02)
        elif isinstance(m, nn.BatchNorm2d):
            m.weight.normal_(1.0, 0.02)
            m.bias.zero_()
    return module


class GanomalyGenerator(nn.Module):
    """G_E -> G_D -> E; ``forward(x)`` (x in [-1, 1]) returns ``(x_hat, z, z_hat)``."""

    def __init__(self, image_size: int, latent: int, channels: int, features: int, extra_layers: int = 0) -> None:
        super().__init__()
        self.encoder1 = dcgan_encoder(image_size, latent, channels, features, extra_layers)
        self.decoder = dcgan_decoder(image_size, latent, channels, features, extra_layers)
        self.encoder2 = dcgan_encoder(image_size, latent, channels, features, extra_layers)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        z = self.encoder1(x)
        fake = self.decoder(z)
        return fake, z, self.encoder2(fake)


class GanomalyDiscriminator(nn.Module):
    """The DCGAN encoder with a 1-d code and a Sigmoid; ``forward(x)`` returns
    ``(probability of real [B], features f(x))``."""

    def __init__(self, image_size: int, channels: int, features: int, extra_layers: int = 0) -> None:
        super().__init__()
        self.features = dcgan_encoder(image_size, 1, channels, features, extra_layers, final_conv=False)
        width = self.features[-3].out_channels  # the last block's convolution
        self.classifier = nn.Sequential(nn.Conv2d(width, 1, 4, 1, 0, bias=False), nn.Sigmoid())

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = self.features(x)
        return self.classifier(f).flatten(), f


def generator_losses(x: torch.Tensor, fake: torch.Tensor, z: torch.Tensor, z_hat: torch.Tensor,
                     feat_real: torch.Tensor, feat_fake: torch.Tensor,
                     weights: tuple[float, float, float] = (1.0, 50.0, 1.0)) -> dict[str, torch.Tensor]:
    """Eqs. 1-4: ``{"adv", "con", "enc", "total"}`` with ``weights = (w_adv, w_con, w_enc)``; each
    term the mean over elements (squared difference for eqs. 1 and 3, absolute for eq. 2)."""
    adv = (feat_real - feat_fake).pow(2).mean()
    con = (x - fake).abs().mean()
    enc = (z - z_hat).pow(2).mean()
    return {"adv": adv, "con": con, "enc": enc, "total": weights[0] * adv + weights[1] * con + weights[2] * enc}


def discriminator_loss(pred_real: torch.Tensor, pred_fake: torch.Tensor) -> torch.Tensor:
    """``(BCE(D(x), 1) + BCE(D(G(x)), 0)) / 2`` (official ``backward_d``)."""
    return 0.5 * (F.binary_cross_entropy(pred_real, torch.ones_like(pred_real))
                  + F.binary_cross_entropy(pred_fake, torch.zeros_like(pred_fake)))


def latent_distance(z: torch.Tensor, z_hat: torch.Tensor) -> torch.Tensor:
    """Eq. 5 as the official code: the mean over the latent dimensions of ``(z - z_hat)^2``, ``[B]``."""
    return (z - z_hat).pow(2).flatten(1).mean(dim=1)


@register
class Ganomaly(AnomalyModel):
    """GANomaly (Akcay et al., ACCV 2018): encoder-decoder-encoder generator trained adversarially;
    image score = the distance between the two latent codes. Image-level only."""

    name = "ganomaly"
    paradigm = "reconstruction"
    description = "GANomaly (ACCV 2018): encoder-decoder-encoder GAN, score = ||G_E(x) - E(G(x))||^2; image-only"
    paper = "Akcay et al., ACCV 2018"
    notes = (
        "official code's defaults (DCGAN nets, latent 100, losses 1/50/1 with feature matching, Adam 2e-4 "
        "(0.5, 0.999), batch 64, 15 epochs, D re-initialised when its loss < 1e-5); 64 px instead of the "
        "official 32 (the reference library's 256 px needs ~190 M parameters); score = mean squared latent "
        "distance as the official code (eq. 5 writes L1), not min-max scaled over the test set; last epoch "
        "kept (the official code keeps the best test AUROC); no anomaly map, no pixel metrics"
    )
    overrides = {"image_size": 64}
    hparams = (
        Param("epochs", "int", 15, "training epochs (official niter)", ge=1),
        Param("batch_size", "int", 64, "training batch size (the last incomplete batch is dropped)", ge=1),
        Param("lr", "float", 2e-4, "Adam learning rate of the generator and the discriminator", gt=0),
        Param("betas", "floats", (0.5, 0.999), "Adam betas of both networks", length=2, ge=0, lt=1),
        Param("latent", "int", 100, "size of the latent code z (official nz)", ge=1),
        Param("features", "int", 64, "channels of the first encoder layer, doubled at each halving (official "
              "ngf = ndf)", ge=2),
        Param("extra_layers", "int", 0, "extra 3x3 conv + BN blocks in every encoder and the decoder", ge=0),
        Param("w_adv", "float", 1.0, "weight of the adversarial (feature-matching) loss, eq. 4", ge=0),
        Param("w_con", "float", 50.0, "weight of the contextual (L1 reconstruction) loss, eq. 4", ge=0),
        Param("w_enc", "float", 1.0, "weight of the encoder (latent L2) loss, eq. 4", ge=0),
    )
    # export: verified by the conformance suite (ONNX, dynamic batch): inference is the generator only
    tags = Tags(trains=True, pixel_level=False, weights=None, export="dynamic", input="rgb")
    # costs.py's protocol (1 and 3 epochs on 32 images, predict at batch 1), timed in CPU seconds on
    # one thread (time.process_time) because the machine was shared (load ~10 on 2 cores)
    cost = Cost(predict=0.0283, fit=0.0984, epoch=0.0268, passes="epochs",
                measured="benchmarks/costs.py's protocol timed in CPU seconds on 1 thread, "
                         "synthetic washer 64 px, 2026-12-02, shared machine")
    smoke = {"image_size": 32, "epochs": 1, "batch_size": 4, "features": 8, "latent": 16}
    #: The official ``reinit_d`` threshold on the discriminator loss.
    d_reinit_below = 1e-5

    def _build(self, pretrained: bool = True) -> None:
        p = self.params
        _check_side(self.image_size)
        self.generator = dcgan_init(GanomalyGenerator(self.image_size, p["latent"], self.channels, p["features"],
                                                      p["extra_layers"]))

    def _discriminator(self) -> GanomalyDiscriminator:
        p = self.params
        return dcgan_init(GanomalyDiscriminator(self.image_size, self.channels, p["features"], p["extra_layers"]))

    def _fit(self, dataset, val_dataset=None) -> None:
        p = self.params
        gen = seed_everything(p["seed"])
        self._build()  # rebuild after seeding: the initial weights depend only on the seed
        device = auto_device(p["device"])
        self.to(device)
        disc = self._discriminator().to(device)
        images = load_images(dataset)
        betas = tuple(p["betas"])
        opt_g = torch.optim.Adam(self.generator.parameters(), lr=p["lr"], betas=betas)
        opt_d = torch.optim.Adam(disc.parameters(), lr=p["lr"], betas=betas)
        weights = (p["w_adv"], p["w_con"], p["w_enc"])
        keys = ("loss_g", "adv", "con", "enc", "loss_d")
        history: dict = {k: [] for k in keys}
        history["d_reinit"] = 0
        bar = progress(range(p["epochs"]), desc=f"fit {self.name}", unit="epoch")
        for epoch in bar:
            self.generator.train()
            disc.train()
            sums, count = dict.fromkeys(keys, 0.0), 0
            for batch in batches(images, p["batch_size"], shuffle=True, generator=gen, drop_last=True):
                x = batch.to(device, non_blocking=True) * 2 - 1
                fake, z, z_hat = self.generator(x)
                pred_real, feat_real = disc(x)  # before G's step, as the official forward_d
                # generator step (eqs. 1-4): D's weights are fixed here, only G learns
                disc.requires_grad_(False)
                losses = generator_losses(x, fake, z, z_hat, feat_real.detach(), disc(fake)[1], weights)
                opt_g.zero_grad(set_to_none=True)
                losses["total"].backward()
                opt_g.step()
                disc.requires_grad_(True)
                # discriminator step on the detached reconstruction
                loss_d = discriminator_loss(pred_real, disc(fake.detach())[0])
                opt_d.zero_grad(set_to_none=True)
                loss_d.backward()
                opt_d.step()
                d = loss_d.item()
                if not (math.isfinite(d) and math.isfinite(losses["total"].item())):
                    raise FloatingPointError(f"fit {self.name}: loss became non-finite at epoch {epoch}")
                if d < self.d_reinit_below:  # D has won: start it again (official reinit_d)
                    dcgan_init(disc)
                    history["d_reinit"] += 1
                n = x.shape[0]
                for k, v in (("loss_g", losses["total"]), ("adv", losses["adv"]), ("con", losses["con"]),
                             ("enc", losses["enc"]), ("loss_d", loss_d)):
                    sums[k] += v.item() * n
                count += n
            for k in keys:
                history[k].append(sums[k] / max(count, 1))
            bar.set_postfix({"G": f"{history['loss_g'][-1]:.4g}", "D": f"{history['loss_d'][-1]:.4g}"})
        self.history = history

    def _predict(self, images: torch.Tensor) -> Prediction:
        if tuple(images.shape[-2:]) != (self.image_size, self.image_size):  # the latent is 1x1 only at this size
            raise DefectscopeError(f"{self.name}: expected images of {self.image_size}x{self.image_size} px, got "
                                   f"{list(images.shape)}; resize them to the model's input_size")
        _, z, z_hat = self.generator(images * 2 - 1)
        return Prediction(score=latent_distance(z, z_hat), anomaly_map=None)
