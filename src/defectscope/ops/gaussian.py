"""Multivariate Gaussian kernels: per-position fit (PaDiM), Mahalanobis distance, Ledoit-Wolf.

* :func:`fit_gaussian` -- Defard et al., "PaDiM: a Patch Distribution Modeling Framework for Anomaly
  Detection and Localization", ICPR 2020, Sec. 3.2: at every patch position ``ij`` the mean and
  the unbiased sample covariance ``Sigma_ij = 1/(N-1) sum_k (x_ij^k - mu_ij)(x_ij^k - mu_ij)^T +
  eps I`` with ``eps = 0.01``.
* :func:`mahalanobis` -- ``M(x_ij) = sqrt((x_ij - mu_ij)^T Sigma_ij^-1 (x_ij - mu_ij))`` (PaDiM
  eq. 2), batched over all positions at once, from either the precision matrix ``Sigma^-1``
  (:func:`inverse_covariance`) or the triangular factor ``L^-1`` of ``Sigma = L L^T``
  (:func:`cholesky_inverse_factor`), for which ``M(x) = ||L^-1 (x - mu)||``.
* :func:`ledoit_wolf` -- Ledoit & Wolf, "A well-conditioned estimator for large-dimensional
  covariance matrices", J. Multivariate Analysis 88 (2004): the shrunk covariance
  ``(1 - s) S + s (tr S / D) I`` with the estimated optimal ``s``, computed as
  ``sklearn.covariance.LedoitWolf`` does (S is the biased, 1/N, sample covariance).
"""

from __future__ import annotations

import torch

__all__ = [
    "fit_gaussian",
    "inverse_covariance",
    "cholesky_inverse_factor",
    "mahalanobis",
    "ledoit_wolf",
]

_BUDGET_ELEMS = 32 * 2**20  # elements of temporaries per chunk of positions (~128 MB float32)


def _float_dtype(dtype: torch.dtype | None, *tensors: torch.Tensor) -> torch.dtype:
    if dtype is not None:
        return dtype
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def fit_gaussian(
    x: torch.Tensor, reg: float = 0.01, *, dtype: torch.dtype | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and regularised unbiased covariance, per position (PaDiM).

    Args:
        x: ``[N, P, D]`` (N samples of P positions) or ``[N, D]`` (one position); N >= 2.
        reg: ``eps`` added to the diagonal (PaDiM: 0.01).
        dtype: dtype of the computation and of the results; default float32 (float64 for a
            float64 input). ``torch.float64`` gives float64 accumulation for a float32 input.

    Returns:
        ``(mean [P, D], cov [P, D, D])``, or ``([D], [D, D])`` for a 2-D input.
    """
    if x.ndim not in (2, 3):
        raise ValueError(f"x must be [N, P, D] or [N, D], got shape {tuple(x.shape)}")
    squeeze = x.ndim == 2
    if squeeze:
        x = x.unsqueeze(1)
    n, p, d = x.shape
    if n < 2:
        raise ValueError(f"the covariance needs at least 2 samples, got {n}")
    dtype = _float_dtype(dtype, x)
    with torch.no_grad():
        mean = x.to(dtype).mean(dim=0)  # [P, D]
        cov = torch.empty(p, d, d, dtype=dtype, device=x.device)
        step = max(1, _BUDGET_ELEMS // max(1, n * d + d * d))
        for lo in range(0, p, step):
            hi = min(p, lo + step)
            xc = x[:, lo:hi].to(dtype) - mean[lo:hi]  # [N, c, D]
            xc = xc.transpose(0, 1)  # [c, N, D]
            torch.matmul(xc.transpose(1, 2), xc, out=cov[lo:hi])  # [c, D, D]
        cov /= n - 1
        cov.diagonal(dim1=-2, dim2=-1).add_(reg)
    if squeeze:
        return mean[0], cov[0]
    return mean, cov


def _cholesky(cov: torch.Tensor) -> torch.Tensor:
    chol, info = torch.linalg.cholesky_ex(cov)
    if bool((info != 0).any()):
        bad = int((info != 0).nonzero()[0, 0]) if info.ndim else 0
        raise ValueError(f"covariance is not positive definite (first at position {bad}); "
                         "increase the regularisation")
    return chol


def inverse_covariance(cov: torch.Tensor) -> torch.Tensor:
    """Precision matrices ``Sigma^-1`` ``[P, D, D]`` (or ``[D, D]``), through Cholesky; exactly
    symmetric."""
    prec = torch.cholesky_inverse(_cholesky(cov))
    return 0.5 * (prec + prec.transpose(-1, -2))


def cholesky_inverse_factor(cov: torch.Tensor) -> torch.Tensor:
    """Lower-triangular ``L^-1`` ``[P, D, D]`` (or ``[D, D]``) with ``Sigma = L L^T``, so that
    ``(x - mu)^T Sigma^-1 (x - mu) = ||L^-1 (x - mu)||^2`` and ``Sigma^-1 = L^-T L^-1``."""
    chol = _cholesky(cov)
    eye = torch.eye(cov.shape[-1], dtype=cov.dtype, device=cov.device).expand_as(cov)
    return torch.linalg.solve_triangular(chol, eye, upper=False)


def mahalanobis(
    x: torch.Tensor,
    mean: torch.Tensor,
    precision: torch.Tensor | None = None,
    *,
    factor: torch.Tensor | None = None,
    squared: bool = False,
) -> torch.Tensor:
    """Mahalanobis distance of every sample at every position, no loop over positions.

    Args:
        x: ``[B, P, D]`` (or ``[B, D]`` with ``mean [D]`` and a ``[D, D]`` matrix).
        mean: ``[P, D]``.
        precision: ``Sigma^-1`` ``[P, D, D]`` (:func:`inverse_covariance`); or instead
        factor: ``L^-1`` ``[P, D, D]`` (:func:`cholesky_inverse_factor`), keyword only.
            Exactly one of the two.
        squared: return the squared distance.

    Returns:
        ``[B, P]`` (``[B]`` for 2-D input), in the dtype of the matrix (float32 or float64).
    """
    if (precision is None) == (factor is None):
        raise ValueError("give exactly one of precision and factor")
    mat = precision if precision is not None else factor
    squeeze = x.ndim == 2
    if squeeze:
        x, mean, mat = x.unsqueeze(1), mean.unsqueeze(0), mat.unsqueeze(0)
    if x.ndim != 3 or mean.shape != x.shape[1:] or mat.shape != (*mean.shape, mean.shape[-1]):
        raise ValueError(f"shapes do not fit: x {tuple(x.shape)}, mean {tuple(mean.shape)}, "
                         f"matrix {tuple(mat.shape)}")
    b, p, d = x.shape
    dtype = mat.dtype if mat.dtype == torch.float64 else torch.float32
    mat = mat.to(dtype)
    if factor is not None:
        mat = mat.transpose(-1, -2)  # row vectors: (L^-1 delta)^T = delta^T L^-T
    out = torch.empty(p, b, dtype=dtype, device=x.device)
    step = max(1, _BUDGET_ELEMS // max(1, 2 * b * d))
    with torch.no_grad():
        for lo in range(0, p, step):
            hi = min(p, lo + step)
            # contiguous: a strided [c, B, D] view (e.g. from a [B, D, H, W] feature map) makes bmm
            # 3x slower at B = 1 than the copy costs
            delta = (x[:, lo:hi].to(dtype) - mean[lo:hi].to(dtype)).transpose(0, 1).contiguous()  # [c, B, D]
            t = torch.bmm(delta, mat[lo:hi])  # [c, B, D]
            if factor is not None:
                out[lo:hi] = torch.einsum("cbd,cbd->cb", t, t)
            else:
                out[lo:hi] = torch.einsum("cbd,cbd->cb", t, delta)
    out = out.T.clamp_(min=0)
    if not squared:
        out = out.sqrt_()
    return out[:, 0] if squeeze else out


def ledoit_wolf(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Ledoit-Wolf shrunk covariance, as ``sklearn.covariance.LedoitWolf().fit(x)``.

    Args:
        x: ``[N, D]`` samples.

    Returns:
        ``(mean [D], cov [D, D], shrinkage)``: sklearn's ``location_``, ``covariance_`` and
        ``shrinkage_``. Computed in float64; returned in the input's dtype (float32 for
        non-float inputs).
    """
    if x.ndim != 2 or x.shape[0] < 1:
        raise ValueError(f"x must be [N, D] with N >= 1, got shape {tuple(x.shape)}")
    out_dtype = x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32
    with torch.no_grad():
        x = x.to(torch.float64)
        n, p = x.shape
        mean = x.mean(dim=0)
        xc = x - mean
        emp = (xc.T @ xc) / n  # biased sample covariance
        if p == 1:
            return mean.to(out_dtype), emp.to(out_dtype), 0.0
        trace = float(torch.trace(emp))
        mu = trace / p
        beta_ = float(((xc * xc).sum(dim=1) ** 2).sum())  # sum of <X2.T, X2>
        delta_ = float((emp * emp).sum())  # sum of squared coefficients of X.T X / n^2
        beta = (beta_ / n - delta_) / (p * n)
        delta = (delta_ - 2.0 * mu * trace + p * mu**2) / p
        beta = min(beta, delta)
        shrinkage = 0.0 if beta == 0 or delta <= 0 else beta / delta
        cov = (1.0 - shrinkage) * emp
        cov.diagonal().add_(shrinkage * mu)
    return mean.to(out_dtype), cov.to(out_dtype), float(shrinkage)
