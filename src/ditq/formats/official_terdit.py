"""Official TerDiT checkpoints (Lucky-Lance/TerDiT): loading them, and the class labels they use.

A TerDiT release is a folder with two pickles:

* ``consolidated_ema_ternary.00-of-01.pth`` -- the state dict of ``DiT_Llama``
  with ternary layers (attention ``wq/wk/wv/wo``, feed-forward ``w1/w2/w3``
  and each block's ``adaLN_modulation.1``) stored as ``weight`` uint8
  ``[out/4, in]`` (2-bit codes ``W̃+1``, ``"terdit"`` layout of
  :mod:`ditq.kernels.packing`) plus ``alphas`` (one float per layer);
* ``model_args.pth`` -- the ``argparse.Namespace`` of Large-DiT's ``train.py``;
  ``model`` (``DiT_Llama_600M_patch2``...), ``image_size``, ``num_classes``
  and ``qk_norm`` are the fields sampling needs.

:func:`load_official` (and so :func:`ditq.load` given such a folder, or its
``consolidated*.pth`` file) builds a :class:`~ditq.models.large_dit.LargeDiT`
whose ternary layers are :class:`ditq.quant.TernaryLinear`, and loads the
weights strictly. The packed weights are **repacked** at load time into
ditq's ``"k4"`` layout (four consecutive inputs per byte, what ditq's kernels
read); ``TernaryLinear`` does that in its ``_load_from_state_dict``, so a plain
``model.load_state_dict(official_state_dict)`` works too. Key names stay the
official ones. Outputs match the original inference code to a few 1e-6
(max abs difference on the fixture, float32 on CPU).

Both files are read with ``torch.load(weights_only=True)``; ``argparse.Namespace``
is the one extra class let in (it only holds attribute values).

**Class labels.** TerDiT was trained on an ImageFolder of folders named by
ImageNet id, so its label for ImageNet class ``k`` is the position of
``str(k)`` in the sorted list ``["0", "1", "10", "100", ...]`` (its
``class_to_idx.json``: 89 -> 878). Loaded models carry
``config.label_order = "lexicographic"``; :func:`ditq.models.map_class_labels` (or
``model.map_labels``) turns ImageNet ids into those labels. The null label
(``num_classes``, 1000) is not remapped, as in the original ``sample.py``.
Sampling code should call it on the class ids before the model sees them::

    y = ditq.models.map_class_labels(model, y)   # identity for models trained on plain ids
"""

from __future__ import annotations

import argparse
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ditq.errors import CheckpointError, InvalidArgumentError
from ditq.formats import build, pickles
from ditq.models import registry
from ditq.models.large_dit import LargeDiT, LargeDiTConfig, lexicographic_label_table
from ditq.quant.fuse import fuse_
from ditq.quant.ternary import TernaryLinear, TernaryQATConfig, empty_ternary_

CHECKPOINT_FILE = "consolidated_ema_ternary.00-of-01.pth"
ARGS_FILE = "model_args.pth"

OFFICIAL_SIZES: dict[str, tuple[int, int, int]] = {
    "DiT_Llama_600M_patch2": (1536, 16, 32),
    "DiT_Llama_3B_patch2": (3072, 32, 32),  # TerDiT's "4.2B"
    "DiT_Llama_7B_patch2": (4096, 32, 32),
}
"""``args.model`` of Large-DiT's ``train.py`` -> (dim, n_layers, n_heads)."""

IMAGENET_CLASS_TO_IDX: list[int] = lexicographic_label_table(1000)
"""TerDiT's ``class_to_idx.json`` as a list: ``IMAGENET_CLASS_TO_IDX[imagenet_id]`` = checkpoint label."""

TERNARY_SELECTION = TernaryQATConfig(preset="large-dit", quantize_adaln=True)
"""The layers that are ternary in official checkpoints (the large-dit preset with adaLN)."""

PathLike = str | os.PathLike


#################################################################################
#                                  Public API                                   #
#################################################################################


def is_official_checkpoint(path: PathLike) -> bool:
    """True for a folder with a TerDiT checkpoint or ``model_args.pth``, or a ``consolidated*.pth`` file."""
    p = Path(path).expanduser()
    if p.is_dir():
        return (p / CHECKPOINT_FILE).is_file() or (p / ARGS_FILE).is_file() or bool(_consolidated(p))
    return p.is_file() and p.name.startswith("consolidated") and p.suffix == ".pth"


def load_official(
    path: PathLike,
    *,
    device: str | torch.device = "cpu",
    num_heads: int | None = None,
    image_size: int | None = None,
) -> LargeDiT:
    """An official TerDiT checkpoint (folder, or its ``consolidated*.pth`` beside ``model_args.pth``) as a
    :class:`LargeDiT` with packed :class:`~ditq.quant.TernaryLinear` layers, in eval mode on ``device``.

    ``num_heads`` is needed only when ``args.model`` is not an official size
    (heads cannot be read off the shapes). ``image_size`` (pixels), when
    given, must be the one the checkpoint was trained at.
    """
    ckpt_path, args_path = find_files(path)
    args = read_args(args_path)
    state_dict = _read_state_dict(ckpt_path)
    shapes = {k: tuple(v.shape) for k, v in state_dict.items()}
    config = config_from_args(args, shapes, num_heads=num_heads, source=str(ckpt_path))
    if image_size is not None and image_size != config.input_size * build.LATENT_DOWNSAMPLE:
        raise CheckpointError(
            f"{ckpt_path} holds a model for {config.input_size * build.LATENT_DOWNSAMPLE} px images "
            f"(model_args.pth image_size), not {image_size} px; drop image_size or use another checkpoint"
        )
    model = build_skeleton(config)
    build.check_fits(official_shapes(model), state_dict, str(ckpt_path), config)
    reference = model.state_dict()
    loaded = {}
    for k, v in state_dict.items():
        if reference[k].dtype == torch.uint8:
            if v.dtype != torch.uint8:
                raise CheckpointError(
                    f"{ckpt_path}: {k} is {str(v.dtype).removeprefix('torch.')}, but packed ternary weights "
                    "must be uint8; is this a TerDiT ternary checkpoint?"
                )
            loaded[k] = v
        else:  # float checkpoints of any precision load in the model's float32, as sample.py's copy does
            loaded[k] = v.to(reference[k].dtype)
    model.load_state_dict(loaded, strict=True, assign=True)
    # Weight-only ternary layers take no int8 tokens, so this swaps nothing today; it keeps every loader
    # of quantized layers handing back deployed, fused models (see ditq.quant.fuse).
    return fuse_(model).to(device).eval()


def describe_official(path: PathLike, *, num_heads: int | None = None) -> dict[str, Any]:
    """What a TerDiT checkpoint holds, as :func:`ditq.formats.describe` gives it (``"terdit-official"``).

    ``num_parameters`` counts weights, not bytes: each packed uint8 holds four
    ternary weights. ``metadata`` has the plain fields of ``model_args.pth``.
    """
    ckpt_path, args_path = find_files(path)
    args = read_args(args_path)
    state_dict = _read_state_dict(ckpt_path)
    shapes = {k: tuple(v.shape) for k, v in state_dict.items()}
    out: dict[str, Any] = {
        "path": str(ckpt_path),
        "format": FORMAT,
        "file_size": ckpt_path.stat().st_size,
    }
    try:
        out["config"] = config_from_args(args, shapes, num_heads=num_heads, source=str(ckpt_path)).to_dict()
    except CheckpointError as e:
        out["config"], out["config_error"] = None, str(e)
    out["metadata"] = {"args": args}
    out["num_tensors"] = len(state_dict)
    out["num_parameters"] = sum(v.numel() * (4 if v.dtype == torch.uint8 else 1) for v in state_dict.values())
    dtypes = [str(v.dtype).removeprefix("torch.") for v in state_dict.values()]
    out["dtypes"] = {d: dtypes.count(d) for d in sorted(set(dtypes))}
    return out


def find_files(path: PathLike) -> tuple[Path, Path]:
    """``(checkpoint, model_args.pth)`` of a TerDiT folder or checkpoint file; one-line errors if absent."""
    p = Path(path).expanduser()
    if p.is_dir():
        ckpt = p / CHECKPOINT_FILE
        if not ckpt.is_file():
            found = _consolidated(p)
            if len(found) != 1:
                what = f"several ({', '.join(f.name for f in found)})" if found else "none"
                raise CheckpointError(
                    f"{p} has no {CHECKPOINT_FILE} and {what} other consolidated*.pth; "
                    "give the checkpoint file's path"
                )
            ckpt = found[0]
        folder = p
    elif p.is_file():
        ckpt, folder = p, p.parent
    else:
        raise CheckpointError(f"checkpoint not found: {p}; check the path")
    args = folder / ARGS_FILE
    if not args.is_file():
        raise CheckpointError(
            f"{folder} has no {ARGS_FILE} beside {ckpt.name}; TerDiT checkpoints need it "
            "(download it from the same release)"
        )
    return ckpt, args


def read_args(path: PathLike) -> dict[str, Any]:
    """The plain fields of ``model_args.pth`` (an ``argparse.Namespace``, or a dict) as a dict."""
    obj = pickles.torch_load(Path(path))
    if isinstance(obj, argparse.Namespace):
        obj = vars(obj)
    if not isinstance(obj, Mapping):
        raise CheckpointError(
            f"{path} holds a {type(obj).__name__}, not the argparse Namespace of Large-DiT's train.py"
        )
    return {str(k): v for k, v in obj.items() if pickles.is_plain(v)}


def config_from_args(
    args: Mapping[str, Any],
    shapes: Mapping[str, tuple[int, ...]],
    *,
    num_heads: int | None = None,
    source: str = "TerDiT checkpoint",
) -> LargeDiTConfig:
    """The :class:`LargeDiTConfig` of an official checkpoint, from ``model_args.pth`` and tensor shapes.

    Sizes (dim, layers, channels, classes, learned sigma, QK-norm, adaLN
    RMSNorm) are read off the shapes; ``image_size`` (required) gives
    ``input_size = image_size / 8``; heads and patch size come from
    ``args.model`` (``DiT_Llama_600M_patch2``), else ``num_heads`` / the
    registry. Values ``model_args.pth`` states must agree with the weights.
    """
    for key in ("x_embedder.weight", "y_embedder.embedding_table.weight", "final_layer.linear.weight"):
        if key not in shapes:
            raise CheckpointError(
                f"{source} is not a TerDiT/Large-DiT state dict (no {key}); "
                "ditq reads Lucky-Lance/TerDiT checkpoints"
            )
    model_name = str(args.get("model", ""))
    m = re.search(r"patch(\d+)", model_name)
    patch = int(m.group(1)) if m else int(args.get("patch_size", 2))
    dim, x_in = shapes["x_embedder.weight"]
    if x_in % (patch * patch):
        raise CheckpointError(f"{source}: x_embedder takes {x_in} features, not channels x patch {patch}^2")
    in_channels = x_in // (patch * patch)
    out = shapes["final_layer.linear.weight"][0]
    if out not in (x_in, 2 * x_in):
        raise CheckpointError(
            f"{source}: final_layer.linear has {out} outputs, neither 1x nor 2x the {x_in} patch features"
        )
    n_layers = len({int(g.group(1)) for k in shapes if (g := re.match(r"layers\.(\d+)\.", k))})
    num_classes = shapes["y_embedder.embedding_table.weight"][0] - 1
    qk_norm = "layers.0.attention.q_norm.weight" in shapes
    for name, found in (("num_classes", num_classes), ("qk_norm", qk_norm)):
        if name in args and args[name] != found:
            raise CheckpointError(
                f"{source}: {ARGS_FILE} says {name}={args[name]!r} but the weights have {name}={found!r}; "
                "the two files do not belong together"
            )
    if "image_size" not in args:
        raise CheckpointError(
            f"{source}: {ARGS_FILE} has no image_size; it is not a Large-DiT train.py Namespace"
        )
    image_size = int(args["image_size"])
    if image_size % build.LATENT_DOWNSAMPLE:
        raise CheckpointError(f"{source}: image_size {image_size} in {ARGS_FILE} is not a multiple of 8")
    heads = num_heads or _heads(model_name, dim, n_layers)
    if heads is None:
        raise CheckpointError(
            f"{source}: cannot tell the attention heads of a dim-{dim}, {n_layers}-layer Large-DiT "
            f"(model {model_name!r} is not an official size); pass num_heads= (--num-heads in the CLI)"
        )
    config = LargeDiTConfig(
        input_size=image_size // build.LATENT_DOWNSAMPLE,
        patch_size=patch,
        in_channels=in_channels,
        dim=dim,
        n_layers=n_layers,
        n_heads=heads,
        num_classes=num_classes,
        learn_sigma=out == 2 * x_in,
        qk_norm=qk_norm,
        adaln_norm="layers.0.adaLN_modulation.2.weight" in shapes,
        label_order="lexicographic",
    )
    try:
        config.validate()
    except InvalidArgumentError as e:
        raise CheckpointError(f"{source}: {e}") from None
    return config


def build_skeleton(config: LargeDiTConfig) -> LargeDiT:
    """A :class:`LargeDiT` on the meta device whose TerDiT layers are empty :class:`TernaryLinear`."""
    with torch.device("meta"):
        model = LargeDiT(config)
    try:
        empty_ternary_(model, TERNARY_SELECTION)
    except InvalidArgumentError as e:
        raise CheckpointError(f"this Large-DiT cannot hold packed ternary weights: {e}") from None
    return model


def official_shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """State-dict shapes of an official checkpoint for ``model`` (packed weights ``[out/4, in]``)."""
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    for name, layer in model.named_modules():
        if isinstance(layer, TernaryLinear):
            if layer.out_features % 4:
                raise CheckpointError(
                    f"layer {name} has {layer.out_features} outputs, not divisible by 4: official TerDiT "
                    "packing stores four output rows per byte, so no checkpoint fits this config"
                )
            shapes[f"{name}.weight"] = (layer.out_features // 4, layer.in_features)
    return shapes


#################################################################################
#                                    Helpers                                    #
#################################################################################


def _consolidated(folder: Path) -> list[Path]:
    return sorted(f for f in folder.glob("consolidated*.pth") if f.is_file())


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    obj = pickles.torch_load(path)
    if not isinstance(obj, Mapping) or not pickles.is_state_dict(obj):
        raise CheckpointError(f"{path} is not a state dict (a flat mapping of names to tensors)")
    return dict(obj)


def _heads(model_name: str, dim: int, n_layers: int) -> int | None:
    official = OFFICIAL_SIZES.get(model_name)
    if official is not None and official[:2] == (dim, n_layers):
        return official[2]
    for d, n, h in OFFICIAL_SIZES.values():
        if (d, n) == (dim, n_layers):
            return h
    for name in registry.list_models("large-dit"):
        c = registry.MODEL_CONFIGS[name]
        if (c.dim, c.n_layers) == (dim, n_layers):
            return c.n_heads
    return None


FORMAT = "terdit-official"
"""``describe()['format']`` of an official TerDiT checkpoint."""

__all__ = [
    "ARGS_FILE",
    "FORMAT",
    "CHECKPOINT_FILE",
    "IMAGENET_CLASS_TO_IDX",
    "OFFICIAL_SIZES",
    "build_skeleton",
    "config_from_args",
    "describe_official",
    "find_files",
    "is_official_checkpoint",
    "load_official",
    "official_shapes",
    "read_args",
]
