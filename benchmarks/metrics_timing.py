"""Timing of the pixel-level metrics on a realistic evaluation set.

100 anomaly maps of 256x256 (float32, spatially smooth noise plus a signal on the defects) with
blob-shaped ground truth (a third of the images defect-free, the others with 1 to 4 ellipses or
rectangles of various sizes). Prints the median of 3 runs of ``aupro``, ``pixel_auroc`` and
``compute_metrics`` (all pixel metrics at once).

    PYTHONPATH=src python benchmarks/metrics_timing.py [--images 100] [--size 256] [--runs 3]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
from scipy import ndimage

from defectscope.metrics import aupro, compute_metrics, pixel_auroc


def make_data(n_images: int, size: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    masks = np.zeros((n_images, size, size), dtype=bool)
    for i in range(n_images):
        if rng.random() < 1 / 3:
            continue
        for _ in range(rng.integers(1, 5)):
            cy, cx = rng.integers(0, size, 2)
            ry, rx = rng.uniform(1, size / 8, 2)
            if rng.random() < 0.5:
                masks[i] |= ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
            else:
                masks[i] |= (np.abs(yy - cy) <= ry) & (np.abs(xx - cx) <= rx)
    noise = rng.normal(size=masks.shape).astype(np.float32)
    maps = ndimage.gaussian_filter(noise, sigma=(0, 2, 2))
    maps += 0.6 * ndimage.gaussian_filter(masks.astype(np.float32), sigma=(0, 3, 3))
    return maps.astype(np.float32), masks


def median_time(fn, runs: int) -> tuple[float, float, object]:
    """Median wall-clock and median CPU seconds of ``runs`` calls, and the last result.

    The CPU time is the steadier number on a shared machine (numpy sorts on one core).
    """
    wall, cpu, result = [], [], None
    for _ in range(runs):
        start, start_cpu = time.perf_counter(), time.process_time()
        result = fn()
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    return statistics.median(wall), statistics.median(cpu), result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=100)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()

    maps, masks = make_data(args.images, args.size)
    tag = f"{args.images}x{args.size}x{args.size}"
    print(
        f"data {tag}: {masks.mean():.2%} defect pixels, "
        f"{len(np.unique(maps))} distinct scores"
    )
    t, c, value = median_time(lambda: aupro(maps, masks), args.runs)
    print(f"aupro {tag}: {t:.2f} s  (cpu {c:.2f} s; aupro = {value:.4f})")
    t, c, value = median_time(lambda: pixel_auroc(maps, masks), args.runs)
    print(f"pixel_auroc {tag}: {t:.2f} s  (cpu {c:.2f} s; pixel_auroc = {value:.4f})")
    t, c, _ = median_time(lambda: compute_metrics(maps=maps, masks=masks), args.runs)
    print(f"compute_metrics (all pixel metrics) {tag}: {t:.2f} s  (cpu {c:.2f} s)")


if __name__ == "__main__":
    main()
