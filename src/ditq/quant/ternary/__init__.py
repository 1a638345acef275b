"""Ternary weights (TerDiT, BitNet b1.58) as a ``quantize_`` method: QAT, then packed 2-bit inference.

::

    from ditq import quant
    quant.quantize_(model, quant.TernaryQATConfig(step="prepare"))   # nn.Linear -> TernaryQATLinear
    ...train...                                                       # latent float weights learn
    quant.quantize_(model, quant.TernaryQATConfig(step="convert"))   # -> TernaryLinear (2 bits/weight)

    layers   ternarization, straight-through estimators, TernaryQATLinear, TernaryLinear (the math and
             the kernels they run: see its docstring)
    config   TernaryQATConfig
    swap     prepare / convert / empty packed layers, and which layers they take
"""

from ditq.quant.ternary.config import STEPS, TernaryQATConfig
from ditq.quant.ternary.layers import (
    ACT_BITS,
    ALPHA_INITS,
    EPS,
    LAYOUT,
    SCALES,
    TernaryLinear,
    TernaryQATLinear,
    absmean,
    act_quant,
    fake_quant_act_int8,
    init_alpha,
    ternarize,
)
from ditq.quant.ternary.swap import (
    TERNARY_LAYERS,
    empty_ternary_,
    quantize_ternary_,
    select_ternary_layers,
    ternary_layers,
)

__all__ = [
    "ACT_BITS",
    "ALPHA_INITS",
    "EPS",
    "LAYOUT",
    "SCALES",
    "STEPS",
    "TERNARY_LAYERS",
    "TernaryLinear",
    "TernaryQATConfig",
    "TernaryQATLinear",
    "absmean",
    "act_quant",
    "empty_ternary_",
    "fake_quant_act_int8",
    "init_alpha",
    "quantize_ternary_",
    "select_ternary_layers",
    "ternarize",
    "ternary_layers",
]
