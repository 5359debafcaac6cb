"""The invertible blocks of defectscope.ops.flows: exact inversion, and the log-determinant
against the log-determinant of the full Jacobian computed by autograd (float64, small sizes)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from defectscope.ops.flows import (
    AllInOneBlock,
    Concat,
    SequenceFlow,
    Split,
    Squeeze,
    Unsqueeze,
    atan_clamp,
    random_rotation,
    standard_normal_logp,
)


pytestmark = pytest.mark.usefixtures("one_thread")


def _fc(c_in, c_out):
    return nn.Sequential(nn.Linear(c_in, 16), nn.Tanh(), nn.Linear(16, c_out))


def _conv(c_in, c_out):
    return nn.Sequential(nn.Conv2d(c_in, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, c_out, 1))


def _randomise(module: nn.Module, gen: torch.Generator) -> nn.Module:
    """Random (large enough) weights, so that the coupling is far from the identity and the
    global scale is not 1."""
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.7)
    return module


def _jacobian_logdet(f, x: torch.Tensor) -> torch.Tensor:
    """log |det J| of ``f`` at each sample of ``x``, from the full Jacobian (one sample at a time)."""
    out = []
    for i in range(x.shape[0]):
        xi = x[i : i + 1]
        jac = torch.autograd.functional.jacobian(lambda v: f(v)[0].reshape(-1), xi).reshape(xi.numel(), xi.numel())
        out.append(torch.linalg.slogdet(jac)[1])
    return torch.stack(out)


BLOCK_SETTINGS = [
    dict(),
    dict(permute_soft=True),
    dict(global_affine_type="SIGMOID", global_affine_init=0.7),
    dict(global_affine_type="EXP", global_affine_init=1.3, affine_clamping=1.9),
    dict(gin_block=True),
    dict(reverse_permutation=True, permute_soft=True),
]


@pytest.mark.parametrize("settings", BLOCK_SETTINGS, ids=lambda s: ",".join(f"{k}={v}" for k, v in s.items()) or "default")
@pytest.mark.parametrize("shape,cond", [((3, 5), 0), ((3, 5), 3), ((2, 5, 3, 3), 0), ((2, 4, 3, 2), 2)],
                         ids=["vec", "vec-cond", "map", "map-cond"])
def test_all_in_one_block_inverts_and_logdet_matches_jacobian(settings, shape, cond):
    gen = torch.Generator().manual_seed(7)
    sub = _fc if len(shape) == 2 else _conv
    block = AllInOneBlock(shape[1], sub, cond_channels=cond, generator=gen, **settings).double()
    _randomise(block, gen)
    if block.permute_soft:  # drawn in float64 but stored in float32: .double() alone leaves a
        block.w_perm.copy_(random_rotation(shape[1], gen))  # 1e-7 departure from orthogonality
    x = torch.randn(shape, generator=gen, dtype=torch.float64) * 2
    c = None
    if cond:
        c = torch.randn((shape[0], cond, *shape[2:]), generator=gen, dtype=torch.float64)
    y, ld = block(x, c)
    assert ld.shape == (shape[0],)
    assert not torch.allclose(y, x)
    x_back, ld_inv = block(y, c, rev=True)
    torch.testing.assert_close(x_back, x, atol=1e-10, rtol=0)
    torch.testing.assert_close(ld_inv, -ld, atol=1e-10, rtol=0)
    # full Jacobian, one sample at a time (the condition of that sample)
    ref = torch.stack([
        _jacobian_logdet(lambda v, i=i: block(v, None if c is None else c[i : i + 1]), x[i : i + 1])[0]
        for i in range(shape[0])
    ])
    torch.testing.assert_close(ld, ref, atol=1e-8, rtol=1e-8)
    # and of the inverse map
    ref_inv = torch.stack([
        _jacobian_logdet(lambda v, i=i: block(v, None if c is None else c[i : i + 1], rev=True), y[i : i + 1])[0]
        for i in range(shape[0])
    ])
    torch.testing.assert_close(ld_inv, ref_inv, atol=1e-8, rtol=1e-8)


def test_all_in_one_block_float32_inversion_and_identity_at_init():
    """float32 round trip within 1e-5; with a zero-initialised last layer and global_affine_init=1
    the block is exactly the permutation (FrEIA's initial state for that case)."""
    gen = torch.Generator().manual_seed(0)
    block = _randomise(AllInOneBlock(6, _conv, cond_channels=4, generator=gen), gen)
    x = torch.randn(4, 6, 5, 5, generator=gen)
    c = torch.randn(4, 4, 5, 5, generator=gen)
    y, _ = block(x, c)
    torch.testing.assert_close(block(y, c, rev=True)[0], x, atol=1e-5, rtol=0)

    block = AllInOneBlock(6, _conv, generator=gen)
    nn.init.zeros_(block.subnet[-1].weight)
    nn.init.zeros_(block.subnet[-1].bias)
    y, ld = block(x)
    torch.testing.assert_close(y, x[:, block.perm], atol=1e-6, rtol=0)
    torch.testing.assert_close(ld, torch.zeros(4), atol=1e-5, rtol=0)


def test_gin_block_is_volume_preserving():
    gen = torch.Generator().manual_seed(2)
    block = _randomise(AllInOneBlock(5, _conv, gin_block=True, generator=gen), gen)
    x = torch.randn(3, 5, 4, 4, generator=gen)
    y, ld = block(x)
    assert (y - x[:, block.perm]).abs().max() > 0.1
    torch.testing.assert_close(ld, torch.zeros(3), atol=1e-5, rtol=0)


def test_vector_condition_is_broadcast_over_positions():
    gen = torch.Generator().manual_seed(1)
    block = _randomise(AllInOneBlock(4, _conv, cond_channels=3, generator=gen), gen)
    x = torch.randn(2, 4, 3, 3, generator=gen)
    c = torch.randn(2, 3, generator=gen)
    y1, l1 = block(x, c)
    y2, l2 = block(x, c[:, :, None, None].expand(-1, -1, 3, 3))
    torch.testing.assert_close(y1, y2)
    torch.testing.assert_close(l1, l2)


def test_bad_condition_messages():
    block = AllInOneBlock(4, _fc, cond_channels=2)
    with pytest.raises(ValueError, match="needs a condition"):
        block(torch.randn(2, 4))
    with pytest.raises(ValueError, match="condition c has shape"):
        block(torch.randn(2, 4), torch.randn(2, 3))
    with pytest.raises(ValueError, match="cond_channels=0"):
        AllInOneBlock(4, _fc)(torch.randn(2, 4), torch.randn(2, 2))
    with pytest.raises(ValueError, match="global_affine_type"):
        AllInOneBlock(4, _fc, global_affine_type="RELU")


def test_random_rotation_is_special_orthogonal():
    q = random_rotation(7, torch.Generator().manual_seed(3))
    torch.testing.assert_close(q @ q.T, torch.eye(7, dtype=torch.float64), atol=1e-12, rtol=0)
    assert torch.linalg.det(q).item() == pytest.approx(1.0, abs=1e-10)


def test_sequence_with_condition_inverts_and_logdet_matches_jacobian():
    gen = torch.Generator().manual_seed(11)
    flow = SequenceFlow([
        _randomise(AllInOneBlock(4, _conv, cond_channels=2, generator=gen, affine_clamping=1.9), gen)
        for _ in range(3)
    ]).double()
    x = torch.randn(2, 4, 3, 3, generator=gen, dtype=torch.float64)
    c = torch.randn(2, 2, 3, 3, generator=gen, dtype=torch.float64)
    z, ld = flow(x, c)
    x_back, ld_inv = flow(z, c, rev=True)
    torch.testing.assert_close(x_back, x, atol=1e-10, rtol=0)
    torch.testing.assert_close(ld_inv, -ld, atol=1e-10, rtol=0)
    ref = torch.stack([_jacobian_logdet(lambda v, i=i: flow(v, c[i : i + 1]), x[i : i + 1])[0] for i in range(2)])
    torch.testing.assert_close(ld, ref, atol=1e-8, rtol=1e-8)
    # the sum of the blocks' log-dets, and the reverse order in rev
    h, total = x, torch.zeros(2, dtype=torch.float64)
    for block in flow:
        h, l = block(h, c)
        total = total + l
    torch.testing.assert_close(z, h)
    torch.testing.assert_close(ld, total)


def test_squeeze_is_pixel_unshuffle_and_inverts():
    x = torch.randn(2, 3, 4, 6, dtype=torch.float64)
    y, ld = Squeeze()(x)
    torch.testing.assert_close(y, torch.nn.functional.pixel_unshuffle(x, 2))
    assert torch.equal(ld, torch.zeros(2, dtype=torch.float64))
    torch.testing.assert_close(Squeeze()(y, rev=True)[0], x)
    up, _ = Unsqueeze()(y)
    torch.testing.assert_close(up, x)
    torch.testing.assert_close(Unsqueeze()(x, rev=True)[0], y)
    with pytest.raises(ValueError, match="even height and width"):
        Squeeze()(torch.randn(1, 1, 3, 4))


def test_u_shape_composition_inverts_and_logdet_matches_jacobian():
    """A small U-Flow-like graph: flow on the coarse scale, split, depth-to-space, concat with the
    fine scale, flow again -- as one function of both scales' inputs."""
    gen = torch.Generator().manual_seed(5)
    coarse = SequenceFlow([_randomise(AllInOneBlock(8, _conv, generator=gen), gen) for _ in range(2)]).double()
    split = Split([4, 4])
    up = Unsqueeze()
    cat = Concat([2, 1])
    fine = SequenceFlow([_randomise(AllInOneBlock(3, _conv, generator=gen), gen) for _ in range(2)]).double()

    def forward(xf, xc):
        h, l1 = coarse(xc)
        (keep, out_c), l2 = split(h)
        u, l3 = up(keep)
        m, l4 = cat((xf, u))
        z, l5 = fine(m)
        return z, out_c, l1 + l2 + l3 + l4 + l5

    def inverse(z, out_c):
        m, _ = fine(z, rev=True)
        (xf, u), _ = cat(m, rev=True)
        keep, _ = up(u, rev=True)
        h, _ = split((keep, out_c), rev=True)
        xc, _ = coarse(h, rev=True)
        return xf, xc

    xf = torch.randn(2, 2, 4, 4, generator=gen, dtype=torch.float64)
    xc = torch.randn(2, 8, 2, 2, generator=gen, dtype=torch.float64)
    z, out_c, ld = forward(xf, xc)
    bf, bc = inverse(z, out_c)
    torch.testing.assert_close(bf, xf, atol=1e-10, rtol=0)
    torch.testing.assert_close(bc, xc, atol=1e-10, rtol=0)

    nf = xf[:1].numel()

    def flat(v):
        f, c_ = v[:, :nf].reshape(1, 2, 4, 4), v[:, nf:].reshape(1, 8, 2, 2)
        z_, o_, _ = forward(f, c_)
        return (torch.cat([z_.reshape(1, -1), o_.reshape(1, -1)], 1),)

    v = torch.cat([xf.reshape(2, -1), xc.reshape(2, -1)], 1)
    torch.testing.assert_close(ld, _jacobian_logdet(flat, v), atol=1e-8, rtol=1e-8)


def test_split_concat_errors():
    with pytest.raises(ValueError, match="Split"):
        Split([2, 2])(torch.randn(1, 5))
    with pytest.raises(ValueError, match="Concat expects"):
        Concat([2, 2])((torch.randn(1, 2), torch.randn(1, 3)))


def test_standard_normal_logp_against_distribution():
    z = torch.randn(3, 4, 2, 5, dtype=torch.float64)
    normal = torch.distributions.Normal(torch.zeros((), dtype=torch.float64), torch.ones((), dtype=torch.float64))
    torch.testing.assert_close(standard_normal_logp(z), normal.log_prob(z).sum(dim=(1, 2, 3)))
    torch.testing.assert_close(standard_normal_logp(z, per_position=True), normal.log_prob(z).sum(dim=1))


def test_atan_clamp_bounds():
    s = torch.linspace(-1e4, 1e4, 101, dtype=torch.float64)
    out = atan_clamp(s, 1.9)
    assert out.abs().max() < 1.9 * 0.636 * math.pi / 2 + 1e-12
    torch.testing.assert_close(atan_clamp(torch.tensor([1e-6], dtype=torch.float64), 1.9),
                               torch.tensor([0.636e-6], dtype=torch.float64), rtol=1e-6, atol=0)
