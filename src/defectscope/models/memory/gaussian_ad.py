"""Gaussian AD: Rippel, Mertens and Merhof, "Modeling the Distribution of Normal Data in
Pre-Trained Deep Features for Anomaly Detection", ICPR 2020 (arXiv 2005.14140).

Fit (Sec. III): every level l of an ImageNet network is globally average-pooled to a vector
x_l (one per image); per level, a multivariate Gaussian N(mu_l, Sigma_l) with mu_l the sample
mean and Sigma_l the Ledoit-Wolf shrinkage estimate (the paper's choice, Sec. III-B)

    Sigma_l = (1 - s) S_l + s tr(S_l)/D_l I,      S_l = 1/N sum_i (x_l^i - mu_l)(x_l^i - mu_l)^T,

with the shrinkage s estimated as Ledoit & Wolf (2004) (shared kernel
:func:`defectscope.ops.ledoit_wolf`, identical to scikit-learn's ``LedoitWolf``).
Predict (eq. 2-3): the anomaly score is the sum over the levels of the Mahalanobis distances

    s(x) = sum_l M_l(x_l),    M_l(x_l) = sqrt((x_l - mu_l)^T Sigma_l^-1 (x_l - mu_l)),

computed as ||L_l^-1 (x_l - mu_l)|| with Sigma_l = L_l L_l^T (shared kernels
:func:`defectscope.ops.cholesky_inverse_factor`, :func:`defectscope.ops.mahalanobis`).

Image-level only: the method scores whole images, so its ``tags.pixel_level`` is False and the
predictions carry no anomaly map (no pixel metrics are reported for it).

Defaults and deviations: the paper uses all nine levels of EfficientNet-B4 (stem, seven stages,
head) with ImageNet weights. EfficientNet-B4 weights are not available offline here; the default
backbone is EfficientNet-Lite0 (embedded weights) with all its tapped levels, the outputs of its
seven stages ``blocks.0`` .. ``blocks.6`` (its stem and head are not tapped). For a ResNet, all
four stages ``layer1`` .. ``layer4``. ``layers=`` selects others.
"""

from __future__ import annotations

import torch

from ...training import auto_device
from ...errors import DefectscopeError
from ...ops import cholesky_inverse_factor, ledoit_wolf, mahalanobis
from ._features import dataset_features, global_pool
from .._pretrained import BackboneModel
from ..base import Prediction, register
from ..cost import Cost
from ..params import Param, Tags


@register
class GaussianAD(BackboneModel):
    """Gaussian AD (Rippel et al., ICPR 2020): a Ledoit-Wolf Gaussian per level of globally
    pooled features; image score = sum of the Mahalanobis distances. Image-level only."""

    name = "gaussian_ad"
    paradigm = "memory"
    description = "Gaussian AD (ICPR 2020): Ledoit-Wolf Gaussian per level of pooled features, summed Mahalanobis"
    paper = "Rippel et al., ICPR 2020"
    notes = (
        "paper defaults (every level globally average-pooled, Ledoit-Wolf Gaussian per level, score = "
        "sum of Mahalanobis distances); EfficientNet-Lite0's seven stages instead of "
        "EfficientNet-B4's nine levels (stem and head not tapped); no anomaly map, no pixel metrics"
    )
    hparams = (
        Param("batch_size", "int", 16, "images per batch of feature extraction", ge=1),
    )
    # image-level only. Not few-shot: the fit needs at least 3 training images (with 2, the centred
    # samples are x and -x, the Ledoit-Wolf shrinkage is 0 and the covariance has rank 1: singular).
    # export: verified with deploy.export.export_model on a smoke fit (dynamic batch)
    tags = Tags(settings={"one-class", "multi-class", "blind"}, trains=False, pixel_level=False,
                weights="backbone", export="dynamic", input="rgb")
    cost = Cost(predict=0.0288, fit=0.0532,  # benchmarks/costs.py
                measured="benchmarks/costs.py, synthetic:washer 256 px, 2026-12-02, quiet machine")
    smoke = {"image_size": 32, "batch_size": 8}

    def paper_layers(self, spec) -> tuple[str, ...]:
        return tuple(info.name for info in spec.layers)  # every level of the network

    def _build(self, pretrained: bool = True) -> None:
        self.build_backbone(pretrained)
        for i, _ in enumerate(self.layers):
            self.register_buffer(f"mean{i}", torch.empty(0))
            self.register_buffer(f"factor{i}", torch.empty(0, 0))
        self.register_buffer("shrinkage", torch.empty(len(self.layers), dtype=torch.float64))

    def pooled(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The globally average-pooled features of every level, ``([B, C_l], ...)``."""
        feats = self.backbone(images)
        return tuple(global_pool(feats[layer]) for layer in self.layers)

    def _fit(self, dataset, val_dataset=None) -> None:
        if len(dataset) < 3:  # with 2 the Ledoit-Wolf shrinkage is 0 and the covariance singular
            raise DefectscopeError(f"{self.name}: a Ledoit-Wolf Gaussian needs at least 3 training images, "
                                   f"got {len(dataset)}")
        self.to(auto_device(self.params["device"]))
        pooled = dataset_features(self.pooled, dataset, self.device, self.params["batch_size"],
                                  desc="gaussian_ad features")
        for i, x in enumerate(pooled):
            mean, cov, s = ledoit_wolf(x.double())
            setattr(self, f"mean{i}", mean.float())
            setattr(self, f"factor{i}", cholesky_inverse_factor(cov).float().contiguous())
            self.shrinkage[i] = s

    def _predict(self, images: torch.Tensor) -> Prediction:
        score = torch.zeros(images.shape[0], device=images.device)
        for i, x in enumerate(self.pooled(images)):
            score += mahalanobis(x, getattr(self, f"mean{i}"), factor=getattr(self, f"factor{i}"))
        return Prediction(score=score, anomaly_map=None)
