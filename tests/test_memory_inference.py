"""DFM and DFKDE run their frozen backbone as a BatchNorm-folded, channels_last copy, in fit and in
predict: the fitted statistics and the scores and maps are those of the plain network (float
rounding apart), and the copy is neither saved nor a sub-module."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from defectscope.models import create_model
from defectscope.models._inference import inference_backbone
from defectscope.models.memory._features import global_pool
from defectscope.ops import KDEResult, PCAResult, kde_log_density, pca_inverse_transform, pca_transform


def _images(n: int, size: int, seed: int) -> torch.Tensor:
    """Smooth random RGB fields plus noise (features with some structure, unlike plain noise)."""
    gen = torch.Generator().manual_seed(seed)
    coarse = F.interpolate(torch.rand(n, 3, 6, 6, generator=gen), size=(size, size), mode="bilinear")
    return (0.8 * coarse + 0.2 * torch.rand(n, 3, size, size, generator=gen)).clamp(0, 1)


def _folded(model) -> nn.Module:
    copy = inference_backbone(model._inference, model.backbone)
    assert copy is not model.backbone and not any(isinstance(m, nn.BatchNorm2d) for m in copy.modules())
    assert not any(k.startswith("_inference") for k in model.state_dict())  # not saved
    return copy


@torch.no_grad()
def test_dfm_scores_and_maps_are_the_plain_backbones(tensor_images):
    model = create_model("dfm", image_size=64, pooling_kernel_size=2).fit(tensor_images(_images(10, 64, 0)))
    _folded(model)
    # the fit: the PCA mean is the mean of the plain network's pooled features
    plain = lambda x: F.avg_pool2d(model.backbone(x)[model.layers[0]], 2)  # noqa: E731
    torch.testing.assert_close(model.pca_mean, plain(_images(10, 64, 0)).flatten(1).mean(0), rtol=1e-4, atol=1e-4)
    # the prediction: DFM's equations on the plain network's features
    x = _images(4, 64, 1)
    f = plain(x)
    b, c, h, w = f.shape
    pca = model.pca()
    feats = f.flatten(1)
    err = (feats - pca_inverse_transform(pca_transform(feats, pca), pca)).square()
    pred = model.predict(x)
    torch.testing.assert_close(pred.score, err.sum(1), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(pred.anomaly_map, model.postprocess(err.view(b, c, h, w).sum(1)), rtol=1e-4, atol=1e-4)


@torch.no_grad()
def test_dfkde_scores_are_the_plain_backbones(tensor_images):
    model = create_model("dfkde", image_size=32, n_pca_components=4).fit(tensor_images(_images(12, 32, 2)))
    _folded(model)
    x = _images(5, 32, 3)
    pooled = global_pool(model.backbone(x)[model.layers[0]])
    z = model._scale(pca_transform(pooled, PCAResult(model.pca_mean, model.pca_components, None, None)))
    ref = -kde_log_density(z, KDEResult(model.kde_points, model.kde_transform, model.kde_log_norm))
    torch.testing.assert_close(model.predict(x).score, ref.float(), rtol=1e-4, atol=1e-4)
