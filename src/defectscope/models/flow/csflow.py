"""CS-Flow: Rudolph, Wehrbein, Rosenhahn, Wandt, "Fully Convolutional Cross-Scale-Flows for
Image-based Defect Detection", WACV 2022 (arXiv:2110.02855); the authors' code
(github.com/marco-rudolph/cs-flow) fixes what the paper leaves open. (Section references are to the
paper's method section, Sec. 3; the equations are written out here.)

**Features** (Sec. 3, Fig. 1). The image at three resolutions, ``H x W``, ``H/2 x W/2`` and
``H/4 x W/4`` (nearest-neighbour resizing, as the authors' code), goes through the same frozen ImageNet
extractor; the paper takes the stride-32 output of EfficientNet-B5's sixth stage (block 36 of 39,
304 channels: ``features.6.8`` in torchvision's numbering), so the three maps are ``H/32``,
``H/64`` and ``H/128`` a side with the same channels ``C``.

**Cross-scale flow** (Sec. 3, Fig. 2-3). ``f_CS`` maps the three feature maps ``y^(s)`` to three
latent maps ``z^(s)`` of the same shapes with ``L = 4`` coupling blocks; each block is a fixed
random channel permutation followed by a GLOW-style affine coupling applied to the three scales
in parallel (for the two halves ``y_1, y_2`` of the channels)::

    y_out,1 = y_in,1 * exp(s_2(y_in,2)) + t_2(y_in,2)        (first half, from the second)
    y_out,2 = y_in,2 * exp(s_1(y_out,1)) + t_1(y_out,1)      (second half, from the new first)

where each subnetwork ``(s, t)`` is a **cross-convolution** (Fig. 3, :class:`CrossConvolutions`):
per scale a ``k x k`` convolution to 1024 hidden channels and a leaky ReLU (slope 0.1), then a
``k x k`` convolution to the outputs, plus the neighbouring scales' hidden maps, upsampled
bilinearly (x2) then convolved, or convolved with stride 2; the sum is multiplied by a learnt
per-scale ``gamma`` initialised at 0 (so every block starts as the identity). Kernel size 3 in the
first three blocks and 5 in the last (the authors' ``kernel_sizes``). The scales ``s`` are softly
clamped, ``s <- (2 alpha / pi) atan(s / alpha)`` with ``alpha = 3`` (
:func:`defectscope.ops.flows.atan_clamp`, with the authors' ``0.636`` for ``2 / pi``), so
``log |det J| = sum of the clamped s`` over every scale, position and channel.

**Loss**: the negative log-likelihood under a standard normal, per image
``||z||^2 / 2 - log |det J|`` over the concatenation of the three scales, averaged over the batch
and divided by the dimension ``D`` of ``z`` (the authors' ``get_loss``). anomalib 2.7.0 differs:
its coupling layer sums the log-determinants over the batch, and its loss subtracts that sum from
every image's term (a log-determinant weighted by the batch size). At 20 epochs on the synthetic set
that term is worth 2-6 points of image AUROC (``benchmarks/csflow_loss.py``, README); this class
keeps the paper's.

**Score and map**. Image score: ``||z||^2 / (2 D)``, the mean of ``z^2 / 2`` over every
entry of the three scales (the authors' score). Map: the per-position ``||z^(1)_ij||^2`` of the
largest scale (mean over channels), upsampled bilinearly to the input (the authors'
``evaluate.py``); ``map_mode="product"`` is anomalib's default instead (the product over the three
scales of the upsampled per-position means).

**Training** (the paper's experiments section and the authors' ``config.py``): Adam, lr 2e-4,
eps 1e-4, weight decay 1e-5, gradients clipped to norm 1, batch 16, 240 epochs (4 meta-epochs x
60), no early stopping
(``patience`` with a validation set is available but off). The extractor is frozen and the input
fixed (no augmentation), so its features are computed once per fit and the flow trains on them
(the authors' ``pre_extracted = True``): the same result as re-extracting every epoch, far cheaper.

Deviations:

* Backbone: EfficientNet-B5 has no offline weights here; the default is EfficientNet-Lite0, and the
  layer tapped is its first stride-32 stage, ``blocks.5`` (192 channels), the counterpart of B5's
  ``features.6`` (the first stride-32 stage, 304 channels); on a ResNet, ``layer4``.
* Input side 256 px (the project's protocol, as anomalib's benchmark) instead of the paper's 768;
  ``image_size`` must be a multiple of 128 (as the authors' code asserts), so the three maps halve
  exactly (8, 4 and 2 px a side at 256). Set ``image_size=768`` for the paper's.
* The authors' clamp of the output ``z`` to ``+-1e6`` is dropped (it only breaks the exact inverse
  at absurd values).
* anomalib 2.7 subtracts the log-determinant summed over the whole *batch* from each image's
  ``||z||^2 / 2``; the authors' code and this module use each image's own.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ...errors import DefectscopeError
from ...ops.blur import gaussian_blur
from ...ops.flows import atan_clamp, random_permutation
from ...training import auto_device, load_images, seed_everything, train_loop
from .._pretrained import BackboneModel
from ..base import Prediction, register
from ..cost import Cost
from ..params import Param, ParamError, Tags
from .._inference import InferenceCache, inference_backbone
from ._common import TrainingFeatures

__all__ = ["CsFlow", "CrossConvolutions", "CrossScaleCoupling", "ParallelPermute", "CrossScaleFlow",
           "csflow_loss", "csflow_score", "csflow_map"]

N_SCALES = 3


def _resize_to(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Bilinear resampling of ``x`` to the spatial size of ``like`` (x2 between neighbouring scales)."""
    return F.interpolate(x, size=like.shape[-2:], mode="bilinear", align_corners=False)


class CrossConvolutions(nn.Module):
    """The subnetwork of a cross-scale coupling (Fig. 3): three scales in, three scales out.

    ``forward(x0, x1, x2)`` with ``x_s`` ``[B, in_channels, h_s, w_s]`` (``h_{s+1} = h_s / 2``)
    returns ``[B, out_channels, h_s, w_s]`` per scale::

        a_s   = leaky_relu(conv_s0(x_s))                           k x k, to `hidden` channels
        out_0 = conv_01(a_0) + up_10(upsample(a_1))
        out_1 = conv_11(a_1) + down_01(a_0) + up_21(upsample(a_2))
        out_2 = conv_21(a_2) + down_12(a_1)                        down: k x k, stride 2
        out_s = gamma_s * out_s                                    gamma_s learnt, initialised at 0
    """

    def __init__(self, in_channels: int, out_channels: int, hidden: int = 1024, kernel_size: int = 3,
                 leaky_slope: float = 0.1) -> None:
        super().__init__()
        pad = kernel_size // 2

        def conv(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
            return nn.Conv2d(cin, cout, kernel_size, stride=stride, padding=pad)

        self.leaky_slope = leaky_slope
        self.conv_in = nn.ModuleList([conv(in_channels, hidden) for _ in range(N_SCALES)])
        self.conv_out = nn.ModuleList([conv(hidden, out_channels) for _ in range(N_SCALES)])
        self.up = nn.ModuleList([conv(hidden, out_channels) for _ in range(N_SCALES - 1)])  # from s+1 to s
        self.down = nn.ModuleList([conv(hidden, out_channels, 2) for _ in range(N_SCALES - 1)])  # from s to s+1
        self.gamma = nn.Parameter(torch.zeros(N_SCALES))

    def forward(self, x0: torch.Tensor, x1: torch.Tensor, x2: torch.Tensor):  # noqa: D102
        a = [F.leaky_relu(conv(x), self.leaky_slope) for conv, x in zip(self.conv_in, (x0, x1, x2))]
        out = [conv(h) for conv, h in zip(self.conv_out, a)]
        for s in range(N_SCALES - 1):
            out[s] = out[s] + self.up[s](_resize_to(a[s + 1], a[s]))
            out[s + 1] = out[s + 1] + self.down[s](a[s])
        return [o * self.gamma[s] for s, o in enumerate(out)]


class ParallelPermute(nn.Module):
    """A fixed random permutation of the channels, the same at every scale (log-det 0)."""

    def __init__(self, channels: int, generator: torch.Generator | None = None) -> None:
        super().__init__()
        perm = random_permutation(channels, generator)
        self.register_buffer("perm", perm)
        self.register_buffer("inverse", torch.argsort(perm))

    def forward(self, xs: list[torch.Tensor], c=None, rev: bool = False):  # noqa: D102
        index = self.inverse if rev else self.perm
        out = [x.index_select(1, index) for x in xs]
        return out, xs[0].new_zeros(xs[0].shape[0])


class CrossScaleCoupling(nn.Module):
    """One cross-scale affine coupling on three scales at once, exactly invertible.

    ``forward(xs, rev=False) -> (ys, log_jac_det)``: ``xs`` three maps ``[B, C, h_s, w_s]``;
    ``log_jac_det`` ``[B]`` is the sum over scales, channels and positions of the clamped
    log-scales (``-`` that when ``rev``).
    """

    def __init__(self, channels: int, hidden: int = 1024, kernel_size: int = 3, clamp: float = 3.0) -> None:
        super().__init__()
        self.len1 = channels // 2
        self.len2 = channels - self.len1
        self.clamp = float(clamp)
        self.net1 = CrossConvolutions(self.len1, 2 * self.len2, hidden, kernel_size)  # first half -> second
        self.net2 = CrossConvolutions(self.len2, 2 * self.len1, hidden, kernel_size)  # second half -> first

    def _st(self, net: CrossConvolutions, xs: list[torch.Tensor], n: int):
        out = net(*xs)
        return [atan_clamp(o[:, :n], self.clamp) for o in out], [o[:, n:] for o in out]

    def forward(self, xs: list[torch.Tensor], c=None, rev: bool = False):  # noqa: D102
        a = [x[:, :self.len1] for x in xs]
        b = [x[:, self.len1:] for x in xs]
        if not rev:  # the first half from the second, then the second from the new first (the authors' order)
            s2, t2 = self._st(self.net2, b, self.len1)
            a = [ai * torch.exp(si) + ti for ai, si, ti in zip(a, s2, t2)]
            s1, t1 = self._st(self.net1, a, self.len2)
            b = [bi * torch.exp(si) + ti for bi, si, ti in zip(b, s1, t1)]
            sign = 1.0
        else:
            s1, t1 = self._st(self.net1, a, self.len2)
            b = [(bi - ti) * torch.exp(-si) for bi, si, ti in zip(b, s1, t1)]
            s2, t2 = self._st(self.net2, b, self.len1)
            a = [(ai - ti) * torch.exp(-si) for ai, si, ti in zip(a, s2, t2)]
            sign = -1.0
        logdet = sum(s.flatten(1).sum(1) for s in s1 + s2)
        return [torch.cat([ai, bi], dim=1) for ai, bi in zip(a, b)], sign * logdet


class CrossScaleFlow(nn.Module):
    """``f_CS``: ``blocks`` x (permutation, cross-scale coupling); kernel 3, and 5 in the last block.

    ``forward(xs, rev=False) -> (zs, log_jac_det [B])``.
    """

    def __init__(self, channels: int, blocks: int = 4, hidden: int = 1024, clamp: float = 3.0,
                 generator: torch.Generator | None = None) -> None:
        super().__init__()
        kernels = [3] * (blocks - 1) + [5]
        layers: list[nn.Module] = []
        for k in kernels:
            layers += [ParallelPermute(channels, generator), CrossScaleCoupling(channels, hidden, k, clamp)]
        self.layers = nn.ModuleList(layers)

    def forward(self, xs: list[torch.Tensor], c=None, rev: bool = False):  # noqa: D102
        logdet = xs[0].new_zeros(xs[0].shape[0])
        for layer in (reversed(self.layers) if rev else self.layers):
            xs, ld = layer(xs, rev=rev)
            logdet = logdet + ld
        return xs, logdet


def _flat(zs: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([z.flatten(1) for z in zs], dim=1)


def csflow_loss(zs: list[torch.Tensor], logdet: torch.Tensor) -> torch.Tensor:
    """The NLL per image, ``||z||^2 / 2 - log|det J|``, averaged over the batch, divided by ``D``."""
    z = _flat(zs)
    return (0.5 * z.pow(2).sum(1) - logdet).mean() / z.shape[1]


def csflow_score(zs: list[torch.Tensor]) -> torch.Tensor:
    """Image score ``[B]``: the mean of ``z^2 / 2`` over every entry of the three scales."""
    return 0.5 * _flat(zs).pow(2).mean(1)


def csflow_map(zs: list[torch.Tensor], size: int, mode: str = "largest") -> torch.Tensor:
    """``[B, size, size]``: the per-position mean of ``z^2`` over channels, upsampled bilinearly;
    of the largest scale (``"largest"``, the authors') or multiplied over the scales (``"product"``)."""
    def up(z: torch.Tensor) -> torch.Tensor:
        return F.interpolate(z.pow(2).mean(1, keepdim=True), size=(size, size), mode="bilinear",
                             align_corners=False)[:, 0]

    if mode == "largest":
        return up(zs[0])
    out = up(zs[0])
    for z in zs[1:]:
        out = out * up(z)
    return out


class _ClippedAdam(torch.optim.Adam):
    """Adam whose ``step`` first clips the gradients' global norm (the authors' ``max_grad_norm``).

    It runs PyTorch's *fused* Adam kernel: the same update, one pass over each parameter. The flow
    has 174 M parameters, and the default multi-tensor path allocates a temporary the size of all
    of them for each of its elementwise steps: 0.58 s of a 2.15 s training step at batch 16 on 2
    cores, against 0.10 s of 1.69 s fused (``benchmarks/train_step.py csflow-adam``)."""

    def __init__(self, params, max_norm: float, **kwargs) -> None:
        params = list(params)
        super().__init__(params, fused=True, **kwargs)
        self.max_norm = max_norm

    def step(self, closure=None):  # noqa: D102
        if self.max_norm > 0:
            torch.nn.utils.clip_grad_norm_([p for g in self.param_groups for p in g["params"]], self.max_norm)
        return super().step(closure)


@register
class CsFlow(BackboneModel):
    """CS-Flow (Rudolph et al., WACV 2022): a fully convolutional cross-scale normalizing flow."""

    name = "csflow"
    paradigm = "flow"
    description = "CS-Flow (WACV 2022): cross-scale normalizing flow on a 3-scale feature pyramid"
    paper = "Rudolph et al., WACV 2022"
    notes = (
        "paper defaults (image at 3 resolutions through one frozen extractor at stride 32, 4 cross-scale "
        "coupling blocks with cross-convolutions of 1024 hidden channels, kernels 3,3,3,5, leaky ReLU 0.1, "
        "soft clamp 3, NLL; Adam lr 2e-4, eps 1e-4, wd 1e-5, gradient norm 1, batch 16, 240 epochs; "
        "score = mean z^2/2, map = per-position z^2 of the largest scale); EfficientNet-Lite0 blocks.5 "
        "(stride 32) instead of EfficientNet-B5 features.6; 256 px (paper 768; multiple of 128); features "
        "extracted once per fit; map not blurred (the paper; `blur_sigma` adds the library's Gaussian); "
        "extractor run as a BatchNorm-folded `channels_last` copy; fused Adam"
    )
    hparams = (
        Param("epochs", "int", 240, "training epochs (the authors' 4 meta-epochs x 60)", ge=1),
        Param("batch_size", "int", 16, "training batch size", ge=1),
        Param("lr", "float", 2e-4, "Adam learning rate", gt=0),
        Param("weight_decay", "float", 1e-5, "Adam weight decay", ge=0),
        Param("grad_clip", "float", 1.0, "clip the gradients' global norm to this (0 = no clipping)", ge=0),
        Param("coupling_blocks", "int", 4, "cross-scale coupling blocks (kernel 3, and 5 in the last)", ge=1),
        Param("hidden_channels", "int", 1024, "hidden channels of the cross-convolutions", ge=1),
        Param("clamp", "float", 3.0, "soft clamping alpha of the affine log-scales", gt=0),
        Param("map_mode", "str", "largest", "anomaly map: z^2 of the largest scale (the authors') or the product "
              "over the three scales (anomalib's default)", choices=("largest", "product")),
        Param("patience", "int", None, "early stopping after this many epochs without a lower validation loss "
              "(needs a validation set); none = no early stopping (the paper)", optional=True, ge=1),
    )
    tags = Tags(settings={"one-class", "multi-class", "few-shot", "blind"}, trains=True, pixel_level=True,
                weights="backbone", export="dynamic", input="rgb")
    cost = Cost(predict=0.111, fit=0.104, epoch=0.0854, passes="epochs",  # benchmarks/costs.py
                measured="benchmarks/costs.py, synthetic:washer 256 px, 2026-12-02, the benchmark alone on the machine")
    overrides = {"blur_sigma": 0.0}  # the paper does not smooth the map
    smoke = {"image_size": 128, "epochs": 1, "batch_size": 4, "hidden_channels": 8, "coupling_blocks": 2}

    def __init__(self, **params) -> None:
        super().__init__(**params)
        side = self.params["image_size"]
        if side % 128:
            raise ParamError(f"{self.name}: image_size={side} must be a multiple of 128 (the three scales, at "
                             f"stride 32 of the image, its half and its quarter, must halve exactly); use e.g. "
                             f"{max(128, side // 128 * 128)}")
        if len(self.layers) != 1:  # (the default layer is found here too: a backbone without one fails now)
            raise ParamError(f"{self.name}: layers={','.join(self.layers)}: CS-Flow taps one layer (the same at "
                             "three input resolutions); give one layer name")

    def paper_layers(self, spec) -> tuple[str, ...]:
        """The first stride-32 layer (EfficientNet-B5's ``features.6`` in the paper)."""
        for layer in spec.layers:
            if layer.stride == 32:
                return (layer.name,)
        raise DefectscopeError(f"{self.name}: backbone {spec.name!r} has no stride-32 layer; use a CNN backbone "
                               "(see 'defectscope backbones')")

    def _build(self, pretrained: bool = True) -> None:
        self.build_backbone(pretrained)
        self._cache = InferenceCache()  # the frozen extractor, BatchNorm folded, channels_last
        p = self.params
        channels = self.backbone.channels[self.layers[0]]
        self.flow = CrossScaleFlow(channels, p["coupling_blocks"], p["hidden_channels"], p["clamp"])

    # -- features ---------------------------------------------------------------------------------
    def features(self, images: torch.Tensor) -> list[torch.Tensor]:
        """The extractor's maps of the image at full, half and quarter size (nearest resizing). The
        frozen extractor runs as its BatchNorm-folded ``channels_last`` copy (the same values up to
        float rounding)."""
        layer = self.layers[0]
        h, w = images.shape[-2:]
        extractor = inference_backbone(self._cache, self.backbone)
        out = []
        for s in range(N_SCALES):
            x = images if s == 0 else F.interpolate(images, size=(h // 2 ** s, w // 2 ** s), mode="nearest")
            out.append(extractor(x)[layer].contiguous())
        return out

    # -- fit / predict ----------------------------------------------------------------------------
    def _fit(self, dataset, val_dataset=None) -> None:
        p = self.params
        gen = seed_everything(p["seed"])
        device = auto_device(p["device"])
        self.to(device)
        val = load_images(val_dataset) if val_dataset is not None and len(val_dataset) else None
        feats = TrainingFeatures(self.features, load_images(dataset), val, device=device,
                                 batch_size=p["batch_size"], desc=f"{self.name}: backbone features")
        opt = _ClippedAdam(self.flow.parameters(), p["grad_clip"], lr=p["lr"], eps=1e-4,
                           weight_decay=p["weight_decay"])
        self.history = train_loop(
            self.flow, lambda idx: csflow_loss(*self.flow(feats(idx))), feats.train_index, epochs=p["epochs"],
            optimizer=opt, batch_size=p["batch_size"], generator=gen, val_images=feats.held_out_index,
            patience=p["patience"], desc=f"fit {self.name}", device=device,
        )

    def _predict(self, images: torch.Tensor) -> Prediction:
        zs, _ = self.flow(self.features(images))
        amap = gaussian_blur(csflow_map(zs, self.image_size, self.params["map_mode"]), self.params["blur_sigma"])
        return Prediction(score=csflow_score(zs), anomaly_map=amap)
