"""What the feature-statistics methods (SPADE, Gaussian AD, DFKDE, DFM) share: running a feature
function over a whole data set, global average pooling, the backbone's deepest layer. (The frozen
backbone as it runs at inference, BatchNorm folded and ``channels_last``, is
:func:`defectscope.models._inference.inference_backbone`.)"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ...progress import progress

__all__ = ["dataset_features", "global_pool", "deepest_layer"]


def global_pool(feature: torch.Tensor) -> torch.Tensor:
    """Global average pooling ``[B, C, h, w] -> [B, C]``."""
    return feature.mean(dim=(2, 3))


def deepest_layer(spec) -> str:
    """The deepest tap of a backbone (ResNet ``layer4``, EfficientNet-Lite ``blocks.6``)."""
    return spec.layers[-1].name


@torch.no_grad()
def dataset_features(fn: Callable[[torch.Tensor], torch.Tensor | tuple[torch.Tensor, ...]], dataset,
                     device: torch.device, batch_size: int = 16, desc: str = "features") -> tuple[torch.Tensor, ...]:
    """``fn`` applied to every image of ``dataset`` (items: dicts with ``"image"``), batch by
    batch, with a progress bar; each output of ``fn`` (one tensor or a tuple, first dimension =
    the batch) is gathered into one preallocated tensor ``[N, ...]`` (no concatenation copy).
    Always returns a tuple."""
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=0)
    out: tuple[torch.Tensor, ...] | None = None
    n = 0
    for batch in progress(loader, desc=desc, unit="batch"):
        res = fn(batch["image"].to(device, torch.float32))
        res = res if isinstance(res, tuple) else (res,)
        if out is None:
            out = tuple(r.new_empty(len(dataset), *r.shape[1:]) for r in res)
        for o, r in zip(out, res):
            o[n:n + r.shape[0]] = r
        n += res[0].shape[0]
    assert out is not None
    return out
