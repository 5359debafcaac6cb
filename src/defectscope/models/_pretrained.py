"""What the methods built on a frozen pretrained backbone share: building the extractor from the
``backbone``/``layers``/``weights`` parameters, checking that its weights are available offline,
and the common post-processing of patch-score maps (upsample to the input, blur sigma 4)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..backbones import BACKBONES, DEFAULT_BACKBONE, create_backbone, find_weights, get_spec, resolve_weights
from ..errors import DefectscopeError
from ..ops.blur import gaussian_blur
from .base import AnomalyModel
from .params import Param, Tags


class BackboneModel(AnomalyModel):
    """Base of the methods that read features from a frozen ImageNet backbone.

    ``layers=None`` takes ``paper_layers(spec)``: the layers with the strides the paper uses
    on its ResNet (see :data:`defectscope.backbones.PAPER_LAYERS`). The backbone's tensors are
    saved with the model, so a saved model needs no weight file to load.
    """

    hparams = (
        Param("backbone", "str", DEFAULT_BACKBONE, "pretrained feature extractor (see 'defectscope backbones')",
              choices=lambda: tuple(BACKBONES)),
        Param("layers", "strs", None, "backbone layers to tap; none = the layers of the paper's strides", optional=True),
        Param("weights", "str", None, "backbone weights file; none = found offline (see 'defectscope backbones')",
              optional=True, path=True),
    )
    tags = Tags(weights="backbone")

    def paper_layers(self, spec) -> tuple[str, ...]:
        """The layers the paper taps, for ``spec`` (default: the stride-4/8/16 layers)."""
        return tuple(spec.paper_layers)

    @property
    def layers(self) -> tuple[str, ...]:
        spec = get_spec(self.params["backbone"])
        layers = self.params["layers"]
        if layers is None:
            return self.paper_layers(spec)
        return tuple([layers] if isinstance(layers, str) else layers)

    def build_backbone(self, pretrained: bool = True):
        self.backbone = create_backbone(self.params["backbone"], self.layers,
                                        weights=self.params["weights"] if pretrained else None,
                                        pretrained=pretrained)
        return self.backbone

    def weights_available(self) -> tuple[bool, str]:
        name = self.params["backbone"]
        try:
            found = find_weights(name, self.params["weights"])
        except DefectscopeError as e:
            return False, str(e)
        if found:
            return True, f"{name} weights found"
        return False, f"{name} ImageNet weights missing (see 'defectscope backbones')"

    def check_weights(self) -> None:
        if self.params["weights"] is not None or not self.params["backbone"]:
            return  # an explicit file is checked when it is read
        resolve_weights(self.params["backbone"], None)

    def postprocess(self, patch_scores: torch.Tensor) -> torch.Tensor:
        """``[B, h, w]`` patch scores -> ``[B, H, W]`` map: bilinear upsampling, blur sigma 4."""
        amap = F.interpolate(patch_scores.unsqueeze(1), size=(self.image_size, self.image_size),
                             mode="bilinear", align_corners=False).squeeze(1)
        sigma = float(self.params["blur_sigma"])
        return gaussian_blur(amap, sigma) if sigma > 0 else amap
