"""Throughput of the shared anomaly synthesiser (``defectscope.ops.synth``), in images per second.

What DRAEM's training asks of it per step: a batch of normal images in, the same batch with
simulated anomalies and their masks out (Perlin masks, rotated; a texture per image with three of
DRAEM's augmentations; the blend of eq. 2). Timed on batches of ``--batch`` images of
``--size`` px, after one warm-up call, with ``--threads`` torch threads; the procedural texture
pool (made once per fit) is timed separately, as is the dead-leaves generator per image (the
loop version it replaced took about 0.09 s per 256 px image).

    python benchmarks/synth_throughput.py                          # 256 px, 2 threads
    python benchmarks/synth_throughput.py --threads 1 --batches 10
    python benchmarks/synth_throughput.py --folder /data/dtd/images  # a texture folder too

Prints one line per source and the parts of one call (noise, rotation + threshold, texture
augmentation, blend); ``--out FILE.json`` writes the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))


def _time(fn, repeats: int) -> float:
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - t0) / repeats


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--batch", type=int, default=8, help="images per call (DRAEM's batch: 8)")
    ap.add_argument("--batches", type=int, default=20, help="timed calls per source")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--pool", type=int, default=200, help="procedural textures held per fit")
    ap.add_argument("--folder", default=None, help="also time a texture folder (e.g. DTD's images/)")
    ap.add_argument("--out", default=None, help="write the figures as JSON")
    args = ap.parse_args(argv)

    import torch

    from defectscope.ops import synth

    torch.set_num_threads(args.threads)
    s, b = args.size, args.batch
    images = torch.rand(b, 3, s, s, generator=torch.Generator().manual_seed(0))
    out: dict = {"size": s, "batch": b, "threads": args.threads, "torch": torch.__version__,
                 "cpu": platform.processor() or platform.machine(), "cpus": os.cpu_count(), "sources": {}}

    t0 = time.perf_counter()
    synth.generic_images(args.pool, s, seed=0)
    out["procedural_pool_s"] = time.perf_counter() - t0
    out["generic_image_s"] = out["procedural_pool_s"] / args.pool
    print(f"dead-leaves textures: {args.pool} at {s} px in {out['procedural_pool_s']:.2f} s "
          f"({1000 * out['generic_image_s']:.1f} ms per image; the loop version: ~90 ms)")

    sources = ["procedural", "none"] + ([args.folder] if args.folder else [])
    for source in sources:
        sy = synth.AnomalySynthesizer(source, pool=args.pool)
        gen = torch.Generator().manual_seed(1)
        t0 = time.perf_counter()
        sy(images, gen)  # warm-up; makes the texture pool
        first = time.perf_counter() - t0
        per_call = _time(lambda: sy(images, gen), args.batches)
        ips = b / per_call
        out["sources"][source] = {"images_per_s": ips, "first_call_s": first}
        print(f"source={source}: {ips:.0f} images/s ({1000 * per_call / b:.2f} ms per image; first call, "
              f"with the pool: {first:.2f} s)")

    # the parts of one call
    gen = torch.Generator().manual_seed(2)
    grid = synth._noise_grid((s, s), 0, 6)
    sy_, sx_, ang = synth._draw_perlin(b, gen, 0, 6)
    parts = {
        "perlin noise": lambda: synth._perlin_from_angles(ang, sy_, sx_, *grid),
        "rotate": lambda: synth.rotate(torch.rand(b, 1, *grid), torch.rand(b) * 90),
        "texture augmentation (3 of 10)": lambda: synth.augment_textures(images, gen),
        "masks (noise + rotation + threshold)": lambda: synth.perlin_masks(b, s, generator=gen),
    }
    out["parts_ms_per_image"] = {}
    for name, fn in parts.items():
        fn()
        ms = 1000 * _time(fn, max(3, args.batches // 2)) / b
        out["parts_ms_per_image"][name] = ms
        print(f"  {name}: {ms:.2f} ms per image")
    per_kind = {}
    for kind in synth.AUGMENTATIONS:
        fn = lambda k=kind: synth._augment_one(k, images, gen)  # noqa: E731
        fn()
        per_kind[kind] = 1000 * _time(fn, 3) / b
    out["augmentation_ms_per_image"] = per_kind
    print("  per augmentation (ms per image): " + ", ".join(f"{k} {v:.2f}" for k, v in per_kind.items()))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(out, indent=2))
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
