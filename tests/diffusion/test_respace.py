"""Respacing (ditq.diffusion.respace): which timesteps a spacing keeps, the respaced process keeps
the original's alphas_cumprod, and the model sees the original timesteps."""

import numpy as np
import pytest
import torch

from ditq.diffusion import create_diffusion, sample_loop, space_timesteps
from ditq.errors import InvalidArgumentError


def test_space_timesteps():
    assert space_timesteps(1000, "ddim50") == set(range(0, 1000, 20))
    kept = sorted(space_timesteps(1000, "250"))
    assert len(kept) == 250 and kept[0] == 0 and kept[-1] == 999
    assert sorted(space_timesteps(100, "1,2")) == [0, 50, 99]
    with pytest.raises(InvalidArgumentError, match="exactly 7 DDIM steps"):
        space_timesteps(10, "ddim7")
    with pytest.raises(InvalidArgumentError):
        space_timesteps(10, "eleven")
    with pytest.raises(InvalidArgumentError):
        space_timesteps(10, "20")


def test_respaced_process_keeps_alphas_cumprod():
    base, spaced = create_diffusion(""), create_diffusion("ddim50")
    np.testing.assert_allclose(spaced.alphas_cumprod, base.alphas_cumprod[spaced.timestep_map], rtol=1e-12)


def test_respaced_model_sees_original_timesteps():
    seen = []

    def model(x, t):
        seen.append(t.tolist())
        return torch.zeros(x.shape[0], 2 * x.shape[1], *x.shape[2:])

    d = create_diffusion("ddim10")
    sample_loop(d, model, (1, 1, 2, 2), sampler="ddim")
    assert [s[0] for s in seen] == list(range(900, -1, -100))
