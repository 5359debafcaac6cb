"""PaDiM: Defard et al., "PaDiM: a Patch Distribution Modeling Framework for Anomaly Detection
and Localization", ICPR 2020 (ICPR workshops 2021).

Fit (Sec. 3.1-3.2): at every position (i, j) of the first layer's grid (stride 4), the
embedding x_ij concatenates the features of three layers (stride 4, 8, 16: ResNet ``layer1``,
``layer2``, ``layer3``; the deeper ones upsampled to the first grid, nearest neighbour, as the
authors' code), reduced to ``n_features`` = d' dimensions chosen at random once (seeded). Per
position, a Gaussian N(mu_ij, Sigma_ij) with Sigma_ij = 1/(N-1) sum (x - mu)(x - mu)^T + 0.01 I
(eq. 1, the paper's regularisation). The inverse is computed once at fit, as the lower-triangular
factor L_ij^-1 of Sigma_ij = L L^T (shared kernel :func:`defectscope.ops.cholesky_inverse_factor`).
Predict (eq. 2): M(x_ij) = sqrt((x - mu)^T Sigma^-1 (x - mu)) = ||L^-1 (x - mu)||; the map is
upsampled bilinearly to the input and blurred (sigma 4); the image score is the map's maximum.

Defaults: the paper's d' is 100 for ResNet18 and 550 for Wide-ResNet50-2; other backbones use
d' = 100 (the ResNet18 value; EfficientNet-Lite0's three layers have 24 + 40 + 112 = 176
dimensions, against ResNet18's 448). Deviation: the paper's backbones need ImageNet weights
that cannot be downloaded here, so the default backbone is EfficientNet-Lite0 (embedded weights)
with the layers of the same strides (``blocks.1``, ``blocks.2``, ``blocks.4``).

Storage: only the d'(d'+1)/2 entries of each triangular factor are saved (float32, exact), half
of a full inverse covariance; the dense factor is rebuilt once when the model is loaded.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ...training import auto_device
from ...errors import DefectscopeError
from ...ops import cholesky_inverse_factor, fit_gaussian, mahalanobis
from ...progress import progress
from .._pretrained import BackboneModel
from ..base import Prediction, register
from ..cost import Cost
from ..params import Param, Tags

PAPER_N_FEATURES = {"resnet18": 100, "wide_resnet50_2": 550}


@register
class Padim(BackboneModel):
    """PaDiM (Defard et al., ICPR 2020): a Gaussian per patch position, Mahalanobis map."""

    name = "padim"
    paradigm = "memory"
    description = "PaDiM (ICPR 2020): per-position Gaussian of patch embeddings, Mahalanobis map"
    paper = "Defard et al., ICPR 2020"
    notes = (
        "paper defaults (three layers, random d', 0.01 I, Mahalanobis, max); backbone "
        "EfficientNet-Lite0 (layers of the same strides); d' = 100 as the paper's ResNet18 for "
        "backbones the paper did not use; stores the triangular factor of the inverse covariance "
        "(half the size, exact)"
    )
    hparams = (
        Param("n_features", "int", None, "d': embedding dimensions kept, chosen at random once (seeded), at most the "
              "layers' total; none = the paper's value for the backbone (resnet18 100, wide_resnet50_2 550, "
              "others 100)", optional=True, ge=1),
        Param("reg", "float", 0.01, "epsilon of the epsilon * I added to every covariance (eq. 1)", ge=0),
        Param("batch_size", "int", 16, "images per batch of feature extraction", ge=1),
    )
    # few-shot from 2 images (the covariances need 2; no 1-shot). export: verified with
    # deploy.export.export_model on a smoke fit (dynamic batch)
    tags = Tags(settings={"one-class", "multi-class", "few-shot", "blind"}, trains=False, pixel_level=True,
                weights="backbone", export="dynamic", input="rgb")
    cost = Cost(predict=0.0416, fit=0.0577,  # benchmarks/costs.py
                measured="benchmarks/costs.py, synthetic:washer 256 px, 2026-12-02, quiet machine")
    smoke = {"image_size": 32, "n_features": 16, "batch_size": 8}

    def _build(self, pretrained: bool = True) -> None:
        backbone = self.build_backbone(pretrained)
        total = sum(backbone.channels[l] for l in self.layers)
        d = self.params["n_features"] or PAPER_N_FEATURES.get(self.params["backbone"], 100)
        d = min(d, total)
        gen = torch.Generator().manual_seed(self.params["seed"])
        self.register_buffer("index", torch.randperm(total, generator=gen)[:d].sort().values)
        self.register_buffer("mean", torch.empty(0, d))
        self.register_buffer("factor_packed", torch.empty(0, d * (d + 1) // 2))
        self.register_buffer("_tril", torch.tril_indices(d, d), persistent=False)
        self._factor = None

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Embeddings ``[B, d', h, w]`` on the first layer's grid (random dimensions kept)."""
        feats = self.backbone(images)
        first = feats[self.layers[0]]
        parts = [first] + [F.interpolate(feats[l], size=first.shape[-2:], mode="nearest") for l in self.layers[1:]]
        return torch.cat(parts, dim=1).index_select(1, self.index)

    def _fit(self, dataset, val_dataset=None) -> None:
        if len(dataset) < 2:
            raise DefectscopeError(f"{self.name}: a covariance needs at least 2 training images, got {len(dataset)}")
        self.to(auto_device(self.params["device"]))
        loader = torch.utils.data.DataLoader(dataset, batch_size=self.params["batch_size"], num_workers=0)
        x = None  # [N, P, d'], filled batch by batch (no second copy from a concatenation)
        with torch.no_grad():
            for batch in progress(loader, desc="padim features", unit="batch"):
                e = self.embed(batch["image"].to(self.device)).flatten(2).transpose(1, 2)  # [b, P, d']
                if x is None:
                    x, n = e.new_empty(len(dataset), *e.shape[1:]), 0
                x[n:n + e.shape[0]] = e
                n += e.shape[0]
        # Gaussian and inverse factor per block of positions, in float64: the temporaries stay
        # small (one block of covariances), only the packed factors are kept.
        p, d = x.shape[1:]
        rows, cols = self._tril
        self.mean = x.new_empty(p, d)
        self.factor_packed = x.new_empty(p, rows.numel())
        step = max(1, (64 * 2**20) // (8 * d * d))
        for lo in range(0, p, step):
            mean, cov = fit_gaussian(x[:, lo:lo + step], reg=self.params["reg"], dtype=torch.float64)
            self.mean[lo:lo + step] = mean.float()
            self.factor_packed[lo:lo + step] = cholesky_inverse_factor(cov)[:, rows, cols].float()
        self._factor = None

    def factor(self) -> torch.Tensor:
        """The dense lower-triangular factors ``[P, d', d']`` (unpacked once, then cached)."""
        if self._factor is None or self._factor.device != self.factor_packed.device:
            p, d = self.mean.shape
            dense = torch.zeros(p, d, d, device=self.factor_packed.device)
            rows, cols = self._tril
            dense[:, rows, cols] = self.factor_packed
            self._factor = dense
        return self._factor

    def _predict(self, images: torch.Tensor) -> Prediction:
        e = self.embed(images)
        b, d, h, w = e.shape
        dist = mahalanobis(e.flatten(2).transpose(1, 2), self.mean, factor=self.factor())  # [B, P]
        amap = self.postprocess(dist.view(b, h, w))
        return Prediction(score=amap.flatten(1).amax(dim=1), anomaly_map=amap)
