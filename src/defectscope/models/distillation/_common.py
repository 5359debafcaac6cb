"""What the feature-distillation methods (STFPM, Reverse Distillation) share:
:func:`fuse_level_maps`, per-level distance maps ``[B, h_l, w_l]`` upsampled to the input size and
combined by product (STFPM) or sum (Reverse Distillation). The folded inference copies of the
networks are in :mod:`defectscope.models._inference`, shared with the other families."""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["fuse_level_maps"]


def fuse_level_maps(maps: list[torch.Tensor], size: int, mode: str, align_corners: bool = False) -> torch.Tensor:
    """Per-level maps ``[B, h_l, w_l]`` -> ``[B, size, size]``: each upsampled bilinearly to the
    input size, then multiplied (``mode="product"``) or added (``"sum"``)."""
    out = None
    for m in maps:
        up = F.interpolate(m.unsqueeze(1), size=(size, size), mode="bilinear", align_corners=align_corners)
        if out is None:
            out = up
        elif mode == "product":
            out = out * up
        elif mode == "sum":
            out = out + up
        else:
            raise ValueError(f"mode must be 'product' or 'sum', got {mode!r}")
    return out.squeeze(1)
