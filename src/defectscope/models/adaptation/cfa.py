"""CFA: Lee, Lee & Song, "CFA: Coupled-hypersphere-based Feature Adaptation for Target-Oriented
Anomaly Localization", IEEE Access 10, 2022 (arXiv 2206.04325); the authors' code
(github.com/sungwool/CFA_for_anomaly_localization, ``utils/cfa.py``, ``trainer_cfa.py``) decides
every detail the paper leaves open.

Patch features (Sec. 3.1). The frozen ImageNet backbone's three mid layers (Wide-ResNet50-2
``layer1``/``layer2``/``layer3``, strides 4/8/16) are each average-pooled 3x3 (stride 1, padding 1)
at their own resolution, the deeper two upsampled bilinearly to the first layer's grid, and
concatenated: ``p`` of ``D`` = 24 + 40 + 112 = 176 channels for EfficientNet-Lite0 (1792 for
WRN50-2).

Patch descriptor phi (Sec. 3.1): a CoordConv (Liu et al., NeurIPS 2018) 1x1 convolution: two
coordinate channels (row and column index scaled to [-1, 1]) are appended to ``p`` and a 1x1
convolution maps the ``D + 2`` channels to ``D / gamma_d`` (``gamma_d`` = 1 by default, the
authors' command line). It is the only trained part, with the radius ``r``.

Memory bank C (Sec. 3.2; the authors' code, not the paper's EMA text): with the descriptor at its
random initialisation, C is the mean over the training images of phi(p) at every position of the
grid: ``h w`` memorised features of ``D / gamma_d`` dimensions (the mean is taken once over all
images; phi is affine, so it is phi of the mean feature, computed that way). When ``gamma_c > 1`` C
is compressed by k-means to ``h w / gamma_c`` centres (scikit-learn's k-means++ and Lloyd, 3000
iterations at most, in torch: :func:`defectscope.ops.kmeans.kmeans`). C stays fixed while phi
trains.

Coupled-hypersphere loss (Sec. 3.3). For every training patch feature phi_t, its ``K`` nearest
memorised features c^k (k = 1..K) and the next ``J`` ones, the hard negatives c^j (the exact k-NN
kernel :class:`defectscope.ops.NearestNeighbors`), with squared Euclidean distances
D(phi, c) = ||phi - c||^2:

* L_att = 1/(N K) sum_t sum_k max(0, D(phi_t, c_t^k) - r^2)          (pull into the sphere of radius r)
* L_rep = 1/(N J) sum_t sum_j max(0, r^2 - D(phi_t, c_t^j) - alpha)  (push hard negatives out, margin alpha)
* L_CFA = (L_att + L_rep) / nu, nu = 1e-3 (the code's soft-boundary scale; ``LOSS_SCALE`` = 1000).

``r`` starts at 1e-5 and is learnt with phi (an ``nn.Parameter`` in the authors' code). Training:
AdamW (lr 1e-3, weight decay 5e-4, AMSGrad), batch 4, 30 epochs (the code's ``trainer_cfa.py``).

Score (Sec. 3.4): with the distances S^k = ||phi_t - c_t^k|| to the K nearest memorised features,
ascending, the patch score is softmin(S)_1 * S^1 = S^1 exp(-S^1) / sum_k exp(-S^k) (how much closer
the nearest is than the others, times its distance); the map is upsampled bilinearly to the input
and blurred (Gaussian, sigma 4), the image score is the map's maximum (the code's evaluation).

Deviations and choices:

* Backbone: the paper's Wide-ResNet50-2 ImageNet weights cannot be downloaded here; the default is
  EfficientNet-Lite0 (embedded ImageNet weights) at the layers of the same strides (``blocks.1``,
  ``blocks.2``, ``blocks.4``, as PaDiM and STFPM). The authors' ResNets return
  ``leaky_relu`` of the blocks' pre-activation outputs; Lite0's block outputs are linear
  bottlenecks, taken as they are.
* The memory bank follows the authors' code (per-position mean, then k-means), not the paper's
  description (k-means of the first image's features, then an EMA of nearest features over the
  training set). The mean is exact over all training images (the code averages batch means with
  ``drop_last``, dropping a remainder of fewer than 4 images).
* The hard negatives are the ``J`` features after the ``K`` nearest (the paper); the code takes
  ``dist[:, :, J:]`` of the ``K + J`` nearest, the same at the defaults K = J = 3 only.
* The last incomplete batch of an epoch is kept (the code drops it).
* Training reuses the backbone features: they are extracted once (pooled, at their own
  resolutions) and every epoch runs only the descriptor, the nearest-neighbour search (no
  gradient) and the loss on the ``K + J`` distances found, recomputed directly with their gradient
  (what the code's ``topk`` back-propagates through). The same loss and gradients as the code's
  dense ``[N, h w]`` distance matrix, without its backward pass.
* anomalib 2.7 (``models/image/cfa``) differs from the code in ways we do not follow: its radius is
  a constant (not a parameter), and at r = 1e-5 < sqrt(alpha) its repulsion term is then always 0;
  its k-means is random-init Lloyd; its ResNet features are torchvision's post-ReLU outputs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ...errors import DefectscopeError
from ...ops import NearestNeighbors
from ...ops.kmeans import kmeans
from ...progress import progress
from ...training import auto_device, seed_everything, train_loop
from .._inference import InferenceCache, inference_backbone
from .._pretrained import BackboneModel
from ..base import Prediction, register
from ..cost import Cost
from ..params import Param, Tags

__all__ = ["Cfa", "CoordConv1x1", "cfa_loss", "softmin_score", "LOSS_SCALE", "KMEANS_MAX_ITER"]

#: 1 / nu of the authors' soft-boundary loss (nu = 1e-3): both terms are scaled by it.
LOSS_SCALE = 1e3
#: Lloyd iterations at most when gamma_c > 1 (the code's ``KMeans(max_iter=3000)``).
KMEANS_MAX_ITER = 3000
_FEATURE_BATCH = 16  # images per batch of feature extraction
#: Bytes of temporaries per block of the k-NN search (the kernel's default is 256 MB; its exact
#: re-computation of the K + J distances found then holds [rows, K + J, D] blocks of this size).
_KNN_BUDGET = 64 * 2**20


class CoordConv1x1(nn.Module):
    """CoordConv with a 1x1 kernel (Liu et al., 2018; the authors' ``CoordConv2d``): appends the
    row and the column coordinate, each scaled to [-1, 1], and convolves ``in + 2 -> out``."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels + 2, out_channels, kernel_size=1)

    @staticmethod
    def coordinates(h: int, w: int, like: torch.Tensor) -> torch.Tensor:
        """``[1, 2, h, w]``: the row index ``i / (h - 1) * 2 - 1`` then the column index."""
        rows = torch.arange(h, device=like.device, dtype=like.dtype) / max(h - 1, 1) * 2 - 1
        cols = torch.arange(w, device=like.device, dtype=like.dtype) / max(w - 1, 1) * 2 - 1
        return torch.stack([rows.view(h, 1).expand(h, w), cols.view(1, w).expand(h, w)]).unsqueeze(0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        coords = self.coordinates(h, w, x).expand(b, -1, -1, -1)
        return self.conv(torch.cat([x, coords], dim=1))


def cfa_loss(phi: torch.Tensor, bank: torch.Tensor, radius: torch.Tensor, k: int = 3, j: int = 3,
             alpha: float = 0.1, index: NearestNeighbors | None = None) -> torch.Tensor:
    """L_CFA of the patch features ``phi`` ``[N, D]`` against the memory ``bank`` ``[M, D]`` (see the
    module docstring): ``LOSS_SCALE * (L_att + L_rep)``, the means over the ``N K`` attracted and the
    ``N J`` repelled squared distances. The ``K + J`` nearest are found without gradient (``index``:
    a prebuilt :class:`NearestNeighbors` of ``bank``), their distances recomputed with it."""
    with torch.no_grad():
        _, idx = (index or NearestNeighbors(bank)).query(phi.detach(), k=k + j, memory_budget=_KNN_BUDGET)
    d2 = (phi.unsqueeze(1) - bank[idx]).square().sum(dim=-1)  # [N, K + J], ascending
    r2 = radius.square()
    loss = (d2[:, :k] - r2).clamp_min(0).mean()
    if j:
        loss = loss + (r2 - d2[:, k:k + j] - alpha).clamp_min(0).mean()
    return LOSS_SCALE * loss


def softmin_score(dist: torch.Tensor) -> torch.Tensor:
    """The patch score of the ascending distances ``dist`` ``[..., K]`` to the K nearest memorised
    features: ``softmin(dist)[..., 0] * dist[..., 0]``."""
    return torch.softmax(-dist, dim=-1)[..., 0] * dist[..., 0]


@register
class Cfa(BackboneModel):
    """CFA (Lee et al., IEEE Access 2022): a CoordConv patch descriptor adapted to the target by
    the coupled-hypersphere loss around a memory of patch features; softmin-weighted distance."""

    name = "cfa"
    paradigm = "adaptation"
    description = "CFA (IEEE Access 2022): CoordConv descriptor adapted on coupled hyperspheres, softmin distance"
    paper = "Lee, Lee & Song, IEEE Access 2022"
    notes = (
        "the authors' code's defaults (three stride-4/8/16 layers pooled 3x3 and concatenated, CoordConv 1x1 "
        "descriptor to D / gamma_d, memory = per-position mean of the descriptor over the training set, k-means "
        "to hw / gamma_c when gamma_c > 1, K = 3, J = 3, r = 1e-5 learnt, alpha 0.1, loss x 1/nu = 1000, AdamW "
        "lr 1e-3 wd 5e-4 AMSGrad, batch 4, 30 epochs; score = softmin over the K nearest x nearest distance, "
        "blur sigma 4, max); backbone EfficientNet-Lite0 at the same strides instead of Wide-ResNet50-2; memory "
        "built as the code does, not by the paper's EMA; hard negatives = the J after the K nearest; last "
        "incomplete batch kept; anomalib's constant radius not followed"
    )
    hparams = (
        Param("gamma_d", "int", 1, "descriptor compression: the CoordConv maps the D backbone channels to "
              "D / gamma_d", ge=1),
        Param("gamma_c", "int", 1, "memory compression: k-means to (h w) / gamma_c memorised features when > 1; "
              "1 = one per grid position", ge=1),
        Param("k", "int", 3, "K: nearest memorised features attracted (loss) and soft-minned (score)", ge=1),
        Param("j", "int", 3, "J: hard negatives repelled, the memorised features after the K nearest", ge=0),
        Param("radius", "float", 1e-5, "r: initial hypersphere radius (learnt with the descriptor)", gt=0),
        Param("alpha", "float", 0.1, "alpha: margin of the repulsion term", ge=0),
        Param("epochs", "int", 30, "training epochs (the authors' code)", ge=1),
        Param("batch_size", "int", 4, "training batch size (the authors' code)", ge=1),
        Param("lr", "float", 1e-3, "AdamW learning rate", gt=0),
        Param("weight_decay", "float", 5e-4, "AdamW weight decay", ge=0),
    )
    # export: the k-NN search is blocked over the patches, which bakes the batch size into the graph
    # (as PatchCore): exported for batch 1
    tags = Tags(settings={"one-class", "multi-class", "few-shot", "blind"}, trains=True, pixel_level=True,
                weights="backbone", export="batch-1", input="rgb")
    # python benchmarks/costs.py --models cfa (quiet machine, 2 threads)
    cost = Cost(predict=0.0753, fit=0.0753, epoch=0.117, passes="epochs",
                measured="benchmarks/costs.py, synthetic:washer 256 px, 2026-12-02, quiet machine")
    smoke = {"image_size": 32, "epochs": 1, "batch_size": 4}

    def _build(self, pretrained: bool = True) -> None:
        backbone = self.build_backbone(pretrained)
        d = sum(backbone.channels[l] for l in self.layers)
        out = d // self.params["gamma_d"]
        if out < 1:
            raise DefectscopeError(f"{self.name}: gamma_d={self.params['gamma_d']} leaves no descriptor channel "
                                   f"({d} backbone channels); use gamma_d <= {d}")
        self.descriptor = CoordConv1x1(d, out)
        self.radius = nn.Parameter(torch.full((1,), float(self.params["radius"])))
        self.register_buffer("memory_bank", torch.empty(0, out))
        self._inference = InferenceCache()
        self._index = None

    # -- features ----------------------------------------------------------------------------------
    def pooled(self, images: torch.Tensor) -> list[torch.Tensor]:
        """The backbone layers, each average-pooled 3x3 at its own resolution: ``[B, C_l, h_l, w_l]``."""
        feats = inference_backbone(self._inference, self.backbone)(images)
        return [F.avg_pool2d(feats[l], 3, 1, 1) for l in self.layers]

    @staticmethod
    def assemble(pooled: list[torch.Tensor]) -> torch.Tensor:
        """``p`` ``[B, D, h, w]``: the pooled layers upsampled (bilinear) to the first one's grid, concatenated."""
        size = pooled[0].shape[-2:]
        return torch.cat([pooled[0]] + [F.interpolate(f, size=size, mode="bilinear", align_corners=False)
                                        for f in pooled[1:]], dim=1)

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """The target-oriented features phi(p) ``[B, D / gamma_d, h, w]``."""
        return self.descriptor(self.assemble(self.pooled(images)))

    def index(self) -> NearestNeighbors:
        """The k-NN index of the memory bank (centred bank and norms), built once per bank."""
        if self._index is None or self._index[0] is not self.memory_bank:
            self._index = (self.memory_bank, NearestNeighbors(self.memory_bank))
        return self._index[1]

    # -- fit ---------------------------------------------------------------------------------------
    @torch.no_grad()
    def _extract(self, dataset) -> list[torch.Tensor]:
        """The pooled layers of every training image, ``[N, C_l, h_l, w_l]`` each (filled in place)."""
        loader = torch.utils.data.DataLoader(dataset, batch_size=_FEATURE_BATCH, num_workers=0)
        out: list[torch.Tensor] | None = None
        n = 0
        for batch in progress(loader, desc=f"{self.name} features", unit="batch"):
            pooled = self.pooled(batch["image"].to(self.device, torch.float32))
            if out is None:
                out = [p.new_empty(len(dataset), *p.shape[1:]).contiguous() for p in pooled]
            for o, p in zip(out, pooled):
                o[n:n + p.shape[0]] = p
            n += pooled[0].shape[0]
        assert out is not None
        return out

    def _fit(self, dataset, val_dataset=None) -> None:
        p = self.params
        gen = seed_everything(p["seed"])
        self.to(auto_device(p["device"]))
        feats = self._extract(dataset)
        k, j = p["k"], p["j"]
        with torch.no_grad():  # C: phi of the mean feature = the mean of phi (phi is affine)
            mean = self.descriptor(self.assemble([f.mean(dim=0, keepdim=True) for f in feats]))
            bank = mean[0].flatten(1).T.contiguous()  # [h w, D'], row-major positions
        if p["gamma_c"] > 1:
            n_clusters = bank.shape[0] // p["gamma_c"]
            if n_clusters < k + j:
                raise DefectscopeError(f"{self.name}: gamma_c={p['gamma_c']} leaves {n_clusters} memorised features "
                                       f"for K + J = {k + j} neighbours; use a smaller gamma_c or larger images")
            bank = kmeans(bank, n_clusters, max_iter=KMEANS_MAX_ITER,
                          generator=torch.Generator().manual_seed(p["seed"])).centers
        if bank.shape[0] < k + j:
            raise DefectscopeError(f"{self.name}: the {bank.shape[0]} memorised features of {self.image_size} px "
                                   f"images are fewer than K + J = {k + j}; use larger images or smaller k / j")
        self.memory_bank = bank.contiguous()
        index = self.index()

        def loss(idx: torch.Tensor) -> torch.Tensor:
            phi = self.descriptor(self.assemble([f[idx] for f in feats]))
            return cfa_loss(phi.permute(0, 2, 3, 1).reshape(-1, phi.shape[1]), self.memory_bank, self.radius,
                            k, j, p["alpha"], index)

        opt = torch.optim.AdamW(list(self.descriptor.parameters()) + [self.radius], lr=p["lr"],
                                weight_decay=p["weight_decay"], amsgrad=True)
        order = torch.arange(len(dataset), device=self.device)  # batches of indices into the cached features
        self.history = train_loop(self.descriptor, loss, order, epochs=p["epochs"], optimizer=opt,
                                  batch_size=p["batch_size"], generator=gen, desc=f"fit {self.name}",
                                  device=self.device)

    # -- predict -----------------------------------------------------------------------------------
    def _predict(self, images: torch.Tensor) -> Prediction:
        phi = self.embed(images)
        b, d, h, w = phi.shape
        dist, _ = self.index().query(phi.permute(0, 2, 3, 1).reshape(-1, d), k=self.params["k"],
                                     memory_budget=_KNN_BUDGET)
        amap = self.postprocess(softmin_score(dist).view(b, h, w))
        return Prediction(score=amap.flatten(1).amax(dim=1), anomaly_map=amap)
