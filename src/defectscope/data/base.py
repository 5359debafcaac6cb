"""The sample contract and the base class of every data set.

A data set is a :class:`torch.utils.data.Dataset` whose item is a dict::

    {"image": FloatTensor [C, H, W] in [0, 1],
     "mask": FloatTensor [H, W] with values exactly 0./1.,
     "label": int (0 normal, 1 anomalous),
     "path": str (the image file),
     "defect_type": str ("good" for normal images)}

so :func:`torch.utils.data.default_collate` batches it (given a fixed ``image_size``).

Masks: normal images get an all-zero mask. Anomalous images get their mask file; a data set whose
anomalous images have no masks at all gives all-zero masks and reports ``has_masks == False`` (so
pixel metrics must not be computed on it). A data set where only SOME anomalous images have masks
is refused with :class:`DatasetError` (it would silently skew pixel metrics). A mask whose size
differs from its image is resized (nearest neighbour) if the aspect ratio matches within 1 %,
otherwise :class:`DatasetError` names both files and sizes; this is checked when the data set is
built (from the file headers) and again when an item is read. Masks are binarized at > 0, so
0/255 (MVTec), 0/1 (VisA-style label images) and anti-aliased masks all work.

``root`` is the folder the records were read from (for MVTec/VisA the category folder).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import torch
from torch.utils.data import Dataset

from ..errors import DatasetError
from ..imageio import read_image, read_image_size, read_mask
from .transforms import Preprocess, SizeLike, normalize_size, resize_image, resize_mask

__all__ = ["Record", "AnomalyDataset", "GOOD"]

#: The defect type of normal images.
GOOD = "good"

PathLike = Union[str, os.PathLike]

_ASPECT_TOLERANCE = 0.01


@dataclass(frozen=True)
class Record:
    """One image of a data set: its file, its mask file (or None), label and defect type."""

    image_path: Path
    mask_path: Optional[Path]
    label: int
    defect_type: str

    def __post_init__(self) -> None:
        object.__setattr__(self, "image_path", Path(self.image_path))
        if self.mask_path is not None:
            object.__setattr__(self, "mask_path", Path(self.mask_path))
        if self.label not in (0, 1):
            raise ValueError(f"label must be 0 or 1, got {self.label!r} for {self.image_path}")
        object.__setattr__(self, "label", int(self.label))


def _aspect_matches(img_wh: Tuple[int, int], mask_wh: Tuple[int, int]) -> bool:
    (iw, ih), (mw, mh) = img_wh, mask_wh
    if min(iw, ih, mw, mh) <= 0:
        return False
    return abs((mw / mh) / (iw / ih) - 1.0) <= _ASPECT_TOLERANCE


def _size_error(rec: Record, img_wh: Tuple[int, int], mask_wh: Tuple[int, int]) -> DatasetError:
    return DatasetError(
        f"mask {rec.mask_path} is {mask_wh[0]}x{mask_wh[1]} but its image {rec.image_path} is "
        f"{img_wh[0]}x{img_wh[1]} (width x height, different aspect ratio); fix or regenerate the mask"
    )


class AnomalyDataset(Dataset):
    """A list of :class:`Record` plus the transform parameters; see the module docstring.

    Parameters: ``records``; ``root`` (the data set folder), ``category``, ``split`` (informative);
    ``image_size`` (``None`` keeps each file's size, an int gives a square, or ``(H, W)``);
    ``channels`` (1 or 3).
    """

    def __init__(
        self,
        records: Iterable[Record],
        *,
        root: Optional[PathLike] = None,
        category: Optional[str] = None,
        split: Optional[str] = None,
        image_size: SizeLike = None,
        channels: int = 3,
    ) -> None:
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {channels!r}")
        self._records: List[Record] = list(records)
        self._root = Path(root) if root is not None else None
        self._category = category
        self._split = split
        self._image_size = normalize_size(image_size)
        self._channels = int(channels)
        self._has_masks = self._check_masks(self._records)
        self._check_mask_sizes()

    # -- validation ----------------------------------------------------------------------------

    def _describe(self) -> str:
        parts = [str(self._root) if self._root is not None else type(self).__name__]
        if self._category:
            parts.append(f"category {self._category}")
        if self._split:
            parts.append(f"split {self._split}")
        return ", ".join(parts)

    def _check_masks(self, records: Sequence[Record]) -> bool:
        anomalous = [r for r in records if r.label == 1]
        with_mask = [r for r in anomalous if r.mask_path is not None]
        if with_mask and len(with_mask) < len(anomalous):
            first = next(r for r in anomalous if r.mask_path is None)
            raise DatasetError(
                f"anomalous image {first.image_path} has no mask file while {len(with_mask)} of "
                f"{len(anomalous)} anomalous images in {self._describe()} do; add its mask or "
                "remove the image (a partly masked set would skew pixel metrics)"
            )
        return bool(with_mask)

    def _check_mask_sizes(self) -> None:
        """Compare mask and image sizes from the file headers (cheap: no pixel decoding)."""
        for rec in self._records:
            if rec.label != 1 or rec.mask_path is None:
                continue
            img_wh = read_image_size(rec.image_path)
            mask_wh = read_image_size(rec.mask_path)
            if img_wh != mask_wh and not _aspect_matches(img_wh, mask_wh):
                raise _size_error(rec, img_wh, mask_wh)

    # -- properties ----------------------------------------------------------------------------

    @property
    def records(self) -> List[Record]:
        """The records (a copy of the list; records themselves are immutable)."""
        return list(self._records)

    @property
    def labels(self) -> List[int]:
        """The label of every item (0 normal, 1 anomalous), in order."""
        return [r.label for r in self._records]

    @property
    def defect_types(self) -> List[str]:
        """The defect type of every item ("good" for normal), in order."""
        return [r.defect_type for r in self._records]

    @property
    def paths(self) -> List[str]:
        """The image path of every item, as strings, in order."""
        return [str(r.image_path) for r in self._records]

    @property
    def category(self) -> Optional[str]:
        return self._category

    @property
    def root(self) -> Optional[Path]:
        return self._root

    @property
    def split(self) -> Optional[str]:
        return self._split

    @property
    def image_size(self) -> Optional[Tuple[int, int]]:
        """``(H, W)`` every item is resized to, or ``None`` (files keep their own size)."""
        return self._image_size

    @property
    def channels(self) -> int:
        return self._channels

    @property
    def preprocess(self) -> Preprocess:
        """The :class:`Preprocess` equivalent to this data set's image transform."""
        return Preprocess(image_size=self._image_size, channels=self._channels)

    @property
    def has_masks(self) -> bool:
        """True if any anomalous record has a mask file (then all of them do)."""
        return self._has_masks

    # -- Dataset protocol ----------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._records)

    def __getitem__(self, index: int) -> Dict[str, Any]:
        n = len(self._records)
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for a data set of {n} items")
        rec = self._records[index]
        image = read_image(rec.image_path, self._channels)
        native_hw = tuple(image.shape[-2:])
        image = resize_image(image, self._image_size)
        target_hw = tuple(image.shape[-2:])
        if rec.label == 1 and rec.mask_path is not None:
            mask = read_mask(rec.mask_path)
            mask_hw = tuple(mask.shape)
            if mask_hw != native_hw and not _aspect_matches(native_hw[::-1], mask_hw[::-1]):
                raise _size_error(rec, native_hw[::-1], mask_hw[::-1])
            mask = resize_mask(mask, target_hw)
        else:
            mask = torch.zeros(target_hw, dtype=torch.float32)
        return {
            "image": image,
            "mask": mask,
            "label": rec.label,
            "path": str(rec.image_path),
            "defect_type": rec.defect_type,
        }

    # -- derived sets --------------------------------------------------------------------------

    def subset(self, indices: Iterable[int]) -> "AnomalyDataset":
        """A new data set of the same class and parameters holding the given items, in order."""
        n = len(self._records)
        picked = []
        for i in indices:
            i = int(i)
            if not -n <= i < n:
                raise IndexError(f"index {i} out of range for a data set of {n} items")
            picked.append(self._records[i])
        new = object.__new__(type(self))
        new.__dict__.update(self.__dict__)
        new._records = picked
        new._has_masks = new._check_masks(picked)
        return new

    def __repr__(self) -> str:
        n_anom = sum(self.labels)
        return (
            f"{type(self).__name__}(category={self._category!r}, split={self._split!r}, "
            f"n={len(self)}, anomalous={n_anom}, has_masks={self._has_masks}, "
            f"image_size={self._image_size}, channels={self._channels}, root='{self._root}')"
        )
