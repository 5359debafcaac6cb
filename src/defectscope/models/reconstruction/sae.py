"""Sparse autoencoder (SAE): the benchmark guide's lightweight baseline.

Architecture exactly as the guide (``shared/seeds/003``, section 2.1), for a 1x128x128 input::

    Conv2d(1->32, k4, s2) + BN + ReLU -> Conv2d(32->64, k4, s2) + BN + ReLU
    -> FC(64*32*32 = 65536 -> 64)      latent (the sparse code)
    -> FC(64 -> 65536) -> ConvTranspose2d(64->32, k4, s2) + BN + ReLU
    -> ConvTranspose2d(32->1, k4, s2) + Sigmoid

Padding 1 on every (transposed) convolution, so 128 -> 64 -> 32 -> 64 -> 128 as the guide's
65536 = 64*32*32 requires. The latent and the decoder's first FC are linear (the guide names no
activation there). Loss: ``MSE(x, x_hat) + lambda * mean|z|`` with lambda = 0.001.
Training (the guide gives no schedule): Adam, learning rate 1e-3, batch 32, 50 epochs.

Parameter count: the guide claims "~22K-50K"; the layer list it gives has 8,521,153 trainable
parameters at 128x128, 99% of them in the two FC layers (4,194,368 + 4,259,840); the four
convolutions alone have 66,689, which is about the guide's figure. We implement the layer list,
not the count.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..cost import Cost
from ._common import ReconstructionModel
from ..base import register
from ..params import Param


class SparseAENet(nn.Module):
    """The SAE network; ``forward`` returns the reconstruction, ``encode`` the latent code."""

    def __init__(self, channels: int = 1, image_size: int = 128, latent: int = 64) -> None:
        super().__init__()
        self.side = image_size // 4
        flat = 64 * self.side * self.side
        self.encoder = nn.Sequential(
            nn.Conv2d(channels, 32, 4, 2, 1), nn.BatchNorm2d(32), nn.ReLU(inplace=True),
            nn.Conv2d(32, 64, 4, 2, 1), nn.BatchNorm2d(64), nn.ReLU(inplace=True),
            nn.Flatten(), nn.Linear(flat, latent),
        )
        self.fc_dec = nn.Linear(latent, flat)
        self.decoder = nn.Sequential(
            nn.ConvTranspose2d(64, 32, 4, 2, 1), nn.BatchNorm2d(32), nn.ReLU(inplace=True),
            nn.ConvTranspose2d(32, channels, 4, 2, 1), nn.Sigmoid(),
        )

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.fc_dec(z).view(z.shape[0], 64, self.side, self.side))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x))


@register
class SparseAE(ReconstructionModel):
    """Sparse autoencoder of the benchmark guide (section 2.1): MSE + 0.001 * L1(latent)."""

    name = "sae"
    description = "Sparse autoencoder (guide sec. 2.1): 2 conv + FC-64 bottleneck, MSE + 0.001*L1(latent)"
    paper = "benchmark guide, sec. 2.1"
    notes = (
        'layer list exactly as the guide; it has 8,521,153 parameters, not the guide\'s "~22K-50K" '
        "(the four convolutions alone have 66,689)"
    )
    hparams = (
        Param("latent", "int", 64, "size of the FC bottleneck (the sparse code)", ge=1),
        Param("l1_weight", "float", 1e-3, "lambda of the L1 sparsity penalty on the latent code", ge=0),
    )
    cost = Cost(predict=0.00685, fit=0.00778, epoch=0.00744, passes="epochs",  # benchmarks/costs.py
                measured="benchmarks/costs.py, synthetic:washer 128 px gray, 2026-12-02, quiet machine")
    smoke = {"image_size": 32, "epochs": 1, "batch_size": 4, "latent": 8}

    def _build(self, pretrained: bool = True) -> None:
        self._check_size(4)
        self.net = SparseAENet(self.channels, self.image_size, self.params["latent"])

    def loss(self, images: torch.Tensor) -> torch.Tensor:
        z = self.net.encode(images)
        recon = self.net.decode(z)
        return F.mse_loss(recon, images) + self.params["l1_weight"] * z.abs().mean()
