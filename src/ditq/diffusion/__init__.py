"""Gaussian diffusion as DiT uses it: schedules, respacing, losses, samplers.

``create_diffusion("250")`` mirrors DiT's factory: linear betas over 1000
steps, eps prediction, learned-range sigma, hybrid loss. This package takes any
callable ``model(x, t, **kwargs)`` and never imports ``ditq.models``.
"""

from __future__ import annotations

from ditq.diffusion.gaussian import GaussianDiffusion, LossType, ModelMeanType, ModelVarType
from ditq.diffusion.respace import SpacedDiffusion, space_timesteps
from ditq.diffusion.samplers import (
    ClassifierFreeGuidance,
    ddim_sample_loop,
    p_sample_loop,
    sample_loop,
    sample_loop_progressive,
)
from ditq.diffusion.schedules import get_named_beta_schedule


def create_diffusion(
    timestep_respacing: str | list[int] | None = None,
    noise_schedule: str = "linear",
    use_kl: bool = False,
    sigma_small: bool = False,
    predict_xstart: bool = False,
    learn_sigma: bool = True,
    rescale_learned_sigmas: bool = False,
    diffusion_steps: int = 1000,
) -> SpacedDiffusion:
    """DiT's ``create_diffusion``: ``""``/``None`` for all steps, ``"250"``, ``"ddim50"``, ..."""
    betas = get_named_beta_schedule(noise_schedule, diffusion_steps)
    if use_kl:
        loss_type = LossType.RESCALED_KL
    elif rescale_learned_sigmas:
        loss_type = LossType.RESCALED_MSE
    else:
        loss_type = LossType.MSE
    if timestep_respacing is None or timestep_respacing == "":
        timestep_respacing = [diffusion_steps]
    if learn_sigma:
        var_type = ModelVarType.LEARNED_RANGE
    else:
        var_type = ModelVarType.FIXED_SMALL if sigma_small else ModelVarType.FIXED_LARGE
    return SpacedDiffusion(
        use_timesteps=space_timesteps(diffusion_steps, timestep_respacing),
        betas=betas,
        model_mean_type=ModelMeanType.START_X if predict_xstart else ModelMeanType.EPSILON,
        model_var_type=var_type,
        loss_type=loss_type,
    )


__all__ = [
    "ClassifierFreeGuidance",
    "GaussianDiffusion",
    "LossType",
    "ModelMeanType",
    "ModelVarType",
    "SpacedDiffusion",
    "create_diffusion",
    "ddim_sample_loop",
    "get_named_beta_schedule",
    "p_sample_loop",
    "sample_loop",
    "sample_loop_progressive",
    "space_timesteps",
]
