"""CFLOW-AD: Gudovskiy, Ishizaka, Kozuka, "CFLOW-AD: Real-Time Unsupervised Anomaly Detection with
Localization via Conditional Normalizing Flows", WACV 2022 (arXiv:2107.12571).

Encoder: a frozen ImageNet CNN; its feature maps at ``K = 3`` pooling layers (Wide-ResNet50
``layer2``/``layer3``/``layer4``, strides 8/16/32, in the paper). Each position ``(i, j)`` of layer
``k`` gives a feature vector ("fiber") ``z^k_ij`` of ``C_k`` dimensions and a condition vector
``c_ij``: the 2-D sinusoidal positional encoding of ``(i, j)`` (Sec. 4.2, ``D = 128`` dimensions:
the first half encodes the column ``j``, the second the row ``i``, sin / cos at frequencies
``10000^(-2n/(D/2))``).

Decoder ``g_k`` per layer (Sec. 4.2-4.3, Fig. 3): a conditional normalizing flow of 8 coupling
blocks (:class:`~defectscope.ops.flows.AllInOneBlock`, FrEIA's block, as the official code:
SOFTPLUS global affine, hard permutation, soft clamp ``alpha = 1.9`` of the log-scale, eq. 2),
whose subnets ``Linear(d, 2d) -> ReLU -> Linear(2d, d_out)`` see the passive half of the fiber
concatenated with ``c_ij``. With ``u = g_k^-1(z, c)`` (the direction computed here),

    log p(z | c) = -C/2 log(2 pi) - 1/2 ||u||^2 + log |det J|                (eq. 6-7)

and training maximises it per dimension: the official code minimises
``-logsigmoid(log p(z | c) / C)`` averaged over a "fiber batch" of ``N = 256`` fibers drawn at
random (Sec. 4.3: the fibers of all positions and images are shuffled; one optimiser step per
fiber batch). Adam, lr 2e-4, 25 meta-epochs of 8 sub-epochs (200 passes over the training fibers),
warm-up over the first 2 meta-epochs from lr/10 and cosine decay to lr 1e-3 (official code,
``config.py`` / ``main.py``); batch of 32 images.

Inference (Sec. 4.3, eq. 8; official ``train.py``): the per-dimension log-likelihood of every
position, ``l^k_ij = log p(z^k_ij | c_ij) / C_k``; normalised to probabilities
``p^k = exp(l^k - max l^k)``, upsampled bilinearly (``align_corners=True``) to the input size and
summed over the layers, ``S = sum_k p^k``; the anomaly map is ``max S - S`` and the image score its
maximum.

Deviations:

* normalisation constants: the official code takes ``max l^k`` over the whole *test* set and
  ``max S`` over the test maps; anomalib over the current batch; both make a prediction depend on
  the other images predicted with it. Here ``max l^k`` is the maximum over the *training*
  positions, computed once at the end of the fit (a buffer saved with the model), and ``max S`` is
  replaced by its bound ``K``: the map is ``sum_k (1 - exp(l^k - max_train l^k))``, an image's
  prediction depends on that image only, and the ranking of positions within a batch is the
  official one up to those constants (so are AUROC and AUPRO over a set with the same constants).
* training: the decoders have disjoint parameters (one Adam, with its gradients set to None
  between steps, updates each decoder only from its own fiber batches), so they are trained one
  after the other, each on the shuffled fibers of all training images per epoch; the official code
  interleaves the layers and shuffles the fibers within each batch of 32 images. The learning-rate
  schedule is evaluated per epoch (``t = epoch / epochs``: linear warm-up over the first 2/25, then
  ``eta + (1 - eta)(1 + cos(pi t))/2``, ``eta = 1e-3``) instead of per meta-epoch and per
  iteration. ``lr_schedule=constant`` is anomalib's (which also uses lr 1e-4 and fiber batch 64).
* backbone: Wide-ResNet50 has no ImageNet weights offline here; the default is EfficientNet-Lite0
  at the same strides 8/16/32 (``blocks.2``/``blocks.4``/``blocks.6``).
* the frozen encoder's features of the training images are computed once for the whole training
  (the same values, no augmentation), by a BatchNorm-folded ``channels_last`` copy of the encoder
  (exact up to float rounding; also at inference).
* model selection: the official code keeps the epoch with the best *test* pixel AUROC; here the
  last epoch, or with ``patience`` early stopping on held-out normal training images.

Speed (same arithmetic): at inference all positions of a batch go through each decoder at once
(anomalib: fiber batches of 64), and the condition's share of each subnet's first layer, which
does not depend on the image, is computed once per position and kept (:class:`CflowSubnet`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ...ops.blur import gaussian_blur
from ...ops.flows import AllInOneBlock, SequenceFlow
from ...training import auto_device, load_images, seed_everything, train_loop
from .._pretrained import BackboneModel
from ..base import Prediction, register
from .._inference import InferenceCache
from ..cost import Cost
from ..params import Param, Tags
from ._common import TrainingFeatures, layers_at_strides

__all__ = ["Cflow", "CflowSubnet", "positional_encoding_2d", "cflow_decoder", "cflow_log_prob", "cflow_lr_factor"]

_LOG_SQRT_2PI = 0.5 * math.log(2.0 * math.pi)


def positional_encoding_2d(dims: int, height: int, width: int) -> torch.Tensor:
    """The 2-D sinusoidal positional encoding ``[dims, height, width]`` of CFLOW-AD (official
    ``positionalencoding2d``): channels ``0..dims/2`` encode the column, ``dims/2..dims`` the row;
    within each half, channel ``2n`` is ``sin(pos * w_n)`` and ``2n + 1`` is ``cos(pos * w_n)``,
    ``w_n = 10000^(-2n / (dims/2))``."""
    if dims % 4:
        raise ValueError(f"the positional encoding needs dims divisible by 4, got {dims}")
    half = dims // 2
    freq = torch.exp(torch.arange(0, half, 2, dtype=torch.float64) * (-math.log(10000.0) / half))  # [half/2]
    cols = torch.arange(width, dtype=torch.float64)[:, None] * freq  # [W, half/2]
    rows = torch.arange(height, dtype=torch.float64)[:, None] * freq  # [H, half/2]
    col_code = torch.stack([cols.sin(), cols.cos()], dim=-1).reshape(width, half).t()  # [half, W], sin/cos interleaved
    row_code = torch.stack([rows.sin(), rows.cos()], dim=-1).reshape(height, half).t()  # [half, H]
    out = torch.cat([col_code[:, None, :].expand(half, height, width), row_code[:, :, None].expand(half, height, width)])
    return out.float()


class CflowSubnet(nn.Module):
    """The coupling subnet of the official decoder, ``Linear(d, 2d) -> ReLU -> Linear(2d, c_out)``
    on ``[x, c]`` (``d = x_dims + cond_dims``), called by the block as ``subnet(x, c)``
    (``takes_condition``).

    In training ``c`` is ``[n, P]``, one condition per row of ``x`` ``[n, x_dims]``. In eval mode
    ``c`` may be ``[m, P]`` with ``n = k m``: row ``i`` of ``x`` has the condition ``c[i mod m]`` (k
    images of the same ``m`` positions); the condition's part of the first layer, ``W_c c + b``, is
    then computed once per position instead of once per row -- and, outside autograd and export,
    kept between calls until the weights or ``c`` change -- and added to ``W_x x``: the same sum, a
    third of the first layer's work at the first CFLOW layer (``x_dims = 20``, ``P = 128``)."""

    takes_condition = True

    def __init__(self, c_in: int, c_out: int, x_dims: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(c_in, 2 * c_in)
        self.fc2 = nn.Linear(2 * c_in, c_out)
        self.x_dims = int(x_dims)
        self._cache: tuple | None = None

    def _projection(self, c: torch.Tensor) -> torch.Tensor:
        w, b = self.fc1.weight, self.fc1.bias
        if torch.is_grad_enabled() or torch.compiler.is_compiling():
            return F.linear(c, w[:, self.x_dims:], b)
        key = (c.data_ptr(), c._version, tuple(c.shape), c.dtype, w.data_ptr(), w._version, b._version)
        if self._cache is None or self._cache[0] != key:
            self._cache = (key, F.linear(c, w[:, self.x_dims:], b))
        return self._cache[1]

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        if self.training:
            h = self.fc1(torch.cat([x, c], dim=1))
        else:
            m = c.shape[0]
            h = (F.linear(x, self.fc1.weight[:, : self.x_dims]).unflatten(0, (-1, m)) + self._projection(c)).flatten(0, 1)
        return self.fc2(torch.relu(h))


def cflow_decoder(channels: int, condition_dims: int = 128, coupling_blocks: int = 8, clamp: float = 1.9,
                  permute_soft: bool = False) -> SequenceFlow:
    """One layer's conditional flow: ``coupling_blocks`` AllInOneBlocks conditioned on the
    positional encoding (official ``freia_cflow_head``)."""
    x_dims = channels - channels // 2

    def subnet(c_in: int, c_out: int) -> nn.Module:
        return CflowSubnet(c_in, c_out, x_dims)

    return SequenceFlow([
        AllInOneBlock(channels, subnet, cond_channels=condition_dims, affine_clamping=clamp,
                      global_affine_type="SOFTPLUS", permute_soft=permute_soft)
        for _ in range(coupling_blocks)
    ])


def cflow_log_prob(decoder: SequenceFlow, fibers: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
    """``log p(z | c) / C`` of each fiber ``[n, C]`` (eq. 6-7 per dimension): ``[n]``. ``cond`` is
    ``[n, P]``, or in eval mode ``[m, P]`` for ``n = k m`` fibers of k images at the same m
    positions (see :class:`CflowSubnet`)."""
    u, log_det = decoder(fibers, cond)
    c = fibers.shape[1]
    return (-c * _LOG_SQRT_2PI - 0.5 * u.pow(2).sum(dim=1) + log_det) / c


def cflow_lr_factor(epoch: int, epochs: int, warm: float = 2 / 25, decay: float = 1e-3) -> float:
    """The official schedule as a factor of lr at the start of ``epoch`` (0-based) of ``epochs``:
    linear warm-up from 0.1 over the first ``warm`` of the training to the cosine value there,
    then ``decay + (1 - decay)(1 + cos(pi t))/2`` with ``t = epoch / epochs``."""
    t = epoch / max(epochs, 1)
    cosine = lambda u: decay + (1 - decay) * (1 + math.cos(math.pi * u)) / 2  # noqa: E731
    if t < warm:
        return 0.1 + (cosine(warm) - 0.1) * t / warm
    return cosine(t)


def _fibers(feature: torch.Tensor) -> torch.Tensor:
    """``[B, C, h, w] -> [B h w, C]`` (row-major positions)."""
    return feature.permute(0, 2, 3, 1).reshape(-1, feature.shape[1])


@register
class Cflow(BackboneModel):
    """CFLOW-AD (Gudovskiy et al., WACV 2022): conditional normalizing flows on feature fibers."""

    name = "cflow"
    paradigm = "flow"
    description = "CFLOW-AD (WACV 2022): position-conditioned normalizing flows on multi-scale feature vectors"
    paper = "Gudovskiy et al., WACV 2022"
    notes = (
        "paper/official-code defaults (3 layers at strides 8/16/32, 128-d 2-D positional encoding as condition, "
        "8 AllInOneBlocks per layer, clamp 1.9, fiber batch 256, -logsigmoid of the per-dimension log-likelihood; "
        "Adam lr 2e-4, 200 epochs with warm-up and cosine decay; map = sum over layers of upsampled normalised "
        "likelihoods, inverted, max score); backbone EfficientNet-Lite0 instead of Wide-ResNet50; likelihoods "
        "normalised by the training maximum instead of the test set's / the batch's (predictions independent "
        "of the batch); decoders trained one after the other on all fibers; schedule per epoch; map not "
        "blurred (the paper; `blur_sigma` adds the library's Gaussian); training features computed once; "
        "encoder run as a BatchNorm-folded `channels_last` copy"
    )
    hparams = (
        Param("coupling_blocks", "int", 8, "coupling blocks per decoder (Sec. 5.1)", ge=1),
        Param("condition_dims", "int", 128, "dimensions of the positional-encoding condition (Sec. 5.1; a multiple "
              "of 4)", ge=4),
        Param("clamp", "float", 1.9, "soft clamp alpha of the coupling's log-scale (eq. 2; official code)", gt=0),
        Param("permute_soft", "bool", False, "random rotations instead of channel permutations between blocks"),
        Param("fiber_batch", "int", 256, "fibers per optimiser step, N (official code; anomalib: 64)", ge=1),
        Param("epochs", "int", 200, "passes over the training fibers (official: 25 meta-epochs x 8 sub-epochs)", ge=1),
        Param("lr", "float", 2e-4, "Adam learning rate (official code; anomalib: 1e-4)", gt=0),
        Param("lr_schedule", "str", "cosine-warmup", "learning-rate schedule: the official warm-up + cosine decay, "
              "or constant (anomalib)", choices=("cosine-warmup", "constant")),
        Param("patience", "int", None, "early stopping after this many epochs without a lower loss on held-out normal "
              "training images (needs a validation set); none = no early stopping", optional=True, ge=1),
    )
    tags = Tags(settings={"one-class", "multi-class", "few-shot", "blind"}, trains=True, pixel_level=True,
                weights="backbone", export="dynamic", input="rgb")
    cost = Cost(predict=0.023, fit=0.019, epoch=0.0572, passes="epochs",  # benchmarks/costs.py
                measured="benchmarks/costs.py, synthetic:washer 256 px, 2026-12-02, the benchmark alone on the machine")
    overrides = {"blur_sigma": 0.0}  # the paper does not smooth the map
    smoke = {"image_size": 64, "epochs": 1, "coupling_blocks": 2, "fiber_batch": 64, "condition_dims": 16}

    def paper_layers(self, spec) -> tuple[str, ...]:
        """The stride-8/16/32 layers (Wide-ResNet50 ``layer2``/``layer3``/``layer4``)."""
        return layers_at_strides(spec, (8, 16, 32))

    # -- construction -----------------------------------------------------------------------------------
    def _build(self, pretrained: bool = True) -> None:
        p = self.params
        if p["condition_dims"] % 4:
            raise ValueError(f"{self.name}: condition_dims={p['condition_dims']} must be a multiple of 4")
        self.build_backbone(pretrained)
        self._cache = InferenceCache()  # the frozen encoder, BatchNorm folded, channels_last
        with torch.no_grad():
            feats = self.backbone(torch.zeros(1, self.channels, self.image_size, self.image_size))
        shapes = [tuple(f.shape[1:]) for f in feats.values()]
        self.decoders = nn.ModuleList([
            cflow_decoder(c, p["condition_dims"], p["coupling_blocks"], p["clamp"], p["permute_soft"])
            for c, _, _ in shapes
        ])
        for k, (_, h, w) in enumerate(shapes):
            pe = positional_encoding_2d(p["condition_dims"], h, w)
            self.register_buffer(f"pos{k}", _fibers(pe.unsqueeze(0)), persistent=False)  # [h w, D]
        #: max over the training positions of the per-dimension log-likelihood, per layer
        self.register_buffer("logp_max", torch.zeros(len(shapes)))
        self._shapes = shapes

    def _positions(self, k: int) -> torch.Tensor:
        return getattr(self, f"pos{k}")

    # -- the model ----------------------------------------------------------------------------------------
    def _layer_log_prob(self, k: int, feat: torch.Tensor) -> torch.Tensor:
        """Per-dimension log-likelihood of every position of layer ``k``'s features ``[B, C, h, w]``
        (decoder in eval mode): ``[B, h, w]``."""
        b, _, h, w = feat.shape
        return cflow_log_prob(self.decoders[k], _fibers(feat), self._positions(k)).reshape(b, h, w)

    def _encode(self, images: torch.Tensor) -> list[torch.Tensor]:
        """The frozen encoder's features (its BatchNorm-folded ``channels_last`` copy: the same
        values up to float rounding)."""
        with torch.no_grad():
            return list(self._cache.get("encoder", self.backbone)(images).values())

    def _log_prob_maps(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Per-dimension log-likelihood of every position, per layer: ``[B, h_k, w_k]``."""
        return [self._layer_log_prob(k, feat) for k, feat in enumerate(self._encode(images))]

    def _fit(self, dataset, val_dataset=None) -> None:
        p = self.params
        gen = seed_everything(p["seed"])
        device = auto_device(p["device"])
        self.to(device)
        images = load_images(dataset)
        val = load_images(val_dataset) if val_dataset is not None and len(val_dataset) else None
        feats = TrainingFeatures(self._encode, images, val, device=device,
                                 batch_size=32, budget=None, desc=f"{self.name}: encoder features")
        del images, val  # only the features are needed from here on
        n_train = feats.n_train
        self.history = {}
        maxima = []
        for k, decoder in enumerate(self.decoders):
            fibers = _fibers(feats.store[k])  # [N h w, C]: training images first, then the held-out ones
            pos = self._positions(k)
            hw = pos.shape[0]
            n_fit = n_train * hw

            def loss_fn(idx, fibers=fibers, pos=pos, hw=hw, decoder=decoder):
                logp = cflow_log_prob(decoder, fibers[idx], pos[idx % hw])
                return -F.logsigmoid(logp).mean()

            opt = torch.optim.Adam(decoder.parameters(), lr=p["lr"])
            sched = None
            if p["lr_schedule"] == "cosine-warmup":
                sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda e: cflow_lr_factor(e, p["epochs"]))
            held = torch.arange(n_fit, fibers.shape[0]) if fibers.shape[0] > n_fit else None
            self.history[self.layers[k]] = train_loop(
                decoder, loss_fn, torch.arange(n_fit), epochs=p["epochs"], optimizer=opt,
                batch_size=p["fiber_batch"], generator=gen, val_images=held, patience=p["patience"],
                scheduler=sched, desc=f"fit {self.name} {self.layers[k]}", device=device,
            )
            decoder.eval()
            with torch.no_grad():  # the normalisation constant: max over the training positions
                maxima.append(max(self._layer_log_prob(k, feats.store[k][s:s + 64]).max().item()
                                  for s in range(0, n_train, 64)))
        self.logp_max.copy_(torch.tensor(maxima))

    def _predict(self, images: torch.Tensor) -> Prediction:
        size = self.image_size
        amap = torch.zeros(images.shape[0], size, size, device=images.device)
        for k, logp in enumerate(self._log_prob_maps(images)):
            prob = torch.exp(logp - self.logp_max[k]).unsqueeze(1)
            amap = amap + (1.0 - F.interpolate(prob, size=(size, size), mode="bilinear", align_corners=True).squeeze(1))
        amap = gaussian_blur(amap, self.params["blur_sigma"])
        return Prediction(score=amap.flatten(1).amax(dim=1), anomaly_map=amap)
