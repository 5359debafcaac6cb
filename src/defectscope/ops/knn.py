"""Exact k-nearest-neighbour search (Euclidean), the scoring step of PatchCore and friends.

Torch backend: blocked matrix products, ``|q - b|^2 = |q|^2 + |b|^2 - 2 q.b`` (on features centred
on the bank mean, which keeps the cancellation error small), ``torch.topk`` per block so that the
distance matrix held at any time stays within a memory budget, then the ``k`` distances found are
recomputed directly as ``|q - b|`` (exact to float rounding, not to the cancellation error of the
norm trick). Optional faiss backend: ``faiss.IndexFlatL2`` (exhaustive, exact), same candidates,
same refinement, hence the same results.
"""

from __future__ import annotations

import importlib.util

import torch

__all__ = ["knn", "NearestNeighbors", "faiss_available"]

_DEFAULT_BUDGET = 256 * 2**20  # bytes of distance matrix per block
_FAISS_MIN_WORK = 2**31  # N * M above which backend="auto" uses faiss (when it is installed)


def faiss_available() -> bool:
    """Whether ``import faiss`` would work (does not import it)."""
    return importlib.util.find_spec("faiss") is not None


class NearestNeighbors:
    """Exact k-NN search against a fixed ``bank`` [M, D]: the bank is centred on its mean and its
    squared norms computed once, so repeated queries (PatchCore scoring image after image) pay
    only for the distance products. :meth:`query` returns what :func:`knn` returns."""

    def __init__(self, bank: torch.Tensor, dtype: torch.dtype | None = None) -> None:
        if bank.ndim != 2:
            raise ValueError(f"bank [M, D] expected, got {tuple(bank.shape)}")
        self.dtype = dtype or (torch.float64 if bank.dtype == torch.float64 else torch.float32)
        with torch.no_grad():
            bank_f = bank.detach().to(self.dtype)
            self.mu = bank_f.mean(dim=0, keepdim=True)
            self.bank_c = (bank_f - self.mu).contiguous()
            bank_sq = torch.einsum("md,md->m", self.bank_c, self.bank_c)
            # [D+1, M]: one matrix product of [q, 1] with it gives |b|^2 - 2 q.b, no bias pass
            self.bank_aug_t = torch.cat([-2 * self.bank_c, bank_sq.unsqueeze(1)], dim=1).T.contiguous()

    def query(self, query: torch.Tensor, k: int = 1, block_size: int | None = None, backend: str = "auto", *,
              memory_budget: int = _DEFAULT_BUDGET) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``k`` nearest bank rows of each row of ``query`` [N, D]; see :func:`knn`."""
        bank_c = self.bank_c
        if query.ndim != 2 or query.shape[1] != bank_c.shape[1]:
            raise ValueError(f"query [N, D] and bank [M, D] expected, got {tuple(query.shape)} and "
                             f"{tuple(bank_c.shape)}")
        n, m = query.shape[0], bank_c.shape[0]
        if not 1 <= k <= m:
            raise ValueError(f"k must be in [1, {m}] (the bank size), got {k}")
        if backend not in ("auto", "torch", "faiss"):
            raise ValueError(f"backend must be 'auto', 'torch' or 'faiss', got {backend!r}")
        if backend == "auto":
            use_faiss = (query.device.type == "cpu" and bank_c.device.type == "cpu"
                         and n * m >= _FAISS_MIN_WORK and faiss_available())
            backend = "faiss" if use_faiss else "torch"
        with torch.no_grad():
            mu, bank_aug_t = self.mu.to(query.device), self.bank_aug_t.to(query.device)
            bank_c = bank_c.to(query.device)
            q = query.detach().to(self.dtype)
            if n == 0:
                return (torch.empty(0, k, dtype=self.dtype, device=query.device),
                        torch.empty(0, k, dtype=torch.int64, device=query.device))
            if backend == "faiss":
                idx = _faiss_candidates(q - mu, bank_c, k)
            else:
                idx = _torch_candidates(q, mu, bank_aug_t, k, block_size, memory_budget)
            return _refine(q, mu, bank_c, idx, memory_budget)


def knn(
    query: torch.Tensor,
    bank: torch.Tensor,
    k: int = 1,
    block_size: int | None = None,
    backend: str = "auto",
    *,
    memory_budget: int = _DEFAULT_BUDGET,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` nearest rows of ``bank`` for each row of ``query``.

    Args:
        query: [N, D].
        bank: [M, D], M >= k.
        k: number of neighbours.
        block_size: query rows per block (torch backend); default: blocks whose [rows, M]
            distance matrix stays small enough to be reduced while still in cache, within
            ``memory_budget`` (bytes, 256 MB by default). A bank too large for the budget is
            split as well and the per-block top-k are merged.
        backend: ``"torch"``, ``"faiss"`` (``faiss.IndexFlatL2``; CPU), or ``"auto"``: faiss when
            it is installed, the tensors are on the CPU and ``N * M >= 2**31``, torch otherwise.

    Returns:
        ``(dist [N, k], idx [N, k] int64)``, Euclidean distances in ascending order and the
        matching row indices of ``bank``; float32, or float64 if either input is float64; on
        the device of ``query``.
    """
    if query.ndim != 2 or bank.ndim != 2 or query.shape[1] != bank.shape[1]:
        raise ValueError(f"query [N, D] and bank [M, D] expected, got {tuple(query.shape)} and "
                         f"{tuple(bank.shape)}")
    dtype = torch.float64 if torch.float64 in (query.dtype, bank.dtype) else torch.float32
    index = NearestNeighbors(bank.detach().to(query.device), dtype=dtype)
    return index.query(query, k, block_size, backend, memory_budget=memory_budget)


_CACHE_BLOCK = 16 * 2**20  # bytes of distance block reduced while it is still in (L3) cache
# Banks from this size on are searched by tiles, bank tiles outermost (:func:`_tiled_candidates`).
# Tile and threshold from benchmarks/knn_blocking.py (2 cores, quiet, candidate search, k = 1):
# SPADE's 4096 x 204,800 x 176 search 2009-2231 -> 936-980 ms, PatchCore's 1024 queries against
# 163,840 coreset rows (1600 training images) 218-241 -> 147-159 ms; against 20,480 rows
# (9 MB, below the threshold) the two loops are level.
_TILED_MIN_BANK = 32 * 2**20  # bytes of [D+1, M] bank
_TILE_ROWS, _TILE_COLS = 512, 4096


def _torch_candidates(q, mu, bank_aug_t, k, block_size, budget):
    n, d = q.shape
    m = bank_aug_t.shape[1]
    elem = bank_aug_t.element_size()
    if (block_size is None and bank_aug_t.numel() * elem >= _TILED_MIN_BANK
            and budget >= _TILE_ROWS * _TILE_COLS * elem):
        return _tiled_candidates(q, mu, bank_aug_t, k, _TILE_ROWS, _TILE_COLS)
    budget_elems = max(1, int(budget) // elem)
    if block_size is not None:
        rows = max(1, min(n, int(block_size)))
    elif budget_elems // m >= 64:
        rows = min(n, max(32, _CACHE_BLOCK // (elem * m)), budget_elems // m)
    else:  # a bank too large for the budget: 64 query rows against bank blocks
        rows = min(n, 64)
    cols = max(k, min(m, budget_elems // rows))  # bank block (the whole bank unless huge)
    out = torch.empty(n, k, dtype=torch.int64, device=q.device)
    qa = torch.empty(rows, d + 1, dtype=q.dtype, device=q.device)
    qa[:, d] = 1.0
    for lo in range(0, n, rows):
        hi = min(n, lo + rows)
        qb = qa[: hi - lo]
        torch.sub(q[lo:hi], mu, out=qb[:, :d])
        best_d = best_i = None
        for c0 in range(0, m, cols):
            c1 = min(m, c0 + cols)
            # [q, 1] . [-2 b, |b|^2] = |b|^2 - 2 q.b; |q|^2 is the same along a row, not needed
            d2 = torch.mm(qb, bank_aug_t[:, c0:c1])
            kk = min(k, c1 - c0)
            if kk == 1:
                vals, ids = _argmin_rows(d2)
            else:
                vals, ids = torch.topk(d2, kk, dim=1, largest=False, sorted=False)
            if c0:
                ids += c0
            if best_d is not None:
                vals = torch.cat([best_d, vals], dim=1)
                ids = torch.cat([best_i, ids], dim=1)
                vals, sel = torch.topk(vals, k, dim=1, largest=False, sorted=False)
                ids = ids.gather(1, sel)
            best_d, best_i = vals, ids
        out[lo:hi] = best_i
    return out


def _tiled_candidates(q, mu, bank_aug_t, k, rows, cols):
    """Candidates by tiles of ``rows`` queries x ``cols`` bank rows, bank tiles outermost: each bank
    tile ([D+1, cols], a few MB) is read from memory once and reused by every query tile, and each
    [rows, cols] distance tile is reduced while it is still in cache (tile sizes: the fastest of
    those benchmarks/knn_blocking.py compares). The row-block loop of :func:`_torch_candidates`
    instead streams the whole bank once per block of queries, which bounds it by memory traffic
    when the bank is large (SPADE's gathered pyramids: [204800, 177] floats, 145 MB, once per 32 of
    its 4096 queries)."""
    n, m = q.shape[0], bank_aug_t.shape[1]
    cols = max(k, cols)  # every tile but the last holds k candidates
    qa = torch.cat([q - mu, q.new_ones(n, 1)], dim=1)
    best_d = torch.empty(n, k, dtype=q.dtype, device=q.device)
    best_i = torch.empty(n, k, dtype=torch.int64, device=q.device)
    for c0 in range(0, m, cols):
        c1 = min(m, c0 + cols)
        tile = bank_aug_t[:, c0:c1]
        kk = min(k, c1 - c0)
        for r0 in range(0, n, rows):
            r1 = min(n, r0 + rows)
            d2 = torch.mm(qa[r0:r1], tile)
            if kk == 1:
                vals, ids = _argmin_rows(d2)
            else:
                vals, ids = torch.topk(d2, kk, dim=1, largest=False, sorted=False)
            ids += c0
            if c0 == 0:  # cols >= k and m >= k: the first tile always holds k candidates
                best_d[r0:r1], best_i[r0:r1] = vals, ids
            elif k == 1:  # strictly smaller only: the earlier (lower) index wins ties
                better = vals < best_d[r0:r1]
                best_d[r0:r1] = torch.where(better, vals, best_d[r0:r1])
                best_i[r0:r1] = torch.where(better, ids, best_i[r0:r1])
            else:
                vals = torch.cat([best_d[r0:r1], vals], dim=1)
                ids = torch.cat([best_i[r0:r1], ids], dim=1)
                vals, sel = torch.topk(vals, k, dim=1, largest=False, sorted=False)
                best_d[r0:r1], best_i[r0:r1] = vals, ids.gather(1, sel)
    return best_i


_ARGMIN_CHUNK = 256


def _argmin_rows(d2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``torch.min(d2, dim=1, keepdim=True)`` (values, first index of the minimum), computed in
    two levels: the minimum of each 256-column chunk (``amin``, a vectorised reduction), the first
    chunk holding the row minimum, then the first index inside that chunk. Same result as
    ``torch.min``, about 7x faster on the CPU, where the index-tracking reduction is not vectorised."""
    r, m = d2.shape
    c = _ARGMIN_CHUNK
    g = m // c
    if g < 2:
        return torch.min(d2, dim=1, keepdim=True)
    main = d2[:, : g * c].view(r, g, c)
    chunk_min = main.amin(dim=2)  # [r, g]
    vals, chunk = chunk_min.min(dim=1)  # first chunk with the row minimum
    ids = chunk * c + main[torch.arange(r, device=d2.device), chunk].argmin(dim=1)
    if g * c < m:  # the remainder columns, taken only where strictly smaller (first index wins)
        rv, ri = torch.min(d2[:, g * c:], dim=1)
        better = rv < vals
        vals = torch.where(better, rv, vals)
        ids = torch.where(better, ri + g * c, ids)
    return vals.unsqueeze(1), ids.unsqueeze(1)


def _faiss_candidates(q_c, bank_c, k):
    import faiss
    import numpy as np

    index = faiss.IndexFlatL2(bank_c.shape[1])
    index.add(np.ascontiguousarray(bank_c.cpu().numpy(), dtype=np.float32))
    _, ids = index.search(np.ascontiguousarray(q_c.cpu().numpy(), dtype=np.float32), k)
    return torch.from_numpy(ids).to(device=q_c.device, dtype=torch.int64)


def _refine(q, mu, bank_c, idx, budget):
    """Direct distances |q - b| of the candidates, sorted ascending (ties: by index)."""
    n, k = idx.shape
    d = q.shape[1]
    rows = max(1, min(n, int(budget) // (bank_c.element_size() * k * d)))
    dist = torch.empty(n, k, dtype=q.dtype, device=q.device)
    for lo in range(0, n, rows):
        hi = min(n, lo + rows)
        diff = bank_c[idx[lo:hi]] - (q[lo:hi] - mu).unsqueeze(1)  # [b, k, D]
        dist[lo:hi] = torch.linalg.vector_norm(diff, dim=2)
    if k > 1:
        # order by (distance, index): sort by index first, then stably by distance
        idx, p = torch.sort(idx, dim=1)
        dist = dist.gather(1, p)
        dist, p = torch.sort(dist, dim=1, stable=True)
        idx = idx.gather(1, p)
    return dist, idx
