"""The exact k-NN kernel's blocking: query-row blocks against the whole bank, or bank tiles outermost.

    PYTHONPATH=src python benchmarks/knn_blocking.py                  # SPADE's and PatchCore's shapes
    PYTHONPATH=src python benchmarks/knn_blocking.py --tiles 256x2048,512x4096 --repeats 5

Times the candidate search of :class:`defectscope.ops.NearestNeighbors` (the distance products and
their reduction; the exact refinement after it is the same for both) on the shapes the methods
give it at 256 px, with random Gaussian features (the cost does not depend on the data):

* ``spade``: one test image's 4096 stride-4 pyramid features (176 dims) against the K = 50 nearest
  training images' pyramids, 204,800 rows (SPADE's pixel-level search, k = 1);
* ``patchcore-200`` / ``patchcore-1600``: one test image's 1024 patches (112 dims) against the 10 %
  coreset of 200 / 1600 training images (20,480 / 163,840 rows, k = 1);
* ``dfkde``-like small banks are not timed: they fit in cache either way.

``rows`` is the row-block loop (``_torch_candidates`` with the tiled path switched off: each block
of query rows against the whole bank); ``RxC`` the bank-tiles-outermost loop (``_tiled_candidates``;
the first default is the kernel's own tile). Medians over
``--repeats`` runs, interleaved, in one process, 2 threads; the candidates of every variant are
checked equal to the row-block loop's.
"""

from __future__ import annotations

import argparse
import importlib
import statistics
import time

import torch

K = importlib.import_module("defectscope.ops.knn")  # the module (defectscope.ops.knn is also a function)

SHAPES = {"spade": (4096, 204_800, 176), "patchcore-200": (1024, 20_480, 112),
          "patchcore-1600": (1024, 163_840, 112)}


def row_blocks(q, index):
    """The row-block loop: ``_torch_candidates`` at its default blocks, the tiled path switched off."""
    saved, K._TILED_MIN_BANK = K._TILED_MIN_BANK, float("inf")
    try:
        return K._torch_candidates(q, index.mu, index.bank_aug_t, 1, None, K._DEFAULT_BUDGET)
    finally:
        K._TILED_MIN_BANK = saved


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--tiles", default=f"{K._TILE_ROWS}x{K._TILE_COLS},256x2048,1024x4096,512x8192,4096x1024")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    tiles = [tuple(int(v) for v in t.split("x")) for t in args.tiles.split(",")]
    print(f"torch {torch.__version__}, {args.threads} threads; candidate search only, ms (median of "
          f"{args.repeats})\n\n| shape | queries x bank x dims | variant | ms | same picks |\n|---|---|---|---:|---|")
    for name in args.shapes.split(","):
        n, m, d = SHAPES[name]
        gen = torch.Generator().manual_seed(0)
        index = K.NearestNeighbors(torch.randn(m, d, generator=gen))
        q = torch.randn(n, d, generator=gen)
        variants = {"rows": lambda: row_blocks(q, index)}
        for r, c in tiles:
            variants[f"{r}x{c}"] = (lambda r=r, c=c: K._tiled_candidates(q, index.mu, index.bank_aug_t, 1, r, c))
        times = {v: [] for v in variants}
        picks = {}
        for _ in range(args.repeats):
            for v, fn in variants.items():
                t0 = time.perf_counter()
                with torch.no_grad():
                    picks[v] = fn()
                times[v].append(time.perf_counter() - t0)
        ref = picks["rows"]
        for v in variants:
            same = bool(torch.equal(picks[v], ref))
            print(f"| {name} | {n} x {m} x {d} | {v} | {statistics.median(times[v]) * 1000:.1f} | {same} |")


if __name__ == "__main__":
    main()
