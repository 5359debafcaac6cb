"""Tiling of large images: cut a batch into square tiles, and stitch the tiles' maps back.

A method sees tiles of ``tile`` px (its ``image_size``) cut from the whole image, so that small
defects keep their pixels instead of vanishing in a resize (the tiler of anomalib's
``Tiler``/``TilerConfigurationCallback``, and of Heckler et al., "Exploring the importance of
pretrained feature extractors for unsupervised anomaly detection and localization", CVPR-W 2023).

Geometry, along each axis of length ``size`` (``size >= tile``):

* tile ``k`` starts at ``min(k * stride, size - tile)`` for ``k = 0 .. n - 1``,
  ``n = ceil((size - tile) / stride) + 1``: the tiles step by ``stride`` and the last one is
  **shifted back to the border** (as most tilers do) when ``stride`` does not divide
  ``size - tile``. No padding: every pixel a method sees is a real pixel, and every pixel of the
  image is covered by at least one tile. The last tile then overlaps its neighbour more than
  ``tile - stride``; the merge counts each pixel's real coverage, so that is exact.
* 2-D tiles are the product of the two axes, ordered image-major, then tile row, then tile column:
  tile ``(b, i, j)`` is row ``(b * ny + i) * nx + j`` of the tile batch.

Merging the tiles' maps (``merge``): ``"mean"`` averages the values of the tiles that cover a
pixel (each pixel divided by its own count), ``"max"`` keeps their maximum. Both are computed
separably and without scatter: along x, each output column gathers its (at most ``kx``) covering
(tile column, offset) pairs from every tile row and reduces them; along y, likewise. This is exact
because the set of tiles covering ``(y, x)`` is the product of the tile rows covering ``y`` and the
tile columns covering ``x``, and both the sum and the maximum reduce over a product set one factor
at a time (the mean divides by ``count_y * count_x`` at the end). The gathers use small index
tables (``size x k`` per axis), so the same code runs eagerly, under ``torch.export`` and in ONNX.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any, Sequence

import numpy as np
import torch

__all__ = ["MERGES", "tile_starts", "tile_grid", "tile_images", "stitch_maps", "TiledDataset"]

#: How overlapping tile maps are merged.
MERGES = ("mean", "max")


def _check(size: int, tile: int, stride: int) -> None:
    if tile < 1 or stride < 1:
        raise ValueError(f"tile ({tile}) and stride ({stride}) must be >= 1")
    if stride > tile:
        raise ValueError(f"stride {stride} > tile {tile} would leave pixels uncovered")
    if size < tile:
        raise ValueError(f"an image side of {size} px is smaller than the tile ({tile} px)")


@lru_cache(maxsize=64)
def tile_starts(size: int, tile: int, stride: int) -> tuple[int, ...]:
    """Start offsets of the tiles along one axis of length ``size`` (see the module docstring)."""
    size, tile, stride = int(size), int(tile), int(stride)
    _check(size, tile, stride)
    n = -(-(size - tile) // stride) + 1
    return tuple(min(k * stride, size - tile) for k in range(n))


def tile_grid(height: int, width: int, tile: int, stride: int) -> tuple[int, int]:
    """``(ny, nx)``: tiles per column and per row of a ``height x width`` image."""
    return len(tile_starts(height, tile, stride)), len(tile_starts(width, tile, stride))


@lru_cache(maxsize=64)
def _cover(size: int, tile: int, stride: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """For each pixel ``p`` of an axis: the covering tiles ``k [size, K]``, the offsets ``p -
    start[k]`` in them ``[size, K]``, which of the ``K`` slots are real ``[size, K]`` (pixels
    covered by fewer than ``K`` tiles pad with tile 0, offset 0, invalid), and the counts ``[size]``."""
    starts = np.asarray(tile_starts(size, tile, stride))
    p = np.arange(size)[:, None]
    inside = (p >= starts[None, :]) & (p < starts[None, :] + tile)  # [size, n]
    counts = inside.sum(axis=1)
    k = int(counts.max())
    order = np.argsort(~inside, axis=1, kind="stable")[:, :k]  # covering tiles first, in order
    valid = np.take_along_axis(inside, order, axis=1)
    offset = np.where(valid, p - starts[order], 0)
    index = np.where(valid, order, 0)
    return index, offset, valid, counts


def tile_images(images: torch.Tensor, tile: int, stride: int) -> torch.Tensor:
    """Cut ``images [B, C, H, W]`` into tiles ``[B * ny * nx, C, tile, tile]`` (order: image, tile
    row, tile column; starts from :func:`tile_starts`). One gather, no copy per tile."""
    h, w = int(images.shape[-2]), int(images.shape[-1])
    ys = torch.tensor(tile_starts(h, tile, stride), device=images.device)
    xs = torch.tensor(tile_starts(w, tile, stride), device=images.device)
    r = torch.arange(tile, device=images.device)
    rows = (ys[:, None] + r[None, :])[:, None, :, None]  # [ny, 1, t, 1]
    cols = (xs[:, None] + r[None, :])[None, :, None, :]  # [1, nx, 1, t]
    t = images[:, :, rows, cols]  # [B, C, ny, nx, t, t]
    c = images.shape[1]
    return t.permute(0, 2, 3, 1, 4, 5).reshape(-1, c, tile, tile)


def _reduce(values: torch.Tensor, valid: torch.Tensor, merge: str) -> torch.Tensor:
    """Reduce the last dimension over the ``valid`` slots: the sum (mean: divided later) or max."""
    if merge == "max":
        return values.masked_fill(~valid, float("-inf")).amax(dim=-1)
    return (values * valid.to(values.dtype)).sum(dim=-1)


def stitch_maps(maps: torch.Tensor, size: Sequence[int], tile: int, stride: int, merge: str = "mean") -> torch.Tensor:
    """Tile maps ``[B * ny * nx, tile, tile]`` (the order of :func:`tile_images`) -> whole maps
    ``[B, H, W]`` for images of ``size = (H, W)``, overlaps merged by ``merge`` (``"mean"``: the
    average of the covering tiles, each pixel divided by its own count; ``"max"``: their maximum)."""
    if merge not in MERGES:
        raise ValueError(f"unknown merge {merge!r}; use one of {MERGES}")
    h, w = int(size[0]), int(size[1])
    ny, nx = tile_grid(h, w, tile, stride)
    if tuple(maps.shape[-2:]) != (tile, tile):
        raise ValueError(f"tile maps must be [N, {tile}, {tile}], got {list(maps.shape)}")
    dev = maps.device
    m = maps.reshape(-1, ny, nx, tile, tile).permute(0, 1, 3, 2, 4)  # [B, ny, t(y), nx, t(x)]
    jx, sx, vx, cx = (torch.as_tensor(a, device=dev) for a in _cover(w, tile, stride))
    rowwise = _reduce(m[..., jx, sx], vx, merge)  # gather -> [B, ny, t, W, kx] -> [B, ny, t, W]
    iy, ry, vy, cy = (torch.as_tensor(a, device=dev) for a in _cover(h, tile, stride))
    cols = rowwise.permute(0, 3, 1, 2)  # [B, W, ny, t]
    whole = _reduce(cols[..., iy, ry], vy, merge).transpose(1, 2)  # [B, W, H, ky] -> [B, H, W]
    if merge == "mean":
        whole = whole / (cy[:, None] * cx[None, :]).to(whole.dtype)
    return whole


class TiledDataset(torch.utils.data.Dataset):
    """Every tile of every image of ``dataset`` (items: dicts with an ``"image"`` ``[C, H, W]``),
    as items of their own: what a method fits on when tiling is on (tiles are just more training
    images). Item ``i`` is tile ``i % n`` of image ``i // n`` (``n`` tiles per image, from the
    first image's size; every image must have that size). The other keys are kept; a ``"mask"`` of
    the image's size is cut with it. The last image read is cached, so a sequential pass reads each
    image once."""

    def __init__(self, dataset, tile: int, stride: int) -> None:
        self.dataset, self.tile, self.stride = dataset, int(tile), int(stride)
        self.size = tuple(dataset[0]["image"].shape[-2:]) if len(dataset) else (tile, tile)
        ny, nx = tile_grid(*self.size, self.tile, self.stride)
        self.per_image = ny * nx
        self._cached: tuple[int, dict] | None = None

    def __len__(self) -> int:
        return len(self.dataset) * self.per_image

    def _tiles(self, index: int) -> dict[str, Any]:
        if self._cached is None or self._cached[0] != index:
            item = dict(self.dataset[index])
            image = item["image"]
            if tuple(image.shape[-2:]) != self.size:
                raise ValueError(f"image {index} is {tuple(image.shape[-2:])} px, the first was {self.size}: "
                                 "tiling needs images of one size")
            item["image"] = tile_images(image[None], self.tile, self.stride)
            mask = item.get("mask")
            if isinstance(mask, torch.Tensor) and tuple(mask.shape[-2:]) == self.size:
                item["mask"] = tile_images(mask.reshape(1, 1, *self.size), self.tile, self.stride)[:, 0]
            self._cached = (index, item)
        return self._cached[1]

    def __getitem__(self, index: int) -> dict[str, Any]:
        n = len(self)
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for {n} tiles")
        index %= n
        item = self._tiles(index // self.per_image)
        k = index % self.per_image
        return {key: (value[k] if key in ("image", "mask") and isinstance(value, torch.Tensor) else value)
                for key, value in item.items()}
