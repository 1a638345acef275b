"""Class-conditional sampling from a DiT, in batches, reproducibly: ``sample(model, num_samples=...)``.

This is DiT's ``sample.py``/``sample_ddp.py`` as a function: Gaussian noise,
an ancestral DDPM (250 steps) or DDIM (50 steps) reverse process, optional
classifier-free guidance over a doubled batch with the null label, a VAE
decode, and DiT's uint8 rule. All randomness comes from one generator seeded
with ``seed`` (labels from a separate numpy stream), so a run is determined by
``(seed, batch_size, device)``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from ditq.common import resolve_device
from ditq.diffusion import ClassifierFreeGuidance, create_diffusion, sample_loop
from ditq.errors import InvalidArgumentError
from ditq.images import to_uint8
from ditq.models.vae import VAE, vae_for_model

SAMPLERS = ("ddpm", "ddim")
# DiT samples with 250 ancestral steps; Q-DiT evaluates with DDIM-50.
DEFAULT_STEPS = {"ddpm": 250, "ddim": 50}


def default_steps(sampler: str) -> int:
    """The default number of steps for ``sampler`` (250 for DDPM, 50 for DDIM)."""
    if sampler not in DEFAULT_STEPS:
        raise InvalidArgumentError(f"unknown sampler '{sampler}'; choose one of {', '.join(SAMPLERS)}")
    return DEFAULT_STEPS[sampler]


def check_sample_options(
    *,
    num_samples: int,
    batch_size: int,
    sampler: str = "ddpm",
    steps: int | None = None,
    cfg_scale: float = 1.0,
    eta: float = 0.0,
) -> int:
    """Validate the model-independent options of :func:`sample`; returns the step count to use.

    Cheap on purpose: the CLI calls it before loading (maybe downloading) a model.
    """
    default = default_steps(sampler)  # also rejects an unknown sampler
    steps = default if steps is None else steps
    for name, value in (("num_samples", num_samples), ("batch_size", batch_size), ("steps", steps)):
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
            raise InvalidArgumentError(f"{name} must be a positive integer, got {value!r}")
    if steps > 1000:
        raise InvalidArgumentError(f"steps must be at most 1000 (the length of the process), got {steps}")
    if not math.isfinite(cfg_scale) or cfg_scale < 1.0:
        raise InvalidArgumentError(f"cfg_scale must be >= 1 (1 disables guidance), got {cfg_scale}")
    if not 0.0 <= eta <= 1.0:
        raise InvalidArgumentError(f"eta must be in [0, 1], got {eta}")
    return int(steps)


def make_labels(
    class_labels: Sequence[int] | None, num_samples: int, num_classes: int, seed: int = 0
) -> np.ndarray:
    """``num_samples`` labels: ``class_labels`` cycled (0,1,2,0,1,2,...), or uniform at random (``seed``)."""
    if class_labels is None:
        # numpy's stream, not torch's: labels stay independent of the noise drawn with the same seed.
        return np.random.default_rng(seed).integers(0, num_classes, size=num_samples, dtype=np.int64)
    labels = np.asarray(list(class_labels), dtype=np.int64)
    if labels.ndim != 1 or len(labels) == 0:
        raise InvalidArgumentError("class_labels must be a non-empty list of integers")
    bad = labels[(labels < 0) | (labels >= num_classes)]
    if len(bad):
        raise InvalidArgumentError(
            f"class label {int(bad[0])} is out of range: "
            f"this model has {num_classes} classes (0..{num_classes - 1})"
        )
    return np.resize(labels, num_samples)


def _config(model: nn.Module) -> Any:
    config = getattr(model, "config", None)
    needed = ("in_channels", "input_size", "num_classes", "learn_sigma")
    if config is None or not all(hasattr(config, k) for k in needed):
        raise InvalidArgumentError(
            f"cannot sample from {type(model).__name__}: it needs a .config with {', '.join(needed)}"
        )
    return config


def _resolve_cfg_channels(cfg_channels: int | str | None, in_channels: int) -> int | None:
    if cfg_channels == "auto":
        # The original guides 3 of the 4 latent channels; reproduce that for latent models only.
        return 3 if in_channels == 4 else None
    if cfg_channels is None or cfg_channels == "all":
        return None
    if isinstance(cfg_channels, str):
        if not cfg_channels.isdigit():
            raise InvalidArgumentError(
                f"cfg_channels must be a number, 'all' or 'auto', got '{cfg_channels}'"
            )
        cfg_channels = int(cfg_channels)
    if not 1 <= cfg_channels <= in_channels:
        raise InvalidArgumentError(f"cfg_channels must be in 1..{in_channels}, got {cfg_channels}")
    return int(cfg_channels)


class _CastInputs:
    """Runs a half/bfloat16 model on the sampler's float32 tensors; returns float32."""

    def __init__(self, model: nn.Module, dtype: torch.dtype):
        self.model, self.dtype = model, dtype

    def __call__(self, x: torch.Tensor, t: torch.Tensor, **kwargs) -> torch.Tensor:
        return self.model(x.to(self.dtype), t, **kwargs).float()


def sample(
    model: nn.Module,
    *,
    num_samples: int,
    batch_size: int = 32,
    sampler: str = "ddpm",
    steps: int | None = None,
    cfg_scale: float = 1.0,
    cfg_channels: int | str | None = "auto",
    class_labels: Sequence[int] | None = None,
    seed: int = 0,
    eta: float = 0.0,
    device: torch.device | str | None = None,
    vae: VAE | None = None,
    clip_denoised: bool | None = None,
    progress: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Draw ``num_samples`` class-conditional images from a DiT.

    Args:
        model: a DiT-like module ``model(x, t, y)`` with a ``.config``
            (``in_channels``, ``input_size``, ``num_classes``, ``learn_sigma``).
            It is run in eval mode (its training flag is restored afterwards)
            and moved to ``device`` when one is given.
        num_samples, batch_size: how many images, and how many per forward
            (guidance doubles the forward batch).
        sampler: ``"ddpm"`` (ancestral) or ``"ddim"``; ``steps`` defaults to
            250 for DDPM and 50 for DDIM (respaced from 1000).
        cfg_scale: classifier-free guidance scale; 1 disables it, > 1 runs a
            doubled batch whose second half has the null label ``num_classes``.
        cfg_channels: eps channels to guide: ``"auto"`` (3 for 4-channel latent
            models, reproducing DiT's ``forward_with_cfg``; all otherwise), an
            int, or ``None``/``"all"``.
        class_labels: labels cycled to ``num_samples``; ``None`` draws them
            uniformly at random from ``seed``.
        seed: seeds the generator of all noise (initial and per step).
        eta: DDIM's eta (0 = deterministic DDIM).
        device: where to sample; ``None`` = where the model is.
        vae: the decoder; ``None`` = :func:`ditq.models.vae.vae_for_model`.
        clip_denoised: clip x_0 predictions to [-1, 1]; ``None`` = only in
            pixel space (latent DiT never clips).
        progress: show progress bars.

    Returns:
        ``(images, labels)``: uint8 (N, H, W, C) from ``clamp(127.5 x + 128)``
        and int64 (N,).

    Raises:
        InvalidArgumentError: a non-positive count, a label outside
            ``[0, num_classes)``, ``cfg_scale < 1``, an unknown sampler...
    """
    steps = check_sample_options(
        num_samples=num_samples,
        batch_size=batch_size,
        sampler=sampler,
        steps=steps,
        cfg_scale=cfg_scale,
        eta=eta,
    )
    config = _config(model)
    labels = make_labels(class_labels, num_samples, config.num_classes, seed)
    guided_channels = _resolve_cfg_channels(cfg_channels, config.in_channels)
    if device is not None:
        model.to(resolve_device(device))
    param = next(model.parameters())
    device, dtype = param.device, param.dtype
    if vae is None:
        vae = vae_for_model(config, device=device)
    if vae.latent_channels != config.in_channels:
        raise InvalidArgumentError(
            f"the VAE has {vae.latent_channels} latent channels but the model takes {config.in_channels}"
        )
    if clip_denoised is None:
        clip_denoised = bool(getattr(vae, "pixel_space", False))

    diffusion = create_diffusion(
        str(steps) if sampler == "ddpm" else f"ddim{steps}", learn_sigma=config.learn_sigma
    )
    model_fn = model if dtype == torch.float32 else _CastInputs(model, dtype)
    use_cfg = cfg_scale > 1.0
    if use_cfg:
        model_fn = ClassifierFreeGuidance(
            model_fn, cfg_scale, guided_channels, learn_sigma=config.learn_sigma
        )
    generator = torch.Generator(device=device).manual_seed(seed)
    shape = (config.in_channels, config.input_size, config.input_size)

    was_training = model.training
    model.eval()  # the label embedder drops labels in training mode
    images = []
    try:
        starts = range(0, num_samples, batch_size)
        for start in tqdm(
            starts, desc="batches", disable=not progress or len(starts) < 2, dynamic_ncols=True
        ):
            y = torch.from_numpy(labels[start : start + batch_size]).to(device)
            n = len(y)
            z = torch.randn((n, *shape), generator=generator, device=device)
            if use_cfg:
                z = torch.cat([z, z], dim=0)
                y = torch.cat([y, torch.full_like(y, config.num_classes)], dim=0)
            out = sample_loop(
                diffusion,
                model_fn,
                tuple(z.shape),
                sampler=sampler,
                noise=z,
                clip_denoised=clip_denoised,
                model_kwargs={"y": y},
                eta=eta,
                device=device,
                generator=generator,
                progress=progress,
            )
            latents = out[:n]  # the null-label half is only there for guidance
            images.append(to_uint8(vae.decode(latents, batch_size=batch_size)))
    finally:
        model.train(was_training)
    return np.concatenate(images), labels
