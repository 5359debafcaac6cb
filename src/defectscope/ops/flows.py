"""Invertible building blocks for the normalizing-flow methods (FastFlow, CFLOW, CS-Flow, U-Flow).

Every module here maps ``x`` to ``y`` exactly invertibly and returns the log-determinant of the
Jacobian of the direction it computed::

    y, log_jac_det = module(x, c=None, rev=False)      # log |det dy/dx|, shape [B]
    x, log_jac_det_inv = module(y, c=None, rev=True)   # = -log_jac_det at the same point

``x`` is ``[B, C]`` (vectors) or ``[B, C, H, W]`` (feature maps); :class:`Split` / :class:`Concat`
take or give a tuple of tensors. ``c`` is an optional condition, concatenated to the input of the
coupling subnetwork: ``[B, Cc, H, W]`` with the spatial size of ``x``, or ``[B, Cc]`` (broadcast
over the positions of a map).

:class:`AllInOneBlock` follows FrEIA's ``AllInOneBlock`` (Ardizzone et al., FrEIA 0.2,
``FrEIA/modules/all_in_one_block.py``; anomalib vendors the same block), which the official code of
FastFlow, CFLOW-AD and U-Flow uses. With ``x = [x1, x2]`` split along the channels (``x1`` has
``C - C//2`` channels) and ``a = 0.1 * subnet([x1, c])`` split into ``[a_s, a_t]``:

    s  = alpha * tanh(a_s)                  (soft clamping, alpha = ``affine_clamping``;
                                             GIN: s <- s - mean(s), volume preserving)
    u  = [x1, x2 * exp(s) + a_t]            (affine coupling)
    y  = P (psi(g) * u + b)                 (global affine "ActNorm", then a fixed permutation)

    log |det dy/dx| = sum(s) + (H W) sum_c log psi(g_c)

with ``psi`` the SOFTPLUS (``0.2 log(1 + exp(g/2))``), SIGMOID (``10 sigmoid(g - 2)``) or EXP
activation, ``g`` initialised so that ``psi(g) = global_affine_init``, and ``P`` a random hard
permutation of the channels or, with ``permute_soft``, a random rotation drawn uniformly from
SO(C). ``reverse_permutation`` applies ``P^-1`` before the coupling as well (Putzky et al., 2019).
FrEIA's learned Householder permutation is not offered (no method here uses it).

The soft clamp ``alpha * tanh(a)`` is FrEIA's for this block; CS-Flow's own coupling uses
``alpha * 0.636 atan(s / alpha)`` (:func:`atan_clamp`), which is also offered here.

:class:`SequenceFlow` composes modules (log-determinants add; reversed order for ``rev``);
:class:`Squeeze` / :class:`Unsqueeze` (space-to-depth and back, 2x), :class:`Split` and
:class:`Concat` are the volume-preserving reshapes U-Flow's multi-scale U needs.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "InvertibleModule",
    "AllInOneBlock",
    "SequenceFlow",
    "Squeeze",
    "Unsqueeze",
    "Split",
    "Concat",
    "standard_normal_logp",
    "tanh_clamp",
    "atan_clamp",
    "random_permutation",
    "random_rotation",
]

_LOG_2PI = math.log(2.0 * math.pi)


def tanh_clamp(s: torch.Tensor, clamp: float) -> torch.Tensor:
    """FrEIA's AllInOneBlock soft clamp ``clamp * tanh(s)``, in ``(-clamp, clamp)``."""
    return clamp * torch.tanh(s)


def atan_clamp(s: torch.Tensor, clamp: float) -> torch.Tensor:
    """The soft clamp of Real-NVP/Glow couplings in FrEIA and CS-Flow:
    ``clamp * 0.636 * atan(s / clamp)`` (0.636 ~ 2/pi, so the range is about ``(-clamp, clamp)``)."""
    return clamp * 0.636 * torch.atan(s / clamp)


def standard_normal_logp(z: torch.Tensor, per_position: bool = False) -> torch.Tensor:
    """log N(z; 0, I) of each sample, summed over all non-batch dimensions: ``[B]``.

    With ``per_position`` (``z`` a map ``[B, C, H, W]``) the sum runs over the channels only and
    the result is ``[B, H, W]``: the log-density of each position's ``C``-vector."""
    dims = (1,) if per_position else tuple(range(1, z.dim()))
    d = math.prod(z.shape[i] for i in dims)
    return -0.5 * z.pow(2).sum(dim=dims) - 0.5 * d * _LOG_2PI


def random_permutation(channels: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """A uniformly random permutation of ``range(channels)`` (long tensor)."""
    return torch.randperm(channels, generator=generator)


def random_rotation(channels: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """A rotation matrix drawn uniformly (Haar) from SO(``channels``), in float64: the QR
    decomposition of a Gaussian matrix with the signs of ``R``'s diagonal moved into ``Q``
    (Mezzadri, 2007), and one column negated when the determinant is -1."""
    a = torch.randn(channels, channels, generator=generator, dtype=torch.float64)
    q, r = torch.linalg.qr(a)
    q = q * torch.sign(torch.diagonal(r)).unsqueeze(0)
    if torch.linalg.det(q) < 0:
        q[:, 0] = -q[:, 0]
    return q


def _zeros_like_batch(x: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
    t = x if isinstance(x, torch.Tensor) else x[0]
    return t.new_zeros(t.shape[0])


class InvertibleModule(nn.Module):
    """Base class: ``forward(x, c=None, rev=False) -> (y, log_jac_det [B])``."""

    def forward(self, x, c: torch.Tensor | None = None, rev: bool = False):  # pragma: no cover - abstract
        raise NotImplementedError


class AllInOneBlock(InvertibleModule):
    """Affine coupling + global affine + fixed channel permutation, as FrEIA's ``AllInOneBlock``
    (see the module docstring for the equations).

    ``subnet_constructor(c_in, c_out)`` builds the coupling network: it is called with
    ``c_in = C - C//2 + cond_channels`` and ``c_out = 2 * (C//2)``, and applied to
    ``cat([x1, c])``; a subnet with the attribute ``takes_condition = True`` is called as
    ``subnet(x1, c)`` instead and combines them itself (CFLOW's projects its positional condition
    once per position rather than once per image). ``generator`` (a
    ``torch.Generator``) draws the permutation; without one torch's global generator does, so a
    seed fixes it. The permutation is a buffer and is saved with the state dict.
    """

    def __init__(
        self,
        channels: int,
        subnet_constructor: Callable[[int, int], nn.Module],
        cond_channels: int = 0,
        affine_clamping: float = 2.0,
        gin_block: bool = False,
        global_affine_init: float = 1.0,
        global_affine_type: str = "SOFTPLUS",
        permute_soft: bool = False,
        reverse_permutation: bool = False,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        if channels < 2:
            raise ValueError(f"AllInOneBlock needs at least 2 channels to split, got channels={channels}.")
        if subnet_constructor is None:
            raise ValueError("AllInOneBlock needs a subnet_constructor(c_in, c_out) returning an nn.Module.")
        self.channels = int(channels)
        self.cond_channels = int(cond_channels)
        self.split_passive = channels - channels // 2  # x1: conditions the coupling, passes through
        self.split_active = channels // 2  # x2: transformed
        self.clamp = float(affine_clamping)
        self.gin = bool(gin_block)
        self.reverse_permutation = bool(reverse_permutation)
        self.permute_soft = bool(permute_soft)
        kind = global_affine_type.upper()
        if global_affine_init <= 0:
            raise ValueError(f"global_affine_init must be positive, got {global_affine_init}.")
        if kind == "SIGMOID":
            if global_affine_init >= 10:
                raise ValueError(f"global_affine_init must be below 10 with SIGMOID, got {global_affine_init}.")
            init = 2.0 - math.log(10.0 / global_affine_init - 1.0)
        elif kind == "SOFTPLUS":
            init = 2.0 * math.log(math.expm1(5.0 * global_affine_init))
        elif kind == "EXP":
            init = math.log(global_affine_init)
        else:
            raise ValueError(f'global_affine_type must be "SOFTPLUS", "SIGMOID" or "EXP", got {global_affine_type!r}.')
        self.global_affine_type = kind
        self.global_scale = nn.Parameter(torch.full((channels,), float(init)))
        self.global_offset = nn.Parameter(torch.zeros(channels))
        if self.permute_soft:
            self.register_buffer("w_perm", random_rotation(channels, generator).float())
        else:
            perm = random_permutation(channels, generator)
            self.register_buffer("perm", perm)
            self.register_buffer("perm_inv", torch.argsort(perm))
        self.subnet = subnet_constructor(self.split_passive + self.cond_channels, 2 * self.split_active)

    # ------------------------------------------------------------------------------ pieces
    def _scale(self) -> torch.Tensor:
        g = self.global_scale
        if self.global_affine_type == "SOFTPLUS":
            return 0.1 * F.softplus(g, beta=0.5)
        if self.global_affine_type == "SIGMOID":
            return 10.0 * torch.sigmoid(g - 2.0)
        return torch.exp(g)

    @staticmethod
    def _channels_last_view(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return v.view(1, -1, *([1] * (x.dim() - 2)))

    def _permute(self, x: torch.Tensor, inverse: bool) -> torch.Tensor:
        """``P x`` (or ``P^-1 x``): output channel i is input channel perm[i]."""
        if not self.permute_soft:
            return x.index_select(1, self.perm_inv if inverse else self.perm)
        w = self.w_perm.t() if inverse else self.w_perm
        w = w.to(x.dtype)
        if x.dim() == 2:
            return F.linear(x, w)
        if x.dim() == 4:
            return F.conv2d(x, w[:, :, None, None])
        return torch.einsum("oc,bc...->bo...", w, x)

    def _condition(self, x1: torch.Tensor, c: torch.Tensor | None) -> torch.Tensor:
        if self.cond_channels == 0:
            if c is not None:
                raise ValueError("AllInOneBlock got a condition c but was built with cond_channels=0; "
                                 "pass cond_channels=<channels of c> or no c.")
            return x1
        if c is None:
            raise ValueError(f"AllInOneBlock was built with cond_channels={self.cond_channels} and needs a condition c.")
        if c.dim() == 2 and x1.dim() > 2:
            c = c.view(*c.shape, *([1] * (x1.dim() - 2))).expand(-1, -1, *x1.shape[2:])
        if c.shape[1] != self.cond_channels or c.shape[0] != x1.shape[0] or c.shape[2:] != x1.shape[2:]:
            raise ValueError(f"AllInOneBlock condition c has shape {tuple(c.shape)}; expected "
                             f"[{x1.shape[0]}, {self.cond_channels}{', ' if x1.dim() > 2 else ''}"
                             f"{', '.join(str(s) for s in x1.shape[2:])}] (or [B, {self.cond_channels}]).")
        return torch.cat([x1, c.to(x1.dtype)], dim=1)

    def _coupling(self, x1: torch.Tensor, c: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        if getattr(self.subnet, "takes_condition", False) and c is not None:
            a = 0.1 * self.subnet(x1, c)  # the subnet combines x1 and c itself (e.g. projects c once)
        else:
            a = 0.1 * self.subnet(self._condition(x1, c))
        s = tanh_clamp(a[:, : self.split_active], self.clamp)
        if self.gin:
            s = s - s.mean(dim=tuple(range(1, s.dim())), keepdim=True)
        return s, a[:, self.split_active:]

    # ----------------------------------------------------------------------------- forward
    def forward(self, x: torch.Tensor, c: torch.Tensor | None = None, rev: bool = False):
        if x.dim() < 2 or x.shape[1] != self.channels:
            raise ValueError(f"AllInOneBlock expects [B, {self.channels}, ...] inputs, got shape {tuple(x.shape)}.")
        dims = tuple(range(1, x.dim()))
        n_positions = math.prod(x.shape[2:])
        if self.gin:
            scale = None
            global_logdet = x.new_zeros(())
        else:
            scale = self._scale().to(x.dtype)
            global_logdet = n_positions * torch.log(scale).sum()
        offset = self._channels_last_view(self.global_offset.to(x.dtype), x)
        if not rev:
            if self.reverse_permutation:
                x = self._permute(x, inverse=True)
            x1, x2 = torch.split(x, [self.split_passive, self.split_active], dim=1)
            s, t = self._coupling(x1, c)
            u = torch.cat([x1, x2 * torch.exp(s) + t], dim=1)
            if scale is not None:
                u = u * self._channels_last_view(scale, x)
            y = self._permute(u + offset, inverse=False)
            return y, s.sum(dim=dims) + global_logdet
        u = self._permute(x, inverse=True) - offset
        if scale is not None:
            u = u / self._channels_last_view(scale, x)
        x1, y2 = torch.split(u, [self.split_passive, self.split_active], dim=1)
        s, t = self._coupling(x1, c)
        out = torch.cat([x1, (y2 - t) * torch.exp(-s)], dim=1)
        if self.reverse_permutation:
            out = self._permute(out, inverse=False)
        return out, -(s.sum(dim=dims) + global_logdet)

    def extra_repr(self) -> str:
        return (f"channels={self.channels}, cond_channels={self.cond_channels}, clamp={self.clamp}, "
                f"gin={self.gin}, global_affine_type={self.global_affine_type}, permute_soft={self.permute_soft}")


class SequenceFlow(InvertibleModule):
    """Modules applied in order (reverse order with ``rev``); the log-determinants add. The same
    condition ``c`` is given to every module except those built without one (``cond_channels ==
    0``), which get ``None``."""

    def __init__(self, modules: Sequence[nn.Module]) -> None:
        super().__init__()
        self.flows = nn.ModuleList(modules)

    def __len__(self) -> int:
        return len(self.flows)

    def __iter__(self):
        return iter(self.flows)

    def __getitem__(self, i):
        return self.flows[i]

    def forward(self, x, c: torch.Tensor | None = None, rev: bool = False):
        total = _zeros_like_batch(x)
        for module in (reversed(self.flows) if rev else self.flows):
            cond = None if getattr(module, "cond_channels", None) == 0 else c
            x, logdet = module(x, c=cond, rev=rev)
            total = total + logdet
        return x, total


def _space_to_depth(x: torch.Tensor) -> torch.Tensor:
    b, ch, h, w = x.shape
    if h % 2 or w % 2:
        raise ValueError(f"Squeeze needs an even height and width, got {h}x{w}.")
    x = x.reshape(b, ch, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4)
    return x.reshape(b, ch * 4, h // 2, w // 2)


def _depth_to_space(x: torch.Tensor) -> torch.Tensor:
    b, ch, h, w = x.shape
    if ch % 4:
        raise ValueError(f"Unsqueeze needs a channel count divisible by 4, got {ch}.")
    x = x.reshape(b, ch // 4, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3)
    return x.reshape(b, ch // 4, h * 2, w * 2)


class Squeeze(InvertibleModule):
    """Space-to-depth, ``[B, C, H, W] -> [B, 4C, H/2, W/2]`` (channel ``4c + 2i + j`` holds the
    pixel ``(2y + i, 2x + j)`` of channel ``c``, as ``pixel_unshuffle``); ``rev`` is
    depth-to-space. A permutation of the entries: log-det 0."""

    def forward(self, x: torch.Tensor, c: torch.Tensor | None = None, rev: bool = False):
        y = _depth_to_space(x) if rev else _space_to_depth(x)
        return y, _zeros_like_batch(x)


class Unsqueeze(InvertibleModule):
    """Depth-to-space, ``[B, 4C, H, W] -> [B, C, 2H, 2W]`` (the inverse of :class:`Squeeze`,
    FrEIA's ``IRevNetUpsampling`` up to the order of the channels); log-det 0."""

    def forward(self, x: torch.Tensor, c: torch.Tensor | None = None, rev: bool = False):
        y = _space_to_depth(x) if rev else _depth_to_space(x)
        return y, _zeros_like_batch(x)


class Split(InvertibleModule):
    """Splits a tensor into a tuple along ``dim`` (1 = channels) by ``sections`` (sizes);
    ``rev`` concatenates. Log-det 0."""

    def __init__(self, sections: Sequence[int], dim: int = 1) -> None:
        super().__init__()
        self.sections = [int(s) for s in sections]
        self.dim = int(dim)

    def forward(self, x, c: torch.Tensor | None = None, rev: bool = False):
        if rev:
            return torch.cat(list(x), dim=self.dim), _zeros_like_batch(x)
        if x.shape[self.dim] != sum(self.sections):
            raise ValueError(f"Split{tuple(self.sections)} expects {sum(self.sections)} entries along dim "
                             f"{self.dim}, got shape {tuple(x.shape)}.")
        return tuple(torch.split(x, self.sections, dim=self.dim)), _zeros_like_batch(x)


class Concat(InvertibleModule):
    """Concatenates a tuple of tensors along ``dim``; ``rev`` splits it back into ``sections``
    (the sizes of the parts along ``dim``). Log-det 0."""

    def __init__(self, sections: Sequence[int], dim: int = 1) -> None:
        super().__init__()
        self.sections = [int(s) for s in sections]
        self.dim = int(dim)

    def forward(self, x, c: torch.Tensor | None = None, rev: bool = False):
        if rev:
            if x.shape[self.dim] != sum(self.sections):
                raise ValueError(f"Concat{tuple(self.sections)} (rev) expects {sum(self.sections)} entries along "
                                 f"dim {self.dim}, got shape {tuple(x.shape)}.")
            return tuple(torch.split(x, self.sections, dim=self.dim)), _zeros_like_batch(x)
        sizes = [t.shape[self.dim] for t in x]
        if sizes != self.sections:
            raise ValueError(f"Concat expects parts of sizes {self.sections} along dim {self.dim}, got {sizes}.")
        return torch.cat(list(x), dim=self.dim), _zeros_like_batch(x)
