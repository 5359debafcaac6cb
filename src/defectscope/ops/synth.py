"""The anomaly synthesiser shared by every method that learns from simulated defects (DRAEM, DSR,
SuperSimpleNet...): Perlin-noise masks filled with a foreign texture and blended into normal images.

It follows DRAEM (Zavrtanik, Kristan, Skocaj, "DRAEM - A discriminatively trained reconstruction
embedding for surface anomaly detection", ICCV 2021, Sec. 3.3, Fig. 4, eq. 2) and the authors'
code (github.com/VitjanZ/DRAEM, ``data_loader.py``, ``perlin.py``):

* :func:`perlin_noise`: 2-D Perlin noise (quintic fade, unit gradients at random angles, scaled by
  sqrt 2), with per image a random lattice of ``2**randint(min_scale, max_scale)`` cells on each
  axis (official: ``min_perlin_scale = 0``, ``perlin_scale = 6``, ``torch.randint``'s exclusive upper
  bound, so 1, 2, 4, 8, 16 or 32 cells a side). The noise is computed on a square lattice of at least
  256 px (the official resolution, where the finest lattice has 8 px cells) and sampled at the
  pixel centres of smaller images (nearest), so a 64 px mask is a 256 px one at lower resolution
  with the same area statistics, not a field sampled on its lattice points (where it is 0).
* :func:`perlin_masks`: the noise rotated by a random angle in (-90, 90) degrees (bilinear, zero
  fill: imgaug's ``Affine(rotate=(-90, 90))``), thresholded at 0.5; with probability ``empty_p``
  (official 0.5) the image gets no anomaly and the mask is all zero.
* :func:`generic_images`: procedural "dead leaves" images (the textures made offline, also
  EfficientAD's generic images), painted with tensor operations.
* :func:`augment_textures`: DRAEM's texture augmentation: 3 distinct operations drawn at random,
  in random order, from the official list of ten (imgaug): gamma contrast, brightness (multiply and
  add), PIL sharpness, hue and saturation, solarize, posterize, invert, PIL autocontrast, PIL
  equalize, rotation.
* :class:`AnomalySynthesizer`: the whole recipe on a batch, eq. 2 of the paper::

      I_a = (1 - M) * I + (1 - beta) * (M * I) + beta * (M * A),   beta ~ U(0.1, 1.0) per image

  (the paper's range; the official code draws ``beta' ~ U(0, 0.8)`` and weighs the texture by
  ``1 - beta'``, i.e. an opacity in (0.2, 1.0), which is anomalib's default too).

Texture sources (``source``): ``"procedural"`` (the default: a pool of :func:`generic_images`),
a folder of images (the papers use DTD, Cimpoi et al. 2014; read recursively with
:mod:`defectscope.imageio`), or ``"none"``: no texture, as anomalib 2.x's
``PerlinAnomalyGenerator`` without a source folder, which fills the mask with the rotated Perlin
noise itself, ``0.5 * noise + 0.25`` in every channel, then augments it like a texture.

Everything is batched: the Python loops run over images (to draw parameters from the caller's
generator), over the ten augmentation kinds, or over chunks; never over pixels or shapes.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F

from ..errors import DefectscopeError

__all__ = [
    "perlin_noise",
    "perlin_masks",
    "generic_images",
    "augment_textures",
    "rotate",
    "AnomalySynthesizer",
    "AUGMENTATIONS",
    "SOURCES",
]

#: The texture sources besides a folder path.
SOURCES = ("procedural", "none")

#: DRAEM's texture augmentations (official ``data_loader.py``), in the official order.
AUGMENTATIONS = ("gamma", "brightness", "sharpness", "hue_saturation", "solarize", "posterize", "invert",
                 "autocontrast", "equalize", "rotate")

#: Perlin noise is computed on a lattice of at least this side, then resized to the image.
_MIN_NOISE_SIDE = 256


def _pair(size) -> tuple[int, int]:
    if isinstance(size, int):
        return int(size), int(size)
    h, w = size
    return int(h), int(w)


def _next_pow2(v: int) -> int:
    return 1 << max(0, int(v) - 1).bit_length()


def _fade(t: torch.Tensor) -> torch.Tensor:
    return t * t * t * (t * (t * 6 - 15) + 10)


def _perlin_from_angles(angles: torch.Tensor, scale_y: torch.Tensor, scale_x: torch.Tensor,
                        height: int, width: int) -> torch.Tensor:
    """Perlin noise ``[n, height, width]`` from gradient ``angles`` ``[n, Gy, Gx]`` (radians) on a
    lattice of ``scale_y x scale_x`` cells per image (``[n]`` integers, ``scale + 1 <= G``).

    Pixel ``i`` of an axis of ``L`` pixels sits at lattice coordinate ``i * s / L`` (the official
    ``np.mgrid[0:res:res/shape] % 1``), computed in integers, so it is exact."""
    n, gy, gx = angles.shape
    grads = torch.stack((torch.cos(angles), torch.sin(angles)), dim=-1).reshape(n, gy * gx, 2)
    iy = torch.arange(height).view(1, -1) * scale_y.view(-1, 1)  # [n, H]
    ix = torch.arange(width).view(1, -1) * scale_x.view(-1, 1)  # [n, W]
    cy, fy = torch.div(iy, height, rounding_mode="floor"), (iy % height).float() / height
    cx, fx = torch.div(ix, width, rounding_mode="floor"), (ix % width).float() / width
    base = cy[:, :, None] * gx + cx[:, None, :]  # [n, H, W] flat index of the cell's top-left corner

    def corner(dy: int, dx: int) -> torch.Tensor:
        idx = (base + (dy * gx + dx)).reshape(n, -1, 1).expand(-1, -1, 2)
        g = torch.gather(grads, 1, idx).reshape(n, height, width, 2)
        return (fy[:, :, None] - dy) * g[..., 0] + (fx[:, None, :] - dx) * g[..., 1]

    n00, n10, n01, n11 = corner(0, 0), corner(1, 0), corner(0, 1), corner(1, 1)
    ty, tx = _fade(fy)[:, :, None], _fade(fx)[:, None, :]
    n0 = torch.lerp(n00, n10, ty)
    n1 = torch.lerp(n01, n11, ty)
    return math.sqrt(2.0) * torch.lerp(n0, n1, tx)


def _perlin_at(angles: torch.Tensor, scale_y: torch.Tensor, scale_x: torch.Tensor, iy: torch.Tensor,
               ix: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The same noise as :func:`_perlin_from_angles` on the ``height x width`` grid, at the grid
    points ``(iy, ix)`` only (``[n, P]`` integer tensors in range): ``[n, P]``."""
    n, gy, gx = angles.shape
    py, px = iy * scale_y.view(-1, 1), ix * scale_x.view(-1, 1)
    cy, fy = torch.div(py, height, rounding_mode="floor"), (py % height).float() / height
    cx, fx = torch.div(px, width, rounding_mode="floor"), (px % width).float() / width
    cos, sin = torch.cos(angles).reshape(n, -1), torch.sin(angles).reshape(n, -1)
    base = cy * gx + cx

    def corner(dy: int, dx: int) -> torch.Tensor:
        idx = base + (dy * gx + dx)
        return (fy - dy) * torch.gather(cos, 1, idx) + (fx - dx) * torch.gather(sin, 1, idx)

    ty, tx = _fade(fy), _fade(fx)
    n0 = torch.lerp(corner(0, 0), corner(1, 0), ty)
    n1 = torch.lerp(corner(0, 1), corner(1, 1), ty)
    return math.sqrt(2.0) * torch.lerp(n0, n1, tx)


def _rotated_noise_at(angles: torch.Tensor, scale_y: torch.Tensor, scale_x: torch.Tensor, turn: torch.Tensor,
                      grid: tuple[int, int], size: tuple[int, int]) -> torch.Tensor:
    """``rotate(noise on grid, turn)`` sampled at the pixel centres of ``size`` (nearest), without
    making the whole grid: each output pixel is the bilinear interpolation (zero outside) of the
    four grid points around its rotated position, as ``grid_sample`` does. ``[n, 1, h, w]``."""
    (gh, gw), (h, w) = grid, size
    n = angles.shape[0]
    r = torch.div((2 * torch.arange(h) + 1) * gh, 2 * h, rounding_mode="floor")  # nearest-exact rows
    c = torch.div((2 * torch.arange(w) + 1) * gw, 2 * w, rounding_mode="floor")
    yn = ((2 * r + 1).float() / gh - 1).view(1, h, 1)  # normalised, align_corners=False
    xn = ((2 * c + 1).float() / gw - 1).view(1, 1, w)
    rad = turn.float().view(-1, 1, 1) * (math.pi / 180.0)
    cs, sn = torch.cos(rad), torch.sin(rad)
    xs = cs * xn - sn * gh / gw * yn  # the affine map of rotate()
    ys = sn * gw / gh * xn + cs * yn
    px, py = ((xs + 1) * gw - 1) / 2, ((ys + 1) * gh - 1) / 2
    x0, y0 = px.floor(), py.floor()
    wx, wy = px - x0, py - y0
    out = torch.zeros(n, h, w)
    for dy, dx, wt in ((0, 0, (1 - wy) * (1 - wx)), (0, 1, (1 - wy) * wx), (1, 0, wy * (1 - wx)), (1, 1, wy * wx)):
        yy, xx = (y0 + dy).long(), (x0 + dx).long()
        inside = (yy >= 0) & (yy < gh) & (xx >= 0) & (xx < gw)
        val = _perlin_at(angles, scale_y, scale_x, yy.clamp(0, gh - 1).reshape(n, -1),
                         xx.clamp(0, gw - 1).reshape(n, -1), gh, gw).view(n, h, w)
        out += torch.where(inside, wt * val, 0.0)
    return out.unsqueeze(1)


def _noise_grid(size, min_scale: int, max_scale: int) -> tuple[int, int]:
    h, w = _pair(size)
    if h < 1 or w < 1:
        raise DefectscopeError(f"perlin noise: expected a positive size, got {size}")
    if not 0 <= min_scale < max_scale:
        raise DefectscopeError(f"perlin noise: expected 0 <= min_scale < max_scale, got {min_scale}, {max_scale}")
    top = 2 ** (max_scale - 1)
    return max(_next_pow2(h), _MIN_NOISE_SIDE, top), max(_next_pow2(w), _MIN_NOISE_SIDE, top)


def _draw_perlin(n: int, generator: torch.Generator, min_scale: int, max_scale: int):
    """The random draws of ``n`` noises: lattice sizes (rows, columns) and gradient angles."""
    top = 2 ** (max_scale - 1)
    sy = 2 ** torch.randint(min_scale, max_scale, (n,), generator=generator)
    sx = 2 ** torch.randint(min_scale, max_scale, (n,), generator=generator)
    return sy, sx, 2 * math.pi * torch.rand(n, top + 1, top + 1, generator=generator)


def _sample(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``x`` ``[n, 1, H', W']`` sampled at the pixel centres of ``size`` (nearest, not averaged:
    an average would damp the noise's peaks and shrink the masks)."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=size, mode="nearest-exact")


def _chunks(n: int, grid: tuple[int, int]):
    step = max(1, (1 << 22) // (grid[0] * grid[1]))  # bound the temporaries to a few tens of MB
    return [slice(i, min(n, i + step)) for i in range(0, n, step)]


def perlin_noise(n: int, size: int | tuple[int, int], *, generator: torch.Generator,
                 min_scale: int = 0, max_scale: int = 6) -> torch.Tensor:
    """``[n, H, W]`` 2-D Perlin noise (roughly in [-1, 1]); per image a random lattice of
    ``2**randint(min_scale, max_scale)`` cells on each axis (upper bound exclusive, as the official
    ``torch.randint``), drawn independently for the two axes.

    The noise is computed on a power-of-two grid of at least 256 px a side (exactly the official
    noise at 256 px) and sampled at the centres of the pixels of ``size`` when that differs."""
    h, w = _pair(size)
    grid = _noise_grid((h, w), min_scale, max_scale)
    sy, sx, angles = _draw_perlin(int(n), generator, min_scale, max_scale)
    out = torch.empty(int(n), h, w)
    for c in _chunks(int(n), grid):
        out[c] = _sample(_perlin_from_angles(angles[c], sy[c], sx[c], *grid).unsqueeze(1), (h, w))[:, 0]
    return out


def rotate(x: torch.Tensor, degrees: torch.Tensor, fill: float = 0.0) -> torch.Tensor:
    """Rotate each image of ``x`` ``[B, C, H, W]`` by ``degrees[b]`` about its centre (bilinear,
    the outside filled with ``fill``), as imgaug's ``Affine(rotate=...)``."""
    b, _, h, w = x.shape
    rad = degrees.to(torch.float32).view(-1) * (math.pi / 180.0)
    c, s = torch.cos(rad), torch.sin(rad)
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0], theta[:, 0, 1] = c, -s * h / w
    theta[:, 1, 0], theta[:, 1, 1] = s * w / h, c
    grid = F.affine_grid(theta.to(x.device, x.dtype), list(x.shape), align_corners=False)
    out = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    if fill == 0.0:
        return out
    inside = F.grid_sample(torch.ones_like(x[:, :1]), grid, mode="bilinear", padding_mode="zeros",
                           align_corners=False)
    return out + (1 - inside) * fill


def _uniform(n: int, lo: float, hi: float, generator: torch.Generator) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=generator)


def _perlin_masks_and_noise(n: int, size, *, generator: torch.Generator, threshold: float,
                            rotate_range: tuple[float, float], empty_p: float, min_scale: int,
                            max_scale: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(masks [n, 1, H, W], rotated noise [n, 1, H, W])``; the noise is rotated on its full grid
    (bilinear between neighbouring samples of the 256 px field, as the official code) before it is
    sampled at ``size``."""
    h, w = _pair(size)
    grid = _noise_grid((h, w), min_scale, max_scale)
    n = int(n)
    sy, sx, angles = _draw_perlin(n, generator, min_scale, max_scale)
    turn = _uniform(n, float(rotate_range[0]), float(rotate_range[1]), generator)
    keep = (torch.rand(n, generator=generator) >= empty_p).float().view(-1, 1, 1, 1)
    noise = torch.empty(n, 1, h, w)
    for c in _chunks(n, grid):
        if 4 * h * w < grid[0] * grid[1]:  # evaluate only the grid points needed (4 per pixel)
            noise[c] = _rotated_noise_at(angles[c], sy[c], sx[c], turn[c], grid, (h, w))
        else:
            raw = _perlin_from_angles(angles[c], sy[c], sx[c], *grid).unsqueeze(1)
            noise[c] = _sample(rotate(raw, turn[c]), (h, w))
    return (noise > threshold).float() * keep, noise


def perlin_masks(n: int, size, *, generator: torch.Generator, threshold: float = 0.5,
                 rotate: tuple[float, float] = (-90.0, 90.0), empty_p: float = 0.5,
                 min_scale: int = 0, max_scale: int = 6) -> torch.Tensor:
    """``[n, 1, H, W]`` float32 masks in {0, 1}: Perlin noise (:func:`perlin_noise`'s draws)
    rotated by a random angle in ``rotate`` degrees (bilinear, zero fill, on the 256 px grid),
    ``> threshold``; with probability ``empty_p`` all zero (the image gets no anomaly). A kept draw
    can still be empty where the noise stays below the threshold (about 5 % at the defaults; the
    official code keeps such masks too, anomalib redraws them)."""
    return _perlin_masks_and_noise(n, size, generator=generator, threshold=threshold, rotate_range=rotate,
                                   empty_p=empty_p, min_scale=min_scale, max_scale=max_scale)[0]


# ------------------------------------------------------------------------------------------------
# procedural textures: dead leaves


_TILE = 16


def _paint_dead_leaves(p: dict, size: int) -> torch.Tensor:
    """Paint the shapes of ``p`` (per-image parameter tensors ``[n, K]``) back to front onto the
    background: ``[n, 3, size, size]`` float. The front-most covering shape of each pixel is the
    largest shape index whose disc/square contains it, found tile by tile: each shape is tested
    only on the ``16 x 16`` tiles its bounding box touches, and the maxima are scattered."""
    n, k = p["r"].shape
    nt = -(-size // _TILE)
    axis = (torch.arange(nt * _TILE, dtype=torch.float32) + 0.5) / size
    cyp, cxp = p["cy"] * size, p["cx"] * size
    reach = p["r"] * math.sqrt(2) * size + 1
    y0 = (cyp - reach).floor().clamp(0, size - 1).long() // _TILE
    y1 = (cyp + reach).ceil().clamp(0, size - 1).long() // _TILE
    x0 = (cxp - reach).floor().clamp(0, size - 1).long() // _TILE
    x1 = (cxp + reach).ceil().clamp(0, size - 1).long() // _TILE
    wt = (x1 - x0 + 1).reshape(-1)
    counts = ((y1 - y0 + 1) * (x1 - x0 + 1)).reshape(-1)
    sid = torch.repeat_interleave(torch.arange(n * k), counts)  # one row per (shape, tile) pair
    offsets = torch.cumsum(counts, 0) - counts
    local = torch.arange(sid.numel()) - offsets[sid]
    ty = y0.reshape(-1)[sid] + torch.div(local, wt[sid], rounding_mode="floor")
    tx = x0.reshape(-1)[sid] + local % wt[sid]
    img_of = torch.div(sid, k, rounding_mode="floor")
    flat = {name: p[name].reshape(-1) for name in ("cy", "cx", "r", "cos", "sin", "square")}
    top = torch.full((n * nt * nt, _TILE * _TILE), -1, dtype=torch.long)
    ar = torch.arange(_TILE)
    step = max(1, (1 << 21) // (_TILE * _TILE))
    for s in range(0, sid.numel(), step):
        j = sid[s:s + step]
        yy = axis[(ty[s:s + step, None] * _TILE + ar)]  # [P, T]
        xx = axis[(tx[s:s + step, None] * _TILE + ar)]
        dy = yy[:, :, None] - flat["cy"][j, None, None]
        dx = xx[:, None, :] - flat["cx"][j, None, None]
        c, si = flat["cos"][j, None, None], flat["sin"][j, None, None]
        u1, u2 = c * dx + si * dy, c * dy - si * dx
        r = flat["r"][j, None, None]
        inside = torch.where(flat["square"][j, None, None], torch.maximum(u1.abs(), u2.abs()) < r,
                             u1 * u1 + u2 * u2 < r * r)
        val = torch.where(inside, (j % k)[:, None, None], -1).reshape(-1, _TILE * _TILE)
        dest = img_of[s:s + step] * nt * nt + ty[s:s + step] * nt + tx[s:s + step]
        top.scatter_reduce_(0, dest[:, None].expand(-1, _TILE * _TILE), val, "amax", include_self=True)
    top = top.view(n, nt, nt, _TILE, _TILE).permute(0, 1, 3, 2, 4).reshape(n, nt * _TILE, nt * _TILE)
    top = top[:, :size, :size]
    has = top >= 0
    idx = top.clamp_min(0).reshape(n, -1)

    def at(name: str) -> torch.Tensor:
        return torch.gather(p[name], 1, idx).view(n, size, size)

    yy, xx = axis[:size].view(1, size, 1), axis[:size].view(1, 1, size)
    dy, dx = yy - at("cy"), xx - at("cx")
    c, si, r = at("cos"), at("sin"), at("r")
    u1, u2 = c * dx + si * dy, c * dy - si * dx
    shade = at("slope") * (u1 / r).clamp(-1, 1) + at("amp") * torch.sin(at("freq") * u2 + at("phase"))
    colour = torch.stack([torch.gather(p["colour"][:, :, ch], 1, idx).view(n, size, size) for ch in range(3)], 1)
    shade = colour + shade.unsqueeze(1)
    return torch.where(has.unsqueeze(1), shade, p["background"].view(n, 3, 1, 1))


def generic_images(n: int, size: int, seed: int = 0, shapes: int = 300, grayscale_p: float = 0.0) -> torch.Tensor:
    """``n`` procedural dead-leaves images ``[n, 3, size, size]`` as uint8 (image ``i`` depends only
    on ``seed + i``).

    Occluding discs and rotated squares (painted back to front) whose size follows the
    scale-invariant ``r^-3`` law between 1.5 % and 50 % of the image side, each with a random,
    moderately saturated colour, a linear shading and (half of them) a sinusoidal stripe texture of
    random frequency and orientation; then a smooth illumination field and fine noise. A classic
    stand-in for natural-image statistics (Lee, Mumford & Huang 2001; Baradad et al., "Learning to
    See by Looking at Noise", NeurIPS 2021). ``grayscale_p``: the probability that an image is
    turned grey (EfficientAD's penalty images use ``RandomGrayscale(0.3)``).

    The parameters are drawn per image from its own generator (a loop over images); the shapes of
    all images are painted together with tensor operations (no loop over shapes or pixels).
    Version 2 of the generator (``teacher.GENERIC_VERSION``): the same distribution as version 1
    (a Python loop over shapes), not the same pixels.
    """
    n, size, shapes = int(n), int(size), int(shapes)
    if n < 0 or size < 1 or shapes < 1:
        raise DefectscopeError(f"generic_images: expected n >= 0, size >= 1, shapes >= 1; got {n}, {size}, {shapes}")
    out = torch.empty(n, 3, size, size, dtype=torch.uint8)
    a, b = 0.015, 0.5
    chunk = max(1, min(n, 32, (1 << 24) // (size * size)))
    for start in range(0, n, chunk):
        m = min(chunk, n - start)
        names = ("r", "cy", "cx", "theta", "square", "colour", "freq", "amp", "phase", "slope", "background",
                 "light", "gray")
        per: dict[str, list] = {name: [] for name in names}
        noise = torch.empty(m, 3, size, size)
        for i in range(m):
            g = torch.Generator().manual_seed(int(seed) + start + i)
            per["r"].append((a ** -2 - torch.rand(shapes, generator=g) * (a ** -2 - b ** -2)) ** -0.5)  # ~ r^-3
            per["cy"].append(torch.rand(shapes, generator=g))
            per["cx"].append(torch.rand(shapes, generator=g))
            per["theta"].append(torch.rand(shapes, generator=g) * math.pi)
            per["square"].append(torch.rand(shapes, generator=g) < 0.4)
            lum, sat = torch.rand(shapes, 1, generator=g), torch.rand(shapes, 1, generator=g)
            per["colour"].append(lum + sat * (torch.rand(shapes, 3, generator=g) - 0.5) * 0.8)
            per["freq"].append(10 + 90 * torch.rand(shapes, generator=g))
            on, level = torch.rand(shapes, generator=g) < 0.5, torch.rand(shapes, generator=g)
            per["amp"].append(torch.where(on, 0.15 * level, torch.zeros(shapes)))
            per["phase"].append(2 * math.pi * torch.rand(shapes, generator=g))
            per["slope"].append((torch.rand(shapes, generator=g) - 0.5) * 0.3)
            per["background"].append(torch.rand(3, generator=g))
            per["light"].append(torch.rand(1, 4, 4, generator=g))
            noise[i] = torch.randn(3, size, size, generator=g)
            per["gray"].append(torch.rand(1, generator=g) < grayscale_p if grayscale_p > 0 else torch.zeros(1, dtype=torch.bool))
        p = {name: torch.stack(v) for name, v in per.items()}
        p["cos"], p["sin"] = torch.cos(p["theta"]), torch.sin(p["theta"])
        img = _paint_dead_leaves(p, size)
        light = F.interpolate(p["light"], size=(size, size), mode="bicubic", align_corners=False)
        img = img * (0.75 + 0.5 * light) + 0.02 * noise
        lum = (0.299 * img[:, 0] + 0.587 * img[:, 1] + 0.114 * img[:, 2]).unsqueeze(1).expand_as(img)
        img = torch.where(p["gray"].view(m, 1, 1, 1), lum, img)
        out[start:start + m] = (img.clamp(0, 1) * 255).round().to(torch.uint8)
    return out


# ------------------------------------------------------------------------------------------------
# DRAEM's texture augmentation


def _luma(x: torch.Tensor) -> torch.Tensor:
    return 0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3]


def _rgb_to_hsv(x: torch.Tensor) -> torch.Tensor:
    """RGB ``[B, 3, H, W]`` in [0, 1] -> HSV (hue in [0, 1) turns), as ``colorsys.rgb_to_hsv``."""
    r, g, b = x.unbind(1)
    mx = torch.maximum(torch.maximum(r, g), b)
    mn = torch.minimum(torch.minimum(r, g), b)
    delta = mx - mn
    inv = 1.0 / torch.where(delta > 0, delta, 1.0)
    h = torch.where(mx == r, (g - b) * inv, torch.where(mx == g, (b - r) * inv + 2, (r - g) * inv + 4))
    h = torch.where(delta > 0, (h / 6) % 1.0, 0.0)
    s = torch.where(mx > 0, delta / torch.where(mx > 0, mx, 1.0), 0.0)
    return torch.stack((h, s, mx), dim=1)


def _hsv_to_rgb(x: torch.Tensor) -> torch.Tensor:
    """HSV (hue in turns) -> RGB: ``v - v s clamp(min(k, 4 - k), 0, 1)``, ``k = (n + 6 h) mod 6``
    for ``n = 5, 3, 1``."""
    h, s, v = x[:, 0:1], x[:, 1:2], x[:, 2:3]
    k = (torch.tensor([5.0, 3.0, 1.0], device=x.device).view(1, 3, 1, 1) + h * 6) % 6
    return v - v * s * torch.clamp(torch.minimum(k, 4 - k), 0, 1)


_SMOOTH = torch.tensor([[1.0, 1.0, 1.0], [1.0, 5.0, 1.0], [1.0, 1.0, 1.0]]) / 13.0


def _smooth(x: torch.Tensor) -> torch.Tensor:
    """PIL's ``ImageFilter.SMOOTH`` (:data:`_SMOOTH`: 3x3 ones with 5 in the centre, / 13) with
    the border replicated: ``(9 * box3x3 + 4 * x) / 13``."""
    p = F.pad(x, (1, 1, 1, 1), mode="replicate")
    rows = p[:, :, :-2] + p[:, :, 1:-1] + p[:, :, 2:]
    box = rows[..., :-2] + rows[..., 1:-1] + rows[..., 2:]  # 3x3 sums, separably
    return (box + 4 * x) / 13


def _equalize(x: torch.Tensor) -> torch.Tensor:
    """PIL's ``ImageOps.equalize`` on each channel of uint8-valued ``x`` (float in [0, 1])."""
    b, c, h, w = x.shape
    q = (x * 255).round().long().clamp(0, 255).reshape(b * c, -1)
    hist = _histogram(q)
    last = torch.gather(hist, 1, q.max(dim=1, keepdim=True).values)  # count of the brightest level
    step = torch.div(q.shape[1] - last, 255, rounding_mode="floor")
    before = torch.cumsum(hist, 1) - hist
    lut = torch.div(torch.div(step, 2, rounding_mode="floor") + before, step.clamp_min(1),
                    rounding_mode="floor").clamp(0, 255)
    out = torch.gather(lut, 1, q)
    out = torch.where(step > 0, out, q)
    return (out.float() / 255).view(b, c, h, w)


def _histogram(q: torch.Tensor) -> torch.Tensor:
    """256-bin histograms of the integer levels ``q`` ``[N, P]``: ``[N, 256]`` counts."""
    return torch.zeros(q.shape[0], 256, dtype=torch.long).scatter_add_(1, q, torch.ones_like(q))


def _autocontrast(x: torch.Tensor, cutoff: torch.Tensor) -> torch.Tensor:
    """PIL's ``ImageOps.autocontrast(cutoff)`` per channel, from each channel's histogram: drop
    ``cutoff`` % of the pixels from the dark end and as many from the light end (``lo`` = the first
    level whose cumulative count exceeds the cut, ``hi`` the last from the other side), then map
    ``lo..hi`` linearly to 0..255 (``int(level * scale + offset)``, clipped); a channel with
    ``hi <= lo`` is left as it is."""
    b, c, h, w = x.shape
    q = (x * 255).round().long().clamp(0, 255).reshape(b * c, -1)
    hist = _histogram(q)
    cut = (q.shape[1] * cutoff.long() // 100).repeat_interleave(c).view(-1, 1)
    levels = torch.arange(256).view(1, -1)
    up = torch.cumsum(hist, 1)  # pixels at or below each level
    down = torch.flip(torch.cumsum(torch.flip(hist, [1]), 1), [1])  # pixels at or above
    lo = torch.where(up > cut, levels, 256).amin(1, keepdim=True)
    hi = torch.where(down > cut, levels, -1).amax(1, keepdim=True)
    ok = hi > lo
    scale = 255.0 / torch.where(ok, hi - lo, 1).float()
    offset = -lo.float() * scale
    lut = torch.where(ok, (levels.float() * scale + offset).clamp(0, 255).floor().long(), levels)
    return (torch.gather(lut, 1, q).float() / 255).view(b, c, h, w)


def _augment_one(kind: str, x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Augmentation ``kind`` on ``x`` ``[b, 3, H, W]`` in [0, 1] (imgaug's parameters, see
    :func:`augment_textures`)."""
    b = x.shape[0]
    if kind == "gamma":  # GammaContrast((0.5, 2.0), per_channel=True)
        gamma = _uniform(b * 3, 0.5, 2.0, g).view(b, 3, 1, 1)
        return x.clamp_min(0).pow(gamma)
    if kind == "brightness":  # MultiplyAndAddToBrightness(mul=(0.8, 1.2), add=(-30, 30)) on Y of YCbCr
        mul, add = _uniform(b, 0.8, 1.2, g).view(b, 1, 1, 1), _uniform(b, -30, 30, g).view(b, 1, 1, 1) / 255
        y = _luma(x)
        return (x + (y * mul + add - y)).clamp(0, 1)
    if kind == "sharpness":  # pillike.EnhanceSharpness(factor=(0.0, 2.0))
        f = _uniform(b, 0.0, 2.0, g).view(b, 1, 1, 1)
        smooth = _smooth(x)
        return (smooth + f * (x - smooth)).clamp(0, 1)
    if kind == "hue_saturation":  # AddToHueAndSaturation((-50, 50), per_channel=True)
        hsv = _rgb_to_hsv(x)
        dh = _uniform(b, -50, 50, g).view(b, 1, 1) / 255  # imgaug: 255 <-> a full turn of hue
        ds = _uniform(b, -50, 50, g).view(b, 1, 1) / 255
        hsv = torch.stack(((hsv[:, 0] + dh) % 1, (hsv[:, 1] + ds).clamp(0, 1), hsv[:, 2]), dim=1)
        return _hsv_to_rgb(hsv)
    if kind == "solarize":  # Solarize(0.5, threshold=(32, 128))
        apply = (torch.rand(b, generator=g) < 0.5).view(b, 1, 1, 1)
        t = _uniform(b, 32, 128, g).view(b, 1, 1, 1) / 255
        return torch.where(apply & (x >= t), 1 - x, x)
    if kind == "posterize":  # Posterize(): keep the top nb_bits in {1..8} bits
        bits = torch.randint(1, 9, (b,), generator=g).view(b, 1, 1, 1)
        q = 2.0 ** (8 - bits)
        return torch.floor((x * 255).round() / q) * q / 255
    if kind == "invert":  # Invert()
        return 1 - x
    if kind == "autocontrast":  # pillike.Autocontrast(cutoff=(0, 20))
        return _autocontrast(x, torch.randint(0, 21, (b,), generator=g).float())
    if kind == "equalize":  # pillike.Equalize()
        return _equalize(x)
    if kind == "rotate":  # Affine(rotate=(-45, 45))
        return rotate(x, _uniform(b, -45, 45, g))
    raise ValueError(f"unknown augmentation {kind!r}")


def augment_textures(x: torch.Tensor, generator: torch.Generator, count: int = 3,
                     kinds: Sequence[str] = AUGMENTATIONS) -> torch.Tensor:
    """DRAEM's texture augmentation: per image, ``count`` distinct operations of ``kinds`` in a
    random order (official ``randAugmenter``: ``np.random.choice(10, 3, replace=False)``).

    ``x``: ``[B, 3, H, W]`` floats in [0, 1]. Each operation as imgaug's, on 8-bit levels where
    it matters (posterize, autocontrast, equalize); simplifications: brightness changes the Y of
    YCbCr only (imgaug picks YCrCb or HSV and the order of multiply/add at random), sharpness
    replicates the border (PIL leaves it unfiltered), solarize inverts levels >= the threshold.
    """
    b = x.shape[0]
    order = torch.argsort(torch.rand(b, len(kinds), generator=generator), dim=1)[:, :count]
    x = x.clone()
    for step in range(count):
        for a, kind in enumerate(kinds):
            idx = (order[:, step] == a).nonzero().flatten()
            if idx.numel():
                x[idx] = _augment_one(kind, x[idx], generator).clamp(0, 1)
    return x


# ------------------------------------------------------------------------------------------------
# the synthesiser


def _texture_files(folder: Path) -> list[Path]:
    from ..imageio import is_image_file

    if not folder.is_dir():
        what = "is a file, not a folder" if folder.exists() else "does not exist"
        raise DefectscopeError(f"anomaly source {folder} {what}; give a folder of texture images (e.g. DTD's "
                               f"images/), 'procedural' or 'none'")
    files = sorted(p for p in folder.rglob("*") if p.is_file() and is_image_file(p))
    if not files:
        raise DefectscopeError(f"anomaly source {folder}: no image files found (searched recursively); give a "
                               f"folder of texture images (e.g. DTD's images/), 'procedural' or 'none'")
    return files


class AnomalySynthesizer:
    """Simulated anomalies for a batch of normal images (DRAEM, Sec. 3.3 and eq. 2).

    Args:
        source: ``"procedural"`` (a pool of :func:`generic_images`, made once per image size from
            the first generator given), ``"none"`` (no texture: the mask is filled with
            ``0.5 * noise + 0.25``, the rotated Perlin noise that made it, as anomalib's
            ``PerlinAnomalyGenerator`` without a source folder), or a folder of texture images
            (searched recursively; ``pool`` of them, drawn at random, are read once).
        beta: the range of the texture's opacity (paper: U(0.1, 1.0) per image).
        empty_p: the probability that an image gets no anomaly (official 0.5).
        threshold, rotate, min_scale, max_scale: the Perlin masks (:func:`perlin_masks`).
        pool: how many source images are held in memory (procedural or folder).
        augment: apply DRAEM's 3 random augmentations to the texture (official: always).

    ``synth(images, generator)``: ``images`` ``[B, C, H, W]`` floats in [0, 1] ->
    ``(augmented [B, C, H, W], masks [B, 1, H, W])``; everything random comes from ``generator``.
    """

    def __init__(self, source: str = "procedural", *, beta: tuple[float, float] = (0.1, 1.0), empty_p: float = 0.5,
                 threshold: float = 0.5, rotate: tuple[float, float] = (-90.0, 90.0), min_scale: int = 0,
                 max_scale: int = 6, pool: int = 200, augment: bool = True) -> None:
        self.source = str(source)
        lo, hi = (float(beta), float(beta)) if isinstance(beta, (int, float)) else (float(beta[0]), float(beta[1]))
        if not 0 <= lo <= hi <= 1:
            raise DefectscopeError(f"AnomalySynthesizer: beta must be a range within [0, 1], got {beta}")
        if not 0 <= empty_p <= 1:
            raise DefectscopeError(f"AnomalySynthesizer: empty_p must be in [0, 1], got {empty_p}")
        if int(pool) < 1:
            raise DefectscopeError(f"AnomalySynthesizer: pool must be >= 1, got {pool}")
        self.beta = (lo, hi)
        self.empty_p, self.threshold, self.rotate = float(empty_p), float(threshold), tuple(rotate)
        self.min_scale, self.max_scale, self.pool, self.augment = int(min_scale), int(max_scale), int(pool), augment
        self.files: list[Path] = []
        if self.source not in SOURCES:
            self.files = _texture_files(Path(self.source).expanduser())
        self._pools: dict[tuple[int, int], torch.Tensor] = {}

    def __repr__(self) -> str:
        return (f"AnomalySynthesizer(source={self.source!r}, beta={self.beta}, empty_p={self.empty_p}, "
                f"threshold={self.threshold}, rotate={self.rotate}, pool={self.pool})")

    def textures(self, size: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
        """The pool of source images at ``size`` (uint8 ``[N, 3, H, W]``), made on first use."""
        h, w = size
        if (h, w) not in self._pools:
            seed = int(torch.randint(0, 2**31 - 1, (1,), generator=generator))
            if self.source == "procedural":
                side = max(h, w)
                imgs = generic_images(self.pool, side, seed=seed)
                if (h, w) != (side, side):
                    imgs = F.interpolate(imgs.float(), size=(h, w), mode="bilinear", antialias=True,
                                         align_corners=False).round().clamp(0, 255).to(torch.uint8)
            else:
                from ..imageio import read_image

                pick = torch.randperm(len(self.files), generator=torch.Generator().manual_seed(seed))[:self.pool]
                imgs = torch.empty(len(pick), 3, h, w, dtype=torch.uint8)
                for i, j in enumerate(sorted(pick.tolist())):
                    x = read_image(self.files[j], channels=3).unsqueeze(0)  # ImageReadError names the file
                    x = F.interpolate(x, size=(h, w), mode="bilinear", antialias=True, align_corners=False)
                    imgs[i] = (x[0].clamp(0, 1) * 255).round().to(torch.uint8)
            self._pools[(h, w)] = imgs
        return self._pools[(h, w)]

    def __call__(self, images: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        if images.ndim != 4 or images.shape[1] not in (1, 3):
            raise DefectscopeError(f"AnomalySynthesizer: expected images [B, 1 or 3, H, W], got {list(images.shape)}")
        b, c, h, w = images.shape
        masks, noise = _perlin_masks_and_noise(b, (h, w), generator=generator, threshold=self.threshold,
                                               rotate_range=self.rotate, empty_p=self.empty_p,
                                               min_scale=self.min_scale, max_scale=self.max_scale)
        if self.source == "none":
            tex = (noise * 0.5 + 0.25).expand(-1, 3, -1, -1)
        else:
            bank = self.textures((h, w), generator)
            tex = bank[torch.randint(0, bank.shape[0], (b,), generator=generator)].float() / 255
        if self.augment:
            tex = augment_textures(tex, generator)
        if c == 1:
            tex = _luma(tex)
        beta = _uniform(b, *self.beta, generator).view(b, 1, 1, 1)
        dev, dt = images.device, images.dtype
        m, beta, tex = masks.to(dev, dt), beta.to(dev, dt), tex.to(dev, dt)
        out = (1 - m) * images + (1 - beta) * m * images + beta * m * tex
        return out, m
