"""ImageNet-style class folders: labels, ADM center crop, seeded flips, clear errors."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from ditq.data import ImageFolderDataset, center_crop_arr
from ditq.data.folder import flip_bit
from ditq.errors import DitqError


def _image(w, h, mode="RGB", seed=0):
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    return Image.fromarray(arr).convert(mode)


@pytest.fixture
def folder(tmp_path):
    root = tmp_path / "images"
    (root / "zebra").mkdir(parents=True)
    (root / "ant" / "nested").mkdir(parents=True)
    _image(20, 12).save(root / "ant" / "a.png")
    _image(9, 9, "L", seed=1).save(root / "ant" / "nested" / "b.jpg")
    _image(16, 30, "RGBA", seed=2).save(root / "zebra" / "c.png")
    _image(12, 12, "P", seed=3).save(root / "zebra" / "d.gif")
    (root / "zebra" / "notes.txt").write_text("not an image, not counted")
    (root / ".hidden").mkdir()
    return root


def test_labels_follow_sorted_class_names(folder):
    ds = ImageFolderDataset(folder, 8, random_flip=False)
    assert ds.classes == ["ant", "zebra"] and ds.class_to_idx == {"ant": 0, "zebra": 1}
    assert len(ds) == 4 and [label for _, label in ds.samples] == [0, 0, 1, 1]
    for i in range(len(ds)):  # every mode (RGB, L, RGBA, P) comes out as RGB in [-1, 1]
        x, label = ds[i]
        assert x.shape == (3, 8, 8) and x.dtype == torch.float32 and label == ds.samples[i][1]
        assert x.min() >= -1 and x.max() <= 1
    grey, _ = ImageFolderDataset(folder, 8, channels=1)[0]
    assert grey.shape == (1, 8, 8)


def test_center_crop_matches_adm_steps():
    im = _image(100, 60)
    # 60 >= 2*16: BOX-halve to 50x30; 30 < 32: BICUBIC to round(50*16/30)=27 x 16; crop x in [5, 21).
    expected = np.asarray(im.resize((50, 30), Image.BOX).resize((27, 16), Image.BICUBIC))[:, 5:21]
    out = center_crop_arr(im, 16)
    assert out.shape == (16, 16, 3) and np.array_equal(out, expected)
    assert center_crop_arr(_image(16, 16), 16).shape == (16, 16, 3)
    assert center_crop_arr(_image(5, 7), 16).shape == (16, 16, 3)  # upsampled


def test_pixels_are_the_cropped_image_scaled_to_unit_range(folder):
    ds = ImageFolderDataset(folder, 8, random_flip=False)
    x, _ = ds[0]
    with Image.open(ds.samples[0][0]) as im:
        arr = center_crop_arr(im.convert("RGB"), 8)
    torch.testing.assert_close(x, torch.from_numpy(arr.astype(np.float32) / 127.5 - 1).permute(2, 0, 1))


def test_flips_are_seeded_per_key_and_epoch(folder):
    plain = ImageFolderDataset(folder, 8, random_flip=False)
    flipping = ImageFolderDataset(folder, 8, random_flip=True, seed=3)
    n, flips = len(plain), []
    for key in range(8 * n):  # eight epochs
        x, _ = flipping[key]
        ref, _ = plain[key % n]
        flipped = torch.equal(x, ref.flip(-1))
        assert flipped or torch.equal(x, ref)
        assert flipped == flip_bit(3, key)
        flips.append(flipped)
    assert 0.2 < sum(flips) / len(flips) < 0.8
    again = ImageFolderDataset(folder, 8, random_flip=True, seed=3)
    assert all(torch.equal(again[k][0], flipping[k][0]) for k in range(n))
    assert [flip_bit(4, k) for k in range(64)] != [flip_bit(3, k) for k in range(64)]


def test_unreadable_files_are_skipped_with_one_warning(folder):
    (folder / "ant" / "broken.png").write_bytes(b"not a png at all")
    (folder / "zebra" / "empty.jpg").write_bytes(b"")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds = ImageFolderDataset(folder, 8)
    assert len(ds) == 4 and ds.num_skipped == 2
    assert len(caught) == 1
    message = str(caught[0].message)
    assert "skipped 2 unreadable of 6" in message and "\n" not in message


def test_missing_and_empty_folders_are_clear_errors(tmp_path):
    with pytest.raises(DitqError, match="image folder not found"):
        ImageFolderDataset(tmp_path / "nope", 8)
    with pytest.raises(DitqError, match="no class subfolders"):
        ImageFolderDataset(tmp_path, 8)
    (tmp_path / "cls").mkdir()
    (tmp_path / "cls" / "readme.txt").write_text("hi")
    with pytest.raises(DitqError, match="no images found"):
        ImageFolderDataset(tmp_path, 8)
    (tmp_path / "cls" / "bad.png").write_bytes(b"garbage")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(DitqError, match="none of the 1 image files"):
            ImageFolderDataset(tmp_path, 8)


def test_unchecked_unreadable_file_fails_when_loaded(tmp_path):
    (tmp_path / "cls").mkdir()
    (tmp_path / "cls" / "bad.png").write_bytes(b"garbage")
    ds = ImageFolderDataset(tmp_path, 8, check_files=False)
    with pytest.raises(DitqError, match="cannot read image .*bad.png"):
        ds[0]
