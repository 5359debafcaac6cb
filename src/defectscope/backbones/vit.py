"""Vision Transformers that return patch tokens: DINOv2 ViT-S/14 and ViT-B/14 (plain and "with
registers") and the image tower of OpenAI's CLIP ViT-B/16, in plain torch.

What each network is, block for block (checked against ``transformers``' Dinov2Model,
Dinov2WithRegistersModel and CLIPVisionModel in ``tests/test_vit_backbones.py``):

* patch embedding: a ``p x p`` convolution of stride ``p`` (DINOv2 with a bias, CLIP without);
* tokens ``[cls, registers..., patches...]``: the position embedding is added to the class token and
  the patches, never to the registers (DINOv2 with registers: 4 of them, inserted after the
  position embedding, as Meta's ``prepare_tokens_with_masks``);
* position embeddings learnt on a square grid (DINOv2: 37 x 37 for 518 px; CLIP: 14 x 14 for 224 px),
  resampled bicubically to the input's patch grid exactly as the reference code does it: plain
  DINOv2 with Meta's historical ``+0.1`` scale-factor offset and no antialiasing; DINOv2 with
  registers by output size with antialiasing; CLIP by output size with antialiasing (open_clip's
  ``resize_pos_embed``, timm's ``resample_abs_pos_embed``; OpenAI's CLIP itself never resamples).
  At the native grid nothing is resampled;
* CLIP only: a LayerNorm before the blocks (``ln_pre``);
* pre-norm blocks ``x + ls1(attn(norm1(x)))``, ``x + ls2(mlp(norm2(x)))``: multi-head
  self-attention with one fused ``qkv`` projection, MLP ratio 4; DINOv2: exact GELU, LayerScale,
  LayerNorm eps 1e-6; CLIP: QuickGELU ``x * sigmoid(1.702 x)``, no LayerScale, eps 1e-5;
* a final LayerNorm (DINOv2 ``norm``, CLIP ``ln_post``), applied to the tapped tokens only when
  asked for (``norm=True``, as Meta's ``get_intermediate_layers(norm=True)``).

Module names are timm's (``patch_embed.proj``, ``cls_token``, ``reg_token``, ``pos_embed``,
``norm_pre``, ``blocks.N.norm1/attn.qkv/attn.proj/ls1.gamma/norm2/mlp.fc1/mlp.fc2/ls2.gamma``,
``norm``), with one difference: ``pos_embed`` always has the class token's row first (timm's
register models store it folded into ``cls_token``; :mod:`.vit_weights` unfolds it). Checkpoints in
Hugging Face, timm, Meta and open_clip naming are renamed onto these by :mod:`.vit_weights`.
"""

from __future__ import annotations

import math
from collections.abc import Collection
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .registry import IMAGENET_MEAN, IMAGENET_STD, BundledWeights, UnknownBackboneError

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class HubFile:
    """A weights file of a Hugging Face hub repository (how it is named in the hub cache)."""

    repo: str  # "facebook/dinov2-small"
    filename: str  # "model.safetensors"

    @property
    def url(self) -> str:
        return f"https://huggingface.co/{self.repo}/resolve/main/{self.filename}"

    def __str__(self) -> str:
        return f"{self.repo}/{self.filename}"


@dataclass(frozen=True)
class ViTSpec:
    """One ViT backbone: its architecture, its preprocessing, where its weights are looked for."""

    name: str
    family: str  # "dinov2" or "clip"
    description: str
    embed_dim: int
    depth: int
    num_heads: int
    patch_size: int
    image_size: int  # native resolution: the position embeddings' grid is image_size // patch_size
    num_registers: int
    layer_scale: bool  # DINOv2's LayerScale (ls1.gamma, ls2.gamma)
    patch_bias: bool  # the patch convolution has a bias (DINOv2), or not (CLIP)
    pre_norm: bool  # CLIP's ln_pre before the blocks
    act: str  # "gelu" (exact, erf) or "quick_gelu"
    ln_eps: float
    interp_offset: float  # Meta's scale-factor offset (0.1 plain DINOv2) or 0 (resample by size)
    interp_antialias: bool
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    # Looked for in the Hugging Face hub cache in this order; the first is what a download fetches.
    hub_files: tuple[HubFile, ...]
    # Meta's torch.hub file names, looked for in torch.hub's checkpoints folder after the hub cache.
    torch_hub_files: tuple[str, ...] = ()
    # An installable package that bundles the weights (none exists for these ViTs: the hook of the
    # CNN backbones' source 3, kept so that the rule is the same for every backbone).
    package: BundledWeights | None = None
    mlp_ratio: float = 4.0
    default_blocks: tuple[str, ...] = field(default=())  # empty: the last block
    aliases: tuple[str, ...] = ()

    @property
    def grid(self) -> int:
        """Side of the square patch grid the position embeddings were learnt on."""
        return self.image_size // self.patch_size

    @property
    def block_names(self) -> tuple[str, ...]:
        return tuple(f"blocks.{i}" for i in range(self.depth))

    @property
    def defaults(self) -> tuple[str, ...]:
        return self.default_blocks or (self.block_names[-1],)

    def block_index(self, block: str | int) -> int:
        """``"blocks.N"`` or an int (negative counts from the end) -> N; unknown names fail clearly."""
        if isinstance(block, bool):
            raise TypeError(f"a block is a name 'blocks.N' or an int, got {block!r}")
        if isinstance(block, int):
            index = block + self.depth if block < 0 else block
            if 0 <= index < self.depth:
                return index
        elif isinstance(block, str) and block in self.block_names:
            return self.block_names.index(block)
        raise UnknownBackboneError(
            f"ViT backbone {self.name!r} has no block {block!r}; its blocks are blocks.0 ... "
            f"blocks.{self.depth - 1} (or an int index from -{self.depth} to {self.depth - 1})"
        )


def _dinov2(name: str, size: str, embed_dim: int, heads: int, registers: bool) -> ViTSpec:
    arch = {"small": ("s", "vit_small"), "base": ("b", "vit_base")}[size]
    letter, timm_arch = arch
    if registers:
        hf_repo = f"facebook/dinov2-with-registers-{size}"
        timm_name = f"{timm_arch}_patch14_reg4_dinov2"
        meta_file = f"dinov2_vit{letter}14_reg4_pretrain.pth"
    else:
        hf_repo = f"facebook/dinov2-{size}"
        timm_name = f"{timm_arch}_patch14_dinov2"
        meta_file = f"dinov2_vit{letter}14_pretrain.pth"
    timm_repo = f"timm/{timm_name}.lvd142m"
    return ViTSpec(
        name=name,
        family="dinov2",
        description=f"DINOv2 ViT-{letter.upper()}/14{' with registers' if registers else ''} (LVD-142M)",
        embed_dim=embed_dim,
        depth=12,
        num_heads=heads,
        patch_size=14,
        image_size=518,
        num_registers=4 if registers else 0,
        layer_scale=True,
        patch_bias=True,
        pre_norm=False,
        act="gelu",
        ln_eps=1e-6,
        # Meta's hubconf: plain models interpolate_offset=0.1, antialias False; "_reg" models 0.0, True.
        interp_offset=0.0 if registers else 0.1,
        interp_antialias=registers,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        hub_files=(HubFile(hf_repo, "model.safetensors"), HubFile(timm_repo, "model.safetensors"),
                   HubFile(hf_repo, "pytorch_model.bin"), HubFile(timm_repo, "pytorch_model.bin")),
        torch_hub_files=(meta_file,),
        aliases=(timm_name, f"{timm_name}.lvd142m", hf_repo) + ((name + "4",) if registers else ()),
    )


def _clip_vitb16() -> ViTSpec:
    timm_repo = "timm/vit_base_patch16_clip_224.openai"
    hf_repo = "openai/clip-vit-base-patch16"
    return ViTSpec(
        name="clip_vitb16",
        family="clip",
        description="CLIP ViT-B/16 image tower (OpenAI weights)",
        embed_dim=768,
        depth=12,
        num_heads=12,
        patch_size=16,
        image_size=224,
        num_registers=0,
        layer_scale=False,
        patch_bias=False,
        pre_norm=True,
        act="quick_gelu",
        ln_eps=1e-5,
        interp_offset=0.0,
        interp_antialias=True,
        mean=CLIP_MEAN,
        std=CLIP_STD,
        # timm's image tower alone (smallest download) first, then open_clip's and Hugging Face's
        # whole CLIP (their text towers are skipped when reading).
        hub_files=(HubFile(timm_repo, "model.safetensors"), HubFile(timm_repo, "open_clip_model.safetensors"),
                   HubFile(hf_repo, "model.safetensors"), HubFile(timm_repo, "open_clip_pytorch_model.bin"),
                   HubFile(hf_repo, "pytorch_model.bin")),
        aliases=("vit_base_patch16_clip_224", "vit_base_patch16_clip_224.openai", hf_repo),
    )


VIT_BACKBONES: dict[str, ViTSpec] = {
    spec.name: spec
    for spec in (
        _dinov2("dinov2_vits14", "small", 384, 6, registers=False),
        _dinov2("dinov2_vitb14", "base", 768, 12, registers=False),
        _dinov2("dinov2_vits14_reg", "small", 384, 6, registers=True),
        _dinov2("dinov2_vitb14_reg", "base", 768, 12, registers=True),
        _clip_vitb16(),
    )
}


def get_vit_spec(name: "str | ViTSpec") -> ViTSpec:
    """The spec of ViT backbone ``name``; timm names (``vit_small_patch14_dinov2[.lvd142m]``) and
    Hugging Face repository ids (``facebook/dinov2-small``) are accepted too, and a
    :class:`ViTSpec` itself (an architecture not in :data:`VIT_BACKBONES`, e.g. a method's
    test-sized encoder) is returned as it is."""
    if isinstance(name, ViTSpec):
        return name
    if name in VIT_BACKBONES:
        return VIT_BACKBONES[name]
    for spec in VIT_BACKBONES.values():
        if name in spec.aliases:
            return spec
    raise UnknownBackboneError(f"unknown ViT backbone {name!r}; known ViT backbones: {', '.join(VIT_BACKBONES)}")


# --- the network ----------------------------------------------------------------------------------

class QuickGELU(nn.Module):
    """OpenAI CLIP's activation: ``x * sigmoid(1.702 x)``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return x * torch.sigmoid(1.702 * x)


class PatchEmbed(nn.Module):
    def __init__(self, patch_size: int, embed_dim: int, bias: bool) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, embed_dim, patch_size, patch_size, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return self.proj(x).flatten(2).transpose(1, 2)  # [B, h*w, D], row-major over the grid


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embedding dim {dim} is not a multiple of {num_heads} heads")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        x = F.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(head dim)) v
        return self.proj(x.transpose(1, 2).reshape(b, n, c))


class LayerScale(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return x * self.gamma


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, act: str) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = QuickGELU() if act == "quick_gelu" else nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, spec: ViTSpec) -> None:
        super().__init__()
        dim = spec.embed_dim
        self.norm1 = nn.LayerNorm(dim, eps=spec.ln_eps)
        self.attn = Attention(dim, spec.num_heads)
        self.ls1 = LayerScale(dim) if spec.layer_scale else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=spec.ln_eps)
        self.mlp = Mlp(dim, int(dim * spec.mlp_ratio), spec.act)
        self.ls2 = LayerScale(dim) if spec.layer_scale else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


class VisionTransformer(nn.Module):
    """The network of a :class:`ViTSpec`; ``forward_taps`` returns token sequences of chosen blocks.

    Token sequences are ``[B, 1 + R + h*w, D]``: the class token, ``R`` registers, then the patches
    in row-major order over the ``h x w`` patch grid.
    """

    def __init__(self, spec: ViTSpec, depth: int | None = None) -> None:
        super().__init__()
        dim = spec.embed_dim
        self.depth = spec.depth  # of the whole network, whatever is built
        self.patch_size = spec.patch_size
        self.num_registers = spec.num_registers
        self.interp_offset = spec.interp_offset
        self.interp_antialias = spec.interp_antialias
        self.patch_embed = PatchEmbed(spec.patch_size, dim, spec.patch_bias)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.reg_token = nn.Parameter(torch.zeros(1, spec.num_registers, dim)) if spec.num_registers else None
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + spec.grid**2, dim))
        self.norm_pre = nn.LayerNorm(dim, eps=spec.ln_eps) if spec.pre_norm else nn.Identity()
        self.blocks = nn.ModuleList(Block(spec) for _ in range(spec.depth if depth is None else depth))
        self.norm = nn.LayerNorm(dim, eps=spec.ln_eps)
        self._init_random()

    def _init_random(self) -> None:
        """timm-style random initialisation (only ever seen with ``pretrained=False``)."""
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        if self.reg_token is not None:
            nn.init.normal_(self.reg_token, std=1e-6)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)
            elif isinstance(module, LayerScale):
                nn.init.constant_(module.gamma, 1e-5)

    @property
    def tap_names(self) -> list[str]:
        return [f"blocks.{i}" for i in range(len(self.blocks))]

    @property
    def grid(self) -> int:
        """Side of the square grid of the position embeddings (from the loaded weights)."""
        return math.isqrt(self.pos_embed.shape[1] - 1)

    def full_shapes(self) -> dict[str, torch.Size]:
        """The state-dict shapes of the whole network (all ``depth`` blocks), however many are built."""
        shapes: dict[str, torch.Size] = {}
        for key, value in self.state_dict().items():
            if key.startswith("blocks.0."):
                rest = key[len("blocks.0."):]
                shapes.update({f"blocks.{i}.{rest}": value.shape for i in range(self.depth)})
            elif not key.startswith("blocks."):
                shapes[key] = value.shape
        return shapes

    def position_embedding(self, h: int, w: int) -> torch.Tensor:
        """``[1, 1 + h*w, D]``: the class token's row and the patch rows resampled to ``h x w``."""
        grid = self.grid
        if (h, w) == (grid, grid):
            return self.pos_embed
        cls_pos, patch_pos = self.pos_embed[:, :1], self.pos_embed[:, 1:]
        dim = patch_pos.shape[-1]
        patch_pos = patch_pos.float().reshape(1, grid, grid, dim).permute(0, 3, 1, 2)
        if self.interp_offset:
            # Meta's DINOv2: a scale factor (not a size), offset to dodge floating-point floor errors.
            size = {"scale_factor": ((h + self.interp_offset) / grid, (w + self.interp_offset) / grid)}
        else:
            size = {"size": (h, w)}
        patch_pos = F.interpolate(patch_pos, mode="bicubic", align_corners=False,
                                  antialias=self.interp_antialias, **size)
        if patch_pos.shape[-2:] != (h, w):  # pragma: no cover - guarded by the offset
            raise RuntimeError(f"position embeddings resampled to {tuple(patch_pos.shape[-2:])}, not {(h, w)}")
        patch_pos = patch_pos.permute(0, 2, 3, 1).reshape(1, h * w, dim).to(cls_pos.dtype)
        return torch.cat((cls_pos, patch_pos), dim=1)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised images ``[B, 3, H, W]`` (H, W multiples of the patch) -> tokens ``[B, 1+R+h*w, D]``."""
        h, w = x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size
        tokens = self.patch_embed(x)
        tokens = torch.cat((self.cls_token.expand(tokens.shape[0], -1, -1), tokens), dim=1)
        tokens = tokens + self.position_embedding(h, w)
        if self.reg_token is not None:
            registers = self.reg_token.expand(tokens.shape[0], -1, -1)
            tokens = torch.cat((tokens[:, :1], registers, tokens[:, 1:]), dim=1)
        return self.norm_pre(tokens)

    def forward_taps(self, x: torch.Tensor, wanted: Collection[int], norm: bool = False) -> dict[int, torch.Tensor]:
        """Token sequences ``[B, 1+R+h*w, D]`` after each block index in ``wanted``, optionally through
        the final LayerNorm; stops after the deepest of them."""
        out: dict[int, torch.Tensor] = {}
        tokens = self.embed(x)
        last = max(wanted)
        for index, block in enumerate(self.blocks):
            tokens = block(tokens)
            if index in wanted:
                out[index] = self.norm(tokens) if norm else tokens
            if index == last:
                break
        return out


def build(spec: ViTSpec, depth: int | None = None, random_init: bool = True) -> VisionTransformer:
    """The network of ``spec`` with its first ``depth`` blocks (default: all).

    ``random_init=False``: parameters are left uninitialised (built on the meta device, then given
    empty CPU memory), for weights about to be copied over every one of them.
    """
    if random_init:
        return VisionTransformer(spec, depth)
    with torch.device("meta"):
        network = VisionTransformer(spec, depth)
    return network.to_empty(device="cpu")
