"""Gaussian diffusion as DiT uses it (ADM / improved DDPM), model-agnostic.

All per-timestep constants are float64 numpy arrays; they are indexed by the
timestep, then cast to float32, exactly as the original does, so results agree
with it to float rounding. ``model`` is any callable ``model(x, t, **kwargs)``.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Callable

import numpy as np
import torch

ModelFn = Callable[..., torch.Tensor]


class ModelMeanType(enum.Enum):
    """What the network predicts."""

    PREVIOUS_X = enum.auto()  # x_{t-1}
    START_X = enum.auto()  # x_0
    EPSILON = enum.auto()  # the noise


class ModelVarType(enum.Enum):
    """How the reverse-step variance is obtained."""

    LEARNED = enum.auto()  # the network outputs log-variance
    FIXED_SMALL = enum.auto()  # posterior variance beta~_t
    FIXED_LARGE = enum.auto()  # beta_t
    LEARNED_RANGE = enum.auto()  # the network interpolates between the two (DiT)


class LossType(enum.Enum):
    MSE = enum.auto()  # MSE, plus the VB term when the variance is learned (hybrid loss)
    RESCALED_MSE = enum.auto()  # same, VB scaled by T/1000
    KL = enum.auto()  # the variational bound alone
    RESCALED_KL = enum.auto()

    def is_vb(self) -> bool:
        return self in (LossType.KL, LossType.RESCALED_KL)


def mean_flat(tensor: torch.Tensor) -> torch.Tensor:
    """Mean over every dimension but the batch."""
    return tensor.mean(dim=list(range(1, tensor.ndim)))


_TABLE_CACHE: dict[tuple[int, torch.device], tuple[np.ndarray, torch.Tensor]] = {}


def _table(arr: np.ndarray, device: torch.device) -> torch.Tensor:
    """``arr`` as a float64 tensor on ``device``, copied once per (array, device), not per step."""
    key = (id(arr), device)
    hit = _TABLE_CACHE.get(key)
    if hit is None or hit[0] is not arr:  # the id of a freed array can be reused: check identity
        if len(_TABLE_CACHE) > 256:
            _TABLE_CACHE.clear()
        hit = _TABLE_CACHE[key] = (arr, torch.from_numpy(arr).to(device))
    return hit[1]


def extract(arr: np.ndarray, timesteps: torch.Tensor, broadcast_shape: torch.Size) -> torch.Tensor:
    """``arr[timesteps]`` as float32, broadcast to ``broadcast_shape`` (batch first).

    Indexing happens in float64 and the cast comes after, as in the original.
    """
    res = _table(arr, timesteps.device)[timesteps].float()
    while res.ndim < len(broadcast_shape):
        res = res[..., None]
    return res + torch.zeros(broadcast_shape, device=timesteps.device)


def normal_kl(mean1, logvar1, mean2, logvar2) -> torch.Tensor:
    """KL(N(mean1, exp logvar1) || N(mean2, exp logvar2)), elementwise, in nats."""
    tensor = next(x for x in (mean1, logvar1, mean2, logvar2) if isinstance(x, torch.Tensor))
    logvar1, logvar2 = (
        x if isinstance(x, torch.Tensor) else torch.tensor(x).to(tensor) for x in (logvar1, logvar2)
    )
    return 0.5 * (
        -1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + ((mean1 - mean2) ** 2) * torch.exp(-logvar2)
    )


def approx_standard_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    """A fast approximation of the standard normal CDF (the one ADM uses)."""
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3))))


def discretized_gaussian_log_likelihood(
    x: torch.Tensor, *, means: torch.Tensor, log_scales: torch.Tensor
) -> torch.Tensor:
    """Log-likelihood of data in [-1, 1] discretized to 256 bins under N(means, exp(log_scales)^2)."""
    centered_x = x - means
    inv_stdv = torch.exp(-log_scales)
    cdf_plus = approx_standard_normal_cdf(inv_stdv * (centered_x + 1.0 / 255.0))
    cdf_min = approx_standard_normal_cdf(inv_stdv * (centered_x - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    cdf_delta = cdf_plus - cdf_min
    return torch.where(
        x < -0.999,
        log_cdf_plus,
        torch.where(x > 0.999, log_one_minus_cdf_min, torch.log(cdf_delta.clamp(min=1e-12))),
    )


def split_learned_variance(model_output: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Split a (B, 2C, ...) output into the mean part and the variance values, checking the shape."""
    B, C = x.shape[:2]
    expected = (B, C * 2, *x.shape[2:])
    if model_output.shape != expected:
        raise ValueError(f"a learned-variance model must output {expected}, got {tuple(model_output.shape)}")
    return torch.split(model_output, C, dim=1)


class GaussianDiffusion:
    """The forward process, the learned reverse step, and the training losses."""

    def __init__(
        self,
        *,
        betas: np.ndarray,
        model_mean_type: ModelMeanType = ModelMeanType.EPSILON,
        model_var_type: ModelVarType = ModelVarType.LEARNED_RANGE,
        loss_type: LossType = LossType.MSE,
    ):
        self.model_mean_type = model_mean_type
        self.model_var_type = model_var_type
        self.loss_type = loss_type

        betas = np.array(betas, dtype=np.float64)
        if betas.ndim != 1 or not ((betas > 0).all() and (betas <= 1).all()):
            raise ValueError("betas must be a 1-D array in (0, 1]")
        self.betas = betas
        self.num_timesteps = int(betas.shape[0])

        alphas = 1.0 - betas
        self.alphas_cumprod = np.cumprod(alphas, axis=0)
        self.alphas_cumprod_prev = np.append(1.0, self.alphas_cumprod[:-1])
        self.alphas_cumprod_next = np.append(self.alphas_cumprod[1:], 0.0)

        # q(x_t | x_0)
        self.sqrt_alphas_cumprod = np.sqrt(self.alphas_cumprod)
        self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - self.alphas_cumprod)
        self.log_one_minus_alphas_cumprod = np.log(1.0 - self.alphas_cumprod)
        self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod)
        self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod - 1)

        # q(x_{t-1} | x_t, x_0)
        self.posterior_variance = betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        # The posterior variance is 0 at t = 0: its log is clipped to the value at t = 1.
        # A one-step process has no t = 1; its only step then uses beta (the original
        # leaves the array empty and fails on the first step).
        self.posterior_log_variance_clipped = (
            np.log(np.append(self.posterior_variance[1], self.posterior_variance[1:]))
            if len(self.posterior_variance) > 1
            else np.log(betas)
        )
        self.posterior_mean_coef1 = betas * np.sqrt(self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        self.posterior_mean_coef2 = (
            (1.0 - self.alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - self.alphas_cumprod)
        )

        # Derived tables, computed once here rather than on every step.
        self.one_minus_alphas_cumprod = 1.0 - self.alphas_cumprod
        self.log_betas = np.log(betas)
        # FIXED_LARGE: beta_t, with the posterior variance at t = 0 for a better decoder likelihood.
        self.fixed_large_variance = (
            np.append(self.posterior_variance[1:2], betas[1:]) if len(betas) > 1 else betas
        )
        self.fixed_large_log_variance = np.log(self.fixed_large_variance)
        with np.errstate(divide="ignore"):
            self.recip_posterior_mean_coef1 = 1.0 / self.posterior_mean_coef1
            self.posterior_mean_coef2_over_coef1 = self.posterior_mean_coef2 / self.posterior_mean_coef1

    # ------------------------------------------------------------------ forward process
    def q_mean_variance(self, x_start: torch.Tensor, t: torch.Tensor):
        """Mean, variance and log-variance of q(x_t | x_0)."""
        mean = extract(self.sqrt_alphas_cumprod, t, x_start.shape) * x_start
        variance = extract(self.one_minus_alphas_cumprod, t, x_start.shape)
        log_variance = extract(self.log_one_minus_alphas_cumprod, t, x_start.shape)
        return mean, variance, log_variance

    def q_sample(
        self, x_start: torch.Tensor, t: torch.Tensor, noise: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Diffuse x_0 to x_t (one draw of q(x_t | x_0))."""
        if noise is None:
            noise = torch.randn_like(x_start)
        return (
            extract(self.sqrt_alphas_cumprod, t, x_start.shape) * x_start
            + extract(self.sqrt_one_minus_alphas_cumprod, t, x_start.shape) * noise
        )

    def q_posterior_mean_variance(self, x_start: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor):
        """Mean, variance and clipped log-variance of q(x_{t-1} | x_t, x_0)."""
        mean = (
            extract(self.posterior_mean_coef1, t, x_t.shape) * x_start
            + extract(self.posterior_mean_coef2, t, x_t.shape) * x_t
        )
        variance = extract(self.posterior_variance, t, x_t.shape)
        log_variance = extract(self.posterior_log_variance_clipped, t, x_t.shape)
        return mean, variance, log_variance

    def _predict_xstart_from_eps(self, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        return (
            extract(self.sqrt_recip_alphas_cumprod, t, x_t.shape) * x_t
            - extract(self.sqrt_recipm1_alphas_cumprod, t, x_t.shape) * eps
        )

    def _predict_eps_from_xstart(
        self, x_t: torch.Tensor, t: torch.Tensor, pred_xstart: torch.Tensor
    ) -> torch.Tensor:
        return (extract(self.sqrt_recip_alphas_cumprod, t, x_t.shape) * x_t - pred_xstart) / extract(
            self.sqrt_recipm1_alphas_cumprod, t, x_t.shape
        )

    # ------------------------------------------------------------------ reverse process
    def p_mean_variance(
        self,
        model: ModelFn,
        x: torch.Tensor,
        t: torch.Tensor,
        clip_denoised: bool = True,
        denoised_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
        model_kwargs: dict | None = None,
    ) -> dict:
        """Apply the model: p(x_{t-1} | x_t) as ``mean``, ``variance``, ``log_variance``, ``pred_xstart``."""
        model_kwargs = model_kwargs or {}
        if t.shape != (x.shape[0],):
            raise ValueError(f"t must have shape ({x.shape[0]},), got {tuple(t.shape)}")
        model_output = model(x, t, **model_kwargs)
        extra = None
        if isinstance(model_output, tuple):
            model_output, extra = model_output

        if self.model_var_type in (ModelVarType.LEARNED, ModelVarType.LEARNED_RANGE):
            model_output, model_var_values = split_learned_variance(model_output, x)
            if self.model_var_type == ModelVarType.LEARNED:
                model_log_variance = model_var_values
            else:
                min_log = extract(self.posterior_log_variance_clipped, t, x.shape)
                max_log = extract(self.log_betas, t, x.shape)
                frac = (model_var_values + 1) / 2  # the output in [-1, 1] -> [0, 1]
                model_log_variance = frac * max_log + (1 - frac) * min_log
            model_variance = torch.exp(model_log_variance)
        else:
            if self.model_var_type == ModelVarType.FIXED_LARGE:
                variance, log_variance = self.fixed_large_variance, self.fixed_large_log_variance
            else:
                variance, log_variance = self.posterior_variance, self.posterior_log_variance_clipped
            model_variance = extract(variance, t, x.shape)
            model_log_variance = extract(log_variance, t, x.shape)

        def process_xstart(x0: torch.Tensor) -> torch.Tensor:
            if denoised_fn is not None:
                x0 = denoised_fn(x0)
            return x0.clamp(-1, 1) if clip_denoised else x0

        if self.model_mean_type == ModelMeanType.START_X:
            pred_xstart = process_xstart(model_output)
        elif self.model_mean_type == ModelMeanType.EPSILON:
            pred_xstart = process_xstart(self._predict_xstart_from_eps(x_t=x, t=t, eps=model_output))
        else:  # PREVIOUS_X: invert the posterior mean
            pred_xstart = process_xstart(
                extract(self.recip_posterior_mean_coef1, t, x.shape) * model_output
                - extract(self.posterior_mean_coef2_over_coef1, t, x.shape) * x
            )
        model_mean, _, _ = self.q_posterior_mean_variance(x_start=pred_xstart, x_t=x, t=t)
        if self.model_mean_type == ModelMeanType.PREVIOUS_X:
            model_mean = model_output
        return {
            "mean": model_mean,
            "variance": model_variance,
            "log_variance": model_log_variance,
            "pred_xstart": pred_xstart,
            "extra": extra,
        }

    def p_sample(
        self,
        model: ModelFn,
        x: torch.Tensor,
        t: torch.Tensor,
        clip_denoised: bool = True,
        denoised_fn=None,
        model_kwargs: dict | None = None,
        noise: torch.Tensor | None = None,
    ) -> dict:
        """One ancestral step x_t -> x_{t-1}; no noise is added at t = 0."""
        out = self.p_mean_variance(model, x, t, clip_denoised, denoised_fn, model_kwargs)
        if noise is None:
            noise = torch.randn_like(x)
        nonzero_mask = (t != 0).float().view(-1, *([1] * (x.ndim - 1)))
        sample = out["mean"] + nonzero_mask * torch.exp(0.5 * out["log_variance"]) * noise
        return {"sample": sample.to(x.dtype), "pred_xstart": out["pred_xstart"]}

    def ddim_sample(
        self,
        model: ModelFn,
        x: torch.Tensor,
        t: torch.Tensor,
        clip_denoised: bool = True,
        denoised_fn=None,
        model_kwargs: dict | None = None,
        eta: float = 0.0,
        noise: torch.Tensor | None = None,
    ) -> dict:
        """One DDIM step x_t -> x_{t-1}; ``eta = 0`` is deterministic, ``eta = 1`` is DDPM-like."""
        out = self.p_mean_variance(model, x, t, clip_denoised, denoised_fn, model_kwargs)
        # Re-derive eps from the (possibly clipped) x_0 prediction.
        eps = self._predict_eps_from_xstart(x, t, out["pred_xstart"])
        alpha_bar = extract(self.alphas_cumprod, t, x.shape)
        alpha_bar_prev = extract(self.alphas_cumprod_prev, t, x.shape)
        sigma = (
            eta
            * torch.sqrt((1 - alpha_bar_prev) / (1 - alpha_bar))
            * torch.sqrt(1 - alpha_bar / alpha_bar_prev)
        )
        # Drawn even when eta == 0, as the original does, so seeded runs consume the RNG alike.
        if noise is None:
            noise = torch.randn_like(x)
        mean_pred = (
            out["pred_xstart"] * torch.sqrt(alpha_bar_prev) + torch.sqrt(1 - alpha_bar_prev - sigma**2) * eps
        )
        nonzero_mask = (t != 0).float().view(-1, *([1] * (x.ndim - 1)))
        sample = mean_pred + nonzero_mask * sigma * noise
        return {"sample": sample.to(x.dtype), "pred_xstart": out["pred_xstart"]}

    # ------------------------------------------------------------------ training
    def _vb_terms_bpd(
        self, model: ModelFn, x_start, x_t, t, clip_denoised: bool = True, model_kwargs: dict | None = None
    ) -> dict:
        """The variational-bound term in bits per dimension (decoder NLL at t = 0, KL elsewhere)."""
        true_mean, _, true_log_variance_clipped = self.q_posterior_mean_variance(
            x_start=x_start, x_t=x_t, t=t
        )
        out = self.p_mean_variance(model, x_t, t, clip_denoised=clip_denoised, model_kwargs=model_kwargs)
        kl = normal_kl(true_mean, true_log_variance_clipped, out["mean"], out["log_variance"])
        kl = mean_flat(kl) / np.log(2.0)
        decoder_nll = -discretized_gaussian_log_likelihood(
            x_start, means=out["mean"], log_scales=0.5 * out["log_variance"]
        )
        decoder_nll = mean_flat(decoder_nll) / np.log(2.0)
        return {"output": torch.where(t == 0, decoder_nll, kl), "pred_xstart": out["pred_xstart"]}

    def training_losses(
        self,
        model: ModelFn,
        x_start: torch.Tensor,
        t: torch.Tensor,
        model_kwargs: dict | None = None,
        noise: torch.Tensor | None = None,
    ) -> dict:
        """Per-sample losses ``{"loss", "mse", "vb"}`` at timesteps ``t`` (hybrid loss for DiT)."""
        model_kwargs = model_kwargs or {}
        if noise is None:
            noise = torch.randn_like(x_start)
        x_t = self.q_sample(x_start, t, noise=noise)
        terms: dict[str, torch.Tensor] = {}

        if self.loss_type.is_vb():
            terms["loss"] = self._vb_terms_bpd(
                model, x_start, x_t, t, clip_denoised=False, model_kwargs=model_kwargs
            )["output"]
            if self.loss_type == LossType.RESCALED_KL:
                terms["loss"] = terms["loss"] * self.num_timesteps
            return terms

        model_output = model(x_t, t, **model_kwargs)
        if self.model_var_type in (ModelVarType.LEARNED, ModelVarType.LEARNED_RANGE):
            model_output, model_var_values = split_learned_variance(model_output, x_t)
            # The VB term learns the variance only: stop the gradient through the mean.
            frozen_out = torch.cat([model_output.detach(), model_var_values], dim=1)
            terms["vb"] = self._vb_terms_bpd(
                lambda *args, r=frozen_out: r, x_start, x_t, t, clip_denoised=False
            )["output"]
            if self.loss_type == LossType.RESCALED_MSE:
                # Divide by 1000 for equivalence with the initial implementation;
                # without it the VB term hurts the MSE term.
                terms["vb"] = terms["vb"] * (self.num_timesteps / 1000.0)

        target = {
            ModelMeanType.PREVIOUS_X: lambda: self.q_posterior_mean_variance(x_start, x_t, t)[0],
            ModelMeanType.START_X: lambda: x_start,
            ModelMeanType.EPSILON: lambda: noise,
        }[self.model_mean_type]()
        terms["mse"] = mean_flat((target - model_output) ** 2)
        terms["loss"] = terms["mse"] + terms["vb"] if "vb" in terms else terms["mse"]
        return terms
