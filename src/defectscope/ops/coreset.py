"""Greedy coreset (k-center) subsampling of PatchCore.

Roth et al., "Towards Total Recall in Industrial Anomaly Detection", CVPR 2022, Sec. 3.2 and
Algorithm 1: the memory bank is reduced to the points picked by the greedy minimax
facility-location (k-center) rule

    m* = argmax_{m in M \\ M_C}  min_{c in M_C} || psi(m) - psi(c) ||_2 ,   M_C <- M_C u {m*}

where psi is a Johnson-Lindenstrauss random linear projection that makes the distances cheap.

The rule is inherently sequential (each pick depends on all previous ones). The direct
implementation (anomalib's ``KCenterGreedy``) re-reads all N features for every pick: an
``[N, D]`` difference and its norm, memory-bound, ~100 MB per step at N = 204,800, D = 128. This
implementation makes *the same picks* (it is exact, not an approximation) with much less work:

* Distances use the norm trick ``|x - c|^2 = |x|^2 + |c|^2 - 2 x.c`` with precomputed squared
  norms, on mean-centred features (centring removes the common offset of CNN features and keeps
  the cancellation error small). Squared distances throughout (same argmax).
* Lazy evaluation with exact bounds. Min distances only shrink as centres are added, so a
  point's min distance to the *first* ``mark`` centres, ``u``, bounds its current one from above.
  Within a period of ``flush_every`` picks only a *frontier* -- the points with the largest
  ``u``, taken in decreasing order of ``u`` -- is kept exact at each pick (a small in-place
  matrix-vector product). When its best value exceeds the largest ``u`` outside it, that is the
  true argmax; otherwise the frontier grows by the next candidates (brought up to date with one
  small matrix product). At the end of a period the other points catch up with one blocked
  matrix-matrix product (compute-bound: several times cheaper per distance than the per-step
  matrix-vector product).
* Dormant points. A point whose ``u`` is below a *level* (0.85 x the current largest ``u``)
  cannot be picked before every point above it is; it is left out of the catch-ups until the
  level comes down to it (most points of a real memory bank fall far below the final coverage
  radius early and are never looked at again). Points are then brought up to date in groups
  that share their ``mark``, one matrix product each.
* Ties go to the lowest index (the frontier is kept sorted by index), as ``torch.argmax`` over
  all points would -- up to the float rounding of the distances, see :func:`greedy_coreset`.

For banks too large to hold, :func:`two_stage_coreset` (with :func:`stage_one` /
:func:`stage_two` for a bank built as its features are extracted) is the approximate,
composable selection: greedy per block, then greedy on the blocks' survivors.

``method="dense"`` is the direct formulation done well (one norm-trick matrix-vector product over
all points per step, in place, no per-step allocation): simpler, and the better choice on a GPU.

Measured with benchmarks/ops_timing.py on a shared 2-core CPU (load ~4): N = 204,800, d = 128,
20,480 picks: 1.2 ms per pick on 1 thread, 2.3-3.7 ms on 2 (random and real EfficientNet
features), against 150-230 ms for the anomalib-style loop and 29-70 ms for ``method="dense"``.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

__all__ = ["greedy_coreset", "coreset_projection", "projection_matrix", "coreset_size", "CoresetResult",
           "coreset_min_distances", "two_stage_coreset", "stage_one", "stage_two"]


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
    ``W [D, projection_dim]`` is drawn from it first (in float32, whatever the compute dtype),
    i.i.d. N(0, 1/projection_dim), and the features are mapped to ``features @ W``; otherwise
    they are used as they are. Compute dtype: float64 stays float64, everything else becomes
    float32. :func:`greedy_coreset` draws its start point from the same generator afterwards.
    """
    if features.ndim != 2:
        raise ValueError(f"features must be [N, D], got shape {tuple(features.shape)}")
    w, gen = projection_matrix(features.shape[1], projection_dim, seed)
    return project(features, w), gen


def projection_matrix(dim: int, projection_dim: int | None = 128,
                      seed: int = 0) -> tuple[torch.Tensor | None, torch.Generator]:
    """``(W [dim, projection_dim] or None, generator)``: the matrix and generator of
    :func:`coreset_projection`, for projecting a bank chunk by chunk (:func:`project`) as its
    features are extracted. ``W`` is None when no projection applies (``dim <= projection_dim``).
    The generator is left in the state :func:`greedy_coreset` draws its start point from."""
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    if projection_dim is None or dim <= projection_dim:
        return None, gen
    # float32 whatever the compute dtype: float32 and float64 runs share the projection
    return torch.randn(dim, projection_dim, generator=gen) / math.sqrt(projection_dim), gen


def project(features: torch.Tensor, w: torch.Tensor | None) -> torch.Tensor:
    """``features @ w`` (``w`` from :func:`projection_matrix`; None: the features as they are) in
    the compute dtype (float64 stays float64, everything else float32), contiguous. Row-wise, so
    projecting chunks and concatenating equals projecting the whole (up to float rounding)."""
    dtype = torch.float64 if features.dtype == torch.float64 else torch.float32
    x = features.detach().to(dtype)
    if w is not None:
        x = x @ w.to(device=x.device, dtype=dtype)
    return x.contiguous()


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
    level: float = 0.85,
    generator: torch.Generator | None = None,
    overwrite: bool = False,
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
        flush_every, max_frontier, level: tuning of the lazy method (period length, largest
            frontier, dormancy level as a fraction of the largest squared distance; ``level=0``
            keeps every point up to date at every period). The picks do not depend on them
            (up to float rounding, see below).
        generator: the features are already projected (:func:`projection_matrix` +
            :func:`project`, e.g. chunk by chunk) and the start point is drawn from this
            generator; ``projection_dim`` and ``seed`` are then ignored. With the generator of
            ``projection_matrix(D, projection_dim, seed)`` the picks are those of
            ``greedy_coreset(raw_features, projection_dim=projection_dim, seed=seed)``.
        overwrite: centre the (projected) features in place instead of in a copy: saves one
            ``[N, d]`` buffer; the caller's tensor is then clobbered when it is float32/float64
            and contiguous (the compute dtype).

    Returns:
        ``idx [n] int64``, the selected rows of ``features`` in pick order; the random start
        point is the first and counts towards ``n``. With ``return_min_distances`` a
        :class:`CoresetResult` ``(indices, min_distances [N])``.

    Exactness: the computation is float32 (float64 if the features are float64). The picks are
    those of the exact rule wherever the best and second-best candidates differ by more than the
    float32 rounding of their distances (~1e-7 relative). At a closer near-tie any float32
    implementation -- this one, anomalib's, a float32 ``cdist`` -- may take either, and the
    sequences then differ (by equally good picks). On random data that does not happen in
    thousands of picks; on a real memory bank of near-identical images it typically happens
    after a few thousand picks. Pass float64 features for picks exact to float64 rounding
    (about twice slower). Exact duplicates: the lazy method may pick another copy of the same
    vector (the copies' distances come from different products, last-bit differences).
    """
    if features.ndim != 2:
        raise ValueError(f"features must be [N, D], got shape {tuple(features.shape)}")
    num = features.shape[0]
    n = coreset_size(num, n, ratio)
    if method not in ("auto", "lazy", "dense"):
        raise ValueError(f"method must be 'auto', 'lazy' or 'dense', got {method!r}")
    if method == "auto":
        method = "lazy" if features.device.type == "cpu" else "dense"

    if generator is None:
        x, gen = coreset_projection(features, projection_dim, seed)
    else:
        x, gen = project(features, None), generator
    start = int(torch.randint(num, (1,), generator=gen).item())
    with torch.no_grad():
        if overwrite:
            x.sub_(x.mean(dim=0, keepdim=True))
        else:
            x = (x - x.mean(dim=0, keepdim=True)).contiguous()
        sq = torch.einsum("nd,nd->n", x, x)
        pbar = _progress_bar(n, progress)
        try:
            if method == "dense":
                idx, u, mark, cx, csq = _greedy_dense(x, sq, n, start, pbar)
            else:
                idx, u, mark, cx, csq = _greedy_lazy(x, sq, n, start, pbar, int(flush_every),
                                                     int(max_frontier), float(level))
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
            d = _min_sqdist(x, sq, rows, cx[lo_mark:k], csq[lo_mark:k])
            u[rows] = torch.minimum(u[rows], d)
        else:
            for m0 in torch.unique(marks).tolist():
                if m0 < k:
                    r = rows[marks == m0]
                    u[r] = torch.minimum(u[r], _min_sqdist(x, sq, r, cx[m0:k], csq[m0:k]))
    mark[rows] = k


def _greedy_lazy(x, sq, n, start, pbar, flush_every, max_frontier, level):
    """Exact lazy greedy selection (see the module docstring).

    ``u[i]`` is the min squared distance of point i to the centres ``cx[:mark[i]]`` (the first
    ``mark[i]`` picks): an upper bound of its distance to the coreset. Points are *active*
    (``u > lev``, brought up to date at every flush) or *dormant* (``u <= lev``, left alone: they
    cannot be picked while something above ``lev`` remains). Within a flush period the
    *frontier* -- the active points of largest ``u``, sorted by index -- is kept exact at every
    pick, and ``thr`` bounds the distance of every point outside it.
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
    cap = cap_base  # length of the candidate list (largest frontier)
    lev = math.inf  # the first pass sets the level
    active = torch.empty(0, dtype=torch.int64, device=dev)
    while k < n:
        ua = u[active]
        if active.numel() == 0 or not float(ua.max()) > lev:
            # ---- nothing active above the level: lower it, wake the points above it ----
            top = float(u.max())
            lev = level * top if top > 0 and level > 0 else ninf
            _catch_up(x, sq, u, mark, cx, csq, k, ((u > lev) & (mark < k)).nonzero()[:, 0])
            active = (u > lev).nonzero()[:, 0]
            continue
        # ---- new period: candidate list = the active points by decreasing u (all exact) ----
        list_len = min(active.numel(), cap)
        vals, pos = torch.topk(ua, list_len)
        order = active[pos]
        ptr = min(chunk, list_len)
        s, perm = torch.sort(order[:ptr])  # sorted by index: argmax -> lowest index
        ms = vals[:ptr][perm]  # exact min squared distances of the frontier points
        xs, sqs = x[s], sq[s]
        buf = torch.empty_like(ms)
        thr = _threshold(vals, ptr, list_len, active.numel(), lev)
        first_pending = k  # cx[first_pending:k]: centres picked in this period
        while k < n:
            mx, j = torch.max(ms, dim=0)
            if not mx.item() > thr:
                # some point outside the frontier may be as far: extend the frontier
                if ptr >= list_len:
                    break  # list used up: new period (look further, or lower the level)
                new = order[ptr : ptr + chunk]
                m_new = vals[ptr : ptr + chunk].clone()
                if k > first_pending:
                    d = _min_sqdist(x, sq, new, cx[first_pending:k], csq[first_pending:k])
                    torch.minimum(m_new, d, out=m_new)
                ptr += new.numel()
                s, perm = torch.sort(torch.cat([s, new]))
                ms = torch.cat([ms, m_new])[perm]
                xs, sqs = x[s], sq[s]
                buf = torch.empty_like(ms)
                thr = _threshold(vals, ptr, list_len, active.numel(), lev)
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
        # ---- flush: frontier back into u, active points up to date, the ones below go dormant
        u[s] = ms
        if k == n:
            break
        if k == first_pending:  # no pick: the candidate list ran out
            if list_len < active.numel():
                cap *= 2  # many ties at the top: look further down
            continue  # else every active point is <= lev now: the next pass lowers the level
        d = _min_sqdist(x, sq, active, cx[first_pending:k], csq[first_pending:k])
        u[active] = torch.minimum(u[active], d)
        mark[active] = k
        active = active[u[active] > lev]
        cap = cap_base
    return idx.to(dev), u, mark, cx, csq


def _threshold(vals, ptr, list_len, num_active, lev):
    """Upper bound of the distance of every point outside the frontier: the largest u of the
    active points not in it, and the level (the dormant points are below it)."""
    if ptr < list_len:
        t = float(vals[ptr].item())
    elif list_len < num_active:
        t = float(vals[list_len - 1].item())
    else:
        t = -math.inf
    return max(t, lev)


# ------------------------------------------------------------------------------------------------
# Two-stage (composable) k-center: the approximate selection for large banks


def coreset_min_distances(x: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """``[N]`` Euclidean distance of every row of ``x [N, d]`` to its nearest row among
    ``x[indices]`` (blocked matrix products on mean-centred float32/float64 copies; exact up to
    float rounding). Its maximum is the coverage radius of the coreset ``indices``."""
    if x.ndim != 2:
        raise ValueError(f"x must be [N, d], got shape {tuple(x.shape)}")
    x = project(x, None)
    x = x - x.mean(dim=0, keepdim=True)
    sq = torch.einsum("nd,nd->n", x, x)
    idx = torch.as_tensor(indices, dtype=torch.int64, device=x.device)
    d = _min_sqdist(x, sq, torch.arange(x.shape[0], device=x.device), x[idx], sq[idx])
    d[idx] = 0.0
    return d.clamp_(min=0).sqrt_()


def stage_one(x: torch.Tensor, ratio: float, oversample: float = 1.0,
              generator: torch.Generator | None = None) -> torch.Tensor:
    """First stage of :func:`two_stage_coreset` on one chunk ``x [c, d]`` (already projected):
    the exact greedy k-center of the chunk keeping ``k = min(c, ceil(oversample * ratio * c))``
    points. Returns their indices in the chunk, in pick order (``arange(c)`` when ``k = c``)."""
    if not oversample >= 1.0:
        raise ValueError(f"oversample must be >= 1, got {oversample}")
    c = x.shape[0]
    k = min(c, max(1, math.ceil(oversample * ratio * c - 1e-9)))
    if k == c:
        return torch.arange(c, device=x.device)
    gen = generator if generator is not None else torch.Generator().manual_seed(0)
    return greedy_coreset(x, k, generator=gen)


def stage_two(x: torch.Tensor, n: int, generator: torch.Generator | None = None, *,
              max_exact: int = 262_144, chunk_size: int = 65_536) -> torch.Tensor:
    """Second stage of :func:`two_stage_coreset`: ``n`` of the first stage's survivors ``x [m, d]``
    (already projected). The exact greedy on all of them when ``m <= max_exact``; above, the
    same reduction again chunk by chunk (chunks of ``chunk_size`` rows, quotas proportional to
    the chunk sizes by largest remainder, summing to ``n``), so the cost stays linear in ``m``."""
    m = x.shape[0]
    if not 1 <= n <= m:
        raise ValueError(f"coreset size must be in [1, {m}], got {n}")
    gen = generator if generator is not None else torch.Generator().manual_seed(0)
    if n == m:
        return torch.arange(m, device=x.device)
    if m <= max_exact:
        return greedy_coreset(x, n, generator=gen)
    bounds = list(range(0, m, chunk_size)) + [m]
    sizes = torch.tensor([hi - lo for lo, hi in zip(bounds[:-1], bounds[1:])], dtype=torch.float64)
    share = sizes * (n / m)
    quota = share.floor().long()
    extra = n - int(quota.sum())
    if extra:  # largest remainders first (ties: the earlier chunk)
        order = torch.sort(share - quota, descending=True, stable=True).indices
        quota[order[:extra]] += 1
    parts = []
    for lo, hi, q in zip(bounds[:-1], bounds[1:], quota.tolist()):
        if q > 0:
            parts.append(greedy_coreset(x[lo:hi], q, generator=gen) + lo)
    return torch.cat(parts)


def two_stage_coreset(
    features: torch.Tensor,
    n: int | None = None,
    *,
    ratio: float | None = None,
    chunk_size: int = 65_536,
    oversample: float = 1.0,
    max_exact: int = 262_144,
    projection_dim: int | None = 128,
    seed: int = 0,
    return_min_distances: bool = False,
) -> torch.Tensor | CoresetResult:
    """Two-stage (composable) greedy k-center: the approximate, linear-time coreset selection.

    The two-round algorithm analysed by Malkomes, Kusner, Chen, Weinberger and Moseley, "Fast
    Distributed k-Center Clustering with Outliers on Massive Data", NeurIPS 2015, Sec. 3 (the
    GreeDi scheme of Mirzasoleiman et al., NIPS 2013, applied to k-center): split the points
    into parts, run Gonzalez' greedy (GON, PatchCore's Algorithm 1) on each part, then GON on
    the union of the parts' picks. With ``k`` picks per part it is a 4-approximation of the
    optimal k-center radius (a point is within 2 OPT of its part's picks, and those within
    2 OPT of the final picks). Here each part (``chunk_size`` consecutive rows, e.g. the patches
    of a block of images, as they are extracted) keeps only ``ceil(oversample * n/N * c)``
    points -- ``oversample`` times its share of ``n`` -- so that the survivors, not the bank,
    are what the second stage sees and what must be held in memory. With such budgets the
    4-approximation no longer holds; what always holds, by the triangle inequality, is

        r(final) <= max_part r(stage 1) + r(stage 2 on the survivors)

    (checked by the tests), and benchmarks/coreset_scaling.py reports the coverage radius
    against the exact greedy's on the same bank. The default ``oversample = 1`` keeps each
    part's share; the second stage then only trims the rounding excess (at most one point per
    part). Above ``max_exact`` survivors the second stage is itself done per chunk
    (:func:`stage_two`). ``oversample * n/N >= 1`` keeps every point in stage 1, and the result
    is then the exact greedy's.

    Cost. In the dense formulation the exact greedy computes ``N * n = ratio * N^2`` distances
    and the two-stage ``ratio * oversample * chunk_size * N`` (linear in N) plus the second
    stage's. The lazy greedy of this module already skips most of the exact greedy's distances
    on real banks (dormant points), so on one machine the two selections take similar times at
    a few hundred images (measured: README, "PatchCore at scale"); what the two-stage selection
    bounds is memory: one part plus the survivors, never the whole bank, and its parts are
    independent of each other.

    Args:
        features: [N, D] patch features (any float dtype).
        n, ratio: the coreset size, as for :func:`greedy_coreset`.
        chunk_size: rows per first-stage part.
        oversample: >= 1, how many times its share of ``n`` each part keeps.
        max_exact: largest union the second stage runs the exact greedy on.
        projection_dim, seed: the random projection, as for :func:`greedy_coreset`; the start
            point of each greedy run is drawn from the same generator, in order.
        return_min_distances: also return each point's distance (projected space) to the coreset.

    Returns:
        ``idx [n] int64`` (rows of ``features``), or a :class:`CoresetResult`.
    """
    if features.ndim != 2:
        raise ValueError(f"features must be [N, D], got shape {tuple(features.shape)}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    num = features.shape[0]
    n = coreset_size(num, n, ratio)
    w, gen = projection_matrix(features.shape[1], projection_dim, seed)
    kept = []
    with torch.no_grad():
        for lo in range(0, num, chunk_size):
            kept.append(stage_one(project(features[lo:lo + chunk_size], w), n / num, oversample, gen) + lo)
        kept = torch.cat(kept)
        idx = kept[stage_two(project(features[kept], w), n, gen, max_exact=max_exact, chunk_size=chunk_size)]
        if not return_min_distances:
            return idx
        return CoresetResult(idx, coreset_min_distances(project(features, w), idx))
