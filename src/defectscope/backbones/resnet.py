"""ResNet18 and Wide-ResNet50-2 in plain torch with torchvision's exact module names.

``conv1``, ``bn1``, ``layer1.0.conv1``, ``layer1.0.downsample.0`` ..., ``fc``: torchvision's ImageNet
checkpoints (``resnet18-f37072fd.pth``, ``wide_resnet50_2-95faca4d.pth``/``-9ba9bcbe.pth``) load into
these modules unchanged. Bottlenecks stride in the 3x3 convolution (ResNet v1.5, as torchvision).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping

import torch
from torch import nn


def _conv3x3(in_ch: int, out_ch: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_ch, out_ch, 3, stride, 1, bias=False)


def _conv1x1(in_ch: int, out_ch: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_ch, out_ch, 1, stride, bias=False)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_ch: int, planes: int, stride: int = 1, downsample: nn.Module | None = None,
                 base_width: int = 64) -> None:
        super().__init__()
        self.conv1 = _conv3x3(in_ch, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = _conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, in_ch: int, planes: int, stride: int = 1, downsample: nn.Module | None = None,
                 base_width: int = 64) -> None:
        super().__init__()
        width = int(planes * (base_width / 64.0))
        self.conv1 = _conv1x1(in_ch, width)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = _conv3x3(width, width, stride)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = _conv1x1(width, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


LAYER_NAMES = ("layer1", "layer2", "layer3", "layer4")

# name -> (block, blocks per layer, width per group)
VARIANTS: dict[str, tuple[type[nn.Module], tuple[int, int, int, int], int]] = {
    "resnet18": (BasicBlock, (2, 2, 2, 2), 64),
    "wide_resnet50_2": (Bottleneck, (3, 4, 6, 3), 128),
}


class ResNet(nn.Module):
    """torchvision's ResNet; taps ``layer1`` .. ``layer4`` (strides 4, 8, 16, 32)."""

    def __init__(self, block: type[nn.Module], layers: tuple[int, int, int, int], base_width: int = 64,
                 num_classes: int = 1000) -> None:
        super().__init__()
        self.base_width = base_width
        self.in_ch = 64
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.layer1 = self._make_layer(block, 64, layers[0], 1)
        self.layer2 = self._make_layer(block, 128, layers[1], 2)
        self.layer3 = self._make_layer(block, 256, layers[2], 2)
        self.layer4: nn.Module | None = self._make_layer(block, 512, layers[3], 2)
        self.fc: nn.Module | None = nn.Linear(512 * block.expansion, num_classes)
        for m in self.modules():  # torchvision's initialisation (used only for pretrained=False)
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def _make_layer(self, block: type[nn.Module], planes: int, blocks: int, stride: int) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.in_ch != planes * block.expansion:
            downsample = nn.Sequential(
                _conv1x1(self.in_ch, planes * block.expansion, stride), nn.BatchNorm2d(planes * block.expansion)
            )
        mods = [block(self.in_ch, planes, stride, downsample, self.base_width)]
        self.in_ch = planes * block.expansion
        mods += [block(self.in_ch, planes, 1, None, self.base_width) for _ in range(1, blocks)]
        return nn.Sequential(*mods)

    @staticmethod
    def layer_table(name: str) -> list[tuple[str, int, int]]:
        block, _, _ = VARIANTS[name]
        return [(n, 4 * 2**i, 64 * 2**i * block.expansion) for i, n in enumerate(LAYER_NAMES)]

    @property
    def tap_names(self) -> list[str]:
        return list(LAYER_NAMES)

    def truncate(self, last: str) -> None:
        """Drop every layer after tap ``last``, and the classifier: they are never computed."""
        for name in LAYER_NAMES[LAYER_NAMES.index(last) + 1:]:
            setattr(self, name, None)
        self.fc = None

    def forward_taps(self, x: torch.Tensor, wanted: Collection[str]) -> dict[str, torch.Tensor]:
        """Layer outputs named in ``wanted``; stops after the deepest of them."""
        out: dict[str, torch.Tensor] = {}
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for name in LAYER_NAMES:
            if len(out) == len(wanted):
                break
            x = getattr(self, name)(x)
            if name in wanted:
                out[name] = x
        return out

    def forward_logits(self, x: torch.Tensor) -> torch.Tensor:
        if self.fc is None:
            raise RuntimeError("this network was truncated for feature extraction: it has no head")
        x = self.forward_taps(x, ("layer4",))["layer4"]
        return self.fc(torch.flatten(x.mean(dim=(2, 3)), 1))

    forward = forward_logits


def build(name: str) -> ResNet:
    block, layers, width = VARIANTS[name]
    return ResNet(block, layers, width)


def adapt_state_dict(name: str, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """torchvision checkpoints need no renaming."""
    return dict(state)
