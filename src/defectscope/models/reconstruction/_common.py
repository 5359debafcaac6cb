"""What the reconstruction methods share: train an image-to-image network on normal images,
score by the per-pixel reconstruction error."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ...training import auto_device, load_images, seed_everything, train_loop
from ...errors import DefectscopeError
from ...ops.blur import gaussian_blur
from ..base import AnomalyModel, Prediction
from ..params import Param, Tags


class ReconstructionModel(AnomalyModel):
    """Base of the autoencoders: ``self.net`` maps images to reconstructions of the same shape.

    Anomaly map: squared error per pixel (mean over channels), Gaussian-blurred with
    ``blur_sigma`` (4, the library-wide post-processing); image score: the map's maximum, so a
    small defect that the autoencoder cannot reconstruct decides the score, as it should for
    inspection (a mean would dilute it by the defect's area).
    """

    paradigm = "reconstruction"
    # the guide trains its autoencoders on 128x128 grayscale images
    overrides = {"image_size": 128, "channels": 1}
    hparams = (
        Param("epochs", "int", 50, "training epochs (the guide gives no schedule)", ge=1),
        Param("batch_size", "int", 32, "training batch size", ge=1),
        Param("lr", "float", 1e-3, "Adam learning rate", gt=0),
        Param("patience", "int", None, "early stopping after this many epochs without a lower validation loss "
              "(needs a validation set); none = no early stopping", optional=True, ge=1),
    )
    tags = Tags(trains=True, weights=None, input="gray")
    net: nn.Module

    def loss(self, images: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def error_map(self, images: torch.Tensor, recon: torch.Tensor) -> torch.Tensor:
        """Per-pixel anomaly map ``[B, H, W]`` before blurring."""
        return (images - recon).pow(2).mean(dim=1)

    def _check_size(self, multiple: int) -> None:
        if self.image_size % multiple:
            raise DefectscopeError(f"{self.name}: image_size must be a multiple of {multiple}, got {self.image_size}; "
                                   f"pass --image-size {max(multiple, self.image_size // multiple * multiple)}")

    def _start_fit(self, dataset, val_dataset=None):
        """What every reconstruction fit begins with: seed, rebuild the networks (so the initial
        weights depend only on the seed), move to the device, load the images. Returns
        ``(generator, device, images, val_images or None)``."""
        gen = seed_everything(self.params["seed"])
        self._build()
        device = auto_device(self.params["device"])
        self.to(device)
        val = load_images(val_dataset) if val_dataset is not None and len(val_dataset) else None
        return gen, device, load_images(dataset), val

    def _fit(self, dataset, val_dataset=None) -> None:
        p = self.params
        gen, device, images, val = self._start_fit(dataset, val_dataset)
        opt = torch.optim.Adam(self.net.parameters(), lr=p["lr"])
        self.history = train_loop(
            self.net, self.loss, images, epochs=p["epochs"], optimizer=opt,
            batch_size=p["batch_size"], generator=gen, val_images=val,
            patience=p["patience"], desc=f"fit {self.name}", device=device,
        )

    def _predict(self, images: torch.Tensor) -> Prediction:
        recon = self.net(images)
        amap = self.error_map(images, recon)
        sigma = self.params["blur_sigma"]
        if sigma > 0:
            amap = gaussian_blur(amap, sigma)
        return Prediction(score=amap.flatten(1).amax(dim=1), anomaly_map=amap)


def count_parameters(module: nn.Module) -> int:
    """Number of trainable parameters (BatchNorm's running statistics are buffers, not counted)."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def focal_loss(probs: torch.Tensor, target: torch.Tensor, gamma: float = 2.0, smooth: float = 1e-5) -> torch.Tensor:
    """The focal loss of DRAEM's and DSR's official code (``loss.py``, after Hsuxu's Loss_ToolBox), on
    *probabilities*:
    ``-(1 - p_t)^gamma log p_t`` averaged over pixels, with ``p_t = sum_c onehot_c p_c + smooth`` and
    the one-hot target clamped to ``[smooth / (C - 1), 1 - smooth]``; alpha = 1.

    ``probs``: ``[B, C, H, W]`` softmax output; ``target``: ``[B, 1, H, W]`` class indices (0/1)."""
    c = probs.shape[1]
    onehot = F.one_hot(target.squeeze(1).long(), c).permute(0, 3, 1, 2).to(probs.dtype)
    onehot = onehot.clamp(smooth / (c - 1), 1.0 - smooth)
    pt = (onehot * probs).sum(dim=1) + smooth
    return (-(1 - pt).pow(gamma) * pt.log()).mean()
