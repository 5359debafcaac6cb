"""A data set made of plain folders: normal images, optional abnormal images and masks.

* ``normal_dir``: normal images. Unless ``normal_test_dir`` is given, they are split into train and
  test with a seeded random permutation (``test_fraction`` of them, rounded, at least one when the
  fraction is > 0, go to test; the split is reproducible and the two parts are disjoint).
* ``abnormal_dir``: one folder or a list of folders of anomalous images; each folder's name is the
  defect type. All abnormal images go to the test split.
* ``mask_dir``: masks of the abnormal images, matched by file stem: ``<stem>.png`` or
  ``<stem>_mask.png`` (any image extension), looked up first in ``mask_dir/<defect_type>/`` and then
  in ``mask_dir/``. Masks are binarized at > 0.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import List, Optional, Sequence, Union

import numpy as np

from ..errors import DatasetError
from .base import GOOD, AnomalyDataset, Record
from ..imageio import list_images
from .mvtec import SPLITS, find_mask
from .transforms import SizeLike

__all__ = ["FolderDataset", "split_normal"]

PathLike = Union[str, os.PathLike]


def _images(folder: Path, role: str) -> List[Path]:
    if not folder.is_dir():
        what = "is a file, not a folder" if folder.exists() else "does not exist"
        raise DatasetError(f"{role} image folder {folder} {what}; check the path")
    images = list_images(folder)
    if not images:
        raise DatasetError(
            f"{role} image folder {folder} has no images (.png, .jpg, .bmp, .tif, .webp); put "
            f"the {role} images there"
        )
    return images


def split_normal(n: int, test_fraction: float, seed: int) -> tuple:
    """Indices ``(train, test)`` (each sorted) of a seeded random split of ``n`` items."""
    if not 0.0 <= test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in [0, 1), got {test_fraction!r}")
    n_test = int(round(n * test_fraction))
    if test_fraction > 0 and n >= 2:
        n_test = min(max(n_test, 1), n - 1)
    else:
        n_test = min(n_test, max(n - 1, 0))
    perm = np.random.default_rng(seed).permutation(n)
    return sorted(int(i) for i in perm[n_test:]), sorted(int(i) for i in perm[:n_test])


class FolderDataset(AnomalyDataset):
    """Plain folders of normal / abnormal images and masks; see the module docstring.

    ``split`` is "train" (normal images only) or "test" (held-out normal images plus all abnormal
    ones). ``category`` defaults to the name of the folder holding ``normal_dir``.
    """

    def __init__(
        self,
        normal_dir: PathLike,
        abnormal_dir: Union[PathLike, Sequence[PathLike], None] = None,
        mask_dir: Optional[PathLike] = None,
        split: str = "train",
        test_fraction: float = 0.2,
        seed: int = 0,
        image_size: SizeLike = 256,
        channels: int = 3,
        normal_test_dir: Optional[PathLike] = None,
        category: Optional[str] = None,
    ) -> None:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        normal_dir = Path(normal_dir).expanduser().absolute()
        normal = _images(normal_dir, "normal")
        if normal_test_dir is not None:
            normal_test = _images(Path(normal_test_dir).expanduser().absolute(), "normal test")
            train_imgs, test_imgs = normal, normal_test
        else:
            tr, te = split_normal(len(normal), test_fraction, seed)
            train_imgs, test_imgs = [normal[i] for i in tr], [normal[i] for i in te]

        if abnormal_dir is None:
            abnormal_dirs: List[Path] = []
        elif isinstance(abnormal_dir, (str, os.PathLike)):
            abnormal_dirs = [Path(abnormal_dir)]
        else:
            abnormal_dirs = [Path(d) for d in abnormal_dir]
        abnormal_dirs = [d.expanduser().absolute() for d in abnormal_dirs]
        mdir = Path(mask_dir).expanduser().absolute() if mask_dir is not None else None
        if mdir is not None and not mdir.is_dir():
            raise DatasetError(f"mask folder {mdir} does not exist; check the path")

        if split == "train":
            records = [Record(p, None, 0, GOOD) for p in train_imgs]
        else:
            records = [Record(p, None, 0, GOOD) for p in test_imgs]
            for adir in abnormal_dirs:
                dtype = adir.name
                for p in _images(adir, "abnormal"):
                    mask = None
                    if mdir is not None:
                        mask = find_mask(mdir / dtype, p.stem) or find_mask(mdir, p.stem)
                    records.append(Record(p, mask, 1, dtype))
            anomalous = [r for r in records if r.label == 1]
            if mdir is not None and anomalous and all(r.mask_path is None for r in anomalous):
                raise DatasetError(
                    f"mask folder {mdir} has no mask for any abnormal image (e.g. "
                    f"{anomalous[0].image_path.name}); name masks <stem>.png or <stem>_mask.png"
                )
            if not records:
                raise DatasetError(
                    f"no test images: test_fraction is 0 and no abnormal folder was given for "
                    f"{normal_dir}; set test_fraction > 0 or pass abnormal/normal test folders"
                )
        super().__init__(
            records,
            root=normal_dir.parent,
            category=category or normal_dir.parent.name,
            split=split,
            image_size=image_size,
            channels=channels,
        )
