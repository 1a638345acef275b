"""Quantizing a model is swapping its linear layers: ``quantize_(model, config)``.

::

    from ditq import quant
    quant.quantize_(model, quant.QDiTConfig(w_bits=4, a_bits=8))      # DiT: the preset picks layers
    quant.quantize_(model, cfg, include=["blocks.*.mlp.*"], exclude=["blocks.0.*"])
    with quant.calibrate(model):                                       # static activations only
        for batch in data:
            model(*batch)
    quant.quantized_layers(model)                                      # {name: QuantLinear}
    quant.model_size_bytes(model)                                      # deployed bytes

    # reload: a fresh float model, the saved state dict and config
    quant.load_quantized_state_dict(fresh_model, state_dict, QDiTConfig.from_json(text))

    # deployment: codes two per byte, integer kernels in eval mode (see ditq.quant.nn)
    quant.pack_(model)                                                 # <= 4-bit codes packed
    quant.kernel_plan(model)                                           # {name: op it runs}
    quant.set_kernels(model, False)                                    # fake quant everywhere

Works on any ``nn.Module`` (a diffusers transformer too). Which layers: the
``include`` argument, else ``config.include``, else the preset's patterns
(:mod:`ditq.quant.presets`; ``config.preset="auto"`` recognizes DiT, diffusers
and Large-DiT naming), else every ``nn.Linear``; minus ``exclude`` (argument,
else ``config.exclude``). Patterns are fnmatch (``*`` crosses dots) or ``re:``
+ a regex, matched against full names from ``named_modules``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import torch
from torch import nn

from ditq.errors import CheckpointError, InvalidArgumentError
from ditq.kernels import ops
from ditq.quant.config import LayerQuant, QDiTConfig, _patterns
from ditq.quant.fuse import fuse_
from ditq.quant.granularity import num_groups, weight_granularity
from ditq.quant.nn import ActQuantizer, QuantLinear, packable
from ditq.quant.presets import few_names as _few
from ditq.quant.presets import get_preset, linear_names, match_any, nothing_selected, preset_for
from ditq.quant.presets import set_module as _set_module
from ditq.quant.primitives import code_dtype
from ditq.quant.ternary import TernaryLinear, TernaryQATConfig, quantize_ternary_

SCALE_BYTES = 2
"""Bytes per stored scale / zero point / static range end in :func:`model_size_bytes` (fp16)."""


# ----------------------------------------------------------------------------
# Layer selection
# ----------------------------------------------------------------------------


def _check_config(config) -> QDiTConfig:
    if config is None:
        return QDiTConfig()
    if isinstance(config, Mapping):
        return QDiTConfig.from_dict(dict(config))
    if not isinstance(config, QDiTConfig):
        raise InvalidArgumentError(f"config must be a QDiTConfig (or its dict), got {type(config).__name__}")
    return config


def _rules(model: nn.Module, config: QDiTConfig, include, exclude) -> tuple[list[str], list[str]]:
    """The (include, exclude) patterns in force: arguments win over the config, the config over the preset."""
    if include is not None:
        inc = _patterns(include, "include")
    elif config.include is not None:
        inc = config.include
    else:
        if config.preset == "auto":
            preset = preset_for(model)
        elif config.preset is None:
            preset = None
        else:
            preset = get_preset(config.preset)
        inc = preset.patterns(config.quantize_adaln) if preset is not None else ["*"]
    exc = _patterns(exclude, "exclude") if exclude is not None else config.exclude
    return inc, exc or []


def select_layers(
    model: nn.Module, config: QDiTConfig | None = None, *, include=None, exclude=None
) -> list[str]:
    """Names of the float ``nn.Linear`` layers :func:`quantize_` would swap (no checks, no errors)."""
    config = _check_config(config)
    inc, exc = _rules(model, config, include, exclude)
    return [
        n for n, m in model.named_modules()
        if n and isinstance(m, nn.Linear) and match_any(n, inc) and not match_any(n, exc)
    ]  # fmt: skip


def _check_named(kind: str, names, selected: list[str], model: nn.Module) -> None:
    """One-line errors for per-layer entries naming layers that are missing or left unquantized."""
    existing = set(linear_names(model))
    missing = [n for n in names if n not in existing]
    if missing:
        raise InvalidArgumentError(
            f"{kind} names layer(s) the model lacks: {_few(missing, 3)}; quantizable layers are e.g. "
            f"{_few(selected or sorted(existing))}"
        )
    chosen = set(selected)
    left = [n for n in names if n not in chosen]
    if left:
        raise InvalidArgumentError(
            f"{kind} names layer(s) that include/exclude leave unquantized (or already quantized): "
            f"{_few(left, 3)}; include them or drop their entries"
        )


# ----------------------------------------------------------------------------
# Quantize, calibrate, inspect
# ----------------------------------------------------------------------------


def quantize_(
    model: nn.Module,
    config: QDiTConfig | TernaryQATConfig | None = None,
    *,
    include=None,
    exclude=None,
    weight_overrides: Mapping[str, object] | None = None,
) -> nn.Module:
    """Swap the selected ``nn.Linear`` layers of ``model`` for :class:`QuantLinear`, in place; returns it.

    Weights are quantized round-to-nearest under the layer's settings
    (``config.for_layer(name)``), unless ``weight_overrides[name]`` gives codes
    and group parameters (a ``GPTQResult`` or ``(codes, scale, zero)``).
    Every layer is built before any is swapped, so an error leaves the model
    as it was. Raises a one-line :class:`InvalidArgumentError` when nothing is
    selected, when ``config.layers`` or ``weight_overrides`` name layers that
    are missing or not selected, or when a group size does not divide a
    layer's input channels.

    A :class:`~ditq.quant.ternary.TernaryQATConfig` runs its ``prepare`` or
    ``convert`` step instead (:func:`~ditq.quant.ternary.quantize_ternary_`).
    Producers that feed integer layers then run fused (:func:`~ditq.quant.fuse.fuse_`).
    """
    if isinstance(config, TernaryQATConfig):
        if weight_overrides:
            raise InvalidArgumentError("weight_overrides apply to QDiTConfig only, not to a TernaryQATConfig")
        return fuse_(quantize_ternary_(model, config, include=include, exclude=exclude))
    if not isinstance(model, nn.Module):
        raise InvalidArgumentError(f"quantize_ takes an nn.Module, got {type(model).__name__}")
    config = _check_config(config)
    weight_overrides = dict(weight_overrides or {})
    selected = select_layers(model, config, include=include, exclude=exclude)
    if not selected:
        raise nothing_selected(model, *_rules(model, config, include, exclude), len(quantized_layers(model)))
    _check_named("QDiTConfig.layers", list(config.layers), selected, model)
    _check_named("weight_overrides", list(weight_overrides), selected, model)

    new = {}
    for name in selected:
        linear = model.get_submodule(name)
        new[name] = QuantLinear.from_float(
            linear, config.for_layer(name), weight_overrides.get(name), layer=name
        )
    for name, q in new.items():
        _set_module(model, name, q)
    return fuse_(model)


def quantized_layers(model: nn.Module) -> dict[str, QuantLinear]:
    """``{name: QuantLinear}`` in ``named_modules`` order."""
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}


def _static_quantizers(model: nn.Module) -> list[ActQuantizer]:
    return [m for m in model.modules() if isinstance(m, ActQuantizer) and hasattr(m, "lo")]


@contextmanager
def calibrate(model: nn.Module, *, reset: bool = True) -> Iterator[nn.Module]:
    """Record static activation ranges while the block runs, then freeze them.

    Inside, static quantizers pass inputs through unchanged and widen their
    running min/max; on exit they quantize with the recorded ranges. ``reset``
    forgets earlier ranges first. The block runs under ``torch.no_grad()``.
    Dynamic quantizers are unaffected (a no-op for a dynamic-only model). A
    static layer that saw no data raises a one-line error naming it when used.
    """
    quantizers = _static_quantizers(model)
    for q in quantizers:
        if reset:
            q.reset()
        q.calibrating = True
    try:
        with torch.no_grad():
            yield model
    finally:
        for q in quantizers:
            q.calibrating = False


# ----------------------------------------------------------------------------
# Size
# ----------------------------------------------------------------------------


def _quant_bytes(
    in_f: int, out_f: int, cfg: LayerQuant, bias: torch.Tensor | None, static_groups: int
) -> int:
    n = num_groups(weight_granularity(cfg.w_group), in_f)
    codes = math.ceil(out_f * in_f * cfg.w_bits / 8)
    params = out_f * n * SCALE_BYTES * (1 if cfg.w_sym else 2)  # symmetric: no zero points
    b = bias.numel() * bias.element_size() if bias is not None else 0
    return codes + params + b + 2 * static_groups * SCALE_BYTES


def model_size_bytes(
    model: nn.Module, config: QDiTConfig | None = None, *, include=None, exclude=None
) -> int:
    """Deployed bytes: weight codes at their bit width, scales (and asymmetric zeros) in fp16, the rest as is.

    Each :class:`QuantLinear` counts ``ceil(out·in·bits/8)`` bytes of codes,
    2 bytes per scale and per zero point (none when symmetric), its bias at
    its dtype, and 2 × 2 bytes per static activation range. Every other
    parameter and persistent buffer counts at its dtype (shared tensors once).
    With ``config``, the float linears :func:`quantize_` would select count
    as quantized under it: the size of a plan, before quantizing.
    """
    planned: dict[str, LayerQuant] = {}
    if config is not None:
        config = _check_config(config)
        planned = {
            n: config.for_layer(n) for n in select_layers(model, config, include=include, exclude=exclude)
        }
    total, seen, inside = 0, set(), []
    for name, mod in model.named_modules():
        if any(name.startswith(p + ".") for p in inside):
            continue  # tensors of a QuantLinear's children are counted with it
        if isinstance(mod, QuantLinear):
            inside.append(name)
            cfg = LayerQuant(w_bits=mod.w_bits, w_group=mod.w_group, w_sym=mod.w_sym)
            aq = mod.act_quant
            static = aq.n_static_groups if hasattr(aq, "lo") else 0
            total += _quant_bytes(mod.in_features, mod.out_features, cfg, mod.bias, static)
            continue
        if name in planned:
            cfg = planned[name]
            static = 0
            if cfg.a_bits is not None and not cfg.dynamic:
                static = ActQuantizer(cfg.a_bits, cfg.a_group, False, False, mod.in_features).n_static_groups
            total += _quant_bytes(mod.in_features, mod.out_features, cfg, mod.bias, static)
            seen.update(id(t) for t in (mod.weight, mod.bias) if t is not None)
            continue
        tensors = list(mod.named_parameters(recurse=False)) + [
            (n, b) for n, b in mod.named_buffers(recurse=False) if n not in mod._non_persistent_buffers_set
        ]
        for _, t in tensors:
            if t is not None and id(t) not in seen:
                seen.add(id(t))
                total += t.numel() * t.element_size()
    return total


# ----------------------------------------------------------------------------
# Reload
# ----------------------------------------------------------------------------


LAYOUTS = ("auto", "codes", "int4")
"""How a state dict stores the codes of layers of at most 4 bits (see :func:`load_quantized_state_dict`)."""


def load_quantized_state_dict(
    model: nn.Module,
    state_dict: Mapping[str, torch.Tensor],
    config: QDiTConfig | dict,
    *,
    strict: bool = True,
    layout: str = "auto",
    packed: bool = False,
    assign: bool | None = None,
) -> nn.Module:
    """Rebuild the QuantLinears of a saved quantized model on a float ``model`` and load ``state_dict``.

    The layers to swap are the ``nn.Linear`` modules whose ``<name>.qweight``
    is in the state dict; ``config`` (the one the checkpoint was made with)
    gives their bits and group sizes. ``layout`` says how the state dict holds
    the codes of layers of at most 4 bits (and an even number of inputs):
    ``"codes"`` one per byte ``[out, in]``, ``"int4"`` packed ``[out, in/2]``
    (what :func:`packed_state_dict` and ``save_quantized`` write), ``"auto"``
    either; other layers always hold codes one per byte. ``packed=True``
    makes the rebuilt layers store packed codes (:meth:`QuantLinear.pack_`).
    ``assign`` adopts the state dict's tensors instead of copying them
    (default: when the model is on the meta device; nothing is then
    allocated but what the state dict holds and the packed codes).

    Shapes, dtypes and code ranges are checked against the config; every
    mismatch is a one-line :class:`CheckpointError` naming the layer, and
    leaves the model as it was. Returns ``model``, fused (:func:`~ditq.quant.fuse.fuse_`).
    """
    config = _check_config(config)
    if layout not in LAYOUTS:
        raise InvalidArgumentError(f"layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
    if not isinstance(state_dict, Mapping):
        raise CheckpointError(
            f"a state dict is a mapping of names to tensors, got {type(state_dict).__name__}"
        )
    if assign is None:
        assign = any(t.is_meta for t in model.parameters())
    names = [
        n for n, m in model.named_modules() if n and isinstance(m, nn.Linear) and f"{n}.qweight" in state_dict
    ]
    if not names and not quantized_layers(model):
        raise CheckpointError("the state dict holds no quantized layers (no '<layer>.qweight' keys)")
    quant_names = set(names) | set(quantized_layers(model))
    stray = [n for n in config.layers if n not in quant_names]
    if stray:
        raise CheckpointError(
            f"the config overrides layer(s) the checkpoint does not quantize: {_few(stray, 3)}; is it the "
            f"config this checkpoint was saved with?"
        )
    new = {}
    for name in names:
        try:
            cfg = config.for_layer(name)
            q = QuantLinear.empty(model.get_submodule(name), cfg, layer=name, packed=packed)
        except InvalidArgumentError as e:
            raise CheckpointError(f"cannot rebuild layer {name!r} from the config: {e}") from None
        for key, want in q.state_dict().items():
            got = state_dict.get(f"{name}.{key}")
            if got is None:
                continue  # reported with the other missing keys
            if key == "qweight":
                _check_qweight(name, got, q, config.for_layer(name), layout)
            elif tuple(got.shape) != tuple(want.shape):
                raise CheckpointError(
                    f"layer {name!r}: {key} is {got.dtype} {tuple(got.shape)} in the state dict but the "
                    f"config gives {want.dtype} {tuple(want.shape)} ({config.for_layer(name)}); load with "
                    f"the config the checkpoint was saved with"
                )
        new[name] = q
    originals = {name: model.get_submodule(name) for name in new}
    for name, q in new.items():
        _set_module(model, name, q)
    try:
        expected = set(model.state_dict())
        missing = sorted(expected - set(state_dict))
        unexpected = sorted(set(state_dict) - expected)
        if strict and (missing or unexpected):
            raise CheckpointError(
                f"state dict does not fit the quantized model: missing {_few(missing, 3)}; unexpected "
                f"{_few(unexpected, 3)}"
            )
        try:
            model.load_state_dict(state_dict, strict=False, assign=assign)
        except RuntimeError as e:
            lines = str(e).strip().splitlines()
            raise CheckpointError(f"state dict does not load: {' '.join(s.strip() for s in lines)}") from None
    except CheckpointError:
        for name, linear in originals.items():  # leave the model as it was
            _set_module(model, name, linear)
        raise
    return fuse_(model)


def _check_qweight(name: str, got: torch.Tensor, q: QuantLinear, cfg: LayerQuant, layout: str) -> None:
    """One-line error unless ``got`` is ``q``'s codes in ``layout`` (one per byte, or int4-packed)."""
    n, k = q.out_features, q.in_features
    codes = (code_dtype(q.w_sym), (n, k))
    int4 = (torch.uint8, q.packed_shape)
    can_pack = packable(q.w_bits, k)
    allowed = [codes] if not can_pack or layout == "codes" else [int4] if layout == "int4" else [codes, int4]
    if (got.dtype, tuple(got.shape)) in allowed:
        return
    desc = {codes: f"{codes[0]} {codes[1]} (one code per byte)", int4: f"torch.uint8 {int4[1]} (int4-packed)"}
    raise CheckpointError(
        f"layer {name!r}: qweight is {got.dtype} {tuple(got.shape)} in the state dict but the config gives "
        f"{' or '.join(desc[a] for a in allowed)} for {cfg.w_bits}-bit weights ({cfg}); the checkpoint's "
        "tensors and metadata disagree, or load with the config the checkpoint was saved with"
    )


# ----------------------------------------------------------------------------
# Deployment: packed codes, integer kernels
# ----------------------------------------------------------------------------


def pack_(model: nn.Module) -> nn.Module:
    """Store the codes of every :class:`QuantLinear` of at most 4 bits two per byte (int4), in place.

    Outputs do not change; the layers then hold no float weight at all (see
    :meth:`QuantLinear.pack_`). Returns ``model``.
    """
    for q in quantized_layers(model).values():
        q.pack_()
    return model


def packed_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """``model.state_dict()`` with the codes of every packable :class:`QuantLinear` (at most 4 bits, an
    even number of inputs) int4-packed ``[out, in/2]``: what a quantized checkpoint stores."""
    state = model.state_dict()
    for name, q in quantized_layers(model).items():
        if packable(q.w_bits, q.in_features) and not q.packed:
            state[f"{name}.qweight"] = q.packed_codes()
    return state


_KERNEL_LAYERS = (QuantLinear, TernaryLinear)


def set_kernels(model: nn.Module, enabled: bool) -> int:
    """Let every :class:`QuantLinear` and :class:`TernaryLinear` run integer kernels in eval mode
    (``enabled``, the default) or keep them on their fake-quant / float path; returns how many."""
    layers = [m for m in model.modules() if isinstance(m, _KERNEL_LAYERS)]
    for m in layers:
        m.use_kernels = bool(enabled)
    return len(layers)


def kernel_plan(
    model: nn.Module, device: torch.device | str | None = None, *, build: bool = True
) -> dict[str, str]:
    """``{layer name: what its eval-mode forward runs}`` on ``device`` (default: where the model is)
    under the kernel backend in force: the op and the implementation it runs, such as
    ``"w4a8_linear [cpp-avx2]"`` (see :func:`ditq.kernels.ops.implementation`), or
    ``"float: <why>"`` for the fake-quant / float path. Checks settings, backend and device only
    (a forward also takes the float path when its output needs gradients). ``build=False`` builds
    no CPU kernels to find out (see :func:`ditq.kernels.has_fast_impl`)."""
    if device is None:
        first = next(iter(model.parameters()), None)
        device = first.device if first is not None else torch.device("cpu")
    device = torch.device(device)
    backend = ops.get_backend()
    plan = {}
    for name, m in model.named_modules():
        if not isinstance(m, _KERNEL_LAYERS):
            continue
        op = m.kernel_op
        if op is None or not m.use_kernels:
            why = "the layer's settings fit no integer op" if op is None else "use_kernels is off"
            plan[name] = f"float: {why}"
            continue
        impl = m.kernel_implementation(device, build=build)
        if backend == "auto" and impl == "reference":
            plan[name] = f"float: no fast {op} on {device.type} (backend auto)"
        else:
            plan[name] = f"{op} [{impl}]"
    return plan
