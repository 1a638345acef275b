"""ADM sample and reference batches: round trips, streaming, and one-line errors on bad files."""

from __future__ import annotations

import numpy as np
import pytest

from ditq.errors import InvalidArgumentError
from ditq.eval import npz
from ditq.images import save_npz


def _images(n, h=6, w=5, seed=0):
    return np.random.default_rng(seed).integers(0, 256, size=(n, h, w, 3), dtype=np.uint8)


def _one_line_error(fn, *args, match=None, **kwargs):
    with pytest.raises(InvalidArgumentError, match=match) as e:
        fn(*args, **kwargs)
    assert "\n" not in str(e.value)
    return str(e.value)


def test_sample_batch_round_trip_with_and_without_labels(tmp_path):
    images, labels = _images(7), np.arange(7) % 3
    save_npz(tmp_path / "a.npz", images, labels)
    got_images, got_labels = npz.read_samples(tmp_path / "a.npz")
    np.testing.assert_array_equal(got_images, images)
    assert got_labels.dtype == np.int64 and got_labels.tolist() == labels.tolist()
    save_npz(tmp_path / "b.npz", images)
    got_images, got_labels = npz.read_samples(tmp_path / "b.npz")
    np.testing.assert_array_equal(got_images, images)
    assert got_labels is None


def test_images_stream_in_file_order_with_a_short_last_batch(tmp_path):
    images = _images(10)
    save_npz(tmp_path / "s.npz", images)
    arr = npz.open_images(tmp_path / "s.npz")
    assert len(arr) == 10 and arr.shape == (10, 6, 5, 3)
    batches = list(arr.batches(4))
    assert [len(b) for b in batches] == [4, 4, 2]
    np.testing.assert_array_equal(np.concatenate(batches), images)


def test_compressed_and_fortran_arrays_read_too(tmp_path):
    images = _images(5)
    np.savez_compressed(tmp_path / "c.npz", arr_0=images)
    np.testing.assert_array_equal(npz.read_samples(tmp_path / "c.npz")[0], images)
    np.savez(tmp_path / "f.npz", arr_0=np.asfortranarray(images))
    np.testing.assert_array_equal(
        np.concatenate(list(npz.open_images(tmp_path / "f.npz").batches(2))), images
    )


def test_bad_sample_files_are_one_line_errors(tmp_path):
    _one_line_error(npz.read_samples, tmp_path / "missing.npz", match="no such file")
    (tmp_path / "text.npz").write_text("hello")
    _one_line_error(npz.read_samples, tmp_path / "text.npz", match="not an .npz")
    np.savez(tmp_path / "gray.npz", arr_0=np.zeros((2, 4, 4, 1), np.uint8))
    _one_line_error(npz.read_samples, tmp_path / "gray.npz", match="grayscale")
    np.savez(tmp_path / "float.npz", arr_0=np.zeros((2, 4, 4, 3), np.float32))
    _one_line_error(npz.read_samples, tmp_path / "float.npz", match="uint8")
    np.savez(tmp_path / "nchw.npz", arr_0=np.zeros((2, 3, 4, 4), np.uint8))
    _one_line_error(npz.read_samples, tmp_path / "nchw.npz", match="3 channels")
    np.savez(tmp_path / "other.npz", images=_images(2))
    assert "it has: images" in _one_line_error(npz.read_samples, tmp_path / "other.npz")
    np.savez(tmp_path / "labels.npz", arr_0=_images(3), arr_1=np.arange(2))
    _one_line_error(npz.read_samples, tmp_path / "labels.npz", match="one integer label per image")


def test_truncated_sample_file_is_a_one_line_error(tmp_path):
    save_npz(tmp_path / "t.npz", _images(20))
    data = (tmp_path / "t.npz").read_bytes()
    (tmp_path / "t.npz").write_bytes(data[: len(data) // 2])
    assert "t.npz" in _one_line_error(npz.read_samples, tmp_path / "t.npz")


def test_reference_round_trip_images_and_statistics(tmp_path):
    rng = np.random.default_rng(0)
    images = _images(6)
    mu, sigma = rng.normal(size=4), np.eye(4)
    mu_s, sigma_s = rng.normal(size=3).astype(np.float32), np.eye(3, dtype=np.float32)
    npz.write_reference(tmp_path / "ref.npz", images=images, mu=mu, sigma=sigma, mu_s=mu_s, sigma_s=sigma_s)
    ref = npz.read_reference(tmp_path / "ref.npz")
    assert ref.has_pool_stats and ref.has_spatial_stats
    np.testing.assert_array_equal(ref.images.read(), images)
    np.testing.assert_array_equal(ref.stats["mu"], mu)
    assert ref.stats["sigma_s"].dtype == np.float64
    # the ADM evaluator's reader: plain np.load of the same keys
    with np.load(tmp_path / "ref.npz") as data:
        assert set(data.files) == {"arr_0", "mu", "sigma", "mu_s", "sigma_s"}


def test_reference_with_statistics_only_or_images_only(tmp_path):
    npz.write_reference(tmp_path / "stats.npz", mu=np.zeros(2), sigma=np.eye(2))
    ref = npz.read_reference(tmp_path / "stats.npz")
    assert ref.images is None and ref.has_pool_stats and not ref.has_spatial_stats
    npz.write_reference(tmp_path / "imgs.npz", images=_images(3))
    ref = npz.read_reference(tmp_path / "imgs.npz")
    assert len(ref.images) == 3 and ref.stats == {}


def test_bad_references_are_one_line_errors(tmp_path):
    np.savez(tmp_path / "half.npz", arr_0=_images(2), mu=np.zeros(2))
    _one_line_error(npz.read_reference, tmp_path / "half.npz", match="'mu' but no 'sigma'")
    np.savez(tmp_path / "shape.npz", mu=np.zeros(2), sigma=np.eye(3))
    _one_line_error(npz.read_reference, tmp_path / "shape.npz", match="covariance")
    np.savez(tmp_path / "empty.npz", something=np.zeros(2))
    _one_line_error(npz.read_reference, tmp_path / "empty.npz", match="neither images")
    _one_line_error(npz.write_reference, tmp_path / "x.npz", mu=np.zeros(2))
    _one_line_error(npz.write_reference, tmp_path / "x.npz")
    _one_line_error(npz.write_reference, tmp_path / "x.npz", images=np.zeros((2, 4, 4, 3), np.float32))
    assert not (tmp_path / "x.npz").exists()


def test_array_shorter_than_its_header_is_a_one_line_error(tmp_path):
    import io
    import zipfile

    buf = io.BytesIO()
    np.lib.format.write_array(buf, np.zeros((10, 4, 4, 3), np.uint8))
    with zipfile.ZipFile(tmp_path / "short.npz", "w") as zf:
        zf.writestr("arr_0.npy", buf.getvalue()[:-100])
    assert "truncated (at image 7 of 10)" in _one_line_error(npz.read_samples, tmp_path / "short.npz")
