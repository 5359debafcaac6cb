"""Gaussian kernel density estimate (DFKDE), as ``scipy.stats.gaussian_kde`` and anomalib's
``GaussianKDE``.

For training points ``x_1..x_N`` in ``R^d`` the kernel covariance is the sample covariance scaled
by the squared bandwidth factor, ``H = h^2 Cov(x)`` (unbiased covariance), with Scott's rule
``h = N^(-1/(d+4))`` or Silverman's rule ``h = (N (d + 2) / 4)^(-1/(d+4))`` (or a given ``h``).
The density is

    p(q) = 1/N sum_i (2 pi)^(-d/2) |H|^(-1/2) exp(-1/2 (q - x_i)^T H^-1 (q - x_i)).

With ``H = L L^T`` the points are whitened once, ``w_i = L^-1 x_i``, so that the exponent is
``-|L^-1 q - w_i|^2 / 2``; the log density is computed with a log-sum-exp (no underflow to 0 far
from the data, where anomalib adds 1e-300 before its log), in float64, in blocks of queries.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

__all__ = ["KDEResult", "kde_bandwidth", "fit_gaussian_kde", "kde_log_density"]

_BUDGET_ELEMS = 16 * 2**20  # elements of the [queries, N, d] difference block


class KDEResult(NamedTuple):
    """A fitted KDE: ``points [N, d]`` (whitened training points ``L^-1 x_i``), ``transform
    [d, d]`` (``L^-T``: whitened query = ``q @ transform``) and ``log_norm`` (0-d tensor,
    ``-log N - d/2 log(2 pi) - 1/2 log|H|``)."""

    points: torch.Tensor
    transform: torch.Tensor
    log_norm: torch.Tensor


def kde_bandwidth(n: int, d: int, rule: str | float = "scott") -> float:
    """The bandwidth factor ``h`` for ``n`` points in ``d`` dimensions: ``"scott"``,
    ``"silverman"``, or a positive number returned as it is."""
    if isinstance(rule, str):
        if rule == "scott":
            return n ** (-1.0 / (d + 4))
        if rule == "silverman":
            return (n * (d + 2) / 4.0) ** (-1.0 / (d + 4))
        raise ValueError(f"bandwidth must be 'scott', 'silverman' or a positive number, got {rule!r}")
    if not float(rule) > 0:
        raise ValueError(f"a bandwidth factor must be positive, got {rule}")
    return float(rule)


def fit_gaussian_kde(x: torch.Tensor, bandwidth: str | float = "scott") -> KDEResult:
    """Fit a Gaussian KDE to ``x [N, d]`` (N > d, so that the covariance is invertible).

    Returns a float64 :class:`KDEResult`.
    """
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"x must be [N, d] with N >= 2, got shape {tuple(x.shape)}")
    n, d = x.shape
    if n <= d:
        raise ValueError(f"the KDE covariance of {n} points in {d} dimensions is singular; "
                         "it needs more points than dimensions")
    h = kde_bandwidth(n, d, bandwidth)
    with torch.no_grad():
        x64 = x.detach().to(torch.float64)
        xc = x64 - x64.mean(dim=0)
        cov = (xc.T @ xc) / (n - 1) * h * h
        chol, info = torch.linalg.cholesky_ex(cov)
        if int(info) != 0:
            raise ValueError(f"the KDE covariance of {n} points in {d} dimensions is singular; "
                             "the points lie on a hyperplane")
        eye = torch.eye(d, dtype=torch.float64, device=x.device)
        transform = torch.linalg.solve_triangular(chol, eye, upper=False).T.contiguous()  # L^-T
        log_det = 2.0 * torch.log(torch.diagonal(chol)).sum()
        log_norm = -math.log(n) - 0.5 * d * math.log(2 * math.pi) - 0.5 * log_det
        return KDEResult((x64 @ transform).contiguous(), transform, log_norm)


def kde_log_density(query: torch.Tensor, kde: KDEResult) -> torch.Tensor:
    """``log p(q)`` ``[B]`` (float64) of each row of ``query [B, d]``."""
    points, transform = kde.points, kde.transform
    if query.ndim != 2 or query.shape[1] != points.shape[1]:
        raise ValueError(f"query [B, {points.shape[1]}] expected, got {tuple(query.shape)}")
    n, d = points.shape
    out = torch.empty(query.shape[0], dtype=torch.float64, device=query.device)
    rows = max(1, _BUDGET_ELEMS // max(1, n * d))
    with torch.no_grad():
        q = query.detach().to(torch.float64) @ transform.to(query.device)
        pts = points.to(query.device)
        for lo in range(0, q.shape[0], rows):
            diff = q[lo:lo + rows, None, :] - pts  # [b, N, d], exact (no |a|^2 + |b|^2 - 2ab)
            out[lo:lo + rows] = torch.logsumexp(-0.5 * (diff * diff).sum(dim=2), dim=1)
        return out + kde.log_norm.to(query.device)
