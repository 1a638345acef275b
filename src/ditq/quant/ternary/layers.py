"""Ternary layers (TerDiT, BitNet b1.58): the QAT layer with latent weights, and the packed 2-bit one.

::

    from ditq import quant
    quant.quantize_(model, quant.TernaryQATConfig(step="prepare"))   # nn.Linear -> TernaryQATLinear
    ...train...                                                       # latent float weights learn
    quant.quantize_(model, quant.TernaryQATConfig(step="convert"))   # -> TernaryLinear (2 bits/weight)

**Ternarization** (absmean): ``γ = mean|W|`` over the whole tensor,
``W̃ = clamp(round(W / (γ + ε)), -1, 1)`` with ``ε = 1e-6``; the layer computes
``y = x · (s·W̃)ᵀ + b`` with one scalar ``s`` per layer:

* ``scale="alpha"`` (TerDiT): ``s = α``, a learnable parameter (state-dict key
  ``alphas``, shape (1,), as in official TerDiT checkpoints);
* ``scale="gamma"`` (BitNet b1.58): ``s = γ``, recomputed from the latent
  weights at every step, nothing to learn.

**Gradients** go straight through the ternarizer, as in the originals
(BitNet's ``w + (q(w) - w).detach()``): its Jacobian is taken as the identity,
so with ``G = dL/d(sW̃)`` the latent weights get ``dL/dW = α·G`` (alpha) or
``G`` (gamma, where γ is treated as a constant), and ``dL/dα = Σ G ⊙ W̃``.
Latent weights stay in floating point and are what the optimizer updates.

**α initialization** (``alpha_init``):

* ``"lsq"`` (default): the least-squares scale ``α = ⟨W, W̃⟩ / ⟨W̃, W̃⟩``, which
  is the mean of ``|W|`` over the entries that stay non-zero. It minimizes
  ``‖W − αW̃‖_F``, and so the expected output error ``E‖Wx − αW̃x‖²`` for
  inputs with isotropic second moment (``E[xxᵀ] ∝ I``): the ternary layer
  starts as the closest scaled copy of the float layer. It is never below γ
  (it averages the largest magnitudes); for Gaussian weights it is ≈ 1.34·γ,
  so ``"gamma"`` starts every layer's output about 25 % too small, which
  compounds over depth.
* ``"gamma"``: ``α = γ`` at prepare time: the layer starts exactly as
  ``scale="gamma"`` would compute it (BitNet's scale), then α is free.
* ``"normal"``: ``α ~ N(0, 1)``, the original TerDiT code's init. It ignores
  the weights' scale (and may be negative), which is what makes early
  activations huge there; kept to reproduce it.

A layer whose weights are all zero (adaLN-Zero) has no scale to match; its α
starts at ``1/√in_features`` (the scale of a fan-in initialized layer) so
gradients reach its weights (``dL/dW = α·G`` would stay zero with ``α = 0``).

**Activations** (``act_bits=8``, W1.58A8): BitNet b1.58's per-token absmax
int8 fake quantization ``s = 127 / max(|x|, 1e-5)`` over the last dim,
``x̂ = clamp(round(x·s), -128, 127) / s``, with a straight-through gradient.
TerDiT itself keeps activations in floating point (``act_bits=None``).

**Inference**: :class:`TernaryLinear` holds the ternary codes ``W̃ + 1`` packed
four per byte in ``ditq.kernels.packing``'s ``"k4"`` layout (``weight``, uint8
``[out, in/4]``), the scale ``s`` as ``alphas`` (γ for BitNet-style layers),
and the bias. In eval mode (no gradient wanted) it runs the integer ops of
:mod:`ditq.kernels` on the packed weights: ``act_bits=8`` quantizes the input
per token (``quantize_per_token_int8``, the same codes as the fake
quantization) and calls ``w158a8_linear`` (int32 accumulation, then
``acc · x_scale · s + b``); ``act_bits=None`` calls ``ternary_linear``
(weight-only, bit for bit the float path). The float path (unpack, multiply
in floating point: the same numbers as the QAT layer in eval mode, bit for
bit) runs in training mode, with ``use_kernels = False`` (the exact
reference), and, under the ``"auto"`` kernel backend, where the op has no fast
implementation on the input's device. W1.58A8 through ``w158a8_linear``
differs from it by float rounding only (scales applied after an exact integer
sum instead of to each product; ~1e-6 relative). It also loads official
TerDiT tensors (``weight`` uint8 ``[out/4, in]`` in the ``"terdit"`` layout),
repacking them to ``"k4"``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ditq.errors import CheckpointError, InvalidArgumentError
from ditq.kernels import ops
from ditq.kernels.packing import PackingError, pack_ternary, packed_2bit_shape, unpack_2bit, unpack_ternary

EPS = 1e-6
"""ε in ``W / (γ + ε)``: keeps an all-zero weight from dividing by zero."""

LAYOUT = "k4"
"""Packed layout of :class:`TernaryLinear` weights (see :mod:`ditq.kernels.packing`)."""

SCALES = ("alpha", "gamma")
ALPHA_INITS = ("lsq", "gamma", "normal")
ACT_BITS = (None, 8)


def check_choice(name: str, value, choices) -> None:
    """A one-line error unless ``value`` is one of ``choices`` (``TernaryQATConfig.<name>`` in it)."""
    if value not in choices or isinstance(value, bool):
        shown = ", ".join(repr(c) for c in choices)
        raise InvalidArgumentError(f"TernaryQATConfig.{name} must be one of {shown}, got {value!r}")


# ----------------------------------------------------------------------------
# Ternarization and activation quantization (with straight-through gradients)
# ----------------------------------------------------------------------------


def absmean(w: torch.Tensor) -> torch.Tensor:
    """γ = mean |W| over the whole tensor, a float32 scalar (reduced in float32 for bf16 weights too)."""
    return w.detach().float().abs().mean()


def ternarize(w: torch.Tensor, eps: float = EPS) -> tuple[torch.Tensor, torch.Tensor]:
    """``(W̃, γ)``: ``W̃ = clamp(round(W / (γ + ε)), -1, 1)`` in ``w``'s dtype, and γ (float32 scalar)."""
    gamma = absmean(w)
    w_t = (w.detach().float() / (gamma + eps)).round().clamp(-1, 1)
    return w_t.to(w.dtype), gamma


class _TernarySTE(torch.autograd.Function):
    """Forward ``W̃`` (or ``γ·W̃``); backward the identity (straight through)."""

    @staticmethod
    def forward(ctx, w: torch.Tensor, eps: float, times_gamma: bool) -> torch.Tensor:
        w_t, gamma = ternarize(w, eps)
        return (gamma * w_t).to(w.dtype) if times_gamma else w_t

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None, None


def fake_quant_act_int8(x: torch.Tensor) -> torch.Tensor:
    """BitNet b1.58's per-token absmax int8 fake quantization (computed in float32, returned in x's dtype)."""
    xf = x.float()
    s = 127.0 / xf.abs().amax(dim=-1, keepdim=True).clamp(min=1e-5)
    return ((xf * s).round().clamp(-128, 127) / s).to(x.dtype)


class _ActSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return fake_quant_act_int8(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad


def act_quant(x: torch.Tensor, bits: int | None) -> torch.Tensor:
    """x fake-quantized to ``bits`` (8, per token, straight-through gradient), or x itself for None."""
    return x if bits is None else _ActSTE.apply(x)


def init_alpha(w: torch.Tensor, method: str = "lsq", eps: float = EPS) -> torch.Tensor:
    """The initial α (float32, shape (1,)) for latent weights ``w``; see the module doc for the methods."""
    if method not in ALPHA_INITS:
        raise InvalidArgumentError(f"alpha_init must be one of {', '.join(ALPHA_INITS)}, got {method!r}")
    if method == "normal":
        return torch.randn(1, device=w.device)
    if w.is_meta:
        raise InvalidArgumentError(
            f"alpha_init={method!r} reads the weights, which are on the meta device; load or initialize "
            "the model before step='prepare'"
        )
    w_t, gamma = ternarize(w, eps)
    w_t, wf = w_t.float(), w.detach().float()
    kept = (w_t * w_t).sum()
    if kept == 0:  # all-zero weights (adaLN-Zero): any α gives 0; keep gradients alive
        return torch.full((1,), 1.0 / math.sqrt(w.shape[-1]), device=w.device)
    alpha = gamma if method == "gamma" else (wf * w_t).sum() / kept
    return alpha.reshape(1)


# ----------------------------------------------------------------------------
# Modules
# ----------------------------------------------------------------------------


def _check_in_features(in_features: int, layer: str | None) -> None:
    if in_features % 4:
        where = f"layer {layer!r}: " if layer else ""
        raise InvalidArgumentError(
            f"{where}{in_features} input features is not a multiple of 4, which packed ternary weights "
            f"(layout {LAYOUT!r}, 4 inputs per byte) need; exclude the layer"
        )


class TernaryQATLinear(nn.Module):
    """A linear layer trained with ternary weights: latent float ``weight``, ``y = x·(s·W̃)ᵀ + b``.

    ``s`` is the learnable ``alphas`` (``scale="alpha"``, TerDiT) or γ = mean|W|
    (``scale="gamma"``, BitNet b1.58). ``act_bits=8`` fake-quantizes inputs
    per token to int8. Gradients pass straight through both quantizers.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        scale: str = "alpha",
        act_bits: int | None = None,
        eps: float = EPS,
        device=None,
        dtype=None,
    ):
        super().__init__()
        _check_in_features(in_features, None)
        check_choice("scale", scale, SCALES)
        check_choice("act_bits", act_bits, ACT_BITS)
        self.in_features, self.out_features = in_features, out_features
        self.scale, self.act_bits, self.eps = scale, act_bits, eps
        kw = {"device": device, "dtype": dtype}
        if scale == "alpha":
            self.alphas = nn.Parameter(torch.ones(1, **kw))
        else:
            self.register_parameter("alphas", None)
        self.weight = nn.Parameter(torch.empty(out_features, in_features, **kw))
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, **kw))
        else:
            self.register_parameter("bias", None)
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))  # nn.Linear's default

    @classmethod
    def from_float(
        cls,
        linear: nn.Linear,
        *,
        scale: str = "alpha",
        alpha_init: str = "lsq",
        act_bits: int | None = None,
        layer: str | None = None,
    ) -> TernaryQATLinear:
        """Wrap ``linear``'s own weight and bias Parameters (no copy) as latent weights."""
        _check_in_features(linear.in_features, layer)
        q = cls.__new__(cls)
        nn.Module.__init__(q)
        check_choice("scale", scale, SCALES)
        check_choice("alpha_init", alpha_init, ALPHA_INITS)
        check_choice("act_bits", act_bits, ACT_BITS)
        q.in_features, q.out_features = linear.in_features, linear.out_features
        q.scale, q.act_bits, q.eps = scale, act_bits, EPS
        if scale == "alpha":
            alpha = init_alpha(linear.weight, alpha_init)
            q.alphas = nn.Parameter(alpha.to(device=linear.weight.device, dtype=linear.weight.dtype))
        else:
            q.register_parameter("alphas", None)
        q.weight = linear.weight
        if linear.bias is not None:
            q.bias = linear.bias
        else:
            q.register_parameter("bias", None)
        return q.train(linear.training)  # the mode of the layer it replaces

    def effective_weight(self) -> torch.Tensor:
        """``s·W̃`` as the forward uses it (straight-through gradients to ``weight``, and to ``alphas``)."""
        if self.scale == "alpha":
            return self.alphas * _TernarySTE.apply(self.weight, self.eps, False)
        return _TernarySTE.apply(self.weight, self.eps, True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(act_quant(x, self.act_bits), self.effective_weight(), self.bias)

    @torch.no_grad()
    def ternary(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(W̃ as int8 [out, in], s as a (1,) tensor)``: what :class:`TernaryLinear` stores."""
        w_t, gamma = ternarize(self.weight, self.eps)
        s = self.alphas.detach().clone() if self.scale == "alpha" else gamma.reshape(1).to(self.weight.dtype)
        return w_t.to(torch.int8), s

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, scale={self.scale}, act_bits={self.act_bits}"
        )


class TernaryLinear(nn.Module):
    """Inference linear with packed ternary weights: ``y = x·(alphas·W̃)ᵀ + b``.

    State dict: ``alphas`` float (1,), ``bias`` (if any), ``weight`` uint8
    ``[out, in/4]`` (codes ``W̃+1``, layout ``"k4"``) — the key names of
    official TerDiT checkpoints, whose ``[out/4, in]`` ``"terdit"``-layout
    weights it also loads (repacked on the way in). ``act_bits=8``
    quantizes inputs per token to int8, as the QAT layer did. Eval mode runs
    the integer ops (see the module doc); ``use_kernels = False`` keeps the
    float path.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        act_bits: int | None = None,
        device=None,
        dtype=None,
        layer: str | None = None,
    ):
        super().__init__()
        _check_in_features(in_features, layer)
        check_choice("act_bits", act_bits, ACT_BITS)
        self.in_features, self.out_features, self.act_bits = in_features, out_features, act_bits
        kw = {"device": device, "dtype": dtype}
        # Parameters (not buffers) as in the original, so the key order matches: alphas, bias, weight.
        self.alphas = nn.Parameter(torch.ones(1, **kw), requires_grad=False)
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, **kw), requires_grad=False)
        else:
            self.register_parameter("bias", None)
        shape = packed_2bit_shape(out_features, in_features, LAYOUT)
        # Code 1 everywhere = W̃ of zeros: an empty layer computes the bias only.
        self.register_buffer("weight", torch.full(shape, 0b01010101, dtype=torch.uint8, device=device))
        self.use_kernels = True

    @classmethod
    def from_qat(cls, qat: TernaryQATLinear, *, layer: str | None = None) -> TernaryLinear:
        """Freeze a :class:`TernaryQATLinear`: pack its W̃, keep its scale and bias."""
        w_t, s = qat.ternary()
        q = cls(
            qat.in_features,
            qat.out_features,
            qat.bias is not None,
            act_bits=qat.act_bits,
            device=qat.weight.device,
            dtype=qat.weight.dtype,
            layer=layer,
        )
        with torch.no_grad():
            q.weight.copy_(pack_ternary(w_t, LAYOUT))
            q.alphas.copy_(s)
            if qat.bias is not None:
                q.bias.copy_(qat.bias)
        return q.train(qat.training)  # an eval model keeps eval layers (and so its integer kernels)

    def ternary_weight(self) -> torch.Tensor:
        """W̃ as int8 ``[out, in]`` in {-1, 0, +1}."""
        return unpack_ternary(self.weight, LAYOUT)

    def dequantized_weight(self) -> torch.Tensor:
        """``alphas · W̃`` in the dtype of ``alphas``."""
        # unpack_2bit skips unpack_ternary's code-3 check (a host sync): codes are checked on the way in.
        return self.alphas * (unpack_2bit(self.weight, LAYOUT).to(self.alphas.dtype) - 1)

    @property
    def kernel_op(self) -> str:
        """The :mod:`ditq.kernels` op of this layer: ``w158a8_linear`` (int8 inputs) or ``ternary_linear``."""
        return "w158a8_linear" if self.act_bits == 8 else "ternary_linear"

    def kernel_implementation(self, device: torch.device | str, *, build: bool = True) -> str:
        """What this layer's op runs on ``device`` under the backend in force (see
        :func:`ditq.kernels.ops.implementation`): e.g. ``"cpp-avx2"``, or ``"reference"``."""
        return ops.implementation(self.kernel_op, device, build=build)

    def kernel_for(self, x: torch.Tensor) -> str | None:
        """The op ``forward(x)`` runs now, or None for the float path (see the module doc)."""
        if not self.use_kernels or self.training or (x.requires_grad and torch.is_grad_enabled()):
            return None
        op = self.kernel_op
        if ops.get_backend() == "auto" and self.kernel_implementation(x.device) == "reference":
            return None
        return op

    def takes_int8_tokens(self, x: torch.Tensor) -> bool:
        """Whether ``forward(x)`` would quantize ``x`` with :func:`ditq.kernels.ops.quantize_per_token_int8`
        and run ``w158a8_linear``: then ``forward`` also takes :class:`~ditq.kernels.ops.Int8Tokens`
        made by a producer fused with that quantization."""
        return self.kernel_for(x) == "w158a8_linear"

    def forward(self, x: torch.Tensor | ops.Int8Tokens) -> torch.Tensor:
        if isinstance(x, ops.Int8Tokens):
            if self.act_bits != 8:
                raise InvalidArgumentError("a weight-only ternary layer takes float inputs, not int8 codes")
            return ops.w158a8_linear(x.q, x.scale, self.weight, self.alphas, self.bias, x.dtype)  # [..., out]
        op = self.kernel_for(x)
        if op == "w158a8_linear":
            xq, xs = ops.quantize_per_token_int8(x)  # int8 [..., in], float32 [..., 1]
            return ops.w158a8_linear(xq, xs, self.weight, self.alphas, self.bias, x.dtype)  # [..., out]
        if op == "ternary_linear":
            return ops.ternary_linear(x, self.weight, self.alphas, self.bias)  # [..., out]
        return F.linear(act_quant(x, self.act_bits), self.dequantized_weight(), self.bias)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing, unexpected, errors):
        key = prefix + "weight"
        w = state_dict.get(key)
        if isinstance(w, torch.Tensor):
            state_dict[key] = self._as_k4(w, prefix.rstrip("."))
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing, unexpected, errors)

    def _as_k4(self, w: torch.Tensor, name: str) -> torch.Tensor:
        """Packed weights of this layer in the ``"k4"`` layout; official ``"terdit"`` ones are repacked."""
        mine = packed_2bit_shape(self.out_features, self.in_features, LAYOUT)
        official = (self.out_features // 4, self.in_features) if self.out_features % 4 == 0 else None
        if w.dtype != torch.uint8 or tuple(w.shape) not in (mine, official):
            return w  # left to load_state_dict's own shape/dtype error
        if w.is_meta:
            return w if tuple(w.shape) == mine else torch.empty(mine, dtype=torch.uint8, device="meta")
        src = LAYOUT if tuple(w.shape) == mine else "terdit"
        try:
            codes = unpack_ternary(w, src)  # also rejects code 3
        except PackingError as e:
            raise CheckpointError(f"packed ternary weight {name or 'weight'}: {e}") from None
        return w if src == LAYOUT else pack_ternary(codes, LAYOUT)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, act_bits={self.act_bits}, layout={LAYOUT}"
        )
