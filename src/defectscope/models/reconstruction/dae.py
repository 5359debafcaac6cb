"""Deep autoencoder (DAE): the benchmark guide's deeper baseline.

Architecture as the guide (``shared/seeds/003``, section 2.2), for a 1x128x128 input::

    Enc1..Enc4: [Conv3x3 stride 2 + BN + LeakyReLU(0.2), Conv3x3 + BN + LeakyReLU(0.2)]
                with 32, 64, 128, 256 channels: 128 -> 64 -> 32 -> 16 -> 8
    FC(256*8*8 = 16384 -> 128)   latent
    FC(128 -> 16384)
    Dec4..Dec1: ConvTranspose4x4 stride 2 + Conv3x3 + BN + ReLU with 128, 64, 32, 32 channels
    Conv3x3(32 -> 1) + Sigmoid

The guide fixes the blocks, the channel counts, the resolutions and the bottleneck; it does
not say how each block halves the resolution (we use a stride-2 first convolution) nor what
closes the decoder (we use a 3x3 convolution to the input channels and a Sigmoid, as the SAE).
Loss: ``MSE(x, x_hat) + 0.1 * (1 - SSIM(x, x_hat))`` with SSIM of Wang et al. 2004 (11x11
Gaussian window, sigma 1.5). Training (the guide gives no schedule): Adam, learning rate 1e-3,
batch 32, 30 epochs (the DAE costs about 4x the SAE per epoch).

Anomaly map: squared error per pixel (``map="l2"``, default) or ``1 - local SSIM``
(``map="ssim"``), blurred with sigma 4; image score = the map's maximum.

Parameter count: the guide claims "~200K-500K"; its layer list has 6,292,993 trainable
parameters at 128x128: 4,210,816 in the two FC layers, 2,082,177 in the convolutions and
batch norms. We implement the layer list, not the count.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ...ops.ssim import ssim, ssim_map
from ..cost import Cost
from ._common import ReconstructionModel
from ..base import register
from ..params import Param

WIDTHS = (32, 64, 128, 256)


def _enc_block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, 2, 1), nn.BatchNorm2d(cout), nn.LeakyReLU(0.2, inplace=True),
        nn.Conv2d(cout, cout, 3, 1, 1), nn.BatchNorm2d(cout), nn.LeakyReLU(0.2, inplace=True),
    )


def _dec_block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.ConvTranspose2d(cin, cout, 4, 2, 1),
        nn.Conv2d(cout, cout, 3, 1, 1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
    )


class DeepAENet(nn.Module):
    """The DAE network; ``forward`` returns the reconstruction."""

    def __init__(self, channels: int = 1, image_size: int = 128, latent: int = 128) -> None:
        super().__init__()
        self.side = image_size // 16
        flat = WIDTHS[-1] * self.side * self.side
        ins = (channels,) + WIDTHS[:-1]
        self.encoder = nn.Sequential(*[_enc_block(i, o) for i, o in zip(ins, WIDTHS)], nn.Flatten(), nn.Linear(flat, latent))
        self.fc_dec = nn.Linear(latent, flat)
        outs = (128, 64, 32, 32)
        self.decoder = nn.Sequential(
            *[_dec_block(i, o) for i, o in zip((WIDTHS[-1],) + outs[:-1], outs)],
            nn.Conv2d(outs[-1], channels, 3, 1, 1), nn.Sigmoid(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.encoder(x)
        return self.decoder(self.fc_dec(z).view(x.shape[0], WIDTHS[-1], self.side, self.side))


@register
class DeepAE(ReconstructionModel):
    """Deep autoencoder of the benchmark guide (section 2.2): MSE + 0.1 * (1 - SSIM)."""

    name = "dae"
    description = "Deep autoencoder (guide sec. 2.2): 4 double-conv blocks + FC-128, MSE + 0.1*(1-SSIM)"
    paper = "benchmark guide, sec. 2.2"
    notes = (
        "layer list as the guide (stride-2 first conv per block; 3x3 conv + Sigmoid output); "
        '6,292,993 parameters, not "~200K-500K"'
    )
    overrides = {"epochs": 30}
    hparams = (
        Param("latent", "int", 128, "size of the FC bottleneck", ge=1),
        Param("ssim_weight", "float", 0.1, "weight of the (1 - SSIM) term of the loss", ge=0),
        Param("map", "str", "l2", "anomaly map: squared error (l2) or 1 - local SSIM (ssim)", choices=("l2", "ssim")),
    )
    cost = Cost(predict=0.0148, fit=0.0192, epoch=0.031, passes="epochs",  # benchmarks/costs.py
                measured="benchmarks/costs.py, synthetic:washer 128 px gray, 2026-12-02, quiet machine")
    smoke = {"image_size": 32, "epochs": 1, "batch_size": 4, "latent": 8}

    def _build(self, pretrained: bool = True) -> None:
        self._check_size(16)
        self.net = DeepAENet(self.channels, self.image_size, self.params["latent"])

    def loss(self, images: torch.Tensor) -> torch.Tensor:
        recon = self.net(images)
        return F.mse_loss(recon, images) + self.params["ssim_weight"] * (1 - ssim(recon, images))

    def error_map(self, images: torch.Tensor, recon: torch.Tensor) -> torch.Tensor:
        if self.params["map"] == "ssim":
            return 1 - ssim_map(images, recon)
        return super().error_map(images, recon)
