"""FID/sFID, Inception Score and Precision/Recall against independent computations."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ditq.errors import DitqError, InvalidArgumentError
from ditq.eval import metrics as M


def _random_gaussian(rng, n, d, scale=1.0, shift=0.0):
    a = rng.normal(size=(d, d)) * scale
    return rng.normal(size=(n, d)) @ a + shift


def _frechet_independent(mu1, s1, mu2, s2):
    # tr sqrt(S1 S2) = tr sqrt(S1^1/2 S2 S1^1/2), the latter symmetric PSD: eigh only.
    w, v = np.linalg.eigh(s1)
    root1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    inner = np.linalg.eigvalsh(root1 @ s2 @ root1)
    d = mu1 - mu2
    return d @ d + np.trace(s1) + np.trace(s2) - 2 * np.sqrt(np.clip(inner, 0, None)).sum()


#################################################################################
#                                      FID                                      #
#################################################################################


@pytest.mark.parametrize("d", [1, 5, 32])
def test_frechet_distance_matches_independent_float64(d):
    rng = np.random.default_rng(d)
    x, y = _random_gaussian(rng, 400, d), _random_gaussian(rng, 300, d, scale=1.3, shift=0.5)
    mu1, s1 = M.feature_statistics(x)
    mu2, s2 = M.feature_statistics(y)
    got = M.frechet_distance(mu1, s1, mu2, s2)
    assert isinstance(got, float)
    assert got == pytest.approx(_frechet_independent(mu1, s1, mu2, s2), rel=1e-9, abs=1e-9)


def test_frechet_distance_matches_scipy_sqrtm_when_installed():
    linalg = pytest.importorskip("scipy.linalg")
    rng = np.random.default_rng(7)
    mu1, s1 = M.feature_statistics(_random_gaussian(rng, 200, 24))
    mu2, s2 = M.feature_statistics(_random_gaussian(rng, 200, 24, shift=1.0))
    covmean = linalg.sqrtm(s1 @ s2).real  # ADM's formula
    expected = (mu1 - mu2) @ (mu1 - mu2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean)
    assert M.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-9)


def test_frechet_distance_closed_forms():
    # 1-d: (mu1-mu2)^2 + (sqrt(s1) - sqrt(s2))^2
    assert M.frechet_distance([0.0], [[4.0]], [1.0], [[1.0]]) == pytest.approx(2.0)
    # diagonal covariances: a sum of 1-d distances
    a, b = np.array([1.0, 4.0, 9.0]), np.array([4.0, 4.0, 1.0])
    expected = 3.0 + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    assert M.frechet_distance(np.zeros(3), np.diag(a), np.ones(3), np.diag(b)) == pytest.approx(expected)


def test_frechet_distance_of_identical_statistics_is_zero():
    rng = np.random.default_rng(0)
    mu, sigma = M.feature_statistics(_random_gaussian(rng, 500, 64))
    assert abs(M.frechet_distance(mu, sigma, mu, sigma)) < 1e-8 * np.trace(sigma)


def test_feature_statistics_are_float64_numpy_mean_and_cov():
    x = np.random.default_rng(1).normal(size=(50, 4)).astype(np.float32)
    mu, sigma = M.feature_statistics(x)
    assert mu.dtype == sigma.dtype == np.float64
    np.testing.assert_allclose(mu, x.astype(np.float64).mean(0))
    np.testing.assert_allclose(sigma, np.cov(x.astype(np.float64), rowvar=False))


def test_frechet_distance_retries_with_offset_when_not_finite(monkeypatch):
    calls = []
    real = M._sqrtm_product

    def flaky(a):
        calls.append(a.copy())
        if len(calls) == 1:
            return complex(np.nan), np.full(len(a), np.nan, dtype=np.complex128)
        return real(a)

    monkeypatch.setattr(M, "_sqrtm_product", flaky)
    s = np.diag([1.0, 2.0])
    with pytest.warns(RuntimeWarning, match="adding 1e-06 to diagonal"):
        got = M.frechet_distance(np.zeros(2), s, np.zeros(2), s)
    np.testing.assert_allclose(calls[1], (s + 1e-6 * np.eye(2)) @ (s + 1e-6 * np.eye(2)))
    # sqrt((s+eps)^2) = s + eps on the diagonal: the trace moves by -2 * 2 * eps
    assert got == pytest.approx(-4e-6, abs=1e-12)


def test_frechet_distance_large_imaginary_part_is_a_one_line_error():
    with pytest.raises(M.FrechetDistanceError) as e:
        M.frechet_distance(np.zeros(2), np.diag([-1.0, 1.0]), np.zeros(2), np.eye(2))
    assert isinstance(e.value, DitqError) and "\n" not in str(e.value)


@pytest.mark.parametrize(
    "args",
    [
        (np.zeros(3), np.eye(3), np.zeros(2), np.eye(2)),
        (np.zeros(3), np.eye(2), np.zeros(3), np.eye(3)),
        (np.zeros(2), np.eye(2) * np.nan, np.zeros(2), np.eye(2)),
    ],
)
def test_frechet_distance_bad_inputs_are_one_line_errors(args):
    with pytest.raises(InvalidArgumentError) as e:
        M.frechet_distance(*args)
    assert "\n" not in str(e.value)


#################################################################################
#                                Inception Score                                #
#################################################################################


def test_inception_score_of_identical_predictions_is_one():
    p = np.random.default_rng(0).dirichlet(np.ones(10), size=1).astype(np.float32)
    probs = np.repeat(p, 64, axis=0)
    assert M.inception_score(probs) == pytest.approx(1.0, abs=1e-5)


def test_inception_score_of_uniform_one_hot_is_the_class_count():
    classes = 7
    probs = np.eye(classes, dtype=np.float64)[np.arange(70) % classes]
    assert M.inception_score(probs) == pytest.approx(classes)


def test_inception_score_splits_in_file_order_and_counts_a_partial_last_split():
    # 7 one-hot rows, splits of 5: [c0..c4] -> IS 5, then [c0, c0] -> IS 1; mean 3.
    probs = np.eye(5)[[0, 1, 2, 3, 4, 0, 0]]
    assert M.inception_score(probs, split_size=5) == pytest.approx(3.0)
    # another order, other splits, another score: file order is part of the definition
    first = np.exp((3 * np.log(5 / 3) + 2 * np.log(5)) / 5)  # rows c0, c0, c0, c1, c2
    assert M.inception_score(probs[[0, 0, 0, 1, 2, 3, 4]], split_size=5) == pytest.approx((first + 2.0) / 2)
    # one split when split_size >= N
    assert M.inception_score(probs, split_size=5000) == pytest.approx(
        np.exp(np.mean([np.log(7 / 3)] * 3 + [np.log(7)] * 4)), rel=1e-12
    )


def test_inception_score_matches_adm_formula_on_soft_predictions():
    rng = np.random.default_rng(3)
    logits = rng.normal(size=(23, 11)).astype(np.float32) * 3
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    scores = []
    for i in range(0, 23, 10):  # ADM's loop, verbatim arithmetic
        part = probs[i : i + 10]
        kl = part * (np.log(part) - np.log(np.expand_dims(np.mean(part, 0), 0)))
        scores.append(np.exp(np.mean(np.sum(kl, 1))))
    assert M.inception_score(probs, split_size=10) == pytest.approx(float(np.mean(scores)), rel=1e-6)


def test_inception_score_bad_inputs_are_one_line_errors():
    for bad in (np.ones(5), -np.ones((3, 2)), np.ones((0, 4))):
        with pytest.raises(InvalidArgumentError) as e:
            M.inception_score(bad)
        assert "\n" not in str(e.value)


#################################################################################
#                              Precision and Recall                             #
#################################################################################


def _pr_independent(real, fake, k=3):
    # ADM's ManifoldEstimator written plainly: float16 features and ops,
    # matmul accumulated in float32, whole matrices, sort instead of partition.
    def dist(u, v):
        u16, v16 = u.astype(np.float16), v.astype(np.float16)
        nu = np.sum(np.square(u16).astype(np.float32), 1).astype(np.float16)[:, None]
        nv = np.sum(np.square(v16).astype(np.float32), 1).astype(np.float16)[None, :]
        mm = (u16.astype(np.float32) @ v16.astype(np.float32).T).astype(np.float16)
        d = np.maximum(nu - np.float16(2) * mm + nv, np.float16(0))
        assert np.isfinite(d).all()
        return d.astype(np.float32)

    r_real = np.sort(dist(real, real), axis=1)[:, k]
    r_fake = np.sort(dist(fake, fake), axis=1)[:, k]
    d = dist(real, fake)
    precision = np.mean(np.any(d <= r_real[:, None], axis=0))
    recall = np.mean(np.any(d <= r_fake[None, :], axis=1))
    return precision, recall


def test_precision_recall_of_identical_sets_is_one():
    x = np.random.default_rng(0).normal(size=(40, 16)).astype(np.float32)
    assert M.precision_recall(x, x.copy()) == (1.0, 1.0)


def test_precision_recall_fall_as_the_sets_separate():
    rng = np.random.default_rng(1)
    real = rng.normal(size=(60, 8)).astype(np.float32)
    fake = rng.normal(size=(50, 8)).astype(np.float32)
    results = [M.precision_recall(real, fake + shift) for shift in (0.0, 1.0, 2.0, 50.0)]
    precisions, recalls = zip(*results, strict=True)
    assert precisions[0] > 0.5 and recalls[0] > 0.5
    assert list(precisions) == sorted(precisions, reverse=True) and precisions[0] > precisions[2]
    assert list(recalls) == sorted(recalls, reverse=True) and recalls[0] > recalls[2]
    assert results[-1] == (0.0, 0.0)


def test_precision_recall_match_independent_adm_computation_in_any_block_size():
    rng = np.random.default_rng(2)
    real = rng.normal(size=(37, 12)).astype(np.float32)
    fake = (rng.normal(size=(29, 12)) * 1.2 + 0.3).astype(np.float32)
    expected = _pr_independent(real, fake)
    assert 0 < expected[0] < 1 and 0 < expected[1] < 1
    assert M.precision_recall(real, fake) == pytest.approx(expected)
    assert M.precision_recall(real, fake, batch=7) == pytest.approx(expected)


def test_radius_is_kth_neighbour_counting_the_point_itself():
    x = torch.tensor([[0.0], [1.0], [3.0], [6.0], [10.0]])
    # squared distances from 0: 0, 1, 9, 36, 100 -> index 3 is 36
    radii = M.manifold_radii(x, k=3, batch=2)
    assert radii[0].item() == 36.0
    assert radii[2].item() == 9.0  # from 3: 9, 4, 0, 9, 49 -> sorted 0, 4, 9, 9, 49
    assert radii[4].item() == 81.0  # from 10: sorted 0, 16, 49, 81, 100


def test_distances_fall_back_to_float32_when_float16_overflows():
    u = torch.full((3, 4), 300.0)  # squared norm 360000 > 65504: inf in float16
    v = torch.zeros(2, 4)
    d = M.pairwise_distances(u, v)
    assert torch.isfinite(d).all() and torch.allclose(d, torch.full((3, 2), 360000.0))


def test_distances_are_squared_and_float16_rounded():
    u, v = torch.tensor([[0.0, 0.0]]), torch.tensor([[3.0, 4.0], [0.1, 0.0]])
    d = M.pairwise_distances(u, v)
    assert d[0, 0].item() == 25.0
    assert d[0, 1].item() == float(np.float16(np.float16(0.1) ** 2))  # 0.1 is not a float16


def test_precision_recall_bad_inputs_are_one_line_errors():
    x = np.zeros((10, 4), np.float32)
    for real, fake in ((x, np.zeros((10, 3), np.float32)), (x[:3], x), (x, np.zeros(4))):
        with pytest.raises(InvalidArgumentError) as e:
            M.precision_recall(real, fake)
        assert "\n" not in str(e.value)
