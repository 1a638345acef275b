"""GPTQ (Frantar et al., 2023) as Q-DiT uses it: Hessian from calibration inputs, then column-by-column
quantization with the rounding error pushed onto the columns not yet quantized.

Typical use, one linear layer::

    acc = GPTQ(layer.in_features)
    for x in calibration_inputs:            # the layer's inputs, [..., in_features]
        acc.add_batch(x)
    res = acc.quantize(layer.weight, bits=4, granularity=PerGroup(128))
    res.codes, res.scale, res.zero          # what a real quantized linear stores
    res.weight                              # == dequantize(res.codes, res.scale, res.zero)

Numbers follow Q-DiT's ``qdit/gptq.py`` (itself IST-DASLab's ``gptq.py``):
``H = (2/n) Σ xᵀx`` (n counts samples, the leading axis), dead inputs
(``H_jj = 0``) zeroed, damping ``percdamp · mean(diag H)``, the upper Cholesky
factor of ``H⁻¹``, blocks of 128 columns with lazy updates between blocks.
Group parameters are recomputed at each group boundary from the weight *as
updated at the last block boundary* (not from the in-block updates), as the
original does; with ``act_order`` they are computed once from the original
weight instead ("static groups"), so groups stay consecutive input channels
and the codes keep the plain group-wise layout.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ditq.errors import InvalidArgumentError
from ditq.quant.fuse import fuse_
from ditq.quant.granularity import (
    WEIGHT_GRANULARITIES,
    Granularity,
    PerChannel,
    PerTensor,
    check_bits,
    group_length,
    parse_granularity,
    weight_granularity,
)
from ditq.quant.primitives import (
    MinMax,
    as_clip,
    check_tensor,
    code_dtype,
    gptq_quant_params,
    qrange,
    quant_params,
    require_finite,
)

PARAM_RULES = ("gptq", "qdit")


@dataclass
class GPTQResult:
    """A GPTQ-quantized weight: integer codes, group parameters, and their dequantized weight."""

    codes: torch.Tensor  # [out, in] int8 (sym) / uint8 (asym)
    scale: torch.Tensor  # [out, n_groups] float32
    zero: torch.Tensor  # [out, n_groups] float32, integer-valued (0 when sym)
    weight: torch.Tensor  # [out, in] dequantized, in the input weight's dtype


class GPTQ:
    """Accumulates one linear layer's Hessian ``H = (2/n) Σ xᵀx`` over calibration inputs, then quantizes."""

    def __init__(self, in_features: int, device: torch.device | str | None = None):
        if isinstance(in_features, bool) or not isinstance(in_features, int) or in_features < 1:
            raise InvalidArgumentError(f"in_features must be a positive integer, got {in_features!r}")
        self.in_features = in_features
        self.H = torch.zeros(in_features, in_features, device=device, dtype=torch.float32)
        self.nsamples = 0

    @torch.no_grad()
    def add_batch(self, inp: torch.Tensor) -> None:
        """Add the layer inputs ``inp`` ([tokens, in] counts as one sample; [B, ..., in] as B samples)."""
        check_tensor(inp, "calibration input")
        if inp.shape[-1] != self.in_features:
            raise InvalidArgumentError(
                f"calibration input has {inp.shape[-1]} features, the layer takes {self.in_features}"
            )
        require_finite(inp, "calibration input")
        if inp.dim() == 1:
            inp = inp.unsqueeze(0)
        if inp.dim() == 2:
            inp = inp.unsqueeze(0)
        tmp = inp.shape[0]
        inp = inp.reshape(-1, inp.shape[-1]).t().to(self.H.device)
        # Running mean kept in this order (rescale, then add) to match the original bit for bit.
        self.H *= self.nsamples / (self.nsamples + tmp)
        self.nsamples += tmp
        inp = math.sqrt(2 / self.nsamples) * inp.float()
        self.H += inp.matmul(inp.t())

    def quantize(
        self,
        weight: torch.Tensor,
        bits: int,
        granularity: Granularity | None = None,
        sym: bool = False,
        **kwargs,
    ) -> GPTQResult:
        """GPTQ-quantize ``weight`` [out, in] with the accumulated Hessian (see :func:`gptq_quantize`).

        ``granularity`` defaults to PerChannel; keyword arguments go to :func:`gptq_quantize`.
        """
        if self.nsamples == 0:
            raise InvalidArgumentError("GPTQ has no calibration data: call add_batch before quantize")
        return gptq_quantize(weight, self.H, bits, granularity, sym, **kwargs)


def _param_fn(bits: int, sym: bool, params: str, clip):
    """``find(w, granularity)``: (scale, zero) of a [out, cols] slice under the chosen rule."""
    if params not in PARAM_RULES:
        raise InvalidArgumentError(
            f"unknown GPTQ parameter rule {params!r}; use one of {', '.join(PARAM_RULES)}"
        )
    clip = as_clip(clip)
    if params == "gptq":
        if not isinstance(clip, MinMax):
            raise InvalidArgumentError(
                "GPTQ's own range rule takes only a clip ratio; use params='qdit' for "
                "'mse' or 'percentile' clipping"
            )
        return lambda w, gran: gptq_quant_params(w, bits, gran, sym, clip.ratio, check_finite=False)
    return lambda w, gran: quant_params(w, bits, gran, sym, clip, check_finite=False)


@torch.no_grad()
def gptq_quantize(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    bits: int,
    granularity: Granularity | None = None,
    sym: bool = False,
    *,
    block_size: int = 128,
    percdamp: float = 0.01,
    act_order: bool = False,
    params: str = "gptq",
    clip=1.0,
) -> GPTQResult:
    """GPTQ with error feedback; returns codes, per-(row, group) scale/zero and the dequantized weight.

    ``params="gptq"`` uses GPTQ's range rule (:func:`gptq_quant_params`, Q-DiT's
    ``--use_gptq``); ``"qdit"`` uses :func:`quant_params` (the RTN rule, which
    also allows ``clip="mse"``/``"percentile"``). The computation runs in float32.
    """
    check_tensor(weight, "weight")
    if weight.dim() != 2:
        raise InvalidArgumentError(f"GPTQ takes a 2-D weight [out, in], got shape {tuple(weight.shape)}")
    rows, columns = weight.shape
    if not isinstance(hessian, torch.Tensor) or hessian.shape != (columns, columns):
        got = tuple(hessian.shape) if isinstance(hessian, torch.Tensor) else type(hessian).__name__
        raise InvalidArgumentError(f"the Hessian must be [{columns}, {columns}] for this weight, got {got}")
    check_bits(bits)
    granularity = PerChannel() if granularity is None else parse_granularity(granularity)
    if not isinstance(granularity, WEIGHT_GRANULARITIES):
        raise InvalidArgumentError(
            "GPTQ quantizes weights: granularity must be PerTensor, PerChannel or PerGroup(g), "
            f"got {granularity!r}"
        )
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise InvalidArgumentError(f"block_size must be a positive integer, got {block_size!r}")
    if isinstance(percdamp, bool) or not isinstance(percdamp, (int, float)) or not percdamp > 0:
        raise InvalidArgumentError(f"percdamp must be > 0, got {percdamp!r}")
    g = group_length(granularity, columns)
    grouped = g is not None and g < columns
    find = _param_fn(bits, sym, params, clip)
    require_finite(weight, "weight")
    q_min, q_max = qrange(bits, sym)

    W = weight.detach().clone().float()
    dev = W.device
    n_groups = columns // g if grouped else 1
    if g is None:  # one (scale, zero) for the whole matrix, applied to every row
        s, z = (t.expand(rows, 1) for t in find(W, PerTensor()))
    elif not grouped:
        s, z = find(W, PerChannel())
    H = hessian.detach().to(device=dev, dtype=torch.float32).clone()
    if not bool(torch.isfinite(H).all()):
        raise InvalidArgumentError("the Hessian holds NaN or infinite values; check the calibration inputs")

    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0

    scales = torch.empty(rows, n_groups, device=dev)
    zeros = torch.empty(rows, n_groups, device=dev)
    if not grouped:
        scales[:], zeros[:] = s, z
    elif act_order:  # static groups: parameters from the (dead-zeroed) original weight, fixed up front
        for k in range(n_groups):
            scales[:, k : k + 1], zeros[:, k : k + 1] = find(W[:, k * g : (k + 1) * g], PerChannel())

    perm = order = None
    if act_order:  # columns with the largest Hessian diagonal first
        perm = torch.argsort(torch.diag(H), descending=True)
        W, H = W[:, perm], H[perm][:, perm]
        order = perm.tolist()  # a host copy: no device sync per column

    damp = percdamp * torch.mean(torch.diag(H))
    diag = torch.arange(columns, device=dev)
    H[diag, diag] += damp
    L, info = torch.linalg.cholesky_ex(H)
    if int(info) != 0:
        raise InvalidArgumentError(
            f"the damped Hessian is not positive definite (percdamp={percdamp}); raise percdamp or add "
            f"calibration data"
        )
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True)

    Q = torch.zeros_like(W)
    codes = torch.zeros(rows, columns, device=dev, dtype=torch.float32)
    for i1 in range(0, columns, block_size):
        i2 = min(i1 + block_size, columns)
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            j = i1 + i
            w = W1[:, i]
            d = Hinv1[i, i]
            col = j if order is None else order[j]
            k = col // g if grouped else 0
            if grouped and not act_order and j % g == 0:
                # From W, which only sees error updates at block boundaries (the original's choice).
                scales[:, k : k + 1], zeros[:, k : k + 1] = find(W[:, j : j + g], PerChannel())
            s, z = scales[:, k : k + 1], zeros[:, k : k + 1]
            qc = torch.clamp(torch.round(w.unsqueeze(1) / s) + z, q_min, q_max)
            q = ((qc - z) * s).flatten()
            Q[:, j] = q
            codes[:, j] = qc.flatten()
            err1 = (w - q) / d
            W1[:, i:] -= err1.unsqueeze(1).matmul(Hinv1[i, i:].unsqueeze(0))
            Err1[:, i] = err1
        W[:, i2:] -= Err1.matmul(Hinv[i1:i2, i2:])

    if perm is not None:
        inv = torch.argsort(perm)
        Q, codes = Q[:, inv], codes[:, inv]
    return GPTQResult(codes=codes.to(code_dtype(sym)), scale=scales, zero=zeros, weight=Q.to(weight.dtype))


# ----------------------------------------------------------------------------
# Whole models: block by block, earlier blocks already quantized
# ----------------------------------------------------------------------------


class _StageDone(Exception):
    """Raised by a hook to end a forward pass once the stage being calibrated has run."""


def find_stages(model, names) -> list[tuple[str, list[str]]]:
    """Group layer ``names`` by the transformer block they sit in, in forward order.

    A block is a child of an ``nn.ModuleList`` (``blocks.3``, ``transformer_blocks.0``,
    ``layers.11``): the longest such prefix of each name. Layers in no block
    form a last stage named ``""`` (the whole model). Returns
    ``[(stage_name, [layer names in it]), ...]``.
    """
    from torch import nn

    lists = {n for n, m in model.named_modules() if n and isinstance(m, nn.ModuleList)}
    stages: dict[str, list[str]] = {}
    loose: list[str] = []
    for name in names:
        parts = name.split(".")
        # the longest "<module list>.<index>" prefix is the block
        depth = next(
            (j for j in range(len(parts) - 1, 0, -1) if parts[j].isdigit() and ".".join(parts[:j]) in lists),
            None,
        )
        if depth is None:
            loose.append(name)
        else:
            stages.setdefault(".".join(parts[: depth + 1]), []).append(name)
    ordered = sorted(stages.items(), key=lambda kv: _stage_key(kv[0]))
    if loose:
        ordered.append(("", loose))
    return ordered


def _stage_key(name: str) -> tuple:
    return tuple((0, int(p)) if p.isdigit() else (1, p) for p in name.split("."))


@torch.no_grad()
def gptq_model(
    model,
    config,
    data,
    *,
    include=None,
    exclude=None,
    batch_size: int = 32,
    block_size: int = 128,
    percdamp: float = 0.01,
    act_order: bool = False,
    log=None,
):
    """Quantize ``model`` in place with GPTQ, one transformer block at a time (Q-DiT's recipe).

    ``config`` (a :class:`~ditq.quant.config.QDiTConfig`) picks the layers and
    their bits and group sizes, as :func:`ditq.quant.quantize_` does; ``data``
    is :class:`~ditq.quant.calibration.CalibrationData` (model inputs ``x, t,
    **kwargs``). For each block, in forward order, the calibration inputs run
    through the model whose earlier blocks are already quantized (weights and
    activations), stopping after the block; each selected layer's Hessian is
    accumulated from its input *after* its own activation quantizer, and the
    block's layers are then swapped for :class:`~ditq.quant.nn.QuantLinear`
    holding GPTQ codes, its producers fused as deployed (:func:`~ditq.quant.fuse.fuse_`).
    Static activation ranges are observed in a first pass over the same inputs.
    Running the prefix again for every block costs about ``depth / 2`` full
    forward passes over the data, and needs no assumption about what a block
    takes as input.

    Returns ``{layer: GPTQResult}``. An error before any layer is swapped
    leaves the model as it was.
    """
    from ditq.quant import select
    from ditq.quant.act_quant import ActQuantizer
    from ditq.quant.config import as_qdit_config
    from ditq.quant.deployed import convert_
    from ditq.quant.nn import QuantLinear
    from ditq.quant.presets import set_module

    config = as_qdit_config(config)
    selected = select.select_layers(model, config, include=include, exclude=exclude)
    if not selected:
        raise InvalidArgumentError("GPTQ found no layer to quantize (check include/exclude and the preset)")
    select.check_named("QDiTConfig.layers", list(config.layers), selected, model)
    for name in selected:  # group sizes and bits are checked before any work
        QuantLinear.empty(model.get_submodule(name), config.for_layer(name), layer=name)
    if len(data) == 0:
        raise InvalidArgumentError("GPTQ needs calibration data; got none")

    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    results = {}
    try:
        for stage, names in find_stages(model, selected):
            started = time.perf_counter()
            layers = {n: model.get_submodule(n) for n in names}
            quantizers = {}
            for n, lin in layers.items():
                c = config.for_layer(n)
                quantizers[n] = ActQuantizer(
                    c.a_bits, c.a_group, c.a_sym, c.dynamic, lin.in_features, layer=n, device=device
                )
            static = [q for q in quantizers.values() if hasattr(q, "lo")]
            if static:
                for q in static:
                    q.calibrating = True
                _run_stage(model, stage, layers, quantizers, None, data, batch_size, device)
                for q in static:
                    q.calibrating = False
            hessians = {n: GPTQ(lin.in_features, device=device) for n, lin in layers.items()}
            _run_stage(model, stage, layers, quantizers, hessians, data, batch_size, device)
            new = {}
            for n, lin in layers.items():
                c = config.for_layer(n)
                clip = as_clip(c.w_clip)
                # GPTQ's own range rule for min-max (with a ratio); the RTN rule for MSE/percentile.
                rule = (
                    {"params": "gptq", "clip": clip.ratio}
                    if isinstance(clip, MinMax)
                    else {"params": "qdit", "clip": clip}
                )
                res = hessians[n].quantize(
                    lin.weight, c.w_bits, weight_granularity(c.w_group), c.w_sym,
                    block_size=block_size, percdamp=percdamp, act_order=act_order, **rule,
                )  # fmt: skip
                q = QuantLinear.from_float(lin, c, res, layer=n)
                q.act_quant.load_state_dict(quantizers[n].state_dict())
                new[n] = q
                results[n] = res
            for n, q in new.items():
                set_module(model, n, q)
            fuse_(convert_(model))  # later stages see the quantized blocks as deployed
            if log is not None:
                seconds = time.perf_counter() - started
                log(f"GPTQ {stage or 'loose layers'}: {len(names)} layers in {seconds:.1f} s")
    finally:
        model.train(was_training)
    return results


def _run_stage(model, stage, layers, quantizers, hessians, data, batch_size, device) -> None:
    """Run the calibration inputs up to the end of ``stage``, feeding its layers' inputs to the quantizers."""
    handles = []

    def make_hook(name):
        def hook(_module, args):
            x = quantizers[name](args[0])
            if hessians is not None:
                hessians[name].add_batch(x)

        return hook

    for n, lin in layers.items():
        handles.append(lin.register_forward_pre_hook(make_hook(n)))
    if stage:

        def stop(*_):
            raise _StageDone

        handles.append(model.get_submodule(stage).register_forward_hook(stop))
    try:
        for x, t, kw in data.batches(batch_size, device):
            try:
                model(x, t, **kw)
            except _StageDone:
                pass
    finally:
        for h in handles:
            h.remove()


@dataclass
class GPTQConfig:
    """Q-DiT's GPTQ as a ``quantize_`` config: ``quantize_(model, GPTQConfig(QDiTConfig(w_bits=4), calib))``.

    ``qdit`` gives the layers and their bits and group sizes (as for round-to-nearest); ``calibration``
    is the source of model inputs: :class:`~ditq.quant.calibration.CalibrationData`, or a callable that
    records it for the model it is given (e.g. a sampler run through a
    :class:`~ditq.quant.calibration.CalibrationRecorder`; ``ditq.pipelines.ptq.record_calibration``
    is one). ``block_size``, ``percdamp`` and ``act_order`` are GPTQ's; ``batch_size`` is how many
    calibration inputs run through the model at once. Not stored in checkpoints: the quantized
    model's per-layer settings are ``qdit``'s.
    """

    qdit: object = None  # a QDiTConfig (or its dict); None: QDiTConfig()
    calibration: object = None  # CalibrationData, or Callable[[nn.Module], CalibrationData]
    block_size: int = 128
    percdamp: float = 0.01
    act_order: bool = False
    batch_size: int = 32
    log: Callable[[str], None] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        from ditq.quant.config import as_qdit_config

        self.qdit = as_qdit_config(self.qdit)
        if self.calibration is None:
            raise InvalidArgumentError(
                "GPTQConfig needs calibration: CalibrationData, or a callable that records it for a model"
            )
        if not isinstance(self.block_size, int) or self.block_size < 1:
            raise InvalidArgumentError(
                f"GPTQConfig.block_size must be a positive int, got {self.block_size!r}"
            )
        if not 0 <= float(self.percdamp) < 1:
            raise InvalidArgumentError(f"GPTQConfig.percdamp must be in [0, 1), got {self.percdamp!r}")
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise InvalidArgumentError(
                f"GPTQConfig.batch_size must be a positive int, got {self.batch_size!r}"
            )

    def calibration_for(self, model) -> object:
        """The calibration data for ``model``: as given, or recorded by the callable."""
        return self.calibration(model) if callable(self.calibration) else self.calibration
