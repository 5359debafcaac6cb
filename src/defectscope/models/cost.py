"""What a method costs before it is run: a per-method cost model, calibrated from measured runs.

Every method declares a :class:`Cost` (class attribute ``cost``): its fit and predict time per
image at its defaults on the reference CPU, measured by ``python benchmarks/costs.py`` (which
prints the figures to declare, and compares them with the declared ones). The model of a fit is

    fit seconds = (fit + epoch * E) * n_train * s + sum(seconds_per_step * S) * s

with ``n_train`` the training images, ``E`` the value of the parameter that counts passes over
them (``epochs``), ``S`` the value of each step-counted parameter (EfficientAD's ``steps``: batch-1
steps whose number does not depend on the images), and ``s = (image_size / default)**2``, the
scale of the arithmetic with the input side (times the number of tiles per image when tiling is
on: ``tile_from``). Predict: ``predict * s`` seconds per image at batch 1.
Other parameters (backbone, coreset ratio, batch size...) are not modelled: the estimate is for
the defaults plus a length and a size, and is a guide (within a factor of about 2), not a promise.

The reference CPU is the project's CI machine: 2 cores of a server CPU (see ``REFERENCE_CPU``).
The benchmark multiplies the estimates by the speed it observes once a cell has finished, so its
ETA adapts to a faster or slower machine.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

__all__ = ["Cost", "REFERENCE_CPU", "estimate_fit", "estimate_predict", "human_seconds"]

#: The machine the declared figures were measured on (``benchmarks/costs.py``).
REFERENCE_CPU = "2 CPU cores (the CI machine), torch CPU, fp32"


@dataclass(frozen=True)
class Cost:
    """Measured cost of a method at its defaults on :data:`REFERENCE_CPU`.

    Attributes:
        predict: seconds per image at batch 1 (the benchmark's latency).
        fit: seconds per training image spent once per fit (feature extraction, memory bank,
            statistics, coreset selection at about 200 images).
        epoch: seconds per training image and per unit of ``passes`` (one training epoch).
        passes: the parameter counting passes over the training images (``"epochs"``), or None.
        steps: ``((parameter, seconds per step), ...)`` for training counted in steps independent
            of the number of images (EfficientAD's ``steps`` and ``teacher_steps``).
        measured: where the figures come from (command, data, date).
    """

    predict: float
    fit: float = 0.0
    epoch: float = 0.0
    passes: str | None = None
    steps: tuple[tuple[str, float], ...] = ()
    measured: str = ""

    def __post_init__(self) -> None:
        if self.predict <= 0 or self.fit < 0 or self.epoch < 0 or any(s < 0 for _, s in self.steps):
            raise TypeError(f"Cost figures must be positive (predict) or non-negative (fit, epoch, steps): {self}")
        if self.epoch and not self.passes:
            raise TypeError("Cost: epoch needs passes, the parameter that counts the passes (epochs)")

    def fit_per_image(self, params: Mapping[str, Any]) -> float:
        """Seconds per training image of a fit with ``params`` at the declared image size (the
        image-proportional part only; see :meth:`step_seconds`)."""
        e = float(params.get(self.passes, 0)) if self.passes else 0.0
        return self.fit + self.epoch * e

    def step_seconds(self, params: Mapping[str, Any]) -> float:
        """Seconds of the step-counted training of a fit with ``params`` at the declared size."""
        return sum(s * float(params.get(name, 0)) for name, s in self.steps)

    def summary(self, defaults: Mapping[str, Any], n_train: int = 200) -> str:
        """One line for people: fit and predict at the defaults, and a fit of ``n_train`` images."""
        per = self.fit_per_image(defaults)
        parts = []
        if per:
            length = f" ({self.passes}={defaults.get(self.passes)})" if self.passes else ""
            parts.append(f"fit {human_seconds(per)} per training image{length}")
        for name, s in self.steps:
            parts.append(f"{human_seconds(s)} per step x {name}={defaults.get(name)}")
        total = per * n_train + self.step_seconds(defaults)
        parts.append(f"so ~{human_seconds(total)} for {n_train} images")
        parts.append(f"predict {human_seconds(self.predict)} per image at batch 1")
        return "; ".join(parts)


def _scale(defaults: Mapping[str, Any], params: Mapping[str, Any]) -> float:
    """``(image_size / default)**2``, times the number of tiles per image when tiling is on."""
    ref = defaults.get("image_size")
    size = params.get("image_size", ref)
    scale = 1.0 if not ref or not size else (float(size) / float(ref)) ** 2
    whole = params.get("tile_from")
    if whole and size:
        stride = params.get("tile_stride") or size
        per_axis = math.ceil(max(0, int(whole) - int(size)) / int(stride)) + 1
        scale *= per_axis ** 2
    return scale


def estimate_fit(cls, params: Mapping[str, Any], n_train: int) -> float | None:
    """Estimated seconds of ``cls(**params).fit`` on ``n_train`` images on the reference CPU
    (None when the method declares no cost)."""
    cost: Cost | None = getattr(cls, "cost", None)
    if cost is None:
        return None
    full = {**cls.defaults, **params}
    return (cost.fit_per_image(full) * max(0, n_train) + cost.step_seconds(full)) * _scale(cls.defaults, full)


def estimate_predict(cls, params: Mapping[str, Any]) -> float | None:
    """Estimated seconds per image of ``cls(**params).predict`` at batch 1 on the reference CPU."""
    cost: Cost | None = getattr(cls, "cost", None)
    if cost is None:
        return None
    return cost.predict * _scale(cls.defaults, {**cls.defaults, **params})


def human_seconds(s: float) -> str:
    """``0.05`` -> ``50 ms``, ``75`` -> ``1.2 min``, ``7200`` -> ``2.0 h``, ``3e5`` -> ``3.5 days``."""
    if s < 1:
        return f"{s * 1000:.0f} ms" if s >= 0.001 else f"{s * 1000:.1f} ms"
    if s < 60:
        return f"{s:.1f} s" if s < 10 else f"{s:.0f} s"
    if s < 3600:
        return f"{s / 60:.1f} min"
    if s < 2 * 86400:
        return f"{s / 3600:.1f} h"
    return f"{s / 86400:.1f} days"
