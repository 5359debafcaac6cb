"""Structural similarity (SSIM) of Wang et al., "Image quality assessment: from error visibility
to structural similarity", IEEE TIP 2004, eq. 13, with an 11x11 Gaussian window (sigma 1.5) and
the constants C1 = (0.01 L)^2, C2 = (0.03 L)^2 (L = data range)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["ssim_map", "ssim"]


def _window(sigma: float, size: int, device, dtype) -> torch.Tensor:
    x = torch.arange(size, device=device, dtype=dtype) - (size - 1) / 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    return g / g.sum()


def _filter(x: torch.Tensor, g: torch.Tensor, pad: bool) -> torch.Tensor:
    c = x.shape[1]
    k = g.numel()
    if pad:
        p = k // 2
        x = F.pad(x, (p, p, p, p), mode="reflect")
    x = F.conv2d(x, g.view(1, 1, 1, k).expand(c, 1, 1, k), groups=c)
    return F.conv2d(x, g.view(1, 1, k, 1).expand(c, 1, k, 1), groups=c)


def ssim_map(x: torch.Tensor, y: torch.Tensor, sigma: float = 1.5, size: int = 11,
             data_range: float = 1.0, pad: bool = True) -> torch.Tensor:
    """Local SSIM between ``x`` and ``y`` ``[B, C, H, W]``, averaged over channels: ``[B, H', W']``.

    With ``pad=True`` the images are reflect-padded so the map has the input size; with
    ``pad=False`` only windows that fit inside the image are used (as scikit-image's mean SSIM).
    """
    g = _window(sigma, size, x.device, x.dtype)
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    mu_x, mu_y = _filter(x, g, pad), _filter(y, g, pad)
    sxx = _filter(x * x, g, pad) - mu_x**2
    syy = _filter(y * y, g, pad) - mu_y**2
    sxy = _filter(x * y, g, pad) - mu_x * mu_y
    s = ((2 * mu_x * mu_y + c1) * (2 * sxy + c2)) / ((mu_x**2 + mu_y**2 + c1) * (sxx + syy + c2))
    return s.mean(dim=1)


def ssim(x: torch.Tensor, y: torch.Tensor, sigma: float = 1.5, size: int = 11, data_range: float = 1.0) -> torch.Tensor:
    """Mean SSIM over the batch (valid windows only): a scalar, 1 for identical images."""
    return ssim_map(x, y, sigma, size, data_range, pad=False).mean()
