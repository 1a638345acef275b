"""Autoencoders between images and the space a DiT denoises.

Every autoencoder here has the same small interface:

- ``encode(images)``: images in [-1, 1], NCHW float -> latents the model sees;
- ``decode(latents)``: latents -> images in [-1, 1], NCHW float;
- ``latent_channels`` and ``downsample`` (image side / latent side);
- ``pixel_space``: True when latents *are* images (then the sampler clips
  its x_0 predictions to [-1, 1], as pixel-space ADM does; latent DiT does not).

:class:`StableDiffusionVAE` wraps diffusers' ``AutoencoderKL`` (the
``sd-vae-ft-ema`` / ``-mse`` VAEs DiT was trained with); :class:`PixelSpace`
is the identity for small pixel-space models. diffusers is an optional extra
(``pip install 'ditq[vae]'``) and is imported only when an SD VAE is built.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ditq.errors import CheckpointError, DownloadError, InvalidArgumentError, MissingDependencyError

# The latent scale DiT uses (the SD VAE's ``scaling_factor``): latents are
# ``posterior * 0.18215`` so that they have roughly unit variance.
SD_VAE_SCALE = 0.18215

# Short names accepted for the two VAEs DiT was released with.
SD_VAE_NAMES = {
    "ema": "stabilityai/sd-vae-ft-ema",
    "mse": "stabilityai/sd-vae-ft-mse",
    "sd-vae-ft-ema": "stabilityai/sd-vae-ft-ema",
    "sd-vae-ft-mse": "stabilityai/sd-vae-ft-mse",
    "stabilityai/sd-vae-ft-ema": "stabilityai/sd-vae-ft-ema",
    "stabilityai/sd-vae-ft-mse": "stabilityai/sd-vae-ft-mse",
}
DEFAULT_SD_VAE = "stabilityai/sd-vae-ft-ema"

# Names that force pixel space (no autoencoder) in :func:`vae_for_model`.
PIXEL_SPACE_NAMES = ("pixel", "none")


class VAE:
    """The interface shared by all autoencoders: batched ``encode``/``decode``."""

    latent_channels: int
    downsample: int
    pixel_space: bool = False

    def encode(
        self,
        images: torch.Tensor,
        *,
        batch_size: int | None = None,
        generator: torch.Generator | None = None,
        sample: bool = True,
    ) -> torch.Tensor:
        """Images in [-1, 1] (N, C, H, W) -> latents (N, latent_channels, H/d, W/d)."""
        raise NotImplementedError

    def decode(self, latents: torch.Tensor, *, batch_size: int | None = None) -> torch.Tensor:
        """Latents (N, latent_channels, h, w) -> images in [-1, 1] (N, C, h*d, w*d)."""
        raise NotImplementedError


def _batches(x: torch.Tensor, batch_size: int | None):
    if batch_size is not None and batch_size < 1:
        raise InvalidArgumentError(f"batch_size must be positive, got {batch_size}")
    step = len(x) if not batch_size else batch_size
    for i in range(0, len(x), max(step, 1)):
        yield x[i : i + step]


def _check_nchw(x: torch.Tensor, channels: int, what: str) -> None:
    if x.ndim != 4 or x.shape[1] != channels:
        raise InvalidArgumentError(f"{what} must have shape (N, {channels}, H, W), got {tuple(x.shape)}")


class PixelSpace(VAE):
    """The identity 'autoencoder' of pixel-space models (1 or 3 channels, downsample 1)."""

    pixel_space = True

    def __init__(self, channels: int = 3):
        if channels not in (1, 3):
            raise InvalidArgumentError(f"pixel-space images have 1 or 3 channels, got {channels}")
        self.latent_channels = channels
        self.downsample = 1

    def encode(self, images, *, batch_size=None, generator=None, sample=True):
        """Returns ``images`` unchanged (as float); ``batch_size``/``generator``/``sample`` are unused."""
        _check_nchw(images, self.latent_channels, "images")
        return images.float()

    def decode(self, latents, *, batch_size=None):
        """Returns ``latents`` unchanged (as float): they are images already."""
        _check_nchw(latents, self.latent_channels, "latents")
        return latents.float()

    def __repr__(self) -> str:
        return f"PixelSpace(channels={self.latent_channels})"


def _import_autoencoder_kl():
    try:
        from diffusers.models import AutoencoderKL
    except ImportError as e:
        raise MissingDependencyError(
            f"the Stable Diffusion VAE needs diffusers ({e.__class__.__name__}: {e}); "
            "install it with: pip install 'ditq[vae]'"
        ) from None
    return AutoencoderKL


def _looks_like_path(name: str) -> bool:
    # A Hub id is "owner/name"; anything else with a separator is meant as a folder.
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or "\\" in name


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{e.__class__.__name__}: {text[0]}" if text else e.__class__.__name__


class StableDiffusionVAE(VAE):
    """diffusers' ``AutoencoderKL`` with DiT's latent scale (0.18215), downsample 8.

    ``name_or_path`` is a Hugging Face id (``"stabilityai/sd-vae-ft-ema"``,
    ``"stabilityai/sd-vae-ft-mse"``, or just ``"ema"``/``"mse"``) or a local
    folder saved with ``save_pretrained``. ``autoencoder`` injects an already
    built ``AutoencoderKL``-like object instead (tests, custom VAEs): it needs
    ``encode(x).latent_dist`` with ``sample(generator=...)``/``mean``,
    ``decode(z).sample``, and optionally ``config.latent_channels`` /
    ``config.block_out_channels``.
    """

    def __init__(
        self,
        name_or_path: str = DEFAULT_SD_VAE,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        *,
        autoencoder: Any | None = None,
        scale: float = SD_VAE_SCALE,
    ):
        self.name_or_path = SD_VAE_NAMES.get(name_or_path, name_or_path)
        self.device = torch.device(device)
        self.dtype = dtype
        self.scale = scale
        if autoencoder is None:
            autoencoder = self._load(self.name_or_path)
        if hasattr(autoencoder, "to"):
            autoencoder = autoencoder.to(device=self.device, dtype=dtype)
        if hasattr(autoencoder, "eval"):
            autoencoder.eval()
        self.autoencoder = autoencoder
        config = getattr(autoencoder, "config", None)
        self.latent_channels = int(getattr(config, "latent_channels", 4))
        # Each encoder level but the last halves the side: 4 levels -> /8.
        block_out_channels = getattr(config, "block_out_channels", (128, 256, 512, 512))
        self.downsample = 2 ** (len(block_out_channels) - 1)

    @staticmethod
    def _load(name_or_path: str):
        AutoencoderKL = _import_autoencoder_kl()
        local = Path(name_or_path).expanduser()
        if local.is_dir():
            try:
                return AutoencoderKL.from_pretrained(str(local))
            except Exception as e:  # diffusers raises OSError, ValueError, EnvironmentError...
                raise CheckpointError(f"cannot load the VAE in {local}: {_first_line(e)}") from None
        if _looks_like_path(name_or_path):
            raise CheckpointError(f"VAE folder {name_or_path} does not exist; give a folder or a Hub id")
        try:
            return AutoencoderKL.from_pretrained(name_or_path)
        except Exception as e:
            raise DownloadError(
                f"cannot load the VAE '{name_or_path}' ({_first_line(e)}); "
                "check the name and the network, or pass a local folder saved with save_pretrained"
            ) from None

    @torch.no_grad()
    def encode(self, images, *, batch_size=None, generator=None, sample=True):
        """Images in [-1, 1] -> ``latent_dist.sample(generator) * 0.18215`` (``sample=False``: the mean)."""
        if images.ndim != 4:
            raise InvalidArgumentError(f"images must have shape (N, C, H, W), got {tuple(images.shape)}")
        out = []
        for chunk in _batches(images, batch_size):
            dist = self.autoencoder.encode(chunk.to(self.device, self.dtype)).latent_dist
            z = dist.sample(generator=generator) if sample else dist.mean
            out.append(z.float() * self.scale)
        return torch.cat(out) if out else images.new_zeros((0, self.latent_channels, 0, 0))

    @torch.no_grad()
    def decode(self, latents, *, batch_size=None):
        """Latents -> ``decode(z / 0.18215).sample``, images in [-1, 1] (not clamped)."""
        _check_nchw(latents, self.latent_channels, "latents")
        out = []
        for chunk in _batches(latents, batch_size):
            z = chunk.to(self.device, self.dtype) / self.scale
            out.append(self.autoencoder.decode(z).sample.float())
        return torch.cat(out) if out else latents.new_zeros((0, 3, 0, 0))

    def __repr__(self) -> str:
        return f"StableDiffusionVAE({self.name_or_path!r}, device={str(self.device)!r}, dtype={self.dtype})"


def vae_for_model(
    config: Any,
    vae_name: str | None = None,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> VAE:
    """The autoencoder a model samples through.

    Without ``vae_name``, a model with 1 or 3 input channels is taken to be
    pixel-space (:class:`PixelSpace`) and any other gets the SD VAE DiT was
    trained with (``sd-vae-ft-ema``). ``vae_name="pixel"`` forces pixel space;
    any other name is given to :class:`StableDiffusionVAE`. Raises
    :class:`InvalidArgumentError` when the VAE's channels do not fit the model.
    """
    channels = int(config.in_channels)
    if vae_name in PIXEL_SPACE_NAMES and channels not in (1, 3):
        raise InvalidArgumentError(
            f"a model with {channels} input channels is not pixel-space (1 or 3 channels); name a VAE instead"
        )
    if vae_name in PIXEL_SPACE_NAMES or vae_name is None and channels in (1, 3):
        vae: VAE = PixelSpace(channels)
    else:
        vae = StableDiffusionVAE(vae_name or DEFAULT_SD_VAE, device=device, dtype=dtype)
    if vae.latent_channels != channels:
        raise InvalidArgumentError(
            f"the VAE {vae!r} has {vae.latent_channels} latent channels but the model takes {channels}"
        )
    return vae
