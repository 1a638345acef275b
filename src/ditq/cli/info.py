"""``ditq info PATH``: what a checkpoint holds (format, model config, metadata, size).

Works on ditq checkpoints (read from their header only, however large),
official DiT state dicts and original DiT training checkpoints.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from ditq.images import describe_npz
from ditq.models.hub import describe

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
        description = describe_npz(args.path)
        text = "\n".join(
            [f"path     {description['path']}", f"format   {description['format']}"]
            + [f"  {k:<6} {v['dtype']} {tuple(v['shape'])}" for k, v in description["arrays"].items()]
        )
    else:
        description = describe(args.path, num_heads=getattr(args, "num_heads", None))
        text = format_description(description)
    print(json.dumps(description, indent=2, default=str) if args.json else text)
    return 0


def format_description(d: dict[str, Any]) -> str:
    """The readable, aligned text form of :func:`ditq.models.hub.describe`'s dict."""
    meta = d.get("metadata") or {}
    rows: list[tuple[str, str]] = [("path", d["path"])]
    fmt = d["format"]
    if "format_version" in meta:
        fmt += f" (format_version {meta['format_version']})"
    rows.append(("format", fmt))
    rows.append(("file size", f"{_human_bytes(d['file_size'])} ({d['file_size']:,} bytes)"))
    dtypes = ", ".join(f"{k}: {v}" for k, v in d.get("dtypes", {}).items())
    rows.append(("tensors", f"{d['num_tensors']} ({d['num_parameters']:,} parameters; {dtypes})"))
    if d.get("state_dict"):
        rows.append(("weights", f"'{d['state_dict']}' of the training checkpoint"))
    config = d.get("config")
    if config:
        rows.append(("model", " ".join(f"{k}={v}" for k, v in config.items())))
    else:
        rows.append(("model", f"unknown: {d.get('config_error', 'no model_config')}"))
    if meta.get("command"):
        rows.append(("command", str(meta["command"])))
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
