"""Building the model a file describes: on the meta device, strictly, with one-line misfit errors.

Every format ends here: a config (read from metadata, or inferred from tensor
shapes) and tensors. The model is built on the meta device, so no memory and
no time go into initializing weights that are overwritten at once, and
adopts the file's tensors (``load_state_dict(strict=True, assign=True)``).
Anything that does not fit is a :class:`~ditq.errors.CheckpointError` naming
the missing, unexpected and mismatched keys.
"""

from __future__ import annotations

from collections.abc import Mapping
from itertools import chain
from typing import Any

import torch
from torch import nn

from ditq.errors import CheckpointError, InvalidArgumentError
from ditq.models import registry

LATENT_DOWNSAMPLE = 8
"""The VAE DiT is trained with shrinks each image side by 8: 256 px <-> 32 latents."""

HEADER_DTYPES = {
    "F64": (torch.float64, 8), "F32": (torch.float32, 4), "F16": (torch.float16, 2),
    "BF16": (torch.bfloat16, 2), "I64": (torch.int64, 8), "I32": (torch.int32, 4),
    "I16": (torch.int16, 2), "I8": (torch.int8, 1), "U8": (torch.uint8, 1), "BOOL": (torch.bool, 1),
}  # fmt: skip
"""The dtypes a safetensors header names: ``code -> (torch dtype, bytes per element)``."""


def dtype_name(code: str) -> str:
    """``"float32"`` for a header's ``"F32"`` (the code itself for one ditq does not know)."""
    dtype = HEADER_DTYPES.get(code, (None, 0))[0]
    return str(dtype).removeprefix("torch.") if dtype is not None else code


def header_bytes(entry: dict) -> int:
    """Bytes of the tensor a safetensors header entry (``{"dtype", "shape"}``) holds (0: unknown dtype)."""
    return numel(entry["shape"]) * HEADER_DTYPES.get(entry["dtype"], (None, 0))[1]


def config_from_metadata(meta: Mapping[str, Any], source: str):
    """The model config stored as ``model_config`` in ditq metadata; one-line error if absent or bad."""
    if not isinstance(meta.get("model_config"), dict):
        raise CheckpointError(f"{source} has no model_config in its ditq metadata; re-save it with ditq.save")
    try:
        config = registry.config_from_dict(meta["model_config"])
        config.validate()
    except (InvalidArgumentError, TypeError, ValueError, KeyError) as e:
        raise CheckpointError(f"{source}: its model_config does not make a model: {e}") from None
    return config


def meta_skeleton(config) -> nn.Module:
    """The float model of ``config`` on the meta device (shapes only, nothing allocated)."""
    with torch.device("meta"):
        return registry.build_model(config)


def build_model(config, state_dict: Mapping[str, torch.Tensor], source: str) -> nn.Module:
    """The model of ``config`` holding exactly ``state_dict`` (strict), on the CPU."""
    model = meta_skeleton(config)
    reference = model.state_dict()
    check_fits({k: tuple(v.shape) for k, v in reference.items()}, state_dict, source, config)
    # Weights stored in a narrower dtype (a float16 checkpoint) come back in the
    # dtype the model is built in, as a copying load_state_dict would give them.
    state_dict = {k: v.to(reference[k].dtype) for k, v in state_dict.items()}
    model.load_state_dict(state_dict, strict=True, assign=True)
    if any(t.is_meta for t in chain(model.parameters(), model.buffers())):
        # A non-persistent buffer (absent from any state dict) is still on meta:
        # build for real, so the constructor computes it.
        model = registry.build_model(config)
        model.load_state_dict(state_dict, strict=True)
    return model


def expected_shapes(config) -> dict[str, tuple[int, ...]]:
    """State-dict shapes of the float model of ``config``."""
    return {k: tuple(v.shape) for k, v in meta_skeleton(config).state_dict().items()}


def check_fits(
    expected: Mapping[str, tuple[int, ...]], state_dict: Mapping[str, Any], source: str, config
) -> None:
    """Raise one line naming missing/unexpected keys and shape mismatches, if any."""
    bad_values = [k for k, v in state_dict.items() if not isinstance(v, torch.Tensor)]
    if bad_values:
        raise CheckpointError(
            f"{source}: entries {few(bad_values)} are not tensors; the file is not a state dict"
        )
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    mismatched = [
        f"{k}: expected {tuple(shape)}, found {tuple(state_dict[k].shape)}"
        for k, shape in expected.items()
        if k in state_dict and tuple(state_dict[k].shape) != tuple(shape)
    ]
    problems = []
    if missing:
        problems.append(f"missing keys {few(missing)}")
    if unexpected:
        problems.append(f"unexpected keys {few(unexpected)}")
    if mismatched:
        problems.append(f"shape mismatch {few(mismatched)}")
    if problems:
        raise CheckpointError(
            f"{source} does not fit {summary(config)}: {'; '.join(problems)}; "
            "check the model name, image_size and num_heads"
        )


def meta_tensors(shapes: Mapping[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    """Meta tensors of ``shapes``: stand-ins where only names and shapes matter (describing a file from
    its header, fitting it to a model)."""
    return {k: torch.empty(s, device="meta") for k, s in shapes.items()}


def check_all_set(model: nn.Module, source: str) -> None:
    """One line if a tensor of ``model`` is still on the meta device (the file did not hold it)."""
    left = [n for n, t in chain(model.named_parameters(), model.named_buffers()) if t.is_meta]
    if left:
        raise CheckpointError(f"{source}: the model has tensors the checkpoint does not hold ({few(left)})")


def image_size(config) -> int:
    """Pixels per image side of the images a model of ``config`` makes."""
    # Latent models see the image shrunk by the VAE; pixel-space ones (1 or 3
    # channels, see ditq.models.vae) see it as is.
    return config.input_size * (1 if config.in_channels in (1, 3) else LATENT_DOWNSAMPLE)


def check_image_size(config, wanted: int | None, source: str) -> None:
    """One line if ``wanted`` (pixels; None: anything) is not the image size of ``config``."""
    if wanted is not None and wanted != image_size(config):
        raise CheckpointError(
            f"{source} holds a model for {image_size(config)} px images "
            f"(input_size {config.input_size}), not {wanted} px; drop image_size or use another file"
        )


def summary(config) -> str:
    """A one-line description of a model config, for error messages."""
    if config.arch == "large-dit":
        return (
            f"Large-DiT(dim={config.dim}, n_layers={config.n_layers}, n_heads={config.n_heads}, "
            f"patch_size={config.patch_size}, input_size={config.input_size}, qk_norm={config.qk_norm}, "
            f"adaln_norm={config.adaln_norm})"
        )
    return (
        f"DiT(depth={config.depth}, hidden_size={config.hidden_size}, num_heads={config.num_heads}, "
        f"patch_size={config.patch_size}, input_size={config.input_size})"
    )


def few(items: list[str], n: int = 3) -> str:
    """The first ``n`` items, and how many more."""
    more = f" (+{len(items) - n} more)" if len(items) > n else ""
    return ", ".join(items[:n]) + more


def numel(shape) -> int:
    """Elements of a tensor of ``shape``."""
    n = 1
    for s in shape:
        n *= int(s)
    return n
