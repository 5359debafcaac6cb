"""Whole CLIP models (image and text towers) for the methods that compare images with words
(WinCLIP): the architectures, where their weights are looked for, and reading them.

>>> spec = get_clip_spec("ViT-B-16-plus-240")
>>> path = resolve_clip_weights(spec, weights=None)           # or WeightsNotFoundError, one line
>>> image, text = load_clip(spec, path)                       # CLIPImage, TextTransformer
>>> tokens = image.tokens(images)                             # [B, 1 + h*w, D] after ln_pre
>>> emb, patches = image.encode_tokens(tokens, patches=True)  # [B, E], [B, h*w, D]
>>> windows = image.encode_windows(tokens, index)             # [B, W, E]: a ViT pass per window

Architectures (:data:`CLIP_MODELS`):

* ``ViT-B-16-plus-240``: open_clip's ViT-B/16+ at 240 px (image width 896, 14 heads, GELU; text
  width 640, 10 heads; embeddings of 640), the model of the WinCLIP paper (LAION-400M, epoch 31);
* ``ViT-B-16``: OpenAI's CLIP ViT-B/16 at 224 px (image width 768, text width 512, QuickGELU;
  embeddings of 512);
* ``tiny``: a 2-block, 64-wide CLIP with no pretrained weights, for tests and smoke runs
  (``pretrained=False``, or a file written by the tests).

The image tower is :class:`~defectscope.backbones.vit.VisionTransformer` (its CLIP naming and
position-embedding rules); :class:`CLIPImage` adds the projection of the class token (open_clip's
``visual.proj``, Hugging Face's ``visual_projection``) and the window embedding of WinCLIP: the
transformer run on the class token and the tokens of one window only (gathered after the position
embedding, as open_clip's masked forward and anomalib's WinCLIP do). Only the class token of the
last block is needed there, so that block computes the class token's query alone (keys and values
of every token): exact, and a twelfth of the work saved.

Weights, first that exists wins (the ViT rule, :mod:`.vit_weights`):

1. ``weights=PATH``: a file, or a folder holding one of the expected file names;
2. the Hugging Face hub cache: ``timm/vit_base_patch16_plus_clip_240.laion400m_e31``'s
   ``open_clip_model.safetensors`` / ``open_clip_pytorch_model.bin`` for ViT-B/16+,
   ``timm/vit_base_patch16_clip_224.openai``'s or ``openai/clip-vit-base-patch16``'s files for
   OpenAI's ViT-B/16; then open_clip's own download cache ``~/.cache/clip`` (the release file
   ``vit_b_16_plus_240-laion400m_e31-8fb26589.pt``);
3. a download through ``huggingface_hub`` when allowed (``DEFECTSCOPE_ALLOW_DOWNLOAD=1``).

Formats: open_clip state dicts (``visual.*``, ``token_embedding``, ``transformer.resblocks.N.*``,
``ln_final``, ``text_projection``) and Hugging Face ``CLIPModel`` (``vision_model.*``,
``text_model.*``, ``visual_projection``, ``text_projection``), as safetensors or as plain tensor
pickles read with ``torch.load(weights_only=True)`` (OpenAI's TorchScript ``.pt`` is refused with
the advice to convert it). ``logit_scale`` is not used.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import WeightsNotFoundError
from ._frozen import normalise
from .clip_text import TextTransformer
from .vit import CLIP_MEAN, CLIP_STD, VIT_BACKBONES, HubFile, ViTSpec, VisionTransformer, build
from .vit_weights import (
    _file_kind,
    _read_pickle,
    cached_hub_file,
    check_known,
    check_hf_config,
    fuse_qkv,
    hf_hub_cache,
    hub_repo_dir,
    hub_target_dir,
    to_internal,
)
from .weights import ENV_ALLOW_DOWNLOAD, WeightsFileError, copy_state, download_allowed, explicit_source

PathLike = str | os.PathLike[str]


@dataclass(frozen=True)
class CLIPSpec:
    """One CLIP architecture: both towers, the joint embedding, where its weights are looked for."""

    name: str
    description: str
    vision: ViTSpec
    embed_dim: int
    text_width: int
    text_layers: int
    text_heads: int
    text_act: str
    vocab_size: int = 49408
    context_length: int = 77
    hub_files: tuple[HubFile, ...] = ()
    # open_clip's own download cache (~/.cache/clip) file names, looked for after the hub cache.
    release_files: tuple[str, ...] = ()


def _clip_vit(name: str, description: str, width: int, depth: int, heads: int, image_size: int,
              act: str) -> ViTSpec:
    return ViTSpec(name=name, family="clip", description=description, embed_dim=width, depth=depth,
                   num_heads=heads, patch_size=16, image_size=image_size, num_registers=0, layer_scale=False,
                   patch_bias=False, pre_norm=True, act=act, ln_eps=1e-5, interp_offset=0.0, interp_antialias=True,
                   mean=CLIP_MEAN, std=CLIP_STD, hub_files=())


_PLUS_REPO = "timm/vit_base_patch16_plus_clip_240.laion400m_e31"
_OPENAI_TIMM = "timm/vit_base_patch16_clip_224.openai"
_OPENAI_HF = "openai/clip-vit-base-patch16"

CLIP_MODELS: dict[str, CLIPSpec] = {
    spec.name: spec
    for spec in (
        CLIPSpec("ViT-B-16-plus-240", "open_clip ViT-B/16+ 240 px, LAION-400M (WinCLIP's model)",
                 _clip_vit("clip_vitb16_plus_240", "CLIP ViT-B/16+ 240 px image tower", 896, 12, 14, 240, "gelu"),
                 embed_dim=640, text_width=640, text_layers=12, text_heads=10, text_act="gelu",
                 hub_files=(HubFile(_PLUS_REPO, "open_clip_model.safetensors"),
                            HubFile(_PLUS_REPO, "open_clip_pytorch_model.bin")),
                 release_files=("vit_b_16_plus_240-laion400m_e31-8fb26589.pt",
                                "vit_b_16_plus_240-laion400m_e32-699c4b84.pt")),
        CLIPSpec("ViT-B-16", "OpenAI CLIP ViT-B/16 224 px", VIT_BACKBONES["clip_vitb16"],
                 embed_dim=512, text_width=512, text_layers=12, text_heads=8, text_act="quick_gelu",
                 hub_files=(HubFile(_OPENAI_TIMM, "open_clip_model.safetensors"), HubFile(_OPENAI_HF, "model.safetensors"),
                            HubFile(_OPENAI_TIMM, "open_clip_pytorch_model.bin"),
                            HubFile(_OPENAI_HF, "pytorch_model.bin"))),
        CLIPSpec("tiny", "a 2-block 64-wide CLIP for tests and smoke runs (no pretrained weights)",
                 _clip_vit("clip_tiny", "tiny CLIP image tower", 64, 2, 2, 64, "gelu"),
                 embed_dim=32, text_width=64, text_layers=2, text_heads=2, text_act="gelu"),
    )
}


def get_clip_spec(name: str) -> CLIPSpec:
    if name not in CLIP_MODELS:
        raise WeightsNotFoundError(f"unknown CLIP model {name!r}; known: {', '.join(CLIP_MODELS)}")
    return CLIP_MODELS[name]


# --- where ----------------------------------------------------------------------------------------

def open_clip_cache() -> Path:
    """open_clip's download folder for release files (its ``cache_dir`` default)."""
    return Path("~/.cache/clip").expanduser()


def expected_files(spec: CLIPSpec) -> tuple[str, ...]:
    return tuple(dict.fromkeys([f.filename for f in spec.hub_files] + list(spec.release_files)))


def find_clip_weights(spec: CLIPSpec, weights: PathLike | None = None) -> Path | None:
    """The weights file of ``spec``: the explicit path (must exist), else the hub cache, else
    open_clip's cache; ``None`` when none has it."""
    if weights is not None:
        names = expected_files(spec) or ("open_clip_model.safetensors", "model.safetensors")

        def in_hub_folder(folder: Path) -> Path | None:
            for name in names:
                found = cached_hub_file(folder, name) if (folder / "snapshots").is_dir() else None
                if found is not None:
                    return found
            return None

        return explicit_source(weights, f"CLIP model {spec.name!r}", names, in_folder=in_hub_folder).path
    cache = hf_hub_cache()
    for hub_file in spec.hub_files:
        found = cached_hub_file(hub_repo_dir(hub_file.repo, cache), hub_file.filename)
        if found is not None:
            return found
    for name in spec.release_files:
        if (open_clip_cache() / name).is_file():
            return open_clip_cache() / name
    return None


def clip_not_found_message(spec: CLIPSpec) -> str:
    if not spec.hub_files:
        return (f"CLIP model {spec.name!r} has no pretrained weights: pass weights=PATH (a file in open_clip or "
                "Hugging Face naming), or pretrained=False for random weights")
    first = spec.hub_files[0]
    others = [f"{f.repo}'s {f.filename}" for f in spec.hub_files[1:]]
    others += [f"{name} in {open_clip_cache()}" for name in spec.release_files[:1]]
    return (f"no pretrained weights for CLIP model {spec.name!r}: expected file '{first.filename}' of {first.repo} "
            f"in {hub_target_dir(first.repo)} (or {', '.join(others)}); download it by hand from {first.url} into "
            f"that folder; or allow downloading with {ENV_ALLOW_DOWNLOAD}=1 (needs huggingface_hub); or pass "
            "weights=PATH (the file, or a folder holding it)")


def resolve_clip_weights(spec: CLIPSpec, weights: PathLike | None = None,
                         allow_download: bool | None = None) -> Path:
    """The weights file of ``spec`` (sources 1-3), or :class:`WeightsNotFoundError` in one line."""
    found = find_clip_weights(spec, weights)
    if found is not None:
        return found
    if spec.hub_files and download_allowed(allow_download):
        target = spec.hub_files[0]
        try:
            import huggingface_hub

            return Path(huggingface_hub.hf_hub_download(repo_id=target.repo, filename=target.filename,
                                                        cache_dir=str(hf_hub_cache())))
        except Exception as exc:  # not installed, network, offline mode: one message
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise WeightsNotFoundError(clip_not_found_message(spec) + f" (download failed: {reason})") from exc
    raise WeightsNotFoundError(clip_not_found_message(spec))


# --- reading --------------------------------------------------------------------------------------

def read_all(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint (safetensors, or a plain tensor pickle)."""
    kind = _file_kind(path)
    if kind == "safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as exc:
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise WeightsFileError(f"cannot read weights file {path} as safetensors: {reason}") from exc
    if kind == "pickle":
        return _read_pickle(path)
    raise WeightsFileError(f"weights file {path} is neither safetensors nor a torch checkpoint")


_TEXT_RENAMES = {
    "open_clip": [
        (r"^token_embedding\.weight$", "token_embedding.weight"),
        (r"^positional_embedding$", "positional_embedding"),
        (r"^transformer\.resblocks\.(\d+)\.ln_1\.", r"blocks.\1.norm1."),
        (r"^transformer\.resblocks\.(\d+)\.ln_2\.", r"blocks.\1.norm2."),
        (r"^transformer\.resblocks\.(\d+)\.attn\.in_proj_(weight|bias)$", r"blocks.\1.attn.qkv.\2"),
        (r"^transformer\.resblocks\.(\d+)\.attn\.out_proj\.", r"blocks.\1.attn.proj."),
        (r"^transformer\.resblocks\.(\d+)\.mlp\.c_fc\.", r"blocks.\1.mlp.fc1."),
        (r"^transformer\.resblocks\.(\d+)\.mlp\.c_proj\.", r"blocks.\1.mlp.fc2."),
        (r"^ln_final\.(weight|bias)$", r"ln_final.\1"),
        (r"^text_projection$", "text_projection"),
    ],
    "hf": [
        (r"^text_model\.embeddings\.token_embedding\.weight$", "token_embedding.weight"),
        (r"^text_model\.embeddings\.position_embedding\.weight$", "positional_embedding"),
        (r"^text_model\.encoder\.layers\.(\d+)\.layer_norm1\.", r"blocks.\1.norm1."),
        (r"^text_model\.encoder\.layers\.(\d+)\.layer_norm2\.", r"blocks.\1.norm2."),
        (r"^text_model\.encoder\.layers\.(\d+)\.self_attn\.(q|k|v)_proj\.(weight|bias)$", r"blocks.\1.attn.qkv.\3:\2"),
        (r"^text_model\.encoder\.layers\.(\d+)\.self_attn\.out_proj\.", r"blocks.\1.attn.proj."),
        (r"^text_model\.encoder\.layers\.(\d+)\.mlp\.(fc1|fc2)\.", r"blocks.\1.mlp.\2."),
        (r"^text_model\.final_layer_norm\.(weight|bias)$", r"ln_final.\1"),
        (r"^text_projection\.weight$", "text_projection:T"),
    ],
}
_TEXT_SKIPPED = re.compile(r"^(logit_scale|logit_bias|attn_mask|text_model\.embeddings\.position_ids|"
                           r"visual_projection\.weight)$")


def split_clip_state(state: dict[str, torch.Tensor], path: Path | str) -> tuple[dict, torch.Tensor, dict, str]:
    """``(vision state in the ViT's names, image projection [D, E], text state in
    :class:`TextTransformer`'s names, format name)`` of a whole-CLIP checkpoint."""
    vision, fmt = to_internal(state, path)
    if fmt == "open_clip":
        flavour = "open_clip"
    elif fmt == "Hugging Face CLIP":
        flavour = "hf"
    else:
        raise WeightsFileError(f"weights file {path} is a {fmt} checkpoint of an image tower only, not a whole CLIP "
                               "(open_clip or Hugging Face CLIPModel naming)")
    marker = "visual.conv1.weight" if flavour == "open_clip" else "vision_model.embeddings.patch_embedding.weight"
    hits = sorted((k for k in state if k == marker or k.endswith("." + marker)), key=len)
    root = hits[0][: -len(marker)] if hits else ""
    scope = root + ("visual." if flavour == "open_clip" else "vision_model.")
    proj_key = "visual.proj" if flavour == "open_clip" else "visual_projection.weight"
    proj = state.get(root + proj_key)
    if proj is None:
        raise WeightsFileError(f"weights file {path} has no image projection ({root}{proj_key})")
    if flavour == "hf":
        proj = proj.t()
    text: dict[str, torch.Tensor] = {}
    pieces: dict[str, dict[str, torch.Tensor]] = {}
    unknown: list[str] = []
    for key, tensor in state.items():
        if not key.startswith(root) or key.startswith(scope):
            continue
        rest = key[len(root):]
        if rest == proj_key or _TEXT_SKIPPED.match(rest):
            continue
        for pattern, replacement in _TEXT_RENAMES[flavour]:
            new, count = re.subn(pattern, replacement, rest)
            if count:
                break
        else:
            unknown.append(key)
            continue
        if new.endswith(":T"):
            text[new[:-2]] = tensor.t()
        elif ":" in new:
            fused, part = new.split(":")
            pieces.setdefault(fused, {})[part] = tensor
        else:
            text[new] = tensor
    check_known(path, fmt, unknown, "text-tower keys")
    fuse_qkv(path, pieces, text)
    if not text:
        raise WeightsFileError(f"weights file {path} holds no text tower (an image tower only?): WinCLIP needs a whole "
                               "CLIP checkpoint (open_clip or Hugging Face CLIPModel)")
    return vision, proj, text, fmt


def _check_hf_text_config(spec: CLIPSpec, config_path: Path) -> None:
    try:
        config = json.loads(config_path.read_text())
    except (OSError, ValueError) as exc:
        raise WeightsFileError(f"cannot read {config_path} as JSON: {exc}") from exc
    text = config.get("text_config") or {} if isinstance(config, dict) else {}
    expected = {"hidden_size": spec.text_width, "num_hidden_layers": spec.text_layers,
                "num_attention_heads": spec.text_heads, "hidden_act": spec.text_act}
    problems = [f"text_config.{k} is {text[k]!r}, not {v!r}" for k, v in expected.items() if k in text and text[k] != v]
    if problems:
        raise WeightsFileError(f"{config_path} does not describe CLIP model {spec.name!r}: " + "; ".join(problems))


# --- the networks ---------------------------------------------------------------------------------

def _cls_only_block(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The class token's output ``[N, D]`` of a pre-norm ViT block on ``x [N, L, D]``: its query
    alone against every key and value (what the full block gives at position 0)."""
    n, length, dim = x.shape
    attn = block.attn
    heads = attn.num_heads
    h = block.norm1(x)
    weight, bias = attn.qkv.weight, attn.qkv.bias
    q = F.linear(h[:, :1], weight[:dim], bias[:dim]).reshape(n, 1, heads, dim // heads).transpose(1, 2)
    k, v = F.linear(h, weight[dim:], bias[dim:]).reshape(n, length, 2, heads, dim // heads).permute(2, 0, 3, 1, 4)
    out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(n, 1, dim)
    y = x[:, :1] + block.ls1(attn.proj(out))
    y = y + block.ls2(block.mlp(block.norm2(y)))
    return y[:, 0]


class CLIPImage(nn.Module):
    """CLIP's image tower with its projection: image, window and patch embeddings."""

    def __init__(self, spec: CLIPSpec, network: VisionTransformer, proj: torch.Tensor) -> None:
        super().__init__()
        self.spec = spec
        self.network = network
        self.proj = nn.Parameter(proj, requires_grad=False)
        for parameter in self.network.parameters():
            parameter.requires_grad_(False)
        self.register_buffer("mean", torch.tensor(spec.vision.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(spec.vision.std).view(1, 3, 1, 1), persistent=False)
        self.train(False)

    def train(self, mode: bool = True) -> "CLIPImage":  # frozen
        return super().train(False)

    @property
    def width(self) -> int:
        return self.spec.vision.embed_dim

    def tokens(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1] ``[B, 3, H, W]`` -> tokens ``[B, 1 + h*w, D]``: patch embedding, class
        token, position embedding, ln_pre (per token, so a window may be gathered from it)."""
        return self.network.embed(normalise(images, self.mean, self.std))

    def encode_tokens(self, tokens: torch.Tensor, patches: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(image embedding [B, E], patch tokens after ln_post [B, h*w, D] or None)``."""
        blocks = self.network.blocks
        x = tokens
        for block in blocks[:-1]:
            x = block(x)
        if patches:
            x = self.network.norm(blocks[-1](x))
            return x[:, 0] @ self.proj, x[:, 1:]
        return self.network.norm(_cls_only_block(blocks[-1], x)) @ self.proj, None

    def encode_windows(self, tokens: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """Window embeddings ``[B, W, E]``: for each row of ``index [W, L]`` (token positions, the
        class token's 0 first), the transformer run on those tokens alone, class token pooled,
        ln_post, projected."""
        b, dim = tokens.shape[0], tokens.shape[-1]
        n_windows, length = index.shape
        x = tokens[:, index].reshape(b * n_windows, length, dim)
        blocks = self.network.blocks
        for block in blocks[:-1]:
            x = block(x)
        cls = self.network.norm(_cls_only_block(blocks[-1], x))
        return (cls @ self.proj).reshape(b, n_windows, -1)


def random_clip(spec: CLIPSpec, text: bool = True, random_init: bool = True) -> tuple[CLIPImage, TextTransformer | None]:
    """Both towers with random weights (``random_init=False``: uninitialised, to be loaded)."""
    network = build(spec.vision, random_init=random_init)
    proj = torch.empty(spec.vision.embed_dim, spec.embed_dim)
    if random_init:
        nn.init.normal_(proj, std=spec.vision.embed_dim ** -0.5)
    tower = None
    if text:
        args = (spec.text_width, spec.text_layers, spec.text_heads, spec.vocab_size, spec.context_length,
                spec.embed_dim, spec.text_act)
        if random_init:
            tower = TextTransformer(*args)
        else:
            with torch.device("meta"):
                tower = TextTransformer(*args)
            tower = tower.to_empty(device="cpu")
    return CLIPImage(spec, network, proj), tower


def load_clip(spec: CLIPSpec, path: Path, text: bool = True) -> tuple[CLIPImage, TextTransformer | None, str]:
    """Both towers of ``spec`` with the weights of ``path`` (the text tower only when ``text``);
    returns ``(image, text or None, format name)``. Every tensor of the towers must be in the file
    with its shape; a file of another architecture fails with one line naming what differs."""
    state = read_all(path)
    vision, proj, text_state, fmt = split_clip_state(state, path)
    if fmt.startswith("Hugging Face") and (path.parent / "config.json").is_file():
        check_hf_config(spec.vision, path.parent / "config.json")
        _check_hf_text_config(spec, path.parent / "config.json")
    image, tower = random_clip(spec, text=text, random_init=False)
    network = image.network
    full_shapes = dict(network.full_shapes())
    pos = vision.get("pos_embed")
    if (pos is not None and pos.shape != full_shapes["pos_embed"] and pos.shape[-1] == spec.vision.embed_dim
            and math.isqrt(pos.shape[1] - 1) ** 2 == pos.shape[1] - 1):  # learnt on another square grid
        network.pos_embed = nn.Parameter(torch.zeros(pos.shape), requires_grad=False)
        full_shapes["pos_embed"] = pos.shape
    what = f"weights file {path} ({fmt} naming) does not fit CLIP model {spec.name!r}"
    copy_state(network, vision, full_shapes, what + " (image tower)")
    if tuple(proj.shape) != tuple(image.proj.shape):
        raise WeightsFileError(f"{what}: image projection {tuple(proj.shape)} vs {tuple(image.proj.shape)}")
    with torch.no_grad():
        image.proj.copy_(proj)
    if tower is not None:
        shapes = {k: v.shape for k, v in tower.state_dict().items()}
        copy_state(tower, text_state, shapes, what + " (text tower)")
    return image, tower, fmt


def open_clip_state(image, text) -> dict[str, torch.Tensor]:
    """defectscope's CLIP towers (image tower with its projection, text tower) as an open_clip state
    dict, the inverse of the loader's renaming: what the speed comparison hands to open_clip and the
    tests save as an open_clip file. ``logit_scale`` is ln(100), unused here."""
    out = {}
    net = image.network
    out["visual.conv1.weight"] = net.patch_embed.proj.weight
    out["visual.class_embedding"] = net.cls_token.reshape(-1)
    out["visual.positional_embedding"] = net.pos_embed.reshape(net.pos_embed.shape[1], -1)
    out["visual.proj"] = image.proj
    for a, b in (("ln_pre", net.norm_pre), ("ln_post", net.norm)):
        out[f"visual.{a}.weight"], out[f"visual.{a}.bias"] = b.weight, b.bias
    for prefix, blocks in (("visual.transformer", net.blocks), ("transformer", text.blocks)):
        for i, blk in enumerate(blocks):
            p = f"{prefix}.resblocks.{i}."
            for a, b in (("ln_1", blk.norm1), ("ln_2", blk.norm2), ("attn.out_proj", blk.attn.proj),
                         ("mlp.c_fc", blk.mlp.fc1), ("mlp.c_proj", blk.mlp.fc2)):
                out[p + a + ".weight"], out[p + a + ".bias"] = b.weight, b.bias
            out[p + "attn.in_proj_weight"], out[p + "attn.in_proj_bias"] = blk.attn.qkv.weight, blk.attn.qkv.bias
    out["token_embedding.weight"] = text.token_embedding.weight
    out["positional_embedding"] = text.positional_embedding
    out["ln_final.weight"], out["ln_final.bias"] = text.ln_final.weight, text.ln_final.bias
    out["text_projection"] = text.text_projection
    out["logit_scale"] = torch.tensor(4.6052)
    return {k: v.detach().contiguous().clone() for k, v in out.items()}
