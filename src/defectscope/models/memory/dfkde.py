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

Image-level only: ``tags.pixel_level`` is False and the predictions carry no anomaly map.

Deviations: anomalib returns ``1 / (1 + exp(0.05 (log p - 12)))``, a decreasing function of the
log density, hence the same ranking and AUROC; here the score is -log p itself, computed with a
log-sum-exp (anomalib takes ``log(p + 1e-300)``, which saturates far from the data). anomalib's
ResNet18 needs ImageNet weights that cannot be downloaded here; the default backbone is
EfficientNet-Lite0 (embedded weights) with its deepest layer, ``blocks.6`` (stride 32 as
``layer4``, 320 channels).

Speed: the frozen backbone runs, in fit and predict, as a BatchNorm-folded copy in the
``channels_last`` memory format (:func:`defectscope.models._inference.inference_backbone`;
the same numbers up to float rounding): a 256 px, batch-1 prediction went from 54 to 38 ms
(2 threads, paired, on a loaded machine; the exported graph: 12 ms).
"""

from __future__ import annotations

import math

import torch

from ...training import auto_device
from ...errors import DefectscopeError
from ...ops import KDEResult, PCAResult, fit_gaussian_kde, fit_pca, kde_log_density, pca_transform
from .._inference import InferenceCache, inference_backbone
from ._features import dataset_features, deepest_layer, global_pool
from .._pretrained import BackboneModel
from ..base import Prediction, register
from ..cost import Cost
from ..params import Param, Tags

SCALINGS = ("scale", "norm")
BANDWIDTH_RULES = ("scott", "silverman")


class _RuleOrNumber(Param):
    """A parameter that is one of its ``choices`` (names) or a positive number, as the KDE
    ``bandwidth``: ``"scott"``, ``"silverman"`` or a factor such as ``0.4`` (from Python, JSON or
    the command line, where ``"0.4"`` is the number). Declared with ``kind="str"``: the declaration
    kinds have no "string or number"."""

    def _convert(self, value):
        if isinstance(value, str) and value in self.allowed_choices():
            return value
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise TypeError("expected a rule name or a number")
        try:
            out = float(value)
        except ValueError:
            raise ValueError("not a choice") from None
        if not (math.isfinite(out) and out > 0):
            raise ValueError("out of range")
        return out

    def allowed(self) -> str:
        return "one of " + ", ".join(repr(c) for c in self.allowed_choices()) + " or a number > 0"


@register
class Dfkde(BackboneModel):
    """DFKDE (anomalib): pooled deep features, PCA to 16 dimensions, Gaussian KDE; score =
    -log density. Image-level only."""

    name = "dfkde"
    paradigm = "memory"
    description = "DFKDE (anomalib): pooled deep features, PCA 16, Gaussian KDE (Scott), -log density"
    paper = "anomalib's DFKDE"
    notes = (
        "anomalib's defaults (deepest layer pooled, at most 40000 training points, PCA 16, feature "
        "scaling `scale`, Gaussian KDE with Scott's bandwidth; `bandwidth=silverman` option); score = "
        "-log density (anomalib: a decreasing sigmoid of it, same ranking); EfficientNet-Lite0 "
        "`blocks.6` instead of ResNet18 `layer4`; no anomaly map"
    )
    hparams = (
        Param("n_pca_components", "int", 16, "dimensions the PCA keeps (the fit needs more training images than "
              "that)", ge=1),
        Param("feature_scaling", "str", "scale", "scaling of the projections: by the largest training norm (scale) "
              "or each to unit length (norm)", choices=SCALINGS),
        _RuleOrNumber("bandwidth", "str", "scott", "KDE bandwidth factor h: Scott's or Silverman's rule, or a number",
                      choices=BANDWIDTH_RULES),
        Param("max_training_points", "int", 40000, "training images kept at most, drawn at random (seeded); "
              "0 = all", ge=0),
        Param("batch_size", "int", 16, "images per batch of feature extraction", ge=1),
    )
    # image-level only. Not few-shot: the fit needs more training images than n_pca_components (16),
    # else the PCA / KDE covariance is singular.
    # export: verified with deploy.export.export_model on a smoke fit (dynamic batch)
    tags = Tags(settings={"one-class", "multi-class", "blind"}, trains=False, pixel_level=False,
                weights="backbone", export="dynamic", input="rgb")
    cost = Cost(predict=0.0264, fit=0.0244,  # benchmarks/costs.py
                measured="benchmarks/costs.py, synthetic:washer 256 px, 2026-12-02, quiet machine")
    smoke = {"image_size": 32, "n_pca_components": 4, "batch_size": 8}

    def paper_layers(self, spec) -> tuple[str, ...]:
        return (deepest_layer(spec),)

    def _build(self, pretrained: bool = True) -> None:
        self.build_backbone(pretrained)
        self._inference = InferenceCache()
        for key, shape in (("pca_mean", (0,)), ("pca_components", (0, 0)), ("max_length", ()),
                           ("kde_points", (0, 0)), ("kde_transform", (0, 0)), ("kde_log_norm", ())):
            self.register_buffer(key, torch.zeros(shape, dtype=torch.float64))

    def pooled(self, images: torch.Tensor) -> torch.Tensor:
        """The pooled features ``[B, C]`` (the layers' pooled vectors side by side)."""
        feats = inference_backbone(self._inference, self.backbone)(images)
        return torch.cat([global_pool(feats[layer]) for layer in self.layers], dim=1)

    def _scale(self, z: torch.Tensor) -> torch.Tensor:
        if self.params["feature_scaling"] == "norm":
            return z / torch.linalg.vector_norm(z, dim=1, keepdim=True).clamp_min(1e-300)
        return z / self.max_length

    def _fit(self, dataset, val_dataset=None) -> None:
        k = self.params["n_pca_components"]
        if len(dataset) <= k:
            raise DefectscopeError(f"{self.name}: the KDE of {k} PCA components needs more than {k} training "
                                   f"images, got {len(dataset)}; add images or lower n_pca_components")
        self.to(auto_device(self.params["device"]))
        (x,) = dataset_features(self.pooled, dataset, self.device, self.params["batch_size"],
                                desc="dfkde features")
        limit = self.params["max_training_points"]
        if limit and x.shape[0] > limit:
            gen = torch.Generator().manual_seed(self.params["seed"])
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
