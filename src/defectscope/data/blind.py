"""The blind setting: training sets that mix normal and anomalous images, without labels.

Zhang, Suganuma & Okatani, "That's BAD: Blind Anomaly Detection by Implicit Local Feature
Clustering", 2023 (reference document ``shared/seeds/004``): real production data is not curated;
a method is given a set of images of which some are defective, and nobody says which. The paper
builds three settings from an MVTec-layout data set; this module builds them from any data set
:func:`defectscope.data.load_dataset` opens (MVTec, VisA, folders, the synthetic set), the same
split for every model:

* ``blind-mix`` (the paper's *Mix*): training = ``train/good`` plus a fraction ``contamination``
  of the anomalous test images, unlabelled; evaluation = the remaining test images (normal test
  images and the anomalous ones not moved). Training and evaluation are disjoint.
  ``contamination`` is the fraction *of the anomalous test images* moved into training (so 0.2 of
  the 40 anomalous images of the synthetic set moves 8 of them); the realised anomalous share of
  the training set is reported by :meth:`BlindSplit.info` (``train_anomaly_rate``).
  ``contamination=0`` is exactly the one-class setting.
* ``blind-test`` (*Test*): the unlabelled test set is both the training set and the evaluation set
  (transductive, as in the paper: the set ``S`` itself is scored).
* ``blind-ano`` (*Ano*): only the anomalous test images, both to train and to evaluate; every image
  is anomalous, so only pixel-level metrics are defined (the image ones are None).
* ``one-class`` (``normal``): the usual setting, train/good to train and the test set to evaluate.

The anomalous images moved into training are chosen by a seeded random order that depends only on
``seed`` and the category name, not on the model: the same seed gives the same split to every
method, a different seed a different one. The order is stratified over defect types (each type's
images are shuffled and interleaved in proportion to the type's size), so a small fraction still
samples every defect type, and it is nested: the images moved at 5 % are among those moved at
10 %, which makes a contamination sweep a clean degradation curve.

The training set is *unlabelled*: its items all carry ``label`` 0, ``defect_type``
``"unlabelled"`` and an empty mask, so no method can read the truth; :class:`BlindSplit` keeps
the true labels (``train_labels``) for the record.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import List, Optional, Sequence

import numpy as np

from ..errors import DatasetError
from .base import AnomalyDataset, Record
from .settings import normalize_setting as any_setting

__all__ = ["SETTINGS", "BlindSplit", "normalize_setting", "contamination_order", "blind_split", "load_setting",
           "UNLABELLED"]

#: The settings, under their canonical names (as recorded in the ``setting`` field of a result).
SETTINGS = ("one-class", "blind-mix", "blind-test", "blind-ano")
#: The defect type every training item of a blind setting shows.
UNLABELLED = "unlabelled"


def normalize_setting(name: str) -> str:
    """The canonical name of one of this module's settings (``normal`` -> ``one-class``, ``mix`` ->
    ``blind-mix``...); the other settings are built by :func:`defectscope.data.settings.load_split`."""
    key = any_setting(name)
    if key not in SETTINGS:
        raise DatasetError(f"{name!r} is not a blind setting; use one of normal (one-class), blind-mix, blind-test, "
                           "blind-ano")
    return key


def _check_fraction(contamination: float) -> float:
    c = float(contamination)
    if not 0.0 <= c < 1.0:
        raise DatasetError(f"contamination must be in [0, 1) (a fraction of the anomalous test images; 1 would "
                           f"leave none to evaluate), got {contamination!r}")
    return c


@dataclass(frozen=True)
class BlindSplit:
    """A training set and an evaluation set built for one setting.

    Attributes:
        setting: canonical setting name (see :data:`SETTINGS`).
        contamination: the fraction of anomalous test images moved into training (``blind-mix``;
            0 for ``one-class``; None for ``blind-test``/``blind-ano``, where the data set fixes it).
        seed: the seed of the choice.
        train: the training set (unlabelled in the blind settings).
        test: the labelled evaluation set.
        train_labels: the true label of each training item (never shown to a model).
    """

    setting: str
    contamination: Optional[float]
    seed: int
    train: AnomalyDataset
    test: AnomalyDataset
    train_labels: tuple

    def info(self) -> dict:
        """The fields a result record stores about the split."""
        n_anom = int(sum(self.train_labels))
        n = len(self.train_labels)
        return {"setting": self.setting, "contamination": self.contamination, "n_train": n,
                "n_train_anomalous": n_anom, "train_anomaly_rate": n_anom / n if n else None,
                "n_test": len(self.test), "n_test_anomalous": int(sum(self.test.labels))}


def contamination_order(test: AnomalyDataset, seed: int = 0) -> List[int]:
    """Indices of the anomalous items of ``test`` in the order they are moved into training.

    Stratified and nested (see the module docstring): within each defect type the images are
    shuffled; the ``r``-th image (0-based) of a type of ``n`` images gets the key ``(r + u) / n``
    with ``u`` uniform in [0, 1), and the images are taken by increasing key. The generator is
    seeded with ``(seed, crc32(category))`` only.
    """
    category = test.category or ""
    rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, zlib.crc32(category.encode("utf-8"))])
    by_type: dict[str, List[int]] = {}
    for i, (label, dtype) in enumerate(zip(test.labels, test.defect_types)):
        if label == 1:
            by_type.setdefault(dtype, []).append(i)
    keys, order = [], []
    for dtype in sorted(by_type):
        idx = np.asarray(by_type[dtype])[rng.permutation(len(by_type[dtype]))]
        n = len(idx)
        keys.append((np.arange(n) + rng.random(n)) / n)
        order.append(idx)
    if not order:
        return []
    keys_all, idx_all = np.concatenate(keys), np.concatenate(order)
    return [int(i) for i in idx_all[np.argsort(keys_all, kind="stable")]]


def _unlabelled(records: Sequence[Record]) -> List[Record]:
    return [Record(r.image_path, None, 0, UNLABELLED) for r in records]


def _training_set(like: AnomalyDataset, records: Sequence[Record], setting: str) -> AnomalyDataset:
    return AnomalyDataset(_unlabelled(records), root=like.root, category=like.category, split=f"{setting}-train",
                          image_size=like.image_size, channels=like.channels)


def blind_split(train: AnomalyDataset, test: AnomalyDataset, setting: str = "blind-mix",
                contamination: Optional[float] = 0.1, seed: int = 0) -> BlindSplit:
    """Build ``setting`` from a data set's ``train`` (normal images) and labelled ``test`` split.

    ``contamination`` is used by ``blind-mix`` only (a fraction in [0, 1) of the anomalous test
    images; the count moved is ``round(contamination * n_anomalous)``); giving one with
    ``blind-test``/``blind-ano`` is an error. See the module docstring for the settings.
    """
    setting = normalize_setting(setting)
    test_records = test.records
    if setting in ("blind-test", "blind-ano") and contamination not in (None, 0, 0.0):
        raise DatasetError(f"--contamination applies to blind-mix only; {setting} uses the test set as it is "
                           f"(got contamination={contamination})")
    if setting == "one-class":
        if contamination not in (None, 0, 0.0):
            raise DatasetError("the one-class (normal) setting has no contamination; use blind-mix")
        return BlindSplit(setting, 0.0, int(seed), train, test, tuple(train.labels))
    if setting == "blind-test":
        return BlindSplit(setting, None, int(seed), _training_set(test, test_records, setting), test,
                          tuple(test.labels))
    if setting == "blind-ano":
        anomalous = [i for i, y in enumerate(test.labels) if y == 1]
        if not anomalous:
            raise DatasetError(f"blind-ano needs anomalous test images; {test.root} has none")
        picked = [test_records[i] for i in anomalous]
        return BlindSplit(setting, None, int(seed), _training_set(test, picked, setting), test.subset(anomalous),
                          tuple(1 for _ in anomalous))
    # blind-mix
    c = _check_fraction(0.1 if contamination is None else contamination)
    order = contamination_order(test, seed)
    n_move = int(round(c * len(order)))
    if c > 0 and n_move == 0 and order:
        n_move = 1  # a non-zero contamination moves at least one image
    if n_move >= len(order) and order:
        raise DatasetError(f"contamination {c} would move all {len(order)} anomalous test images into training, "
                           "leaving none to evaluate; use a smaller fraction")
    moved = set(order[:n_move])
    kept = [i for i in range(len(test_records)) if i not in moved]
    records = train.records + [test_records[i] for i in sorted(moved)]
    labels = tuple(list(train.labels) + [1] * len(moved))
    return BlindSplit(setting, c, int(seed), _training_set(train, records, setting), test.subset(kept), labels)


def load_setting(spec, category: Optional[str] = None, setting: str = "one-class",
                 contamination: Optional[float] = None, seed: int = 0, image_size=None,
                 channels: int = 3) -> BlindSplit:
    """Open ``spec``/``category`` (see :func:`defectscope.data.load_dataset`) and build ``setting``."""
    from . import load_dataset

    train = load_dataset(spec, category, "train", image_size=image_size, channels=channels)
    test = load_dataset(spec, category, "test", image_size=image_size, channels=channels)
    return blind_split(train, test, setting, contamination, seed)
