"""Quantization: Q-DiT post-training quantization (group-wise integer weights and dynamic activations,
GPTQ), and the primitives it is built from.

    granularity  which elements share one (scale, zero): PerTensor, PerChannel, PerGroup(g),
                 PerToken, PerTokenGroup(g); bit-width and group-size validation
    primitives   quant_params / quantize / dequantize / fake_quantize (Q-DiT's quantizer bit for
                 bit), clipping (MinMax, MSE, Percentile), GPTQ's range rule
    gptq         GPTQ: Hessian accumulation and error-feedback quantization of one weight

``quant`` never imports ``models``, ``diffusion`` or ``eval``: it sees tensors, modules and names.
"""

from ditq.quant.gptq import GPTQ, GPTQResult, gptq_quantize
from ditq.quant.granularity import (
    Granularity,
    PerChannel,
    PerGroup,
    PerTensor,
    PerToken,
    PerTokenGroup,
    act_granularity,
    check_bits,
    group_length,
    num_groups,
    parse_granularity,
    valid_group_sizes,
    weight_granularity,
)
from ditq.quant.primitives import (
    MSE,
    Clip,
    MinMax,
    Percentile,
    as_clip,
    code_dtype,
    dequantize,
    fake_quantize,
    gptq_quant_params,
    qrange,
    quant_params,
    quantize,
)

__all__ = [
    "GPTQ",
    "MSE",
    "Clip",
    "GPTQResult",
    "Granularity",
    "MinMax",
    "PerChannel",
    "PerGroup",
    "PerTensor",
    "PerToken",
    "PerTokenGroup",
    "Percentile",
    "act_granularity",
    "as_clip",
    "check_bits",
    "code_dtype",
    "dequantize",
    "fake_quantize",
    "gptq_quant_params",
    "gptq_quantize",
    "group_length",
    "num_groups",
    "parse_granularity",
    "qrange",
    "quant_params",
    "quantize",
    "valid_group_sizes",
    "weight_granularity",
]
