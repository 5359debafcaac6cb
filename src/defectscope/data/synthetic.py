"""The built-in synthetic data set: small, deterministic, with exact ground-truth masks.

Categories (:data:`SYNTHETIC_CATEGORIES`):

* ``washer`` (object-like): a bright machined tab washer (ring with concentric grooves, a lug with
  a hole, an inner key notch) on a dark conveyor belt, with a soft shadow. Each image has pose
  jitter (shift +-3 px, rotation +-4 degrees, scale +-3 %), lighting jitter (gain +-8 %, offset
  +-0.03, a gentle linear gradient up to +-6 %) and sensor noise (sigma 0.012), so a mean-image
  comparison does not solve it.
* ``fabric`` (texture-like): a woven texture (two crossing periodic thread patterns of period ~7 px,
  oriented at 30 +- 8 degrees, random phase per image, period +-3 %) with yarn noise, low-frequency
  mottling, the same lighting jitter and sensor noise.

Defect types (:data:`DEFECT_TYPES`), sizes given for 128 px images (they scale with the size):

* ``scratch``: a thin (1-3 px), slightly curved line 18-45 px long, brighter or darker by 0.25-0.4.
* ``stain``: an irregular blob (radius 4-9 px), darker (brownish in RGB) by 30-50 % or brighter,
  with a soft edge that is still entirely inside the mask.
* ``missing``: an irregular region (radius 5-10 px) of the part replaced by what lies behind it
  (the belt for the washer, a dark backing for the fabric).
* ``discolor``: a smooth intensity shift of 10-25 % (up or down) over a larger blob (radius 9-18 px)
  with a raised-cosine profile.

High-resolution variant (``defect_px``): by default the defects scale with the image, as above.
With ``defect_px=D`` they keep an absolute size instead, whatever the image size: each defect type's
size range is scaled so that its largest extent (scratch length, blob diameter; nominally 45, 18,
20 and 36 px at 128 px) is ``D`` px, so its extents fall in about ``[D/2, D]`` (scratches about
``[0.4 D, D]``, at least 1 px wide). ``make_synthetic(out, image_size=1024, defect_px=16)`` makes the
set of ``benchmarks/tiling.py``: 1024 px images with 8-16 px defects, which a plain resize to
256 px shrinks to 2-4 px. The scenes and the random draws are the same as without ``defect_px``, and
the default set (``defect_px=None``) is unchanged byte for byte (its manifest and cache key too).

Masks are exact: a defect is applied to the rendered scene only inside its geometric support, and
every pixel of that support is guaranteed to differ from the defect-free image after 8-bit
quantisation (by at least :data:`MIN_STEP` grey levels; pixels the soft profile would change by
less are pushed to that step). So ``mask == (defective != clean)`` holds exactly, even for the
faintest edges. Every image comes from its own seed (``seed``, category, split, defect type,
index), clean image first and defect second, so :func:`render_pair` can return the same image with
and without its defect.

Written in the MVTec layout (see :mod:`defectscope.data.mvtec`) as 8-bit PNG (L or RGB), masks
0/255 as ``ground_truth/<type>/<stem>_mask.png``, plus a ``synthetic.json`` manifest written last.
"""

from __future__ import annotations

import hashlib
import math
import json
import os
import shutil
import uuid
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple, Union

import numpy as np
from PIL import Image
from scipy import ndimage

from ..errors import DatasetError
from ..imageio import list_images

__all__ = [
    "SYNTHETIC_CATEGORIES",
    "DEFECT_TYPES",
    "MIN_STEP",
    "GENERATOR_VERSION",
    "MANIFEST",
    "make_synthetic",
    "synthetic_root",
    "synthetic_params",
    "render_pair",
]

PathLike = Union[str, os.PathLike]

#: Synthetic categories: first the object-like one, then the texture-like one.
SYNTHETIC_CATEGORIES: Tuple[str, ...] = ("washer", "fabric")
#: Synthetic defect types.
DEFECT_TYPES: Tuple[str, ...] = ("scratch", "stain", "missing", "discolor")
#: Smallest change (8-bit grey levels) of any pixel a defect claims.
MIN_STEP = 4
#: Bumped whenever the generated images change; part of the manifest and the cache key.
GENERATOR_VERSION = 1
#: The manifest file written (last) at the root of a generated set.
MANIFEST = "synthetic.json"
#: The largest extent (px) of each defect type at the 128 px reference size: scratch length,
#: stain / missing / discolor blob diameter (``defect_px`` scales these to its own size).
_MAX_EXTENT = {"scratch": 45.0, "stain": 18.0, "missing": 20.0, "discolor": 36.0}

_SPLIT_IDS = {"train": 0, "test": 1}
_TYPE_IDS = {"good": 0, **{t: i + 1 for i, t in enumerate(DEFECT_TYPES)}}
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)


def _f32(values) -> np.ndarray:
    return np.asarray(values, dtype=np.float32)


def _cat_id(category: str) -> int:
    return zlib.crc32(category.encode("utf-8"))


# ----------------------------------------------------------------------------------------------
# scenes


@dataclass
class _Scene:
    albedo: np.ndarray  # [3, S, S] the defect-free scene before lighting (channel-first)
    behind: np.ndarray  # [3, S, S] what a "missing" defect reveals
    part: np.ndarray  # [S, S] where defects may go (washer: alpha of the part; fabric: ones)
    gain: np.ndarray  # [S, S] multiplicative lighting
    offset: float
    noise: np.ndarray  # [3, S, S] sensor noise
    is_object: bool


def _grid(S: int) -> Tuple[np.ndarray, np.ndarray]:
    c = np.arange(S, dtype=np.float32) + np.float32(0.5)
    return np.meshgrid(c, c, indexing="xy")  # xx, yy: [S, S]


def _smooth_noise(rng: np.random.Generator, S: int, sigma: float) -> np.ndarray:
    """Zero-mean, unit-std Gaussian-filtered white noise."""
    white = rng.standard_normal((S, S), dtype=np.float32)
    n = ndimage.gaussian_filter(white, sigma=max(sigma, 0.3), mode="wrap", truncate=3.0)
    return n / (n.std() + 1e-12)


def _lighting(rng: np.random.Generator, S: int, xx: np.ndarray, yy: np.ndarray):
    g = rng.uniform(0.92, 1.08)
    offset = rng.uniform(-0.03, 0.03)
    beta = rng.uniform(0.0, 2 * np.pi)
    amp = rng.uniform(0.0, 0.06)
    ramp = amp * ((xx - S / 2) * math.cos(beta) + (yy - S / 2) * math.sin(beta)) / (S / 2)
    noise = np.float32(0.012) * rng.standard_normal((3, S, S), dtype=np.float32)
    return g * (1.0 + ramp), offset, noise


def _render_washer(rng: np.random.Generator, S: int) -> _Scene:
    s = S / 128.0
    xx, yy = _grid(S)
    cx = S / 2 + rng.uniform(-3, 3) * s
    cy = S / 2 + rng.uniform(-3, 3) * s
    rot = math.radians(rng.uniform(-4, 4))
    sc = rng.uniform(0.97, 1.03)
    dx, dy = xx - cx, yy - cy
    rho = np.hypot(dx, dy)
    theta = np.arctan2(dy, dx)
    r_out, r_in = 38 * s * sc, 17 * s * sc
    d = np.maximum(rho - r_out, r_in - rho)  # signed distance (px), negative inside
    # the lug (pointing up, rotated) with a hole
    a = -math.pi / 2 + rot
    u = dx * math.cos(a) + dy * math.sin(a)
    v = -dx * math.sin(a) + dy * math.cos(a)
    u_c, half_len, half_w = r_out + 3 * s * sc, 7 * s * sc, 6 * s * sc
    d_tab = np.maximum(np.abs(u - u_c) - half_len, np.abs(v) - half_w)
    d = np.minimum(d, d_tab)
    d_hole = 2.6 * s * sc - np.hypot(u - (r_out + 5 * s * sc), v)
    d = np.maximum(d, d_hole)
    # key notch in the inner edge, opposite the lug
    d_notch = np.maximum(np.abs(-u - r_in) - 3 * s * sc, np.abs(v) - 2.5 * s * sc)
    d = np.maximum(d, -d_notch)
    alpha = np.clip(0.5 - d, 0.0, 1.0)

    phase = rng.uniform(0, 2 * np.pi)
    light_dir = rng.uniform(-0.3, 0.3) + np.pi / 4
    metal = (
        rng.uniform(0.66, 0.72)
        + 0.035 * np.sin(2 * np.pi * rho / (2.6 * s) + phase)
        + 0.08 * np.cos(2 * (theta - light_dir))
        - 0.15 * np.exp(-(((d + 1.5 * s) / (1.0 * s)) ** 2))
    )
    metal_rgb = _f32([0.98, 1.0, 1.04])[:, None, None] * metal

    bg = (
        0.22
        + 0.025 * _smooth_noise(rng, S, 1.5 * s)
        + 0.012 * np.sin(2 * np.pi * yy / (4 * s) + rng.uniform(0, 2 * np.pi))
    )
    sh = max(int(round(2 * s)), 1)
    shadow = np.roll(ndimage.gaussian_filter(alpha, 2.0 * s, truncate=3.0), (sh, sh), axis=(0, 1))
    bg = bg * (1.0 - 0.35 * shadow)
    bg_rgb = _f32([0.9, 0.97, 1.1])[:, None, None] * bg

    albedo = alpha * metal_rgb + (1 - alpha) * bg_rgb
    gain, offset, noise = _lighting(rng, S, xx, yy)
    return _Scene(albedo, bg_rgb, alpha, gain, offset, noise, True)


def _render_fabric(rng: np.random.Generator, S: int) -> _Scene:
    s = S / 128.0
    xx, yy = _grid(S)
    th = math.radians(30 + rng.uniform(-8, 8))
    p = 7.0 * s * rng.uniform(0.97, 1.03)
    u = xx * math.cos(th) + yy * math.sin(th)
    v = -xx * math.sin(th) + yy * math.cos(th)
    a = 2 * np.pi * u / p + rng.uniform(0, 2 * np.pi)
    b = 2 * np.pi * v / p + rng.uniform(0, 2 * np.pi)
    weave = np.tanh(3 * np.sin(a / 2) * np.sin(b / 2))  # which thread lies on top
    gray = (
        0.52
        + 0.07 * np.cos(a)
        + 0.07 * np.cos(b)
        + 0.05 * weave * (np.cos(a) - np.cos(b))
        + 0.035 * _smooth_noise(rng, S, 0.8 * s)
        + 0.03 * _smooth_noise(rng, S, 8.0 * s)
    )
    tint = _f32([1.06, 0.94, 0.78]) * _f32(rng.uniform(0.98, 1.02, size=3))
    albedo = tint[:, None, None] * gray
    backing = _f32([1.0, 1.0, 1.05])[:, None, None] * (0.09 + 0.02 * _smooth_noise(rng, S, 1.0 * s))
    gain, offset, noise = _lighting(rng, S, xx, yy)
    return _Scene(albedo, backing, np.ones((S, S), dtype=np.float32), gain, offset, noise, False)


_RENDERERS = {"washer": _render_washer, "fabric": _render_fabric}


# ----------------------------------------------------------------------------------------------
# defects


def _blob_distance(rng: np.random.Generator, S: int, center, r0: float) -> np.ndarray:
    """Normalised radial distance of every pixel to an irregular elliptic blob (< 1 inside)."""
    xx, yy = _grid(S)
    phi = rng.uniform(0, np.pi)
    ratio = rng.uniform(0.6, 1.0)
    dx, dy = xx - center[0], yy - center[1]
    e1 = dx * math.cos(phi) + dy * math.sin(phi)
    e2 = (-dx * math.sin(phi) + dy * math.cos(phi)) / ratio
    rho = np.hypot(e1, e2)
    t = np.arctan2(e2, e1)
    r = np.full_like(rho, r0)
    for k in (2, 3, 4):
        r = r + r0 * rng.uniform(0, 0.12) * np.cos(k * t + rng.uniform(0, 2 * np.pi))
    return rho / r


def _scratch_coverage(rng: np.random.Generator, S: int, center, s: float) -> np.ndarray:
    length = rng.uniform(18, 45) * s
    width = max(rng.uniform(1.0, 3.0) * s, 1.0)
    ang = rng.uniform(0, np.pi)
    dvec = np.array([math.cos(ang), math.sin(ang)])
    perp = np.array([-dvec[1], dvec[0]])
    c = np.asarray(center, dtype=np.float64)
    p0, p2 = c - dvec * length / 2, c + dvec * length / 2
    p1 = c + perp * rng.uniform(-0.15, 0.15) * length
    t = np.linspace(0, 1, 25)[:, None]
    pts = (1 - t) ** 2 * p0 + 2 * (1 - t) * t * p1 + t**2 * p2  # quadratic Bezier [25, 2]
    A, B = pts[:-1], pts[1:]
    margin = width / 2 + 2
    x0 = int(max(np.floor(pts[:, 0].min() - margin), 0))
    x1 = int(min(np.ceil(pts[:, 0].max() + margin), S))
    y0 = int(max(np.floor(pts[:, 1].min() - margin), 0))
    y1 = int(min(np.ceil(pts[:, 1].max() + margin), S))
    cov = np.zeros((S, S), dtype=np.float32)
    if x1 <= x0 or y1 <= y0:
        return cov
    xs, ys = np.meshgrid(np.arange(x0, x1) + 0.5, np.arange(y0, y1) + 0.5, indexing="xy")
    P = np.stack([xs.ravel(), ys.ravel()], axis=1)[:, None, :]  # [P, 1, 2]
    AB = (B - A)[None]  # [1, n, 2]
    tt = np.clip(((P - A[None]) * AB).sum(-1) / ((AB**2).sum(-1) + 1e-12), 0, 1)
    dist = np.linalg.norm(P - (A[None] + tt[..., None] * AB), axis=-1).min(axis=1)
    cov[y0:y1, x0:x1] = np.clip(width / 2 + 0.5 - dist, 0, 1).reshape(ys.shape)
    return cov


def _pick_center(rng: np.random.Generator, scene: _Scene, S: int) -> Tuple[float, float]:
    if scene.is_object:
        ys, xs = np.nonzero(scene.part > 0.99)
        i = rng.integers(len(ys))
        return float(xs[i]) + 0.5, float(ys[i]) + 0.5
    m = 8 * S / 128.0
    return rng.uniform(m, S - m), rng.uniform(m, S - m)


def _apply_defect(rng: np.random.Generator, scene: _Scene, kind: str, S: int, defect_px: Optional[float] = None):
    """The defective albedo and the defect's geometric support (bool [S, S]). The defect's sizes
    scale with the image (``S / 128``), or with ``defect_px / _MAX_EXTENT[kind]`` when given."""
    s = S / 128.0 if defect_px is None else float(defect_px) / _MAX_EXTENT.get(kind, 1.0)
    a = scene.albedo
    part = scene.part
    min_area = max(6.0 * s * s, 3.0)
    for _attempt in range(50):
        c = _pick_center(rng, scene, S)
        if kind == "scratch":
            cov = _scratch_coverage(rng, S, c, s) * part
            delta = (1 if rng.random() < 0.6 else -1) * rng.uniform(0.25, 0.4)
            new = a + delta * cov
            support = cov > 0
        elif kind == "stain":
            d = _blob_distance(rng, S, c, rng.uniform(4, 9) * s)
            x = np.clip((1 - d) / 0.4, 0, 1)
            f = x * x * (3 - 2 * x) * part  # smoothstep: flat core, soft edge
            if rng.random() < 0.7:
                k = rng.uniform(0.3, 0.5) * _f32([0.9, 1.0, 1.25])[:, None, None]  # darker, brownish
                new = a * (1 - k * f)
            else:
                k = rng.uniform(0.25, 0.4)
                new = a + k * f * (1 - a)
            support = (d < 1) & (part > 0)
        elif kind == "missing":
            r0 = rng.uniform(5, 10) * s
            d = _blob_distance(rng, S, c, r0)
            cov = np.clip((1 - d) * r0 + 0.5, 0, 1)
            new = a + cov * (scene.behind - a)
            support = (cov > 0) & (np.abs(scene.behind - a).max(axis=0) > 1e-9)
        elif kind == "discolor":
            d = _blob_distance(rng, S, c, rng.uniform(9, 18) * s)
            f = np.where(d < 1, 0.5 * (1 + np.cos(np.pi * np.clip(d, 0, 1))), 0.0) * part
            shift = (1 if rng.random() < 0.5 else -1) * rng.uniform(0.10, 0.25)
            tint = 1 + _f32(rng.uniform(-0.3, 0.3, size=3))
            new = a * (1 + shift * f * tint[:, None, None])
            support = (d < 1) & (part > 0)
        else:
            raise ValueError(f"unknown defect type {kind!r}; use one of {DEFECT_TYPES}")
        if support.sum() >= min_area:
            break
    return np.where(support, new.astype(a.dtype), a), support


# ----------------------------------------------------------------------------------------------
# output


def _finish(scene: _Scene, albedo: np.ndarray, channels: int) -> np.ndarray:
    """Lighting and noise; returns [S, S] (channels=1, luminance) or [S, S, 3] float32."""
    out = albedo * scene.gain + scene.offset + scene.noise
    if channels == 1:
        return np.tensordot(_LUMA, out, axes=1)
    return out.transpose(1, 2, 0)


def _quantize(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.round(np.clip(x, 0.0, 1.0) * 255.0).astype(np.uint8))


def _enforce(q0: np.ndarray, q1: np.ndarray, f0: np.ndarray, f1: np.ndarray,
             support: np.ndarray) -> np.ndarray:
    """Make every support pixel differ from the clean one by >= MIN_STEP levels (in its direction)."""
    c0 = q0.astype(np.int16).reshape(q0.shape[0], q0.shape[1], -1)
    c1 = q1.astype(np.int16).reshape(c0.shape)
    weak = support & (np.abs(c1 - c0).max(axis=-1) < MIN_STEP)
    if not weak.any():
        return q1
    delta = (f1 - f0).reshape(c0.shape).mean(axis=-1)
    mean0 = c0.mean(axis=-1)
    direction = np.where(delta > 0, 1, np.where(delta < 0, -1, np.where(mean0 < 128, 1, -1)))
    direction = np.where((direction > 0) & (c0.min(axis=-1) > 255 - MIN_STEP), -1, direction)
    direction = np.where((direction < 0) & (c0.max(axis=-1) < MIN_STEP), 1, direction)
    pushed = np.clip(c0 + direction[..., None] * MIN_STEP, 0, 255)
    out = np.where(weak[..., None], pushed, c1).astype(np.uint8)
    return out.reshape(q1.shape)


def _check_args(category: str, defect_type: Optional[str], split: str, image_size: int,
                channels: int, seed: int, defect_px: Optional[float] = None) -> None:
    if category not in _RENDERERS:
        raise ValueError(f"unknown synthetic category {category!r}; use one of {SYNTHETIC_CATEGORIES}")
    if defect_type is not None and defect_type not in DEFECT_TYPES:
        raise ValueError(f"unknown defect type {defect_type!r}; use one of {DEFECT_TYPES}")
    if split not in _SPLIT_IDS:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if not isinstance(image_size, (int, np.integer)) or isinstance(image_size, bool) or image_size < 32:
        raise ValueError(f"image_size must be an int >= 32, got {image_size!r}")
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels!r}")
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    if defect_px is not None and (isinstance(defect_px, bool) or not isinstance(defect_px, (int, float, np.number))
                                  or not 2 <= defect_px <= image_size / 4):
        raise ValueError(f"defect_px must be a number in [2, image_size / 4 = {image_size / 4:g}] or None, "
                         f"got {defect_px!r}")


def render_pair(
    category: str,
    defect_type: Optional[str] = None,
    *,
    index: int = 0,
    seed: int = 0,
    split: str = "test",
    image_size: int = 128,
    channels: int = 1,
    defect_px: Optional[float] = None,
) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One synthetic image with and without its defect: ``(clean, image, mask)``.

    ``clean`` and ``image`` are uint8 ``[S, S]`` (``channels=1``) or ``[S, S, 3]``; ``mask`` is a
    bool ``[S, S]``, exactly the pixels where ``image`` differs from ``clean``. With
    ``defect_type=None`` ``image`` is ``clean`` and the mask is empty. The image
    ``make_synthetic`` writes as ``<split>/<defect_type or good>/<index>.png`` is this ``image``.
    ``defect_px``: the defects' largest extent in px, whatever the image size (see the module doc).
    """
    _check_args(category, defect_type, split, image_size, channels, seed, defect_px)
    key = [int(seed), _cat_id(category), _SPLIT_IDS[split], _TYPE_IDS[defect_type or "good"],
           int(index)]
    scene = _RENDERERS[category](np.random.default_rng(key + [0]), int(image_size))
    f0 = _finish(scene, scene.albedo, channels)
    q0 = _quantize(f0)
    if defect_type is None:
        return q0, q0.copy(), np.zeros(q0.shape[:2], dtype=bool)
    albedo, support = _apply_defect(np.random.default_rng(key + [1]), scene, defect_type,
                                    int(image_size), defect_px)
    f1 = _finish(scene, albedo, channels)
    q1 = _enforce(q0, _quantize(f1), f0, f1, support)
    changed = q1 != q0 if q1.ndim == 2 else (q1 != q0).any(axis=-1)
    if not np.array_equal(changed, support):  # pragma: no cover - a generator bug
        raise RuntimeError(f"synthetic {category}/{defect_type}/{index}: mask does not match pixels")
    return q0, q1, support


# ----------------------------------------------------------------------------------------------
# writing


def synthetic_params(
    categories: Optional[Sequence[str]] = None,
    image_size: int = 128,
    channels: int = 1,
    n_train: int = 200,
    n_test_good: int = 40,
    n_test_defect: int = 10,
    seed: int = 0,
    defect_px: Optional[float] = None,
) -> Dict[str, object]:
    """The normalised parameter dict of a synthetic set (what the manifest records; ``defect_px``
    only when set, so the default set's manifest and cache key are unchanged)."""
    cats = list(SYNTHETIC_CATEGORIES if categories is None else
                ([categories] if isinstance(categories, str) else categories))
    if not cats:
        raise ValueError("categories must not be empty")
    for c in cats:
        _check_args(c, None, "train", image_size, channels, seed, defect_px)
    if len(set(cats)) != len(cats):
        raise ValueError(f"duplicate categories in {cats}")
    for name, n in (("n_train", n_train), ("n_test_good", n_test_good),
                    ("n_test_defect", n_test_defect)):
        if not isinstance(n, (int, np.integer)) or n < 0:
            raise ValueError(f"{name} must be a non-negative int, got {n!r}")
    if n_train < 1:
        raise ValueError("n_train must be at least 1")
    params: Dict[str, object] = {
        "generator_version": GENERATOR_VERSION,
        "categories": cats,
        "defect_types": list(DEFECT_TYPES),
        "image_size": int(image_size),
        "channels": int(channels),
        "n_train": int(n_train),
        "n_test_good": int(n_test_good),
        "n_test_defect": int(n_test_defect),
        "seed": int(seed),
    }
    if defect_px is not None:
        params["defect_px"] = float(defect_px)
    return params


def _name(i: int, n: int) -> str:
    return f"{i:0{max(3, len(str(max(n - 1, 0))))}d}"


def _is_complete(root: Path, params: Dict[str, object]) -> bool:
    try:
        with open(root / MANIFEST, encoding="utf-8") as fh:
            manifest = json.load(fh)
    except (OSError, ValueError):
        return False
    if manifest != params:
        return False
    try:
        for cat in params["categories"]:  # type: ignore[union-attr]
            cdir = root / cat
            if len(list_images(cdir / "train" / "good")) != params["n_train"]:
                return False
            if params["n_test_good"] and len(list_images(cdir / "test" / "good")) != params["n_test_good"]:
                return False
            if params["n_test_defect"]:
                for t in DEFECT_TYPES:
                    n = params["n_test_defect"]
                    if len(list_images(cdir / "test" / t)) != n or len(
                        list_images(cdir / "ground_truth" / t)
                    ) != n:
                        return False
    except DatasetError:
        return False
    return True


def _clear_category(cdir: Path) -> None:
    if not cdir.exists():
        return
    entries = {p.name for p in cdir.iterdir()}
    if not cdir.is_dir() or not entries <= {"train", "test", "ground_truth"}:
        raise DatasetError(
            f"refusing to overwrite {cdir}: it holds files that are not a synthetic set "
            f"({', '.join(sorted(entries - {'train', 'test', 'ground_truth'}))}); choose another "
            "output folder"
        )
    shutil.rmtree(cdir)


def _save_png(arr: np.ndarray, path: Path) -> None:
    Image.fromarray(arr).save(path, format="PNG", compress_level=1)


def make_synthetic(
    out_dir: PathLike,
    categories: Optional[Sequence[str]] = None,
    image_size: int = 128,
    channels: int = 1,
    n_train: int = 200,
    n_test_good: int = 40,
    n_test_defect: int = 10,
    seed: int = 0,
    progress: bool = True,
    defect_px: Optional[float] = None,
) -> Path:
    """Write the synthetic set in the MVTec layout under ``out_dir`` and return ``out_dir``.

    ``n_test_defect`` is per defect type. If ``out_dir`` already holds a complete set made with the
    same parameters (its ``synthetic.json`` manifest matches and the files are all there), nothing
    is written. Otherwise the category folders are (re)written and the manifest is written last, so
    an interrupted run is regenerated next time. Existing category folders that hold anything other
    than ``train``/``test``/``ground_truth`` are not touched (:class:`DatasetError`). ``defect_px``:
    defects of an absolute size (the high-resolution variant, see the module docstring).
    """
    params = synthetic_params(categories, image_size, channels, n_train, n_test_good,
                              n_test_defect, seed, defect_px)
    root = Path(out_dir).expanduser()
    if _is_complete(root, params):
        return root
    root.mkdir(parents=True, exist_ok=True)
    (root / MANIFEST).unlink(missing_ok=True)
    cats = params["categories"]
    for cat in cats:  # type: ignore[union-attr]
        _clear_category(root / cat)

    total = len(cats) * (n_train + n_test_good + len(DEFECT_TYPES) * n_test_defect)  # type: ignore[arg-type]
    from tqdm import tqdm

    from ..progress import progress as progress_bar

    with (progress_bar(total=total, desc="synthetic set", unit="img") if progress else tqdm(disable=True)) as bar:
        for cat in cats:  # type: ignore[union-attr]
            jobs = [("train", None, n_train), ("test", None, n_test_good)]
            jobs += [("test", t, n_test_defect) for t in DEFECT_TYPES]
            for split, dtype, n in jobs:
                if n == 0:
                    continue
                img_dir = root / cat / split / (dtype or "good")
                img_dir.mkdir(parents=True, exist_ok=True)
                gt_dir = root / cat / "ground_truth" / dtype if dtype else None
                if gt_dir is not None:
                    gt_dir.mkdir(parents=True, exist_ok=True)
                for i in range(n):
                    _, img, mask = render_pair(cat, dtype, index=i, seed=seed, split=split,
                                               image_size=image_size, channels=channels, defect_px=defect_px)
                    stem = _name(i, n)
                    _save_png(img, img_dir / f"{stem}.png")
                    if gt_dir is not None:
                        _save_png(mask.astype(np.uint8) * 255, gt_dir / f"{stem}_mask.png")
                    bar.update(1)

    tmp = root / f".{MANIFEST}.{os.getpid()}.tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(params, fh, indent=2, sort_keys=True)
    os.replace(tmp, root / MANIFEST)
    return root


def _cache_base(cache_dir: Optional[PathLike]) -> Path:
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get("DEFECTSCOPE_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "defectscope"


def synthetic_root(cache_dir: Optional[PathLike] = None, progress: bool = True, **params) -> Path:
    """Make (once) and return the synthetic set for ``params`` (those of :func:`make_synthetic`).

    It lives in ``<cache>/synthetic/<12-hex hash of the parameters>``, where ``<cache>`` is
    ``cache_dir``, else ``$DEFECTSCOPE_CACHE``, else ``~/.cache/defectscope``. A set is generated in
    a temporary sibling folder and renamed into place, so concurrent callers never see half a set.
    """
    p = synthetic_params(**params)
    digest = hashlib.sha256(json.dumps(p, sort_keys=True).encode("utf-8")).hexdigest()[:12]
    parent = _cache_base(cache_dir) / "synthetic"
    final = parent / digest
    if _is_complete(final, p):
        return final
    parent.mkdir(parents=True, exist_ok=True)
    tmp = parent / f".{digest}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        make_synthetic(tmp, progress=progress, **params)
        if _is_complete(final, p):  # someone else finished first
            return final
        if final.exists():
            shutil.rmtree(final, ignore_errors=True)
        try:
            os.rename(tmp, final)
        except OSError:
            if not _is_complete(final, p):
                raise
        return final
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
