"""Patch-token extractors over the ViT backbones: :func:`create_vit`.

>>> vit = create_vit("dinov2_vits14", blocks=("blocks.8", "blocks.11"))
>>> maps = vit(images)                      # images: float RGB in [0, 1], [B, 3, H, W], H, W % 14 == 0
>>> maps["blocks.11"].shape                 # [B, 384, H/14, W/14]: the patch tokens as a feature map
>>> out = vit.forward_tokens(images)        # ViTFeatures(patches={block: [B, D, H/p, W/p]},
>>> out.cls["blocks.11"].shape              #             cls={block: [B, D]}); registers dropped
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import NamedTuple

import torch

from ..errors import WeightsNotFoundError
from ._frozen import Frozen, normalise
from .vit import VIT_BACKBONES, ViTSpec, VisionTransformer, build, get_vit_spec
from .vit_weights import (
    find_vit_weights,
    hf_hub_cache,
    hub_target_dir,
    load_vit_weights,
    resolve_vit_weights_source,
)
from .weights import WeightsSource

PathLike = str | os.PathLike[str]


class ViTFeatures(NamedTuple):
    """What :meth:`ViTExtractor.forward_tokens` returns, per requested block (in the order requested).

    ``patches[block]``: ``[B, D, H/p, W/p]``, the patch tokens laid out on the patch grid (channel
    ``d`` of map position ``(i, j)`` is feature ``d`` of the token of patch row ``i``, column ``j``).
    ``cls[block]``: ``[B, D]``, the class token. Register tokens are never returned.
    """

    patches: dict[str, torch.Tensor]
    cls: dict[str, torch.Tensor]


def _normalise(images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, patch: int) -> torch.Tensor:
    h, w = images.shape[-2:] if isinstance(images, torch.Tensor) and images.ndim == 4 else (patch, patch)
    if h % patch or w % patch or h == 0 or w == 0:
        fit = (max(1, round(h / patch)) * patch, max(1, round(w / patch)) * patch)
        raise ValueError(f"image size {h}x{w} is not a multiple of the ViT's patch size {patch}: "
                         f"resize or crop to e.g. {fit[0]}x{fit[1]}")
    return normalise(images, mean, std)


class ViTExtractor(Frozen):
    """``forward(images) -> {block: patch tokens [B, D, H/p, W/p]}``, in the order requested.

    ``images``: float RGB in [0, 1], ``[B, 3, H, W]`` (``[B, 1, H, W]`` is repeated to 3 channels),
    ``H`` and ``W`` multiples of the patch size ``p`` (any such size: the position embeddings are
    resampled to the ``H/p x W/p`` grid). Normalised inside (DINOv2: ImageNet mean/std; CLIP: its
    own). Only blocks up to the deepest requested one exist and are computed. Frozen (eval mode,
    no gradients) unless ``trainable=True``.

    Attributes: ``name``, ``spec`` (:class:`~defectscope.backbones.vit.ViTSpec`), ``blocks`` (tuple
    of ``"blocks.N"``; ``layers`` is the same tuple, as on the CNN extractor), ``patch_size``,
    ``embed_dim``, ``num_registers``, ``strides`` / ``channels`` (dicts per block: ``p`` and ``D``),
    ``norm`` (whether the final LayerNorm is applied to every returned token), ``weights_source``,
    ``weights_format`` (the naming the weights were read in, or ``None``), ``network``.
    """

    def __init__(self, spec: ViTSpec, network: VisionTransformer, blocks: Sequence[str],
                 weights_source: WeightsSource, *, norm: bool = False, trainable: bool = False,
                 weights_format: str | None = None) -> None:
        super().__init__(spec, network, weights_source, trainable)
        self.spec = spec
        self.blocks = tuple(blocks)
        self.layers = self.blocks
        self._indices = {block: spec.block_index(block) for block in self.blocks}
        self.patch_size = spec.patch_size
        self.embed_dim = spec.embed_dim
        self.num_registers = spec.num_registers
        self.strides = {block: spec.patch_size for block in self.blocks}
        self.channels = {block: spec.embed_dim for block in self.blocks}
        self.norm = norm
        self.weights_format = weights_format

    def forward_tokens(self, images: torch.Tensor) -> ViTFeatures:
        """Patch-token maps ``[B, D, H/p, W/p]`` and class tokens ``[B, D]`` of the requested blocks."""
        x = _normalise(images, self.mean, self.std, self.patch_size)
        h, w = x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size
        tokens = self.network.forward_taps(x, set(self._indices.values()), norm=self.norm)
        first_patch = 1 + self.num_registers
        patches: dict[str, torch.Tensor] = {}
        cls: dict[str, torch.Tensor] = {}
        for block, index in self._indices.items():
            seq = tokens[index]  # [B, 1 + R + h*w, D]
            cls[block] = seq[:, 0]
            patches[block] = seq[:, first_patch:].transpose(1, 2).reshape(seq.shape[0], seq.shape[-1], h, w)
        return ViTFeatures(patches, cls)

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:  # noqa: D102
        return self.forward_tokens(images).patches

    def extra_repr(self) -> str:
        return (f"name={self.name!r}, blocks={self.blocks}, patch={self.patch_size}, dim={self.embed_dim}, "
                f"norm={self.norm}, weights={self.weights_source}")


def create_vit(
    name: "str | ViTSpec",
    blocks: Sequence[str | int] | str | int | None = None,
    weights: PathLike | None = None,
    pretrained: bool = True,
    allow_download: bool | None = None,
    *,
    norm: bool = False,
    trainable: bool = False,
) -> ViTExtractor:
    """A patch-token extractor of ViT backbone ``name`` (see :data:`VIT_BACKBONES`) at ``blocks``.

    ``name``: ``dinov2_vits14``, ``dinov2_vitb14``, ``dinov2_vits14_reg``, ``dinov2_vitb14_reg``,
    ``clip_vitb16`` (timm names and Hugging Face repository ids are accepted too), or a
    :class:`~defectscope.backbones.vit.ViTSpec` not in the registry (its weights are looked for
    under its own hub file names).
    ``blocks``: ``"blocks.N"`` names or int indices (negative from the end; returned under their
    ``"blocks.N"`` name); default: the last block. An unknown block is an
    :class:`~defectscope.backbones.registry.UnknownBackboneError` listing the valid ones.
    ``weights``: a file (or a folder holding one) that wins over every other source; formats and
    the lookup order are in :mod:`defectscope.backbones.vit_weights`.
    ``pretrained=False``: random (timm-style initialised) weights, nothing looked up.
    ``allow_download``: may fetch the weights through ``huggingface_hub`` when no local copy exists
    (``None``: the ``DEFECTSCOPE_ALLOW_DOWNLOAD`` environment variable decides).
    ``norm=True``: apply the final LayerNorm (DINOv2 ``norm``, CLIP ``ln_post``) to the returned
    tokens, as Meta's ``get_intermediate_layers(norm=True)``; default: raw block outputs, as
    ``transformers``' ``hidden_states`` and timm's ``forward_intermediates``.
    ``trainable=True``: parameters require gradients and ``.train()`` works.
    """
    spec = get_vit_spec(name)
    if blocks is None:
        blocks = spec.defaults
    elif isinstance(blocks, (str, int)):
        blocks = (blocks,)
    names = tuple(dict.fromkeys(spec.block_names[spec.block_index(block)] for block in blocks))
    if not names:
        raise ValueError(f"no blocks requested from ViT backbone {spec.name!r}")
    if pretrained:
        source = resolve_vit_weights_source(spec, weights, allow_download)
    elif weights is not None:
        raise ValueError("weights= was given together with pretrained=False; drop one of them")
    else:
        source = WeightsSource("random", None)
    # Only the blocks up to the deepest requested one are built; the whole network's shapes still
    # decide whether a checkpoint fits. Loaded weights overwrite every parameter: no random init then.
    network = build(spec, depth=1 + max(spec.block_index(block) for block in names),
                    random_init=source.path is None)
    full_shapes = network.full_shapes()
    fmt = None
    if source.path is not None:
        fmt = load_vit_weights(network, spec, source.path, full_shapes)
    return ViTExtractor(spec, network, names, source, norm=norm, trainable=trainable, weights_format=fmt)


def list_vit_backbones() -> list[dict]:
    """One row per ViT backbone, with the keys of the CNN rows of ``list_backbones`` (``layers`` are
    the blocks, at stride = patch size) plus ``architecture`` ("vit"), ``patch_size``, ``embed_dim``,
    ``depth``, ``num_heads``, ``num_registers``, ``blocks``, ``hub_repo``, ``description``."""
    rows = []
    for spec in VIT_BACKBONES.values():
        try:
            found = find_vit_weights(spec.name)
        except (OSError, WeightsNotFoundError):  # an unreadable cache folder: listed as missing
            found = None
        first = spec.hub_files[0]
        rows.append({
            "name": spec.name,
            "family": spec.family,
            "architecture": "vit",
            "default": False,
            "description": spec.description,
            "layers": [{"name": b, "stride": spec.patch_size, "channels": spec.embed_dim} for b in spec.block_names],
            "paper_layers": list(spec.defaults),
            "blocks": list(spec.block_names),
            "patch_size": spec.patch_size,
            "embed_dim": spec.embed_dim,
            "depth": spec.depth,
            "num_heads": spec.num_heads,
            "num_registers": spec.num_registers,
            "input_size": spec.image_size,
            "mean": spec.mean,
            "std": spec.std,
            "weights_file": first.filename,
            "weights_files": [str(f) for f in spec.hub_files] + list(spec.torch_hub_files),
            "weights_dir": str(hub_target_dir(first.repo)),
            "hub_cache": str(hf_hub_cache()),
            "hub_repo": first.repo,
            "pip_package": spec.package.pip_name if spec.package else None,
            "url": first.url,
            "weights_found": found is not None,
            "weights_source": found.kind if found else None,
            "weights_path": str(found.path) if found else None,
        })
    return rows
