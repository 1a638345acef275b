"""``ditq extract-latents`` (ditq.cli.extract): shards and a manifest from an image folder, resumed
by running the command again; other settings in the same folder are refused."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from ditq.cli.main import main
from ditq.data import ImageFolderDataset, LatentDataset, read_manifest


@pytest.fixture
def folder(tmp_path):
    root = tmp_path / "images"
    rng = np.random.default_rng(0)
    for name, count in (("cat", 3), ("dog", 2)):
        (root / name).mkdir(parents=True)
        for i in range(count):
            Image.fromarray(rng.integers(0, 256, (40, 36, 3), dtype=np.uint8)).save(root / name / f"{i}.png")
    return root


def test_cli_extract_latents_resumes(folder, tmp_path, capsys):
    out = tmp_path / "latents"
    argv = ["extract-latents", "--data", str(folder), "--vae", "pixel", "--out", str(out)]
    argv += ["--image-size", "8", "--shard-size", "3", "--dtype", "float32", "--seed", "1"]
    assert main(argv) == 0
    assert "wrote 2 shard(s), kept 0" in capsys.readouterr().out
    m = read_manifest(out)
    assert m["vae"] == "pixel" and m["latent_shape"] == [3, 8, 8] and not m["flip"]
    x, _ = ImageFolderDataset(folder, 8, random_flip=False)[4]
    assert torch.equal(LatentDataset(out)[4][0], x)  # pixel space: the latents are the images
    assert main(argv) == 0
    assert "wrote 0 shard(s), kept 2" in capsys.readouterr().out
    assert main([*argv[:-2], "--seed", "2", "--quiet"]) == 2
    assert "other settings (seed 1 -> 2)" in capsys.readouterr().err
