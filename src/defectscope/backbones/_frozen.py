"""The frozen wrapper every pretrained backbone shares (a leaf of this package)."""

from __future__ import annotations

import torch
from torch import nn

from .weights import WeightsSource


class Frozen(nn.Module):
    """Shared by every pretrained network wrapper (the CNN extractor and classifier, the ViT extractor):
    the normalisation buffers of ``spec`` (``mean``/``std``) and freezing."""

    def __init__(self, spec, network: nn.Module, weights_source: WeightsSource,
                 trainable: bool) -> None:
        super().__init__()
        self.name = spec.name
        self.weights_source = weights_source
        self.trainable = trainable
        self.network = network
        self.register_buffer("mean", torch.tensor(spec.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(spec.std).view(1, 3, 1, 1), persistent=False)
        for parameter in self.network.parameters():
            parameter.requires_grad_(trainable)
        self.train(False)

    def train(self, mode: bool = True) -> "Frozen":
        """A frozen network stays in eval mode (its BatchNorm statistics never move)."""
        return super().train(mode and self.trainable)


def normalise(images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """Float images ``[B, 1 or 3, H, W]`` in [0, 1] -> normalised ``[B, 3, H, W]`` (a gray image is
    repeated to 3 channels); a clear error for anything else."""
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"expected a torch.Tensor of images, got {type(images).__name__}")
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"expected images of shape [B, 3, H, W] or [B, 1, H, W], got {tuple(images.shape)}")
    if not images.is_floating_point():
        raise TypeError(f"expected float images with values in [0, 1], got dtype {images.dtype}")
    if images.shape[1] == 1:
        images = images.expand(-1, 3, -1, -1)
    return (images.to(mean.dtype) - mean) / std
