"""FID, sFID, Inception Score, Precision and Recall on feature arrays, as the ADM evaluator computes them.

Pure numpy/torch: these functions take features (from
:class:`ditq.eval.inception.FIDInceptionV3` or anything else) and know
nothing of images or networks. Each follows openai/guided-diffusion
``evaluations/evaluator.py`` step by step; where it cannot be identical the
docstring says how it differs and by how much.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch

from ditq.errors import DitqError, InvalidArgumentError


class FrechetDistanceError(DitqError, ValueError):
    """The matrix square root of the covariance product has a large imaginary part (ADM raises too)."""


def _as_2d_features(feats, name: str) -> np.ndarray:
    feats = np.asarray(feats) if not isinstance(feats, torch.Tensor) else feats.detach().cpu().numpy()
    if feats.ndim != 2 or len(feats) == 0 or feats.shape[1] == 0:
        raise InvalidArgumentError(
            f"{name} must be a non-empty (N, D) feature array, got shape {feats.shape}"
        )
    if not np.issubdtype(feats.dtype, np.floating):
        raise InvalidArgumentError(f"{name} must be floating point, got {feats.dtype}")
    return feats


#################################################################################
#                                   FID, sFID                                   #
#################################################################################


def feature_statistics(feats) -> tuple[np.ndarray, np.ndarray]:
    """Mean (D,) and covariance (D, D) of (N, D) features, both float64.

    The covariance is ``np.cov(feats, rowvar=False)`` (divides by N - 1), as
    ADM's ``compute_statistics``. ADM's mean is float32 for float32 features;
    ours is float64 (the difference is far below the reported 4 digits).
    """
    feats = _as_2d_features(feats, "features")
    if len(feats) < 2:
        raise InvalidArgumentError(f"statistics need at least 2 feature vectors, got {len(feats)}")
    feats64 = feats.astype(np.float64, copy=False)
    return feats64.mean(axis=0), np.atleast_2d(np.cov(feats64, rowvar=False))  # (1, 1) when D = 1


def _sqrtm_product(a: np.ndarray) -> tuple[complex, np.ndarray]:
    """Principal square root of a diagonalizable matrix through its eigen-decomposition.

    Returns ``(trace, diagonal)`` of ``sqrtm(a)``. ``a = V diag(l) V^-1`` gives
    ``sqrtm(a) = V diag(sqrt(l)) V^-1`` with the principal (complex) root, so the
    trace is ``sum(sqrt(l))`` -- the same number the Schur method of
    ``scipy.linalg.sqrtm`` sums on the diagonal of its triangular root.
    The diagonal is only used for ADM's imaginary-part check.
    """
    eigvals, eigvecs = np.linalg.eig(a)
    roots = np.sqrt(eigvals.astype(np.complex128))
    try:
        inv = np.linalg.inv(eigvecs)
    except np.linalg.LinAlgError:  # defective (numerically singular eigenvectors): not finite
        return complex(np.nan), np.full(len(a), np.nan, dtype=np.complex128)
    diagonal = np.einsum("ik,k,ki->i", eigvecs, roots, inv)
    return complex(roots.sum()), diagonal


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> float:
    """Fréchet distance between Gaussians: ``|mu1-mu2|^2 + tr S1 + tr S2 - 2 tr sqrt(S1 S2)``, float64.

    Follows ADM's ``FIDStatistics.frechet_distance``: the square root is of
    the product ``S1 @ S2``; when it is not finite, ``eps`` is added to both
    diagonals and it is computed again (with a warning); an imaginary part
    above 1e-3 on its diagonal is an error, else the real part is kept.

    ADM calls ``scipy.linalg.sqrtm`` (a Schur method); here the root comes
    from an eigen-decomposition of the same product (no scipy dependency).
    Both take principal roots of the same eigenvalues, so the trace agrees to
    rounding (about 1e-10 relative on well-conditioned covariances). They can
    differ in *when* the product counts as not finite: Schur fails on exactly
    repeated zero eigenvalues, eigen-decomposition on numerically defective
    matrices; both then take the same ``eps`` retry.
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = (
        np.atleast_2d(np.asarray(sigma1, np.float64)),
        np.atleast_2d(np.asarray(sigma2, np.float64)),
    )
    if mu1.shape != mu2.shape or mu1.ndim != 1:
        raise InvalidArgumentError(f"mean vectors differ in shape: {mu1.shape} vs {mu2.shape}")
    d = mu1.shape[0]
    if sigma1.shape != (d, d) or sigma2.shape != (d, d):
        raise InvalidArgumentError(
            f"covariances must be ({d}, {d}) to match the means, got {sigma1.shape} and {sigma2.shape}"
        )
    for name, x in (("mu1", mu1), ("sigma1", sigma1), ("mu2", mu2), ("sigma2", sigma2)):
        if not np.isfinite(x).all():
            raise InvalidArgumentError(f"{name} contains NaN or infinite values")

    diff = mu1 - mu2
    tr_covmean, diagonal = _sqrtm_product(sigma1.dot(sigma2))
    if not (np.isfinite(tr_covmean) and np.isfinite(diagonal).all()):
        warnings.warn(
            f"fid calculation produces singular product; adding {eps} to diagonal of cov estimates",
            RuntimeWarning,
            stacklevel=2,
        )
        offset = np.eye(d) * eps
        tr_covmean, diagonal = _sqrtm_product((sigma1 + offset).dot(sigma2 + offset))
    if not np.allclose(diagonal.imag, 0, atol=1e-3):
        raise FrechetDistanceError(
            f"the square root of the covariance product has an imaginary part up to "
            f"{np.max(np.abs(diagonal.imag)):.3g}; the statistics are degenerate (too few samples?)"
        )
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_covmean.real)


#################################################################################
#                                Inception Score                                #
#################################################################################


def inception_score(probs, split_size: int = 5000) -> float:
    """Inception Score of class probabilities (N, C), as ADM's ``compute_inception_score``.

    Rows are taken in file order in splits of ``split_size`` (the last split
    may be shorter and counts as one split like the others); per split
    ``exp(mean_x KL(p(y|x) || p(y)))`` with ``p(y)`` the split's mean; the
    result is the mean over splits. Arithmetic stays in the dtype of
    ``probs`` (float32 from the network, as in ADM). One deliberate
    difference: a probability of exactly 0 contributes 0 (the limit of
    ``p log p``), where ADM's formula would give NaN.
    """
    probs = _as_2d_features(probs, "probs")
    if split_size < 1:
        raise InvalidArgumentError(f"split_size must be positive, got {split_size}")
    if (probs < 0).any() or not np.isfinite(probs).all():
        raise InvalidArgumentError("probs must be finite and non-negative (softmax outputs)")
    scores = []
    for i in range(0, len(probs), split_size):
        part = probs[i : i + split_size]
        marginal = np.expand_dims(np.mean(part, 0), 0)
        with np.errstate(divide="ignore", invalid="ignore"):
            kl = part * (np.log(part) - np.log(marginal))
        kl = np.where(part > 0, kl, 0).astype(part.dtype, copy=False)
        scores.append(np.exp(np.mean(np.sum(kl, 1))))
    return float(np.mean(scores))


#################################################################################
#                              Precision and Recall                             #
#################################################################################


def _round16_(x: torch.Tensor) -> torch.Tensor:
    # Round a float32 tensor to the nearest float16 value, in place (past 65504: inf).
    return x.copy_(x.half())


def _distances32(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    norm_u = (u * u).sum(1, keepdim=True)
    norm_v = (v * v).sum(1, keepdim=True).T
    return torch.clamp(norm_u - 2 * (u @ v.T) + norm_v, min=0.0)


def _distances16(u16: torch.Tensor, v16: torch.Tensor) -> torch.Tensor:
    # ADM casts the features to float16 and runs TF's distance graph in
    # float16: every op's result is a float16, while the matmul accumulates in
    # float32 (GPU kernels). Here: float16-valued float32 inputs (their
    # products are exact in float32), float32 arithmetic, and a rounding to
    # float16 after each of TF's ops, in TF's order:
    # max(norm_u - 2 * (U @ V^T) + norm_v, 0). In place: blocks are large.
    norm_u = _round16_(_round16_(u16 * u16).sum(1, keepdim=True))
    norm_v = _round16_(_round16_(v16 * v16).sum(1, keepdim=True)).T
    d = _round16_(u16 @ v16.T)
    _round16_(d.mul_(-2))
    _round16_(d.add_(norm_u))
    _round16_(d.add_(norm_v))
    return d.clamp_(min=0.0)


def pairwise_distances(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Squared Euclidean distances (len(u), len(v)) as ADM's ``DistanceBlock``: float16, else float32.

    Computed in (emulated) float16 first; if any value of the block is not
    finite, the whole block is computed again in float32. No square root:
    radii and comparisons are on squared distances.
    """
    u32, v32 = u.float(), v.float()
    d = _distances16(u32.half().float(), v32.half().float())
    if torch.isfinite(d).all():
        return d
    return _distances32(u32, v32)


def manifold_radii(feats: torch.Tensor, k: int = 3, batch: int = 10000) -> torch.Tensor:
    """Squared distance of each point to its k-th nearest neighbour, the point itself counting as 0th.

    That is index ``k`` of each sorted row of the (N, N) distance matrix,
    computed in blocks of ``batch`` x ``batch`` (ADM's ``manifold_radii``
    with ``nhood_sizes=(3,)``), keeping only the ``k + 1`` smallest per row.
    """
    n = len(feats)
    if n <= k:
        raise InvalidArgumentError(
            f"precision/recall with k={k} needs more than {k} feature vectors, got {n}"
        )
    radii = torch.empty(n, dtype=torch.float32, device=feats.device)
    for r0 in range(0, n, batch):
        rows = feats[r0 : r0 + batch]
        best = None  # the k+1 smallest distances seen so far, per row
        for c0 in range(0, n, batch):
            block = pairwise_distances(rows, feats[c0 : c0 + batch])
            cand = block if best is None else torch.cat([best, block], 1)
            best = torch.topk(cand, min(k + 1, cand.shape[1]), dim=1, largest=False).values
        radii[r0 : r0 + len(rows)] = best.max(dim=1).values
    return radii


def precision_recall(
    real_feats, fake_feats, k: int = 3, batch: int = 10000, device: torch.device | str | None = None
) -> tuple[float, float]:
    """Improved Precision and Recall (Kynkäänniemi et al.) exactly as ADM's ``ManifoldEstimator``.

    Each set's manifold is the union of balls around its points, the radius
    being the (squared) distance to the k-th nearest neighbour of the same
    set (:func:`manifold_radii`). Precision is the share of ``fake_feats``
    inside some ball of ``real_feats`` (``distance <= radius``); recall the
    share of ``real_feats`` inside some ball of ``fake_feats``. Distances are
    squared, float16 with a float32 fallback per block of ``batch`` x
    ``batch`` (:func:`pairwise_distances`); memory is a few such blocks.
    Keep ``batch=10000`` to reproduce ADM's float16/float32 choice exactly.
    """
    real = _as_2d_features(real_feats, "real_feats")
    fake = _as_2d_features(fake_feats, "fake_feats")
    if real.shape[1] != fake.shape[1]:
        raise InvalidArgumentError(f"feature sizes differ: real {real.shape[1]}, fake {fake.shape[1]}")
    if batch < 1 or k < 1:
        raise InvalidArgumentError(f"k and batch must be positive, got k={k}, batch={batch}")
    device = torch.device(device) if device is not None else torch.device("cpu")
    real_t = torch.from_numpy(np.ascontiguousarray(real, dtype=np.float32)).to(device)
    fake_t = torch.from_numpy(np.ascontiguousarray(fake, dtype=np.float32)).to(device)
    with torch.inference_mode():
        radii_real = manifold_radii(real_t, k, batch)
        radii_fake = manifold_radii(fake_t, k, batch)
        real_in = torch.zeros(len(real_t), dtype=torch.bool, device=device)  # inside a fake ball
        fake_in = torch.zeros(len(fake_t), dtype=torch.bool, device=device)  # inside a real ball
        for r0 in range(0, len(real_t), batch):
            for f0 in range(0, len(fake_t), batch):
                d = pairwise_distances(real_t[r0 : r0 + batch], fake_t[f0 : f0 + batch])
                real_in[r0 : r0 + batch] |= (d <= radii_fake[None, f0 : f0 + batch]).any(1)
                fake_in[f0 : f0 + batch] |= (d <= radii_real[r0 : r0 + batch, None]).any(0)
    precision = fake_in.double().mean().item()
    recall = real_in.double().mean().item()
    return precision, recall
