"""SPADE: Cohen and Hoshen, "Sub-Image Anomaly Detection with Deep Pyramid Correspondences",
arXiv 2005.02357 (2020).

Fit: for every training image, (a) its global feature f: the deepest layer of an ImageNet
network, globally average-pooled (the paper: Wide-ResNet50x2 after its last block, 2048
dimensions); (b) its feature pyramid F(x, p): at every position p of the stride-4 grid, the
features of the stride-4, 8 and 16 layers (ResNet ``layer1``..``layer3``) side by side, the
deeper ones upsampled bilinearly to the stride-4 grid. Both are stored: the gallery is the whole
training set, G in R^(N x h x w x D).

Predict, for a test image y:

  1. image-level k-NN (Sec. 3.1, eq. 1): N_K(f_y), the K = 50 training images whose global
     features are nearest to f_y; the image anomaly score is their mean squared distance

        d(y) = 1/K sum_{f in N_K(f_y)} ||f - f_y||^2;

  2. pixel-level k-NN (Sec. 3.2, eq. 2) against the pyramids of those K images only: for each
     position p, the kappa = 1 nearest gallery features among all positions of the K images,

        d(y, p) = 1/kappa sum_{f in N_kappa(F(y, p))} ||f - F(y, p)||^2;

  3. the map d(y, .) is upsampled bilinearly to the input and blurred with a Gaussian, sigma 4
     (Sec. 4).

Both searches go through the shared exact k-NN kernel (:class:`defectscope.ops.NearestNeighbors`):
one index of the training images' global features, and per test image one index of the K
gathered pyramids (all their positions at once, no loop over positions).

Defaults: K = 50, kappa = 1 (the paper's). Deviations: the paper's Wide-ResNet50x2 needs
ImageNet weights that cannot be downloaded here; the default backbone is EfficientNet-Lite0
(embedded weights): global feature from its deepest layer ``blocks.6`` (stride 32, 320
channels), pyramid from the layers of stride 4, 8 and 16 (``blocks.1``, ``blocks.2``,
``blocks.4``: 24 + 40 + 112 = 176 dimensions). The paper concatenates the levels as stated here;
the public re-implementation instead searches each level separately and averages the maps.
Memory: the gallery holds every training pyramid (N x h x w x D floats, about 2.9 MB per
training image at 256 px), as the paper's method does.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ...backbones import create_backbone, get_spec
from ...training import auto_device
from ...errors import DefectscopeError
from ...ops import NearestNeighbors
from ._features import dataset_features, deepest_layer, global_pool
from .._pretrained import BackboneModel
from ..base import Prediction, register
from ..cost import Cost
from ..params import Param, Tags


@register
class Spade(BackboneModel):
    """SPADE (Cohen & Hoshen, 2020): K nearest training images by global features (image
    score), then nearest pyramid features among those K images only (map)."""

    name = "spade"
    paradigm = "memory"
    description = "SPADE (2020): k-NN of global features (K=50), then pixel k-NN in those images' pyramids"
    paper = "Cohen & Hoshen, 2020"
    notes = (
        "paper defaults (global pooled features of the deepest layer, image k-NN K = 50, image score "
        "= mean squared distance (eq. 1); pixel k-NN kappa = 1 (eq. 2) against the stride-4/8/16 "
        "feature pyramids of those K images only; map upsampled + blur sigma 4); backbone "
        "EfficientNet-Lite0 (`blocks.6` global, `blocks.1/2/4` pyramid) instead of Wide-ResNet50x2; "
        "stores every training pyramid (about 2.9 MB per image at 256 px), as the method does"
    )
    hparams = (
        Param("k", "int", 50, "K: nearest training images by global feature (image score, eq. 1; at most the "
              "training images)", ge=1),
        Param("kappa", "int", 1, "kappa: nearest gallery features per position among those K images (eq. 2)", ge=1),
        Param("global_layer", "str", None, "backbone layer whose pooled features give the global feature; "
              "none = the deepest layer", optional=True),
        Param("batch_size", "int", 16, "images per batch of feature extraction", ge=1),
    )
    # export: the per-image search loops over the batch, which bakes the batch size into the graph
    # (verified with deploy.export.export_model on a smoke fit: exported for batch 1)
    tags = Tags(settings={"one-class", "multi-class", "few-shot", "blind"}, trains=False, pixel_level=True,
                weights="backbone", export="batch-1", input="rgb")
    cost = Cost(predict=1.25, fit=0.0335,  # benchmarks/costs.py (after the tiled k-NN kernel)
                measured="benchmarks/costs.py, synthetic:washer 256 px, 2026-12-03, quiet machine")
    smoke = {"image_size": 32, "k": 3, "batch_size": 8}

    @property
    def global_layer(self) -> str:
        return self.params["global_layer"] or deepest_layer(get_spec(self.params["backbone"]))

    def _build(self, pretrained: bool = True) -> None:
        taps = tuple(dict.fromkeys(self.layers + (self.global_layer,)))
        self.backbone = create_backbone(self.params["backbone"], taps,
                                        weights=self.params["weights"] if pretrained else None,
                                        pretrained=pretrained)
        self.register_buffer("image_features", torch.empty(0, 0))  # [N, D_global]
        self.register_buffer("gallery", torch.empty(0, 0, 0))  # [N, h*w, D] feature pyramids

    def describe(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Global features ``[B, D_global]`` and feature pyramids ``[B, D, h, w]`` (stride-4 grid)."""
        feats = self.backbone(images)
        first = feats[self.layers[0]]
        parts = [first] + [F.interpolate(feats[l], size=first.shape[-2:], mode="bilinear", align_corners=False)
                           for l in self.layers[1:]]
        return global_pool(feats[self.global_layer]), torch.cat(parts, dim=1)

    def _fit(self, dataset, val_dataset=None) -> None:
        self.to(auto_device(self.params["device"]))

        def both(images):
            g, pyramid = self.describe(images)
            return g, pyramid.flatten(2).transpose(1, 2)  # [B, h*w, D]

        self.image_features, self.gallery = dataset_features(both, dataset, self.device,
                                                              self.params["batch_size"], desc="spade features")

    def index(self) -> NearestNeighbors:
        """The k-NN index of the training images' global features (built once per fit/load)."""
        cached = getattr(self, "_index", None)
        if cached is None or cached[0] is not self.image_features:
            self._index = (self.image_features, NearestNeighbors(self.image_features))
        return self._index[1]

    def scores(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Image scores d(y) ``[B]`` (eq. 1), patch scores d(y, p) ``[B, h, w]`` (eq. 2) and the
        indices ``[B, K]`` of the K nearest training images."""
        g, pyramid = self.describe(images)
        b, d, h, w = pyramid.shape
        n, p = self.gallery.shape[:2]
        if p != h * w:
            raise DefectscopeError(f"{self.name}: the test grid {h}x{w} differs from the training grid "
                                   f"({p} positions); predict at the image size the model was fitted at")
        k = min(self.params["k"], n)
        dist, nearest = self.index().query(g, k=k)
        image_score = dist.square().mean(dim=1)
        queries = pyramid.flatten(2).transpose(1, 2)  # [B, h*w, D]
        patch = torch.empty(b, p, dtype=dist.dtype, device=dist.device)
        kappa = min(self.params["kappa"], k * p)
        for i in range(b):  # one exact search per test image, against the gathered K pyramids
            gallery = self.gallery.index_select(0, nearest[i]).reshape(k * p, d)
            dp, _ = NearestNeighbors(gallery).query(queries[i], k=kappa)
            patch[i] = dp.square().mean(dim=1)
        return image_score, patch.view(b, h, w), nearest

    def _predict(self, images: torch.Tensor) -> Prediction:
        score, patch, _ = self.scores(images)
        return Prediction(score=score, anomaly_map=self.postprocess(patch.float()))
