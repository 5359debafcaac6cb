"""Principal component analysis (DFM, DFKDE): fit, project, reconstruct.

For samples ``X [N, D]`` with mean ``mu``, the thin SVD of the centred data
``X - mu = U S V^T`` gives the principal axes (columns of ``V``), the singular values ``S`` and
the explained variances ``lambda_i = S_i^2 / N`` (biased, as anomalib's DFM Gaussian; scikit-learn
divides by ``N - 1``; the ratios are the same). The number of components is either a count, or
a fraction ``0 < f < 1`` of the total variance: the smallest ``k`` with
``sum_{i<=k} S_i^2 / sum_i S_i^2 >= f`` (scikit-learn's rule; anomalib's ``PCA`` keeps one
component fewer than that, an off-by-one of its code). Signs are made deterministic as
scikit-learn's ``svd_flip`` does for ``V``: the largest-magnitude loading of each axis is positive.

Projection ``z = (x - mu) V_k`` and reconstruction ``x_hat = z V_k^T + mu``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

__all__ = ["PCAResult", "fit_pca", "pca_transform", "pca_inverse_transform"]


class PCAResult(NamedTuple):
    """A fitted PCA: ``mean [D]``, ``components [D, k]`` (orthonormal columns, the principal
    axes), ``variances [k]`` (``S_i^2 / N``, descending) and ``variance_ratio [k]`` (share of the
    total variance of each kept component)."""

    mean: torch.Tensor
    components: torch.Tensor
    variances: torch.Tensor
    variance_ratio: torch.Tensor


def fit_pca(x: torch.Tensor, n_components: int | float, *, dtype: torch.dtype | None = None) -> PCAResult:
    """Fit a PCA to ``x [N, D]``.

    Args:
        x: samples, N >= 2.
        n_components: an integer count (at most ``min(N, D)``), or a fraction in (0, 1) of the
            variance to keep (see the module docstring).
        dtype: dtype of the results (default: float32, float64 for a float64 input). The SVD is
            always computed in float64.

    Returns:
        :class:`PCAResult`.
    """
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"x must be [N, D] with N >= 2, got shape {tuple(x.shape)}")
    out = dtype or (torch.float64 if x.dtype == torch.float64 else torch.float32)
    n, d = x.shape
    with torch.no_grad():
        x64 = x.detach().to(torch.float64)
        mean = x64.mean(dim=0)
        _, s, vh = torch.linalg.svd(x64 - mean, full_matrices=False)  # vh [r, D], r = min(N, D)
        power = s * s
        total = float(power.sum())
        if not total > 0:
            raise ValueError(f"the {n} samples are all identical: no variance to analyse")
        ratio = power / total
        if 0 < float(n_components) < 1:
            frac = float(n_components)
            reached = torch.nonzero(torch.cumsum(ratio, 0) >= frac - 1e-12)
            k = int(reached[0, 0]) + 1 if len(reached) else len(s)
        else:
            k = int(n_components)
            if k != float(n_components) or not 1 <= k <= min(n, d):
                raise ValueError(f"n_components must be a fraction in (0, 1) or an integer in "
                                 f"[1, min(N, D) = {min(n, d)}], got {n_components}")
        v = vh[:k].T  # [D, k]
        sign = torch.sign(v.gather(0, v.abs().argmax(dim=0, keepdim=True)))
        sign[sign == 0] = 1
        v = v * sign
        return PCAResult(mean.to(out), v.contiguous().to(out), (power[:k] / n).to(out), ratio[:k].to(out))


def pca_transform(x: torch.Tensor, pca: PCAResult) -> torch.Tensor:
    """Coordinates ``z = (x - mu) V_k`` ``[N, k]`` of samples ``x [N, D]``."""
    return (x.to(pca.components.dtype) - pca.mean) @ pca.components


def pca_inverse_transform(z: torch.Tensor, pca: PCAResult) -> torch.Tensor:
    """Reconstruction ``x_hat = z V_k^T + mu`` ``[N, D]`` from coordinates ``z [N, k]``."""
    return z.to(pca.components.dtype) @ pca.components.T + pca.mean
