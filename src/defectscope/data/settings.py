"""The learning settings: which images a method learns from, and which it is evaluated on.

* ``one-class``: the training images of one category (``train/good``); its test split.
* ``multi-class``: one model learns from the union of the training images of several categories
  (unlabelled: no item says its category), and is evaluated on each category's test split in turn.
* ``few-shot``: ``shots`` normal training images of one category, drawn by ``seed`` (the same draw
  for every method; the images drawn for k are among those drawn for any larger k); its test split.
* ``zero-shot``: no training images at all, only the context (the category's name); its test split.
* ``blind-mix``, ``blind-test``, ``blind-ano``: unlabelled training sets that contain anomalies
  (:mod:`defectscope.data.blind`).

:func:`load_split` builds any of them from a data set spec; the choice depends on the data and the
seed only, never on the model.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np

from ..errors import DatasetError
from .base import AnomalyDataset
__all__ = ["SETTINGS", "Split", "normalize_setting", "load_split", "few_shot_indices"]

#: Every setting, under its canonical name (the ``setting`` field of a result record).
SETTINGS = ("one-class", "multi-class", "few-shot", "zero-shot", "blind-mix", "blind-test", "blind-ano")
_ALIASES = {"normal": "one-class", "one_class": "one-class", "oneclass": "one-class", "mix": "blind-mix",
            "test": "blind-test", "ano": "blind-ano", "multiclass": "multi-class", "unified": "multi-class",
            "fewshot": "few-shot", "zeroshot": "zero-shot"}


def normalize_setting(name: str) -> str:
    """The canonical name of a setting (``normal`` -> ``one-class``, ``mix`` -> ``blind-mix``...)."""
    key = str(name).strip().lower().replace("_", "-")
    key = _ALIASES.get(key, _ALIASES.get(key.replace("-", ""), key))
    if key not in SETTINGS:
        raise DatasetError(f"unknown setting {name!r}; use one of {', '.join(SETTINGS)} (normal = one-class)")
    return key


def family(setting: str) -> str:
    """The tag a method needs for ``setting`` (every blind setting needs ``blind``)."""
    setting = normalize_setting(setting)
    return "blind" if setting.startswith("blind-") else setting


@dataclass(frozen=True)
class Split:
    """What a method learns from and is evaluated on, for one setting.

    Attributes:
        setting: canonical name (:data:`SETTINGS`).
        seed: the seed of every random choice.
        train: the training set (``None`` in the zero-shot setting).
        tests: ``{category: evaluation set}`` (one entry, or one per category in multi-class).
        info: what a result record stores about the split (counts, contamination, shots).
    """

    setting: str
    seed: int
    train: Optional[AnomalyDataset]
    tests: dict = field(default_factory=dict)
    info: dict = field(default_factory=dict)

    @property
    def categories(self) -> tuple:
        return tuple(self.tests)


def few_shot_indices(n: int, shots: int, seed: int = 0) -> list[int]:
    """``shots`` of ``range(n)`` drawn by ``seed``, sorted; nested: a prefix of one seeded order."""
    if not 1 <= shots <= n:
        raise DatasetError(f"few-shot: {shots} shot(s) asked for, but the training split has {n} image(s); "
                           f"use 1 to {n}")
    order = np.random.default_rng([int(seed) & 0xFFFFFFFF, 0x5EED]).permutation(n)
    return sorted(int(i) for i in order[:shots])


def _counts(train: Optional[AnomalyDataset], test: AnomalyDataset) -> dict:
    n = len(train) if train is not None else 0
    return {"n_train": n, "n_train_anomalous": 0, "train_anomaly_rate": 0.0 if n else None,
            "n_test": len(test), "n_test_anomalous": int(sum(test.labels))}


def load_split(spec, category: Optional[str] = None, setting: str = "one-class", *,
               contamination: Optional[float] = None, shots: Optional[int] = None, seed: int = 0,
               categories: Optional[Sequence[str]] = None, image_size=None, channels: int = 3) -> Split:
    """Open ``spec`` (see :func:`defectscope.data.load_dataset`) and build ``setting``.

    ``category``: the category of a one-category setting (default: the data set's first).
    ``categories``: the categories of the multi-class setting (default: all of the data set).
    ``shots``: the number of training images of the few-shot setting. ``contamination``: blind-mix.
    """
    from . import list_categories, load_dataset
    from .blind import load_setting

    setting = normalize_setting(setting)
    if shots is not None and setting != "few-shot":
        raise DatasetError(f"shots apply to the few-shot setting only, not {setting}")
    if contamination not in (None, 0, 0.0) and setting != "blind-mix":
        raise DatasetError(f"contamination applies to blind-mix only, not {setting}")
    kw = dict(image_size=image_size, channels=channels)
    if setting == "multi-class":
        cats = list(categories or list_categories(spec))
        if not cats:
            raise DatasetError(f"multi-class: no category found in {spec}")
        trains = [load_dataset(spec, c, "train", **kw) for c in cats]
        tests = {c: load_dataset(spec, c, "test", **kw) for c in cats}
        records = [r for t in trains for r in t.records]
        union = AnomalyDataset(records, root=trains[0].root, category="+".join(cats), split="multi-class-train", **kw)
        info = {"n_train": len(union), "n_train_anomalous": 0, "train_anomaly_rate": 0.0,
                "n_test": sum(len(t) for t in tests.values()),
                "n_test_anomalous": sum(int(sum(t.labels)) for t in tests.values()), "categories": cats}
        return Split(setting, int(seed), union, tests, info)
    if setting in ("few-shot", "zero-shot"):
        test = load_dataset(spec, category, "test", **kw)
        train = None
        extra: dict = {}
        if setting == "few-shot":
            if shots is None:
                raise DatasetError("few-shot needs the number of shots (e.g. --shots 1,2,4,8)")
            full = load_dataset(spec, category, "train", **kw)
            train = full.subset(few_shot_indices(len(full), int(shots), seed))
            extra = {"shots": int(shots)}
        return Split(setting, int(seed), train, {test.category: test}, {**_counts(train, test), **extra})
    blind = load_setting(spec, category, setting, contamination, seed, **kw)
    info = blind.info()
    info.pop("setting", None)
    return Split(setting, int(seed), blind.train, {blind.test.category: blind.test}, info)
