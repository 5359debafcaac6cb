"""Data sets, image reading, transforms and the built-in synthetic set.

Every data set is an :class:`AnomalyDataset` (a ``torch.utils.data.Dataset``) whose item is
``{"image": [C,H,W] in [0,1], "mask": [H,W] of 0./1., "label": 0|1, "path": str,
"defect_type": str}`` (see :mod:`defectscope.data.base`).

Data set specs understood by :func:`load_dataset` and :func:`list_categories`:

* ``synthetic`` - the built-in synthetic set with default parameters, generated once into the
  cache (``$DEFECTSCOPE_CACHE`` or ``~/.cache/defectscope``); ``synthetic:DIR`` reads the synthetic
  set in ``DIR`` (e.g. written by ``defectscope data synth --out DIR``, whatever its parameters),
  or generates the default one there if ``DIR`` holds none.
* ``mvtec:DIR`` - MVTec AD layout (``DIR/<category>/train/good``, ``test/<type>``,
  ``ground_truth/<type>/<stem>_mask.png``), or ``DIR`` a category folder itself.
* ``visa:DIR`` - VisA, original layout with ``split_csv/1cls.csv`` or the MVTec-style converted one.
* ``folder:DIR`` - plain folders: ``DIR/good`` holds the normal images (20 % of them, chosen with a
  fixed seed, are held out for the test split); every other sub-folder with images (e.g.
  ``DIR/defect``, ``DIR/scratch``) holds anomalous test images, its name being the defect type;
  ``DIR/masks`` (optional) holds their masks named ``<stem>.png`` or ``<stem>_mask.png``
  (optionally in ``DIR/masks/<defect_type>/``). With ``category``, ``DIR/<category>`` is used
  instead of ``DIR``.

``category=None`` picks the first category of :func:`list_categories` (the synthetic set's first is
``washer``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import List, Optional, Tuple, Union

from ..errors import DatasetError
from .base import GOOD, AnomalyDataset, Record
from .blind import SETTINGS, BlindSplit, blind_split, load_setting, normalize_setting
from .folder import FolderDataset
from ..imageio import IMAGE_EXTENSIONS, is_image_file, list_images, read_image, read_mask
from .mvtec import MVTEC_CATEGORIES, MVTecDataset
from .mvtec import list_categories as mvtec_categories
from .synthetic import (
    DEFECT_TYPES,
    MANIFEST,
    SYNTHETIC_CATEGORIES,
    make_synthetic,
    render_pair,
    synthetic_root,
)
from .transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    Preprocess,
    imagenet_normalize,
    resize_image,
    resize_mask,
    to_channels,
)
from .visa import VISA_CATEGORIES, VisADataset
from .visa import list_categories as visa_categories

__all__ = [
    "AnomalyDataset",
    "Record",
    "GOOD",
    "MVTecDataset",
    "VisADataset",
    "FolderDataset",
    "MVTEC_CATEGORIES",
    "VISA_CATEGORIES",
    "SYNTHETIC_CATEGORIES",
    "DEFECT_TYPES",
    "IMAGE_EXTENSIONS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "Preprocess",
    "imagenet_normalize",
    "resize_image",
    "resize_mask",
    "to_channels",
    "read_image",
    "read_mask",
    "list_images",
    "is_image_file",
    "make_synthetic",
    "synthetic_root",
    "render_pair",
    "load_dataset",
    "list_categories",
    "parse_spec",
    "SETTINGS",
    "BlindSplit",
    "blind_split",
    "load_setting",
    "normalize_setting",
]

SPEC_FORMS = "synthetic, synthetic:DIR, mvtec:DIR, visa:DIR or folder:DIR"
_KINDS = ("synthetic", "mvtec", "visa", "folder")
_FOLDER_RESERVED = {GOOD, "masks", "mask"}


def parse_spec(spec: Union[str, os.PathLike]) -> Tuple[str, Optional[Path]]:
    """Split a data set spec into ``(kind, folder or None)``; raises :class:`DatasetError`."""
    text = os.fspath(spec).strip() if isinstance(spec, (str, os.PathLike)) else None
    if text:
        kind, sep, rest = text.partition(":")
        kind = kind.strip().lower()
        if kind == "synthetic" and not sep:
            return kind, None
        if kind in _KINDS and sep and rest.strip():
            return kind, Path(rest.strip()).expanduser()
    raise DatasetError(f"unknown data set spec {spec!r}; use {SPEC_FORMS}")


def _folder_parts(folder: Path) -> Tuple[Path, List[Path], Optional[Path]]:
    """``(good, abnormal dirs, masks dir or None)`` of a ``folder:DIR`` data set."""
    good = folder / GOOD
    if not good.is_dir():
        raise DatasetError(
            f"folder data set {folder} has no good/ sub-folder; put the normal images in "
            f"{good} (and anomalous ones in other sub-folders, masks in masks/)"
        )
    abnormal = [
        p for p in sorted(folder.iterdir(), key=lambda p: p.name)
        if p.is_dir() and not p.name.startswith(".") and p.name not in _FOLDER_RESERVED
        and list_images(p)
    ]
    masks = next((folder / m for m in ("masks", "mask") if (folder / m).is_dir()), None)
    return good, abnormal, masks


def _synthetic_dir(folder: Optional[Path]) -> Path:
    """The default cached set, or ``folder`` if it holds a synthetic set (of any parameters),
    else the default set generated into ``folder``."""
    if folder is None:
        return synthetic_root()
    if (folder / MANIFEST).is_file():
        return folder
    return make_synthetic(folder)


def list_categories(spec: Union[str, os.PathLike]) -> List[str]:
    """The categories available for a data set spec (see the module docstring)."""
    kind, folder = parse_spec(spec)
    if kind == "synthetic":
        if folder is not None and (folder / MANIFEST).is_file():
            return mvtec_categories(folder)
        return list(SYNTHETIC_CATEGORIES)
    assert folder is not None
    if kind == "mvtec":
        return mvtec_categories(folder)
    if kind == "visa":
        return visa_categories(folder)
    if not folder.is_dir():
        raise DatasetError(f"folder data set {folder} does not exist; check the path")
    if (folder / GOOD).is_dir():
        return [folder.name]
    return sorted(
        p.name for p in folder.iterdir()
        if p.is_dir() and not p.name.startswith(".") and (p / GOOD).is_dir()
    )


def load_dataset(
    spec: Union[str, os.PathLike],
    category: Optional[str] = None,
    split: str = "train",
    image_size=None,
    channels: int = 3,
) -> AnomalyDataset:
    """Open the ``split`` ("train" or "test") of ``category`` of the data set ``spec``.

    ``image_size`` is ``None`` (keep each file's size), an int (square) or ``(H, W)``; ``channels``
    is 1 or 3. ``category=None`` takes the first of :func:`list_categories`. See the module
    docstring for the specs; an unknown one raises :class:`DatasetError` listing the valid forms.
    """
    kind, folder = parse_spec(spec)
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if kind == "synthetic":
        root = _synthetic_dir(folder)
        cats = mvtec_categories(root)
        order = [c for c in SYNTHETIC_CATEGORIES if c in cats] + [c for c in cats
                                                                  if c not in SYNTHETIC_CATEGORIES]
        if category is None:
            category = order[0] if order else None
        return MVTecDataset(root, category, split, image_size=image_size, channels=channels)
    assert folder is not None
    if category is None:
        cats = list_categories(spec)
        if not cats:
            hint = {"mvtec": "MVTec", "visa": "VisA", "folder": "folder"}[kind]
            if kind == "mvtec":
                return MVTecDataset(folder, None, split, image_size, channels)  # raises with layout
            if kind == "visa":
                return VisADataset(folder, None, split, image_size, channels)  # raises with layout
            raise DatasetError(f"no {hint} data set found in {folder}; check the path")
        category = cats[0]
    if kind == "mvtec":
        return MVTecDataset(folder, category, split, image_size=image_size, channels=channels)
    if kind == "visa":
        return VisADataset(folder, category, split, image_size=image_size, channels=channels)
    # folder:DIR
    base = folder if (folder / GOOD).is_dir() and category in (None, folder.name) else folder / category
    good, abnormal, masks = _folder_parts(base)
    return FolderDataset(
        good,
        abnormal_dir=abnormal or None,
        mask_dir=masks,
        split=split,
        image_size=image_size,
        channels=channels,
        category=base.name,
    )
