"""VisA reader: the original layout with its split file, or the MVTec-style converted layout.

(a) Original layout::

    <root>/split_csv/1cls.csv          columns object,split,label,image,mask
    <root>/<category>/Data/Images/Normal/*.JPG
    <root>/<category>/Data/Images/Anomaly/*.JPG
    <root>/<category>/Data/Masks/Anomaly/*.png

  ``label`` is "normal" or "anomaly", ``split`` is "train" or "test", and ``image``/``mask`` are
  paths relative to ``<root>`` (``mask`` is empty for normal images). ``root`` may also be the
  category folder (``<root>/<category>``), the split file then being looked up in its parent.
  Anomalous images get the defect type ``"bad"`` (VisA does not name defect types), as in the
  converted layout.

(b) MVTec-style converted layout (``<root>/<category>/{train,test,ground_truth}``, as written by
  VisA's own conversion script, masks ``ground_truth/bad/<stem>.png``): read by the MVTec reader.

VisA masks are label images (0 background, small positive values or 255 for defects): they are
binarized at > 0.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import List, Optional, Tuple, Union

from ..errors import DatasetError
from .base import GOOD, AnomalyDataset, Record
from .mvtec import SPLITS, is_category_dir, list_categories as _mvtec_categories
from .mvtec import mvtec_records, resolve_category
from .transforms import SizeLike

__all__ = ["VISA_CATEGORIES", "VisADataset", "list_categories", "SPLIT_FILE"]

PathLike = Union[str, os.PathLike]

#: The 12 categories of VisA.
VISA_CATEGORIES: Tuple[str, ...] = (
    "candle", "capsules", "cashew", "chewinggum", "fryum", "macaroni1", "macaroni2", "pcb1",
    "pcb2", "pcb3", "pcb4", "pipe_fryum",
)

#: The split file of the original layout, relative to the VisA root.
SPLIT_FILE = Path("split_csv") / "1cls.csv"

#: Defect type given to VisA's anomalous images.
ANOMALY_TYPE = "bad"

_COLUMNS = ("object", "split", "label", "image", "mask")

LAYOUT = (
    "expected VisA layout:\n"
    "  <root>/split_csv/1cls.csv  (object,split,label,image,mask)\n"
    "  <root>/<category>/Data/Images/{Normal,Anomaly}/*.JPG, Data/Masks/Anomaly/*.png\n"
    "or the MVTec-style one: <root>/<category>/{train/good,test/<type>,ground_truth/<type>}"
)


def _original_root(root: Path) -> Optional[Path]:
    """The VisA root holding ``split_csv/1cls.csv`` for ``root`` or its parent, else None."""
    if (root / SPLIT_FILE).is_file():
        return root
    if (root / "Data" / "Images").is_dir() and (root.parent / SPLIT_FILE).is_file():
        return root.parent
    return None


def _read_split_file(csv_path: Path) -> List[dict]:
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            fields = [f.strip() for f in (reader.fieldnames or [])]
            missing = [c for c in _COLUMNS if c not in fields]
            if missing:
                raise DatasetError(
                    f"split file {csv_path} lacks the column(s) {', '.join(missing)} (has "
                    f"{', '.join(fields) or 'none'}); use VisA's split_csv/1cls.csv"
                )
            rows = [{(k or "").strip(): (v or "").strip() for k, v in row.items()} for row in reader]
    except OSError as exc:
        raise DatasetError(f"cannot read split file {csv_path}: {exc}; check the file") from exc
    except (csv.Error, UnicodeDecodeError) as exc:
        raise DatasetError(
            f"split file {csv_path} is not a valid CSV ({exc}); re-download split_csv/1cls.csv"
        ) from exc
    return rows


def _original_records(visa_root: Path, category: str, split: str) -> List[Record]:
    csv_path = visa_root / SPLIT_FILE
    rows = _read_split_file(csv_path)
    objects = sorted({r["object"] for r in rows})
    if category not in objects:
        raise DatasetError(
            f"category {category!r} is not in {csv_path} (it lists {', '.join(objects) or 'none'}); "
            "pass one of those"
        )
    records: List[Record] = []
    for line, row in enumerate(rows, start=2):
        if row["object"] != category or row["split"].lower() != split:
            continue
        label_s = row["label"].lower()
        if label_s not in ("normal", "anomaly"):
            raise DatasetError(
                f"split file {csv_path} line {line}: label {row['label']!r} is neither normal nor "
                "anomaly; fix the file"
            )
        image = visa_root / row["image"]
        if not image.is_file():
            raise DatasetError(
                f"image {image} listed in {csv_path} (line {line}) does not exist; check the data set"
            )
        if label_s == "normal":
            records.append(Record(image, None, 0, GOOD))
            continue
        mask: Optional[Path] = None
        if row["mask"]:
            mask = visa_root / row["mask"]
            if not mask.is_file():
                raise DatasetError(
                    f"mask {mask} listed in {csv_path} (line {line}) does not exist; check the "
                    "data set"
                )
        records.append(Record(image, mask, 1, ANOMALY_TYPE))
    if not records:
        raise DatasetError(f"split file {csv_path} lists no {split} images for {category!r}; "
                           "check the file")
    return records


def list_categories(root: PathLike) -> List[str]:
    """Categories under a VisA ``root``: from the split file (original layout, those whose folder
    exists) or the MVTec-style category folders."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DatasetError(f"data set folder {root} does not exist; check the path")
    visa_root = _original_root(root)
    if visa_root is not None:
        if visa_root != root:  # root is a category folder of the original layout
            return [root.name]
        objects = {r["object"] for r in _read_split_file(visa_root / SPLIT_FILE)}
        return sorted(o for o in objects if (visa_root / o).is_dir())
    return _mvtec_categories(root)


class VisADataset(AnomalyDataset):
    """A VisA category, in the original layout (with ``split_csv/1cls.csv``) or the MVTec-style
    converted one; see the module docstring. ``split`` is "train" or "test"."""

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
        if not root.is_dir():
            raise DatasetError(f"VisA data set folder {root} does not exist\n{LAYOUT}")
        visa_root = _original_root(root)
        if visa_root is not None:
            if visa_root != root:
                if category not in (None, root.name):
                    raise DatasetError(
                        f"{root} is the VisA category {root.name!r}, not {category!r}; pass the "
                        "VisA root folder to read another category"
                    )
                category = root.name
            if category is None:
                cats = list_categories(visa_root)
                if len(cats) != 1:
                    raise DatasetError(
                        f"{visa_root} holds several VisA categories ({', '.join(cats)}); pass "
                        "category=<one of them>"
                    )
                category = cats[0]
            records = _original_records(visa_root, category, split)
            cat_root = visa_root / category
        else:
            if (root / "Data" / "Images").is_dir() or any(
                (p / "Data" / "Images").is_dir() for p in root.iterdir() if p.is_dir()
            ):
                raise DatasetError(
                    f"VisA folder {root} has Data/Images but no {SPLIT_FILE} (in it or its parent); "
                    "copy split_csv/1cls.csv from the VisA release there"
                )
            if not is_category_dir(root) and not _mvtec_categories(root):
                raise DatasetError(f"{root} has neither VisA layout\n{LAYOUT}")
            cat_root, category = resolve_category(root, category, kind="VisA")
            records = mvtec_records(cat_root, split)
        super().__init__(
            records,
            root=cat_root,
            category=category,
            split=split,
            image_size=image_size,
            channels=channels,
        )
