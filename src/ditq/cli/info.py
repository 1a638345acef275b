"""``ditq info PATH``: what a checkpoint holds (format, model config, metadata, size).

Works on ditq checkpoints (read from their header only, however large),
official DiT state dicts and original DiT training checkpoints.

For quantized ditq checkpoints (Q-DiT from ``ditq ptq``, ternary from
``ditq export``) the stored tensors are codes and scales, not the model's
weights: a packed uint8 of a ternary layer holds four weights, and scales,
zero points and activation ranges are no weights at all. ``num_parameters``
is then the parameter count of the model the file stands for (each quantized
layer counted by its ``[out, in]`` shape), ``num_stored_values`` the elements
of the stored tensors, and ``quantized`` gives the bytes on disk by kind.

Imports of torch and the model code happen in :func:`run`, not at module
level: ``ditq --help`` builds this parser and must not pay for them.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

# Metadata values longer than this are cut in the readable view (--json shows all).
_MAX_VALUE_CHARS = 100

# Shown on their own lines, so left out of the generic metadata listing.
_SHOWN_KEYS = ("format_version", "model_config", "command")

# Bytes per element of the safetensors dtypes (header names).
_DTYPE_BYTES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
}  # fmt: skip

# The integer weight codes of a Q-DiT QuantLinear, ``<layer>.qweight``; its other tensors but the
# bias are quantization parameters (w_scale, w_zero, act_quant.lo/hi; see ditq.quant.nn).
_QDIT_CODES = "qweight"


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``info`` on the top-level ``ditq`` parser."""
    parser = subparsers.add_parser(
        "info",
        help="describe a checkpoint: format, model config, metadata, size",
        description="Describe a checkpoint: a ditq .safetensors file, an official DiT state dict "
        "(.pt) or an original DiT training checkpoint.",
    )
    parser.add_argument("path", help="checkpoint file, or an .npz sample batch")
    parser.add_argument("--json", action="store_true", help="print the description as JSON")
    parser.add_argument(
        "--num-heads",
        type=int,
        default=None,
        help="attention heads, for a state dict whose size is not in the registry (shapes do not show it)",
    )
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    """Print the description of ``args.path``; returns the exit status."""
    if str(args.path).endswith(".npz"):
        from ditq.images import describe_npz

        description = describe_npz(args.path)
        text = "\n".join(
            [f"path     {description['path']}", f"format   {description['format']}"]
            + [f"  {k:<6} {v['dtype']} {tuple(v['shape'])}" for k, v in description["arrays"].items()]
        )
    else:
        description = describe(args.path, num_heads=getattr(args, "num_heads", None))
        if description.get("format") == "ditq-safetensors":
            description["kernels"] = _kernels(description["path"])
        text = format_description(description)
    print(json.dumps(description, indent=2, default=str) if args.json else text)
    return 0


def describe(path, *, num_heads: int | None = None) -> dict[str, Any]:
    """:func:`ditq.models.hub.describe`, with parameters and bytes of quantized checkpoints counted right.

    For a quantized ditq checkpoint (``quant_kind`` ``"ternary"`` or ``"qdit"``),
    ``num_parameters`` becomes the parameter count of the model it stands for,
    ``num_stored_values`` keeps the stored elements, and ``quantized`` holds
    ``kind``, ``layers``, ``weights`` (of the quantized layers),
    ``bits_per_weight`` (as stored), ``bytes`` (``weight_codes``,
    ``quant_params``: scales, zero points, activation ranges; ``float``: every
    other tensor; ``header``) and ``fp32_bytes`` (the same model in float32).
    When the sizes cannot be worked out, ``quantized_error`` says why and the
    counts stay as stored.
    """
    from ditq.errors import DitqError
    from ditq.models.hub import describe as describe_file

    d = describe_file(path, num_heads=num_heads)
    meta = d.get("metadata") or {}
    if d.get("format") != "ditq-safetensors":
        return d
    kind = meta.get("quant_kind") or ("qdit" if "quant_config" in meta else None)
    if kind is None:
        return d
    try:
        if kind == "ternary":
            sizes = _ternary_sizes(d["path"])
        elif kind == "qdit":
            sizes = _qdit_sizes(d["path"], meta)
        else:
            d["quantized_error"] = f"quant_kind {kind!r} is not one this ditq counts"
            return d
    except (DitqError, KeyError) as e:
        d["quantized_error"] = f"{type(e).__name__}: {e}" if isinstance(e, KeyError) else str(e)
        return d
    params = sizes.pop("params")
    stored = d["num_parameters"]
    out: dict[str, Any] = {}
    for k, v in d.items():
        if k == "num_parameters":
            out[k] = params
            out["num_stored_values"] = stored
        else:
            out[k] = v
    out["quantized"] = {"kind": kind, **sizes, "fp32_bytes": 4 * params}
    return out


def _ternary_sizes(path: str) -> dict:
    """Counts of a ternary checkpoint from :func:`ditq.quant.export.checkpoint_sizes` (header only)."""
    from ditq.quant.export import checkpoint_sizes

    s = checkpoint_sizes(path)
    t = s["ternary"]
    return {
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


def _qdit_sizes(path: str, meta: dict) -> dict:
    """Counts of a Q-DiT checkpoint: its header, and the layer shapes of its model (built on meta)."""
    import torch

    from ditq import checkpoint as ckpt
    from ditq.errors import CheckpointError, DitqError
    from ditq.models import registry

    info, _ = ckpt.read_safetensors_header(path)
    suffix = "." + _QDIT_CODES
    layers = sorted(k[: -len(suffix)] for k in info if k.endswith(suffix))
    if not layers:
        raise CheckpointError(f"{path} has a quant_config but no quantized layer ({_QDIT_CODES} tensors)")
    try:
        config = registry.config_from_dict(meta["model_config"])
        with torch.device("meta"):  # shapes only: nothing is allocated
            skeleton = registry.build_model(config)
    except (DitqError, TypeError, ValueError) as e:
        raise CheckpointError(f"its model_config does not make a model: {e}") from None
    modules = dict(skeleton.named_modules())
    absent = [n for n in layers if not isinstance(getattr(modules.get(n), "weight", None), torch.Tensor)]
    if absent:
        raise CheckpointError(f"the model of its model_config has no layers {', '.join(absent[:3])}")

    def numel(k: str) -> int:
        return math.prod(int(s) for s in info[k]["shape"])

    def nbytes(k: str) -> int:
        return numel(k) * _DTYPE_BYTES.get(info[k]["dtype"], 0)

    weights = sum(modules[n].weight.numel() for n in layers)
    codes = sum(nbytes(f"{n}{suffix}") for n in layers)
    prefixes = tuple(f"{n}." for n in layers)
    qparam_keys = [
        k for k in info if k.startswith(prefixes) and not k.endswith(suffix) and not k.endswith(".bias")
    ]
    float_keys = [k for k in info if not k.endswith(suffix) and k not in set(qparam_keys)]  # biases too
    tensor_bytes = sum(nbytes(k) for k in info)
    return {
        "params": weights + sum(numel(k) for k in float_keys),
        "layers": len(layers),
        "weights": weights,
        "bits_per_weight": 8 * codes / weights,
        "bytes": {
            "weight_codes": codes,
            "quant_params": sum(nbytes(k) for k in qparam_keys),
            "float": sum(nbytes(k) for k in float_keys),
            "header": Path(path).stat().st_size - tensor_bytes,
        },
    }


def format_description(d: dict[str, Any]) -> str:
    """The readable, aligned text form of :func:`describe`'s dict."""
    meta = d.get("metadata") or {}
    rows: list[tuple[str, str]] = [("path", d["path"])]
    fmt = d["format"]
    if "format_version" in meta:
        fmt += f" (format_version {meta['format_version']})"
    rows.append(("format", fmt))
    rows.append(("file size", f"{_human_bytes(d['file_size'])} ({d['file_size']:,} bytes)"))
    dtypes = ", ".join(f"{k}: {v}" for k, v in d.get("dtypes", {}).items())
    q = d.get("quantized")
    if q:
        rows.append(("tensors", f"{d['num_tensors']} ({d['num_stored_values']:,} stored values; {dtypes})"))
        codes = {"ternary": "ternary"}.get(q["kind"], "quantized")
        rows.append(
            (
                "parameters",
                f"{d['num_parameters']:,} ({q['weights']:,} {codes} weights in {q['layers']} layers, "
                f"stored at {q['bits_per_weight']:g} bits each)",
            )
        )
        b = q["bytes"]
        total = sum(b.values())
        rows.append(
            (
                "bytes",
                f"weight codes {_human_bytes(b['weight_codes'])}, "
                f"quant params {_human_bytes(b['quant_params'])}, "
                f"float {_human_bytes(b['float'])}, header {_human_bytes(b['header'])} "
                f"(float32: {_human_bytes(q['fp32_bytes'])}, {q['fp32_bytes'] / total:.1f}x larger)",
            )
        )
    else:
        rows.append(("tensors", f"{d['num_tensors']} ({d['num_parameters']:,} parameters; {dtypes})"))
        if d.get("quantized_error"):
            rows.append(("quantized", f"sizes unknown: {d['quantized_error']}"))
    if d.get("state_dict"):
        rows.append(("weights", f"'{d['state_dict']}' of the training checkpoint"))
    config = d.get("config")
    if config:
        rows.append(("model", " ".join(f"{k}={v}" for k, v in config.items())))
    else:
        rows.append(("model", f"unknown: {d.get('config_error', 'no model_config')}"))
    if meta.get("command"):
        rows.append(("command", str(meta["command"])))
    if d.get("kernels"):
        rows.append(("kernels", _kernels_line(d["kernels"])))
    width = max(len(k) for k, _ in rows) + 2
    lines = [f"{k:<{width}}{v}" for k, v in rows]

    extra = {k: v for k, v in meta.items() if k not in _SHOWN_KEYS}
    if extra:
        lines.append("metadata")
        key_width = max(len(k) for k in extra) + 2
        cut = False
        for k, v in extra.items():
            text = v if isinstance(v, str) else json.dumps(v, default=str)
            if len(text) > _MAX_VALUE_CHARS:
                text, cut = text[: _MAX_VALUE_CHARS - 3] + "...", True
            lines.append(f"  {k:<{key_width}}{text}")
        if cut:
            lines.append("(long values cut; --json prints them whole)")
    return "\n".join(lines)


def _human_bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "KB", "MB"):
        if size < 1024:
            return f"{n} B" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GB"


def _kernels(path: str) -> dict[str, Any]:
    """The kernel backend ``ditq sample`` would use for this checkpoint on the default device, and what
    its quantized layers would run (header only; see :func:`ditq.pipelines.ptq.describe_kernels`)."""
    from ditq.errors import DitqError
    from ditq.pipelines.ptq import describe_kernels

    try:
        return describe_kernels(path)
    except DitqError as e:
        return {"error": str(e)}


def _kernels_line(k: dict[str, Any]) -> str:
    if "error" in k:
        return f"unknown: {k['error']}"
    head = f"backend {k['backend']}" + (f" -> {k['resolved']}" if k["backend"] == "auto" else "")
    head += f" on {k['device']} (available: {', '.join(k['available'])})"
    if not k["layers"]:
        return head + "; no quantized layers"
    return head + "; " + ", ".join(f"{n} layers {what}" for what, n in k["layers"].items())
