"""What the flow methods share: the frozen backbone's features of the training images, computed
once for the whole training (:class:`TrainingFeatures`), and the layers at given strides.

The flows of FastFlow and CFLOW are trained on the features of a frozen backbone with no data
augmentation (as their papers and the reference code), so the features of an image are the same
at every epoch: computing them once instead of once per epoch changes nothing but the time (the
reference code recomputes them at every step). When they would not fit the memory budget, they
are computed batch by batch instead (the same values).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from ...progress import progress

__all__ = ["TrainingFeatures", "layers_at_strides"]

#: Features cached for training are kept in memory up to this many bytes (else recomputed per batch).
FEATURE_BUDGET_BYTES = 3 * 2**30


def layers_at_strides(spec, strides: Sequence[int]) -> tuple[str, ...]:
    """The deepest tap of ``spec`` at each stride (ResNet ``layer2/3/4`` for 8/16/32,
    EfficientNet-Lite ``blocks.2/4/6``); a clear error when the backbone has no tap at one."""
    out = []
    for s in strides:
        taps = [info.name for info in spec.layers if info.stride == s]
        if not taps:
            raise ValueError(f"backbone {spec.name} has no layer at stride {s}; its strides: "
                             f"{sorted({info.stride for info in spec.layers})}")
        out.append(taps[-1])
    return tuple(out)


class TrainingFeatures:
    """Frozen-backbone features of the training images (and of the held-out ones, appended), by
    index: ``features(idx) -> [tensor per layer]`` on ``device``.

    ``extract(images) -> sequence of tensors [b, ...]`` is called under ``no_grad`` on batches of
    ``batch_size`` images. If all the features fit ``budget`` bytes (``None``: always) they are
    computed once (a progress bar) and kept on ``device`` in ``store``, and the images are let go
    (the caller should drop its own reference: the features are all training needs); otherwise
    each call recomputes them for its images.
    Feed ``torch.arange(n_train)`` (and ``torch.arange(n_train, len(self))`` for the held-out
    images) to :func:`defectscope.training.train_loop` as its "images".
    """

    def __init__(self, extract: Callable[[torch.Tensor], Sequence[torch.Tensor]], images: torch.Tensor,
                 held_out: torch.Tensor | None = None, *, device: torch.device, batch_size: int = 32,
                 budget: int | None = FEATURE_BUDGET_BYTES, desc: str = "features") -> None:
        self.extract = extract
        self.images: torch.Tensor | None = (images if held_out is None or not len(held_out)
                                            else torch.cat([images, held_out]))
        self.n_train = images.shape[0]
        self.n = len(self.images)
        self.device = device
        self.batch_size = batch_size
        self.store: list[torch.Tensor] | None = None
        with torch.no_grad():
            probe = [f for f in extract(self.images[:1].to(device))]
        per_image = sum(f[0].numel() * f.element_size() for f in probe)
        if budget is None or per_image * len(self.images) <= budget:
            self.store = [f.new_empty(len(self.images), *f.shape[1:]) for f in probe]
            with torch.no_grad():
                for start in progress(range(0, len(self.images), batch_size), desc=desc, unit="batch"):
                    feats = extract(self.images[start:start + batch_size].to(device))
                    for s, f in zip(self.store, feats):
                        s[start:start + f.shape[0]] = f
            self.images = None  # the features replace the images (the caller may free its copy)

    def __len__(self) -> int:
        return self.n

    @property
    def train_index(self) -> torch.Tensor:
        return torch.arange(self.n_train)

    @property
    def held_out_index(self) -> torch.Tensor | None:
        return torch.arange(self.n_train, self.n) if self.n > self.n_train else None

    def __call__(self, idx: torch.Tensor) -> list[torch.Tensor]:
        if self.store is not None:
            idx = idx.to(self.store[0].device)
            return [s.index_select(0, idx) for s in self.store]
        with torch.no_grad():
            return [f for f in self.extract(self.images[idx.cpu()].to(self.device))]
