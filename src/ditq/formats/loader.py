"""The one loader and saver: every checkpoint format ditq reads, dispatched by what the file is.

:func:`load` takes

- a model shipped in the package (``"ditq-fmnist"``);
- a registry name with official weights (``"DiT-XL/2"``, ``image_size`` 256 or
  512; :mod:`ditq.formats.official_dit`), cached after one download;
- an official DiT state dict or original training checkpoint (a ``.pt``);
- an official TerDiT folder, or its ``consolidated*.pth`` file
  (:mod:`ditq.formats.official_terdit`);
- a ditq safetensors checkpoint, dispatched on its metadata's ``quant_kind``:
  none for full precision (:mod:`ditq.formats.ditq_float`), ``"qdit"``
  (:mod:`ditq.formats.qdit`) or ``"ternary"`` (:mod:`ditq.formats.ternary`);
- a safetensors file without ditq metadata holding a DiT state dict.

What a file is comes from its first bytes, never from its name. Every file
that is not what it should be (random bytes, empty, text, truncated, a header
that lies about its size, a pickled class, another model's weights) is one
:class:`~ditq.errors.CheckpointError` line. :func:`describe` (what ``ditq
info`` prints) reads through the same dispatch, from headers alone where the
format allows.
"""

from __future__ import annotations

import os
import re
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ditq import checkpoint as ckpt
from ditq.errors import CheckpointError, UnknownModelError
from ditq.formats import build, ditq_float, official_dit, official_terdit, pickles, qdit, ternary
from ditq.models import registry

PathLike = str | os.PathLike

EMBEDDED_MODELS = {"ditq-fmnist": "ditq-fmnist.safetensors"}
"""Models trained by ditq and shipped in the package (``ditq/assets``), loadable by name."""

QUANT_KINDS = ("qdit", "ternary")
"""``quant_kind`` values of quantized ditq checkpoints (absent: full precision)."""

# Suffixes that mark an argument as a file path rather than a mistyped model name.
_CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".safetensors")


def load(
    name_or_path: PathLike,
    *,
    device: str | torch.device = "cpu",
    backend: str | None = None,
    image_size: int | None = None,
    cache_dir: PathLike | None = None,
    download: bool = True,
    num_heads: int | None = None,
    progress: bool | None = None,
    packed: bool = True,
) -> nn.Module:
    """A model with its weights, in eval mode on ``device``; ``model.config`` is its config.

    Quantized checkpoints come back as deployed models (integer layers, codes
    packed where ``packed``) with ``model.quant_config`` set. ``backend``, when
    given (``"auto"``, ``"cpu"``, ``"triton"``, ``"reference"``), is checked
    against ``device`` and made the process's kernel backend
    (:func:`ditq.kernels.set_backend`). ``image_size`` (pixels), when given,
    must be the model's. ``cache_dir`` overrides ``$DITQ_CACHE`` for official
    weights; ``download=False`` makes a missing one an error instead of a
    download; ``progress`` shows its download bar. ``num_heads`` is needed only
    for a state dict whose size is not in the registry (heads cannot be read off
    tensor shapes).
    """
    if backend is not None:
        _use_backend(backend, device)
    key = str(name_or_path)
    if key in EMBEDDED_MODELS and not Path(key).is_file():
        model = _load_file(embedded_model_file(key), num_heads=num_heads, packed=packed)
    elif key in registry.MODEL_CONFIGS and not Path(key).is_file():
        model = official_dit.load_official(
            key, image_size=image_size, cache_dir=cache_dir, download=download, progress=progress
        )
    elif official_terdit.is_official_checkpoint(name_or_path):
        model = official_terdit.load_official(name_or_path, num_heads=num_heads, image_size=image_size)
    else:
        path = checkpoint_path(name_or_path)
        model = _load_file(path, num_heads=num_heads, packed=packed)
        build.check_image_size(model.config, image_size, str(path))
    return model.to(device).eval()


def save(
    model: nn.Module,
    path: PathLike,
    *,
    config=None,
    command: str | None = None,
    extra_metadata: dict | None = None,
    float_dtype: str | torch.dtype | None = None,
) -> Path:
    """Write ``model`` as the ditq checkpoint its layers call for, atomically; returns the path.

    A model with Q-DiT layers is written as a Q-DiT file, one with packed
    ternary layers as a ternary file, anything else in full precision.
    ``config`` is the quantization config to record (default: the model's
    ``quant_config``, as :func:`load` and ``quantize_`` leave it); ``command``
    what made the file; ``float_dtype`` casts the floats of a ternary file.
    """
    from ditq import quant

    if any(isinstance(m, (quant.TernaryLinear, quant.TernaryQATLinear)) for m in model.modules()):
        return ternary.save_ternary(
            model,
            path,
            config if config is not None else _ternary_config(model),
            command=command,
            extra_metadata=extra_metadata,
            float_dtype=float_dtype,
        )
    if float_dtype is not None:
        raise CheckpointError("float_dtype applies to ternary checkpoints only")
    if quant.quantized_layers(model):
        config = config if config is not None else getattr(model, "quant_config", None)
        if not isinstance(config, quant.QDiTConfig):
            raise CheckpointError(
                "pass the QDiTConfig the model was quantized with (config=...); the model does not carry one"
            )
        return qdit.save(model, path, config, command=command, extra_metadata=extra_metadata)
    return ditq_float.write(model, path, command=command, extra_metadata=extra_metadata)


def kind(path: PathLike) -> str:
    """What a file or folder is: ``"ditq"``, ``"qdit"``, ``"ternary"`` (ditq checkpoints),
    ``"safetensors"`` (without ditq metadata), ``"torch"`` (a ``torch.save`` pickle) or
    ``"terdit-official"``; one-line :class:`CheckpointError` for anything else."""
    if official_terdit.is_official_checkpoint(path):
        return official_terdit.FORMAT
    path = checkpoint_path(path)
    if _looks_like_safetensors(path):
        _, raw_meta = ckpt.read_safetensors_header(path)
        if ckpt.METADATA_KEY not in raw_meta:
            return "safetensors"
        meta = ckpt.read_metadata(path)
        quant_kind = meta.get("quant_kind") or ("qdit" if "quant_config" in meta else None)
        if quant_kind is None:
            return "ditq"
        if quant_kind not in QUANT_KINDS:
            raise CheckpointError(
                f"{path} holds a '{quant_kind}' quantized model, which this ditq does not read "
                f"(it reads {', '.join(QUANT_KINDS)}); a newer ditq wrote it"
            )
        return quant_kind
    if pickles.looks_like_torch_file(path):
        return "torch"
    raise CheckpointError(
        f"{path} is not a checkpoint: neither a safetensors file nor a PyTorch file (torch.save)"
        f"{' (it is empty)' if path.stat().st_size == 0 else ''}; give a checkpoint's path"
    )


def is_quantized(path: PathLike) -> bool:
    """Whether ``path`` is a quantized ditq checkpoint (Q-DiT or ternary); False for anything else."""
    try:
        return kind(path) in QUANT_KINDS
    except CheckpointError:
        return False


def skeleton(path: PathLike) -> nn.Module | None:
    """The model of a quantized checkpoint on the meta device, its quantized layers swapped in (nothing is
    read but the header), for asking what its layers would run; None for a float checkpoint."""
    what = kind(path)
    if what == "qdit":
        return qdit.skeleton(path)
    if what == "ternary":
        return ternary.skeleton(path)
    return None


def describe(path: PathLike, *, num_heads: int | None = None) -> dict[str, Any]:
    """What a checkpoint holds, without building a model.

    Returns ``path``, ``format`` (``"ditq-safetensors"``, ``"safetensors"``
    for one without ditq metadata, ``"dit-official"``, ``"dit-training"``,
    ``"terdit-official"``), ``file_size`` (bytes), ``config`` (a dict; None with
    ``config_error`` when it cannot be worked out), ``metadata`` (ditq
    metadata, or the training ``args`` and other plain entries),
    ``num_tensors``, ``num_parameters`` and ``dtypes`` (tensor count per dtype).
    ditq checkpoints are described from their header alone; pickles must be
    read whole.

    For a quantized ditq checkpoint the stored tensors are codes and scales,
    not weights, so ``num_parameters`` is the parameter count of the model it
    stands for, ``num_stored_values`` the stored elements, and ``quantized``
    holds ``kind``, ``layers``, ``weights``, ``bits_per_weight`` (as stored),
    ``bytes`` (``weight_codes``, ``quant_params``, ``float``, ``header``) and
    ``fp32_bytes``. When those cannot be worked out, ``quantized_error`` says
    why and the counts stay as stored.
    """
    key = str(path)
    if key in EMBEDDED_MODELS and not Path(key).is_file():
        path = embedded_model_file(key)
    what = kind(path)
    if what == official_terdit.FORMAT:
        return official_terdit.describe_official(path, num_heads=num_heads)
    path = checkpoint_path(path)
    if what == "torch":
        out, shapes, dtypes = official_dit.describe_file(path, num_heads=num_heads)
    else:
        out = {"path": str(path), "file_size": path.stat().st_size}
        info, raw_meta = ckpt.read_safetensors_header(path)
        shapes = {k: tuple(v["shape"]) for k, v in info.items()}
        dtypes = [build.dtype_name(v["dtype"]) for v in info.values()]
        if what == "safetensors":
            out["format"] = "safetensors"
            out["metadata"] = dict(raw_meta)
            official_dit.describe_config(out, shapes, num_heads, None)
        else:
            meta = ckpt.read_metadata(path)
            out["format"] = ditq_float.FORMAT
            out["config"] = meta.get("model_config")
            out["metadata"] = meta
            if what == "ditq":  # a float file's tensors must be its model's (quantized ones: see below)
                config = build.config_from_metadata(meta, str(path))
                build.check_fits(build.expected_shapes(config), build.meta_tensors(shapes), str(path), config)
    out["num_tensors"] = len(shapes)
    out["num_parameters"] = sum(build.numel(s) for s in shapes.values())
    out["dtypes"] = {d: dtypes.count(d) for d in sorted(set(dtypes))}
    if what in QUANT_KINDS:
        _check_names(path, set(shapes))
        _describe_quantized(out, what)
    order = ["path", "format", "file_size", "config", "config_error", "state_dict", "num_tensors"]
    return {k: out[k] for k in sorted(out, key=lambda k: order.index(k) if k in order else len(order))}


def embedded_model_path(name: str = "ditq-fmnist") -> Path | None:
    """The file of a model shipped inside the package (``"ditq-fmnist"``), or ``None`` if absent."""
    if name not in EMBEDDED_MODELS:
        raise UnknownModelError(f"unknown embedded model '{name}'; known: {', '.join(EMBEDDED_MODELS)}")
    asset = resources.files("ditq").joinpath("assets", EMBEDDED_MODELS[name])
    return Path(str(asset)) if asset.is_file() else None


def embedded_model_file(name: str) -> Path:
    """:func:`embedded_model_path`, or a one-line error saying how to get the model if it is absent."""
    path = embedded_model_path(name)
    if path is None:
        raise CheckpointError(
            f"the embedded model '{name}' is not in this install "
            f"(expected ditq/assets/{EMBEDDED_MODELS[name]}); "
            "reinstall ditq, or train one with: ditq train --config configs/fmnist_tiny.yaml"
        )
    return path


def checkpoint_path(name_or_path: PathLike) -> Path:
    """``name_or_path`` as an existing file; one-line errors for a folder, a missing file, a mistyped name."""
    path = Path(name_or_path).expanduser()
    if path.is_file():
        return path
    if path.is_dir():
        raise CheckpointError(
            f"{path} is a folder, not a checkpoint file (nor a TerDiT folder with model_args.pth); "
            "give the file's path"
        )
    text = str(name_or_path)
    # "DiT-Q/2" is a mistyped model name rather than a missing file.
    if not text.endswith(_CHECKPOINT_SUFFIXES) and re.fullmatch(r"[A-Za-z][\w.-]*/\d+", text):
        official = sorted({n for n, _ in official_dit.OFFICIAL_WEIGHTS})
        raise UnknownModelError(
            f"unknown model '{text}' and no such file; registered: {', '.join(registry.MODEL_CONFIGS)} "
            f"(official weights: {', '.join(official)})"
        )
    raise CheckpointError(f"checkpoint not found: {path}; check the path")


#################################################################################
#                                    Helpers                                    #
#################################################################################


def _load_file(path: Path, *, num_heads: int | None, packed: bool) -> nn.Module:
    what = kind(path)
    if what == "qdit":
        return qdit.load(path, packed=packed)
    if what == "ternary":
        return ternary.load(path)
    if what == "ditq":
        return ditq_float.load(path, ckpt.read_metadata(path))
    if what == "safetensors":  # a DiT state dict saved as safetensors by someone else
        tensors = ckpt.load_tensors(path)
        config = official_dit.infer_config(tensors, num_heads=num_heads, source=str(path))
        return build.build_model(config, tensors, str(path))
    return official_dit.load_file(path, num_heads=num_heads)


def _looks_like_safetensors(path: Path) -> bool:
    """A safetensors file starts with its header length, then ``{``; a lying length is still one."""
    try:
        with open(path, "rb") as f:
            head = f.read(9)
    except OSError:
        return False
    return len(head) == 9 and head[8:9] == b"{"


def _check_names(path: Path, names: set[str]) -> None:
    """One line if a quantized file's tensors are not those of the model its metadata describes."""
    expected = set(skeleton(path).state_dict())
    missing, unexpected = sorted(expected - names), sorted(names - expected)
    if missing or unexpected:
        problems = ([f"missing {build.few(missing)}"] if missing else []) + (
            [f"unexpected {build.few(unexpected)}"] if unexpected else []
        )
        raise CheckpointError(f"{path} does not fit the model of its own metadata: {'; '.join(problems)}")


def _describe_quantized(out: dict, what: str) -> None:
    try:
        if what == "ternary":
            s = ternary.checkpoint_sizes(out["path"])
            t = s["ternary"]
            sizes = {
                "params": s["float_params"],
                "layers": t["layers"],
                "weights": t["weights"],
                "bits_per_weight": t["bits_per_weight"],
                "bytes": {
                    "weight_codes": t["packed_bytes"],
                    "quant_params": t["scale_bytes"],
                    "float": t["bias_bytes"] + s["full_precision"]["bytes"],
                    "header": s["file_bytes"] - s["tensor_bytes"],
                },
            }
        else:
            sizes = qdit.sizes(out["path"])
    except CheckpointError as e:
        out["quantized_error"] = str(e)
        return
    params = sizes.pop("params")
    out["num_stored_values"] = out["num_parameters"]
    out["num_parameters"] = params
    out["quantized"] = {"kind": what, **sizes, "fp32_bytes": 4 * params}


def _ternary_config(model: nn.Module):
    config = getattr(model, "quant_config", None)
    from ditq.quant import TernaryQATConfig

    return config if isinstance(config, TernaryQATConfig) else None


def _use_backend(backend: str, device) -> None:
    from ditq.common import resolve_device
    from ditq.kernels import ops

    ops.check_backend(backend)  # KernelError (a DitqError): one line naming the available ones
    ops.resolve_backend(resolve_device(device), backend)
    ops.set_backend(backend)
