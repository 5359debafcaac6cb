"""Validation data taken from the training side: a seeded hold-out split of a training set, and
data sets made from folders of normal or anomalous validation images (never the test set). What
:func:`defectscope.deploy.calibrate` and early stopping learn from."""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import DefectscopeError
from .base import AnomalyDataset, Record
from .folder import _images, split_normal
from .mvtec import find_mask

__all__ = ["DEFAULT_VAL_FRACTION", "validation_split", "image_folder_dataset"]

#: Default fraction of the training images held out (seeded) to calibrate the threshold.
DEFAULT_VAL_FRACTION = 0.2


def validation_split(dataset, fraction: float = DEFAULT_VAL_FRACTION, seed: int = 0):
    """``(train, val)``: a seeded random ``fraction`` of the TRAINING set held out for calibration.

    ``fraction = 0`` gives ``(dataset, None)``. An :class:`~defectscope.data.AnomalyDataset` is split
    into two of its kind (same root, category, preprocessing); any other data set into
    ``torch.utils.data.Subset`` objects. The two parts are disjoint and at least one image each.
    """
    if not 0.0 <= fraction < 1.0:
        raise DefectscopeError(f"validation fraction must be in [0, 1), got {fraction!r}")
    if fraction == 0:
        return dataset, None
    if len(dataset) < 2:
        raise DefectscopeError(f"{len(dataset)} training image(s): too few to hold out a validation split; "
                               "add images or set the validation fraction to 0")
    tr, va = split_normal(len(dataset), fraction, seed)
    if isinstance(dataset, AnomalyDataset):
        recs = dataset.records
        kw = dict(root=dataset.root, category=dataset.category, image_size=dataset.image_size,
                  channels=dataset.channels)
        return (AnomalyDataset([recs[i] for i in tr], split="train", **kw),
                AnomalyDataset([recs[i] for i in va], split="val", **kw))
    return torch.utils.data.Subset(dataset, tr), torch.utils.data.Subset(dataset, va)


def image_folder_dataset(folder, label: int, masks=None, image_size=None, channels: int = 3):
    """The images directly in ``folder`` as a data set with ``label`` (0 normal, 1 anomalous); with
    ``masks`` (a folder of ``<stem>.png`` or ``<stem>_mask.png``), the anomalous images' masks."""
    folder = Path(folder).expanduser()
    role = "anomalous" if label else "normal"
    mdir = Path(masks).expanduser() if masks is not None else None
    if mdir is not None and not mdir.is_dir():
        raise DefectscopeError(f"mask folder {mdir} does not exist; check the path")
    recs = [Record(p, find_mask(mdir, p.stem) if (mdir is not None and label) else None, label,
                   "good" if not label else folder.name) for p in _images(folder, role)]
    return AnomalyDataset(recs, root=folder, category=folder.name, split="val", image_size=image_size,
                          channels=channels)
