"""FastFlow: Yu, Zheng, Liu, Zhang, Zhu, Zhao, Wu, "FastFlow: Unsupervised Anomaly Detection and
Localization via 2D Normalizing Flows", arXiv:2111.07677 (2021).

A frozen ImageNet backbone gives feature maps at three scales (ResNet18 ``layer1``/``layer2``/
``layer3``, strides 4/8/16, in the paper's CNN setting); each map is layer-normalised (a trainable
``LayerNorm`` over ``[C, h, w]``, as the official code and anomalib) and goes through its own 2-D
normalizing flow ``f_l`` of ``flow_steps`` (8) steps. A step is an affine coupling block
(:class:`~defectscope.ops.flows.AllInOneBlock`: FrEIA's block, clamp 2, SOFTPLUS global affine,
hard channel permutation) whose subnet is ``conv k x k -> ReLU -> conv k x k`` with
``hidden = int(C_in * hidden_ratio)`` channels, ``k`` alternating 3, 1, 3, 1... (all 3 with
``conv3x3_only``) -- Sec. 3.3, Fig. 2.

Training (Sec. 3.2, eq. 1-2): maximum likelihood of the features under the flow, ``z = f(x)``,
``p_X(x) = p_Z(z) |det dz/dx|`` with ``p_Z = N(0, I)``; the loss of a batch is, summed over the
scales and averaged over the images,

    L = sum_l mean_b [ 1/2 ||z_l||^2 - log |det J_l| ]

(the negative log-likelihood of the whole feature map, up to its constant). Adam, lr 1e-3, weight
decay 1e-5, batch 32, 500 epochs (Sec. 4.2); no early stopping in the paper (``patience`` with a
held-out set of normal training images is available, off by default).

Inference (Sec. 3.2, "the anomaly score is the probability of the features"; the official code
and anomalib): per scale, ``p_l = exp(-1/2 mean_c z_l^2)`` at each position; the map is the mean
over the scales of ``-p_l`` upsampled bilinearly to the input size; the image score is the
maximum of the map.

Deviations:

* backbone: the paper's ResNet18 / Wide-ResNet50 / CaiT / DeiT have no ImageNet weights offline
  here; the default is EfficientNet-Lite0 at the ResNet18 strides 4/8/16 (``blocks.1``/``blocks.2``/
  ``blocks.4``; ``backbone=resnet18`` builds the paper's CNN variant given its weights file).
  The CaiT/DeiT variants (one stride-16 feature, 20 steps, ``hidden_ratio`` 0.16) are not offered.
* the frozen backbone's features of the training images are computed once for the whole training
  instead of at every step (the same values: no augmentation; see ``flow/_common.py``), by a
  BatchNorm-folded ``channels_last`` copy of the backbone (exact up to float rounding; also at
  inference).
"""

from __future__ import annotations

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
from ._common import TrainingFeatures

__all__ = ["Fastflow", "fastflow_subnet", "fastflow_flow", "fastflow_loss", "fastflow_map"]


def fastflow_subnet(kernel_size: int, hidden_ratio: float):
    """The coupling subnet constructor of FastFlow: ``conv k -> ReLU -> conv k`` ("same" padding)."""

    def make(c_in: int, c_out: int) -> nn.Module:
        hidden = max(1, int(c_in * hidden_ratio))
        return nn.Sequential(nn.Conv2d(c_in, hidden, kernel_size, padding=kernel_size // 2), nn.ReLU(),
                             nn.Conv2d(hidden, c_out, kernel_size, padding=kernel_size // 2))

    return make


def fastflow_flow(channels: int, flow_steps: int, conv3x3_only: bool = False, hidden_ratio: float = 1.0,
                  clamp: float = 2.0) -> SequenceFlow:
    """One scale's 2-D flow: ``flow_steps`` AllInOneBlocks, subnet kernels 3, 1, 3, 1... (Fig. 2)."""
    return SequenceFlow([
        AllInOneBlock(channels, fastflow_subnet(1 if (i % 2 == 1 and not conv3x3_only) else 3, hidden_ratio),
                      affine_clamping=clamp, permute_soft=False)
        for i in range(flow_steps)
    ])


def fastflow_loss(zs: list[torch.Tensor], log_dets: list[torch.Tensor]) -> torch.Tensor:
    """``sum_l mean_b (1/2 ||z_l||^2 - log |det J_l|)``: the negative log-likelihood of the
    feature maps (eq. 1-2) without its constant."""
    return sum((0.5 * z.pow(2).flatten(1).sum(dim=1) - ld).mean() for z, ld in zip(zs, log_dets))


def fastflow_map(zs: list[torch.Tensor], size: int) -> torch.Tensor:
    """Mean over scales of ``-exp(-1/2 mean_c z^2)`` upsampled to ``size``: ``[B, size, size]``."""
    maps = [F.interpolate(-torch.exp(-0.5 * z.pow(2).mean(dim=1, keepdim=True)), size=(size, size),
                          mode="bilinear", align_corners=False) for z in zs]
    return torch.stack(maps, dim=0).mean(dim=0).squeeze(1)


@register
class Fastflow(BackboneModel):
    """FastFlow (Yu et al., 2021): a 2-D normalizing flow per scale on layer-normalised features."""

    name = "fastflow"
    paradigm = "flow"
    description = "FastFlow (2021): 2-D normalizing flows on layer-normalised backbone features"
    paper = "Yu et al., arXiv:2111.07677, 2021"
    notes = (
        "paper defaults (stride-4/8/16 features, trainable LayerNorm, 8 AllInOneBlock steps per scale with "
        "alternating 3x3/1x1 conv subnets, hidden ratio 1, clamp 2; NLL loss; Adam lr 1e-3, wd 1e-5, batch 32, "
        "500 epochs; map = mean over scales of -exp(-mean z^2 / 2) upsampled, max score); backbone "
        "EfficientNet-Lite0 instead of ResNet18 (no CaiT/DeiT variant); map not blurred (the paper; "
        "`blur_sigma` adds the library's Gaussian); training features computed once; backbone run as a "
        "BatchNorm-folded `channels_last` copy"
    )
    hparams = (
        Param("flow_steps", "int", 8, "coupling blocks per scale (Sec. 4.2: 8 for ResNet18)", ge=1),
        Param("conv3x3_only", "bool", False, "all subnets 3x3 (true) or alternating 3x3 / 1x1 (false, the paper's "
              "ResNet setting)"),
        Param("hidden_ratio", "float", 1.0, "subnet hidden channels / input channels (1.0 for ResNet18)", gt=0),
        Param("clamp", "float", 2.0, "soft clamp of the coupling's log-scale (FrEIA's AllInOneBlock default)", gt=0),
        Param("epochs", "int", 500, "training epochs (Sec. 4.2)", ge=1),
        Param("batch_size", "int", 32, "training batch size (Sec. 4.2)", ge=1),
        Param("lr", "float", 1e-3, "Adam learning rate (Sec. 4.2)", gt=0),
        Param("weight_decay", "float", 1e-5, "Adam weight decay (Sec. 4.2)", ge=0),
        Param("patience", "int", None, "early stopping after this many epochs without a lower loss on held-out normal "
              "training images (needs a validation set); none = no early stopping (the paper)", optional=True, ge=1),
    )
    tags = Tags(settings={"one-class", "multi-class", "few-shot", "blind"}, trains=True, pixel_level=True,
                weights="backbone", export="dynamic", input="rgb")
    cost = Cost(predict=0.0207, fit=0.0135, epoch=0.0192, passes="epochs",  # benchmarks/costs.py
                measured="benchmarks/costs.py, synthetic:washer 256 px, 2026-12-02, the benchmark alone on the machine")
    overrides = {"blur_sigma": 0.0}  # the paper does not smooth the map
    smoke = {"image_size": 64, "epochs": 1, "batch_size": 4, "flow_steps": 2}

    # -- construction ---------------------------------------------------------------------------------
    def _feature_shapes(self) -> list[tuple[int, int, int]]:
        with torch.no_grad():
            feats = self.backbone(torch.zeros(1, self.channels, self.image_size, self.image_size))
        return [tuple(f.shape[1:]) for f in feats.values()]

    def _build(self, pretrained: bool = True) -> None:
        p = self.params
        self.build_backbone(pretrained)
        self._cache = InferenceCache()  # the frozen backbone, BatchNorm folded, channels_last
        shapes = self._feature_shapes()
        self.norms = nn.ModuleList([nn.LayerNorm(list(s), elementwise_affine=True) for s in shapes])
        self.flows = nn.ModuleList([
            fastflow_flow(s[0], p["flow_steps"], p["conv3x3_only"], p["hidden_ratio"], p["clamp"]) for s in shapes
        ])

    # -- the model ---------------------------------------------------------------------------------------
    def _raw_features(self, images: torch.Tensor) -> list[torch.Tensor]:
        """The frozen backbone's features (its BatchNorm-folded ``channels_last`` copy: the same
        values up to float rounding), as contiguous NCHW tensors."""
        with torch.no_grad():
            return [f.contiguous() for f in self._cache.get("backbone", self.backbone)(images).values()]

    def _flow(self, feats: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        zs, lds = [], []
        for f, norm, flow in zip(feats, self.norms, self.flows):
            z, ld = flow(norm(f))
            zs.append(z)
            lds.append(ld)
        return zs, lds

    def _fit(self, dataset, val_dataset=None) -> None:
        p = self.params
        gen = seed_everything(p["seed"])
        device = auto_device(p["device"])
        self.to(device)
        images = load_images(dataset)
        val = load_images(val_dataset) if val_dataset is not None and len(val_dataset) else None
        feats = TrainingFeatures(self._raw_features, images, val, device=device, batch_size=p["batch_size"],
                                 desc=f"{self.name}: backbone features")
        del images, val  # only the features are needed from here on
        trainable = nn.ModuleList([self.norms, self.flows])
        opt = torch.optim.Adam(trainable.parameters(), lr=p["lr"], weight_decay=p["weight_decay"])
        self.history = train_loop(
            trainable, lambda idx: fastflow_loss(*self._flow(feats(idx))), feats.train_index, epochs=p["epochs"],
            optimizer=opt, batch_size=p["batch_size"], generator=gen, val_images=feats.held_out_index,
            patience=p["patience"], desc=f"fit {self.name}", device=device,
        )

    def _predict(self, images: torch.Tensor) -> Prediction:
        zs, _ = self._flow(self._raw_features(images))
        amap = gaussian_blur(fastflow_map(zs, self.image_size), self.params["blur_sigma"])
        return Prediction(score=amap.flatten(1).amax(dim=1), anomaly_map=amap)
