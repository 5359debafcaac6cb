"""Where ViT weights come from, the formats they come in, and reading them without unpickling.

The rule is the CNN backbones' (:mod:`.weights`), first that exists wins:

1. ``explicit``: a path the user gave (``weights=PATH``): a file, or a folder holding one of the
   expected file names (a Hugging Face model folder: ``config.json`` + ``model.safetensors``; a timm
   or open_clip folder; a ``models--org--name`` folder of the hub cache). A path that does not exist
   is an error, never a silent fall-through to other weights.
2. ``hub_cache``: the Hugging Face hub cache (``$HF_HUB_CACHE``, else ``$HF_HOME/hub``, else
   ``~/.cache/huggingface/hub``), ``models--<org>--<name>/snapshots/<rev>/<file>`` with ``<rev>``
   read from ``refs/main`` (then a ``snapshots/main`` folder, then any other snapshot, newest
   first), for each of the spec's hub files in order: Meta's own repositories
   (``facebook/dinov2-small`` ...), timm's (``timm/vit_small_patch14_dinov2.lvd142m`` ...), for CLIP
   also open_clip's and OpenAI's; then Meta's torch.hub file (``dinov2_vits14_pretrain.pth``) in
   ``torch.hub.get_dir()/checkpoints``.
3. ``package``: an installed package that bundles the weights. None exists for these ViTs; the
   hook is the CNN backbones' one (``ViTSpec.package``).
4. ``download``: ``huggingface_hub.hf_hub_download`` of the spec's first hub file into the hub
   cache, only when allowed (``allow_download=True``, or ``DEFECTSCOPE_ALLOW_DOWNLOAD=1`` when the
   argument is left ``None``). ``huggingface_hub`` is imported only then (``pip install
   'defectscope[vit]'``).

Otherwise :class:`~defectscope.errors.WeightsNotFoundError`, one line naming the expected file and
the folder to put it in.

Checkpoint naming is recognised from the keys, whatever the file is called:

* Hugging Face ``Dinov2Model`` / ``Dinov2WithRegistersModel`` (``embeddings.patch_embeddings.projection``,
  ``encoder.layer.N.attention.attention.query`` ...; also under ``dinov2.`` as in the classifiers) and
  ``CLIPModel`` / ``CLIPVisionModel`` (``vision_model.encoder.layers.N.self_attn.q_proj`` ...); a
  ``config.json`` beside the file is checked against the backbone (dims, depth, heads, patch,
  registers, activation);
* timm (``patch_embed.proj``, ``blocks.N.attn.qkv``, ``blocks.N.ls1.gamma``, ``reg_token``; the
  register models keep the class token's position folded into ``cls_token``) and Meta's torch.hub
  checkpoints (the same names, with ``register_tokens`` and ``mask_token``);
* open_clip (``visual.conv1``, ``visual.class_embedding``, ``visual.positional_embedding``,
  ``visual.ln_pre``, ``visual.transformer.resblocks.N.attn.in_proj_weight``, ``visual.ln_post``,
  ``visual.proj``).

Keys with no use for patch tokens are skipped (text towers, ``mask_token``, CLIP's ``proj`` /
``visual_projection`` / ``head``, classifier heads); every other key must fit the network.

Files are read by their content, not their suffix: safetensors with ``safetensors`` (only the
tensors needed; nothing is executed); ``.bin``/``.pth``/``.pt`` pickles only through
``torch.load(weights_only=True)``, whose unpickler rebuilds tensors and plain containers and
refuses everything else. A pickle it refuses (any other object, a TorchScript archive such as
OpenAI's ``ViT-B-16.pt``) is a :class:`~defectscope.backbones.weights.WeightsFileError` saying to
convert the file to safetensors.
"""

from __future__ import annotations

import json
import math
import os
import re
import warnings
import zipfile
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from torch import nn

from ..errors import WeightsNotFoundError
from .vit import HubFile, ViTSpec, get_vit_spec
from .weights import (
    unwrap_state_dict,
    ENV_ALLOW_DOWNLOAD,
    WeightsFileError,
    WeightsSource,
    copy_state,
    download_allowed,
    explicit_source,
    hub_checkpoint_dir,
    package_weights_file,
)

PathLike = str | os.PathLike[str]


# --- where ----------------------------------------------------------------------------------------

def hf_hub_cache() -> Path:
    """The Hugging Face hub cache, as ``huggingface_hub`` finds it (read from the environment now)."""
    for variable in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(variable):
            return Path(os.environ[variable]).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME") or "~/.cache", "huggingface")
    return Path(home).expanduser() / "hub"


def hub_repo_dir(repo: str, cache: Path | None = None) -> Path:
    """``<cache>/models--<org>--<name>``: a model repository's folder in the hub cache."""
    return (cache or hf_hub_cache()) / ("models--" + repo.replace("/", "--"))


def hub_target_dir(repo: str) -> Path:
    """Where to put a repository's files by hand: ``snapshots/main`` of its cache folder, which
    ``huggingface_hub`` also reads when ``refs/main`` is absent."""
    return hub_repo_dir(repo) / "snapshots" / "main"


def _snapshots(repo_dir: Path) -> list[Path]:
    snapshots = repo_dir / "snapshots"
    if not snapshots.is_dir():
        return []
    order: list[Path] = []
    ref = repo_dir / "refs" / "main"
    if ref.is_file():
        revision = ref.read_text().strip()
        if revision and "/" not in revision and revision not in (".", ".."):
            order.append(snapshots / revision)
    order.append(snapshots / "main")
    others = [p for p in snapshots.iterdir() if p.is_dir() and p not in order]
    others.sort(key=lambda p: p.stat().st_mtime, reverse=True)
    return [p for p in order + others if p.is_dir()]


def cached_hub_file(repo_dir: Path, filename: str) -> Path | None:
    """``filename`` in a hub-cache repository folder: the ``refs/main`` snapshot first."""
    for snapshot in _snapshots(repo_dir):
        if (snapshot / filename).is_file():
            return snapshot / filename
    return None


def expected_filenames(spec: ViTSpec) -> tuple[str, ...]:
    """File names looked for in a folder given as ``weights=``, in order."""
    return tuple(dict.fromkeys([f.filename for f in spec.hub_files] + list(spec.torch_hub_files)))


def _in_hub_folder(names: list[str], folder: Path) -> Path | None:
    if (folder / "snapshots").is_dir():  # a models--org--name folder of a hub cache
        for filename in names:
            found = cached_hub_file(folder, filename)
            if found is not None:
                return found
    return None


def find_vit_weights(name: "str | ViTSpec", weights: PathLike | None = None) -> WeightsSource | None:
    """Sources 1-3 (no download, nothing loaded); ``None`` when none has a file.

    An explicit ``weights`` path that does not exist, or a folder without any expected file,
    raises :class:`WeightsNotFoundError`.
    """
    spec = get_vit_spec(name)
    if weights is not None:
        return explicit_source(weights, f"ViT backbone {spec.name!r}", expected_filenames(spec),
                               in_folder=lambda folder: _in_hub_folder(expected_filenames(spec), folder))
    cache = hf_hub_cache()
    for hub_file in spec.hub_files:
        found = cached_hub_file(hub_repo_dir(hub_file.repo, cache), hub_file.filename)
        if found is not None:
            return WeightsSource("hub_cache", found)
    checkpoints = hub_checkpoint_dir()
    for filename in spec.torch_hub_files:
        if (checkpoints / filename).is_file():
            return WeightsSource("hub_cache", checkpoints / filename)
    bundled = package_weights_file(spec)  # type: ignore[arg-type]  # reads only spec.package
    if bundled is not None:
        return WeightsSource("package", bundled)
    return None


def not_found_message(spec: ViTSpec, extra: str = "") -> str:
    """One line: the file expected, the folder to put it in, and the other ways to get weights."""
    first = spec.hub_files[0]
    others = [f"{f.repo}'s {f.filename}" for f in spec.hub_files[1:] if f.filename.endswith(".safetensors")]
    alternatives = [f"{', '.join(others)} in the Hugging Face hub cache {hf_hub_cache()}"] if others else []
    if spec.torch_hub_files:
        alternatives.append(f"{' or '.join(spec.torch_hub_files)} in {hub_checkpoint_dir()}")
    also = f" (or {'; or '.join(alternatives)})" if alternatives else ""
    how = [
        f"download it by hand from {first.url} into that folder",
        f"allow downloading with {ENV_ALLOW_DOWNLOAD}=1 (needs huggingface_hub: pip install 'defectscope[vit]')",
        "pass weights=PATH (the file, or a folder holding it), or pretrained=False for random weights",
    ]
    return (f"no pretrained weights for ViT backbone {spec.name!r}{extra}: expected file '{first.filename}' "
            f"of {first.repo} in {hub_target_dir(first.repo)}{also}; " + "; or ".join(how))


def download_vit_weights(name: "str | ViTSpec") -> Path:
    """Source 4: ``huggingface_hub.hf_hub_download`` of the spec's first hub file into the hub cache."""
    spec = get_vit_spec(name)
    target: HubFile = spec.hub_files[0]
    try:
        import huggingface_hub
    except ImportError as exc:
        raise WeightsNotFoundError(not_found_message(
            spec, " (downloading needs huggingface_hub, which is not installed: pip install huggingface_hub, "
                  "or pip install 'defectscope[vit]')")) from exc
    cache = hf_hub_cache()
    try:
        path = huggingface_hub.hf_hub_download(repo_id=target.repo, filename=target.filename, cache_dir=str(cache))
    except Exception as exc:  # network, HTTP, offline mode, disk: one message
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise WeightsNotFoundError(not_found_message(spec, f" (download of {target.url} failed: {reason})")) from exc
    return Path(path)


def resolve_vit_weights_source(name: "str | ViTSpec", weights: PathLike | None = None,
                               allow_download: bool | None = None) -> WeightsSource:
    """Sources 1-4 in order; raises :class:`WeightsNotFoundError` when none has the weights."""
    spec = get_vit_spec(name)
    found = find_vit_weights(spec, weights)
    if found is not None:
        return found
    if download_allowed(allow_download):
        return WeightsSource("download", download_vit_weights(spec))
    raise WeightsNotFoundError(not_found_message(spec))


# --- reading --------------------------------------------------------------------------------------

def _file_kind(path: Path) -> str:
    with path.open("rb") as handle:
        head = handle.read(9)
    if len(head) == 9 and head[8:9] == b"{":  # u64 header length, then the JSON header
        return "safetensors"
    if head[:4] == b"PK\x03\x04" or head[:1] == b"\x80":  # torch.save's zip, or a legacy pickle
        return "pickle"
    return "unknown"


def _convert_hint(path: Path) -> str:
    return (f"convert it to safetensors where it was made (safetensors.torch.save_file(state_dict, "
            f"'{path.stem}.safetensors')) and pass that file")


def _is_torchscript(path: Path) -> bool:
    try:
        with zipfile.ZipFile(path) as archive:
            return any(n.endswith("/constants.pkl") or "/code/" in n for n in archive.namelist())
    except (OSError, zipfile.BadZipFile):
        return False


def _read_pickle(path: Path) -> dict[str, torch.Tensor]:
    if _is_torchscript(path):
        raise WeightsFileError(
            f"weights file {path} is a TorchScript archive (as OpenAI's own CLIP files), which defectscope does "
            f"not load: use the safetensors files of the Hugging Face hub, or {_convert_hint(path)}"
        )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. torch's note on the pickle protocol of foreign files
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        # torch's message goes on about loading with weights_only=False: keep only what it refused.
        found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(exc))
        reason = f"it holds {found.group(1)}, not only tensors" if found else type(exc).__name__
        raise WeightsFileError(
            f"weights file {path} is a pickle that torch.load(weights_only=True) refuses ({reason[:200]}); "
            f"defectscope never unpickles arbitrary objects: {_convert_hint(path)}"
        ) from exc
    return unwrap_state_dict(obj, path, _convert_hint(path))


def read_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a ViT checkpoint that a patch-token network can use (text towers skipped)."""
    kind = _file_kind(path)
    if kind == "safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt", device="cpu") as handle:
                keys = list(handle.keys())
                return {key: handle.get_tensor(key) for key in _useful_keys(keys)}
        except Exception as exc:
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise WeightsFileError(f"cannot read weights file {path} as safetensors: {reason}") from exc
    if kind == "pickle":
        state = _read_pickle(path)
        return {key: state[key] for key in _useful_keys(list(state))}
    raise WeightsFileError(f"weights file {path} is neither safetensors nor a torch checkpoint; "
                           "ViT weights are read from .safetensors files (or plain .bin/.pth tensor checkpoints)")


# --- naming ---------------------------------------------------------------------------------------

_OPEN_CLIP = "open_clip"
_HF_CLIP = "hf_clip"
_HF_DINOV2 = "hf_dinov2"
_TIMM = "timm"

_MARKERS = (  # (format, key that marks it); the key's prefix (e.g. "visual.") is the format's scope
    (_OPEN_CLIP, "conv1.weight"),
    (_HF_CLIP, "embeddings.patch_embedding.weight"),
    (_HF_DINOV2, "embeddings.patch_embeddings.projection.weight"),
    (_TIMM, "patch_embed.proj.weight"),
)


def _detect(keys: Iterable[str]) -> tuple[str, str] | None:
    """(format, prefix) of a checkpoint from its key names; ``None`` when no naming fits."""
    keys = list(keys)
    for fmt, marker in _MARKERS:
        hits = sorted((k for k in keys if k == marker or k.endswith("." + marker)), key=len)
        if hits:
            return fmt, hits[0][: -len(marker)]
    return None


def _useful_keys(keys: list[str]) -> list[str]:
    """The keys inside the detected format's scope (so a whole CLIP's text tower is never read)."""
    found = _detect(keys)
    if found is None or not found[1]:
        return keys
    return [k for k in keys if k.startswith(found[1])]


# Keys (after the scope prefix) that carry nothing a patch-token network uses.
_SKIPPED = {
    _OPEN_CLIP: re.compile(r"^proj$"),
    _HF_CLIP: re.compile(r"^(embeddings\.position_ids|visual_projection\..*|text_projection\..*|logit_scale|"
                         r"text_model\..*)$"),
    _HF_DINOV2: re.compile(r"^(embeddings\.mask_token|classifier\..*)$"),
    _TIMM: re.compile(r"^(mask_token|head\..*)$"),
}

# (pattern, replacement) in internal (timm) names; q/k/v pieces are fused afterwards.
_RENAMES: dict[str, list[tuple[str, str]]] = {
    _OPEN_CLIP: [
        (r"^conv1\.weight$", "patch_embed.proj.weight"),
        (r"^class_embedding$", "cls_token"),
        (r"^positional_embedding$", "pos_embed"),
        (r"^ln_pre\.(weight|bias)$", r"norm_pre.\1"),
        (r"^ln_post\.(weight|bias)$", r"norm.\1"),
        (r"^transformer\.resblocks\.(\d+)\.ln_1\.", r"blocks.\1.norm1."),
        (r"^transformer\.resblocks\.(\d+)\.ln_2\.", r"blocks.\1.norm2."),
        (r"^transformer\.resblocks\.(\d+)\.attn\.in_proj_(weight|bias)$", r"blocks.\1.attn.qkv.\2"),
        (r"^transformer\.resblocks\.(\d+)\.attn\.out_proj\.", r"blocks.\1.attn.proj."),
        (r"^transformer\.resblocks\.(\d+)\.mlp\.c_fc\.", r"blocks.\1.mlp.fc1."),
        (r"^transformer\.resblocks\.(\d+)\.mlp\.c_proj\.", r"blocks.\1.mlp.fc2."),
        (r"^transformer\.resblocks\.(\d+)\.ls_(1|2)\.gamma$", r"blocks.\1.ls\2.gamma"),
    ],
    _HF_CLIP: [
        (r"^embeddings\.class_embedding$", "cls_token"),
        (r"^embeddings\.patch_embedding\.weight$", "patch_embed.proj.weight"),
        (r"^embeddings\.position_embedding\.weight$", "pos_embed"),
        (r"^pre_layrnorm\.(weight|bias)$", r"norm_pre.\1"),
        (r"^post_layernorm\.(weight|bias)$", r"norm.\1"),
        (r"^encoder\.layers\.(\d+)\.layer_norm1\.", r"blocks.\1.norm1."),
        (r"^encoder\.layers\.(\d+)\.layer_norm2\.", r"blocks.\1.norm2."),
        (r"^encoder\.layers\.(\d+)\.self_attn\.(q|k|v)_proj\.(weight|bias)$", r"blocks.\1.attn.qkv.\3:\2"),
        (r"^encoder\.layers\.(\d+)\.self_attn\.out_proj\.", r"blocks.\1.attn.proj."),
        (r"^encoder\.layers\.(\d+)\.mlp\.(fc1|fc2)\.", r"blocks.\1.mlp.\2."),
    ],
    _HF_DINOV2: [
        (r"^embeddings\.cls_token$", "cls_token"),
        (r"^embeddings\.position_embeddings$", "pos_embed"),
        (r"^embeddings\.register_tokens$", "reg_token"),
        (r"^embeddings\.patch_embeddings\.projection\.", "patch_embed.proj."),
        (r"^encoder\.layer\.(\d+)\.(norm1|norm2)\.", r"blocks.\1.\2."),
        (r"^encoder\.layer\.(\d+)\.attention\.attention\.query\.(weight|bias)$", r"blocks.\1.attn.qkv.\2:q"),
        (r"^encoder\.layer\.(\d+)\.attention\.attention\.key\.(weight|bias)$", r"blocks.\1.attn.qkv.\2:k"),
        (r"^encoder\.layer\.(\d+)\.attention\.attention\.value\.(weight|bias)$", r"blocks.\1.attn.qkv.\2:v"),
        (r"^encoder\.layer\.(\d+)\.attention\.output\.dense\.", r"blocks.\1.attn.proj."),
        (r"^encoder\.layer\.(\d+)\.layer_scale(1|2)\.lambda1$", r"blocks.\1.ls\2.gamma"),
        (r"^encoder\.layer\.(\d+)\.mlp\.(fc1|fc2)\.", r"blocks.\1.mlp.\2."),
        (r"^layernorm\.(weight|bias)$", r"norm.\1"),
    ],
    _TIMM: [
        (r"^register_tokens$", "reg_token"),  # Meta's name
    ],
}

FORMAT_NAMES = {_OPEN_CLIP: "open_clip", _HF_CLIP: "Hugging Face CLIP", _HF_DINOV2: "Hugging Face DINOv2",
                _TIMM: "timm/Meta"}


def check_known(path, naming: str, unknown: list[str], what: str = "keys") -> None:
    """The one-line error for checkpoint keys no renaming table knows (the first three named)."""
    if unknown:
        more = f" and {len(unknown) - 3} more" if len(unknown) > 3 else ""
        raise WeightsFileError(f"weights file {path} ({naming} naming) has {what} defectscope does not know: "
                               f"{', '.join(unknown[:3])}{more}")


def fuse_qkv(path, pieces: dict[str, dict[str, torch.Tensor]], out: dict[str, torch.Tensor]) -> None:
    """Concatenate separate q/k/v projections (Hugging Face naming) into the fused ``qkv`` tensors
    of ``out``; one line naming the layer when a projection is missing."""
    for fused, parts in pieces.items():
        if set(parts) != {"q", "k", "v"}:
            raise WeightsFileError(f"weights file {path}: {fused} has only the {'/'.join(sorted(parts))} projection(s)")
        out[fused] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)


def to_internal(state: Mapping[str, torch.Tensor], path: Path | str = "<state dict>") -> tuple[dict[str, torch.Tensor], str]:
    """Rename a checkpoint in any supported naming onto the network's (timm) names.

    Returns the renamed tensors and the format's name. The class token becomes ``[1, 1, D]`` and the
    position embedding ``[1, 1 + g*g, D]`` with the class token's row first (timm's register models,
    which store no such row, get a zero row: their ``cls_token`` already holds it); q, k and v
    projections are fused into ``qkv`` in that order.
    """
    found = _detect(state)
    if found is None:
        sample = ", ".join(list(state)[:4])
        raise WeightsFileError(f"weights file {path} is in no ViT naming defectscope knows (Hugging Face, timm, "
                               f"Meta, open_clip); its first keys: {sample}")
    fmt, prefix = found
    out: dict[str, torch.Tensor] = {}
    pieces: dict[str, dict[str, torch.Tensor]] = {}
    unknown: list[str] = []
    for key, tensor in state.items():
        if not key.startswith(prefix):
            continue  # outside the vision tower (a text tower, a classifier's head)
        key = key[len(prefix):]
        if _SKIPPED[fmt].match(key):
            continue
        new = key
        for pattern, replacement in _RENAMES[fmt]:
            new, count = re.subn(pattern, replacement, key)
            if count:
                break
        else:
            if fmt != _TIMM:
                unknown.append(prefix + key)
                continue
        if ":" in new:
            fused, part = new.split(":")
            pieces.setdefault(fused, {})[part] = tensor
        else:
            out[new] = tensor
    check_known(path, FORMAT_NAMES[fmt], unknown)
    fuse_qkv(path, pieces, out)
    if "cls_token" in out:
        out["cls_token"] = out["cls_token"].reshape(1, 1, -1)
    pos = out.get("pos_embed")
    if pos is not None:
        pos = pos.reshape(1, -1, pos.shape[-1])
        if math.isqrt(pos.shape[1]) ** 2 == pos.shape[1]:  # no class-token row (timm no_embed_class)
            pos = torch.cat([torch.zeros_like(pos[:, :1]), pos], dim=1)
        out["pos_embed"] = pos
    return out, FORMAT_NAMES[fmt]


# --- checking a Hugging Face config.json ----------------------------------------------------------

def check_hf_config(spec: ViTSpec, config_path: Path) -> None:
    """Compare a Hugging Face ``config.json`` with the backbone; fields it leaves out are not checked."""
    try:
        config = json.loads(config_path.read_text())
    except (OSError, ValueError) as exc:
        raise WeightsFileError(f"cannot read {config_path} as JSON: {exc}") from exc
    model_type = config.get("model_type") if isinstance(config, dict) else None
    if model_type is None:
        return  # not a transformers config (timm's config.json has "architecture" instead)
    families = {"dinov2": "dinov2", "dinov2_with_registers": "dinov2", "clip": "clip", "clip_vision_model": "clip"}
    problems: list[str] = []
    if families.get(model_type) != spec.family:
        problems.append(f"model_type {model_type!r} is not a {spec.family} model")
    else:
        if model_type == "clip":
            config = config.get("vision_config") or {}
        expected = {
            "hidden_size": spec.embed_dim,
            "num_hidden_layers": spec.depth,
            "num_attention_heads": spec.num_heads,
            "patch_size": spec.patch_size,
            "hidden_act": spec.act,
        }
        if spec.family == "dinov2":
            expected["num_register_tokens"] = spec.num_registers
            if model_type == "dinov2" and spec.num_registers:
                problems.append(f"model_type 'dinov2' has no registers, {spec.name} has {spec.num_registers}")
            if config.get("use_swiglu_ffn"):
                problems.append("use_swiglu_ffn is true (a SwiGLU MLP), not a plain MLP")
        for field, value in expected.items():
            if field in config and config[field] != value:
                problems.append(f"{field} is {config[field]!r}, not {value!r}")
        if "layer_norm_eps" in config and not math.isclose(config["layer_norm_eps"], spec.ln_eps):
            problems.append(f"layer_norm_eps is {config['layer_norm_eps']!r}, not {spec.ln_eps!r}")
    if problems:
        raise WeightsFileError(f"{config_path} does not describe ViT backbone {spec.name!r}: " + "; ".join(problems))


# --- loading --------------------------------------------------------------------------------------

def load_vit_weights(network: nn.Module, spec: ViTSpec, path: Path, full_shapes: Mapping[str, torch.Size]) -> str:
    """Copy the checkpoint at ``path`` into ``network`` (maybe built with fewer blocks than the
    checkpoint has); returns the format's name.

    ``full_shapes`` are the shapes of the whole network: every renamed key must be one of them with
    the same shape (so the file is this architecture), and every key of ``network`` must be in the
    file. A position embedding learnt on another square grid is taken as it is (it is
    resampled to each input anyway).
    """
    state, fmt = to_internal(read_checkpoint(path), path)
    if fmt.startswith("Hugging Face") and (path.parent / "config.json").is_file():
        check_hf_config(spec, path.parent / "config.json")
    full_shapes = dict(full_shapes)
    pos = state.get("pos_embed")
    if (pos is not None and pos.shape != full_shapes["pos_embed"] and pos.shape[-1] == spec.embed_dim
            and math.isqrt(pos.shape[1] - 1) ** 2 == pos.shape[1] - 1):
        network.pos_embed = nn.Parameter(torch.zeros(pos.shape, dtype=network.pos_embed.dtype))
        full_shapes["pos_embed"] = pos.shape
    copy_state(network, state, full_shapes,
               f"weights file {path} ({fmt} naming) does not fit ViT backbone {spec.name!r}")
    return fmt
