"""Tensor transforms for images and masks (torch only, no torchvision).

Images are float tensors ``[C, H, W]`` (or batched ``[N, C, H, W]``) in ``[0, 1]``; masks are
``[H, W]`` (or ``[N, H, W]``) with values 0./1. Sizes are ``int`` (square) or ``(H, W)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Mapping, Optional, Tuple, Union

import torch
import torch.nn.functional as F

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "SizeLike",
    "normalize_size",
    "resize_image",
    "resize_mask",
    "to_channels",
    "imagenet_normalize",
    "Preprocess",
]

#: ImageNet channel means (RGB), for backbones pretrained on ImageNet.
IMAGENET_MEAN: Tuple[float, float, float] = (0.485, 0.456, 0.406)
#: ImageNet channel standard deviations (RGB).
IMAGENET_STD: Tuple[float, float, float] = (0.229, 0.224, 0.225)

#: ITU-R 601-2 luminance weights, the same PIL uses for its "L" conversion.
_LUMA = (0.299, 0.587, 0.114)

SizeLike = Union[int, Tuple[int, int], list, None]


def normalize_size(size: SizeLike) -> Optional[Tuple[int, int]]:
    """``int`` -> ``(n, n)``, ``(H, W)`` -> ``(H, W)``, ``None`` -> ``None``; checks positivity."""
    if size is None:
        return None
    if isinstance(size, bool):
        raise ValueError(f"image size must be an int or (H, W), got {size!r}")
    if isinstance(size, int):
        h = w = size
    else:
        try:
            h, w = (int(v) for v in size)
        except (TypeError, ValueError):
            raise ValueError(f"image size must be an int or (H, W), got {size!r}") from None
    if h <= 0 or w <= 0:
        raise ValueError(f"image size must be positive, got {size!r}")
    return (h, w)


def resize_image(img: torch.Tensor, size: SizeLike) -> torch.Tensor:
    """Resize ``[C, H, W]`` (or ``[N, C, H, W]``) to ``size`` with antialiased bilinear filtering.

    ``size=None`` or the current size returns the input unchanged. The result is clamped to [0, 1].
    """
    hw = normalize_size(size)
    if hw is None or tuple(img.shape[-2:]) == hw:
        return img
    if img.dim() not in (3, 4):
        raise ValueError(f"expected an image [C, H, W] or [N, C, H, W], got shape {tuple(img.shape)}")
    batched = img.dim() == 4
    x = img if batched else img[None]
    if not x.is_floating_point():
        x = x.float()
    out = F.interpolate(x, size=hw, mode="bilinear", align_corners=False, antialias=True)
    out = out.clamp_(0.0, 1.0)
    return out if batched else out[0]


def resize_mask(mask: torch.Tensor, size: SizeLike) -> torch.Tensor:
    """Resize a mask ``[H, W]`` (or ``[N, H, W]``) with nearest-neighbour sampling, then binarize.

    The result is float32 with values exactly 0. and 1. (anything > 0.5 becomes 1).
    """
    hw = normalize_size(size)
    if mask.dim() not in (2, 3):
        raise ValueError(f"expected a mask [H, W] or [N, H, W], got shape {tuple(mask.shape)}")
    if hw is None or tuple(mask.shape[-2:]) == hw:
        return (mask > 0.5).float()
    x = mask.float()[None] if mask.dim() == 3 else mask.float()[None, None]
    out = F.interpolate(x, size=hw, mode="nearest-exact")
    out = (out > 0.5).float()
    return out[0] if mask.dim() == 3 else out[0, 0]


def to_channels(img: torch.Tensor, channels: int) -> torch.Tensor:
    """Make an image ``[..., C, H, W]`` have ``channels`` (1 or 3) channels.

    1 -> 3 repeats the channel; 3 -> 1 takes the ITU-R 601-2 luminance (as PIL's "L" mode).
    """
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels!r}")
    c = img.shape[-3]
    if c == channels:
        return img
    if c == 1 and channels == 3:
        reps = [1] * img.dim()
        reps[-3] = 3
        return img.repeat(*reps)
    if c == 3 and channels == 1:
        w = torch.tensor(_LUMA, dtype=img.dtype, device=img.device).view(3, 1, 1)
        return (img * w).sum(dim=-3, keepdim=True)
    raise ValueError(f"cannot convert an image with {c} channels to {channels}")


def imagenet_normalize(img: torch.Tensor) -> torch.Tensor:
    """``(img - IMAGENET_MEAN) / IMAGENET_STD`` per channel for ``[3, H, W]`` or ``[N, 3, H, W]``.

    A one-channel image is first repeated to three channels (ImageNet backbones expect RGB), so the
    result always has three channels.
    """
    if img.dim() not in (3, 4):
        raise ValueError(f"expected an image [C, H, W] or [N, C, H, W], got shape {tuple(img.shape)}")
    img = to_channels(img, 3)
    mean = torch.tensor(IMAGENET_MEAN, dtype=img.dtype, device=img.device).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=img.dtype, device=img.device).view(3, 1, 1)
    return (img - mean) / std


@dataclass(frozen=True)
class Preprocess:
    """The geometric/colour preprocessing a model was trained with: size and channel count.

    ``image_size`` is ``None`` (keep), an int (square) or ``(H, W)``; it is stored as ``(H, W)`` or
    ``None``. ``channels`` is 1 or 3. Picklable, and round-trips through JSON with
    :meth:`to_dict` / :meth:`from_dict`. Calling it on an image tensor ``[C, H, W]`` (or
    ``[N, C, H, W]``) in [0, 1] converts the channels and resizes; it also accepts a path or a PIL
    image, which it reads with :func:`defectscope.imageio.read_image`.
    """

    image_size: Optional[Tuple[int, int]] = (256, 256)
    channels: int = 3

    def __post_init__(self) -> None:
        object.__setattr__(self, "image_size", normalize_size(self.image_size))
        if self.channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {self.channels!r}")

    def __call__(self, img: Any) -> torch.Tensor:
        if not isinstance(img, torch.Tensor):
            from ..imageio import pil_to_tensor, read_image  # local import: io imports nothing from here

            try:
                from PIL import Image
            except ImportError:  # pragma: no cover
                Image = None
            if Image is not None and isinstance(img, Image.Image):
                img = pil_to_tensor(img, self.channels)
            else:
                img = read_image(img, self.channels)
        img = to_channels(img, self.channels)
        return resize_image(img, self.image_size)

    def mask(self, mask: torch.Tensor) -> torch.Tensor:
        """Resize a mask ``[H, W]`` to :attr:`image_size` (nearest neighbour, binarized)."""
        return resize_mask(mask, self.image_size)

    def to_dict(self) -> Dict[str, Any]:
        """JSON-able form: ``{"image_size": [H, W] or None, "channels": C}``."""
        return {
            "image_size": list(self.image_size) if self.image_size is not None else None,
            "channels": int(self.channels),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Preprocess":
        """Inverse of :meth:`to_dict` (unknown keys are ignored)."""
        size = d.get("image_size")
        return cls(image_size=tuple(size) if isinstance(size, (list, tuple)) else size,
                   channels=int(d.get("channels", 3)))
