"""FID-FMNIST (ditq.eval.fmnist): the classifier, its training, the metric, the shipped file, bad input."""

from __future__ import annotations

import gzip
import struct
from dataclasses import replace

import numpy as np
import pytest
import torch

from ditq import checkpoint as ckpt
from ditq.errors import CheckpointError, InvalidArgumentError
from ditq.eval import metrics as M
from ditq.eval.features import extract_features
from ditq.eval.fmnist import (
    FEATURE_KEY,
    FMNISTClassifier,
    FMNISTClassifierConfig,
    FMNISTEvaluator,
    FMNISTTrainConfig,
    build_fmnist_evaluator,
    check_images,
    classifier_accuracy,
    default_evaluator_path,
    evaluate_fmnist,
    load_fmnist_evaluator,
    to_model_input,
    train_fmnist_classifier,
)

TINY = FMNISTClassifierConfig(widths=(8, 16))
FAST = FMNISTTrainConfig(epochs=3, batch_size=32, lr=1e-2, max_shift=0)


def textures(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """uint8 (n, 28, 28) images of 10 separable classes (a periodic 4x4 texture each, shifted, noisy)."""
    tiles = np.random.default_rng(1234).integers(0, 2, (10, 4, 4)) * 200
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 10
    images = np.tile(tiles[labels], (1, 7, 7))
    shifts = rng.integers(0, 4, (n, 2))
    images = np.stack([np.roll(im, tuple(s), axis=(0, 1)) for im, s in zip(images, shifts, strict=True)])
    return np.clip(images + rng.integers(0, 50, images.shape), 0, 255).astype(np.uint8), labels


def tiny_evaluator(images: np.ndarray, seed: int = 0) -> FMNISTEvaluator:
    """An untrained tiny classifier whose reference statistics are those of ``images``."""
    torch.manual_seed(seed)
    model = FMNISTClassifier(TINY).eval()
    ev = FMNISTEvaluator(model, np.zeros(16), np.eye(16))
    ev.mu, ev.sigma = M.feature_statistics(ev.extract(images)[FEATURE_KEY])
    return ev


def _one_line(e: pytest.ExceptionInfo) -> str:
    message = str(e.value)
    assert "\n" not in message
    return message


#################################################################################
#                                 The classifier                                #
#################################################################################


def test_classifier_shapes_and_size():
    model = FMNISTClassifier().eval()
    x = torch.randn(3, 1, 32, 32)
    assert model(x).shape == (3, 10)
    assert model.features(x).shape == (3, 128)
    assert model.config.feature_dim == 128
    assert 100_000 < sum(p.numel() for p in model.parameters()) < 300_000  # float16: < 1 MB


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


#################################################################################
#                              Images and labels in                             #
#################################################################################


def test_check_images_pads_28_like_the_training_data_and_takes_gray_layouts():
    images, _ = textures(4, 0)
    padded = check_images(images)
    assert padded.shape == (4, 32, 32, 1) and padded.dtype == np.uint8
    assert (padded[:, 2:30, 2:30, 0] == images).all()
    assert (padded[:, :2] == 0).all() and (padded[:, :, 30:] == 0).all()
    assert (check_images(images[..., None]) == padded).all()
    rgb = np.repeat(padded, 3, axis=-1)  # how .npz sample batches store grayscale
    assert (check_images(rgb) == padded).all()
    assert (check_images(torch.from_numpy(padded)) == padded).all()
    x = to_model_input(padded)
    assert x.shape == (4, 1, 32, 32) and x.min() == -1.0 and x.max() <= 1.0


def test_preprocessing_equals_load_idx_dataset(tmp_path):
    from ditq.data import load_idx_dataset

    images, labels = textures(6, 3)
    for prefix in ("train", "t10k"):
        with gzip.open(tmp_path / f"{prefix}-images-idx3-ubyte.gz", "wb") as f:
            f.write(struct.pack(">BBBBIII", 0, 0, 8, 3, 6, 28, 28) + images.tobytes())
        with gzip.open(tmp_path / f"{prefix}-labels-idx1-ubyte.gz", "wb") as f:
            f.write(struct.pack(">BBBBI", 0, 0, 8, 1, 6) + labels.astype(np.uint8).tobytes())
    x, _ = load_idx_dataset(tmp_path, "test")
    torch.testing.assert_close(to_model_input(check_images(images)), x, rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    "images, match",
    [
        (np.zeros((2, 32, 32, 1), np.float32), "uint8"),
        (np.zeros((2, 32, 32, 2), np.uint8), "grayscale"),
        (np.zeros((2, 16, 16, 1), np.uint8), "16x16"),
        (np.zeros((2, 32, 28, 1), np.uint8), "grayscale"),
        (np.zeros((32, 32), np.uint8), "grayscale"),
        (np.zeros((0, 32, 32, 1), np.uint8), "no images"),
        (np.stack([np.zeros((2, 32, 32)), np.ones((2, 32, 32)), np.zeros((2, 32, 32))], -1).astype(np.uint8),
         "colour"),
    ],
)  # fmt: skip
def test_bad_images_are_one_line_errors(images, match):
    with pytest.raises(InvalidArgumentError, match=match) as e:
        check_images(images)
    _one_line(e)


def test_bad_labels_are_one_line_errors():
    images, _ = textures(4, 0)
    ev = tiny_evaluator(images)
    for labels, match in (
        (np.zeros(3, np.int64), "one integer per image"),
        (np.zeros(4, np.float32), "one integer per image"),
        (np.array([0, 1, 2, 10]), "out of range"),
        (np.array([0, -1, 2, 3]), "out of range"),
    ):
        with pytest.raises(InvalidArgumentError, match=match) as e:
            ev.evaluate(images, labels)
        _one_line(e)
    with pytest.raises(InvalidArgumentError, match="at least 2") as e:
        ev.evaluate(images[:1])


#################################################################################
#                                   Training                                    #
#################################################################################


def test_training_learns_separable_classes_and_is_deterministic():
    x, y = textures(320, 0)
    xt, yt = textures(200, 1)
    untrained = FMNISTClassifier(TINY).eval()
    model = train_fmnist_classifier(x, y, FAST, model_config=TINY)
    assert not model.training
    acc, per_class = classifier_accuracy(model, xt, yt)
    assert acc > 0.4 > classifier_accuracy(untrained, xt, yt)[0]  # chance is 0.1; 30 steps
    assert len(per_class) == 10
    again = train_fmnist_classifier(x, y, FAST, model_config=TINY)
    for (k, a), b in zip(model.state_dict().items(), again.state_dict().values(), strict=True):
        assert torch.equal(a, b), k
    other = train_fmnist_classifier(x, y, replace(FAST, seed=1), model_config=TINY)
    assert not torch.equal(other.head.weight, model.head.weight)


def test_random_shift_keeps_shape_and_fills_black():
    from ditq.eval.fmnist import _random_shift

    x = torch.ones(5, 1, 32, 32)
    out = _random_shift(x, 2, torch.Generator().manual_seed(0))
    assert out.shape == x.shape and set(out.unique().tolist()) <= {-1.0, 1.0}
    assert (out == -1).any()  # some image moved, bringing in the black border
    assert torch.equal(_random_shift(x, 0, torch.Generator()), x)


def test_bad_training_settings_are_one_line_errors():
    for kwargs in ({"epochs": 0}, {"batch_size": 0}, {"lr": 0.0}, {"max_shift": -1}):
        with pytest.raises(InvalidArgumentError) as e:
            FMNISTTrainConfig(**kwargs)
        _one_line(e)


#################################################################################
#                                  The metric                                   #
#################################################################################


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


#################################################################################
#                         Making, loading the evaluator file                     #
#################################################################################


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    path = tmp_path_factory.mktemp("clf") / "clf.safetensors"
    x, y = textures(320, 0)
    xt, yt = textures(150, 1)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # module-scoped: set up before the autouse single-thread fixture
    try:
        result = build_fmnist_evaluator(
            x, y, xt, yt, path, config=FAST, model_config=TINY, floor_images=250, command="test"
        )
    finally:
        torch.set_num_threads(threads)
    return result, (xt, yt)


def test_build_writes_a_file_whose_reference_is_the_test_set(built):
    result, (xt, yt) = built
    ev = load_fmnist_evaluator(result.path)
    assert ev.classifier.config == TINY and ev.path == result.path
    # the stored statistics are the test set's, made with the stored (float16) weights
    scores = evaluate_fmnist(xt, yt, evaluator=ev)
    assert abs(scores["fid_fmnist"]) < 1e-6
    assert scores["class_acc"] == pytest.approx(result.test_accuracy) and result.test_accuracy > 0.4
    assert scores["num_images"] == 150
    meta = ev.metadata
    assert meta["kind"] == "fid-fmnist" and meta["command"] == "test"
    assert meta["test_accuracy"] == result.test_accuracy
    assert meta["floor_fid_fmnist"] == result.floor_fid_fmnist == scores["floor_fid_fmnist"] > 0
    assert meta["floor_num_images"] == 250 == result.floor_num_images
    assert list(meta["floor_fid_fmnist_by_n"]) == ["100", "200", "250"]
    assert meta["train_config"]["epochs"] == FAST.epochs
    assert scores["floor_fid_fmnist_at_n"]["num_images"] == 200  # nearest tabulated count to 150
    info, _ = ckpt.read_safetensors_header(result.path)
    assert info["reference.sigma"]["dtype"] == "F64" and info["classifier.head.weight"]["dtype"] == "F16"


def test_evaluate_fmnist_takes_a_path(built):
    result, (xt, yt) = built
    scores = evaluate_fmnist(xt[:50], yt[:50], evaluator=result.path)
    assert scores["fid_fmnist"] > 0 and 0 <= scores["class_acc"] <= 1


def test_loading_bad_files_are_one_line_errors(tmp_path, built):
    with pytest.raises(CheckpointError, match="not found") as e:
        load_fmnist_evaluator(tmp_path / "nope.safetensors")
    _one_line(e)
    ckpt.save_checkpoint(tmp_path / "other.safetensors", {"w": torch.zeros(2)}, {"model_config": {}})
    with pytest.raises(CheckpointError, match="not an FID-FMNIST classifier") as e:
        load_fmnist_evaluator(tmp_path / "other.safetensors")
    _one_line(e)
    result, _ = built
    tensors = ckpt.load_tensors(result.path)
    del tensors["classifier.head.bias"]
    ckpt.save_checkpoint(tmp_path / "cut.safetensors", tensors, ckpt.read_metadata(result.path))
    with pytest.raises(CheckpointError, match="do not fit") as e:
        load_fmnist_evaluator(tmp_path / "cut.safetensors")
    _one_line(e)


#################################################################################
#                                The shipped file                               #
#################################################################################


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
