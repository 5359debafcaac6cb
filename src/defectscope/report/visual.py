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


def resize_map(amap, size: tuple) -> np.ndarray:
    """``[h, w]`` map -> ``[H, W]`` float32 (``size`` = ``(H, W)``), bilinear; returned as is if already that size."""
    from PIL import Image

    a = amap.detach().cpu().numpy() if isinstance(amap, torch.Tensor) else np.asarray(amap)
    a = np.ascontiguousarray(a, dtype=np.float32)
    if a.shape == tuple(size):
        return a
    return np.asarray(Image.fromarray(a).resize((int(size[1]), int(size[0])), Image.BILINEAR), dtype=np.float32)


def _font(px: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=px)  # scalable (FreeType) in Pillow >= 10.1
    except (TypeError, OSError, ImportError):
        return ImageFont.load_default()


def colorbar_box(height: int, width: int) -> tuple[int, int, int, int]:
    """Where :func:`annotated_overlay` draws its colour bar in a ``height x width`` picture:
    ``(x0, y0, x1, y1)``, pixels ``x0 <= x < x1``, ``y0 <= y < y1`` (top = the scale's maximum)."""
    m = max(2, min(height, width) // 40)
    bar_w = max(4, width // 25)
    text_h = max(8, min(height, width) // 16) + 2 * m  # the text line above the bar
    y0 = min(text_h + m, height - 1)
    return width - m - bar_w, y0, width - m, max(y0 + 1, height - m)


def annotated_overlay(image, amap, score: float, defect: bool | None = None, *, vmin: float | None = None,
                      vmax: float | None = None, mark: float | None = None, alpha: float = 0.5,
                      cmap: str = "jet") -> np.ndarray:
    """:func:`overlay` at the size of ``image`` (the map is resized up to it), with the score, the
    verdict and a colour bar drawn in: ``[H, W, 3]`` uint8.

    ``image``: ``[C, H, W]`` in [0, 1] (any size); ``amap``: ``[h, w]``; ``score``: the image's raw
    score; ``defect``: the verdict (None: not calibrated, only the score is written); ``vmin`` /
    ``vmax``: the colour scale (default: the map's own range); ``mark``: a value ticked on the colour
    bar (the pixel threshold). The text (top left) reads ``DEFECT 1.23`` / ``OK 1.23`` or
    ``score 1.23``; the bar (right edge, :func:`colorbar_box`) runs from ``vmax`` (top) to ``vmin``.
    """
    from PIL import Image, ImageDraw

    base = to_rgb_uint8(image)
    h, w = base.shape[:2]
    a = resize_map(amap, (h, w))
    lo = float(a.min()) if vmin is None else float(vmin)
    hi = float(a.max()) if vmax is None else float(vmax)
    heat = colorize(a, lo, hi, cmap).astype(np.float32)
    pic = Image.fromarray((base.astype(np.float32) * (1 - alpha) + heat * alpha).round().astype(np.uint8))
    draw = ImageDraw.Draw(pic)
    px = max(8, min(h, w) // 16)
    font = _font(px)
    m = max(2, min(h, w) // 40)
    text = f"score {score:.4g}" if defect is None else f"{'DEFECT' if defect else 'OK'} {score:.4g}"
    colour = (255, 255, 255) if defect is None else ((255, 60, 60) if defect else (80, 255, 80))
    box = draw.textbbox((m, m), text, font=font)
    draw.rectangle((box[0] - 1, box[1] - 1, box[2] + 1, box[3] + 1), fill=(0, 0, 0))
    draw.text((m, m), text, fill=colour, font=font)
    x0, y0, x1, y1 = colorbar_box(h, w)
    ramp = np.linspace(1.0, 0.0, y1 - y0, dtype=np.float32)[:, None].repeat(x1 - x0, axis=1)
    pic.paste(Image.fromarray(colorize(ramp, 0.0, 1.0, cmap)), (x0, y0))
    if mark is not None and hi > lo:
        y = y0 + round((hi - float(mark)) / (hi - lo) * (y1 - y0 - 1))
        if y0 <= y < y1:
            draw.line((x0 - m, y, x1 - 1, y), fill=(255, 255, 255))
    if min(h, w) >= 128:  # room for the scale's ends
        small = _font(max(8, px * 3 // 4))
        for value, yy, anchor in ((hi, y0, "rt"), (lo, y1, "rb")):
            label = f"{value:.3g}"
            b = draw.textbbox((x0 - m, yy), label, font=small, anchor=anchor)
            draw.rectangle(b, fill=(0, 0, 0))
            draw.text((x0 - m, yy), label, fill=(255, 255, 255), font=small, anchor=anchor)
    return np.asarray(pic)
