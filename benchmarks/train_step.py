"""Two training-step timings behind sentences of the README and the code (run on a quiet machine):

* ``csflow-adam``: one CS-Flow training step at batch 16 on the flow alone (EfficientNet-Lite0
  ``blocks.5`` shapes at 256 px: 192 channels on 8x8, 4x4 and 2x2 maps), with PyTorch's default
  multi-tensor Adam and with the fused one ``CsFlow`` uses: the whole step and the optimiser's
  ``step`` alone.
* ``ssn-layout``: one SuperSimpleNet training step of the adaptor and the heads on a batch of 32
  images at 256 px (random backbone weights: the same shapes), in the default NCHW layout and in
  the ``channels_last`` layout its ``fit`` uses.

Medians of ``--steps`` steps after one warm-up step:

    python benchmarks/train_step.py csflow-adam
    python benchmarks/train_step.py ssn-layout --steps 2
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))


def _median_s(step, n: int) -> float:
    step()  # warm-up
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def csflow_adam(steps: int) -> None:
    import torch

    from defectscope.models.flow.csflow import CrossScaleFlow, csflow_loss

    xs = [torch.randn(16, 192, 8 >> s, 8 >> s, generator=torch.Generator().manual_seed(s)) for s in range(3)]
    for fused in (False, True):
        torch.manual_seed(0)
        flow = CrossScaleFlow(192, 4, 1024, 3.0)
        opt = torch.optim.Adam(flow.parameters(), lr=2e-4, eps=1e-4, weight_decay=1e-5,
                               **({"fused": True} if fused else {"foreach": True}))
        opt_times = []

        def step():
            opt.zero_grad(set_to_none=True)
            csflow_loss(*flow(xs)).backward()
            torch.nn.utils.clip_grad_norm_(flow.parameters(), 1.0)
            t0 = time.perf_counter()
            opt.step()
            opt_times.append(time.perf_counter() - t0)

        total = _median_s(step, steps)
        print(f"csflow, {'fused' if fused else 'multi-tensor'} Adam: step {total:.2f} s, "
              f"of which optimiser {statistics.median(opt_times[1:]):.2f} s")


def ssn_layout(steps: int) -> None:
    import torch

    from defectscope.models import create_model
    from defectscope.models.adaptation.supersimplenet import feature_anomalies, ssn_loss, upscaled_features

    images = torch.rand(32, 3, 256, 256, generator=torch.Generator().manual_seed(0))
    for layout in (torch.contiguous_format, torch.channels_last):
        torch.manual_seed(0)
        model = create_model("supersimplenet", image_size=256)
        model._build(pretrained=False)
        p = model.params
        with torch.no_grad():
            taps = model._extract(images, torch.device("cpu"), "features")
        h, w = 2 * taps[0].shape[-2], 2 * taps[0].shape[-1]
        masks, labels = torch.zeros(32, 1, h, w), torch.zeros(32)
        for module in (model.adaptor, model.segdec):
            module.to(memory_format=layout)
        opt = torch.optim.AdamW([*model.adaptor.parameters(), *model.segdec.parameters()], lr=1e-4)
        gen = torch.Generator().manual_seed(0)

        def step():
            feats = upscaled_features(taps, p["patch_size"]).contiguous(memory_format=layout)
            adapted, _, m, y, _ = feature_anomalies(model.adaptor(feats), None, masks, labels,
                                                    noise_std=p["noise_std"], threshold=p["perlin_threshold"],
                                                    generator=gen)
            amap, score = model.segdec(adapted, adapted, stop_grad=True)
            opt.zero_grad(set_to_none=True)
            ssn_loss(amap, score, m, y, gamma=p["focal_gamma"], th=p["truncation"]).backward()
            opt.step()

        name = "channels_last" if layout is torch.channels_last else "NCHW"
        print(f"supersimplenet heads, {name}: step {_median_s(step, steps):.2f} s (batch 32, 256 px)")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("check", choices=("csflow-adam", "ssn-layout"))
    ap.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up (default 3)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    (csflow_adam if args.check == "csflow-adam" else ssn_layout)(args.steps)
    return 0


if __name__ == "__main__":
    sys.exit(main())
