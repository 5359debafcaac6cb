"""MVTec AD layout reader (also used for the synthetic set and MVTec-style converted VisA).

Layout (``<root>`` may also be the category folder itself)::

    <root>/<category>/train/good/*.png
    <root>/<category>/test/good/*.png               normal test images (all-zero masks)
    <root>/<category>/test/<defect_type>/*.png      anomalous test images
    <root>/<category>/ground_truth/<defect_type>/<stem>_mask.png   (or <stem>.png)

Any image extension of :data:`~defectscope.imageio.IMAGE_EXTENSIONS` is accepted for images and
masks. Masks are binarized at > 0 (MVTec masks are 0/255).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import List, Optional, Tuple, Union

from ..errors import DatasetError
from .base import GOOD, AnomalyDataset, Record
from ..imageio import IMAGE_EXTENSIONS, list_images
from .transforms import SizeLike

__all__ = ["MVTEC_CATEGORIES", "MVTecDataset", "list_categories", "is_category_dir",
           "mvtec_records", "find_mask"]

PathLike = Union[str, os.PathLike]

#: The 15 categories of MVTec AD.
MVTEC_CATEGORIES: Tuple[str, ...] = (
    "bottle", "cable", "capsule", "carpet", "grid", "hazelnut", "leather", "metal_nut", "pill",
    "screw", "tile", "toothbrush", "transistor", "wood", "zipper",
)

SPLITS = ("train", "test")

LAYOUT = (
    "expected layout:\n"
    "  <root>/<category>/train/good/*.png\n"
    "  <root>/<category>/test/{good,<defect_type>}/*.png\n"
    "  <root>/<category>/ground_truth/<defect_type>/<stem>_mask.png"
)


def is_category_dir(path: PathLike) -> bool:
    """True if ``path`` has the MVTec category layout (``train/`` and ``test/`` sub-folders)."""
    p = Path(path)
    return (p / "train").is_dir() and (p / "test").is_dir()


def list_categories(root: PathLike) -> List[str]:
    """Sorted names of the sub-folders of ``root`` that have the MVTec layout.

    If ``root`` itself is a category folder, its own name is returned. A missing ``root`` raises
    :class:`DatasetError`.
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DatasetError(f"data set folder {root} does not exist; check the path")
    if is_category_dir(root):
        return [root.name]
    return sorted(
        p.name for p in root.iterdir()
        if p.is_dir() and not p.name.startswith(".") and is_category_dir(p)
    )


def find_mask(gt_dir: Path, stem: str) -> Optional[Path]:
    """The mask of image ``stem`` in ``gt_dir``: ``<stem>_mask.<ext>`` first, then ``<stem>.<ext>``."""
    if not gt_dir.is_dir():
        return None
    for name in (f"{stem}_mask", stem):
        for ext in IMAGE_EXTENSIONS:
            for cand in (gt_dir / f"{name}{ext}", gt_dir / f"{name}{ext.upper()}"):
                if cand.is_file():
                    return cand
    return None


def _layout_error(what: str) -> DatasetError:
    return DatasetError(f"{what}\n{LAYOUT}")


def mvtec_records(cat_dir: Path, split: str) -> List[Record]:
    """Records of one MVTec-layout category folder for ``split`` ("train" or "test")."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if split == "train":
        good = cat_dir / "train" / GOOD
        if not good.is_dir():
            raise _layout_error(f"no folder {good}; the training images must be in train/good/")
        images = list_images(good)
        if not images:
            raise DatasetError(f"image folder {good} is empty; put the normal training images there")
        return [Record(p, None, 0, GOOD) for p in images]

    test = cat_dir / "test"
    type_dirs = sorted(
        (p for p in test.iterdir() if p.is_dir() and not p.name.startswith(".")),
        key=lambda p: (p.name != GOOD, p.name),  # test/good first, then the defect types
    ) if test.is_dir() else []
    if not type_dirs:
        raise _layout_error(f"no defect-type sub-folders in {test}")
    records: List[Record] = []
    for tdir in type_dirs:
        dtype = tdir.name
        if dtype == GOOD:
            records.extend(Record(p, None, 0, GOOD) for p in list_images(tdir))
            continue
        gt_dir = cat_dir / "ground_truth" / dtype
        for p in list_images(tdir):
            records.append(Record(p, find_mask(gt_dir, p.stem), 1, dtype))
    if not records:
        raise _layout_error(f"no images in the sub-folders of {test}")
    return records


def resolve_category(root: Path, category: Optional[str], kind: str = "MVTec") -> Tuple[Path, str]:
    """The category folder and name for ``root`` and ``category`` (see :class:`MVTecDataset`)."""
    if not root.is_dir():
        raise _layout_error(f"{kind} data set folder {root} does not exist")
    if is_category_dir(root) and (category is None or category == root.name):
        return root, root.name
    found = list_categories(root)
    if category is None:
        if len(found) == 1:
            return root / found[0], found[0]
        if not found:
            raise _layout_error(f"no category folders with train/ and test/ in {root}")
        raise DatasetError(
            f"{root} holds several categories ({', '.join(found)}); pass category=<one of them>"
        )
    cat_dir = root / category
    if not is_category_dir(cat_dir):
        hint = f"found: {', '.join(found)}" if found else "found none"
        raise _layout_error(
            f"category {category!r} not found in {root} (no {category}/train and "
            f"{category}/test; {hint})"
        )
    return cat_dir, category


class MVTecDataset(AnomalyDataset):
    """An MVTec AD category (or any folder with that layout).

    ``root`` is the data set folder holding category folders, or a category folder itself (then
    ``category`` may be ``None``; it is also ``None``-able when ``root`` holds exactly one
    category). ``split`` is "train" (``train/good``) or "test" (``test/*``). Normal test images
    get all-zero masks; anomalous ones get ``ground_truth/<type>/<stem>_mask.png``. A missing or
    malformed layout raises :class:`DatasetError` showing the expected layout.
    """

    def __init__(
        self,
        root: PathLike,
        category: Optional[str] = None,
        split: str = "train",
        image_size: SizeLike = 256,
        channels: int = 3,
    ) -> None:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        root = Path(root).expanduser().absolute()
        cat_dir, category = resolve_category(root, category)
        super().__init__(
            mvtec_records(cat_dir, split),
            root=cat_dir,
            category=category,
            split=split,
            image_size=image_size,
            channels=channels,
        )
