"""DRAEM: a discriminatively trained reconstruction embedding (Zavrtanik, Kristan, Skocaj, "DRAEM - A
discriminatively trained reconstruction embedding for surface anomaly detection", ICCV 2021),
checked line by line against the authors' code (github.com/VitjanZ/DRAEM: ``model_unet.py``,
``loss.py``, ``train_DRAEM.py``, ``test_DRAEM.py``, ``data_loader.py``) and anomalib 2.7's ``draem``.

Training (paper Sec. 3): normal images get simulated anomalies from the shared synthesiser
(:class:`defectscope.ops.synth.AnomalySynthesizer`: Perlin masks, texture, eq. 2 with the opacity
beta ~ U(0.1, 1.0); an image is left normal with probability 0.5). The *reconstructive*
sub-network (an encoder-decoder without skip connections, base width 128: four max-pools down to
``H/16`` with 1024 channels, bilinear upsampling back, no output activation) maps the augmented
image ``I_a`` to a reconstruction ``I_r`` of the normal image ``I``. The *discriminative*
sub-network (a U-Net with skip connections, base width 64, five max-pools) takes the
concatenation ``[I_r, I_a]`` (6 channels; the official order) and outputs two-class logits per
pixel. Losses (eq. 3-5, the official weights): ``L = L2(I_r, I) + L_SSIM(I_r, I) + L_focal(M_o, M_a)``
with ``L_SSIM = 1 - mean SSIM`` (11x11 Gaussian window, sigma 1.5, zero padding, the data range
chosen from the reconstruction's values as the official ``ssim``) and the focal loss (Lin et al.
2017) with gamma = 2 on the softmax probabilities (the official ``FocalLoss``: alpha 1, one-hot
targets smoothed to [1e-5, 1 - 1e-5], ``p_t + 1e-5``). Gradients of the segmentation loss reach the
reconstructive network (the official code does not detach ``I_r`` in training). Adam, lr 1e-4 for
both networks, batch 8, 700 epochs, the learning rate multiplied by 0.2 after 80 % and 90 % of the
epochs; weights initialised as the official ``weights_init`` (convolutions N(0, 0.02), BatchNorm
scales N(1, 0.02) and shifts 0). As the official data loader, each training image is first rotated
by U(-90, 90) degrees with probability 0.3 (``rotate_p``; anomalib does not).

Inference (paper Sec. 3.4, official ``test_DRAEM.py``): the anomaly map is the discriminative
network's softmax probability of the anomaly class, unsmoothed (``blur_sigma`` 0 here); the image
score is the maximum of that map after a 21x21 mean filter (stride 1, zero padding 10, borders
counted as the official ``avg_pool2d``). anomalib 2.7 scores the maximum of the unfiltered map.

Deviations: the texture source defaults to procedural dead-leaves images
(:func:`~defectscope.ops.synth.generic_images`, no download) instead of DTD; give DTD's folder
(``anomaly_source=/path/to/dtd/images``) for the paper's setting, or ``none`` for anomalib's
fallback. A pool of 200 textures is held per fit (the official code draws from all 5,640 DTD
images). The texture augmentations follow imgaug's within the simplifications listed in
:func:`~defectscope.ops.synth.augment_textures`. The 700 epochs take days on a CPU: ``epochs`` is a
parameter and every figure states its budget. ``width`` scales both networks (1 = the paper's;
smaller only for quick tests). Inference runs BatchNorm-folded ``channels_last`` copies of the two
networks (same results up to float rounding).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ...errors import DefectscopeError
from ...ops.synth import SOURCES, AnomalySynthesizer, rotate
from ...training import train_loop
from .._inference import InferenceCache
from ..base import Prediction, register
from ..cost import Cost
from ..params import Param, Tags
from ._common import ReconstructionModel, focal_loss

__all__ = ["Draem", "ReconstructiveSubNetwork", "DiscriminativeSubNetwork", "draem_ssim_loss",
           "draem_loss", "draem_score", "lr_milestones"]


def _block(cin: int, cout: int, mid: int | None = None) -> nn.Sequential:
    mid = cout if mid is None else mid
    return nn.Sequential(
        nn.Conv2d(cin, mid, 3, padding=1), nn.BatchNorm2d(mid), nn.ReLU(inplace=True),
        nn.Conv2d(mid, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
    )


def _up(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True),
        nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
    )


class _EncoderReconstructive(nn.Module):
    def __init__(self, cin: int, w: int) -> None:
        super().__init__()
        self.block1, self.block2 = _block(cin, w), _block(w, 2 * w)
        self.block3, self.block4, self.block5 = _block(2 * w, 4 * w), _block(4 * w, 8 * w), _block(8 * w, 8 * w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(self.block1(x), 2)
        x = F.max_pool2d(self.block2(x), 2)
        x = F.max_pool2d(self.block3(x), 2)
        x = F.max_pool2d(self.block4(x), 2)
        return self.block5(x)


class _DecoderReconstructive(nn.Module):
    def __init__(self, w: int, cout: int) -> None:
        super().__init__()
        self.up1, self.db1 = _up(8 * w, 8 * w), _block(8 * w, 4 * w, mid=8 * w)
        self.up2, self.db2 = _up(4 * w, 4 * w), _block(4 * w, 2 * w, mid=4 * w)
        self.up3, self.db3 = _up(2 * w, 2 * w), _block(2 * w, w, mid=2 * w)
        self.up4, self.db4 = _up(w, w), _block(w, w)
        self.fin_out = nn.Sequential(nn.Conv2d(w, cout, 3, padding=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.db1(self.up1(x))
        x = self.db2(self.up2(x))
        x = self.db3(self.up3(x))
        x = self.db4(self.up4(x))
        return self.fin_out(x)


class ReconstructiveSubNetwork(nn.Module):
    """The reconstructive encoder-decoder (official ``ReconstructiveSubNetwork``, same tensor
    names): ``[B, C, H, W]`` -> ``[B, C, H, W]``, no skip connections, no output activation."""

    def __init__(self, channels: int = 3, base_width: int = 128) -> None:
        super().__init__()
        self.encoder = _EncoderReconstructive(channels, base_width)
        self.decoder = _DecoderReconstructive(base_width, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder(x))


class _EncoderDiscriminative(nn.Module):
    def __init__(self, cin: int, w: int) -> None:
        super().__init__()
        self.block1, self.block2, self.block3 = _block(cin, w), _block(w, 2 * w), _block(2 * w, 4 * w)
        self.block4, self.block5, self.block6 = _block(4 * w, 8 * w), _block(8 * w, 8 * w), _block(8 * w, 8 * w)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        b1 = self.block1(x)
        b2 = self.block2(F.max_pool2d(b1, 2))
        b3 = self.block3(F.max_pool2d(b2, 2))
        b4 = self.block4(F.max_pool2d(b3, 2))
        b5 = self.block5(F.max_pool2d(b4, 2))
        b6 = self.block6(F.max_pool2d(b5, 2))
        return b1, b2, b3, b4, b5, b6


class _DecoderDiscriminative(nn.Module):
    def __init__(self, w: int, cout: int) -> None:
        super().__init__()
        self.up_b, self.db_b = _up(8 * w, 8 * w), _block(16 * w, 8 * w)
        self.up1, self.db1 = _up(8 * w, 4 * w), _block(12 * w, 4 * w)
        self.up2, self.db2 = _up(4 * w, 2 * w), _block(6 * w, 2 * w)
        self.up3, self.db3 = _up(2 * w, w), _block(3 * w, w)
        self.up4, self.db4 = _up(w, w), _block(2 * w, w)
        self.fin_out = nn.Sequential(nn.Conv2d(w, cout, 3, padding=1))

    def forward(self, b1, b2, b3, b4, b5, b6) -> torch.Tensor:
        x = self.db_b(torch.cat((self.up_b(b6), b5), dim=1))
        x = self.db1(torch.cat((self.up1(x), b4), dim=1))
        x = self.db2(torch.cat((self.up2(x), b3), dim=1))
        x = self.db3(torch.cat((self.up3(x), b2), dim=1))
        x = self.db4(torch.cat((self.up4(x), b1), dim=1))
        return self.fin_out(x)


class DiscriminativeSubNetwork(nn.Module):
    """The discriminative U-Net (official ``DiscriminativeSubNetwork``, same tensor names):
    ``[B, 2C, H, W]`` -> two-class logits ``[B, 2, H, W]``."""

    def __init__(self, in_channels: int = 6, base_width: int = 64, out_channels: int = 2) -> None:
        super().__init__()
        self.encoder_segment = _EncoderDiscriminative(in_channels, base_width)
        self.decoder_segment = _DecoderDiscriminative(base_width, out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder_segment(*self.encoder_segment(x))


def _init_weights(module: nn.Module) -> None:
    """The official ``weights_init``: convolution weights N(0, 0.02) (biases keep PyTorch's
    default), BatchNorm scales N(1, 0.02) and shifts 0."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.normal_(m.weight, 0.0, 0.02)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.normal_(m.weight, 1.0, 0.02)
            nn.init.zeros_(m.bias)


# ------------------------------------------------------------------------------------------------
# losses and score


def _gaussian_window(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float64) - size // 2
    g = torch.exp(-(x ** 2) / (2 * sigma ** 2))
    g = (g / g.sum()).float()
    return g[:, None] @ g[None, :]


def draem_ssim_loss(rec: torch.Tensor, target: torch.Tensor, window_size: int = 11) -> torch.Tensor:
    """``1 - mean SSIM(rec, target)`` as the official ``loss.SSIM``: a ``window_size`` Gaussian
    window (sigma 1.5) per channel with zero padding ``window_size // 2``, averaged over every pixel
    and channel; the data range ``L`` is read from ``rec`` (255 if its maximum exceeds 128, else 1,
    minus -1 if its minimum is below -0.5, else 0)."""
    c = rec.shape[1]
    hi = 255.0 if float(rec.detach().max()) > 128 else 1.0
    lo = -1.0 if float(rec.detach().min()) < -0.5 else 0.0
    rng = hi - lo
    win = _gaussian_window(window_size).to(rec).expand(c, 1, window_size, window_size)
    pad = window_size // 2

    def filt(x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, win, padding=pad, groups=c)

    mu1, mu2 = filt(rec), filt(target)
    s11 = filt(rec * rec) - mu1 * mu1
    s22 = filt(target * target) - mu2 * mu2
    s12 = filt(rec * target) - mu1 * mu2
    c1, c2 = (0.01 * rng) ** 2, (0.03 * rng) ** 2
    ssim_map = ((2 * mu1 * mu2 + c1) * (2 * s12 + c2)) / ((mu1 * mu1 + mu2 * mu2 + c1) * (s11 + s22 + c2))
    return 1.0 - ssim_map.mean()


def draem_loss(image: torch.Tensor, rec: torch.Tensor, mask: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Eq. 5 with the official weights: ``L2(rec, image) + L_SSIM(rec, image) + focal(softmax(logits), mask)``."""
    return F.mse_loss(rec, image) + draem_ssim_loss(rec, image) + focal_loss(torch.softmax(logits, dim=1), mask)


def lr_milestones(epochs: int) -> list[int]:
    """The epochs after which the learning rate is multiplied by 0.2: 80 % and 90 % of the schedule
    (official ``MultiStepLR(optimizer, [epochs * 0.8, epochs * 0.9], gamma=0.2)``, rounded up)."""
    return [math.ceil(0.8 * epochs), math.ceil(0.9 * epochs)]


def draem_score(amap: torch.Tensor, pool: int = 21) -> torch.Tensor:
    """Image score ``[B]``: the maximum of ``amap`` ``[B, H, W]`` after a ``pool x pool`` mean
    filter (stride 1, zero padding ``pool // 2``, padded zeros counted), as ``test_DRAEM.py``."""
    pooled = F.avg_pool2d(amap.unsqueeze(1), pool, stride=1, padding=pool // 2)
    return pooled.flatten(1).amax(dim=1)


# ------------------------------------------------------------------------------------------------


@register
class Draem(ReconstructionModel):
    """DRAEM (ICCV 2021): reconstructive + discriminative networks trained on simulated anomalies."""

    name = "draem"
    description = ("DRAEM (ICCV 2021): reconstructive + discriminative U-Nets trained on simulated anomalies "
                   "(Perlin masks + textures); map = the discriminative network's output")
    paper = "Zavrtanik, Kristan, Skocaj, DRAEM, ICCV 2021"
    notes = (
        "paper/official defaults (widths 128/64, L2 + SSIM + focal, Adam 1e-4, batch 8, 700 epochs, lr x0.2 at "
        "80/90 %, beta U(0.1, 1)); textures: procedural dead leaves instead of DTD by default (anomaly_source: a "
        "folder such as DTD, or none), a pool of 200 per fit; map unsmoothed, image score = max of the 21x21 "
        "mean-filtered map (official; anomalib: raw max)"
    )
    overrides = {"channels": 3, "blur_sigma": 0.0}
    hparams = (
        Param("image_size", "int", 256, "input side in pixels (a multiple of 32, at least 64)", ge=64),
        Param("epochs", "int", 700, "training epochs (paper: 700; the learning rate drops x0.2 at 80 % and 90 %)",
              ge=1),
        Param("batch_size", "int", 8, "training batch size", ge=1),
        Param("lr", "float", 1e-4, "Adam learning rate of both networks", gt=0),
        Param("anomaly_source", "str", "procedural", "what fills the simulated anomalies: procedural dead-leaves "
              "textures, none (the Perlin noise itself, anomalib's fallback) or a folder of texture images (e.g. "
              "DTD's images/)", choices=SOURCES, path=True),
        Param("beta", "floats", (0.1, 1.0), "range of the texture opacity beta of eq. 2, drawn per image", length=2,
              ge=0, le=1),
        Param("rotate_p", "float", 0.3, "probability that a training image is first rotated by U(-90, 90) degrees "
              "(official data loader; 0 = anomalib)", ge=0, le=1),
        Param("score_pool", "int", 21, "side of the mean filter before the image score's maximum (odd)", ge=1),
        Param("width", "float", 1.0, "scales the base widths of both networks (1 = the paper's 128 and 64; "
              "smaller only for quick tests)", gt=0, le=4),
    )
    tags = Tags(trains=True, weights=None, input="rgb")
    # benchmarks/draem_step.py on a quiet 2-core machine: a training step of batch 8 at 256 px takes 74 s
    # (DRAEM's 700 epochs of 200 images: about two weeks); costs.py would take ~11 min at this size.
    cost = Cost(predict=2.1, epoch=9.2, passes="epochs", measured="benchmarks/draem_step.py, 256 px, 2 threads, 2026-12-02")
    smoke = {"image_size": 64, "epochs": 1, "batch_size": 4, "width": 0.0625}

    def _build(self, pretrained: bool = True) -> None:
        p = self.params
        self._check_size(32)
        if p["score_pool"] % 2 == 0:
            raise DefectscopeError(f"draem: score_pool must be odd (a centred window), got {p['score_pool']}")
        if p["beta"][0] > p["beta"][1]:
            raise DefectscopeError(f"draem: beta must be a range (low, high), got {p['beta']}")
        w = p["width"]
        self.reconstructive = ReconstructiveSubNetwork(self.channels, max(1, round(128 * w)))
        self.discriminative = DiscriminativeSubNetwork(2 * self.channels, max(1, round(64 * w)), 2)
        _init_weights(self)
        self._cache = InferenceCache()

    def _fit(self, dataset, val_dataset=None) -> None:
        p = self.params
        synth = AnomalySynthesizer(p["anomaly_source"], beta=tuple(p["beta"]))  # checks a folder before any work
        gen, device, images, val = self._start_fit(dataset, val_dataset)
        params = list(self.reconstructive.parameters()) + list(self.discriminative.parameters())
        opt = torch.optim.Adam(params, lr=p["lr"], fused=True)  # one pass per parameter (docs/DESIGN.md)
        epochs = p["epochs"]
        sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=lr_milestones(epochs), gamma=0.2)
        rotate_p = p["rotate_p"]

        def loss_fn(batch: torch.Tensor) -> torch.Tensor:
            b = batch.shape[0]
            if rotate_p > 0:
                turn = (torch.rand(b, generator=gen) < rotate_p).to(batch.device).view(b, 1, 1, 1)
                angle = -90 + 180 * torch.rand(b, generator=gen)
                batch = torch.where(turn, rotate(batch, angle), batch)
            augmented, mask = synth(batch, gen)
            rec = self.reconstructive(augmented)
            logits = self.discriminative(torch.cat((rec, augmented), dim=1))
            return draem_loss(batch, rec, mask, logits)

        self._cache.clear()
        self.history = train_loop(
            self, loss_fn, images, epochs=epochs, optimizer=opt, batch_size=p["batch_size"], generator=gen,
            val_images=val, patience=p["patience"], scheduler=sched, desc=f"fit {self.name}", device=device,
        )
        self._cache.clear()

    def _networks(self) -> tuple[nn.Module, nn.Module]:
        if self.training or torch.is_grad_enabled():
            return self.reconstructive, self.discriminative
        return (self._cache.get("reconstructive", self.reconstructive),
                self._cache.get("discriminative", self.discriminative))

    def anomaly_probability(self, images: torch.Tensor) -> torch.Tensor:
        """The discriminative network's softmax probability of the anomaly class ``[B, H, W]``."""
        rec_net, seg_net = self._networks()
        rec = rec_net(images)
        logits = seg_net(torch.cat((rec, images), dim=1))
        return torch.softmax(logits, dim=1)[:, 1]

    def _predict(self, images: torch.Tensor) -> Prediction:
        prob = self.anomaly_probability(images)
        score = draem_score(prob, self.params["score_pool"])
        sigma = self.params["blur_sigma"]
        if sigma > 0:
            from ...ops.blur import gaussian_blur

            prob = gaussian_blur(prob, sigma)
        return Prediction(score=score, anomaly_map=prob)
