"""Greedy coreset (k-center) subsampling of PatchCore.

Roth et al., "Towards Total Recall in Industrial Anomaly Detection", CVPR 2022, Sec. 3.2 and
Algorithm 1: the memory bank is reduced to the points picked by the greedy minimax
facility-location (k-center) rule

    m* = argmax_{m in M \\ M_C}  min_{c in M_C} || psi(m) - psi(c) ||_2 ,   M_C <- M_C u {m*}

where psi is a Johnson-Lindenstrauss random linear projection that makes the distances cheap.

The rule is inherently sequential (each pick depends on all previous ones), and a direct
implementation re-reads all N features for every pick: a matrix-vector product, memory-bound,
~100 MB per step at N = 204,800, D = 128. This implementation gives *the same picks* (it is exact,
not an approximation) but does most of that work as matrix-matrix products, which are
compute-bound and several times faster per point on a CPU:

* Distances use the norm trick ``|x - c|^2 = |x|^2 + |c|^2 - 2 x.c`` on mean-centred features
  (centring cancels the common offset of CNN features and keeps the cancellation error small).
* Lazy evaluation with an exact bound. Every point keeps ``u`` = its exact min squared distance
  to the centres of the last *flush*; centres picked since then are *pending*. Min distances only
  shrink, so ``u`` bounds a point's current min distance from above. Only a *frontier* -- the
  points with the largest ``u``, taken in decreasing order of ``u`` -- is kept exactly up to date
  at each step (a small matrix-vector product). If the best exact value in the frontier is
  larger than the largest ``u`` outside it, it is the true argmax; otherwise the frontier is
  extended (its new points are brought up to date against the pending centres with one small
  matrix product). Every ``flush_every`` picks (or when the frontier grows too large) all points
  are brought up to date against the pending centres with one blocked matrix product.
* Ties are broken towards the lowest index, as ``torch.argmax`` over all points would.

``method="dense"`` is the direct formulation (one norm-trick matrix-vector product over all
points per step, in place, no per-step allocation); it is what the lazy one is tested against,
besides the naive ``cdist`` loop, and it is the better choice on a GPU.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

__all__ = ["greedy_coreset", "coreset_projection", "coreset_size", "CoresetResult"]


class CoresetResult(NamedTuple):
    """Indices of the coreset (in pick order) and, for every input point, its Euclidean distance
    (in the projected space) to the nearest coreset point; 0 for the coreset points."""

    indices: torch.Tensor  # [n] int64
    min_distances: torch.Tensor  # [N] float


def coreset_size(num_points: int, n: int | None = None, ratio: float | None = None) -> int:
    """Number of points to keep: ``n``, or ``floor(num_points * ratio)`` (at least 1)."""
    if (n is None) == (ratio is None):
        raise ValueError("give exactly one of n (number of points) and ratio (fraction kept)")
    if n is None:
        if not 0.0 < ratio <= 1.0:
            raise ValueError(f"ratio must be in (0, 1], got {ratio}")
        # The 1e-9 absorbs binary rounding (0.29 * 100 = 28.999999999999996).
        n = max(1, int(math.floor(num_points * ratio + 1e-9)))
    n = int(n)
    if not 1 <= n <= num_points:
        raise ValueError(f"coreset size must be in [1, {num_points}], got {n}")
    return n


def coreset_projection(
    features: torch.Tensor, projection_dim: int | None = 128, seed: int = 0
) -> tuple[torch.Tensor, torch.Generator]:
    """The Johnson-Lindenstrauss projection used by :func:`greedy_coreset`.

    Returns ``(projected [N, d], generator)``. The generator is a CPU ``torch.Generator`` seeded
    with ``seed``; when ``projection_dim`` is not None and ``D > projection_dim`` the matrix
    ``W [D, projection_dim]`` is drawn from it first (in float32), i.i.d. N(0, 1/projection_dim),
    and the
    features are mapped to ``features @ W``; otherwise they are used as they are (cast to the
    compute dtype: float64 stays float64, everything else becomes float32). The caller draws the
    start point from the same generator afterwards.
    """
    if features.ndim != 2:
        raise ValueError(f"features must be [N, D], got shape {tuple(features.shape)}")
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    dtype = torch.float64 if features.dtype == torch.float64 else torch.float32
    x = features.detach().to(dtype)
    d = x.shape[1]
    if projection_dim is not None and d > projection_dim:
        # Drawn in float32 whatever the compute dtype, so float32 and float64 runs share it.
        w = torch.randn(d, projection_dim, generator=gen) / math.sqrt(projection_dim)
        x = x @ w.to(device=x.device, dtype=dtype)
    return x.contiguous(), gen


def greedy_coreset(
    features: torch.Tensor,
    n: int | None = None,
    *,
    ratio: float | None = None,
    projection_dim: int | None = 128,
    seed: int = 0,
    return_min_distances: bool = False,
    method: str = "auto",
    progress: bool | None = None,
    flush_every: int = 256,
    max_frontier: int = 8192,
) -> torch.Tensor | CoresetResult:
    """Greedy k-center coreset of PatchCore (Roth et al. CVPR 2022, Algorithm 1).

    Args:
        features: [N, D] patch features (any float dtype, any device).
        n: number of points to select; or give ``ratio`` instead (``floor(N * ratio)``).
        projection_dim: dimension of the random projection; ``None`` or ``D <= projection_dim``
            uses the features unprojected. See :func:`coreset_projection`.
        seed: seeds the projection matrix and then the random start point
            (``torch.randint(N, (1,), generator=g)``).
        return_min_distances: also return each point's distance to the coreset (see
            :class:`CoresetResult`); costs one more pass over the data.
        method: ``"lazy"`` (exact, matrix-matrix, see the module docstring), ``"dense"``
            (exact, one matrix-vector product per step) or ``"auto"`` (lazy on CPU, dense
            elsewhere).
        progress: tqdm bar; ``None`` shows it for n >= 10,000 when stderr is a terminal.
        flush_every, max_frontier: tuning of the lazy method (results do not depend on them).

    Returns:
        ``idx [n] int64``, the selected rows of ``features`` in pick order; the random start
        point is the first and counts towards ``n``. With ``return_min_distances`` a
        :class:`CoresetResult` ``(indices, min_distances [N])``.

    Computation is float32 (float64 if the features are float64) on squared distances; picks are
    those of the exact rule, with ties going to the lowest index, unless two candidates' distances
    differ by less than the float rounding error (measure zero on real-valued data).
    """
    if features.ndim != 2:
        raise ValueError(f"features must be [N, D], got shape {tuple(features.shape)}")
    num = features.shape[0]
    n = coreset_size(num, n, ratio)
    if method not in ("auto", "lazy", "dense"):
        raise ValueError(f"method must be 'auto', 'lazy' or 'dense', got {method!r}")
    if method == "auto":
        method = "lazy" if features.device.type == "cpu" else "dense"

    x, gen = coreset_projection(features, projection_dim, seed)
    start = int(torch.randint(num, (1,), generator=gen).item())
    with torch.no_grad():
        x = (x - x.mean(dim=0, keepdim=True)).contiguous()
        sq = torch.einsum("nd,nd->n", x, x)
        pbar = _progress_bar(n, progress)
        try:
            if method == "dense":
                idx, u, mark, cx, csq = _greedy_dense(x, sq, n, start, pbar)
            else:
                idx, u, mark, cx, csq = _greedy_lazy(x, sq, n, start, pbar, int(flush_every),
                                                     int(max_frontier))
        finally:
            if pbar is not None:
                pbar.close()
        if not return_min_distances:
            return idx
        # u[i] holds the centres idx[:mark[i]]: apply the others
        _catch_up(x, sq, u, mark, cx, csq, n, torch.arange(num, device=x.device))
        u[idx] = 0.0
        return CoresetResult(idx, u.clamp_(min=0).sqrt_())


# ------------------------------------------------------------------------------------------------


def _progress_bar(n: int, progress: bool | None):
    if progress is False or (progress is None and n < 10_000):
        return None
    from tqdm.auto import tqdm

    return tqdm(total=n, desc="coreset", unit="pt", disable=None if progress is None else False,
                mininterval=0.5)


def _greedy_dense(x, sq, n, start, pbar):
    """One norm-trick matrix-vector product over all N points per pick, all in place."""
    num = x.shape[0]
    u = torch.empty(num, dtype=x.dtype, device=x.device)
    buf = torch.empty_like(u)
    idx = torch.empty(n, dtype=torch.int64)
    c = start
    torch.addmv(sq, x, x[c], alpha=-2, out=u).add_(sq[c])
    for k in range(n):
        idx[k] = c
        u[c] = -math.inf  # never picked again; becomes 0 on output
        if pbar is not None:
            pbar.update(1)
        if k + 1 == n:
            break
        if k > 0:
            torch.addmv(sq, x, x[c], alpha=-2, out=buf).add_(sq[c])
            torch.minimum(u, buf, out=u)
        c = int(torch.argmax(u).item())
    # u holds the centres idx[:n-1] (the last pick is not applied)
    mark = torch.full((num,), n - 1, dtype=torch.int64, device=x.device)
    idx = idx.to(x.device)
    return idx, u, mark, x[idx], sq[idx]


def _min_sqdist(x, sq, rows, cx, csq, budget=1 << 22):
    """min_c |x_r - c|^2 over the centres ``cx [K, D]`` (squared norms ``csq [K]``) for the given
    rows (an index tensor): blocked matrix products, at most ``budget`` distances at a time."""
    out = torch.full((rows.numel(),), math.inf, dtype=x.dtype, device=x.device)
    cols = max(1, min(cx.shape[0], 4096))
    step = max(256, budget // cols)
    for lo in range(0, rows.numel(), step):
        r = rows[lo : lo + step]
        xr = x[r]
        best = out[lo : lo + step]
        for c0 in range(0, cx.shape[0], cols):
            d = torch.addmm(csq[c0 : c0 + cols].unsqueeze(0), xr, cx[c0 : c0 + cols].T, alpha=-2)
            torch.minimum(best, d.amin(dim=1), out=best)
        best.add_(sq[r])
    return out


def _catch_up(x, sq, u, mark, cx, csq, k, rows):
    """Bring ``rows`` up to date: u[r] = min(u[r], distances to the centres cx[mark[r]:k]), then
    mark[r] = k. Rows share few distinct marks; each group is one blocked matrix product."""
    if rows.numel() == 0:
        return
    marks = mark[rows]
    lo_mark = int(marks.min())
    if lo_mark < k:
        if lo_mark == int(marks.max()):
            u[rows] = torch.minimum(u[rows], _min_sqdist(x, sq, rows, cx[lo_mark:k], csq[lo_mark:k]))
        else:
            for m0 in torch.unique(marks).tolist():
                if m0 < k:
                    r = rows[marks == m0]
                    u[r] = torch.minimum(u[r], _min_sqdist(x, sq, r, cx[m0:k], csq[m0:k]))
    mark[rows] = k


def _greedy_lazy(x, sq, n, start, pbar, flush_every, max_frontier):
    """Exact lazy greedy selection (see the module docstring).

    ``u[i]`` is the min squared distance of point i to the centres ``cx[:mark[i]]`` (the first
    ``mark[i]`` picks): an upper bound of its distance to the coreset. Each period starts with a
    top-k of ``u`` over all points (the candidate list, in decreasing ``u``). The *frontier* holds
    the points that may be picked next, exact and updated at every pick; when its best value is
    not above ``thr`` -- the largest ``u`` outside it -- the next chunk of candidates (from the
    list, or from the points evicted earlier in the period, whichever has the larger ``u``) is
    brought up to date and joins it, and the frontier points now below ``thr`` are evicted (their
    exact value kept in ``u``), so that per-pick work stays small.
    """
    num, dim = x.shape
    dev = x.device
    ninf = -math.inf
    flush_every = max(1, flush_every)
    max_frontier = max(1, max_frontier)
    chunk = min(1024, max(64, max_frontier // 8))  # frontier growth step
    u = torch.empty(num, dtype=x.dtype, device=dev)
    torch.addmv(sq, x, x[start], alpha=-2, out=u).add_(sq[start])
    u[start] = ninf
    mark = torch.ones(num, dtype=torch.int64, device=dev)
    idx = torch.empty(n, dtype=torch.int64)  # on the CPU: written one pick at a time
    idx[0] = start
    cx = torch.empty(n, dim, dtype=x.dtype, device=dev)  # the centres, contiguous
    csq = torch.empty(n, dtype=x.dtype, device=dev)
    cx[0], csq[0] = x[start], sq[start]
    if pbar is not None:
        pbar.update(1)
    k = 1
    cap_base = max(max_frontier, chunk)
    cap = cap_base  # length of the candidate list
    empty_i = torch.empty(0, dtype=torch.int64, device=dev)
    while k < n:
        # ---- new period: candidate list = top of u ----
        list_len = min(num, cap)
        vals, order = torch.topk(u, list_len)  # descending, possibly stale values
        list_rest = float(vals[-1]) if list_len < num else ninf  # bound of the unlisted points
        ptr = 0
        s, ms = empty_i, u[empty_i]  # frontier (sorted by index) and its exact values
        ev_i, ev_v = empty_i, ms  # evicted this period
        xs, sqs, buf = x[s], sq[s], ms
        thr = math.inf
        first_pending = k
        while k < n:
            mx, j = torch.max(ms, dim=0) if ms.numel() else (None, None)
            if mx is None or not mx.item() > thr:
                # ---- extend: the next chunk of candidates joins the frontier ----
                list_next = float(vals[ptr]) if ptr < list_len else list_rest
                ev_max = float(ev_v.max()) if ev_v.numel() else ninf
                if ev_max >= list_next and ev_v.numel():
                    if ev_v.numel() > chunk:
                        sel = torch.topk(ev_v, chunk).indices
                        keep = torch.ones_like(ev_v, dtype=torch.bool)
                        keep[sel] = False
                        new, ev_i, ev_v = ev_i[sel], ev_i[keep], ev_v[keep]
                    else:
                        new, ev_i, ev_v = ev_i, empty_i, ev_v[:0]
                elif ptr < list_len:
                    new = order[ptr : ptr + chunk]
                    ptr += new.numel()
                else:
                    break  # candidate list used up: new period, look further down
                _catch_up(x, sq, u, mark, cx, csq, k, new)
                cand = torch.cat([s, new])
                cval = torch.cat([ms, u[new]])
                list_next = float(vals[ptr]) if ptr < list_len else list_rest
                ev_max = float(ev_v.max()) if ev_v.numel() else ninf
                thr = max(list_next, ev_max)
                low = cval < thr  # cannot be picked before thr comes down: evict
                if bool(low.any()):
                    out = cand[low]
                    u[out] = cval[low]
                    mark[out] = k
                    ev_i = torch.cat([ev_i, out])
                    ev_v = torch.cat([ev_v, cval[low]])
                    cand, cval = cand[~low], cval[~low]
                s, perm = torch.sort(cand)
                ms = cval[perm]
                xs, sqs = x[s], sq[s]
                buf = torch.empty_like(ms)
                continue
            jj = int(j.item())
            c = int(s[jj].item())
            idx[k] = c
            cx[k], csq[k] = x[c], sq[c]
            k += 1
            ms[jj] = ninf
            if pbar is not None:
                pbar.update(1)
            if k == n or k - first_pending >= flush_every:
                break
            torch.addmv(sqs, xs, x[c], alpha=-2, out=buf).add_(sq[c])
            torch.minimum(ms, buf, out=ms)
        # ---- end of period: the frontier back into u (exact except perhaps the last pick) ----
        u[s] = ms
        mark[s] = k - 1 if k > first_pending else k
        if k == first_pending and list_len < num:
            cap *= 2  # no pick: many ties at the top, look further down the list
        else:
            cap = cap_base
    return idx.to(dev), u, mark, cx, csq
