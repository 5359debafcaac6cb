"""FRE: Ndiour, Ahuja, Genc, Tickoo, "FRE: A Fast Method For Anomaly Detection And Segmentation",
BMVC 2023 (https://papers.bmvc2023.org/0614.pdf), as implemented in anomalib 2.x
(``anomalib.models.image.fre``).

Features of one layer of a frozen ImageNet backbone (the stride-16 layer: ResNet50 ``layer3`` in
the paper / anomalib) are average-pooled (kernel ``pooling`` = 2, anomalib's default) and
flattened into one vector x of D = C x h x w values per image (65536 for ResNet50 at 256 px). A
shallow linear autoencoder with tied weights (anomalib's ``TiedAE``: encoder z = W x + b_e,
decoder x^ = W^T z + b_d, W of shape [d, D], d = ``latent_dim`` = 220, Xavier-uniform
initialisation) is trained to reconstruct x with the mean squared error (Adam, lr 1e-3). The paper
computes the same subspace reconstruction with PCA; anomalib (and this module) learns it by
gradient descent.

Scores: the feature reconstruction error FRE(x) = ||x - x^||^2 is the image score (the sum over
all D values, as anomalib; a mean only rescales it); the anomaly map is the squared error summed
over channels at each pooled position, ``[B, h, w]``, upsampled bilinearly to the input and blurred
(sigma 4, the library-wide post-processing; anomalib does not blur).

Defaults: anomalib's (``Fre(backbone="resnet50", layer="layer3", pooling_kernel_size=2,
latent_dim=220)``, Adam lr 1e-3, batch 32); 220 epochs, anomalib's example configuration for FRE
(``max_epochs: 220``); no early stopping. Deviation: ResNet50 ImageNet weights cannot be downloaded
here; the default backbone is EfficientNet-Lite0 with its stride-16 layer ``blocks.4`` (112
channels: D = 112 x 8 x 8 = 7168 at 256 px). Training is fast because the backbone is frozen
and there is no augmentation: the pooled features of the training images are computed once and
the autoencoder trains on them (anomalib re-runs the backbone every epoch; the result is the same).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ...training import auto_device, batches, load_images, seed_everything, train_loop
from ...progress import progress
from ...errors import DefectscopeError
from .._inference import InferenceCache
from .._pretrained import BackboneModel
from ..base import Prediction, register
from ..cost import Cost
from ..params import Param, Tags

__all__ = ["Fre", "TiedAutoencoder"]


class TiedAutoencoder(nn.Module):
    """x^ = W^T (W x + b_e) + b_d with one weight matrix ``W [latent, dim]`` (anomalib's ``TiedAE``)."""

    def __init__(self, dim: int, latent: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(latent, dim))
        nn.init.xavier_uniform_(self.weight)
        self.encoder_bias = nn.Parameter(torch.zeros(latent))
        self.decoder_bias = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return F.linear(F.linear(x, self.weight, self.encoder_bias), self.weight.t(), self.decoder_bias)


@register
class Fre(BackboneModel):
    """FRE (Ndiour et al., BMVC 2023): tied linear autoencoder on pooled deep features."""

    name = "fre"
    paradigm = "distillation"
    description = "FRE (BMVC 2023): feature reconstruction error of a linear autoencoder on one backbone layer"
    paper = "Ndiour et al., BMVC 2023 (anomalib's FRE)"
    notes = (
        "anomalib's defaults (stride-16 layer, 2x2 average pooling, tied linear autoencoder with 220 "
        "latent dims on the flattened pooled map, MSE, Adam lr 1e-3, batch 32, 220 epochs); score = "
        "squared reconstruction error summed, map = per-position error, upsampled and blurred "
        "(anomalib does not blur); backbone EfficientNet-Lite0 (`blocks.4`) instead of ResNet50 "
        "`layer3`; features of the frozen backbone computed once, not every epoch"
    )
    hparams = (
        Param("pooling", "int", 2, "kernel (and stride) of the average pooling of the layer's features "
              "(1 = none; anomalib's pooling_kernel_size)", ge=1),
        Param("latent_dim", "int", 220, "size d of the tied linear autoencoder's code (anomalib's latent_dim)", ge=1),
        Param("epochs", "int", 220, "training epochs (anomalib's example configuration)", ge=1),
        Param("batch_size", "int", 32, "batch size of the feature extraction and of the training", ge=1),
        Param("lr", "float", 1e-3, "Adam learning rate of the autoencoder", gt=0),
    )
    tags = Tags(settings={"one-class", "multi-class", "few-shot", "blind"}, trains=True, pixel_level=True,
                weights="backbone", export="dynamic", input="rgb")
    cost = Cost(predict=0.0174, fit=0.0881,  # benchmarks/costs.py
                measured="benchmarks/costs.py, synthetic:washer 256 px, 2026-12-02, quiet machine; its "
                         "220 epochs of a small autoencoder on cached features were too cheap to measure")
    smoke = {"image_size": 64, "epochs": 1, "batch_size": 4, "latent_dim": 8}

    def paper_layers(self, spec) -> tuple[str, ...]:
        """One layer: the stride-16 one (ResNet ``layer3``)."""
        return (spec.paper_layers[-1],)

    def _dim(self) -> int:
        """D = C x h x w of the pooled layer at the model's input size (one forward of zeros)."""
        with torch.no_grad():
            shape = self.pooled_features(torch.zeros(1, self.channels, self.image_size, self.image_size)).shape
        if shape[-1] < 1 or shape[-2] < 1:
            raise DefectscopeError(f"{self.name}: image_size {self.image_size} is too small for layer "
                                   f"{self.layers[0]} and pooling {self.params['pooling']}")
        return shape[1] * shape[2] * shape[3]

    def _build(self, pretrained: bool = True) -> None:
        if len(self.layers) != 1:
            raise DefectscopeError(f"{self.name}: uses exactly one backbone layer, got {self.layers}")
        self.build_backbone(pretrained)
        self._cache = InferenceCache()
        self.autoencoder = TiedAutoencoder(self._dim(), self.params["latent_dim"])

    def pooled_features(self, images: torch.Tensor, fast: bool = False) -> torch.Tensor:
        """``[B, C, h, w]``: the layer's features average-pooled with kernel (and stride) ``pooling``
        (``fast``: through the BatchNorm-folded copy of the backbone)."""
        backbone = self._cache.get("backbone", self.backbone) if fast else self.backbone
        f = backbone(images)[self.layers[0]]
        k = self.params["pooling"]
        return F.avg_pool2d(f, k) if k > 1 else f

    def _fit(self, dataset, val_dataset=None) -> None:
        p = self.params
        gen = seed_everything(p["seed"])
        self.autoencoder = TiedAutoencoder(self._dim(), p["latent_dim"])  # initialised from the seed
        self._cache.clear()
        device = auto_device(p["device"])
        self.to(device)

        def features(ds):
            imgs = load_images(ds)
            with torch.no_grad():
                return torch.cat([self.pooled_features(b.to(device), fast=True).flatten(1).cpu()
                                  for b in progress(list(batches(imgs, p["batch_size"], False)),
                                                    desc="fre features", unit="batch")])

        x = features(dataset)
        val = features(val_dataset) if val_dataset is not None and len(val_dataset) else None
        opt = torch.optim.Adam(self.autoencoder.parameters(), lr=p["lr"])
        self.history = train_loop(
            self.autoencoder, lambda b: F.mse_loss(self.autoencoder(b), b), x, epochs=p["epochs"],
            optimizer=opt, batch_size=p["batch_size"], generator=gen, val_images=val,
            desc=f"fit {self.name}", device=device,
        )

    def _predict(self, images: torch.Tensor) -> Prediction:
        f = self.pooled_features(images, fast=True)
        err = (self.autoencoder(f.flatten(1)) - f.flatten(1)).pow(2).view(f.shape).sum(dim=1)  # [B, h, w]
        return Prediction(score=err.flatten(1).sum(dim=1), anomaly_map=self.postprocess(err))
