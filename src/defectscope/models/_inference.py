"""How a frozen network runs at inference, for every family: BatchNorm folded, ``channels_last``.

* :func:`fold_batchnorm`: an inference copy of a network with every eval-mode BatchNorm that
  directly follows a convolution folded into that convolution's weights and bias (exact up to
  float rounding: ``bn(conv(x)) = conv'(x)`` with ``W' = W * g / sqrt(v + eps)`` per output channel
  and ``b' = (b - m) * g / sqrt(v + eps) + beta``). One pass over each activation less per layer.
* :class:`InferenceCache`: the folded copies of a model's networks, built once per device on the
  first prediction and dropped whenever the model is trained again; they are never registered as
  sub-modules, so they are neither saved nor counted twice.
* :func:`to_inference_layout`: the ``channels_last`` memory format for those copies (faster
  oneDNN convolutions on CPU).
* :func:`inference_backbone`: the frozen backbone through the cache (a trainable one as it is).

Used by the memory, flow and distillation families (it was the distillation family's private
helper until the flows and the memory methods needed it too).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

__all__ = ["fold_batchnorm", "InferenceCache", "inference_backbone", "to_inference_layout"]


def to_inference_layout(module: nn.Module) -> nn.Module:
    """``module`` with its 4-d weights in the ``channels_last`` memory format (in place; returned).

    The oneDNN convolutions of PyTorch's CPU build then skip the layout reorders they insert
    around each NCHW convolution: measured with 2 threads at 256 px, batch 1, STFPM's two
    folded EfficientNet-Lite0 trunks go 44 -> 35 ms, and the three PDN networks of EfficientAD-S
    524 -> 481 ms. The arithmetic is the same, so results agree to float rounding; activations
    come out channels_last, which every later op here accepts."""
    return module.to(memory_format=torch.channels_last)


def _fold_pair(conv: nn.Conv2d | nn.ConvTranspose2d, bn: nn.BatchNorm2d) -> None:
    scale = bn.weight.detach() / torch.sqrt(bn.running_var + bn.eps)
    bias = conv.bias.detach() if conv.bias is not None else torch.zeros_like(bn.running_mean)
    with torch.no_grad():
        if isinstance(conv, nn.ConvTranspose2d):  # weight [in, out / groups, kh, kw]
            if conv.groups != 1:
                raise ValueError("grouped transposed convolutions are not folded")
            conv.weight.mul_(scale.view(1, -1, 1, 1))
        else:  # weight [out, in / groups, kh, kw]
            conv.weight.mul_(scale.view(-1, 1, 1, 1))
        new_bias = (bias - bn.running_mean) * scale + bn.bias.detach()
    conv.bias = nn.Parameter(new_bias, requires_grad=False)


def fold_batchnorm(module: nn.Module) -> nn.Module:
    """An eval-mode deep copy of ``module`` where each ``BatchNorm2d`` registered right after a
    convolution in the same parent (the order of ``named_children``, which is the order of the
    forward pass in torchvision/timm-style blocks and in every network of this library) is folded
    into it and replaced by ``nn.Identity``. ``module`` itself is left untouched."""
    folded = copy.deepcopy(module).eval()
    for parent in folded.modules():
        names = [n for n, c in parent.named_children() if c is not None]
        for prev, name in zip(names, names[1:]):
            conv, bn = getattr(parent, prev), getattr(parent, name)
            if (isinstance(conv, (nn.Conv2d, nn.ConvTranspose2d)) and isinstance(bn, nn.BatchNorm2d)
                    and bn.track_running_stats and bn.running_var is not None
                    and bn.num_features == conv.out_channels):
                _fold_pair(conv, bn)
                setattr(parent, name, nn.Identity())
    for p in folded.parameters():
        p.requires_grad_(False)
    return folded


class InferenceCache:
    """Folded copies of named sub-modules of a model, per device; ``clear()`` after training.
    ``channels_last``: keep the copies in that memory format (:func:`to_inference_layout`)."""

    def __init__(self, channels_last: bool = True) -> None:
        self._copies: dict[tuple[str, str], nn.Module] = {}
        self.channels_last = channels_last

    def get(self, name: str, module: nn.Module) -> nn.Module:
        device = next((t.device for t in module.parameters()), torch.device("cpu"))
        key = (name, str(device))
        if key not in self._copies:
            folded = fold_batchnorm(module)
            self._copies[key] = to_inference_layout(folded) if self.channels_last else folded
        return self._copies[key]

    def clear(self) -> None:
        self._copies.clear()


def inference_backbone(cache: InferenceCache, backbone: nn.Module) -> nn.Module:
    """The frozen ``backbone`` as it runs for fit and predict: a copy with each BatchNorm folded
    into the convolution before it and its weights in the ``channels_last`` memory format (see
    :class:`InferenceCache`), made on first use per device
    and kept in ``cache`` (not a sub-module: neither saved nor counted). The same features as
    ``backbone`` up to float rounding; one pass over each activation less per BatchNorm, and
    oneDNN convolutions without layout reorders. A backbone that trains (``trainable``) is returned
    as it is."""
    if getattr(backbone, "trainable", False):
        return backbone
    return cache.get("backbone", backbone)
