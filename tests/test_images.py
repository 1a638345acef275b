"""uint8 conversion, ADM npz batches and labelled grids."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from ditq.errors import InvalidArgumentError
from ditq.images import make_grid, output_format, save_grid, save_npz, to_uint8


def test_to_uint8_follows_dits_rule():
    x = torch.tensor([-2.0, -1.0, -0.5, 0.0, 0.3, 0.999, 1.0, 3.0]).view(1, 1, 1, 8)
    expected = torch.clamp(127.5 * x + 128.0, 0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    out = to_uint8(x)
    assert out.dtype == np.uint8 and out.shape == (1, 1, 8, 1)
    np.testing.assert_array_equal(out, expected)
    assert out[0, 0, :, 0].tolist() == [0, 0, 64, 128, 166, 255, 255, 255]


def test_to_uint8_is_nhwc():
    x = torch.zeros(2, 3, 4, 5)
    x[:, 0] = 1.0
    out = to_uint8(x)
    assert out.shape == (2, 4, 5, 3)
    assert (out[..., 0] == 255).all() and (out[..., 1] == 128).all()


def test_output_format():
    assert output_format("a/b.npz") == "npz"
    assert output_format("grid.PNG") == "grid"
    with pytest.raises(InvalidArgumentError, match=r"\.npz"):
        output_format("samples.txt")
    with pytest.raises(InvalidArgumentError):
        output_format("samples")


def test_save_npz_writes_adm_keys_atomically(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (4, 8, 8, 3), dtype=np.uint8)
    path = save_npz(tmp_path / "sub" / "samples.npz", images, [0, 1, 2, 3])
    assert path == tmp_path / "sub" / "samples.npz"
    with np.load(path) as data:
        assert sorted(data.files) == ["arr_0", "arr_1"]
        np.testing.assert_array_equal(data["arr_0"], images)
        assert data["arr_1"].dtype == np.int64 and data["arr_1"].tolist() == [0, 1, 2, 3]
    assert [p.name for p in path.parent.iterdir()] == ["samples.npz"]  # no temporary left behind


def test_save_npz_grayscale_becomes_rgb(tmp_path):
    gray = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3, 1)
    with np.load(save_npz(tmp_path / "g.npz", gray)) as data:
        assert data.files == ["arr_0"]
        assert data["arr_0"].shape == (2, 3, 3, 3)
        np.testing.assert_array_equal(data["arr_0"][..., 2], gray[..., 0])


def test_save_npz_checks_inputs(tmp_path):
    with pytest.raises(InvalidArgumentError, match="uint8"):
        save_npz(tmp_path / "x.npz", np.zeros((1, 2, 2, 3), dtype=np.float32))
    with pytest.raises(InvalidArgumentError, match="one label per image"):
        save_npz(tmp_path / "x.npz", np.zeros((2, 2, 2, 3), dtype=np.uint8), [1])
    assert not (tmp_path / "x.npz").exists()


def test_grid_layout_without_labels():
    images = np.full((5, 4, 6, 3), 10, dtype=np.uint8)
    grid = make_grid(images, nrow=3, padding=1)
    assert grid.mode == "RGB"
    assert grid.size == (1 + 3 * (6 + 1), 1 + 2 * (4 + 1))
    assert grid.getpixel((1, 1)) == (10, 10, 10)


def test_grid_with_captions(tmp_path):
    images = np.zeros((4, 8, 8, 1), dtype=np.uint8)
    path = save_grid(
        tmp_path / "grid.png", images, [0, 1, 2, 3], ["T-shirt/top", "Trouser", "Bag", "Ankle boot"], nrow=2
    )
    with Image.open(path) as im:
        assert im.format == "PNG" and im.mode == "L"
        # Captioned tiles are enlarged to 64 px, with room for a caption under each.
        assert im.size[0] == 2 + 2 * (64 + 2)
        assert im.size[1] > 2 + 2 * (64 + 2)


def test_save_grid_rejects_other_suffixes(tmp_path):
    with pytest.raises(InvalidArgumentError, match=r"\.png"):
        save_grid(tmp_path / "grid.npz", np.zeros((1, 2, 2, 3), dtype=np.uint8))


def test_describe_npz_reads_headers_only(tmp_path):
    from ditq.images import describe_npz

    path = save_npz(tmp_path / "s.npz", np.zeros((3, 4, 4, 1), np.uint8), [1, 2, 3])
    d = describe_npz(path)
    assert d["format"] == "ADM sample batch"
    assert d["arrays"]["arr_0"] == {"shape": [3, 4, 4, 3], "dtype": "uint8"}
    assert d["arrays"]["arr_1"]["shape"] == [3]
    (tmp_path / "bad.npz").write_bytes(b"junk")
    with pytest.raises(InvalidArgumentError, match="not a readable .npz"):
        describe_npz(tmp_path / "bad.npz")
