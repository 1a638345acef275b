"""Quantization: Q-DiT post-training quantization (group-wise integer weights and dynamic activations,
GPTQ), and the primitives it is built from.

    granularity  which elements share one (scale, zero): PerTensor, PerChannel, PerGroup(g),
                 PerToken, PerTokenGroup(g); bit-width and group-size validation
    primitives   quant_params / quantize / dequantize / fake_quantize (Q-DiT's quantizer bit for
                 bit), clipping (MinMax, MSE, Percentile), GPTQ's range rule
    calibration  model inputs (x_t, t, y) recorded while sampling, one random step per sample
    gptq         GPTQ: Hessian accumulation and error-feedback quantization of one weight; whole
                 models block by block (gptq_model)
    config       QDiTConfig: bits, group sizes, clipping, dynamic/static activations, per-layer
                 overrides, layer selection; round-trips to JSON
    nn           QuantLinear (integer codes, optionally int4-packed, + group scales; integer kernels
                 in eval mode where its settings fit one, else fake-quantized inputs), ActQuantizer
    api          quantize_(model, config), calibrate, quantized_layers, model_size_bytes,
                 load_quantized_state_dict; deployment: pack_, packed_state_dict, kernel_plan,
                 set_kernels
    presets      which linears Q-DiT quantizes in DiT, diffusers and Large-DiT/TerDiT naming
    search       evolutionary search of per-layer weight and activation group sizes under a cost
                 constraint; applying candidates in place; layer-config files
    ternary      TerDiT / BitNet b1.58 ternary weights: TernaryQATConfig (prepare -> train ->
                 convert through quantize_), TernaryQATLinear (latent weights, STE, learnable
                 alpha or absmean gamma, optional int8 activations), TernaryLinear (packed 2-bit,
                 integer kernels in eval mode)
    export       ternary checkpoints: the file layout (packed "k4" codes, per-layer scales, float
                 rest), save_ternary, load_ternary_into (meta-device loading), checkpoint_sizes
    fuse         fuse_ / unfuse_: norm-modulate, GELU and SwiGLU producers swapped for modules fused
                 with their integer consumers' int8 quantization (deploy time; quantize_ and the
                 loaders call fuse_)

``quant`` never imports ``models``, ``diffusion`` or ``eval``: it sees tensors, modules and names.
"""

from ditq.quant.api import (
    calibrate,
    kernel_plan,
    load_quantized_state_dict,
    model_size_bytes,
    pack_,
    packed_state_dict,
    quantize_,
    quantized_layers,
    select_layers,
    set_kernels,
)
from ditq.quant.calibration import CalibrationData, CalibrationRecorder, run_calibration
from ditq.quant.config import PER_TENSOR, LayerQuant, QDiTConfig
from ditq.quant.export import checkpoint_sizes, is_ternary_checkpoint, load_ternary_into, save_ternary
from ditq.quant.fuse import fuse_, fused_producers, unfuse_
from ditq.quant.gptq import GPTQ, GPTQResult, find_stages, gptq_model, gptq_quantize
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
from ditq.quant.nn import ActQuantizer, QuantLinear, kernel_op_for
from ditq.quant.presets import PRESETS, Preset, get_preset, preset_for
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
from ditq.quant.search import (
    DEFAULT_GROUPS,
    Candidate,
    Cost,
    SearchResult,
    SearchSpace,
    applied,
    output_error_proxy,
    read_layer_config,
    search,
    search_space,
    write_layer_config,
)
from ditq.quant.ternary import (
    TernaryLinear,
    TernaryQATConfig,
    TernaryQATLinear,
    empty_ternary_,
    fake_quant_act_int8,
    init_alpha,
    quantize_ternary_,
    select_ternary_layers,
    ternarize,
    ternary_layers,
)

__all__ = [
    "CalibrationData",
    "CalibrationRecorder",
    "find_stages",
    "gptq_model",
    "run_calibration",
    "GPTQ",
    "PER_TENSOR",
    "PRESETS",
    "ActQuantizer",
    "LayerQuant",
    "Preset",
    "QDiTConfig",
    "QuantLinear",
    "calibrate",
    "get_preset",
    "kernel_op_for",
    "kernel_plan",
    "load_quantized_state_dict",
    "model_size_bytes",
    "pack_",
    "packed_state_dict",
    "preset_for",
    "quantize_",
    "quantized_layers",
    "select_layers",
    "set_kernels",
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
    "DEFAULT_GROUPS",
    "Candidate",
    "Cost",
    "SearchResult",
    "SearchSpace",
    "applied",
    "output_error_proxy",
    "read_layer_config",
    "search",
    "search_space",
    "write_layer_config",
    "TernaryLinear",
    "TernaryQATConfig",
    "TernaryQATLinear",
    "empty_ternary_",
    "fake_quant_act_int8",
    "init_alpha",
    "quantize_ternary_",
    "select_ternary_layers",
    "ternarize",
    "ternary_layers",
    "checkpoint_sizes",
    "is_ternary_checkpoint",
    "load_ternary_into",
    "save_ternary",
    "fuse_",
    "fused_producers",
    "unfuse_",
]
