"""The activation quantizer of a quantized linear: dynamic (per token or token group) or static (calibrated).

Its numbers are those of :mod:`ditq.quant.primitives` (Q-DiT's quantizer) bit
for bit; :class:`~ditq.quant.nn.QuantLinear` fake-quantizes its input with it,
and its integer path quantizes by the same rule.
"""

from __future__ import annotations

import torch
from torch import nn

from ditq.errors import InvalidArgumentError
from ditq.quant.config import PER_TENSOR, check_a_bits, check_a_group
from ditq.quant.granularity import PerTensor, PerToken, act_granularity, group_length, num_groups
from ditq.quant.primitives import dequantize, fake_quantize, quant_params, quantize


class ActQuantizer(nn.Module):
    """Fake-quantizes a layer input: dynamic (per token / token group, every call) or static (calibrated).

    ``bits=None`` is the identity. Dynamic parameters depend on the input only,
    so each sample and timestep gets its own; there is no state. Static ranges
    are shared by all tokens: one for the whole tensor (``group`` 0 or -1) or
    one per block of ``group`` channels; they are recorded as a running
    min/max while ``calibrating`` is True (the input passes through unchanged
    then) and fixed afterwards (see :func:`ditq.quant.api.calibrate`).
    """

    def __init__(
        self,
        bits: int | None = 8,
        group: int = 0,
        sym: bool = False,
        dynamic: bool = True,
        channels: int | None = None,
        *,
        layer: str | None = None,
        device=None,
    ):
        super().__init__()
        self.bits = check_a_bits(bits, "activation ")
        self.group = check_a_group(group, "activation ")
        self.sym = sym
        self.dynamic = dynamic
        self.channels = channels
        self.layer = layer  # for error messages only
        self.calibrating = False
        self._observed = False
        if self.bits is not None and channels is not None:
            num_groups(self._granularity(), channels, layer=layer)  # one-line error if g does not divide
        if self.bits is not None and not dynamic:
            if channels is None:
                raise InvalidArgumentError("a static activation quantizer needs the number of input channels")
            n = self.n_static_groups
            self.register_buffer("lo", torch.full((n,), float("inf"), device=device))
            self.register_buffer("hi", torch.full((n,), float("-inf"), device=device))

    def _granularity(self):
        if self.group == PER_TENSOR or (not self.dynamic and self.group == 0):
            return PerTensor()
        return act_granularity(self.group)

    @property
    def n_static_groups(self) -> int:
        g = group_length(self._granularity(), self.channels, layer=self.layer)
        return 1 if g is None else self.channels // g

    @property
    def calibrated(self) -> bool:
        """A static quantizer that has seen data (or loaded ranges); dynamic ones always are."""
        return self.dynamic or self.bits is None or self._observed

    def reset(self) -> None:
        """Forget the recorded static ranges."""
        if hasattr(self, "lo"):
            self.lo.fill_(float("inf"))
            self.hi.fill_(float("-inf"))
        self._observed = False

    @torch.no_grad()
    def observe(self, x: torch.Tensor) -> None:
        """Widen the static ranges to cover ``x``."""
        n = self.n_static_groups
        xg = x.detach().reshape(-1, n, x.shape[-1] // n).to(self.lo.dtype)
        self.lo.copy_(torch.minimum(self.lo, xg.amin(dim=(0, 2))))
        self.hi.copy_(torch.maximum(self.hi, xg.amax(dim=(0, 2))))
        self._observed = True

    def _static_params(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if not self._observed:
            where = f" of layer {self.layer!r}" if self.layer else ""
            raise InvalidArgumentError(
                f"the static activation quantizer{where} has no calibrated range; run calibration data "
                f"through the model inside `with ditq.quant.calibrate(model):` first"
            )
        # Q-DiT's rule on the recorded (min, max) of each group: rows [lo, hi] give the same
        # scale/zero as the min-max of the data they summarize.
        ends = torch.stack([self.lo, self.hi], dim=-1).to(x.dtype)  # [n, 2]
        scale, zero = quant_params(ends, self.bits, PerToken(), self.sym, check_finite=False)  # [n, 1]
        shape = (1,) * (x.dim() - 1) + (-1,)
        return scale.reshape(shape), zero.reshape(shape)

    def params(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The (scale, zero) this quantizer applies to ``x`` (shaped as in :mod:`ditq.quant.primitives`)."""
        if self.bits is None:
            raise InvalidArgumentError(
                "this activation quantizer is the identity (bits=None): it has no parameters"
            )
        if self.dynamic:
            return quant_params(x, self.bits, self._granularity(), self.sym, check_finite=False)
        return self._static_params(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.bits is None:
            return x
        if not self.dynamic:
            if self.calibrating:
                self.observe(x)
                return x
            scale, zero = self._static_params(x)
            return dequantize(quantize(x, scale, zero, self.bits, self.sym), scale, zero)
        # check_finite=False: the NaN/inf check is a device sync per layer and call.
        return fake_quantize(x, self.bits, self._granularity(), self.sym, check_finite=False)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if hasattr(self, "lo") and prefix + "lo" in state_dict:
            # Loaded ranges count as calibrated when they hold data (one sync, at load time only).
            self._observed = bool(torch.isfinite(self.lo).all() and torch.isfinite(self.hi).all())

    def extra_repr(self) -> str:
        if self.bits is None:
            return "bits=None (float)"
        mode = "dynamic" if self.dynamic else "static" + (", calibrating" if self.calibrating else "")
        return f"bits={self.bits}, {self._granularity()}, sym={self.sym}, {mode}"
