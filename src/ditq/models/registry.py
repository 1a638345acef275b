"""Model sizes as data: ``"DiT-XL/2"`` -> a config, and the builders for each arch.

The registry knows architectures and sizes; where weights come from is
the business of :mod:`ditq.formats`.
"""

from __future__ import annotations

from dataclasses import asdict, replace

from torch import nn

from ditq.errors import InvalidArgumentError, UnknownModelError
from ditq.models.dit import DiT, DiTConfig
from ditq.models.large_dit import LargeDiT, LargeDiTConfig

ModelConfig = DiTConfig | LargeDiTConfig

# (depth, hidden_size, num_heads) per DiT size, from the paper's Table 1.
_DIT_SIZES = {
    "S": (12, 384, 6),
    "B": (12, 768, 12),
    "L": (24, 1024, 16),
    "XL": (28, 1152, 16),
}
_PATCH_SIZES = (2, 4, 8)

MODEL_CONFIGS: dict[str, ModelConfig] = {
    f"DiT-{size}/{patch}": DiTConfig(depth=d, hidden_size=h, num_heads=n, patch_size=patch)
    for size, (d, h, n) in _DIT_SIZES.items()
    for patch in _PATCH_SIZES
}

# Large-DiT / TerDiT sizes (patch 2; input_size 32 = 256 px, 64 = 512 px). "TerDiT-4.2B" is the
# official Large-DiT "3B" config (DiT_Llama_3B_patch2); counting every parameter (the adaLN linears
# included) gives 4.24B, the name the TerDiT paper uses. TerDiT sizes carry the adaLN RMSNorm
# (official checkpoints have it); LargeDiT-tiny is the plain architecture. Tiny = tests and demos.
MODEL_CONFIGS.update(
    {
        "TerDiT-600M": LargeDiTConfig(dim=1536, n_layers=16, n_heads=32, adaln_norm=True),
        "TerDiT-4.2B": LargeDiTConfig(dim=3072, n_layers=32, n_heads=32, adaln_norm=True),
        "TerDiT-tiny": LargeDiTConfig(dim=64, n_layers=2, n_heads=4, adaln_norm=True),
        "LargeDiT-tiny": LargeDiTConfig(dim=64, n_layers=2, n_heads=4),
    }
)

_BUILDERS = {"dit": (DiTConfig, DiT), "large-dit": (LargeDiTConfig, LargeDiT)}


def list_models(arch: str | None = None) -> list[str]:
    """Registered model names (``["DiT-S/2", ..., "TerDiT-600M", ...]``), only those of ``arch`` if given."""
    if arch is not None and arch not in _BUILDERS:
        raise InvalidArgumentError(f"unknown architecture '{arch}'; known: {', '.join(_BUILDERS)}")
    return [name for name, config in MODEL_CONFIGS.items() if arch is None or config.arch == arch]


def get_config(name: str, **overrides) -> ModelConfig:
    """The config registered under ``name``, with fields overridden (``input_size=64``...)."""
    if name not in MODEL_CONFIGS:
        raise UnknownModelError(f"unknown model '{name}'; valid names: {', '.join(MODEL_CONFIGS)}")
    config = MODEL_CONFIGS[name]
    valid = set(asdict(config))
    bad = sorted(set(overrides) - valid)
    if bad:
        raise InvalidArgumentError(f"cannot override {', '.join(bad)} of {name}; fields: {', '.join(valid)}")
    return replace(config, **{k: v for k, v in overrides.items() if v is not None})


def config_from_dict(d: dict) -> ModelConfig:
    """Rebuild a config stored in a checkpoint (``{"arch": "dit", ...}``, ``{"arch": "large-dit", ...}``)."""
    arch = d.get("arch", "dit")
    if arch not in _BUILDERS:
        raise InvalidArgumentError(f"unknown architecture '{arch}'; known: {', '.join(_BUILDERS)}")
    return _BUILDERS[arch][0].from_dict(d)


def build_model(config: ModelConfig) -> nn.Module:
    """A freshly initialized model for ``config`` (its class follows ``config.arch``)."""
    return _BUILDERS[config.arch][1](config)


def create_model(name: str, **overrides) -> nn.Module:
    """A freshly initialized registry model: ``create_model("DiT-S/2", input_size=16)``."""
    return build_model(get_config(name, **overrides))
