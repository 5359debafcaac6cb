"""DFKDE: deep feature kernel density estimation, as anomalib's ``Dfkde`` (Intel OpenVINO
anomalib; no separate paper).

Fit:
  1. every training image is described by the globally average-pooled features of the deepest
     layer of an ImageNet network (anomalib: ResNet18 ``layer4``, 512 dimensions);
  2. at most ``max_training_points`` = 40000 of them are kept, drawn at random (seeded);
  3. PCA to ``n_pca_components`` = 16 dimensions, z = V_16^T (x - mu) (shared kernel
     :func:`defectscope.ops.fit_pca`);
  4. feature scaling (anomalib's ``feature_scaling_method``): ``"scale"`` (default) divides every
     z by the largest training norm max_i ||z_i|| (kept for prediction), ``"norm"`` scales each z
     to unit length;
  5. a Gaussian KDE of the scaled training points, kernel covariance H = h^2 Cov(z) with Scott's
     rule h = N^(-1/(d+4)) (default; ``bandwidth="silverman"``: h = (N (d+2)/4)^(-1/(d+4)), or a
     number) (shared kernel :func:`defectscope.ops.fit_gaussian_kde`, identical to
     ``scipy.stats.gaussian_kde``).
Predict: score = -log p(z) with p(z) = 1/N sum_i N(z; z_i, H), the KDE density of the scaled
projection of the image's pooled features (higher = more anomalous).

Image-level only: :attr:`pixel_level` is False and the predictions carry no anomaly map.

Deviations: anomalib returns ``1 / (1 + exp(0.05 (log p - 12)))``, a decreasing function of the
log density, hence the same ranking and AUROC; here the score is -log p itself, computed with a
log-sum-exp (anomalib takes ``log(p + 1e-300)``, which saturates far from the data). anomalib's
ResNet18 needs ImageNet weights that cannot be downloaded here; the default backbone is
EfficientNet-Lite0 (embedded weights) with its deepest layer, ``blocks.6`` (stride 32 as
``layer4``, 320 channels).
"""

from __future__ import annotations

import torch

from ..engine.train import auto_device
from ..errors import DefectscopeError
from ..ops import KDEResult, PCAResult, fit_gaussian_kde, fit_pca, kde_bandwidth, kde_log_density, pca_transform
from ._features import dataset_features, deepest_layer, global_pool
from ._pretrained import BACKBONE_DEFAULTS, BackboneModel
from .base import Prediction, register

SCALINGS = ("scale", "norm")


@register
class Dfkde(BackboneModel):
    """DFKDE (anomalib): pooled deep features, PCA to 16 dimensions, Gaussian KDE; score =
    -log density. Image-level only."""

    name = "dfkde"
    paradigm = "memory"
    description = "DFKDE (anomalib): pooled deep features, PCA 16, Gaussian KDE (Scott), -log density"
    defaults = {**BACKBONE_DEFAULTS, "n_pca_components": 16, "feature_scaling": "scale", "bandwidth": "scott",
                "max_training_points": 40000, "batch_size": 16}
    pixel_level = False

    def paper_layers(self, spec) -> tuple[str, ...]:
        return (deepest_layer(spec),)

    def _build(self, pretrained: bool = True) -> None:
        if self.params["feature_scaling"] not in SCALINGS:
            raise DefectscopeError(f"{self.name}: feature_scaling must be one of {', '.join(SCALINGS)}, "
                                   f"got {self.params['feature_scaling']!r}")
        try:
            kde_bandwidth(2, 1, self.params["bandwidth"])
        except (ValueError, TypeError) as e:
            raise DefectscopeError(f"{self.name}: {e}") from None
        self.build_backbone(pretrained)
        for key, shape in (("pca_mean", (0,)), ("pca_components", (0, 0)), ("max_length", ()),
                           ("kde_points", (0, 0)), ("kde_transform", (0, 0)), ("kde_log_norm", ())):
            self.register_buffer(key, torch.zeros(shape, dtype=torch.float64))

    def pooled(self, images: torch.Tensor) -> torch.Tensor:
        """The pooled features ``[B, C]`` (the layers' pooled vectors side by side)."""
        feats = self.backbone(images)
        return torch.cat([global_pool(feats[layer]) for layer in self.layers], dim=1)

    def _scale(self, z: torch.Tensor) -> torch.Tensor:
        if self.params["feature_scaling"] == "norm":
            return z / torch.linalg.vector_norm(z, dim=1, keepdim=True).clamp_min(1e-300)
        return z / self.max_length

    def _fit(self, dataset, val_dataset=None) -> None:
        k = int(self.params["n_pca_components"])
        if len(dataset) <= k:
            raise DefectscopeError(f"{self.name}: the KDE of {k} PCA components needs more than {k} training "
                                   f"images, got {len(dataset)}; add images or lower n_pca_components")
        self.to(auto_device(self.params["device"]))
        (x,) = dataset_features(self.pooled, dataset, self.device, int(self.params["batch_size"]),
                                desc="dfkde features")
        limit = int(self.params["max_training_points"])
        if limit and x.shape[0] > limit:
            gen = torch.Generator().manual_seed(int(self.params["seed"]))
            x = x[torch.randperm(x.shape[0], generator=gen)[:limit].to(x.device)]
        pca = fit_pca(x, k, dtype=torch.float64)
        self.pca_mean, self.pca_components = pca.mean, pca.components
        z = pca_transform(x, pca)
        self.max_length = torch.linalg.vector_norm(z, dim=1).max()
        kde = fit_gaussian_kde(self._scale(z), self.params["bandwidth"])
        self.kde_points, self.kde_transform, self.kde_log_norm = kde.points, kde.transform, kde.log_norm

    def _predict(self, images: torch.Tensor) -> Prediction:
        pca = PCAResult(self.pca_mean, self.pca_components, torch.empty(0), torch.empty(0))
        z = self._scale(pca_transform(self.pooled(images), pca))
        log_p = kde_log_density(z, KDEResult(self.kde_points, self.kde_transform, self.kde_log_norm))
        return Prediction(score=-log_p.float(), anomaly_map=None)
