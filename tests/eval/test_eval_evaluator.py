"""``evaluate`` (ditq.eval.evaluator) end to end with a tiny feature extractor (no Inception weights):
every metric from the features, statistics read or computed, metric names parsed."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from ditq.errors import InvalidArgumentError
from ditq.eval import evaluator as E
from ditq.eval import metrics as M
from ditq.eval.npz import write_reference
from ditq.images import save_npz

_PROJ = torch.Generator().manual_seed(0)
_W_POOL = torch.randn(48, 6, generator=_PROJ)
_W_PROBS = torch.randn(48, 5, generator=_PROJ)


def tiny_extractor(batch: np.ndarray) -> dict[str, torch.Tensor]:
    """Deterministic stand-in for the Inception: 4x4 mean-pooled pixels, projected."""
    x = torch.from_numpy(np.asarray(batch)).float().permute(0, 3, 1, 2) / 255
    x = torch.nn.functional.adaptive_avg_pool2d(x, 4).flatten(1)  # N, 48
    return {
        "pool": x @ _W_POOL,
        "spatial": x[:, :4],
        "logits": x @ _W_PROBS,
        "probs": torch.softmax(4 * x @ _W_PROBS, 1),
    }


def _images(n, seed, shift=0):
    rng = np.random.default_rng(seed)
    return np.clip(rng.integers(0, 200, size=(n, 8, 8, 3)) + shift, 0, 255).astype(np.uint8)


def _stats(images, key):
    return M.feature_statistics(tiny_extractor(images)[key].numpy())


@pytest.fixture
def files(tmp_path, monkeypatch):
    monkeypatch.setattr(E, "load_inception", lambda *a, **k: tiny_extractor)
    samples, ref_images = _images(40, seed=1), _images(30, seed=2, shift=20)
    save_npz(tmp_path / "samples.npz", samples, np.arange(40) % 10)
    mu, sigma = _stats(ref_images, "pool")
    mu_s, sigma_s = _stats(ref_images, "spatial")
    write_reference(tmp_path / "ref.npz", images=ref_images, mu=mu, sigma=sigma, mu_s=mu_s, sigma_s=sigma_s)
    write_reference(tmp_path / "ref_images_only.npz", images=ref_images)
    write_reference(tmp_path / "ref_stats_only.npz", mu=mu, sigma=sigma, mu_s=mu_s, sigma_s=sigma_s)
    return {"dir": tmp_path, "samples": samples, "ref_images": ref_images}


def test_evaluate_computes_every_metric_from_features(files):
    d = files["dir"]
    result = E.evaluate(d / "samples.npz", d / "ref.npz", batch_size=7, device="cpu", progress=False)
    assert list(result["metrics"]) == ["fid", "sfid", "is", "precision", "recall"]
    fs, fr = tiny_extractor(files["samples"]), tiny_extractor(files["ref_images"])
    expected = {
        "fid": M.frechet_distance(*_stats(files["samples"], "pool"), *_stats(files["ref_images"], "pool")),
        "sfid": M.frechet_distance(
            *_stats(files["samples"], "spatial"), *_stats(files["ref_images"], "spatial")
        ),
        "is": M.inception_score(fs["probs"].numpy()),
    }
    expected["precision"], expected["recall"] = M.precision_recall(fr["pool"].numpy(), fs["pool"].numpy())
    assert result["metrics"] == pytest.approx(expected, rel=1e-5)
    assert result["metrics"]["fid"] > 0.01 and 0 <= result["metrics"]["precision"] <= 1
    assert result["samples"]["num_images"] == 40 and result["reference"]["num_images"] == 30
    assert result["reference"]["statistics"] == {"fid": "read", "sfid": "read"}
    json.dumps(result)  # serializable as it is


def test_samples_against_their_own_reference_score_perfectly(files):
    d = files["dir"]
    mu, sigma = _stats(files["samples"], "pool")
    write_reference(d / "self.npz", images=files["samples"], mu=mu, sigma=sigma)
    result = E.evaluate(d / "samples.npz", d / "self.npz", metrics="fid,precision,recall", progress=False)
    assert abs(result["metrics"]["fid"]) < 1e-6
    assert result["metrics"]["precision"] == 1.0 and result["metrics"]["recall"] == 1.0


def test_reference_statistics_are_read_not_recomputed(files):
    d = files["dir"]
    # statistics that do not belong to the images: the FID must follow the statistics
    write_reference(d / "odd.npz", images=files["ref_images"], mu=np.zeros(6), sigma=np.eye(6))
    result = E.evaluate(d / "samples.npz", d / "odd.npz", metrics="fid", progress=False)
    expected = M.frechet_distance(*_stats(files["samples"], "pool"), np.zeros(6), np.eye(6))
    assert result["metrics"]["fid"] == pytest.approx(expected)


def test_missing_reference_statistics_need_the_flag(files):
    d = files["dir"]
    with pytest.raises(InvalidArgumentError, match="--compute-ref-stats") as e:
        E.evaluate(d / "samples.npz", d / "ref_images_only.npz", metrics="fid,sfid", progress=False)
    assert "\n" not in str(e.value)
    computed = E.evaluate(
        d / "samples.npz",
        d / "ref_images_only.npz",
        metrics="fid,sfid",
        compute_ref_stats=True,
        progress=False,
    )
    read = E.evaluate(d / "samples.npz", d / "ref.npz", metrics="fid,sfid", progress=False)
    assert computed["metrics"] == pytest.approx(read["metrics"], rel=1e-9)
    assert computed["reference"]["statistics"] == {"fid": "computed", "sfid": "computed"}


def test_precision_recall_need_reference_images(files):
    d = files["dir"]
    with pytest.raises(InvalidArgumentError, match="no images") as e:
        E.evaluate(d / "samples.npz", d / "ref_stats_only.npz", metrics="precision", progress=False)
    assert "\n" not in str(e.value)
    result = E.evaluate(d / "samples.npz", d / "ref_stats_only.npz", metrics="fid,sfid,is", progress=False)
    assert set(result["metrics"]) == {"fid", "sfid", "is"} and result["reference"]["num_images"] is None


def test_parse_metrics():
    assert E.parse_metrics("recall, FID") == ("fid", "recall")
    assert E.parse_metrics(None) == E.METRICS
    for bad in ("fid,kid", "", " , "):
        with pytest.raises(InvalidArgumentError):
            E.parse_metrics(bad)
