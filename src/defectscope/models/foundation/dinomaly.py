"""Dinomaly: Guo, Lu, Zhang, Liu, Wang, "Dinomaly: The Less Is More Philosophy in Multi-Class
Unsupervised Anomaly Detection", CVPR 2025 (arXiv:2405.14325); checked line by line against the
authors' code (github.com/guojiajeremy/Dinomaly: ``dinomaly_mvtec_uni.py``, ``models/uad.py``
``ViTill``, ``models/vision_transformer.py``, ``utils.py``, ``optimizers/StableAdamW.py``) and
anomalib 2.7's port (``anomalib/models/image/dinomaly``).

Architecture (Sec. 3):

* **Encoder** (Sec. 3.1): a frozen DINOv2 ViT, by default ViT-B/14 with 4 registers (the
  official ``dinov2reg_vit_base_14``; ViT-S/14 and the plain models selectable with ``encoder``),
  through :func:`defectscope.backbones.create_vit`. The token sequences ``[cls, registers,
  patches]`` after the 8 middle blocks ``2..9`` (raw block outputs, no final norm) are taken;
  blocks 10 and 11 are never built nor run.
* **Noisy bottleneck** (Sec. 3.2): the mean of the 8 sequences goes through one MLP
  ``D -> 4D -> D`` (GELU) with dropout 0.2 on its input, its hidden layer and its output
  (the official ``bMlp``): the dropout is the noise that keeps the decoder from learning the
  identity.
* **Linear-attention decoder** (Sec. 3.3): 8 pre-norm ViT blocks (LayerNorm eps 1e-8, MLP ratio
  4, qkv with bias, no LayerScale) whose attention is the unfocused linear attention of the
  official ``LinearAttention2``::

      phi(x) = elu(x) + 1
      Attn(Q, K, V)_i = sum_j phi(q_i).phi(k_j) v_j / sum_j phi(q_i).phi(k_j)
                      = phi(q_i) (phi(K)^T V) / (phi(q_i) . sum_j phi(k_j))

  per head (no 1/sqrt(d) scale), computed in O(N d^2).
* **Loose reconstruction** (Sec. 3.4): the 8 encoder sequences are fused in 2 groups (mean of
  blocks 2-5 and of blocks 6-9); the 8 decoder outputs, deepest first, in the same 2 groups.
  The class and register tokens are dropped only after the fusion (they go through the
  bottleneck and the decoder, as in ``ViTill``), the patch tokens laid out on the ``h x w`` grid.
* **Loss** (loose loss with hard mining, official ``global_cosine_hm_percent``): per group
  ``g``, ``1 - cos(vec f_E^g, vec f_D^g)`` of each image's whole flattened map, averaged over
  the images and the groups; the gradient reaching ``f_D^g`` at the positions whose distance
  ``1 - cos(f_E^g(h, w), f_D^g(h, w))`` is below the ``(1 - p)`` top share (the ``p`` easiest
  positions of the batch) is multiplied by ``factor = 0.1``; ``p`` rises linearly from 0 to
  0.9 over the first 1000 iterations.
* **Optimiser**: StableAdamW (the authors' file: AdamW with AMSGrad whose step is divided by
  ``max(1, RMS(grad / denom))``), lr 2e-3, betas (0.9, 0.999), weight decay 1e-4, eps 1e-10,
  gradient norm clipped to 0.1, warm-up cosine schedule (``WarmCosineScheduler``: linear from 0
  over 100 iterations, cosine from 2e-3 to 2e-4 over the rest), 10 000 iterations at batch 16
  over shuffled whole batches (``drop_last``), decoder and bottleneck Linear weights initialised
  truncated normal (std 0.01, in [-0.03, 0.03]), biases 0.
* **Input**: resize to 448 (``image_size``), centre crop 392 (``crop_size``), ImageNet mean/std.
* **Anomaly map and score** (official ``cal_anomaly_maps`` + ``evaluation_batch``): per group
  ``1 - cos`` along the channels, upsampled bilinearly (``align_corners=True``) to the crop,
  averaged over the 2 groups, Gaussian blur; image score = mean of the top 1 % of the map's
  pixels (``max_ratio=0.01``).

Deviations (also in ``notes``):

* the DINOv2 position embeddings are resampled as the authors' ``vit_encoder.load`` builds every
  encoder (Meta's +0.1 scale-factor offset, no antialiasing), also for the register models,
  whose Meta hub default is a resampling by size with antialiasing;
* the map is blurred at the crop's resolution with defectscope's Gaussian of sigma 4 (radius 16)
  and the score is the top 1 % of that map; the authors resize the map to 256 px first and blur
  it with a 5 x 5 kernel of sigma 4;
* the contract maps the whole input: the map of the 392 px crop is placed in the 448 px map and
  the 28 px border (which the network never sees) is filled by extending the crop's edge values.
  The authors crop the ground truth too and evaluate on the crop only;
* the one-class scripts (``dinomaly_*_sep.py``) train 5000 iterations with eps 1e-8; the
  defaults here are the multi-class script's (10 000 iterations, eps 1e-10), as the paper's
  headline numbers; ``iterations=5000 eps=1e-8`` gives the one-class schedule;
* anomalib's port differs from the authors' code in ways not followed here: its bottleneck and
  decoder MLPs have no biases (``bias=False``), and its StableAdamW uses eps 1e-8.

Parameter counts (bottleneck + decoder, trainable): 15,377,280 at ViT-S (dim 384),
61,425,408 at ViT-B (dim 768), the official modules' (checked in ``tests/test_dinomaly.py``).

**Weights.** DINOv2 weights cannot be downloaded here; they load by path or from a cache through
:mod:`defectscope.backbones.vit_weights` (no unpickling). For the default encoder put one of:

* ``model.safetensors`` of ``facebook/dinov2-with-registers-base`` (Hugging Face format, with its
  ``config.json``) in ``$HF_HUB_CACHE/models--facebook--dinov2-with-registers-base/snapshots/main/``
  (``$HF_HUB_CACHE`` defaults to ``~/.cache/huggingface/hub``);
* or timm's ``model.safetensors`` of ``timm/vit_base_patch14_reg4_dinov2.lvd142m`` in
  ``.../models--timm--vit_base_patch14_reg4_dinov2.lvd142m/snapshots/main/``;
* or Meta's ``dinov2_vitb14_reg4_pretrain.pth`` (the file the authors' code downloads) in
  ``$TORCH_HOME/hub/checkpoints/`` (default ``~/.cache/torch/hub/checkpoints``);
* or any of these files anywhere, named with ``weights=PATH`` (``--param weights=PATH``).

ViT-S: ``encoder=dinov2_vits14_reg`` and the ``-small`` / ``vit_small_...`` / ``dinov2_vits14_reg4_``
names. ``defectscope backbones`` lists every file looked for and where. With
``DEFECTSCOPE_ALLOW_DOWNLOAD=1`` and ``huggingface_hub`` installed, the first file is downloaded.
Without weights, fitting fails at once with one line naming the file and the folder.
``pretrained=false`` builds the encoder with random weights (timing and tests only).
``encoder=tiny`` is a DINOv2-shaped ViT of width 32 and 10 blocks (random unless ``weights``
names a file of that shape): the conformance suite's smoke encoder, not a detector.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from ...backbones import VIT_BACKBONES, ViTSpec, create_vit, find_vit_weights, get_vit_spec, resolve_vit_weights_source
from ...backbones.vit import HubFile
from ...backbones.vit_weights import hub_target_dir
from ...errors import DefectscopeError, WeightsNotFoundError
from ...ops.blur import gaussian_blur
from ...progress import progress
from ...training import auto_device, batches, load_images, seed_everything
from ..base import AnomalyModel, Prediction, register
from ..cost import Cost
from ..params import Param, ParamError, Tags

__all__ = ["Dinomaly", "LinearAttention", "DecoderBlock", "NoisyBottleneck", "StableAdamW", "TINY_ENCODER",
           "hard_mining_cosine_loss", "warm_cosine_lr", "group_distance_maps", "TARGET_BLOCKS", "GROUPS"]

#: The encoder blocks read (official ``target_layers`` of ViT-S/B) and how the 8 are fused.
TARGET_BLOCKS = (2, 3, 4, 5, 6, 7, 8, 9)
GROUPS = ((0, 1, 2, 3), (4, 5, 6, 7))
DECODER_DEPTH = 8

#: A test-sized DINOv2-with-registers ViT (width 32, 2 heads, 10 blocks, 56 px native): the smoke
#: encoder of the conformance suite. Its weights file name is only ever one a test writes.
TINY_ENCODER: ViTSpec = dataclasses.replace(
    VIT_BACKBONES["dinov2_vits14_reg"], name="tiny", description="test-sized DINOv2-shaped ViT (width 32, 10 blocks)",
    embed_dim=32, depth=10, num_heads=2, image_size=56,
    hub_files=(HubFile("defectscope/dinomaly-tiny-test", "model.safetensors"),), torch_hub_files=(), aliases=(),
)
ENCODERS = ("dinov2_vitb14_reg", "dinov2_vits14_reg", "dinov2_vitb14", "dinov2_vits14", "tiny")


# --- the trainable networks -------------------------------------------------------------------------

class LinearAttention(nn.Module):
    """The official ``LinearAttention2``: ``phi = elu + 1`` kernels, ``phi(Q) (phi(K)^T V)``
    normalised by ``phi(Q) . sum_j phi(k_j)``, per head; ``[B, N, D] -> [B, N, D]``."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embedding dim {dim} is not a multiple of {num_heads} heads")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=True)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k = F.elu(q) + 1.0, F.elu(k) + 1.0  # [b, h, n, d]
        kv = k.transpose(-2, -1) @ v  # [b, h, d, d]
        z = 1.0 / (q @ k.sum(dim=-2).unsqueeze(-1))  # [b, h, n, 1]
        out = (q @ kv) * z
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class Mlp(nn.Module):
    """``fc2(GELU(fc1(x)))``, hidden ``4 D``, with dropout ``drop`` on the input, the hidden
    layer and the output when ``input_drop`` (the official bottleneck ``bMlp``), else none."""

    def __init__(self, dim: int, drop: float = 0.0, input_drop: bool = False) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, 4 * dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(4 * dim, dim)
        self.drop = nn.Dropout(drop)
        self.input_drop = input_drop

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        if self.input_drop:
            x = self.drop(x)
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class NoisyBottleneck(Mlp):
    """The noisy bottleneck (Sec. 3.2): an MLP ``D -> 4D -> D`` with dropout on input, hidden and output."""

    def __init__(self, dim: int, drop: float = 0.2) -> None:
        super().__init__(dim, drop, input_drop=True)


class DecoderBlock(nn.Module):
    """A pre-norm ViT block with linear attention (official ``Block(attn=LinearAttention2)``):
    ``x + attn(norm1(x))``, then ``x + mlp(norm2(x))``; LayerNorm eps 1e-8, no LayerScale."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-8)
        self.attn = LinearAttention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-8)
        self.mlp = Mlp(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


def init_trainable(module: nn.Module) -> None:
    """The official initialisation of the bottleneck and decoder: Linear weights truncated normal
    (std 0.01, cut at +-0.03), biases 0; LayerNorm weight 1, bias 0."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.01, a=-0.03, b=0.03)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


# --- loss, schedule, optimiser --------------------------------------------------------------------

def hard_mining_cosine_loss(enc: list[torch.Tensor], dec: list[torch.Tensor], p: float,
                            factor: float = 0.1) -> torch.Tensor:
    """The loose loss with hard mining (official ``global_cosine_hm_percent``).

    ``enc``, ``dec``: per group ``[B, D, h, w]``. Value: the mean over groups of the batch mean of
    ``1 - cos(vec enc_i, vec dec_i)`` (each image's whole map as one vector; ``enc`` detached).
    Gradient: at the positions whose distance ``1 - cos(enc(h, w), dec(h, w))`` is below the
    ``k``-th largest of the group's batch (``k = int(B h w (1 - p))``, at least 1), the gradient
    flowing into ``dec`` is multiplied by ``factor``."""
    loss = enc[0].new_zeros(())
    for e, d in zip(enc, dec):
        e = e.detach()
        with torch.no_grad():
            dist = 1 - F.cosine_similarity(e, d, dim=1).unsqueeze(1)  # [B, 1, h, w]
            k = max(1, int(dist.numel() * (1 - p)))
            thresh = torch.topk(dist.reshape(-1), k).values[-1]
            scale = torch.where(dist < thresh, torch.full_like(dist, factor), torch.ones_like(dist))
        loss = loss + (1 - F.cosine_similarity(e.flatten(1), d.flatten(1), dim=1)).mean()
        if d.requires_grad:
            d.register_hook(lambda grad, scale=scale: grad * scale)
    return loss / len(enc)


def warm_cosine_lr(it: int, base: float, final: float, total: int, warmup: int) -> float:
    """The official ``WarmCosineScheduler`` at iteration ``it`` (0-based, the value used by the
    ``it``-th optimiser step): ``linspace(0, base, warmup)[it]`` during the warm-up, then
    ``final + (base - final) (1 + cos(pi i / (total - warmup))) / 2`` with ``i = it - warmup``;
    ``final`` from ``total`` on."""
    if it < warmup:
        return base * it / (warmup - 1) if warmup > 1 else 0.0
    if it >= total:
        return final
    return final + 0.5 * (base - final) * (1 + math.cos(math.pi * (it - warmup) / (total - warmup)))


class StableAdamW(torch.optim.Optimizer):
    """The authors' StableAdamW (``optimizers/StableAdamW.py``): decoupled weight decay
    ``p <- p (1 - lr wd)``, Adam moments (AMSGrad: the running maximum of the second moment),
    and the step ``lr / bias_correction1 / max(1, RMS(g / denom) / clip_threshold)``."""

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 1e-2,
                 amsgrad: bool = False, clip_threshold: float = 1.0) -> None:
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
                                      clip_threshold=clip_threshold))

    @torch.no_grad()
    def step(self, closure=None):  # noqa: D102
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                p.mul_(1 - group["lr"] * group["weight_decay"])
                grad = p.grad
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                    if group["amsgrad"]:
                        state["max_exp_avg_sq"] = torch.zeros_like(p)
                state["step"] += 1
                exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
                bias1 = 1 - beta1 ** state["step"]
                bias2 = 1 - beta2 ** state["step"]
                exp_avg.mul_(beta1).add_(grad, alpha=1 - beta1)
                exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                second = exp_avg_sq
                if group["amsgrad"]:
                    torch.maximum(state["max_exp_avg_sq"], exp_avg_sq, out=state["max_exp_avg_sq"])
                    second = state["max_exp_avg_sq"]
                denom = (second.sqrt() / math.sqrt(bias2)).add_(group["eps"])
                ratio = grad / denom
                rms = float(ratio.norm(2) / math.sqrt(ratio.numel()))
                p.addcdiv_(exp_avg, denom, value=-group["lr"] / bias1 / max(1.0, rms / group["clip_threshold"]))
        return loss


# --- maps -----------------------------------------------------------------------------------------

def group_distance_maps(enc: list[torch.Tensor], dec: list[torch.Tensor], size: int) -> torch.Tensor:
    """``1 - cos`` along the channels per group, upsampled bilinearly (``align_corners=True``) to
    ``size``, averaged over the groups: ``[B, size, size]`` (official ``cal_anomaly_maps``)."""
    maps = [1 - F.cosine_similarity(e, d, dim=1) for e, d in zip(enc, dec)]
    up = F.interpolate(torch.stack(maps, dim=1), size=(size, size), mode="bilinear", align_corners=True)
    return up.mean(dim=1)


def top_ratio_score(amap: torch.Tensor, ratio: float) -> torch.Tensor:
    """Mean of the ``int(H W ratio)`` largest values of each map ``[B, H, W]`` (the maximum when
    that is 0): the official ``max_ratio`` image score."""
    flat = amap.flatten(1)
    k = int(flat.shape[1] * ratio)
    if k < 1:
        return flat.amax(dim=1)
    return torch.topk(flat, k, dim=1).values.mean(dim=1)


# --- the method -----------------------------------------------------------------------------------

@register
class Dinomaly(AnomalyModel):
    """Dinomaly (Guo et al., CVPR 2025): frozen DINOv2, noisy MLP bottleneck, linear-attention decoder."""

    name = "dinomaly"
    paradigm = "foundation"
    description = ("Dinomaly (CVPR 2025): a linear-attention decoder reconstructs frozen DINOv2 features "
                   "through a noisy bottleneck; one model for many products")
    paper = "Guo et al., CVPR 2025"
    notes = (
        "official defaults (DINOv2 ViT-B/14 with registers, blocks 2-9 fused in 2 groups, MLP bottleneck with "
        "dropout 0.2, 8 linear-attention decoder blocks, global cosine loss with hard mining p 0.9 ramped over "
        "1000 iterations and factor 0.1, StableAdamW lr 2e-3 wd 1e-4, warm-up cosine to 2e-4, grad clip 0.1, "
        "10000 iterations at batch 16, resize 448 + centre crop 392, map = mean of the 2 groups' 1 - cos, "
        "score = top 1 % mean); needs DINOv2 weights (no download here: see the README); map blurred with the "
        "sigma-4 Gaussian at the crop's resolution (official: 5x5 kernel at 256 px); the 28 px border outside "
        "the crop extends the crop's edge; position embeddings resampled as the authors' encoder loader "
        "(+0.1 offset, no antialias) also for register models"
    )
    hparams = (
        Param("encoder", "str", "dinov2_vitb14_reg", "frozen DINOv2 encoder (tiny: a test-sized ViT, not a "
              "detector)", choices=ENCODERS),
        Param("weights", "str", None, "encoder weights file or folder; none = looked up offline (see "
              "'defectscope backbones')", optional=True, path=True),
        Param("pretrained", "bool", True, "false: random encoder weights, nothing looked up (timing and tests "
              "only)"),
        Param("crop_size", "int", 392, "centre crop the network sees after the resize to image_size (multiple "
              "of 14); none = the whole image", optional=True, ge=14),
        Param("iterations", "int", 10000, "optimiser steps (multi-class script 10000; one-class scripts 5000)",
              ge=1),
        Param("batch_size", "int", 16, "training batch size", ge=1),
        Param("lr", "float", 2e-3, "peak learning rate of StableAdamW", gt=0),
        Param("final_lr", "float", 2e-4, "learning rate at the end of the cosine schedule", ge=0),
        Param("warmup", "int", 100, "iterations of the linear warm-up from 0", ge=0),
        Param("weight_decay", "float", 1e-4, "decoupled weight decay", ge=0),
        Param("betas", "floats", (0.9, 0.999), "Adam betas", ge=0, lt=1, length=2),
        Param("eps", "float", 1e-10, "Adam epsilon (multi-class script 1e-10; one-class scripts 1e-8)", gt=0),
        Param("grad_clip", "float", 0.1, "maximum gradient norm", gt=0),
        Param("dropout", "float", 0.2, "dropout of the noisy bottleneck", ge=0, lt=1),
        Param("hm_p", "float", 0.9, "hard mining: final share of the easiest positions whose gradient is "
              "scaled down", ge=0, lt=1),
        Param("hm_factor", "float", 0.1, "hard mining: gradient factor of the easy positions", ge=0, le=1),
        Param("hm_ramp", "int", 1000, "hard mining: iterations over which the share rises from 0 to hm_p", ge=0),
        Param("max_ratio", "float", 0.01, "image score: mean of this top share of the map's pixels (0 = maximum)",
              ge=0, le=1),
    )
    overrides = {"image_size": 448}
    tags = Tags(settings={"one-class", "multi-class"}, trains=True, pixel_level=True, weights="dinov2",
                export="dynamic", input="rgb")
    # benchmarks/dinomaly_speed.py --interleaved --encoder base --batch 4 --steps 2 --threads 2 (random
    # ViT-B, the 392 px crop; 2026-12-02, 1-min load 0.3 -> 3.8 from other jobs, so an upper bound):
    # 5.4 s per image at batch 1, 24.6 s per batch-4 step, x4 for the default batch 16 (230 GFLOP per
    # image forward, 422 GFLOP per image for a training step: torch.utils.flop_counter).
    cost = Cost(predict=5.4, steps=(("iterations", 98.0),),
                measured="benchmarks/dinomaly_speed.py --interleaved, random ViT-B, 392 px, 2 threads, "
                         "lightly loaded machine, 2026-12-02 (step: batch 4 x 4)")
    smoke = {"encoder": "tiny", "pretrained": False, "image_size": 56, "crop_size": None, "iterations": 3,
             "batch_size": 4}

    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        p = self.params
        patch = self._spec().patch_size
        side = p["crop_size"] if p["crop_size"] is not None else p["image_size"]
        if p["crop_size"] is not None and p["crop_size"] > p["image_size"]:
            raise ParamError(f"{self.name}: crop_size={p['crop_size']} is larger than image_size={p['image_size']}; "
                             "use crop_size <= image_size, or none for no crop")
        if side % patch:
            what = "crop_size" if p["crop_size"] is not None else "image_size (no crop)"
            raise ParamError(f"{self.name}: {what}={side} is not a multiple of the ViT's patch size {patch}; "
                             f"use e.g. {max(1, round(side / patch)) * patch}")

    # -- weights -----------------------------------------------------------------------------------
    def _spec(self) -> ViTSpec:
        return TINY_ENCODER if self.params["encoder"] == "tiny" else get_vit_spec(self.params["encoder"])

    def weights_available(self) -> tuple[bool, str]:
        if not self.params["pretrained"]:
            return True, "random encoder weights (pretrained=false)"
        spec = self._spec()
        try:
            found = find_vit_weights(spec, self.params["weights"])
        except DefectscopeError as e:
            return False, str(e)
        if found is not None:
            return True, f"{spec.name} weights found ({found})"
        first = spec.hub_files[0]
        return False, f"{spec.name} weights missing: {first.filename} in {hub_target_dir(first.repo)}"

    def check_weights(self) -> None:
        if self.params["pretrained"]:
            try:
                resolve_vit_weights_source(self._spec(), self.params["weights"])
            except WeightsNotFoundError as e:
                raise WeightsNotFoundError(f"{self.name}: {e}") from None

    # -- networks ----------------------------------------------------------------------------------
    def _build(self, pretrained: bool = True) -> None:
        p = self.params
        spec = self._spec()
        blocks = [f"blocks.{i}" for i in TARGET_BLOCKS]
        if pretrained and p["pretrained"]:
            try:
                self.encoder = create_vit(spec, blocks, weights=p["weights"])
            except WeightsNotFoundError as e:
                raise WeightsNotFoundError(f"{self.name}: {e}") from None
        else:  # random weights asked for, or a saved model being loaded (every tensor from the file)
            self.encoder = create_vit(spec, blocks, pretrained=False)
        # The authors' encoder loader builds every DINOv2 (registers too) with Meta's +0.1 offset
        # and no antialiasing when the position embeddings are resampled.
        self.encoder.network.interp_offset, self.encoder.network.interp_antialias = 0.1, False
        dim = spec.embed_dim
        self.bottleneck = NoisyBottleneck(dim, p["dropout"])
        self.decoder = nn.ModuleList(DecoderBlock(dim, spec.num_heads) for _ in range(DECODER_DEPTH))
        init_trainable(self.bottleneck)
        init_trainable(self.decoder)

    def _crop(self, images: torch.Tensor) -> torch.Tensor:
        c = self.params["crop_size"]
        if c is None:
            return images
        h, w = images.shape[-2:]
        top, left = int(round((h - c) / 2.0)), int(round((w - c) / 2.0))
        return images[..., top:top + c, left:left + c]

    def forward_features(self, images: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Images ``[B, C, s, s]`` in [0, 1] (already cropped; ``s`` a multiple of 14) -> the fused
        encoder and decoder groups, each ``[B, D, s/14, s/14]``."""
        enc = self.encoder
        x = images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images
        x = (x - enc.mean) / enc.std
        h, w = x.shape[-2] // enc.patch_size, x.shape[-1] // enc.patch_size
        with torch.no_grad():
            taps = enc.network.forward_taps(x, set(TARGET_BLOCKS))
        en_list = [taps[i] for i in TARGET_BLOCKS]  # [B, 1 + R + h w, D] each
        y = self.bottleneck(torch.stack(en_list, dim=1).mean(dim=1))
        de_list = []
        for block in self.decoder:
            y = block(y)
            de_list.append(y)
        de_list = de_list[::-1]
        first = 1 + enc.num_registers

        def grid(group: list[torch.Tensor]) -> torch.Tensor:
            fused = torch.stack(group, dim=1).mean(dim=1)[:, first:]  # [B, h w, D]
            return fused.transpose(1, 2).reshape(fused.shape[0], fused.shape[2], h, w)

        en = [grid([en_list[i] for i in g]) for g in GROUPS]
        de = [grid([de_list[i] for i in g]) for g in GROUPS]
        return en, de

    # -- fit / predict -----------------------------------------------------------------------------
    def make_optimizer(self) -> StableAdamW:
        """The official optimiser over the bottleneck and decoder (StableAdamW, AMSGrad)."""
        p = self.params
        return StableAdamW(self.trainable_parameters(), lr=p["lr"], betas=p["betas"], eps=p["eps"],
                           weight_decay=p["weight_decay"], amsgrad=True)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return list(self.bottleneck.parameters()) + list(self.decoder.parameters())

    def train_step(self, batch: torch.Tensor, it: int, optimizer: torch.optim.Optimizer) -> float:
        """One official training iteration on ``batch`` (``[b, C, S, S]`` at the input size, on the
        model's device): the iteration's learning rate and hard-mining share, the loss, backward,
        gradient clipping, the optimiser step. Returns the loss."""
        p = self.params
        lr = warm_cosine_lr(it, p["lr"], p["final_lr"], p["iterations"], p["warmup"])
        for group in optimizer.param_groups:
            group["lr"] = lr
        share = min(p["hm_p"] * it / p["hm_ramp"], p["hm_p"]) if p["hm_ramp"] else p["hm_p"]
        self.bottleneck.train()
        self.decoder.train()
        en, de = self.forward_features(self._crop(batch))
        loss = hard_mining_cosine_loss(en, de, share, p["hm_factor"])
        if not torch.isfinite(loss):
            raise FloatingPointError(f"{self.name}: loss became {loss.item()} at iteration {it}")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(self.trainable_parameters(), max_norm=p["grad_clip"])
        optimizer.step()
        return loss.item()

    def _fit(self, dataset, val_dataset=None) -> None:
        p = self.params
        gen = seed_everything(p["seed"])
        device = auto_device(p["device"])
        self.to(device)
        images = load_images(dataset)
        opt = self.make_optimizer()

        def stream() -> Iterator[torch.Tensor]:
            while True:  # shuffled whole batches, epoch after epoch (the official drop_last loader)
                yield from batches(images, p["batch_size"], shuffle=True, generator=gen, drop_last=True)

        losses: list[float] = []
        bar = progress(range(p["iterations"]), desc=f"fit {self.name}", unit="step")
        for it, batch in zip(bar, stream()):
            losses.append(self.train_step(batch.to(device, non_blocking=True), it, opt))
            if it % 10 == 0:
                bar.set_postfix({"loss": f"{losses[-1]:.4g}"})
        self.history = {"loss": losses}

    def _predict(self, images: torch.Tensor) -> Prediction:
        x = self._crop(images)
        en, de = self.forward_features(x)
        amap = group_distance_maps(en, de, x.shape[-1])
        sigma = float(self.params["blur_sigma"])
        if sigma > 0:
            amap = gaussian_blur(amap, sigma)
        score = top_ratio_score(amap, self.params["max_ratio"])
        if x.shape[-2:] != images.shape[-2:]:  # the border outside the crop: the crop's edge extended
            h, w = images.shape[-2:]
            top, left = int(round((h - x.shape[-2]) / 2.0)), int(round((w - x.shape[-1]) / 2.0))
            pad = (left, w - x.shape[-1] - left, top, h - x.shape[-2] - top)
            amap = F.pad(amap.unsqueeze(1), pad, mode="replicate").squeeze(1)
        return Prediction(score=score, anomaly_map=amap)
