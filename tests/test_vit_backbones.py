"""ViT backbones: tiny random ViTs written in every supported format, loaded back through the real
lookup and reading code, must give the tokens of the model that wrote them.

References: ``transformers``' Dinov2Model / Dinov2WithRegistersModel / CLIPVisionModel (the test
extra installs it; those tests skip without it), an open_clip-structured tower built here from
``nn.MultiheadAttention``, and the extractor's own random network renamed into timm / Meta naming.
Nothing is downloaded: the download path runs with ``huggingface_hub.hf_hub_download`` replaced by
a copy of a local file.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import zipfile
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from defectscope.backbones import (
    UnknownBackboneError,
    ViTFeatures,
    WeightsFileError,
    create_backbone,
    create_vit,
    get_vit_spec,
    list_backbones,
)
from defectscope.backbones import vit as vit_module
from defectscope.backbones import vit_weights, weights
from defectscope.backbones.vit import HubFile
from defectscope.errors import DefectscopeError, WeightsNotFoundError

DIM, DEPTH, HEADS = 32, 2, 2
ATOL = RTOL = 1e-5


# --- fixtures -------------------------------------------------------------------------------------

@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    """Empty hub caches under tmp_path, no download permission, huggingface_hub offline."""
    for variable in ("HF_HOME", "HUGGINGFACE_HUB_CACHE", "XDG_CACHE_HOME", weights.ENV_ALLOW_DOWNLOAD):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def _tiny(base: str, name: str, patch: int, image: int) -> vit_module.ViTSpec:
    spec = vit_module.VIT_BACKBONES[base]
    return dataclasses.replace(
        spec, name=name, embed_dim=DIM, depth=DEPTH, num_heads=HEADS, patch_size=patch, image_size=image,
        hub_files=(HubFile(f"test-org/{name}", "model.safetensors"), HubFile(f"timm/{name}.test", "model.safetensors"),
                   HubFile(f"test-org/{name}", "open_clip_model.safetensors")),
        torch_hub_files=(f"{name}_pretrain.pth",), aliases=(),
    )


@pytest.fixture
def tiny(monkeypatch):
    """Three tiny specs (dim 32, 2 blocks, 2 heads) registered beside the real ones."""
    specs = {
        "dinov2": _tiny("dinov2_vits14", "tiny_dinov2", 14, 56),  # 4 x 4 grid
        "reg": _tiny("dinov2_vits14_reg", "tiny_dinov2_reg", 14, 56),
        "clip": _tiny("clip_vitb16", "tiny_clip", 16, 64),  # 4 x 4 grid
    }
    for spec in specs.values():
        monkeypatch.setitem(vit_module.VIT_BACKBONES, spec.name, spec)
    return specs


def _randomise(module: nn.Module, seed: int) -> None:
    """Every parameter random (LayerNorm scales around 1), so that a misplaced tensor shows."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in module.named_parameters():
            noise = torch.randn(parameter.shape, generator=generator)
            if parameter.ndim == 1 and "norm" in name and name.endswith("weight"):
                parameter.copy_(1 + 0.3 * noise)
            else:
                parameter.copy_(0.2 * noise)


def _images(h: int, w: int, batch: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.rand(batch, 3, h, w, generator=torch.Generator().manual_seed(seed))


def _normalised(images: torch.Tensor, spec) -> torch.Tensor:
    mean = torch.tensor(spec.mean).view(1, 3, 1, 1)
    std = torch.tensor(spec.std).view(1, 3, 1, 1)
    return (images - mean) / std


def _assert_tokens(out: ViTFeatures, reference: list[torch.Tensor], registers: int, h: int, w: int) -> None:
    """``reference[i]``: the token sequence [B, 1+R+h*w, D] after block i."""
    for i, seq in enumerate(reference):
        block = f"blocks.{i}"
        assert out.patches[block].shape == (seq.shape[0], DIM, h, w)
        expected = seq[:, 1 + registers:].transpose(1, 2).reshape(seq.shape[0], DIM, h, w)
        torch.testing.assert_close(out.patches[block], expected, atol=ATOL, rtol=RTOL)
        torch.testing.assert_close(out.cls[block], seq[:, 0], atol=ATOL, rtol=RTOL)


def _random_extractor(name: str, seed: int = 1):
    extractor = create_vit(name, blocks=range(DEPTH), pretrained=False)
    _randomise(extractor.network, seed)
    return extractor


def _sequences(extractor, images) -> list[torch.Tensor]:
    """Token sequences after each block, from the extractor's own network (registers included)."""
    with torch.no_grad():
        x = _normalised(images, extractor.spec)
        taps = extractor.network.forward_taps(x, set(range(DEPTH)))
    return [taps[i] for i in range(DEPTH)]


# --- the Hugging Face formats, against transformers ---------------------------------------------

def _meta_interpolation(offset: float, antialias: bool):
    """Meta's DINOv2 ``interpolate_pos_encoding`` (scale factor with offset, or size), for HF modules."""

    def interpolate(embeddings, height, width, *, module):
        pos = module.position_embeddings
        grid = math.isqrt(pos.shape[1] - 1)
        h, w = height // module.patch_size, width // module.patch_size
        if (h, w) == (grid, grid):
            return pos
        patch = pos[:, 1:].reshape(1, grid, grid, -1).permute(0, 3, 1, 2)
        size = ({"scale_factor": ((h + offset) / grid, (w + offset) / grid)} if offset else {"size": (h, w)})
        patch = F.interpolate(patch, mode="bicubic", antialias=antialias, **size)
        return torch.cat((pos[:, :1], patch.permute(0, 2, 3, 1).reshape(1, h * w, -1)), dim=1)

    return interpolate


@pytest.mark.parametrize("kind", ["dinov2", "reg"])
def test_hf_dinov2_folder_and_bare_file_match_transformers(tiny, tmp_path, kind):
    transformers = pytest.importorskip("transformers")
    spec = tiny[kind]
    common = dict(hidden_size=DIM, num_hidden_layers=DEPTH, num_attention_heads=HEADS, intermediate_size=4 * DIM,
                  patch_size=14, image_size=56)
    if kind == "reg":
        hf = transformers.Dinov2WithRegistersModel(transformers.Dinov2WithRegistersConfig(num_register_tokens=4, **common))
    else:
        hf = transformers.Dinov2Model(transformers.Dinov2Config(**common))
    _randomise(hf, seed=3)
    hf.eval()
    folder = tmp_path / "hf_model"
    hf.save_pretrained(folder)
    assert (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()
    # Meta's position-embedding resampling (transformers' plain Dinov2 resamples by size instead).
    patched = _meta_interpolation(spec.interp_offset, spec.interp_antialias)
    hf.embeddings.interpolate_pos_encoding = lambda e, h, w: patched(e, h, w, module=hf.embeddings)

    extractor = create_vit(spec.name, blocks=("blocks.0", "blocks.1"), weights=folder)
    assert extractor.weights_source.kind == "explicit" and extractor.weights_format == "Hugging Face DINOv2"
    assert extractor.weights_source.path == folder / "model.safetensors"
    for h, w in ((56, 56), (42, 70)):  # the native 4 x 4 grid, and a resampled 3 x 5 one
        images = _images(h, w)
        with torch.no_grad():
            out = extractor.forward_tokens(images)
            reference = hf(pixel_values=_normalised(images, spec), output_hidden_states=True)
        _assert_tokens(out, list(reference.hidden_states[1:]), spec.num_registers, h // 14, w // 14)
    # Registers are dropped: exactly h*w patch tokens per map, and the class token is token 0.
    assert out.patches["blocks.1"].shape == (2, DIM, 3, 5)

    # norm=True is the final LayerNorm, i.e. transformers' last_hidden_state.
    normed = create_vit(spec.name, blocks=-1, weights=folder, norm=True)
    images = _images(56, 56, seed=4)
    with torch.no_grad():
        out = normed.forward_tokens(images)
        last = hf(pixel_values=_normalised(images, spec)).last_hidden_state
    torch.testing.assert_close(out.cls["blocks.1"], last[:, 0], atol=ATOL, rtol=RTOL)

    # A bare safetensors file in HF naming, here under a classifier's "dinov2." prefix with its head.
    from safetensors.torch import load_file

    state = {f"dinov2.{k}": v for k, v in load_file(folder / "model.safetensors").items()}
    state["classifier.weight"] = torch.zeros(10, 2 * DIM)
    bare = tmp_path / "bare.safetensors"
    save_file(state, bare)
    again = create_vit(spec.name, blocks=(0, 1), weights=bare)
    with torch.no_grad():
        torch.testing.assert_close(again(_images(42, 70))["blocks.1"], extractor(_images(42, 70))["blocks.1"],
                                   atol=0, rtol=0)


def test_hf_clip_folder_and_whole_clip_file_match_transformers(tiny, tmp_path):
    transformers = pytest.importorskip("transformers")
    spec = tiny["clip"]
    config = transformers.CLIPVisionConfig(hidden_size=DIM, num_hidden_layers=DEPTH, num_attention_heads=HEADS,
                                           intermediate_size=4 * DIM, patch_size=16, image_size=64)
    hf = transformers.CLIPVisionModel(config)
    _randomise(hf, seed=5)
    hf.eval()
    folder = tmp_path / "clip"
    hf.save_pretrained(folder)
    embeddings = getattr(hf, "vision_model", hf).embeddings  # transformers 5 flattened CLIPVisionModel

    def open_clip_resample(e, height, width):  # open_clip / timm: by size, antialiased
        pos = embeddings.position_embedding.weight.unsqueeze(0)
        h, w = height // 16, width // 16
        patch = pos[:, 1:].reshape(1, 4, 4, -1).permute(0, 3, 1, 2)
        patch = F.interpolate(patch, size=(h, w), mode="bicubic", antialias=True, align_corners=False)
        return torch.cat((pos[:, :1], patch.permute(0, 2, 3, 1).reshape(1, h * w, -1)), dim=1)

    embeddings.interpolate_pos_encoding = open_clip_resample

    extractor = create_vit(spec.name, blocks=(0, 1), weights=folder)
    assert extractor.weights_format == "Hugging Face CLIP"
    for h, w in ((64, 64), (48, 80)):
        images = _images(h, w, seed=6)
        with torch.no_grad():
            out = extractor.forward_tokens(images)
            reference = hf(pixel_values=_normalised(images, spec), output_hidden_states=True,
                           interpolate_pos_encoding=(h, w) != (64, 64))
        _assert_tokens(out, list(reference.hidden_states[1:]), 0, h // 16, w // 16)

    # The whole CLIP in transformers' classic naming ("vision_model." + a text tower): the text
    # tower and the projections are skipped.
    from safetensors.torch import load_file

    state = {f"vision_model.{k}": v for k, v in load_file(folder / "model.safetensors").items()}
    state.update({"text_model.embeddings.token_embedding.weight": torch.zeros(10, DIM),
                  "text_projection.weight": torch.zeros(16, DIM), "visual_projection.weight": torch.zeros(16, DIM),
                  "logit_scale": torch.tensor(2.0), "vision_model.embeddings.position_ids": torch.arange(17)[None]})
    whole = tmp_path / "whole_clip.safetensors"
    save_file(state, whole)
    images = _images(48, 80, seed=7)
    with torch.no_grad():
        torch.testing.assert_close(create_vit(spec.name, blocks=(0, 1), weights=whole)(images)["blocks.1"],
                                   extractor(images)["blocks.1"], atol=0, rtol=0)


# --- hand-written Hugging Face folders: config.json checked --------------------------------------

def _to_hf_dinov2(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The extractor's (timm) names -> transformers' Dinov2 names, written independently of the loader."""
    out = {"embeddings.mask_token": torch.zeros(1, DIM)}
    simple = {"cls_token": "embeddings.cls_token", "pos_embed": "embeddings.position_embeddings",
              "reg_token": "embeddings.register_tokens", "patch_embed.proj.weight": "embeddings.patch_embeddings.projection.weight",
              "patch_embed.proj.bias": "embeddings.patch_embeddings.projection.bias",
              "norm.weight": "layernorm.weight", "norm.bias": "layernorm.bias"}
    for key, value in state.items():
        if key in simple:
            out[simple[key]] = value
            continue
        _, i, rest = key.split(".", 2)
        layer = f"encoder.layer.{i}."
        if rest.startswith("attn.qkv."):
            for part, chunk in zip(("query", "key", "value"), value.chunk(3, dim=0)):
                out[layer + f"attention.attention.{part}.{rest.rsplit('.', 1)[1]}"] = chunk
        else:
            rest = (rest.replace("attn.proj.", "attention.output.dense.").replace("ls1.gamma", "layer_scale1.lambda1")
                    .replace("ls2.gamma", "layer_scale2.lambda1"))
            out[layer + rest] = value
    return out


def test_handwritten_hf_folder_and_config_check(tiny, tmp_path):
    spec = tiny["reg"]
    reference = _random_extractor(spec.name, seed=8)
    folder = tmp_path / "by_hand"
    folder.mkdir()
    save_file(_to_hf_dinov2(reference.network.state_dict()), folder / "model.safetensors")
    config = {"model_type": "dinov2_with_registers", "hidden_size": DIM, "num_hidden_layers": DEPTH,
              "num_attention_heads": HEADS, "patch_size": 14, "num_register_tokens": 4, "hidden_act": "gelu",
              "layer_norm_eps": 1e-6}
    (folder / "config.json").write_text(json.dumps(config))
    images = _images(70, 42, seed=9)
    loaded = create_vit(spec.name, blocks=(0, 1), weights=folder)
    _assert_tokens(loaded.forward_tokens(images), _sequences(reference, images), 4, 5, 3)

    # Heads do not show in the weights' shapes: config.json tells, and a wrong count is refused.
    (folder / "config.json").write_text(json.dumps({**config, "num_attention_heads": 4}))
    with pytest.raises(WeightsFileError, match="num_attention_heads is 4, not 2"):
        create_vit(spec.name, weights=folder)
    (folder / "config.json").write_text(json.dumps({**config, "model_type": "dinov2"}))
    with pytest.raises(WeightsFileError, match="no registers"):
        create_vit(spec.name, weights=folder)
    # Another architecture's weights (no config.json beside them): one clear error naming the file.
    alone = tmp_path / "alone.safetensors"
    shutil.copy(folder / "model.safetensors", alone)
    with pytest.raises(WeightsFileError, match="alone.safetensors .*does not fit ViT backbone 'tiny_dinov2'.*"
                                               "unexpected keys: reg_token"):
        create_vit("tiny_dinov2", weights=alone)


# --- timm and Meta naming -------------------------------------------------------------------------

def test_timm_and_meta_checkpoints(tiny, tmp_path):
    images = _images(56, 84, seed=10)
    for kind in ("dinov2", "reg"):
        spec = tiny[kind]
        reference = _random_extractor(spec.name, seed=11)
        expected = _sequences(reference, images)
        state = dict(reference.network.state_dict())
        if kind == "reg":
            # timm's register models: no class-token row in pos_embed, the class position folded into
            # cls_token (timm's _convert_dinov2).
            state["cls_token"] = state["cls_token"] + state["pos_embed"][:, :1]
            state["pos_embed"] = state["pos_embed"][:, 1:].contiguous()
        timm_file = tmp_path / f"{kind}_timm.safetensors"
        save_file(state, timm_file)
        loaded = create_vit(spec.name, blocks=(0, 1), weights=timm_file)
        assert loaded.weights_format == "timm/Meta"
        _assert_tokens(loaded.forward_tokens(images), expected, spec.num_registers, 4, 6)

        # Meta's torch.hub checkpoint (a plain tensor pickle, read with weights_only=True).
        meta = dict(reference.network.state_dict())
        meta["mask_token"] = torch.zeros(1, DIM)
        if kind == "reg":
            meta["register_tokens"] = meta.pop("reg_token")
        meta_file = tmp_path / f"{spec.name}_pretrain.pth"
        torch.save(meta, meta_file)
        loaded = create_vit(spec.name, blocks=(0, 1), weights=meta_file)
        _assert_tokens(loaded.forward_tokens(images), expected, spec.num_registers, 4, 6)


# --- open_clip naming, against an open_clip-structured tower ---------------------------------------

class _QuickGELU(nn.Module):
    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


class _ResidualAttentionBlock(nn.Module):
    def __init__(self, width, heads):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(OrderedDict(c_fc=nn.Linear(width, 4 * width), gelu=_QuickGELU(),
                                             c_proj=nn.Linear(4 * width, width)))

    def forward(self, x):
        y = self.ln_1(x)
        x = x + self.attn(y, y, y, need_weights=False)[0]
        return x + self.mlp(self.ln_2(x))


class _OpenClipVisual(nn.Module):
    """open_clip's VisionTransformer (OpenAI ViT-B/16 layout: QuickGELU), its module names."""

    def __init__(self, width=DIM, layers=DEPTH, heads=HEADS, patch=16, image=64, out_dim=16):
        super().__init__()
        self.grid = image // patch
        self.conv1 = nn.Conv2d(3, width, patch, patch, bias=False)
        self.class_embedding = nn.Parameter(torch.zeros(width))
        self.positional_embedding = nn.Parameter(torch.zeros(self.grid**2 + 1, width))
        self.ln_pre = nn.LayerNorm(width)
        self.transformer = nn.Module()
        self.transformer.resblocks = nn.ModuleList(_ResidualAttentionBlock(width, heads) for _ in range(layers))
        self.ln_post = nn.LayerNorm(width)
        self.proj = nn.Parameter(torch.zeros(width, out_dim))

    def sequences(self, x):
        x = self.conv1(x)
        b, c, h, w = x.shape
        x = torch.cat([self.class_embedding.expand(b, 1, c), x.reshape(b, c, h * w).permute(0, 2, 1)], dim=1)
        pos = self.positional_embedding
        if (h, w) != (self.grid, self.grid):  # open_clip's resize_pos_embed: by size, antialiased
            patch = pos[1:].reshape(1, self.grid, self.grid, c).permute(0, 3, 1, 2)
            patch = F.interpolate(patch, size=(h, w), mode="bicubic", antialias=True, align_corners=False)
            pos = torch.cat([pos[:1], patch[0].permute(1, 2, 0).reshape(h * w, c)])
        x = self.ln_pre(x + pos)
        out = []
        for block in self.transformer.resblocks:
            x = block(x)
            out.append(x)
        return out


def test_open_clip_checkpoint_matches_open_clip_tower(tiny, tmp_path):
    spec = tiny["clip"]
    tower = _OpenClipVisual()
    _randomise(tower, seed=12)
    tower.eval()
    state = {f"visual.{k}": v for k, v in tower.state_dict().items()}
    # open_clip's whole-CLIP file also holds the text tower, whose names overlap the visual ones.
    state.update({"positional_embedding": torch.zeros(77, DIM), "token_embedding.weight": torch.zeros(10, DIM),
                  "transformer.resblocks.0.attn.in_proj_weight": torch.zeros(3 * DIM, DIM),
                  "ln_final.weight": torch.ones(DIM), "text_projection": torch.zeros(DIM, 16),
                  "logit_scale": torch.tensor(4.6)})
    folder = tmp_path / "open_clip"
    folder.mkdir()
    save_file(state, folder / "open_clip_model.safetensors")
    extractor = create_vit(spec.name, blocks=("blocks.1", "blocks.0"), weights=folder)  # found by name
    assert extractor.weights_format == "open_clip" and extractor.blocks == ("blocks.1", "blocks.0")
    for h, w in ((64, 64), (32, 96)):
        images = _images(h, w, seed=13)
        with torch.no_grad():
            out = extractor.forward_tokens(images)
            reference = tower.sequences(_normalised(images, spec))
        _assert_tokens(out, reference, 0, h // 16, w // 16)
        assert list(out.patches) == ["blocks.1", "blocks.0"]


# --- where weights are found ------------------------------------------------------------------------

def _hub_snapshot(cache: Path, repo: str, revision: str = "0123abcd") -> Path:
    repo_dir = cache / ("models--" + repo.replace("/", "--"))
    (repo_dir / "refs").mkdir(parents=True)
    (repo_dir / "refs" / "main").write_text(revision)
    snapshot = repo_dir / "snapshots" / revision
    snapshot.mkdir(parents=True)
    return snapshot


def test_hub_cache_layouts_and_order(tiny, tmp_path, monkeypatch):
    spec = tiny["dinov2"]
    reference = _random_extractor(spec.name, seed=14)
    file = tmp_path / "tiny.safetensors"
    save_file(dict(reference.network.state_dict()), file)
    images = _images(56, 56, seed=15)
    expected = _sequences(reference, images)

    # timm's cache name (the second hub file) in HF_HUB_CACHE, through refs/main.
    snapshot = _hub_snapshot(tmp_path / "hf", f"timm/{spec.name}.test")
    shutil.copy(file, snapshot / "model.safetensors")
    loaded = create_vit(spec.name, blocks=(0, 1))
    assert loaded.weights_source.kind == "hub_cache" and loaded.weights_source.path == snapshot / "model.safetensors"
    _assert_tokens(loaded.forward_tokens(images), expected, 0, 4, 4)
    row = {r["name"]: r for r in list_backbones()}[spec.name]
    assert row["weights_found"] and row["weights_path"] == str(snapshot / "model.safetensors")

    # The first hub file wins over the second; HF_HOME/hub when HF_HUB_CACHE is unset; a snapshots/main
    # folder (no refs/main) is read as huggingface_hub reads it.
    monkeypatch.delenv("HF_HUB_CACHE")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    assert create_vit(spec.name, pretrained=False).weights_source.kind == "random"
    with pytest.raises(WeightsNotFoundError):
        create_vit(spec.name)
    main = tmp_path / "home" / "hub" / f"models--test-org--{spec.name}" / "snapshots" / "main"
    main.mkdir(parents=True)
    shutil.copy(file, main / "model.safetensors")
    timm_dir = _hub_snapshot(tmp_path / "home" / "hub", f"timm/{spec.name}.test")
    shutil.copy(file, timm_dir / "model.safetensors")
    assert create_vit(spec.name).weights_source.path == main / "model.safetensors"

    # An explicit path wins over every cache; a models--org--name folder can be given as it is.
    explicit = create_vit(spec.name, weights=file)
    assert explicit.weights_source.kind == "explicit" and explicit.weights_source.path == file
    assert create_vit(spec.name, weights=timm_dir.parent.parent).weights_source.path == timm_dir / "model.safetensors"

    # Meta's file in torch.hub's checkpoints folder comes after the hub cache.
    shutil.rmtree(tmp_path / "home")
    checkpoints = tmp_path / "torch" / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    torch.save(dict(reference.network.state_dict()), checkpoints / f"{spec.name}_pretrain.pth")
    meta = create_vit(spec.name, blocks=(0, 1))
    assert meta.weights_source.path == checkpoints / f"{spec.name}_pretrain.pth"
    _assert_tokens(meta.forward_tokens(images), expected, 0, 4, 4)


def test_missing_weights_name_the_file_and_the_folder(tmp_path):
    with pytest.raises(WeightsNotFoundError) as caught:
        create_vit("dinov2_vits14")
    message = str(caught.value)
    folder = tmp_path / "hf" / "models--facebook--dinov2-small" / "snapshots" / "main"
    assert "expected file 'model.safetensors' of facebook/dinov2-small in " + str(folder) in message
    assert "dinov2_vits14_pretrain.pth" in message and weights.ENV_ALLOW_DOWNLOAD in message
    assert "pretrained=False" in message and "\n" not in message
    with pytest.raises(WeightsNotFoundError, match="models--timm--vit_base_patch16_clip_224.openai"):
        create_vit("clip_vitb16", blocks=0)
    # Explicit paths never fall through to other weights.
    with pytest.raises(WeightsNotFoundError, match="does not exist"):
        create_vit("dinov2_vitb14_reg", weights=tmp_path / "nope.safetensors")
    (tmp_path / "empty").mkdir()
    with pytest.raises(WeightsNotFoundError, match="holds none of model.safetensors"):
        create_vit("dinov2_vitb14_reg", weights=tmp_path / "empty")
    with pytest.raises(ValueError, match="pretrained=False"):
        create_vit("dinov2_vits14", weights=tmp_path, pretrained=False)


class _Payload:
    """Unpickling this would create a file: the loader must never get that far."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_pickles_are_refused_unless_plain_tensors(tiny, tmp_path):
    marker = tmp_path / "pwned"
    bad = tmp_path / "model.bin"
    torch.save({"cls_token": torch.zeros(1, 1, DIM), "payload": _Payload(marker)}, bad)
    with pytest.raises(WeightsFileError, match="weights_only=True.*convert it to safetensors"):
        create_vit("tiny_dinov2", weights=bad)
    assert not marker.exists()
    # TorchScript archives (OpenAI's own CLIP files) are not loaded either.
    scripted = tmp_path / "ViT-B-16.pt"
    with zipfile.ZipFile(scripted, "w") as archive:  # the layout torch.jit.save writes
        for name in ("data.pkl", "constants.pkl", "code/__torch__/model.py", "version"):
            archive.writestr(f"ViT-B-16/{name}", b"")
    with pytest.raises(WeightsFileError, match="TorchScript archive.*safetensors"):
        create_vit("tiny_clip", weights=scripted)
    # Not a checkpoint at all.
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"hello, not a checkpoint")
    with pytest.raises(WeightsFileError, match="neither safetensors nor a torch checkpoint"):
        create_vit("tiny_dinov2", weights=junk)
    # A safetensors file in no known naming.
    odd = tmp_path / "odd.safetensors"
    save_file({"foo.weight": torch.zeros(2)}, odd)
    with pytest.raises(WeightsFileError, match="no ViT naming defectscope knows"):
        create_vit("tiny_dinov2", weights=odd)


# --- downloading (never for real) ---------------------------------------------------------------------

def test_download_only_when_allowed_through_huggingface_hub(tiny, tmp_path, monkeypatch):
    spec = tiny["reg"]
    reference = _random_extractor(spec.name, seed=16)
    source = tmp_path / "served.safetensors"
    save_file(_to_hf_dinov2(reference.network.state_dict()), source)
    calls = []

    def fake_download(repo_id, filename, cache_dir=None, **kwargs):
        calls.append((repo_id, filename, cache_dir))
        snapshot = _hub_snapshot(Path(cache_dir), repo_id, "feedbeef")
        shutil.copy(source, snapshot / filename)
        return str(snapshot / filename)

    try:
        import huggingface_hub
    except ImportError:  # without it, downloading says what to install
        monkeypatch.setitem(__import__("sys").modules, "huggingface_hub", None)
        with pytest.raises(WeightsNotFoundError, match="pip install huggingface_hub"):
            create_vit(spec.name, allow_download=True)
        return
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)

    with pytest.raises(WeightsNotFoundError):  # not allowed: never called
        create_vit(spec.name)
    assert calls == []
    monkeypatch.setenv(weights.ENV_ALLOW_DOWNLOAD, "1")
    with pytest.raises(WeightsNotFoundError):  # allow_download=False beats the environment
        create_vit(spec.name, allow_download=False)
    downloaded = create_vit(spec.name, blocks=(0, 1))
    assert calls == [(f"test-org/{spec.name}", "model.safetensors", str(tmp_path / "hf"))]
    assert downloaded.weights_source.kind == "download"
    images = _images(28, 56, seed=17)
    _assert_tokens(downloaded.forward_tokens(images), _sequences(reference, images), 4, 2, 4)
    # Now in the hub cache: found there without downloading again.
    monkeypatch.delenv(weights.ENV_ALLOW_DOWNLOAD)
    assert create_vit(spec.name).weights_source.kind == "hub_cache" and len(calls) == 1

    def failing(*args, **kwargs):
        raise OSError("no network here")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", failing)
    with pytest.raises(WeightsNotFoundError, match="download of https://huggingface.co/.* failed: no network here"):
        create_vit("dinov2_vitb14", allow_download=True)


# --- the extractor's contract -----------------------------------------------------------------------

def test_blocks_sizes_grayscale_freezing_and_truncation(tiny):
    extractor = _random_extractor("tiny_dinov2_reg", seed=18)
    assert not extractor.training and not any(p.requires_grad for p in extractor.parameters())
    extractor.train()
    assert not extractor.training
    assert extractor.strides == {"blocks.0": 14, "blocks.1": 14} and extractor.channels["blocks.1"] == DIM
    gray = torch.rand(1, 1, 28, 42)
    with torch.no_grad():
        assert torch.equal(extractor(gray)["blocks.1"], extractor(gray.repeat(1, 3, 1, 1))["blocks.1"])
    with pytest.raises(ValueError, match="not a multiple of the ViT's patch size 14.*28x42"):
        extractor(torch.rand(1, 3, 30, 40))
    with pytest.raises(TypeError, match="float images"):
        extractor(torch.zeros(1, 3, 28, 28, dtype=torch.uint8))

    # Only the blocks up to the deepest requested one exist and run.
    shallow = create_vit("tiny_dinov2_reg", blocks="blocks.0", pretrained=False)
    assert len(shallow.network.blocks) == 1 and list(shallow(torch.rand(1, 3, 28, 28))) == ["blocks.0"]
    for bad in ("blocks.2", "layer3", 2, -3):
        with pytest.raises(UnknownBackboneError, match=r"blocks are blocks.0 \.\.\. blocks.1"):
            create_vit("tiny_dinov2_reg", blocks=(bad,), pretrained=False)
    assert create_vit("tiny_dinov2", pretrained=False).blocks == ("blocks.1",)  # default: the last block
    # Trainable on request.
    trainable = create_vit("tiny_clip", blocks=0, pretrained=False, trainable=True)
    trainable.train()
    assert trainable.training and all(p.requires_grad for p in trainable.parameters())


def test_real_backbones_shapes_names_and_listing(capsys):
    assert get_vit_spec("vit_small_patch14_reg4_dinov2.lvd142m").name == "dinov2_vits14_reg"
    assert get_vit_spec("facebook/dinov2-base").name == "dinov2_vitb14"
    assert get_vit_spec("vit_base_patch16_clip_224.openai").name == "clip_vitb16"
    with pytest.raises(UnknownBackboneError, match="known ViT backbones"):
        get_vit_spec("vit_huge")
    with pytest.raises(UnknownBackboneError, match="is a ViT.*create_vit"):
        create_backbone("dinov2_vits14")
    for name, dim, patch, registers in (("dinov2_vits14_reg", 384, 14, 4), ("clip_vitb16", 768, 16, 0)):
        extractor = create_vit(name, blocks=(0,), pretrained=False)
        assert extractor.num_registers == registers
        with torch.no_grad():
            out = extractor.forward_tokens(torch.rand(1, 3, 2 * patch, 3 * patch))
        assert out.patches["blocks.0"].shape == (1, dim, 2, 3) and out.cls["blocks.0"].shape == (1, dim)

    rows = {r["name"]: r for r in list_backbones()}
    expected = {"dinov2_vits14": (14, 384, 0), "dinov2_vitb14": (14, 768, 0), "dinov2_vits14_reg": (14, 384, 4),
                "dinov2_vitb14_reg": (14, 768, 4), "clip_vitb16": (16, 768, 0)}
    for name, (patch, dim, registers) in expected.items():
        row = rows[name]
        assert (row["patch_size"], row["embed_dim"], row["num_registers"]) == (patch, dim, registers)
        assert row["architecture"] == "vit" and len(row["blocks"]) == 12 and not row["weights_found"]
    assert "resnet18" in rows  # the CNNs are still listed, first

    from defectscope.cli import main

    assert main(["backbones"]) == 0
    out = capsys.readouterr().out
    line = next(l for l in out.splitlines() if l.startswith("dinov2_vitb14_reg:"))
    assert "MISSING" in line and "model.safetensors" in line and "models--facebook--dinov2-with-registers-base" in line
    assert "blocks.0 ... blocks.11  patch 14  dim 768  registers 4" in out


def test_errors_are_defectscope_errors():
    assert issubclass(WeightsFileError, DefectscopeError) and issubclass(WeightsNotFoundError, DefectscopeError)
    assert issubclass(UnknownBackboneError, DefectscopeError)
    assert vit_weights.hf_hub_cache().name == "hf"
