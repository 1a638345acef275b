"""The sampling loops and guidance (ditq.diffusion.samplers): DDPM and DDIM recover a known point,
seeded and eta-controlled randomness, classifier-free guidance on every eps channel."""

import pytest
import torch

from ditq.diffusion import ClassifierFreeGuidance, GaussianDiffusion, create_diffusion, sample_loop


def _oracle_model(x0: torch.Tensor):
    """A model that knows the data point: predicts the exact eps for x_t (t on the 1000-step scale)."""
    diffusion: GaussianDiffusion = create_diffusion("")

    def model(x, t):
        eps = diffusion._predict_eps_from_xstart(x, t, x0.expand_as(x))
        return torch.cat([eps, torch.zeros_like(eps)], dim=1)

    return model


@pytest.mark.parametrize("sampler,spacing", [("ddpm", "50"), ("ddim", "ddim20")])
def test_samplers_recover_a_known_point(sampler, spacing):
    d = create_diffusion(spacing)
    x0 = torch.tensor([0.3, -0.7]).view(1, 2, 1, 1)
    out = sample_loop(
        d, _oracle_model(x0), (3, 2, 1, 1), sampler=sampler, generator=torch.Generator().manual_seed(1)
    )
    torch.testing.assert_close(out, x0.expand(3, 2, 1, 1), atol=1e-4, rtol=0)


def test_generator_makes_sampling_reproducible():
    d = create_diffusion("20")
    model = lambda x, t: torch.cat([0.1 * x, torch.zeros_like(x)], dim=1)
    a = sample_loop(d, model, (2, 1, 4, 4), generator=torch.Generator().manual_seed(7))
    b = sample_loop(d, model, (2, 1, 4, 4), generator=torch.Generator().manual_seed(7))
    c = sample_loop(d, model, (2, 1, 4, 4), generator=torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_ddim_eta_one_is_stochastic_eta_zero_is_not():
    d = create_diffusion("ddim10")
    model = lambda x, t: torch.cat([0.1 * x, torch.zeros_like(x)], dim=1)
    noise = torch.randn(1, 1, 4, 4)
    runs = [
        sample_loop(
            d,
            model,
            noise.shape,
            sampler="ddim",
            noise=noise,
            eta=eta,
            generator=torch.Generator().manual_seed(s),
        )
        for eta, s in [(0.0, 1), (0.0, 2), (1.0, 1), (1.0, 2)]
    ]
    assert torch.equal(runs[0], runs[1]) and not torch.equal(runs[2], runs[3])


def test_guidance_wrapper_guides_all_eps_channels():
    def model(x, t, y):
        return torch.cat(
            [y.float().view(-1, 1, 1, 1).expand(-1, 2, 1, 1), torch.zeros(len(x), 2, 1, 1)], dim=1
        )

    g = ClassifierFreeGuidance(model, scale=3.0)
    out = g(torch.zeros(4, 2, 1, 1), torch.zeros(4, dtype=torch.long), torch.tensor([2, 2, 10, 10]))
    # uncond + 3 * (cond - uncond) = 10 + 3 * (2 - 10) = -14 on both eps channels, both halves
    assert torch.equal(out[:, :2].flatten(), torch.full((8,), -14.0))


def test_one_step_process_samples():
    d = create_diffusion("1")
    model = lambda x, t: torch.zeros(x.shape[0], 2 * x.shape[1], *x.shape[2:])
    out = sample_loop(d, model, (2, 1, 2, 2), generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(out).all()
