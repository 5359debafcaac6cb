"""Timing of PatchCore's greedy coreset: defectscope.ops.greedy_coreset against the naive loop.

    PYTHONPATH=src python benchmarks/ops_timing.py                 # 200 and 100 images
    PYTHONPATH=src python benchmarks/ops_timing.py --images 100
    PYTHONPATH=src python benchmarks/ops_timing.py --features feats.pt   # a saved [N, D] tensor

Setting: N = images x 32 x 32 patch features of D = 152 dims (EfficientNet-Lite0 blocks 2 + 4),
projected to 128 dims, ratio 0.1 (N / 10 greedy steps), ``torch.set_num_threads(2)``.

The naive baseline is the per-step loop of anomalib's ``KCenterGreedy`` (a full ``[N, D]``
difference and its norm for every pick, running minimum, argmax); it is timed on a few hundred
steps and extrapolated (its cost per step does not depend on the step). Ours is timed end to end
(projection included). Random Gaussian features are used unless ``--features`` is given; the
cost of ours depends little on the data (the bulk is matrix products over all points).
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from defectscope.ops import coreset_projection, greedy_coreset


class Clock:
    """Wall-clock and process CPU time (on a shared machine the two differ)."""

    def __enter__(self):
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        self.wall, self.cpu = time.perf_counter() - self.wall, time.process_time() - self.cpu


def naive_ms_per_step(x: torch.Tensor, steps: int, seed: int = 0) -> tuple[float, float]:
    """anomalib-style greedy loop on the projected features x [N, d] (anomalib 2.7
    ``KCenterGreedy.update_distances`` / ``get_new_idx``); (wall, cpu) ms per step."""
    num = x.shape[0]
    idx = int(torch.randint(num, (1,), generator=torch.Generator().manual_seed(seed)))
    min_d = None
    warmup = 5
    clock = Clock()
    for step in range(steps + warmup):
        if step == warmup:
            clock.__enter__()
        dist = torch.linalg.norm(x - x[idx], dim=1, keepdim=True)
        min_d = dist if min_d is None else torch.minimum(min_d, dist)
        idx = int(torch.argmax(min_d).item())
        min_d[idx] = 0
    clock.__exit__()
    return clock.wall / steps * 1e3, clock.cpu / steps * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, nargs="*", default=[200, 100])
    ap.add_argument("--dim", type=int, default=152)
    ap.add_argument("--ratio", type=float, default=0.1)
    ap.add_argument("--projection-dim", type=int, default=128)
    ap.add_argument("--naive-steps", type=int, default=200)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--features", default=None, help="torch.save'd [N, D] tensor to use instead")
    ap.add_argument("--dense", action="store_true",
                    help="also time our method='dense' (one matvec per step) on naive-steps picks")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")
    loaded = torch.load(args.features) if args.features else None
    sizes = [loaded.shape[0]] if loaded is not None else [i * 32 * 32 for i in args.images]
    for num in sizes:
        if loaded is not None:
            feats = loaded.float()
        else:
            feats = torch.randn(num, args.dim, generator=torch.Generator().manual_seed(0))
        n = int(num * args.ratio + 1e-9)
        x, _ = coreset_projection(feats, args.projection_dim, seed=0)
        naive, naive_cpu = naive_ms_per_step(x, args.naive_steps)
        with Clock() as ours:
            greedy_coreset(feats, ratio=args.ratio, projection_dim=args.projection_dim, seed=0,
                           progress=False)
        print(f"N={num} ({num / 1024:g} images x 32x32), D={feats.shape[1]} -> "
              f"{min(args.projection_dim, feats.shape[1])}, {n} steps "
              f"({'features from ' + args.features if loaded is not None else 'random features'})")
        print(f"  naive, anomalib-style ({args.naive_steps} steps): {naive:8.3f} ms/step "
              f"(cpu {naive_cpu:7.3f})  -> {naive * n / 1e3:7.1f} s extrapolated")
        if args.dense:
            with Clock() as dense:
                greedy_coreset(feats, args.naive_steps, projection_dim=args.projection_dim,
                               method="dense", progress=False)
            d, dc = (dense.wall / args.naive_steps * 1e3, dense.cpu / args.naive_steps * 1e3)
            print(f"  ours, method='dense' ({args.naive_steps} steps):  {d:8.3f} ms/step "
                  f"(cpu {dc:7.3f})  -> {d * n / 1e3:7.1f} s extrapolated")
        w, c = ours.wall / n * 1e3, ours.cpu / n * 1e3
        print(f"  ours, greedy_coreset end to end:    {w:8.3f} ms/step (cpu {c:7.3f})  -> "
              f"{ours.wall:7.1f} s measured; speed-up x{naive / w:.0f} (cpu x{naive_cpu / c:.0f})")


if __name__ == "__main__":
    main()
