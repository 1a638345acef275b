"""The Gaussian diffusion process (ditq.diffusion.gaussian): forward noising, KL, training losses (hybrid,
fixed variance, KL) and the fixed variances."""

import math

import numpy as np
import torch

from ditq.diffusion import create_diffusion
from ditq.diffusion.gaussian import normal_kl


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


def test_fixed_large_variance_matches_definition():
    d = create_diffusion("", learn_sigma=False)
    assert d.fixed_large_variance[0] == d.posterior_variance[1]
    assert np.array_equal(d.fixed_large_variance[1:], d.betas[1:])
