"""ditq.pipelines.sample: shapes, determinism, labels, guidance, validation; sharded .npz sampling."""

from __future__ import annotations

import importlib
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from ditq.diffusion import create_diffusion, sample_loop
from ditq.errors import InvalidArgumentError
from ditq.eval.sampling import list_shards, make_eval_labels, plan_shards, read_manifest, shard_seed
from ditq.images import to_uint8
from ditq.models import create_model
from ditq.models.vae import StableDiffusionVAE
from ditq.pipelines.sample import (
    check_sample_options,
    default_shard_dir,
    default_shard_size,
    make_labels,
    sample,
    sample_to_npz,
)


def tiny_model(in_channels: int = 3, num_classes: int = 5, seed: int = 0) -> nn.Module:
    """A two-block DiT on 8x8 inputs whose output depends on x, t and y (adaLN-Zero undone)."""
    torch.manual_seed(seed)
    model = create_model(
        "DiT-S/2",
        input_size=8,
        depth=2,
        hidden_size=64,
        num_heads=2,
        in_channels=in_channels,
        num_classes=num_classes,
    )
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "adaLN" in name or "final_layer" in name:
                p.normal_(std=0.05)
    return model.eval()


class _LatentAE:
    """A fake AutoencoderKL with downsample 1: decode keeps the first 3 channels."""

    config = SimpleNamespace(latent_channels=4, block_out_channels=(8,))

    def decode(self, z):
        return SimpleNamespace(sample=torch.tanh(z[:, :3]))


FAST = dict(sampler="ddim", steps=4)


def test_shapes_and_dtypes():
    images, labels = sample(tiny_model(), num_samples=5, batch_size=2, class_labels=[1, 2], **FAST)
    assert images.dtype == np.uint8 and images.shape == (5, 8, 8, 3)
    assert labels.dtype == np.int64 and labels.tolist() == [1, 2, 1, 2, 1]


def test_grayscale_model():
    images, _ = sample(tiny_model(in_channels=1), num_samples=2, batch_size=2, **FAST)
    assert images.shape == (2, 8, 8, 1)


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_deterministic_for_a_seed(sampler):
    model = tiny_model()
    kwargs = dict(num_samples=3, batch_size=2, sampler=sampler, steps=3, cfg_scale=2.0)
    a, la = sample(model, seed=7, **kwargs)
    torch.manual_seed(123)  # the global RNG plays no part
    b, lb = sample(model, seed=7, **kwargs)
    c, _ = sample(model, seed=8, **kwargs)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(la, lb)
    assert not np.array_equal(a, c)


def test_random_labels_come_from_the_seed():
    a = make_labels(None, 100, 5, seed=1)
    assert a.min() >= 0 and a.max() < 5 and len(set(a.tolist())) == 5
    np.testing.assert_array_equal(a, make_labels(None, 100, 5, seed=1))
    assert not np.array_equal(a, make_labels(None, 100, 5, seed=2))
    _, labels = sample(tiny_model(), num_samples=6, batch_size=6, seed=1, **FAST)
    np.testing.assert_array_equal(labels, make_labels(None, 6, 5, seed=1))


def test_training_mode_is_restored_and_labels_are_not_dropped():
    model = tiny_model()
    model.y_embedder.dropout_prob = 1.0  # in training mode every label would become null
    expected, _ = sample(model, num_samples=2, batch_size=2, class_labels=[3], **FAST)
    model.train()
    got, _ = sample(model, num_samples=2, batch_size=2, class_labels=[3], **FAST)
    assert model.training
    np.testing.assert_array_equal(got, expected)


def test_reproduces_dit_forward_with_cfg():
    """Latent 4-channel models guide 3 channels by default, exactly as DiT's sample.py does."""
    torch.manual_seed(0)
    model = tiny_model(in_channels=4)
    vae = StableDiffusionVAE(autoencoder=_LatentAE())
    labels = [0, 3, 4]
    common = dict(
        num_samples=3, batch_size=3, sampler="ddpm", steps=5, cfg_scale=4.0, class_labels=labels, seed=11
    )
    got, _ = sample(model, vae=vae, **common)

    # DiT's sample.py, with our seeded generator in place of the global RNG.
    generator = torch.Generator().manual_seed(11)
    z = torch.randn(3, 4, 8, 8, generator=generator)
    z = torch.cat([z, z])
    y = torch.tensor(labels + [5, 5, 5])
    kwargs = dict(sampler="ddpm", noise=z, model_kwargs=dict(y=y, cfg_scale=4.0), generator=generator)
    out = sample_loop(create_diffusion("5"), model.forward_with_cfg, z.shape, **kwargs)
    expected = to_uint8(torch.tanh(out[:3, :3] / 0.18215))
    np.testing.assert_array_equal(got, expected)

    all_channels, _ = sample(model, vae=vae, cfg_channels=None, **common)
    assert not np.array_equal(all_channels, got)


def test_guidance_changes_samples():
    model = tiny_model()
    plain, _ = sample(model, num_samples=2, batch_size=2, class_labels=[1], **FAST)
    guided, _ = sample(model, num_samples=2, batch_size=2, class_labels=[1], cfg_scale=3.0, **FAST)
    assert not np.array_equal(plain, guided)


def test_default_steps():
    assert check_sample_options(num_samples=1, batch_size=1) == 250
    assert check_sample_options(num_samples=1, batch_size=1, sampler="ddim") == 50
    assert check_sample_options(num_samples=1, batch_size=1, sampler="ddim", steps=10) == 10


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(num_samples=0), "num_samples must be a positive integer"),
        (dict(batch_size=-1), "batch_size must be a positive integer"),
        (dict(steps=0), "steps must be a positive integer"),
        (dict(steps=1001), "at most 1000"),
        (dict(cfg_scale=0.5), "cfg_scale must be >= 1"),
        (dict(sampler="euler"), "unknown sampler 'euler'"),
        (dict(eta=2.0), "eta must be in"),
        (dict(class_labels=[1, 5]), r"class label 5 is out of range: this model has 5 classes \(0..4\)"),
        (dict(class_labels=[-1]), "class label -1 is out of range"),
        (dict(class_labels=[]), "non-empty"),
        (dict(cfg_channels=4), "cfg_channels must be in 1..3"),
    ],
)
def test_invalid_arguments(kwargs, match):
    base = dict(num_samples=2, batch_size=2, sampler="ddim", steps=2)
    with pytest.raises(InvalidArgumentError, match=match) as e:
        sample(tiny_model(), **{**base, **kwargs})
    assert "\n" not in str(e.value)


def test_vae_channels_must_fit_the_model():
    with pytest.raises(InvalidArgumentError, match="latent channels"):
        sample(
            tiny_model(in_channels=3),
            num_samples=1,
            batch_size=1,
            vae=StableDiffusionVAE(autoencoder=_LatentAE()),
        )


def test_pixel_space_clips_denoised_by_default():
    """Pixel-space sampling clips x_0 predictions as ADM does; latent DiT sampling does not."""
    model = tiny_model()
    clipped, _ = sample(model, num_samples=2, batch_size=2, class_labels=[0], **FAST)
    same, _ = sample(model, num_samples=2, batch_size=2, class_labels=[0], clip_denoised=True, **FAST)
    unclipped, _ = sample(model, num_samples=2, batch_size=2, class_labels=[0], clip_denoised=False, **FAST)
    np.testing.assert_array_equal(clipped, same)
    assert not np.array_equal(clipped, unclipped)


def test_half_precision_model():
    model = tiny_model().to(torch.bfloat16)
    images, _ = sample(model, num_samples=2, batch_size=2, **FAST)
    assert images.shape == (2, 8, 8, 3)


# --- sample_to_npz: sharded, resumable ---------------------------------------------------------

SHARDED = dict(num_samples=5, batch_size=2, cfg_scale=2.0, seed=3, **FAST)


def _read(path):
    with np.load(path) as data:
        return data["arr_0"], data["arr_1"]


def test_one_shard_is_exactly_sample(tmp_path):
    model = tiny_model()
    result = sample_to_npz(model, tmp_path / "s.npz", log=lambda _: None, **SHARDED)
    images, labels = _read(tmp_path / "s.npz")
    expected, expected_labels = sample(model, **SHARDED)
    np.testing.assert_array_equal(images, expected)
    np.testing.assert_array_equal(labels, expected_labels)
    assert (result.rank, result.world_size, result.is_main) == (0, 1, True)
    assert (result.path, result.image_shape, result.shards_drawn) == (tmp_path / "s.npz", (8, 8, 3), 1)
    assert result.shard_dir == tmp_path / "s.shards" and not result.shard_dir.exists()  # merged, removed


def test_each_shard_is_sample_of_its_labels_and_seed(tmp_path):
    model = tiny_model()
    lines = []
    result = sample_to_npz(
        model, tmp_path / "s.npz", shard_size=2, balanced=True, keep_shards=True, log=lines.append, **SHARDED
    )
    images, labels = _read(tmp_path / "s.npz")
    np.testing.assert_array_equal(labels, make_eval_labels(5, 5, seed=3, balanced=True))
    for shard in plan_shards(5, 2, seed=3):
        part = labels[shard.start : shard.stop].tolist()
        expected, _ = sample(
            model, **{**SHARDED, "num_samples": shard.size, "seed": shard.seed}, class_labels=part
        )
        np.testing.assert_array_equal(images[shard.start : shard.stop], expected)
    assert list_shards(tmp_path / "s.shards") == [0, 1, 2] and result.shards_drawn == 3
    assert read_manifest(tmp_path / "s.shards")["meta"]["labels"] == "balanced"
    assert (
        len(lines) == 1 and "sampling 5 images (balanced labels)" in lines[0] and "3 shards of 2" in lines[0]
    )


def test_a_rerun_keeps_complete_shards_and_refuses_other_settings(tmp_path, monkeypatch):
    # The module itself (ditq.pipelines.sample the attribute is the function).
    pipeline = importlib.import_module("ditq.pipelines.sample")
    model = tiny_model()
    out, shards = tmp_path / "s.npz", tmp_path / "keep"
    kwargs = dict(shard_size=2, shard_dir=shards, keep_shards=True, log=lambda _: None, **SHARDED)
    sample_to_npz(model, out, **kwargs)
    first = _read(out)
    (shards / "shard_000001.npz").unlink()
    calls = []
    real = pipeline.sample
    monkeypatch.setattr(pipeline, "sample", lambda *a, **k: calls.append(k["seed"]) or real(*a, **k))
    lines = []
    result = sample_to_npz(model, out, **{**kwargs, "log": lines.append})
    assert calls == [shard_seed(3, 1)] and (result.shards_drawn, result.shards_kept) == (1, 2)
    assert "resuming: 2 of 3 shards are already there" in lines[1]
    for a, b in zip(_read(out), first, strict=True):
        np.testing.assert_array_equal(a, b)
    for change, fragment in [
        (dict(cfg_scale=3.0), "cfg_scale was 2.0, now 3.0"),
        (dict(batch_size=1), "batch_size was 2, now 1"),
        (dict(steps=5), "steps was 4, now 5"),
        (dict(balanced=True), "labels was 'uniform', now 'balanced'"),
        (dict(meta={"model": "other"}), "model was None, now 'other'"),
    ]:
        with pytest.raises(InvalidArgumentError, match=fragment) as e:
            sample_to_npz(model, out, **{**kwargs, **change})
        assert "\n" not in str(e.value) and "use another shard folder" in str(e.value)
    with pytest.raises(InvalidArgumentError, match="model_config"):
        sample_to_npz(tiny_model(num_classes=6), out, **kwargs)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(balanced=True, class_labels=[1]), "exclude each other"),
        (dict(shard_size=0), "shard_size must be a positive integer, got 0"),
        (dict(num_samples=0), "num_samples must be a positive integer"),
        (dict(class_labels=[7]), "class label 7 is out of range"),
        (dict(out="s.png"), "writes an .npz file, not 's.png'"),
        (dict(seed=-1), "seed must be an integer >= 0, got -1"),
    ],
)
def test_sample_to_npz_invalid_arguments(tmp_path, kwargs, match):
    out = tmp_path / kwargs.pop("out", "s.npz")
    with pytest.raises(InvalidArgumentError, match=match) as e:
        sample_to_npz(tiny_model(), out, **{**SHARDED, **kwargs})
    assert "\n" not in str(e.value)
    assert list(tmp_path.iterdir()) == []


def test_default_shard_size_and_folder():
    assert (
        default_shard_size(32) == 1024 and default_shard_size(50) == 1000 and default_shard_size(3000) == 3000
    )
    assert default_shard_dir("runs/samples.npz").as_posix() == "runs/samples.shards"
