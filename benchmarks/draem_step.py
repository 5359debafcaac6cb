"""DRAEM's cost at its defaults (256 px, full width) from a few training steps and batch-1 predictions.

``benchmarks/costs.py --models draem`` fits 1 and 3 epochs on 32 images: about 11 minutes of a
2-core CPU at DRAEM's size. This script times what one epoch is made of instead (training steps
of a batch of 8 with the synthesiser, after one warm-up step) and the batch-1 prediction, and
prints the ``Cost(...)`` to declare (seconds per training image and epoch, seconds per image at
batch 1):

    python benchmarks/draem_step.py                # 2 threads, 3 steps, 10 predictions
    python benchmarks/draem_step.py --threads 1 --steps 2
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--predictions", type=int, default=10)
    ap.add_argument("--size", type=int, default=256)
    args = ap.parse_args(argv)
    os.environ.setdefault("DEFECTSCOPE_PROGRESS", "off")
    import torch

    torch.set_num_threads(args.threads)
    from defectscope.models import create_model
    from defectscope.models.reconstruction.draem import draem_loss
    from defectscope.ops.synth import AnomalySynthesizer

    s = args.size
    model = create_model("draem", image_size=s)
    model._build()
    opt = torch.optim.Adam(list(model.parameters()), lr=1e-4)
    synth = AnomalySynthesizer()
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(8, 3, s, s, generator=gen)
    t0 = time.perf_counter()
    synth(x, gen)
    print(f"texture pool (once per fit): {time.perf_counter() - t0:.2f} s")
    model.train()
    times, cpu = [], []
    for i in range(args.steps + 1):
        t0, c0 = time.perf_counter(), time.process_time()
        aug, mask = synth(x, gen)
        rec = model.reconstructive(aug)
        loss = draem_loss(x, rec, mask, model.discriminative(torch.cat((rec, aug), 1)))
        opt.zero_grad()
        loss.backward()
        opt.step()
        if i:  # the first step warms up
            times.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
        print(f"step {i}: {time.perf_counter() - t0:.2f} s wall, {time.process_time() - c0:.2f} s CPU (batch 8)",
              flush=True)
    epoch = sorted(times)[len(times) // 2] / 8
    model.eval()
    model.fitted = True
    one = x[:1]
    model.predict(one)
    lat, lat_cpu = [], []
    for _ in range(args.predictions):
        t0, c0 = time.perf_counter(), time.process_time()
        model.predict(one)
        lat.append(time.perf_counter() - t0)
        lat_cpu.append(time.process_time() - c0)
    predict = sorted(lat)[len(lat) // 2]
    print(f"CPU seconds (all threads): {sorted(cpu)[len(cpu) // 2] / 8:.3g} per training image, "
          f"{sorted(lat_cpu)[len(lat_cpu) // 2]:.3g} per prediction (on a busy machine, CPU time / threads is "
          "closer to the quiet wall time than the wall time is)")
    day = time.strftime("%Y-%m-%d")
    print(f"seconds per training image and epoch: {epoch:.3g}; batch-1 prediction: {1000 * predict:.0f} ms "
          f"({args.threads} threads)")
    print(f"cost = Cost(predict={predict:.3g}, epoch={epoch:.3g}, passes='epochs', measured='benchmarks/draem_step.py, "
          f"{s} px, {args.threads} threads, {day}')")
    return 0


if __name__ == "__main__":
    sys.exit(main())
