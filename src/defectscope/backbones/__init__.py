"""Pretrained feature extractors, offline: CNN pyramids (EfficientNet-Lite0/1/2, ResNet18,
Wide-ResNet50-2) and Vision Transformers that return patch tokens (DINOv2 ViT-S/14 and ViT-B/14,
plain and with registers; CLIP ViT-B/16).

>>> extractor = create_backbone("efficientnet_lite0", PAPER_LAYERS["efficientnet_lite0"])
>>> features = extractor(images)            # images: float RGB in [0, 1], shape [B, 3, H, W]
>>> features["blocks.2"].shape              # [B, 40, H/8, W/8]

The extractor normalises its input itself (EfficientNet-Lite: mean = std = 0.5; ResNets: ImageNet
mean/std), repeats a 1-channel image to 3 channels, computes only as far as the deepest requested
layer, and is frozen (eval mode, no gradients to its parameters) unless ``trainable=True``.

Weights are resolved by :func:`resolve_weights` (see :mod:`.weights`): an explicit path, the torch
hub cache, an installed package that bundles them, a download when allowed, else
:class:`~defectscope.errors.WeightsNotFoundError`. Random weights only with ``pretrained=False``.

ViTs (:func:`create_vit`, see :mod:`.vit_extractor`) follow the same rule with the Hugging Face hub
cache as the cache (see :mod:`.vit_weights`):

>>> vit = create_vit("dinov2_vits14", ("blocks.8", "blocks.11"))
>>> vit(images)["blocks.11"].shape          # [B, 384, H/14, W/14]; H, W multiples of 14
>>> vit.forward_tokens(images).cls["blocks.11"].shape   # [B, 384], the class token
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
from torch import nn

from ..errors import WeightsNotFoundError
from ._frozen import Frozen as _Frozen
from ._frozen import normalise as _normalise
from .registry import (
    BACKBONES,
    DEFAULT_BACKBONE,
    PAPER_LAYERS,
    BackboneSpec,
    LayerInfo,
    UnknownBackboneError,
    get_spec,
)
from .vit import VIT_BACKBONES, ViTSpec, get_vit_spec
from .vit_extractor import ViTExtractor, ViTFeatures, create_vit, list_vit_backbones
from .vit_weights import find_vit_weights, hf_hub_cache, resolve_vit_weights_source
from .weights import (
    DOWNLOADS,
    ENV_ALLOW_DOWNLOAD,
    WeightsFileError,
    WeightsSource,
    find_weights,
    hub_checkpoint_dir,
    load_weights_into,
    resolve_weights,
    resolve_weights_source,
)

__all__ = [
    "BACKBONES",
    "DEFAULT_BACKBONE",
    "DOWNLOADS",
    "ENV_ALLOW_DOWNLOAD",
    "PAPER_LAYERS",
    "BackboneSpec",
    "Classifier",
    "FeatureExtractor",
    "LayerInfo",
    "UnknownBackboneError",
    "VIT_BACKBONES",
    "ViTExtractor",
    "ViTFeatures",
    "ViTSpec",
    "WeightsFileError",
    "WeightsNotFoundError",
    "WeightsSource",
    "create_backbone",
    "create_classifier",
    "create_vit",
    "find_vit_weights",
    "get_spec",
    "get_vit_spec",
    "hf_hub_cache",
    "list_backbones",
    "resolve_vit_weights_source",
    "resolve_weights",
]

PathLike = str | os.PathLike[str]


class FeatureExtractor(_Frozen):
    """``forward(images) -> {layer: feature map}`` for the requested layers, in the order requested.

    Attributes: ``name``, ``layers`` (tuple), ``strides`` and ``channels`` (dicts per layer),
    ``weights_source`` (:class:`WeightsSource`: kind in explicit/hub_cache/package/download/random,
    and the file), ``network`` (the truncated network, torchvision/timm module names).
    """

    def __init__(self, spec: BackboneSpec, network: nn.Module, layers: Sequence[str],
                 weights_source: WeightsSource, trainable: bool = False) -> None:
        super().__init__(spec, network, weights_source, trainable)
        self.layers = tuple(layers)
        self.strides = {layer: spec.layer(layer).stride for layer in self.layers}
        self.channels = {layer: spec.layer(layer).channels for layer in self.layers}

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:  # noqa: D102
        features = self.network.forward_taps(_normalise(images, self.mean, self.std), frozenset(self.layers))
        return {layer: features[layer] for layer in self.layers}

    def extra_repr(self) -> str:
        return f"name={self.name!r}, layers={self.layers}, weights={self.weights_source}"


class Classifier(_Frozen):
    """The whole ImageNet network: ``forward(images in [0, 1]) -> logits [B, 1000]``."""

    def __init__(self, spec: BackboneSpec, network: nn.Module, weights_source: WeightsSource,
                 trainable: bool = False) -> None:
        super().__init__(spec, network, weights_source, trainable)
        self.input_size = spec.input_size

    def forward(self, images: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return self.network.forward_logits(_normalise(images, self.mean, self.std))


def _weights_for(spec: BackboneSpec, weights: PathLike | None, pretrained: bool,
                 allow_download: bool | None) -> WeightsSource:
    if not pretrained:
        if weights is not None:
            raise ValueError("weights= was given together with pretrained=False; drop one of them")
        return WeightsSource("random", None)
    return resolve_weights_source(spec.name, weights, allow_download)


def create_backbone(
    name: str = DEFAULT_BACKBONE,
    layers: Sequence[str] | str | None = None,
    weights: PathLike | None = None,
    pretrained: bool = True,
    allow_download: bool | None = None,
    *,
    trainable: bool = False,
) -> FeatureExtractor:
    """A feature extractor of backbone ``name`` tapping ``layers`` (default: ``PAPER_LAYERS[name]``).

    ``weights``: a file (or a folder holding the expected file) that wins over every other source.
    ``pretrained=False``: random (torchvision/timm-style initialised) weights, nothing looked up.
    ``allow_download``: may fetch the weights when no local copy exists (``None``: the
    ``DEFECTSCOPE_ALLOW_DOWNLOAD`` environment variable decides).
    ``trainable=True``: parameters require gradients and ``.train()`` works (e.g. an STFPM student).
    """
    spec = get_spec(name)
    if layers is None:
        layers = spec.paper_layers
    elif isinstance(layers, str):
        layers = (layers,)
    layers = tuple(dict.fromkeys(layers))
    if not layers:
        raise UnknownBackboneError(f"no layers requested from backbone {spec.name!r}")
    for layer in layers:
        spec.layer(layer)  # unknown layer names fail here, before any loading
    source = _weights_for(spec, weights, pretrained, allow_download)
    network = spec.builder()
    full_shapes = {key: value.shape for key, value in network.state_dict().items()}
    network.truncate(max(layers, key=network.tap_names.index))
    if source.path is not None:
        load_weights_into(network, spec, source.path, full_shapes)
    return FeatureExtractor(spec, network, layers, source, trainable)


def create_classifier(
    name: str = DEFAULT_BACKBONE,
    weights: PathLike | None = None,
    pretrained: bool = True,
    allow_download: bool | None = None,
    *,
    trainable: bool = False,
) -> Classifier:
    """The ImageNet classifier of backbone ``name`` (same weights rules as :func:`create_backbone`)."""
    spec = get_spec(name)
    source = _weights_for(spec, weights, pretrained, allow_download)
    network = spec.builder()
    if source.path is not None:
        full_shapes = {key: value.shape for key, value in network.state_dict().items()}
        load_weights_into(network, spec, source.path, full_shapes)
    return Classifier(spec, network, source, trainable)


def list_backbones() -> list[dict]:
    """Every backbone: layers (name, stride, channels), paper layers, expected weights, and whether
    weights were found locally (explicit paths aside; nothing is loaded or downloaded).

    The CNNs first, then the ViTs (rows with ``"architecture": "vit"``, whose ``layers`` are their
    blocks at stride = patch size; see :func:`~defectscope.backbones.vit_extractor.list_vit_backbones`
    for their extra keys)."""
    cache = hub_checkpoint_dir()
    rows = []
    for spec in BACKBONES.values():
        found = find_weights(spec.name)
        rows.append({
            "name": spec.name,
            "family": spec.family,
            "default": spec.name == DEFAULT_BACKBONE,
            "layers": [{"name": l.name, "stride": l.stride, "channels": l.channels} for l in spec.layers],
            "paper_layers": list(spec.paper_layers),
            "input_size": spec.input_size,
            "mean": spec.mean,
            "std": spec.std,
            "weights_file": spec.cache_files[0],
            "weights_files": list(spec.cache_files),
            "weights_dir": str(cache),
            "pip_package": spec.package.pip_name if spec.package else None,
            "url": spec.url,
            "weights_found": found is not None,
            "weights_source": found.kind if found else None,
            "weights_path": str(found.path) if found else None,
        })
    rows.extend(list_vit_backbones())
    return rows
