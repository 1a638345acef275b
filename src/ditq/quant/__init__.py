"""Quantization as ``quantize_(model, config)``: Q-DiT post-training quantization (round to nearest, GPTQ,
the granularity search) and TerDiT ternary QAT, with the primitives they are built from.

User API (``__all__``)::

    quantize_(model, QDiTConfig(...) | GPTQConfig(...) | TernaryQATConfig(...))
    calibrate, CalibrationData, CalibrationRecorder, run_calibration     static ranges, GPTQ inputs
    search, SearchSpace, SearchResult, read/write_layer_config            Q-DiT's granularity search
    quantized_layers, ternary_layers, model_size_bytes, kernel_plan, set_kernels, pack_
    fuse_, unfuse_                                                        deploy-time producer fusion
    QuantLinear -> DeployedQuantLinear (convert_), TernaryQATLinear -> TernaryLinear

Modules:
    api          quantize_ and its handler registry, calibrate, kernel_plan, set_kernels
    select       which layers a config takes (one rule for every method)
    config       QDiTConfig, LayerQuant; gptq: GPTQConfig; ternary.config: TernaryQATConfig
    nn           QuantLinear: integer codes + group scales, fake-quant forward (calibration, GPTQ,
                 search); act_quant: ActQuantizer
    deployed     DeployedQuantLinear (runs one integer op, fixed at convert_) and convert_
    ternary      TernaryQATLinear, TernaryLinear, prepare/convert
    calibration  model inputs recorded while sampling, one random step per sample
    gptq         GPTQ: one weight, and whole models block by block
    search       evolutionary search of per-layer group sizes under a cost constraint
    state, size  quantized state dicts (save/reload), deployed bytes
    fuse         swapping in producers fused with their consumers' int8 quantization
    granularity, primitives, presets   the building blocks (importable from their modules)

``quant`` never imports ``models``, ``diffusion`` or ``eval``: it sees tensors, modules and names.
"""

from ditq.quant.api import calibrate, kernel_plan, quantize_, register_quantize_handler, set_kernels
from ditq.quant.calibration import CalibrationData, CalibrationRecorder, run_calibration
from ditq.quant.config import LayerQuant, QDiTConfig
from ditq.quant.deployed import DeployedQuantLinear, convert_
from ditq.quant.fuse import fuse_, unfuse_
from ditq.quant.gptq import GPTQConfig
from ditq.quant.nn import QuantLinear
from ditq.quant.search import SearchResult, SearchSpace, read_layer_config, search, write_layer_config
from ditq.quant.size import model_size_bytes
from ditq.quant.state import pack_, quantized_layers
from ditq.quant.ternary import TernaryLinear, TernaryQATConfig, TernaryQATLinear, ternary_layers

__all__ = [
    "CalibrationData",
    "CalibrationRecorder",
    "DeployedQuantLinear",
    "GPTQConfig",
    "LayerQuant",
    "QDiTConfig",
    "QuantLinear",
    "SearchResult",
    "SearchSpace",
    "TernaryLinear",
    "TernaryQATConfig",
    "TernaryQATLinear",
    "calibrate",
    "convert_",
    "fuse_",
    "kernel_plan",
    "model_size_bytes",
    "pack_",
    "quantize_",
    "quantized_layers",
    "read_layer_config",
    "register_quantize_handler",
    "run_calibration",
    "search",
    "set_kernels",
    "ternary_layers",
    "unfuse_",
    "write_layer_config",
]
