"""Quantized state dicts: int4-packed codes for saving, and rebuilding the layers of a saved model.

A quantized checkpoint (:mod:`ditq.formats.qdit`) holds each :class:`QuantLinear`'s
codes (int4-packed for layers of at most 4 bits), group parameters and static
ranges under the state-dict names of the float model; these functions convert
between a model and such a state dict, with one-line errors for what does not fit.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from ditq.errors import CheckpointError, InvalidArgumentError
from ditq.quant.config import LayerQuant, QDiTConfig, as_qdit_config
from ditq.quant.deployed import convert_
from ditq.quant.fuse import fuse_
from ditq.quant.nn import QuantLinear, packable
from ditq.quant.presets import few_names, set_module
from ditq.quant.primitives import code_dtype


def quantized_layers(model: nn.Module) -> dict[str, QuantLinear]:
    """``{name: QuantLinear}`` in ``named_modules`` order."""
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}


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
    (what :func:`packed_state_dict` and ``ditq.save`` writes), ``"auto"``
    either; other layers always hold codes one per byte. ``packed=True``
    makes the rebuilt layers store packed codes (:meth:`QuantLinear.pack_`).
    ``assign`` adopts the state dict's tensors instead of copying them
    (default: when the model is on the meta device; nothing is then
    allocated but what the state dict holds and the packed codes).

    Shapes, dtypes and code ranges are checked against the config; every
    mismatch is a one-line :class:`CheckpointError` naming the layer, and
    leaves the model as it was. Returns ``model``, deployed (:func:`~ditq.quant.deployed.convert_`)
    and fused (:func:`~ditq.quant.fuse.fuse_`).
    """
    config = as_qdit_config(config)
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
            f"the config overrides layer(s) the checkpoint does not quantize: {few_names(stray, 3)}; "
            "is it the config this checkpoint was saved with?"
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
        set_module(model, name, q)
    try:
        expected = set(model.state_dict())
        missing = sorted(expected - set(state_dict))
        unexpected = sorted(set(state_dict) - expected)
        if strict and (missing or unexpected):
            raise CheckpointError(
                f"state dict does not fit the quantized model: missing {few_names(missing, 3)}; unexpected "
                f"{few_names(unexpected, 3)}"
            )
        try:
            model.load_state_dict(state_dict, strict=False, assign=assign)
        except RuntimeError as e:
            lines = str(e).strip().splitlines()
            raise CheckpointError(f"state dict does not load: {' '.join(s.strip() for s in lines)}") from None
    except CheckpointError:
        for name, linear in originals.items():  # leave the model as it was
            set_module(model, name, linear)
        raise
    return fuse_(convert_(model))


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
