"""FID-FMNIST (ditq.eval.fmnist.evaluator): the feature extractor, the metric, loading files, the
shipped file."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from fmnist_helpers import one_line, textures, tiny_evaluator

from ditq import checkpoint as ckpt
from ditq.errors import CheckpointError
from ditq.eval import metrics as M
from ditq.eval.features import extract_features
from ditq.eval.fmnist import (
    FEATURE_KEY,
    check_images,
    default_evaluator_path,
    evaluate_fmnist,
    load_fmnist_evaluator,
)


def test_feature_extractor_keys_and_consistency():
    images, _ = textures(7, 0)
    ev = tiny_evaluator(images)
    out = ev(check_images(images))
    assert set(out) == {"features", "logits", "probs"}
    assert out["features"].shape == (7, 16) and out["logits"].shape == (7, 10)
    torch.testing.assert_close(out["probs"].sum(1), torch.ones(7))
    # usable by the generic batched extractor, in any batch size, same numbers
    feats = extract_features([images[:3], images[3:]], ev, ["features", "logits"], progress=False)
    np.testing.assert_allclose(feats["features"], out["features"].numpy(), rtol=1e-5, atol=1e-6)


def test_fid_of_a_set_against_its_own_statistics_is_zero_and_grows_with_distortion():
    images, labels = textures(60, 0)
    ev = tiny_evaluator(images)
    scale = np.trace(ev.sigma)  # an untrained network's features are small: compare relative to them
    assert abs(ev.evaluate(images)["fid_fmnist"]) < 1e-9 * scale
    rng = np.random.default_rng(0)
    fids = []
    for noise in (10, 40, 120):
        noisy = np.clip(images + rng.normal(0, noise, images.shape), 0, 255).astype(np.uint8)
        fids.append(ev.evaluate(noisy)["fid_fmnist"])
    assert 1e-5 * scale < fids[0] < fids[1] < fids[2]
    # the same number as the generic path: features, statistics, Fréchet distance
    feats = ev.extract(noisy)[FEATURE_KEY]
    assert fids[2] == pytest.approx(M.frechet_distance(*M.feature_statistics(feats), ev.mu, ev.sigma))


def test_class_accuracy_counts_the_predictions_that_match():
    images, _ = textures(40, 0)
    ev = tiny_evaluator(images)
    preds = ev.extract(images)["logits"].argmax(1)
    wrong = (preds + 1) % 10
    labels = np.where(np.arange(40) < 10, wrong, preds)  # the first 10 mislabelled
    result = ev.evaluate(images, labels)
    assert result["class_acc"] == pytest.approx(0.75)
    assert ev.evaluate(images, preds)["class_acc"] == 1.0
    assert ev.evaluate(images, wrong)["class_acc"] == 0.0
    per_class = result["class_acc_per_class"]
    for c in range(10):
        mask = labels == c
        expected = None if not mask.any() else float((preds[mask] == c).mean())
        assert per_class[c] == (pytest.approx(expected) if expected is not None else None)
    assert "class_acc" not in ev.evaluate(images)


def test_evaluate_fmnist_takes_a_path(built):
    result, (xt, yt) = built
    scores = evaluate_fmnist(xt[:50], yt[:50], evaluator=result.path)
    assert scores["fid_fmnist"] > 0 and 0 <= scores["class_acc"] <= 1


def test_loading_bad_files_are_one_line_errors(tmp_path, built):
    with pytest.raises(CheckpointError, match="not found") as e:
        load_fmnist_evaluator(tmp_path / "nope.safetensors")
    one_line(e)
    ckpt.save_checkpoint(tmp_path / "other.safetensors", {"w": torch.zeros(2)}, {"model_config": {}})
    with pytest.raises(CheckpointError, match="not an FID-FMNIST classifier") as e:
        load_fmnist_evaluator(tmp_path / "other.safetensors")
    one_line(e)
    result, _ = built
    tensors = ckpt.load_tensors(result.path)
    del tensors["classifier.head.bias"]
    ckpt.save_checkpoint(tmp_path / "cut.safetensors", tensors, ckpt.read_metadata(result.path))
    with pytest.raises(CheckpointError, match="do not fit") as e:
        load_fmnist_evaluator(tmp_path / "cut.safetensors")
    one_line(e)


def test_the_shipped_classifier_loads_with_its_documented_keys():
    path = default_evaluator_path()
    if path is None:
        pytest.skip("no ditq/assets/fmnist-classifier.safetensors in this install")
    assert path.stat().st_size < 1_000_000
    ev = load_fmnist_evaluator()
    meta = ev.metadata
    for key in ("test_accuracy", "floor_fid_fmnist", "floor_num_images", "floor_fid_fmnist_by_n",
                "train_config", "command", "model_config"):  # fmt: skip
        assert key in meta, key
    assert meta["test_accuracy"] >= 0.90
    assert meta["floor_num_images"] == 10000 and meta["command"].startswith("ditq train-evaluator")
    assert ev.mu.shape == (128,) and ev.sigma.shape == (128, 128)
    np.testing.assert_allclose(ev.sigma, ev.sigma.T)
    # floors fall as the count grows, and the 10,000-image one is the headline
    by_n = [meta["floor_fid_fmnist_by_n"][k] for k in sorted(meta["floor_fid_fmnist_by_n"], key=int)]
    assert all(a > b for a, b in zip(by_n, by_n[1:], strict=False))
    assert by_n[-1] == pytest.approx(meta["floor_fid_fmnist"])
    # a handful of made-up images: a large distance, and numbers of the right kinds
    images, labels = textures(20, 5)
    scores = ev.evaluate(images, labels)
    assert scores["fid_fmnist"] > meta["floor_fid_fmnist_by_n"]["100"] and 0 <= scores["class_acc"] <= 1
