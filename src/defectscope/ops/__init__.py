"""Shared numerical kernels: small pure functions, tensors in and tensors out.

* :mod:`.blur` -- Gaussian smoothing (anomalib's convention) and bilinear resizing of maps;
* :mod:`.knn` -- exact blocked k-nearest-neighbour search (torch, or faiss when installed);
* :mod:`.coreset` -- PatchCore's greedy k-center coreset (exact, lazy, matrix-matrix);
* :mod:`.gaussian` -- PaDiM's per-position Gaussian, Mahalanobis distance, Ledoit-Wolf;
* :mod:`.ssim` -- structural similarity;
* :mod:`.pca` -- principal component analysis (DFM, DFKDE);
* :mod:`.kde` -- Gaussian kernel density estimate, Scott's / Silverman's bandwidth (DFKDE);
* :mod:`.tiling` -- cutting large images into tiles and stitching the tile maps back (every method);
* :mod:`.synth` -- simulated anomalies (Perlin masks, textures, DRAEM's blend) for the methods that
  learn from them (DRAEM, DSR), and the procedural dead-leaves images (imported on use).
"""

from .blur import blur_operator, gaussian_blur, gaussian_kernel1d, upsample
from .coreset import CoresetResult, coreset_projection, coreset_size, greedy_coreset
from .gaussian import (
    cholesky_inverse_factor,
    fit_gaussian,
    inverse_covariance,
    ledoit_wolf,
    mahalanobis,
)
from .kde import KDEResult, fit_gaussian_kde, kde_bandwidth, kde_log_density
from .knn import NearestNeighbors, faiss_available, knn
from .pca import PCAResult, fit_pca, pca_inverse_transform, pca_transform

__all__ = [
    "blur_operator",
    "gaussian_blur",
    "gaussian_kernel1d",
    "upsample",
    "knn",
    "NearestNeighbors",
    "faiss_available",
    "greedy_coreset",
    "coreset_projection",
    "coreset_size",
    "CoresetResult",
    "fit_gaussian",
    "inverse_covariance",
    "cholesky_inverse_factor",
    "mahalanobis",
    "ledoit_wolf",
    "PCAResult",
    "fit_pca",
    "pca_transform",
    "pca_inverse_transform",
    "KDEResult",
    "kde_bandwidth",
    "fit_gaussian_kde",
    "kde_log_density",
]
