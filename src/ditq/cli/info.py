"""``ditq info PATH``: what a checkpoint holds (format, model config, metadata, size).

Works on every format :func:`ditq.load` reads (:func:`ditq.formats.describe`
does the reading): ditq checkpoints (from their header only, however large),
official DiT state dicts, original DiT training checkpoints, TerDiT folders,
and ADM ``.npz`` sample batches.

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
from typing import Any

# Metadata values longer than this are cut in the readable view (--json shows all).
_MAX_VALUE_CHARS = 100

# Shown on their own lines, so left out of the generic metadata listing.
_SHOWN_KEYS = ("format_version", "model_config", "command")


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
        from ditq.formats import describe

        description = describe(args.path, num_heads=getattr(args, "num_heads", None))
        if description.get("format") == "ditq-safetensors":
            description["kernels"] = _kernels(description["path"])
        text = format_description(description)
    print(json.dumps(description, indent=2, default=str) if args.json else text)
    return 0


def format_description(d: dict[str, Any]) -> str:
    """The readable, aligned text form of :func:`describe`'s dict."""
    from ditq.checkpoint import human_bytes

    meta = d.get("metadata") or {}
    rows: list[tuple[str, str]] = [("path", d["path"])]
    fmt = d["format"]
    if "format_version" in meta:
        fmt += f" (format_version {meta['format_version']})"
    rows.append(("format", fmt))
    rows.append(("file size", f"{human_bytes(d['file_size'])} ({d['file_size']:,} bytes)"))
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
                f"weight codes {human_bytes(b['weight_codes'])}, "
                f"quant params {human_bytes(b['quant_params'])}, "
                f"float {human_bytes(b['float'])}, header {human_bytes(b['header'])} "
                f"(float32: {human_bytes(q['fp32_bytes'])}, {q['fp32_bytes'] / total:.1f}x larger)",
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


def _kernels(path: str) -> dict[str, Any]:
    """The kernel backend ``ditq sample`` would use for this checkpoint on the default device, and what
    its quantized layers would run (header only; see :func:`ditq.pipelines.deploy.describe_kernels`)."""
    from ditq.errors import DitqError
    from ditq.pipelines.deploy import describe_kernels

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
