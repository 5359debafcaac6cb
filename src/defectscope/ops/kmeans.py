"""k-means clustering (Lloyd's algorithm with greedy k-means++ seeding), scikit-learn's semantics.

Used by CFA (Lee et al., IEEE Access 2022) to compress its memory bank when gamma_c > 1: the
authors' code calls ``sklearn.cluster.KMeans(n_clusters, max_iter=3000)``; this is the same
algorithm in torch, seeded by a torch generator, so the model needs no scikit-learn at run time:

* seeding (Arthur & Vassilvitskii, SODA 2007, in scikit-learn's *greedy* form): the first centre
  is a uniformly drawn point; each next one is the best, by the resulting potential (sum of squared
  distances to the closest centre), of ``2 + floor(ln k)`` candidates drawn with probability
  proportional to their squared distance to the closest centre chosen so far;
* Lloyd iterations: assign every point to its nearest centre (the shared exact k-NN kernel,
  :class:`defectscope.ops.NearestNeighbors`), move every centre to the mean of its points (float64
  sums), until the assignment no longer changes (strict convergence) or the squared centre shift,
  summed over the centres, is at most ``tol`` times the mean per-feature variance of the data
  (scikit-learn's relative tolerance), or ``max_iter`` iterations;
* a centre left without points is moved to the point farthest from its own centre (the farthest
  ones first when several are empty), as scikit-learn relocates empty clusters;
* the labels returned are those of the final centres (scikit-learn's last E-step).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from .knn import NearestNeighbors

__all__ = ["KMeansResult", "kmeans", "kmeans_plusplus"]


class KMeansResult(NamedTuple):
    """``centers`` ``[k, D]`` (the input's dtype), ``labels`` ``[N]`` int64 (nearest centre of each
    point), ``inertia`` (sum of squared distances to the nearest centre, a float) and ``n_iter``
    (Lloyd iterations run)."""

    centers: torch.Tensor
    labels: torch.Tensor
    inertia: float
    n_iter: int


def _sq_dist(a: torch.Tensor, b: torch.Tensor, a_sq: torch.Tensor, b_sq: torch.Tensor) -> torch.Tensor:
    """Squared Euclidean distances ``[len(a), len(b)]`` by the norm trick, clamped at 0."""
    return (a_sq.unsqueeze(1) + b_sq.unsqueeze(0) - 2.0 * (a @ b.T)).clamp_min_(0.0)


def kmeans_plusplus(x: torch.Tensor, k: int, generator: torch.Generator | None = None,
                    n_local_trials: int | None = None) -> torch.Tensor:
    """Indices ``[k]`` of the points of ``x`` ``[N, D]`` chosen as initial centres by greedy
    k-means++ (scikit-learn's ``_kmeans_plusplus``: ``2 + floor(ln k)`` candidates per centre, the
    one that lowers the potential most is kept). Computed in float64."""
    n = x.shape[0]
    if not 1 <= k <= n:
        raise ValueError(f"k must be in [1, {n}] (the number of points), got {k}")
    trials = n_local_trials if n_local_trials is not None else 2 + int(math.log(k))
    xd = x.detach().to(torch.float64)
    sq = (xd * xd).sum(dim=1)
    idx = torch.empty(k, dtype=torch.int64)
    first = int(torch.randint(n, (1,), generator=generator))
    idx[0] = first
    closest = _sq_dist(xd[first:first + 1], xd, sq[first:first + 1], sq)[0]  # [N]
    potential = closest.sum()
    for c in range(1, k):
        if potential <= 0:  # every point coincides with a centre already: take unused points in order
            used = torch.zeros(n, dtype=torch.bool)
            used[idx[:c]] = True
            idx[c:] = torch.nonzero(~used).flatten()[: k - c]
            break
        r = (torch.rand(trials, generator=generator, dtype=torch.float64) * float(potential)).to(xd.device)
        cand = torch.searchsorted(torch.cumsum(closest, 0), r).clamp_(max=n - 1)
        new = torch.minimum(closest.unsqueeze(0), _sq_dist(xd[cand], xd, sq[cand], sq))  # [T, N]
        pots = new.sum(dim=1)
        best = int(pots.argmin())
        idx[c], closest, potential = cand[best], new[best], pots[best]
    return idx


def kmeans(x: torch.Tensor, k: int, *, max_iter: int = 300, tol: float = 1e-4,
           generator: torch.Generator | None = None, init: torch.Tensor | None = None) -> KMeansResult:
    """Cluster the rows of ``x`` ``[N, D]`` into ``k`` clusters (see the module docstring).

    Args:
        x: the points (float32 or float64; the distances are computed in that dtype, the centre
            sums in float64).
        k: clusters, ``1 <= k <= N``.
        max_iter: most Lloyd iterations (scikit-learn's default 300; CFA's code 3000).
        tol: relative tolerance on the squared centre shift (scikit-learn's ``tol``).
        generator: draws of the k-means++ seeding.
        init: ``[k, D]`` initial centres instead of k-means++ (as scikit-learn's ``init=array``).
    """
    if x.ndim != 2:
        raise ValueError(f"x [N, D] expected, got {tuple(x.shape)}")
    n, d = x.shape
    if not 1 <= k <= n:
        raise ValueError(f"k must be in [1, {n}] (the number of points), got {k}")
    x = x.detach()
    x64 = x.to(torch.float64)
    if init is not None:
        if tuple(init.shape) != (k, d):
            raise ValueError(f"init [{k}, {d}] expected, got {tuple(init.shape)}")
        centers = init.detach().to(x.device, x.dtype).clone()
    else:
        centers = x[kmeans_plusplus(x, k, generator).to(x.device)].clone()
    tol_abs = float(tol * x64.var(dim=0, unbiased=False).mean()) if n > 1 else 0.0
    prev = None
    it = 0
    for it in range(1, max_iter + 1):
        dist, lab = NearestNeighbors(centers).query(x, k=1)
        labels = lab[:, 0]
        counts = torch.bincount(labels, minlength=k)
        sums = torch.zeros(k, d, dtype=torch.float64, device=x.device).index_add_(0, labels, x64)
        new = (sums / counts.clamp_min(1).unsqueeze(1)).to(x.dtype)
        empty = torch.nonzero(counts == 0).flatten()
        if empty.numel():  # relocate empty clusters to the points farthest from their centres
            far = torch.topk(dist[:, 0], empty.numel()).indices
            new[empty] = x[far]
        shift = float((new.to(torch.float64) - centers.to(torch.float64)).square().sum())
        centers = new
        if prev is not None and torch.equal(labels, prev):
            break  # strict convergence: the same assignment, hence the same centres
        prev = labels
        if shift <= tol_abs:
            break
    dist, lab = NearestNeighbors(centers).query(x, k=1)  # the labels of the final centres
    inertia = float(dist[:, 0].to(torch.float64).square().sum())
    return KMeansResult(centers, lab[:, 0], inertia, it)
