"""Noise schedules: betas for T steps, in float64 (as ADM / DiT compute them)."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

from ditq.errors import InvalidArgumentError


def linear_betas(num_timesteps: int) -> np.ndarray:
    """Linear betas from 1e-4 to 0.02, scaled by 1000/T so any T spans the same process."""
    scale = 1000 / num_timesteps
    return np.linspace(scale * 0.0001, scale * 0.02, num_timesteps, dtype=np.float64)


def betas_for_alpha_bar(
    num_timesteps: int, alpha_bar: Callable[[float], float], max_beta: float = 0.999
) -> np.ndarray:
    """Betas that discretize a continuous cumulative product ``alpha_bar(t)``, t in [0, 1]."""
    betas = []
    for i in range(num_timesteps):
        t1, t2 = i / num_timesteps, (i + 1) / num_timesteps
        betas.append(min(1 - alpha_bar(t2) / alpha_bar(t1), max_beta))
    return np.array(betas, dtype=np.float64)


def cosine_betas(num_timesteps: int) -> np.ndarray:
    """The cosine schedule of improved DDPM (Nichol & Dhariwal), s = 0.008."""
    return betas_for_alpha_bar(num_timesteps, lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2)


SCHEDULES: dict[str, Callable[[int], np.ndarray]] = {"linear": linear_betas, "cosine": cosine_betas}


def get_named_beta_schedule(name: str, num_timesteps: int) -> np.ndarray:
    """Betas of the schedule called ``name`` ("linear" or "cosine")."""
    if name not in SCHEDULES:
        raise InvalidArgumentError(f"unknown noise schedule '{name}'; known: {', '.join(SCHEDULES)}")
    if num_timesteps < 1:
        raise InvalidArgumentError(f"diffusion steps must be positive, got {num_timesteps}")
    return SCHEDULES[name](num_timesteps)
