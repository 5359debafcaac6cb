"""Turning what callers pass (numpy arrays, torch tensors, lists) into checked numpy arrays.

Scores keep their floating precision (float32 stays float32, float64 stays float64; float16 and
bfloat16 become float32, integers and booleans become float64), so that no two distinct scores
are merged by a cast and pixel maps do not double in memory. Labels and masks become ``bool``
(anything non-zero is anomalous).
"""

from __future__ import annotations

import sys

import numpy as np


def _is_torch_tensor(x) -> bool:
    torch = sys.modules.get("torch")  # never import torch just to check
    return torch is not None and isinstance(x, torch.Tensor)


def to_numpy(x) -> np.ndarray:
    """Return ``x`` as a numpy array without copying when it already is one."""
    if _is_torch_tensor(x):
        import torch

        x = x.detach()
        if x.dtype in (torch.float16, torch.bfloat16):
            x = x.float()
        return x.cpu().numpy()
    return np.asarray(x)


def as_scores(x, name: str) -> np.ndarray:
    """Scores as a floating numpy array; raises ``ValueError`` on NaN or inf."""
    a = to_numpy(x)
    if a.dtype == np.float16:
        a = a.astype(np.float32)
    elif a.dtype not in (np.float32, np.float64):
        if not (np.issubdtype(a.dtype, np.number) or a.dtype == np.bool_):
            raise ValueError(f"{name} must be numeric, got an array of dtype {a.dtype}")
        a = a.astype(np.float64)
    n_bad = a.size - int(np.count_nonzero(np.isfinite(a)))
    if n_bad:
        raise ValueError(
            f"{name} contain {n_bad} non-finite value{'s' if n_bad != 1 else ''} (NaN or inf) "
            f"out of {a.size}; metrics need finite scores"
        )
    return a


def as_labels(x) -> np.ndarray:
    """Labels or masks as a ``bool`` numpy array (non-zero means anomalous)."""
    a = to_numpy(x)
    return a if a.dtype == np.bool_ else a.astype(bool)


def check_same_shape(a: np.ndarray, b: np.ndarray, name_a: str, name_b: str) -> None:
    if a.shape != b.shape:
        raise ValueError(
            f"{name_a} and {name_b} must have the same shape, got {name_a} of shape "
            f"{tuple(a.shape)} and {name_b} of shape {tuple(b.shape)}"
        )


def scores_and_labels(scores, labels, name_s: str = "scores", name_l: str = "labels"):
    """Checked, flattened ``(scores, labels)`` pair."""
    s = as_scores(scores, name_s)
    y = as_labels(labels)
    check_same_shape(s, y, name_s, name_l)
    return s.reshape(-1), y.reshape(-1)


def maps_and_masks(maps, masks):
    """Checked ``(maps, masks)`` of shape ``[N, H, W]`` (a single ``[H, W]`` map is promoted)."""
    m = as_scores(maps, "maps")
    g = as_labels(masks)
    check_same_shape(m, g, "maps", "masks")
    if m.ndim == 2:
        m, g = m[None], g[None]
    if m.ndim != 3:
        raise ValueError(
            f"maps and masks must have shape [N, H, W] (or [H, W]), got shape {tuple(m.shape)}"
        )
    return m, g
