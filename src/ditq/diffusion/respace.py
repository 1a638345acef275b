"""Respacing: run a T-step process on a subset of its timesteps (``"250"``, ``"ddim50"``)."""

from __future__ import annotations

import numpy as np
import torch

from ditq.diffusion.gaussian import GaussianDiffusion, ModelFn
from ditq.errors import InvalidArgumentError


def space_timesteps(num_timesteps: int, section_counts: str | list[int]) -> set[int]:
    """Which of the original ``num_timesteps`` steps to keep.

    ``"250"`` keeps 250 evenly spaced steps (rounded positions, first and last
    kept); ``"10,15,20"`` splits the process in three equal sections and keeps
    that many steps in each; ``"ddim50"`` keeps ``range(0, T, stride)`` for the
    integer stride that gives exactly 50 steps, as the DDIM paper does.
    """
    if isinstance(section_counts, str):
        if section_counts.startswith("ddim"):
            try:
                desired_count = int(section_counts[len("ddim") :])
            except ValueError:
                raise InvalidArgumentError(
                    f"bad respacing '{section_counts}': expected e.g. 'ddim50'"
                ) from None
            for stride in range(1, num_timesteps):
                if len(range(0, num_timesteps, stride)) == desired_count:
                    return set(range(0, num_timesteps, stride))
            raise InvalidArgumentError(
                f"cannot take exactly {desired_count} DDIM steps from {num_timesteps} with an integer stride"
            )
        try:
            section_counts = [int(x) for x in section_counts.split(",")]
        except ValueError:
            raise InvalidArgumentError(
                f"bad respacing '{section_counts}': expected a count ('250'), a list ('10,20') or 'ddimN'"
            ) from None
    if any(c < 1 for c in section_counts):
        raise InvalidArgumentError(f"step counts must be positive, got {section_counts}")
    size_per = num_timesteps // len(section_counts)
    extra = num_timesteps % len(section_counts)
    start_idx = 0
    all_steps: list[int] = []
    for i, section_count in enumerate(section_counts):
        size = size_per + (1 if i < extra else 0)
        if size < section_count:
            raise InvalidArgumentError(f"cannot take {section_count} steps from a section of {size} steps")
        frac_stride = 1 if section_count <= 1 else (size - 1) / (section_count - 1)
        cur_idx = 0.0
        for _ in range(section_count):
            all_steps.append(start_idx + round(cur_idx))
            cur_idx += frac_stride
        start_idx += size
    return set(all_steps)


class _TimestepMappedModel:
    """Calls ``model`` with the original timestep of each respaced index (no rescaling, as DiT)."""

    def __init__(self, model: ModelFn, timestep_map: torch.Tensor):
        self.model = model
        self.timestep_map = timestep_map

    def __call__(self, x: torch.Tensor, ts: torch.Tensor, **kwargs):
        map_tensor = self.timestep_map.to(device=ts.device, dtype=ts.dtype)
        return self.model(x, map_tensor[ts], **kwargs)


class SpacedDiffusion(GaussianDiffusion):
    """A diffusion that keeps some steps of a base process; betas come from the kept alphas_cumprod."""

    def __init__(self, use_timesteps: set[int] | list[int], *, betas: np.ndarray, **kwargs):
        self.use_timesteps = set(use_timesteps)
        base = GaussianDiffusion(betas=betas, **kwargs)
        self.original_num_steps = base.num_timesteps
        timestep_map: list[int] = []
        new_betas = []
        last_alpha_cumprod = 1.0
        for i, alpha_cumprod in enumerate(base.alphas_cumprod):
            if i in self.use_timesteps:
                new_betas.append(1 - alpha_cumprod / last_alpha_cumprod)
                last_alpha_cumprod = alpha_cumprod
                timestep_map.append(i)
        self.timestep_map = timestep_map
        super().__init__(betas=np.array(new_betas), **kwargs)

    def _wrap(self, model: ModelFn) -> ModelFn:
        if isinstance(model, _TimestepMappedModel):
            return model
        return _TimestepMappedModel(model, torch.tensor(self.timestep_map, dtype=torch.long))

    def p_mean_variance(self, model, *args, **kwargs):
        return super().p_mean_variance(self._wrap(model), *args, **kwargs)

    def training_losses(self, model, *args, **kwargs):
        return super().training_losses(self._wrap(model), *args, **kwargs)
