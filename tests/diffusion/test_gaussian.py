import math

import numpy as np
import pytest
import torch

from ditq.diffusion import (
    ClassifierFreeGuidance,
    GaussianDiffusion,
    create_diffusion,
    get_named_beta_schedule,
    sample_loop,
    space_timesteps,
)
from ditq.diffusion.gaussian import normal_kl
from ditq.errors import InvalidArgumentError


def test_linear_schedule_endpoints_and_scaling():
    b = get_named_beta_schedule("linear", 1000)
    assert b.dtype == np.float64 and b[0] == 1e-4 and math.isclose(b[-1], 0.02)
    b100 = get_named_beta_schedule("linear", 100)
    assert math.isclose(b100[0], 1e-3) and math.isclose(b100[-1], 0.2)


def test_cosine_schedule():
    b = get_named_beta_schedule("cosine", 1000)
    assert b.shape == (1000,) and b.max() <= 0.999 and np.all(np.diff(b) >= 0)
    ac = np.cumprod(1 - b)
    f = lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
    assert math.isclose(ac[499], f(0.5) / f(0.0), rel_tol=1e-9)


def test_unknown_schedule_is_a_clear_error():
    with pytest.raises(InvalidArgumentError, match="unknown noise schedule 'quad'"):
        get_named_beta_schedule("quad", 1000)


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


def test_q_sample_statistics():
    d = create_diffusion("")
    x0 = torch.full((20000,), 0.5)
    t = torch.full((20000,), 300)
    xt = d.q_sample(x0, t)
    a = d.alphas_cumprod[300]
    assert abs(xt.mean().item() - math.sqrt(a) * 0.5) < 0.02
    assert abs(xt.var().item() - (1 - a)) < 0.02


def test_normal_kl_zero_for_equal_gaussians():
    m, lv = torch.randn(5), torch.randn(5)
    assert normal_kl(m, lv, m, lv).abs().max() < 1e-6


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


def test_training_loss_hybrid_and_gradient_stop():
    d = create_diffusion("")
    w = torch.zeros(2, requires_grad=True)

    def model(x, t):  # eps channel and sigma channel each owned by one weight
        return torch.cat([w[0] * x, w[1] * torch.ones_like(x)], dim=1)

    x0 = torch.rand(4, 1, 2, 2) * 2 - 1
    terms = d.training_losses(model, x0, torch.tensor([0, 10, 500, 999]))
    torch.testing.assert_close(terms["loss"], terms["mse"] + terms["vb"])
    terms["vb"].sum().backward()
    assert w.grad[0] == 0 and w.grad[1] != 0  # the VB term trains the variance only


def test_fixed_variance_and_kl_losses_run():
    for kwargs in ({"learn_sigma": False}, {"learn_sigma": False, "sigma_small": True}, {"use_kl": True}):
        d = create_diffusion("", **kwargs)
        c = 2 if kwargs.get("use_kl") else 1
        terms = d.training_losses(
            lambda x, t, c=c: torch.zeros(x.shape[0], c, *x.shape[2:]),
            torch.zeros(2, 1, 2, 2),
            torch.tensor([0, 5]),
        )
        assert torch.isfinite(terms["loss"]).all()


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


def test_fixed_large_variance_matches_definition():
    d = create_diffusion("", learn_sigma=False)
    assert d.fixed_large_variance[0] == d.posterior_variance[1]
    assert np.array_equal(d.fixed_large_variance[1:], d.betas[1:])
