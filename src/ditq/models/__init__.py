"""The DiT family with the original state-dict names, a registry of sizes, and the VAE: the math only.

Loading and saving weights is :mod:`ditq.formats` (``ditq.load``, ``ditq.save``).

dit        DiT (facebookresearch/DiT)
large_dit  Large-DiT, the LLaMA-style DiT TerDiT builds on (Alpha-VLLM / Lucky-Lance naming)
registry   model sizes as data (``"DiT-XL/2"``, ``"TerDiT-600M"``)
vae        the Stable Diffusion VAE DiT samples through
"""

from ditq.models.dit import DiT, DiTConfig
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
    "map_class_labels",
]
