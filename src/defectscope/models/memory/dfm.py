"""DFM: Ahuja, Ndiour, Kalyanpur and Tickoo, "Probabilistic Modeling of Deep Features for
Out-of-Distribution and Adversarial Detection", arXiv 1909.11786 (2019), as anomalib's ``Dfm``.

Fit: the features of one layer of an ImageNet network (anomalib: ResNet50 ``layer3``, stride 16)
are average-pooled with a ``pooling_kernel_size`` = 4 window (stride 4) and flattened per image
to x in R^(C h w); a PCA keeps the smallest number k of components that explain
``pca_level`` = 97 % of the training variance (shared kernel :func:`defectscope.ops.fit_pca`):
mean mu, axes V_k, variances lambda_i = S_i^2 / N.
Predict, with z = V_k^T (x - mu) and the reconstruction x_hat = V_k z + mu:

  * ``score_type="fre"`` (default), the feature reconstruction error
        s(x) = ||x - x_hat||^2;
  * ``score_type="nll"``, the Gaussian negative log-likelihood of z under N(0, diag(lambda))
    (the training projections are decorrelated with these variances), up to the constant
    k log(2 pi) and a factor 2, as anomalib's ``SingleClassGaussian``:
        s(x) = sum_i z_i^2 / lambda_i + sum_i log lambda_i.

Map (anomalib's DFM): the reconstruction error summed over the channels at each position of the
pooled grid, ||x_hat_ij - x_ij||^2, upsampled bilinearly to the input and, as every map of this
library, blurred with sigma 4 (``blur_sigma=0`` gives anomalib's unblurred map). The map is the
reconstruction error in both score types (anomalib returns no map for ``"nll"``).

Deviations: anomalib keeps one principal component fewer than the 97 % rule (an off-by-one in
its ``PCA``); here k is the smallest count reaching the level. anomalib's ResNet50 needs ImageNet
weights that cannot be downloaded here; the default backbone is EfficientNet-Lite0 (embedded
weights) with the layer of the same stride, ``blocks.4`` (stride 16, 112 channels). The pooled
grid is coarse (16 / 4 = 4 x 4 cells at 256 px): the map localises only roughly.

Speed: the frozen backbone runs, in fit and predict, as a BatchNorm-folded copy in the
``channels_last`` memory format (:func:`defectscope.models._inference.inference_backbone`;
the same numbers up to float rounding). The backbone is nearly all of a prediction (the PCA and
the map take about 8 ms of 78 at 1 thread); folding took a 256 px, batch-1 prediction from 44 to
32 ms (2 threads, paired, on a loaded machine). The exported graph does it in 10 ms: eager
PyTorch still runs each ReLU6, each TF-"same" pad and each 1x1 convolution (an im2col GEMM) as a
separate pass, which OpenVINO fuses.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ...training import auto_device
from ...errors import DefectscopeError
from ...ops import PCAResult, fit_pca, pca_inverse_transform, pca_transform
from .._inference import InferenceCache, inference_backbone
from ._features import dataset_features
from .._pretrained import BackboneModel
from ..base import Prediction, register
from ..cost import Cost
from ..params import Param, Tags

SCORE_TYPES = ("fre", "nll")


@register
class Dfm(BackboneModel):
    """DFM (Ahuja et al., 2019; anomalib): PCA of pooled deep features; score = feature
    reconstruction error (or Gaussian NLL); coarse reconstruction-error map."""

    name = "dfm"
    paradigm = "memory"
    description = "DFM (2019): PCA (97 %) of pooled deep features, reconstruction error or Gaussian NLL"
    paper = "Ahuja et al., 2019 (anomalib's DFM)"
    notes = (
        "anomalib's defaults (stride-16 layer, 4x4 average pooling, PCA keeping 97 % of the variance, "
        "score `fre` = feature reconstruction error, `score_type=nll` = Gaussian NLL); coarse map = "
        "per-position reconstruction error, upsampled and blurred sigma 4 (anomalib: not blurred, no "
        "map for `nll`); k = the smallest count reaching 97 % (anomalib keeps one fewer); "
        "EfficientNet-Lite0 `blocks.4` instead of ResNet50 `layer3`"
    )
    hparams = (
        Param("pooling_kernel_size", "int", 4, "window (and stride) of the average pooling of the feature map "
              "(1 = no pooling)", ge=1),
        Param("pca_level", "float", 0.97, "share of the training variance the kept principal components explain",
              gt=0, lt=1),
        Param("score_type", "str", "fre", "image score: feature reconstruction error (fre) or Gaussian negative "
              "log-likelihood of the projection (nll)", choices=SCORE_TYPES),
        Param("batch_size", "int", 16, "images per batch of feature extraction", ge=1),
    )
    # few-shot from 2 images (the PCA needs 2; no 1-shot). export: verified with
    # deploy.export.export_model on a smoke fit (dynamic batch)
    tags = Tags(settings={"one-class", "multi-class", "few-shot", "blind"}, trains=False, pixel_level=True,
                weights="backbone", export="dynamic", input="rgb")
    cost = Cost(predict=0.0279, fit=0.0258,  # benchmarks/costs.py
                measured="benchmarks/costs.py, synthetic:washer 256 px, 2026-12-02, quiet machine")
    smoke = {"image_size": 64, "pooling_kernel_size": 2, "batch_size": 8}  # 4x4 stride-16 grid, 2x2 map

    def paper_layers(self, spec) -> tuple[str, ...]:
        return (spec.paper_layers[2],)  # the stride-16 layer (ResNet layer3)

    def _build(self, pretrained: bool = True) -> None:
        if len(self.layers) != 1:
            raise DefectscopeError(f"{self.name}: one layer expected, got {list(self.layers)}")
        self.build_backbone(pretrained)
        self._inference = InferenceCache()
        self.register_buffer("pca_mean", torch.empty(0))
        self.register_buffer("pca_components", torch.empty(0, 0))
        self.register_buffer("pca_variances", torch.empty(0))

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """The pooled feature maps ``[B, C, h, w]``."""
        f = inference_backbone(self._inference, self.backbone)(images)[self.layers[0]]
        k = self.params["pooling_kernel_size"]
        if k > 1:
            if min(f.shape[-2:]) < k:
                raise DefectscopeError(f"{self.name}: the {tuple(f.shape[-2:])} feature grid of {self.image_size} px "
                                       f"images is smaller than pooling_kernel_size={k}; use larger images "
                                       "or a smaller pooling_kernel_size")
            f = F.avg_pool2d(f, kernel_size=k)
        return f

    def pca(self) -> PCAResult:
        return PCAResult(self.pca_mean, self.pca_components, self.pca_variances, torch.empty(0))

    def _fit(self, dataset, val_dataset=None) -> None:
        if len(dataset) < 2:
            raise DefectscopeError(f"{self.name}: PCA needs at least 2 training images, got {len(dataset)}")
        self.to(auto_device(self.params["device"]))
        (x,) = dataset_features(lambda im: self.features(im).flatten(1), dataset, self.device,
                                self.params["batch_size"], desc="dfm features")
        try:
            pca = fit_pca(x, self.params["pca_level"])
        except ValueError as e:
            raise DefectscopeError(f"{self.name}: {e}") from None
        self.pca_mean, self.pca_components, self.pca_variances = pca.mean, pca.components, pca.variances

    def _predict(self, images: torch.Tensor) -> Prediction:
        f = self.features(images)
        b, c, h, w = f.shape
        x = f.flatten(1)
        pca = self.pca()
        z = pca_transform(x, pca)
        err = (x - pca_inverse_transform(z, pca)).square()  # [B, C h w]
        if self.params["score_type"] == "nll":
            score = (z.square() / pca.variances).sum(dim=1) + torch.log(pca.variances).sum()
        else:
            score = err.sum(dim=1)
        amap = self.postprocess(err.view(b, c, h, w).sum(dim=1))
        return Prediction(score=score, anomaly_map=amap)
