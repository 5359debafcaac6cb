"""Pictures of anomaly maps: colour heatmaps and overlays on the input image (uint8 RGB arrays)."""

from __future__ import annotations

import numpy as np
import torch


def colorize(amap, vmin: float | None = None, vmax: float | None = None, cmap: str = "jet") -> np.ndarray:
    """``[H, W]`` map -> ``[H, W, 3]`` uint8 colours, scaled from ``vmin`` to ``vmax`` (default:
    the map's own min and max)."""
    from matplotlib import colormaps

    a = amap.detach().cpu().numpy() if isinstance(amap, torch.Tensor) else np.asarray(amap)
    lo = float(a.min()) if vmin is None else vmin
    hi = float(a.max()) if vmax is None else vmax
    scaled = np.clip((a - lo) / max(hi - lo, 1e-12), 0, 1)
    return (colormaps[cmap](scaled)[..., :3] * 255).astype(np.uint8)


def to_rgb_uint8(image) -> np.ndarray:
    """``[C, H, W]`` float image in [0, 1] (C = 1 or 3) -> ``[H, W, 3]`` uint8."""
    img = image.detach().cpu() if isinstance(image, torch.Tensor) else torch.as_tensor(image)
    if img.shape[0] == 1:
        img = img.expand(3, *img.shape[1:])
    return (img.clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)


def overlay(image, amap, alpha: float = 0.5, vmin: float | None = None, vmax: float | None = None) -> np.ndarray:
    """Heatmap of ``amap`` blended over ``image`` (``[C, H, W]`` in [0, 1]): ``[H, W, 3]`` uint8."""
    base = to_rgb_uint8(image).astype(np.float32)
    heat = colorize(amap, vmin, vmax).astype(np.float32)
    return (base * (1 - alpha) + heat * alpha).round().astype(np.uint8)
