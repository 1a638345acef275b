"""Sampling loops (ancestral DDPM, DDIM) and classifier-free guidance, for any model callable."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from tqdm.auto import tqdm

from ditq.diffusion.gaussian import GaussianDiffusion, ModelFn


def _noise_like(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    # Without a generator, draw from the global RNG exactly as torch.randn_like does,
    # so a seeded run reproduces the original code's samples.
    if generator is None:
        return torch.randn_like(x)
    return torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)


def _timesteps(diffusion: GaussianDiffusion, progress: bool) -> Iterator[int]:
    indices = list(range(diffusion.num_timesteps))[::-1]
    return iter(tqdm(indices, leave=False, dynamic_ncols=True) if progress else indices)


def sample_loop_progressive(
    diffusion: GaussianDiffusion,
    model: ModelFn,
    shape: tuple[int, ...],
    *,
    sampler: str = "ddpm",
    noise: torch.Tensor | None = None,
    clip_denoised: bool = False,
    denoised_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
    model_kwargs: dict | None = None,
    eta: float = 0.0,
    device: torch.device | str | None = None,
    generator: torch.Generator | None = None,
    progress: bool = False,
) -> Iterator[dict]:
    """Yield ``{"sample", "pred_xstart"}`` after each reverse step, from T-1 down to 0.

    ``sampler`` is ``"ddpm"`` (ancestral) or ``"ddim"`` (with ``eta``). The
    diffusion's own step count is used: respace it first (``create_diffusion("ddim50")``).
    """
    if sampler not in ("ddpm", "ddim"):
        raise ValueError(f"unknown sampler '{sampler}'; expected 'ddpm' or 'ddim'")
    if device is None:
        device = noise.device if noise is not None else "cpu"
    if noise is not None:
        img = noise
    elif generator is None:
        img = torch.randn(*shape, device=device)
    else:
        img = torch.randn(*shape, device=device, generator=generator)
    for i in _timesteps(diffusion, progress):
        t = torch.tensor([i] * shape[0], device=img.device)
        with torch.no_grad():
            step_noise = None if generator is None else _noise_like(img, generator)
            if sampler == "ddpm":
                out = diffusion.p_sample(
                    model, img, t, clip_denoised, denoised_fn, model_kwargs, noise=step_noise
                )
            else:
                out = diffusion.ddim_sample(
                    model, img, t, clip_denoised, denoised_fn, model_kwargs, eta=eta, noise=step_noise
                )
        yield out
        img = out["sample"]


def sample_loop(
    diffusion: GaussianDiffusion, model: ModelFn, shape: tuple[int, ...], **kwargs
) -> torch.Tensor:
    """The final sample of :func:`sample_loop_progressive`."""
    final = None
    for out in sample_loop_progressive(diffusion, model, shape, **kwargs):
        final = out
    return final["sample"]


def p_sample_loop(diffusion: GaussianDiffusion, model: ModelFn, shape, **kwargs) -> torch.Tensor:
    """Ancestral sampling (DiT's default with 250 respaced steps)."""
    return sample_loop(diffusion, model, shape, sampler="ddpm", **kwargs)


def ddim_sample_loop(diffusion: GaussianDiffusion, model: ModelFn, shape, **kwargs) -> torch.Tensor:
    """DDIM sampling (deterministic with ``eta=0``, the default)."""
    return sample_loop(diffusion, model, shape, sampler="ddim", **kwargs)


class ClassifierFreeGuidance:
    """Wrap ``model(x, t, y)`` into a guided model over a doubled batch.

    The batch holds ``[x, x]`` with labels ``[y, null]``; the eps channels are
    combined as ``uncond + scale * (cond - uncond)`` and written to both halves.
    ``guided_channels=3`` reproduces the original DiT (first three channels
    only); ``None`` guides all eps channels (``C_out // 2`` with learned sigma,
    else all).
    """

    def __init__(
        self, model: ModelFn, scale: float, guided_channels: int | None = None, learn_sigma: bool = True
    ):
        self.model = model
        self.scale = scale
        self.guided_channels = guided_channels
        self.learn_sigma = learn_sigma

    def __call__(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, **kwargs) -> torch.Tensor:
        half = x[: len(x) // 2]
        out = self.model(torch.cat([half, half], dim=0), t, y, **kwargs)
        n = self.guided_channels
        if n is None:
            n = out.shape[1] // 2 if self.learn_sigma else out.shape[1]
        eps, rest = out[:, :n], out[:, n:]
        cond_eps, uncond_eps = torch.split(eps, len(eps) // 2, dim=0)
        half_eps = uncond_eps + self.scale * (cond_eps - uncond_eps)
        return torch.cat([torch.cat([half_eps, half_eps], dim=0), rest], dim=1)
