"""The DiT family with the original state-dict names, a registry of sizes, loading and the VAE.

dit        DiT (facebookresearch/DiT)
large_dit  Large-DiT, the LLaMA-style DiT TerDiT builds on (Alpha-VLLM / Lucky-Lance naming)
terdit     official TerDiT checkpoints (packed ternary weights) and their label order;
           imported on demand, as it needs ``ditq.quant``
registry   model sizes as data (``"DiT-XL/2"``, ``"TerDiT-600M"``)
hub        ``load``/``save``: official weights, files, ditq checkpoints, TerDiT folders
"""

from ditq.models.dit import DiT, DiTConfig
from ditq.models.hub import load, save
from ditq.models.large_dit import LargeDiT, LargeDiTConfig, map_class_labels
from ditq.models.registry import (
    MODEL_CONFIGS,
    build_model,
    config_from_dict,
    create_model,
    get_config,
    list_models,
)

__all__ = [
    "MODEL_CONFIGS",
    "DiT",
    "DiTConfig",
    "LargeDiT",
    "LargeDiTConfig",
    "build_model",
    "config_from_dict",
    "create_model",
    "get_config",
    "list_models",
    "load",
    "map_class_labels",
    "save",
]
