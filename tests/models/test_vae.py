"""The autoencoder interface: pixel space fully, the SD VAE wrapper with a fake AutoencoderKL."""

from __future__ import annotations

import sys
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from ditq.errors import CheckpointError, DownloadError, InvalidArgumentError, MissingDependencyError
from ditq.models import DiTConfig, vae
from ditq.models.vae import SD_VAE_SCALE, PixelSpace, StableDiffusionVAE, vae_for_model


class _FakeDist:
    def __init__(self, mean: torch.Tensor):
        self.mean = mean

    def sample(self, generator=None):
        noise = torch.randn(self.mean.shape, generator=generator, dtype=self.mean.dtype)
        return self.mean + noise


class FakeAutoencoderKL:
    """Just enough of diffusers' AutoencoderKL: encode(x).latent_dist, decode(z).sample, config."""

    def __init__(self):
        self.config = SimpleNamespace(latent_channels=4, block_out_channels=(8, 8, 8, 8))
        self.encoded: list[torch.Tensor] = []
        self.decoded: list[torch.Tensor] = []

    def encode(self, x):
        self.encoded.append(x)
        mean = F.avg_pool2d(x, 8).mean(1, keepdim=True).repeat(1, 4, 1, 1)  # (N, 4, H/8, W/8)
        return SimpleNamespace(latent_dist=_FakeDist(mean))

    def decode(self, z):
        self.decoded.append(z)
        return SimpleNamespace(sample=F.interpolate(z[:, :3], scale_factor=8, mode="nearest"))


# ----------------------------------------------------------------------------- pixel space


@pytest.mark.parametrize("channels", [1, 3])
def test_pixel_space_is_identity(channels):
    space = PixelSpace(channels)
    assert (space.latent_channels, space.downsample, space.pixel_space) == (channels, 1, True)
    x = torch.rand(5, channels, 6, 6) * 2 - 1
    assert torch.equal(space.encode(x, batch_size=2), x)
    assert torch.equal(space.decode(x, batch_size=2), x)
    assert space.decode(x.half()).dtype == torch.float32


def test_pixel_space_checks_channels_and_shapes():
    with pytest.raises(InvalidArgumentError, match="1 or 3 channels"):
        PixelSpace(4)
    with pytest.raises(InvalidArgumentError, match=r"\(N, 3, H, W\)"):
        PixelSpace(3).decode(torch.zeros(2, 1, 4, 4))
    with pytest.raises(InvalidArgumentError):
        PixelSpace(1).encode(torch.zeros(4, 4))


# ----------------------------------------------------------------------------- choosing a VAE


@pytest.mark.parametrize("channels", [1, 3])
def test_vae_for_pixel_models(channels):
    space = vae_for_model(DiTConfig(in_channels=channels))
    assert isinstance(space, PixelSpace) and space.latent_channels == channels
    assert isinstance(vae_for_model(DiTConfig(in_channels=channels), "pixel"), PixelSpace)


def test_vae_for_latent_model_without_diffusers(monkeypatch):
    # A None entry in sys.modules makes the import fail, whether diffusers is installed or not.
    monkeypatch.setitem(sys.modules, "diffusers", None)
    monkeypatch.setitem(sys.modules, "diffusers.models", None)
    with pytest.raises(MissingDependencyError, match=r"pip install 'ditq\[vae\]'") as e:
        vae_for_model(DiTConfig(in_channels=4))
    assert "\n" not in str(e.value)
    with pytest.raises(MissingDependencyError):
        StableDiffusionVAE("stabilityai/sd-vae-ft-mse")


def test_vae_for_model_rejects_pixel_space_for_latents():
    with pytest.raises(InvalidArgumentError, match="not pixel-space"):
        vae_for_model(DiTConfig(in_channels=4), "pixel")


def test_vae_for_model_checks_channels(monkeypatch):
    monkeypatch.setattr(vae, "_import_autoencoder_kl", lambda: _FakeFactory)
    with pytest.raises(InvalidArgumentError, match="4 latent channels but the model takes 3"):
        vae_for_model(DiTConfig(in_channels=3), "ema")


class _FakeFactory:
    calls: list[str] = []
    fail = False

    @classmethod
    def from_pretrained(cls, name):
        cls.calls.append(name)
        if cls.fail:
            raise OSError(f"{name} is not a valid model identifier\nmore lines")
        return FakeAutoencoderKL()


def test_sd_vae_names_and_load_errors(monkeypatch, tmp_path):
    monkeypatch.setattr(vae, "_import_autoencoder_kl", lambda: _FakeFactory)
    monkeypatch.setattr(_FakeFactory, "calls", [])
    monkeypatch.setattr(_FakeFactory, "fail", False)
    assert StableDiffusionVAE("mse").name_or_path == "stabilityai/sd-vae-ft-mse"
    StableDiffusionVAE(str(tmp_path))  # a local folder
    assert _FakeFactory.calls == ["stabilityai/sd-vae-ft-mse", str(tmp_path)]

    monkeypatch.setattr(_FakeFactory, "fail", True)
    with pytest.raises(DownloadError, match="cannot load the VAE 'stabilityai/sd-vae-ft-ema'") as e:
        StableDiffusionVAE()
    assert "\n" not in str(e.value)
    with pytest.raises(CheckpointError, match="cannot load the VAE in"):
        StableDiffusionVAE(str(tmp_path))
    with pytest.raises(CheckpointError, match="does not exist"):
        StableDiffusionVAE(str(tmp_path / "missing"))


# ----------------------------------------------------------------------------- the SD VAE scaling


def test_sd_vae_shape_facts():
    sd = StableDiffusionVAE(autoencoder=FakeAutoencoderKL())
    assert (sd.latent_channels, sd.downsample, sd.pixel_space, sd.scale) == (4, 8, False, 0.18215)


def test_sd_vae_decode_divides_by_the_scale_in_batches():
    fake = FakeAutoencoderKL()
    sd = StableDiffusionVAE(autoencoder=fake)
    z = torch.randn(5, 4, 2, 2)
    images = sd.decode(z, batch_size=2)
    assert images.shape == (5, 3, 16, 16)
    assert [len(c) for c in fake.decoded] == [2, 2, 1]
    torch.testing.assert_close(torch.cat(fake.decoded), z / SD_VAE_SCALE)
    torch.testing.assert_close(images, F.interpolate(z[:, :3] / SD_VAE_SCALE, scale_factor=8))


def test_sd_vae_encode_scales_mean_or_sample():
    sd = StableDiffusionVAE(autoencoder=FakeAutoencoderKL())
    x = torch.rand(3, 3, 16, 16) * 2 - 1
    mean = F.avg_pool2d(x, 8).mean(1, keepdim=True).repeat(1, 4, 1, 1)
    torch.testing.assert_close(sd.encode(x, sample=False, batch_size=2), mean * SD_VAE_SCALE)

    a = sd.encode(x, generator=torch.Generator().manual_seed(3))
    b = sd.encode(x, generator=torch.Generator().manual_seed(3))
    noise = torch.randn(mean.shape, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(a, (mean + noise) * SD_VAE_SCALE)


def test_sd_vae_rejects_wrong_latent_channels():
    sd = StableDiffusionVAE(autoencoder=FakeAutoencoderKL())
    with pytest.raises(InvalidArgumentError, match=r"\(N, 4, H, W\)"):
        sd.decode(torch.zeros(1, 3, 2, 2))
    with pytest.raises(InvalidArgumentError, match="batch_size"):
        sd.decode(torch.zeros(1, 4, 2, 2), batch_size=0)


def test_wrapper_runs_a_real_diffusers_autoencoder():
    """With the ``vae`` extra installed: a small, randomly initialized AutoencoderKL (no download)."""
    diffusers = pytest.importorskip("diffusers")
    ae = diffusers.AutoencoderKL(
        block_out_channels=(32, 64),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4,
    )
    vae = StableDiffusionVAE(autoencoder=ae)
    x = torch.rand(3, 3, 16, 16) * 2 - 1
    z = vae.encode(x, batch_size=2, sample=False)
    assert z.shape == (3, 4, 8, 8) and vae.downsample == 2
    with torch.no_grad():
        expected = ae.encode(x).latent_dist.mean * 0.18215
    torch.testing.assert_close(z, expected)
    assert vae.decode(z, batch_size=2).shape == x.shape
