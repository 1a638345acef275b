"""Latent pre-extraction: sharded safetensors + manifest, resumable; LatentDataset; training on latents."""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from ditq.cli.main import main
from ditq.data import ImageFolderDataset, LatentDataset, extract_latents, read_manifest
from ditq.data.folder import flip_bit
from ditq.errors import DitqError


class FakeVAE:
    """A tiny stand-in for the SD VAE: 8x average pooling, 3 -> 4 channels, optional posterior noise."""

    latent_channels = 4
    downsample = 8
    scale = 0.5

    def __init__(self):
        self.mix = torch.linspace(-1, 1, 12).view(4, 3, 1, 1)
        self.calls = 0

    def encode(self, images, *, batch_size=None, generator=None, sample=True):
        self.calls += 1
        mean = F.conv2d(F.avg_pool2d(images.float(), 8), self.mix)
        if sample:
            mean = mean + 0.1 * torch.randn(mean.shape, generator=generator)
        return mean * self.scale


@pytest.fixture
def folder(tmp_path):
    root = tmp_path / "images"
    rng = np.random.default_rng(0)
    for name, count in (("cat", 3), ("dog", 2)):
        (root / name).mkdir(parents=True)
        for i in range(count):
            Image.fromarray(rng.integers(0, 256, (40, 36, 3), dtype=np.uint8)).save(root / name / f"{i}.png")
    return root


def _extract(folder, out, size=16, **kw):
    ds = ImageFolderDataset(folder, size, random_flip=False)
    opts = {"vae_name": "fake", "image_size": size, "shard_size": 2, "batch_size": 2, "flip": True}
    return extract_latents(ds, kw.pop("vae", FakeVAE()), out, **{**opts, **kw})


def test_extract_writes_shards_and_a_manifest(folder, tmp_path):
    out = tmp_path / "latents"
    result = _extract(folder, out, latent="mean", dtype="float32")
    assert (result.num_items, result.num_shards, result.written, result.skipped) == (5, 3, 3, 0)
    m = read_manifest(out)
    assert m["complete"] and m["class_names"] == ["cat", "dog"] and m["vae"] == "fake"
    assert m["latent_shape"] == [4, 2, 2] and m["image_size"] == 16 and m["scale"] == 0.5
    assert [(e["file"], e["start"], e["count"]) for e in m["shards"]] == [
        ("shard_00000.safetensors", 0, 2),
        ("shard_00001.safetensors", 2, 2),
        ("shard_00002.safetensors", 4, 1),
    ]
    images = ImageFolderDataset(folder, 16, random_flip=False)
    plain = LatentDataset(out, random_flip=False)
    assert len(plain) == 5 and plain.labels.tolist() == [0, 0, 0, 1, 1] and plain.num_classes == 2
    vae = FakeVAE()
    for i in range(5):
        z, label = plain[i]
        x, y = images[i]
        assert z.dtype == torch.float32 and label == y
        torch.testing.assert_close(z, vae.encode(x[None], sample=False)[0])
    flipping = LatentDataset(out, random_flip=True, seed=3)
    for key in range(10):  # keys of two epochs: the flip is drawn per (seed, key)
        x, _ = images[key % 5]
        want = x.flip(-1) if flip_bit(3, key) else x
        torch.testing.assert_close(flipping[key][0], vae.encode(want[None], sample=False)[0])


def test_resume_after_deleting_the_last_shard(folder, tmp_path):
    out = tmp_path / "latents"
    _extract(folder, out)  # posterior samples, float16
    before = LatentDataset(out, random_flip=False)
    first = [before[i][0] for i in range(5)]
    (out / "shard_00002.safetensors").unlink()
    with pytest.raises(DitqError, match="manifest|cannot read"):
        LatentDataset(out)[4]
    vae = FakeVAE()
    again = _extract(folder, out, vae=vae)
    assert (again.written, again.skipped) == (1, 2) and vae.calls == 2  # one batch, plain + flipped
    after = LatentDataset(out, random_flip=False)
    for i in range(5):  # the samples are seeded per shard: the same bits again
        assert torch.equal(after[i][0], first[i])
    nothing = _extract(folder, out, vae=FakeVAE())
    assert (nothing.written, nothing.skipped) == (0, 3)


def test_an_unfinished_or_different_extraction_is_refused(folder, tmp_path):
    out = tmp_path / "latents"
    _extract(folder, out)
    m = read_manifest(out)
    m["complete"] = False
    (out / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(DitqError, match="not complete.*extract-latents again"):
        LatentDataset(out)
    with pytest.raises(DitqError, match=r"other settings \(flip True -> False\)"):
        _extract(folder, out, flip=False)
    with pytest.raises(DitqError, match="not a multiple of the VAE's downsampling 8"):
        _extract(folder, tmp_path / "other", size=12)
    with pytest.raises(DitqError, match="extract-latents"):
        LatentDataset(tmp_path)


def test_training_on_latents(folder, tmp_path):
    from ditq.checkpoint import read_metadata
    from ditq.pipelines.train import run_training
    from ditq.train.config import TrainRun

    _extract(folder, tmp_path / "latents", size=32)
    run = TrainRun.from_dict(
        {
            "out": str(tmp_path / "run"),
            "device": "cpu",
            "model": {"name": "DiT-S/2", "overrides": {"depth": 1, "hidden_size": 32, "num_heads": 2}},
            "data": {"kind": "latents", "path": str(tmp_path / "latents")},
            "optim": {"steps": 3, "batch_size": 4, "lr": 1e-3, "log_every": 1},
            "checkpoint": {"every": 0},
        }
    )
    lines = []
    result = run_training(run, log=lines.append)
    cfg = result.model_config
    assert (cfg.in_channels, cfg.input_size, cfg.num_classes) == (4, 4, 2)
    assert [r["step"] for r in result.records] == [1, 2, 3]
    assert all(np.isfinite(r["loss"]) for r in result.records)
    meta = read_metadata(tmp_path / "run" / "model.safetensors")
    assert meta["vae"] == "fake" and meta["class_names"] == ["cat", "dog"]
    assert any("latents" in line and "4x4x4 from 32px images via fake" in line for line in lines)


def test_extract_through_a_real_diffusers_autoencoder(folder, tmp_path):
    """With the ``vae`` extra: a small, randomly initialized AutoencoderKL (no download)."""
    diffusers = pytest.importorskip("diffusers")
    from ditq.models.vae import StableDiffusionVAE

    torch.manual_seed(0)
    ae = diffusers.AutoencoderKL(
        block_out_channels=(8, 8),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4,
        norm_num_groups=4,
    )
    vae = StableDiffusionVAE(autoencoder=ae)
    a = _extract(folder, tmp_path / "a", size=8, vae=vae, shard_size=4)
    _extract(folder, tmp_path / "b", size=8, vae=vae, shard_size=4)
    assert a.manifest["latent_shape"] == [4, 4, 4] and a.manifest["scale"] == 0.18215
    da, db = LatentDataset(tmp_path / "a"), LatentDataset(tmp_path / "b")
    for key in range(5):  # posterior samples drawn from per-shard seeds: the same twice
        assert torch.equal(da[key][0], db[key][0])
    x, _ = ImageFolderDataset(folder, 8, random_flip=False)[0]
    mean = vae.encode(x[None], sample=False)[0].half().float()
    sample = LatentDataset(tmp_path / "a", random_flip=False)[0][0]
    assert 0 < (sample - mean).abs().max() < 1  # a posterior sample near the mean, not the mean


# --- long runs: a signal stops after a shard, one process per folder, a full disk ------------


def extract_argv(folder, out, *extra):
    options = ["--image-size", "8", "--shard-size", "1", "--dtype", "float32", "--quiet", *extra]
    return ["extract-latents", "--data", str(folder), "--vae", "pixel", "--out", str(out), *options]


def same_latents(a, b):
    """Two latents folders hold the same manifest and the same shard files, byte for byte."""
    assert read_manifest(a) == read_manifest(b)
    for entry in read_manifest(b)["shards"]:
        assert (a / entry["file"]).read_bytes() == (b / entry["file"]).read_bytes()


def no_temp_files(folder):
    return not [p for p in Path(folder).rglob("*") if p.name.endswith(".tmp")]


# The CLI in a subprocess, its pixel-space "VAE" slowed down to 0.1 s a shard: a signal sent when the
# first shard appears lands well before the last.
SLOW_CLI = """
import sys, time
from ditq.models.vae import PixelSpace
encode = PixelSpace.encode
PixelSpace.encode = lambda self, *a, **k: (time.sleep(0.1), encode(self, *a, **k))[1]
from ditq.cli.main import main
sys.exit(main(sys.argv[1:]))
"""


def test_cli_extract_latents_stops_on_sigterm_and_resumes(folder, tmp_path, capsys):
    whole, out = tmp_path / "whole", tmp_path / "latents"
    assert main(extract_argv(folder, whole)) == 0
    proc = subprocess.Popen(
        [sys.executable, "-c", SLOW_CLI, *extract_argv(folder, out)],
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 120
    while (
        not (out / "shard_00000.safetensors").exists() and proc.poll() is None and time.monotonic() < deadline
    ):
        time.sleep(0.002)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 75 and err.count("\n") == 1, err
    m = re.fullmatch(r"ditq: stopped after (\d+) of 5 shards by SIGTERM; the finished shards are in (.+); "
                     r"resume with: (ditq extract-latents .+)\n", err)  # fmt: skip
    assert m and m[2] == str(out), err
    manifest = read_manifest(out)
    assert 1 <= int(m[1]) < 5 and len(manifest["shards"]) == int(m[1]) and not manifest["complete"]
    assert no_temp_files(out) and not (out / ".ditq.lock").exists()

    resume = shlex.split(m[3])
    assert resume[0] == "ditq" and main(resume[1:]) == 0
    same_latents(out, whole)


def test_a_second_extraction_into_the_folder_is_refused(folder, tmp_path, capsys):
    out = tmp_path / "latents"
    hold = "import sys; from ditq.runlock import RunLock; RunLock(sys.argv[1]).acquire(); print('locked')"
    holder = subprocess.Popen(
        [sys.executable, "-c", hold + "; sys.stdout.flush(); sys.stdin.read()", str(out)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline() == "locked\n"
        assert main(extract_argv(folder, out)) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"ditq: error: the latents folder {out} is in use by pid {holder.pid} on ")
        assert err.count("\n") == 1 and not (out / "manifest.json").exists()
    finally:
        holder.communicate("", timeout=60)  # it ends when its stdin closes
    assert main(extract_argv(folder, out)) == 0  # the lock was released with the process


def test_extract_latents_after_a_full_disk_and_a_read_only_folder_resumes(
    folder, tmp_path, capsys, monkeypatch
):
    from ditq import checkpoint

    whole, out = tmp_path / "whole", tmp_path / "latents"
    assert main(extract_argv(folder, whole)) == 0
    shard = (whole / "shard_00000.safetensors").stat().st_size
    # The first shard and its manifest fit, the second shard does not.
    monkeypatch.setenv(
        "DITQ_FAULT_DISK_FULL_AFTER", str(shard + (whole / "manifest.json").stat().st_size + 100)
    )
    monkeypatch.setattr(checkpoint, "_written", 0)
    assert main(extract_argv(folder, out)) == 74
    err = capsys.readouterr().err
    assert err.startswith("ditq: error: cannot write the latents shard ") and err.count("\n") == 1, err
    assert "shard_00001.safetensors: the disk is full" in err and "then run the same command again" in err
    assert [e["file"] for e in read_manifest(out)["shards"]] == ["shard_00000.safetensors"]
    assert (out / "shard_00000.safetensors").read_bytes() == (whole / "shard_00000.safetensors").read_bytes()
    assert not (out / "shard_00001.safetensors").exists() and no_temp_files(out)

    monkeypatch.delenv("DITQ_FAULT_DISK_FULL_AFTER")
    monkeypatch.setenv("DITQ_FAULT_WRITE_ERRNO", "EROFS")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert main(extract_argv(folder, out)) == 74
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "the file system is read-only; make" in err, err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before and no_temp_files(out)

    monkeypatch.delenv("DITQ_FAULT_WRITE_ERRNO")
    assert main(extract_argv(folder, out)) == 0
    same_latents(out, whole)
