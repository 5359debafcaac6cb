"""Gaussian smoothing and resizing of anomaly maps.

The smoothing follows the convention of anomalib's ``GaussianBlur2d`` (used by its PatchCore, PaDiM,
... post-processing): kernel size ``2 * int(4 * sigma + 0.5) + 1``, a normalised sampled Gaussian,
reflect padding (the border sample is not repeated: ``d c b | a b c d | c b a``). This is exactly
``scipy.ndimage.gaussian_filter(map, sigma, mode="mirror", truncate=4.0)`` on each map.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["gaussian_kernel1d", "blur_operator", "gaussian_blur", "upsample"]


def gaussian_kernel1d(sigma: float, radius: int | None = None, *, dtype=torch.float32,
                      device=None) -> torch.Tensor:
    """Normalised sampled Gaussian ``[2 * radius + 1]``; radius defaults to ``int(4 sigma + 0.5)``."""
    if radius is None:
        radius = int(4.0 * float(sigma) + 0.5)
    # The weights are computed in float64 and rounded once.
    x = torch.arange(-radius, radius + 1, dtype=torch.float64)
    g = torch.exp(-0.5 * (x / float(sigma)) ** 2)
    return (g / g.sum()).to(dtype=dtype, device=device)


def _mirror_pad(x: torch.Tensor, radius: int, dim: int) -> torch.Tensor:
    """Reflect-pad ``radius`` samples on both ends of ``dim`` (mode 'mirror' of scipy).

    ``F.pad(mode="reflect")`` needs ``radius < size``; for smaller maps the reflection is repeated
    (period ``2 * (size - 1)``), exactly as scipy does, instead of failing."""
    size = x.shape[dim]
    if radius == 0:
        return x
    if radius < size:
        pad = [0, 0, 0, 0]
        pad[0 if dim == x.ndim - 1 else 2] = radius
        pad[1 if dim == x.ndim - 1 else 3] = radius
        return F.pad(x, pad, mode="reflect")
    pos = torch.arange(-radius, size + radius, device=x.device)
    if size == 1:
        pos = torch.zeros_like(pos)
    else:
        period = 2 * (size - 1)
        pos = pos.remainder(period)
        pos = torch.where(pos >= size, period - pos, pos)
    return x.index_select(dim, pos)


def _convolve(x: torch.Tensor, k: torch.Tensor, dim: int) -> torch.Tensor:
    """``x [N, 1, H, W]`` convolved along ``dim`` (3: W, 2: H) with the odd 1-D kernel ``k``, mirror
    padding: the output has the input's size."""
    shape = (1, 1, 1, -1) if dim == 3 else (1, 1, -1, 1)
    return F.conv2d(_mirror_pad(x, k.numel() // 2, dim), k.view(shape))


# Maps up to this side are blurred by two matrix products with a cached operator, larger ones by
# two 1-D convolutions. Same result (the operator is the convolution applied to the identity);
# the products run near the cores' matrix-product peak, while a one-channel convolution of the
# 33-tap sigma-4 kernel does not: one 256 px map at 1 thread, 0.43 against 1.57 ms (medians of
# 40, on a machine with other work running). The product costs 2 H W (H + W) operations, so past
# about 1024 px the convolution wins.
MATMUL_MAX_SIDE = 1024
_OPERATORS: dict[tuple, torch.Tensor] = {}


def blur_operator(n: int, sigma: float, *, dtype=torch.float32, device=None) -> torch.Tensor:
    """The ``[n, n]`` matrix ``T`` of the 1-D Gaussian blur (mirror padding) of length-``n``
    signals: ``x @ T`` blurs the rows of ``x``. Built in float64 by blurring the identity with the
    convolution path, cached per (n, sigma, dtype, device)."""
    key = (int(n), float(sigma), dtype, str(device))
    op = _OPERATORS.get(key)
    if op is None:
        eye = torch.eye(n, dtype=torch.float64).reshape(n, 1, 1, n)
        op = _convolve(eye, gaussian_kernel1d(sigma, dtype=torch.float64), 3).reshape(n, n).to(dtype=dtype,
                                                                                              device=device)
        if len(_OPERATORS) >= 64:
            _OPERATORS.clear()
        _OPERATORS[key] = op
    return op


def gaussian_blur(maps: torch.Tensor, sigma: float = 4.0) -> torch.Tensor:
    """Gaussian smoothing of anomaly maps over their last two dimensions.

    Args:
        maps: ``[B, H, W]`` or ``[B, 1, H, W]`` (any leading dimensions work; the last two are
            the image axes).
        sigma: standard deviation in pixels; ``sigma <= 0`` returns the maps unchanged.

    Returns:
        The smoothed maps, same shape; float32 unless the input is float64 (kept). Separable: one
        horizontal and one vertical 1-D convolution with the kernel of :func:`gaussian_kernel1d`,
        reflect ('mirror') padding so the output has the input's size, whatever that size (maps
        smaller than the kernel are mirrored repeatedly, as scipy does). Up to
        :data:`MATMUL_MAX_SIDE` px a side, the two convolutions run as two matrix products with
        :func:`blur_operator` (the same linear map; equal up to float rounding).
    """
    if maps.ndim < 2:
        raise ValueError(f"maps must have at least 2 dimensions [.., H, W], got {tuple(maps.shape)}")
    if sigma <= 0:
        return maps
    dtype = torch.float64 if maps.dtype == torch.float64 else torch.float32
    shape = maps.shape
    h, w = shape[-2:]
    if max(h, w) <= MATMUL_MAX_SIDE:
        x = maps.to(dtype).reshape(-1, h, w)
        rows = blur_operator(w, sigma, dtype=dtype, device=x.device)
        cols = blur_operator(h, sigma, dtype=dtype, device=x.device)
        return torch.matmul(cols.t(), torch.matmul(x, rows)).reshape(shape)
    x = maps.to(dtype).reshape(-1, 1, h, w)
    k = gaussian_kernel1d(sigma, dtype=dtype, device=x.device)
    return _convolve(_convolve(x, k, 3), k, 2).reshape(shape)


def upsample(maps: torch.Tensor, size: int | tuple[int, int]) -> torch.Tensor:
    """Bilinear resize (``align_corners=False``) of ``[B, h, w]`` or ``[B, C, h, w]`` maps to
    ``size`` (an int for square, or ``(H, W)``); returns the same layout at the new size."""
    if maps.ndim == 3:
        return F.interpolate(maps[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]
    return F.interpolate(maps, size=size, mode="bilinear", align_corners=False)
