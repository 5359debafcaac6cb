"""The networks of EfficientAD (Batzner et al., "EfficientAD: Accurate Visual Anomaly Detection at
Millisecond-Level Latencies", WACV 2024) and the generic images it needs, offline.

* :class:`PDN`: the patch description network (paper Sec. 3.1, Table of the appendix). Size S:
  conv 4x4 (128) - avgpool 2x2/2 - conv 4x4 (256) - avgpool 2x2/2 - conv 3x3 (256) - conv 4x4
  (out); size M: conv 4x4 (256) - avgpool - conv 4x4 (512) - avgpool - conv 1x1 (512) - conv 3x3
  (512) - conv 4x4 (out) - conv 1x1 (out). ReLU after every conv but the last. Receptive field
  33x33 in both sizes, so an output vector describes one 33x33 patch. ``padding=True`` is the
  paper table's zero padding (output ``H/4``); ``padding=False`` (anomalib's and the public
  re-implementation's default) removes it (output ``H/4 - 8``) so that every output depends only on
  its patch's pixels. The input is standardised with the ImageNet mean/std inside ``forward``.
  The teacher has ``out`` = 384 channels, the student the same architecture with 768 (384 that
  mimic the teacher, 384 that mimic the autoencoder).
* :class:`AutoEncoder`: the paper's autoencoder: six strided 4x4 convolutions down to a 64-d
  code (1x1), then eight convolutions with bilinear resizes and dropout 0.2 back up to the PDN's
  output grid with 384 channels (paper appendix; the resize sizes are those of anomalib/the
  re-implementation: ``H/64 - 1, H/32, H/16 - 1, H/8, H/4 - 1, H/2 - 1``, then the PDN grid).
* ``width`` scales every hidden channel count (and nothing else): 1.0 is the paper's network;
  smaller values only exist to keep unit tests fast.
* :func:`generic_images`: procedural "dead leaves" images (occluding discs and rotated squares
  with power-law sizes, random colours, a smooth shading and fine noise) - a classic stand-in for
  natural-image statistics (Lee, Mumford & Huang 2001; Baradad et al., "Learning to See by
  Looking at Noise", NeurIPS 2021). They replace ImageNet/imagenette, which cannot be downloaded
  here, as the generic images of the penalty loss and of teacher distillation. It lives in
  :mod:`defectscope.ops.synth` (shared with the anomaly synthesiser of DRAEM and DSR) and is
  imported here.
* :func:`augment`: the paper's augmentation for the autoencoder branch: one of brightness,
  contrast or saturation with a factor drawn from U(0.8, 1.2) (torchvision's formulas).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ...ops.synth import generic_images  # noqa: F401  (moved to ops.synth, shared with the anomaly synthesiser)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SIZES = ("S", "M")


def _ch(n: int, width: float) -> int:
    return max(4, int(round(n * width)))


def _size(size: str) -> str:
    s = str(size).strip().upper()[:1]
    if s not in SIZES:
        raise ValueError(f"EfficientAD size must be 'S' or 'M', got {size!r}")
    return s


class _Normalized(nn.Module):
    """Base: a network whose input is standardised with the ImageNet mean/std (unless folded)."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("in_mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("in_std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.input_norm = True

    def normalize_input(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        return (x - self.in_mean) / self.in_std if self.input_norm else x


class PDN(_Normalized):
    """Patch description network, size ``"S"`` or ``"M"``: ``[B, 3, H, W]`` -> ``[B, out, h, w]``.

    Convolutions are named ``conv1``...``conv4`` (S) / ``conv6`` (M) with the pooling in between,
    the names anomalib's ``pretrained_teacher_{small,medium}.pth`` use, so a state dict carries over.
    """

    def __init__(self, size: str = "S", out_channels: int = 384, padding: bool = False, width: float = 1.0) -> None:
        super().__init__()
        self.size, self.out_channels, self.padding = _size(size), int(out_channels), bool(padding)
        p = 1 if padding else 0
        a, b = (_ch(128, width), _ch(256, width)) if self.size == "S" else (_ch(256, width), _ch(512, width))
        self.conv1 = nn.Conv2d(3, a, 4, padding=3 * p)
        self.conv2 = nn.Conv2d(a, b, 4, padding=3 * p)
        if self.size == "S":
            self.conv3 = nn.Conv2d(b, b, 3, padding=p)
            self.conv4 = nn.Conv2d(b, out_channels, 4)
            self.tail = ("conv3", "conv4")
        else:
            self.conv3 = nn.Conv2d(b, b, 1)
            self.conv4 = nn.Conv2d(b, b, 3, padding=p)
            self.conv5 = nn.Conv2d(b, out_channels, 4)
            self.conv6 = nn.Conv2d(out_channels, out_channels, 1)
            self.tail = ("conv3", "conv4", "conv5", "conv6")
        self.pool_pad = p

    @property
    def last(self) -> nn.Conv2d:
        return getattr(self, self.tail[-1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.normalize_input(x)
        x = F.avg_pool2d(F.relu(self.conv1(x)), 2, 2, padding=self.pool_pad)
        x = F.avg_pool2d(F.relu(self.conv2(x)), 2, 2, padding=self.pool_pad)
        for name in self.tail[:-1]:
            x = F.relu(getattr(self, name)(x))
        return self.last(x)


def pdn_output_size(image_size: int, padding: bool) -> int:
    """Side of the PDN output grid for a square input of side ``image_size``."""
    if padding:
        s = (image_size + 3) // 2 + 1
        s = (s + 3) // 2 + 1
        return s - 3
    s = (image_size - 3) // 2
    s = (s - 3) // 2
    return s - 2 - 3


class AutoEncoder(_Normalized):
    """EfficientAD's autoencoder: ``[B, 3, H, W]`` -> ``[B, out, h, w]`` on the PDN's output grid."""

    def __init__(self, out_channels: int = 384, padding: bool = False, width: float = 1.0) -> None:
        super().__init__()
        self.padding = bool(padding)
        c32, c64 = _ch(32, width), _ch(64, width)
        chans = [3, c32, c32, c64, c64, c64]
        self.encoder = nn.ModuleList(nn.Conv2d(chans[i], chans[i + 1], 4, stride=2, padding=1) for i in range(5))
        self.encoder.append(nn.Conv2d(c64, c64, 8))
        self.decoder = nn.ModuleList(nn.Conv2d(c64, c64, 4, padding=2) for _ in range(6))
        self.decoder.append(nn.Conv2d(c64, c64, 3, padding=1))
        self.decoder.append(nn.Conv2d(c64, out_channels, 3, padding=1))
        self.dropout = nn.Dropout(0.2)

    @property
    def last(self) -> nn.Conv2d:
        return self.decoder[-1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        x = self.normalize_input(x)
        for i, conv in enumerate(self.encoder):
            x = conv(x)
            if i < len(self.encoder) - 1:
                x = F.relu(x)
        last = (math.ceil(h / 4) - (0 if self.padding else 8), math.ceil(w / 4) - (0 if self.padding else 8))
        sizes = [(h // 64 - 1, w // 64 - 1), (h // 32, w // 32), (h // 16 - 1, w // 16 - 1), (h // 8, w // 8),
                 (h // 4 - 1, w // 4 - 1), (h // 2 - 1, w // 2 - 1), last]
        for i, size in enumerate(sizes):
            x = F.interpolate(x, size=size, mode="bilinear")
            x = F.relu(self.decoder[i](x))
            if i < 6:
                x = self.dropout(x)
        return self.decoder[7](x)


# ------------------------------------------------------------------------------------------------
# generic images and augmentation


def random_flip_rotate(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One of the 8 flips/right-angle rotations of a batch (the same for the whole batch)."""
    k = int(torch.randint(0, 8, (1,), generator=generator))
    if k >= 4:
        x = x.flip(-1)
    return torch.rot90(x, k % 4, dims=(-2, -1)) if x.shape[-1] == x.shape[-2] else x


def _gray(x: torch.Tensor) -> torch.Tensor:
    return (0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3]) if x.shape[1] == 3 else x


def augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Paper's autoencoder augmentation: brightness, contrast or saturation, factor ~ U(0.8, 1.2)
    (torchvision's ``adjust_*`` formulas: blend with black, with the mean grey level, with the
    grey image), one per call."""
    f = 0.8 + 0.4 * float(torch.rand(1, generator=generator))
    kind = int(torch.randint(0, 3, (1,), generator=generator))
    if kind == 0:
        out = x * f
    elif kind == 1:
        out = f * x + (1 - f) * _gray(x).mean(dim=(-3, -2, -1), keepdim=True)
    else:
        out = f * x + (1 - f) * _gray(x)
    return out.clamp(0, 1)
