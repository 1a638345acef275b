"""The DiT family with the original state-dict names, a registry of sizes, loading and the VAE."""

from ditq.models.dit import DiT, DiTConfig
from ditq.models.hub import load, save
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
    "build_model",
    "config_from_dict",
    "create_model",
    "get_config",
    "list_models",
    "load",
    "save",
]
