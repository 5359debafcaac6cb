"""defectscope's AllInOneBlock / SequenceFlow against FrEIA's, given the same weights, permutation
and settings (a check, not a test: FrEIA is not a dependency of defectscope).

Runs in any Python environment that has torch and FrEIA (``pip install freia``; the reference
venv ``benchmarks/.venv-reference`` has FrEIA 0.2 through anomalib). defectscope's
``ops/flows.py`` is loaded from its file, so the package need not be installed there::

    benchmarks/.venv-reference/bin/python benchmarks/flows_freia_check.py
    /tmp/freia-venv/bin/python benchmarks/flows_freia_check.py      # a fresh `pip install freia`

For each setting it copies FrEIA's subnet weights, global scale/offset and permutation into
defectscope's block and prints the largest difference of the outputs and log-determinants, both
directions, in float64 (and float32), then the time of a forward+backward of an 8-block
FastFlow-sized flow and a CFLOW-sized conditional flow with both implementations.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

try:
    import FrEIA.framework as Ff
    import FrEIA.modules as Fm
except ImportError:  # pragma: no cover - depends on the environment
    sys.exit("FrEIA is not installed here: run this with a Python that has it "
             "(benchmarks/.venv-reference/bin/python, or a venv with `pip install freia`).")

_SPEC = importlib.util.spec_from_file_location(
    "defectscope_ops_flows", Path(__file__).resolve().parents[1] / "src/defectscope/ops/flows.py")
flows = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(flows)


def conv_subnet(kernel):
    def make(c_in, c_out):
        return nn.Sequential(nn.Conv2d(c_in, c_in, kernel, padding="same"), nn.ReLU(),
                             nn.Conv2d(c_in, c_out, kernel, padding="same"))
    return make


def fc_subnet(c_in, c_out):
    return nn.Sequential(nn.Linear(c_in, 2 * c_in), nn.ReLU(), nn.Linear(2 * c_in, c_out))


def copy_block(ours: flows.AllInOneBlock, theirs) -> None:
    """FrEIA's tensors into ours: subnet, global scale and offset, permutation."""
    with torch.no_grad():
        ours.subnet.load_state_dict(theirs.subnet.state_dict())
        ours.global_scale.copy_(theirs.global_scale.reshape(-1))
        ours.global_offset.copy_(theirs.global_offset.reshape(-1))
        w = theirs.w_perm.reshape(ours.channels, ours.channels)
        if ours.permute_soft:
            ours.w_perm.copy_(w)
        else:  # FrEIA: y_i = x_{j} where w[i, j] = 1; ours: y_i = x_{perm[i]}
            perm = w.argmax(dim=1)
            ours.perm.copy_(perm)
            ours.perm_inv.copy_(torch.argsort(perm))


def randomise(module: nn.Module, gen: torch.Generator) -> None:
    with torch.no_grad():
        for p in module.parameters():
            if p.requires_grad:
                p.add_(0.3 * torch.randn(p.shape, generator=gen, dtype=p.dtype))


SETTINGS = {
    "default (SOFTPLUS, hard permutation, clamp 2)": {},
    "soft permutation": {"permute_soft": True},
    "SIGMOID, init 0.7": {"global_affine_type": "SIGMOID", "global_affine_init": 0.7},
    "EXP, init 1.3, clamp 1.9": {"global_affine_type": "EXP", "global_affine_init": 1.3, "affine_clamping": 1.9},
    "GIN": {"gin_block": True},
    "reverse_permutation + soft": {"reverse_permutation": True, "permute_soft": True},
}


def compare_block(shape, cond, settings, dtype, gen) -> tuple[float, float, float, float]:
    c_ch = cond
    dims_in = [tuple(shape[1:])]
    dims_c = [(c_ch, *shape[2:])] if cond else []
    sub = conv_subnet(3) if len(shape) == 4 else fc_subnet
    np.random.seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
    theirs = Fm.AllInOneBlock(dims_in, dims_c=dims_c, subnet_constructor=sub, **settings)
    ours = flows.AllInOneBlock(shape[1], sub, cond_channels=c_ch, **settings)
    randomise(theirs, gen)
    copy_block(ours, theirs)
    theirs, ours = theirs.to(dtype), ours.to(dtype)
    x = torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)
    c = [torch.randn((shape[0], *dims_c[0]), generator=gen, dtype=torch.float64).to(dtype)] if cond else []
    with torch.no_grad():
        (y_t,), j_t = theirs([x], c=c)
        y_o, j_o = ours(x, c[0] if cond else None)
        (x_t,), ji_t = theirs([y_t], c=c, rev=True)
        x_o, ji_o = ours(y_t, c[0] if cond else None, rev=True)
    return ((y_o - y_t).abs().max().item(), (j_o - j_t).abs().max().item(),
            (x_o - x_t).abs().max().item(), (ji_o - ji_t).abs().max().item())


def build_pair(channels, blocks, sub, cond, clamp, hw, gen):
    """The same flow in FrEIA (SequenceINN) and defectscope (SequenceFlow)."""
    dims = (channels, *hw)
    theirs = Ff.SequenceINN(*dims)
    for i in range(blocks):
        kwargs = dict(subnet_constructor=sub(i), affine_clamping=clamp, permute_soft=False)
        if cond:
            theirs.append(Fm.AllInOneBlock, cond=0, cond_shape=(cond, *hw), **kwargs)
        else:
            theirs.append(Fm.AllInOneBlock, **kwargs)
    randomise(theirs, gen)
    ours = flows.SequenceFlow([flows.AllInOneBlock(channels, sub(i), cond_channels=cond, affine_clamping=clamp)
                               for i in range(blocks)])
    for o, t in zip(ours, theirs.module_list):
        copy_block(o, t)
    return theirs, ours


def time_ab(fn_a, fn_b, repeats):
    """Medians of ``fn_a`` and ``fn_b``, run alternately (A/B interleaved) after a warm-up each."""
    for fn in (fn_a, fn_b, fn_a, fn_b):
        fn()
    a, b = [], []
    for _ in range(repeats):
        for fn, out in ((fn_a, a), (fn_b, b)):
            t0 = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t0)
    return statistics.median(a), statistics.median(b)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=21)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    import FrEIA
    print(f"FrEIA {getattr(FrEIA, '__version__', '?')} from {Path(FrEIA.__file__).parent}; torch {torch.__version__}")
    gen = torch.Generator().manual_seed(0)
    worst = 0.0
    print("\n| setting | input | dtype | max |y - y_FrEIA| | max |logdet diff| | rev: max |x diff| | rev: logdet diff |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name, settings in SETTINGS.items():
        for shape, cond, label in (((4, 6), 0, "[4, 6]"), ((4, 6), 5, "[4, 6] + cond 5"),
                                   ((2, 6, 5, 4), 0, "[2, 6, 5, 4]"), ((2, 7, 5, 4), 3, "[2, 7, 5, 4] + cond 3")):
            for dtype in (torch.float64, torch.float32):
                d = compare_block(shape, cond, settings, dtype, gen)
                if dtype == torch.float64:
                    worst = max(worst, *d)
                print(f"| {name} | {label} | {str(dtype)[6:]} | " + " | ".join(f"{v:.1e}" for v in d) + " |")
    print(f"\nworst float64 difference over all settings: {worst:.2e}")

    print(f"\nforward + backward, median of {args.repeats} runs A/B interleaved, {args.threads} threads:")
    cases = {
        "FastFlow scale 1 (24 ch, 64x64, batch 8, 8 blocks 3x3/1x1)":
            (24, 8, lambda i: conv_subnet(3 if i % 2 == 0 else 1), 0, 2.0, (64, 64), 8),
        "CFLOW scale 1 (40 ch, 256 fibers, cond 128, 8 blocks)":
            (40, 8, lambda i: fc_subnet, 128, 1.9, (), 256),
    }
    for name, (ch, blocks, sub, cond, clamp, hw, batch) in cases.items():
        theirs, ours = build_pair(ch, blocks, sub, cond, clamp, hw, gen)
        x = torch.randn(batch, ch, *hw, generator=gen)
        c = torch.randn(batch, cond, *hw, generator=gen) if cond else None
        with torch.no_grad():
            z_t, j_t = theirs(x, c=[c] if cond else [])
            z_o, j_o = ours(x, c)
        print(f"  {name}: max |z diff| {(z_o - z_t).abs().max().item():.1e}, "
              f"max |logdet diff| {(j_o - j_t).abs().max().item():.1e} (float32)")

        def step(model, is_ours):
            out = model(x, c) if is_ours else model(x, c=[c] if cond else [])
            z, j = out
            (0.5 * z.pow(2).flatten(1).sum(1) - j).mean().backward()

        t_t, t_o = time_ab(lambda: step(theirs, False), lambda: step(ours, True), args.repeats)
        print(f"    FrEIA {1e3 * t_t:.2f} ms, defectscope {1e3 * t_o:.2f} ms ({t_t / t_o:.2f}x)")


if __name__ == "__main__":
    main()
