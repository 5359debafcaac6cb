"""U-Flow: Tailanian, Pardo, Musé, "U-Flow: A U-shaped Normalizing Flow for Anomaly Detection with
Unsupervised Threshold", arXiv:2211.12353 (2022), J. Math. Imaging Vis. 66 (2024); the authors'
code (github.com/mtailanian/uflow) and anomalib's port fix what the paper leaves open. The paper's
method has four phases (features, U-shaped flow, anomaly map, a-contrario segmentation); the
equations are written out here.

**Features** (phase 1). A frozen multi-scale extractor, each scale normalised by a fixed layer
normalisation (the paper's MS-CaiT ends each CaiT with its pretrained, frozen norm; the CNN
variants of the authors' code and anomalib take ResNet ``layer1..3``, strides 4, 8 and 16, with a
``LayerNorm`` over each whole map ``[C, h, w]``).

**U-shaped flow** (phase 2). From the coarsest scale up: a stage of ``flow_steps``
Glow-style coupling blocks (FrEIA's ``AllInOneBlock``: affine coupling with soft clamp 2, global
affine, random hard permutation; :class:`defectscope.ops.flows.AllInOneBlock`) whose subnetwork is
conv-ReLU-conv with kernel 3 in even steps and 1 in odd ones and as many hidden channels as inputs;
its output is **split** along the channels: ``4 floor(C / 8)`` channels are **upsampled
invertibly** (depth to space, ``C/4`` channels at twice the side) and **concatenated** to the next
finer scale's features, the rest leave as that scale's latent ``z``; the finest stage's whole output
is the finest ``z``. Every operation is invertible, so the log-likelihood of the features is exact::

    log p(x) = sum_s log N(z_s; 0, I) + log |det J|          (change of variables)

and the loss is its negative, ``sum_s ||z_s||^2 / 2 - log |det J|`` per image, averaged over the
batch (the authors' ``step``).

**Anomaly map and score** (phase 3). Per scale the likelihood of each position, with the mean
instead of the sum over channels (the authors' ``get_probability``: every scale weighs the same),
``p_s = exp(-mean_c z_s^2 / 2)``, upsampled bilinearly to the input; the map is
``1 - mean_s p_s`` and the image score its maximum.

**A-contrario detection** (phase 4; arXiv:2211.12353 v1-2, the authors' ``nfa.py``, anomalib's
``compute_anomaly_mask``). Under the null hypothesis ``H0`` ("the image is normal") the flow's
latents are i.i.d. standard normal, so every entry's ``z^2`` is chi-square with 1 degree of
freedom. An entry is a *candidate* when ``z^2 >= tau``, ``tau`` the ``p``-quantile of chi2(1)
(``P_H0(candidate) = 1 - p``). At scale ``s``, for each position, count the candidates in the
``w_s x w_s`` window around it (``w_s = 2 max(floor(w / 2^(s+1)), 1) + 1``), over every channel,
and average over the ``C`` channels: ``k``. Under ``H0`` the count of one channel is binomial
``B(n, 1 - p)`` with ``n`` the window's entries (``w_s^2``, fewer where the window leaves the map),
and the probability of a count at least this large is the binomial tail
``P_s = P(B(n, 1 - p) >= k)``. The per-scale ``log10 P_s`` are
upsampled (bicubic) to the input and summed (the scales are independent under ``H0``), and::

    log10 NFA = log10(N_tests) + sum_s log10 P_s,      N_tests = sum_s h_s w_s (positions tested)

A region is detected when ``NFA < epsilon = 1``, i.e. ``log10 NFA < 0``: that is the *unsupervised*
threshold. The a-contrario guarantee (Desolneux, Moisan, Morel, as the paper states it): under
``H0`` the expected number of false detections among the ``N_tests`` tests is at most ``epsilon``
(``E_H0[#{tests : NFA < epsilon}] <= epsilon``), so at most one false detection per normal image
on average with ``epsilon = 1``. ``anomaly_map="nfa"`` makes the map ``-log10 NFA`` (detections
where it is ``> 0``) and the score its maximum; ``defectscope fit uflow --threshold nfa`` sets it
and calibrates both thresholds at 0 (:mod:`defectscope.deploy.threshold`). Computed with tensor
operations only (channel counts, average pools for the window sums, a lookup in a table of exact
binomial tails), so it runs on any device and exports to ONNX.

**Training** (the authors' ``configs/mvtec_default.yaml`` and ``train.py``): Adam, lr 1e-4,
weight decay 1e-5, the learning rate decreasing linearly to 0.4 of its value over the training,
batch 8, 200 epochs, early stopping with patience 20. The extractor is frozen and the normalisation
fixed, so the normalised features are computed once per fit and the flow trains on them.

Deviations:

* Backbone: MS-CaiT (CaiT-M48 at 448 px and CaiT-S24 at 224 px, strides 16 and 32) has no offline
  weights; the default is the authors' CNN variant (ResNet ``layer1..3``) on EfficientNet-Lite0's
  layers of the same strides, ``blocks.1``/``blocks.2``/``blocks.4`` (4, 8, 16; 24, 40, 112
  channels). The layer normalisation has no learnt affine by default: the authors' CNN variant and
  anomalib train one with the flow although its log-determinant is not in the loss (shrinking the
  features then lowers the loss without bound); the paper's MS-CaiT norm is frozen.
  ``norm_affine=true`` learns it as the CNN variant does.
* Input side 256 px (the project's protocol and the CNN variant's) instead of MS-CaiT's 448; it
  must be a multiple of the coarsest stride (16).
* Early stopping: the authors stop on the *test* set's pixel AUROC (patience 20); here the
  criterion is the loss on normal validation images held out from the training set (patience 20,
  only when a validation set is given; never the test set). The learning rate decays per epoch
  rather than per step.
* The NFA of the arXiv version (windows, binomial tail, the authors' ``nfa.py``) is the one
  implemented, with the authors' evaluation settings (window 5, ``p = 0.9``; anomalib's
  ``compute_anomaly_mask`` defaults to 7 and 0.5); the journal version's region tree (max-tree of
  the score, Chernoff bound, polyomino count of tests) is not. Two details differ from the
  authors' ``nfa.py`` and anomalib's ``binomial_test`` so that each test's probability is exact
  under ``H0`` and the guarantee holds test by test: (1) the tail is the a-contrario
  ``P(B >= k)``, where their ``scipy.stats.binom.logsf(k, n, 1 - p)`` is ``P(B > floor(k))``, one
  count too far when ``k`` is an integer (always with one channel) and ``-inf`` when every entry is
  a candidate; (2) windows are cut at the map's border (``n`` = the entries inside), where they
  reflect-pad, which counts border entries twice (heavier tails). Measured on pure-noise maps (one
  channel, 64 x 64, window 5, ``p = 0.9``, 100 maps): their statistic flags about 5 positions per
  map, ``P(B >= k)`` with reflect padding 1.4, this one fewer than 1 (as guaranteed). With tens of
  channels the channel average makes all three far below 1.
"""

from __future__ import annotations

import math
from functools import lru_cache
from statistics import NormalDist

import torch
import torch.nn.functional as F
from torch import nn

from ...backbones import get_spec
from ...ops.blur import gaussian_blur
from ...ops.flows import AllInOneBlock, Concat, SequenceFlow, Split, Unsqueeze
from ...training import auto_device, load_images, seed_everything, train_loop
from .._pretrained import BackboneModel
from ..base import Prediction, register
from ..cost import Cost
from ..params import Param, ParamError, Tags
from .._inference import InferenceCache, inference_backbone
from ._common import TrainingFeatures

__all__ = ["UFlow", "UFlowGraph", "uflow_loss", "likelihood_map", "binomial_log10_tail", "nfa_log10_prob",
           "log10_nfa", "nfa_half_window"]


# -- the flow ----------------------------------------------------------------------------------------
def _subnet(kernel: int, ratio: float):
    def build(c_in: int, c_out: int) -> nn.Module:
        mid = int(c_in * ratio)
        return nn.Sequential(nn.Conv2d(c_in, mid, kernel, padding=kernel // 2), nn.ReLU(),
                             nn.Conv2d(mid, c_out, kernel, padding=kernel // 2))
    return build


class UFlowGraph(nn.Module):
    """The U-shaped flow over feature maps ``[f_0 (finest), ..., f_{S-1} (coarsest)]`` with channels
    ``channels``, each scale half the side of the previous one.

    ``forward(features, rev=False) -> (zs, log_jac_det [B])`` with ``zs`` finest first; with
    ``rev=True`` it takes the ``zs`` and gives back the features (and ``-log_jac_det``).
    """

    def __init__(self, channels: list[int], flow_steps: int = 4, clamp: float = 2.0, ratio: float = 1.0,
                 permute_soft: bool = False, generator: torch.Generator | None = None) -> None:
        super().__init__()
        self.channels = list(channels)
        stages, splits, concats = [], [], []
        width = self.channels[-1]
        for i in reversed(range(len(self.channels))):
            stages.append(SequenceFlow([
                AllInOneBlock(width, _subnet(3 if step % 2 == 0 else 1, ratio), affine_clamping=clamp,
                              permute_soft=permute_soft, generator=generator)
                for step in range(flow_steps)]))
            if i == 0:
                break
            up = width // 8 * 4
            if up == 0:
                raise ValueError(f"U-Flow: a stage of {width} channels is too narrow to split and upsample "
                                 "(it needs at least 8)")
            splits.append(Split([up, width - up]))
            concats.append(Concat([self.channels[i - 1], up // 4]))
            width = self.channels[i - 1] + up // 4
        self.stages = nn.ModuleList(stages)  # coarsest first
        self.splits = nn.ModuleList(splits)
        self.concats = nn.ModuleList(concats)
        self.unsqueeze = Unsqueeze()

    @property
    def latent_channels(self) -> list[int]:
        """Channels of each latent ``z`` (finest first)."""
        out = [s.sections[1] for s in self.splits][::-1]
        last = self.concats[-1].sections if len(self.concats) else [self.channels[0]]
        return [sum(last)] + out

    def forward(self, x: list[torch.Tensor], c=None, rev: bool = False):  # noqa: D102
        return self._inverse(x) if rev else self._forward(x)

    def _forward(self, features: list[torch.Tensor]):
        n = len(self.stages)
        h = features[-1]
        logdet = h.new_zeros(h.shape[0])
        zs = []
        for k in range(n):
            h, ld = self.stages[k](h)
            logdet = logdet + ld
            if k == n - 1:
                break
            (up, z), _ = self.splits[k](h)
            zs.append(z)
            up, _ = self.unsqueeze(up)
            h, _ = self.concats[k]((features[n - 2 - k], up))
        zs.append(h)
        return zs[::-1], logdet

    def _inverse(self, zs: list[torch.Tensor]):
        n = len(self.stages)
        zs = list(zs)[::-1]  # coarsest first
        h = zs[-1]
        logdet = h.new_zeros(h.shape[0])
        features: list[torch.Tensor] = []
        for k in reversed(range(n)):
            if k < n - 1:
                (f, up), _ = self.concats[k](h, rev=True)
                features.append(f)
                up, _ = self.unsqueeze(up, rev=True)
                h, _ = self.splits[k]((up, zs[k]), rev=True)
            h, ld = self.stages[k](h, rev=True)
            logdet = logdet + ld
        features.append(h)  # the concatenations gave the finer scales first, the last stage's input is the coarsest
        return features, logdet


def uflow_loss(zs: list[torch.Tensor], logdet: torch.Tensor) -> torch.Tensor:
    """The negative log-likelihood (up to a constant), ``sum_s ||z_s||^2 / 2 - log|det J|`` per
    image, averaged over the batch."""
    return (sum(0.5 * z.pow(2).flatten(1).sum(1) for z in zs) - logdet).mean()


def likelihood_map(zs: list[torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
    """``1 - mean_s up(exp(-mean_c z_s^2 / 2))``: ``[B, H, W]`` (the paper's anomaly map)."""
    probs = [F.interpolate(torch.exp(-0.5 * z.pow(2).mean(1, keepdim=True)), size=size, mode="bilinear",
                           align_corners=False) for z in zs]
    return 1.0 - torch.stack(probs).mean(0)[:, 0]


# -- the a-contrario NFA -----------------------------------------------------------------------------
@lru_cache(maxsize=64)
def binomial_log10_tail(n: int, q: float) -> tuple[float, ...]:
    """``log10 P(X >= k)`` for ``X ~ B(n, q)`` and ``k = 0 .. n`` (exact, in double precision, by
    log-sum-exp of the probabilities; never ``-inf``: ``P(X >= n) = q^n``)."""
    if not 0.0 < q < 1.0:
        raise ValueError(f"binomial probability must be in (0, 1), got {q}")
    logq, log1q = math.log(q), math.log1p(-q)
    logpmf = [math.lgamma(n + 1) - math.lgamma(j + 1) - math.lgamma(n - j + 1) + j * logq + (n - j) * log1q
              for j in range(n + 1)]
    out = [0.0]  # P(X >= 0) = 1
    for k in range(1, n + 1):
        tail = logpmf[k:]
        top = max(tail)
        out.append(min(0.0, (top + math.log(sum(math.exp(v - top) for v in tail))) / math.log(10.0)))
    return tuple(out)


@lru_cache(maxsize=16)
def _tail_table(n: int, q: float) -> tuple[float, ...]:
    """Row ``m`` (``m = 0 .. n`` entries in the window), column ``k = 0 .. n``: ``log10 P(B(m, q) >= k)``,
    flattened; ``k > m`` (impossible) repeats ``P(B(m, q) >= m)`` so every entry is finite."""
    rows = [[0.0] * (n + 1)]
    for m in range(1, n + 1):
        tail = list(binomial_log10_tail(m, q))
        rows.append(tail + [tail[-1]] * (n - m))
    return tuple(v for row in rows for v in row)


def nfa_half_window(window: float, scale: int) -> int:
    """Half side of the counting window at ``scale`` (0 = finest): ``max(floor(w / 2^s // 2), 1)``."""
    return max(int((window / 2 ** scale) // 2), 1)


def nfa_log10_prob(z: torch.Tensor, half: int, p: float) -> torch.Tensor:
    """``log10 P_H0`` per position of one scale: ``[B, C, h, w] -> [B, 1, h, w]`` (see the module
    docstring): the binomial tail ``P(B(m, 1 - p) >= k)`` of the channel-averaged count ``k`` of
    candidates ``z^2 >= tau`` among the ``m`` entries of the ``(2 half + 1)^2`` window around each
    position that lie inside the map."""
    tau = NormalDist().inv_cdf((1.0 + p) / 2.0) ** 2  # the p-quantile of chi2(1)
    side = 2 * half + 1
    n = side * side
    cand = (z.pow(2) >= tau).to(z.dtype).sum(1, keepdim=True)  # candidates over channels, per position

    def window_sum(x: torch.Tensor) -> torch.Tensor:  # sums of integers: average pool x n, rounded, is exact
        return torch.round(F.avg_pool2d(x, side, stride=1, padding=half, count_include_pad=True) * n)

    total = window_sum(cand)
    inside = window_sum(torch.ones_like(cand[:1]))  # entries of each window inside the map
    k = torch.ceil(total / z.shape[1])  # P(B >= mean count) = P(B >= ceil(mean count)), exact
    table = torch.tensor(_tail_table(n, 1.0 - p), dtype=z.dtype, device=z.device)
    return table[(inside * (n + 1) + k).long()]


def log10_nfa(zs: list[torch.Tensor], size: tuple[int, int], window: float = 5, p: float = 0.9) -> torch.Tensor:
    """``log10 NFA`` ``[B, H, W]`` of the latents ``zs`` (finest first): ``log10(N_tests)`` plus the
    sum over scales of the per-scale ``log10 P_H0`` upsampled bicubically to ``size``."""
    n_tests = sum(int(z.shape[-2]) * int(z.shape[-1]) for z in zs)
    total = None
    for s, z in enumerate(zs):
        lp = F.interpolate(nfa_log10_prob(z, nfa_half_window(window, s), p), size=size, mode="bicubic",
                           align_corners=True)
        total = lp if total is None else total + lp
    return math.log10(n_tests) + total[:, 0]


# -- the method --------------------------------------------------------------------------------------
@register
class UFlow(BackboneModel):
    """U-Flow (Tailanian et al., 2022/2024): U-shaped normalizing flow with an a-contrario threshold."""

    name = "uflow"
    paradigm = "flow"
    description = "U-Flow (JMIV 2024): U-shaped normalizing flow; a-contrario NFA map and threshold log NFA < 0"
    paper = "Tailanian et al., JMIV 2024 (arXiv 2022)"
    notes = (
        "paper defaults (layer-normalised multi-scale features, U-shaped flow of 4 AllInOne steps per scale "
        "with kernels 3/1, clamp 2, split 4*floor(C/8) up by depth-to-space; NLL loss; map 1 - mean of the "
        "per-scale likelihoods, max score; a-contrario -log10 NFA map, window 5, p 0.9, threshold log NFA < 0 "
        "with `--threshold nfa`; Adam lr 1e-4, wd 1e-5, linear decay to 0.4, batch 8, 200 epochs); NFA tail "
        "P(B >= k) on windows cut at the border (exact under the null; the authors' code: P(B > floor k), "
        "reflect padding); "
        "EfficientNet-Lite0 at strides 4/8/16 (the CNN variant) instead of MS-CaiT; fixed layer norm "
        "(`norm_affine=true`: the CNN variant's learnt affine); early "
        "stopping (patience 20) on normal validation images, not the test set; 256 px; likelihood map not "
        "blurred (the paper; `blur_sigma` blurs it, never the NFA map); backbone run as a BatchNorm-folded "
        "`channels_last` copy"
    )
    hparams = (
        Param("epochs", "int", 200, "training epochs (the authors' default config)", ge=1),
        Param("batch_size", "int", 8, "training batch size", ge=1),
        Param("lr", "float", 1e-4, "Adam learning rate, decreased linearly to 0.4 of it over the training "
              "(anomalib: 1e-3)", gt=0),
        Param("weight_decay", "float", 1e-5, "Adam weight decay", ge=0),
        Param("flow_steps", "int", 4, "coupling blocks per scale", ge=1),
        Param("affine_clamp", "float", 2.0, "soft clamping of the affine log-scales", gt=0),
        Param("subnet_ratio", "float", 1.0, "hidden channels of the coupling subnetworks / their inputs", gt=0),
        Param("permute_soft", "bool", False, "random rotations instead of hard channel permutations"),
        Param("norm_affine", "bool", False, "learn a per-position affine of each scale's layer norm with the flow "
              "(the authors' CNN variant and anomalib); false = fixed norm (the paper's MS-CaiT)"),
        Param("patience", "int", 20, "early stopping after this many epochs without a lower validation loss "
              "(needs a validation set of normal images); none = never", optional=True, ge=1),
        Param("anomaly_map", "str", "likelihood", "the map (and score = its max): 1 - likelihood (the paper's "
              "anomaly map) or -log10 NFA (a-contrario; detections where > 0)", choices=("likelihood", "nfa")),
        Param("nfa_window", "int", 5, "a-contrario: side of the counting window at the finest scale (halved "
              "per scale, at least 3)", ge=1),
        Param("nfa_p", "float", 0.9, "a-contrario: an entry is a candidate when z^2 is above the p-quantile of "
              "chi2(1)", gt=0, lt=1),
    )
    tags = Tags(settings={"one-class", "multi-class", "few-shot", "blind"}, trains=True, pixel_level=True,
                weights="backbone", export="dynamic", input="rgb")
    cost = Cost(predict=0.0158, fit=0.0128, epoch=0.0125, passes="epochs",  # benchmarks/costs.py
                measured="benchmarks/costs.py, synthetic:washer 256 px, 2026-12-02, the benchmark alone on the machine")
    overrides = {"blur_sigma": 0.0}  # the paper does not smooth the map
    smoke = {"image_size": 64, "epochs": 1, "batch_size": 4}
    #: The parameter value that makes the anomaly map (and score) ``-log10 NFA``: what
    #: ``defectscope.deploy.threshold`` needs for the a-contrario threshold (``--threshold nfa``).
    log_nfa_map = ("anomaly_map", "nfa")

    def __init__(self, **params) -> None:
        super().__init__(**params)
        spec = get_spec(self.params["backbone"])
        strides = sorted(spec.layer(layer).stride for layer in self.layers)
        if any(b != 2 * a for a, b in zip(strides, strides[1:])):
            raise ParamError(f"{self.name}: layers={','.join(self.layers)} have strides {strides}; U-Flow merges "
                             "neighbouring scales by a 2x invertible upsampling, so each layer's stride must be "
                             "twice the previous one (e.g. strides 4, 8, 16)")
        side = self.params["image_size"]
        if side % strides[-1]:
            raise ParamError(f"{self.name}: image_size={side} must be a multiple of the coarsest stride "
                             f"({strides[-1]}), so that each scale is exactly half the previous one; use e.g. "
                             f"{max(strides[-1], side // strides[-1] * strides[-1])}")

    def _ordered_layers(self) -> list[str]:
        return sorted(self.layers, key=lambda layer: self.backbone.strides[layer])

    def _build(self, pretrained: bool = True) -> None:
        self.build_backbone(pretrained)
        self._cache = InferenceCache()  # the frozen backbone, BatchNorm folded, channels_last
        p = self.params
        channels = [self.backbone.channels[layer] for layer in self._ordered_layers()]
        self.norms = None
        if p["norm_affine"]:
            sides = [p["image_size"] // self.backbone.strides[layer] for layer in self._ordered_layers()]
            self.norms = nn.ModuleList([nn.LayerNorm([c, s, s]) for c, s in zip(channels, sides)])
        self.flow = UFlowGraph(channels, p["flow_steps"], p["affine_clamp"], p["subnet_ratio"], p["permute_soft"])

    # -- features ---------------------------------------------------------------------------------
    def raw_features(self, images: torch.Tensor) -> list[torch.Tensor]:
        """The frozen backbone's maps, finest first (its BatchNorm-folded ``channels_last`` copy: the
        same values up to float rounding), as contiguous NCHW tensors."""
        maps = inference_backbone(self._cache, self.backbone)(images)
        return [maps[layer].contiguous() for layer in self._ordered_layers()]

    def normalise(self, maps: list[torch.Tensor]) -> list[torch.Tensor]:
        """Each map layer-normalised over its ``[C, h, w]`` (with the learnt affine when
        ``norm_affine``)."""
        if self.norms is not None:
            return [norm(m) for norm, m in zip(self.norms, maps)]
        return [F.layer_norm(m, m.shape[1:]) for m in maps]

    def features(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Layer-normalised features, finest first: what the flow reads."""
        return self.normalise(self.raw_features(images))

    # -- fit / predict ----------------------------------------------------------------------------
    def _fit(self, dataset, val_dataset=None) -> None:
        p = self.params
        gen = seed_everything(p["seed"])
        device = auto_device(p["device"])
        self.to(device)
        val = load_images(val_dataset) if val_dataset is not None and len(val_dataset) else None
        feats = TrainingFeatures(self.raw_features, load_images(dataset), val, device=device,
                                 batch_size=p["batch_size"], desc=f"{self.name}: backbone features")
        trainable = nn.ModuleList([self.flow] + ([self.norms] if self.norms is not None else []))
        opt = torch.optim.Adam(trainable.parameters(), lr=p["lr"], weight_decay=p["weight_decay"])
        sched = torch.optim.lr_scheduler.LinearLR(opt, start_factor=1.0, end_factor=0.4, total_iters=p["epochs"])
        self.history = train_loop(
            trainable, lambda idx: uflow_loss(*self.flow(self.normalise(feats(idx)))), feats.train_index,
            epochs=p["epochs"],
            optimizer=opt, batch_size=p["batch_size"], generator=gen, val_images=feats.held_out_index,
            patience=p["patience"] if val is not None else None, scheduler=sched,
            desc=f"fit {self.name}", device=device,
        )

    def latents(self, images: torch.Tensor) -> list[torch.Tensor]:
        """The flow's latents ``z_s`` of ``images`` (finest first)."""
        zs, _ = self.flow(self.features(images))
        return zs

    def _predict(self, images: torch.Tensor) -> Prediction:
        zs = self.latents(images)
        size = (self.image_size, self.image_size)
        p = self.params
        if p["anomaly_map"] == "nfa":
            amap = -log10_nfa(zs, size, p["nfa_window"], p["nfa_p"])
        else:
            amap = gaussian_blur(likelihood_map(zs, size), p["blur_sigma"])
        return Prediction(score=amap.flatten(1).amax(dim=1), anomaly_map=amap)
