"""``ditq export``: pack a ternary QAT run into a 2-bit checkpoint (what ``ditq sample`` loads).

    ditq export out/terdit_600m --out terdit-600m.safetensors         # the run's newest training state
    ditq export out/terdit_600m/checkpoints/step_0400000.pt --out t.safetensors --weights model
    ditq export t.safetensors --out t-bf16.safetensors --float-dtype bfloat16 --sizes sizes.json

The source is a ``ditq train`` output folder or one of its training states
(a run with a ``quant: {method: ternary}`` section; its EMA by default), or a
ternary checkpoint to rewrite. The file holds the ternary weights packed four
per byte (layout ``k4``), one scale per layer and the float rest; the layout is
documented in ``ditq.formats.ternary``. It prints the exact size against float32
and bfloat16; ``--sizes`` writes that breakdown as JSON.
"""

from __future__ import annotations

import argparse
import json
import shlex

from ditq.errors import InvalidArgumentError


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``export`` on ``subparsers``; sets ``func=run``."""
    p = subparsers.add_parser(
        "export",
        help="pack a ternary QAT run (TerDiT) into a 2-bit checkpoint, and report its size",
        description=__doc__.split("\n\n")[0],
    )
    p.add_argument(
        "source", help="a ditq train output folder, a training state (.pt) or a ternary checkpoint"
    )
    p.add_argument("--out", required=True, help="the checkpoint to write (.safetensors)")
    p.add_argument(
        "--weights",
        choices=("auto", "ema", "model"),
        default="auto",
        help="from a training state: the EMA weights, the raw ones, or auto (default): what the run "
        "exports itself (checkpoint.export; raw weights for ternary QAT unless the run says ema)",
    )
    p.add_argument(
        "--float-dtype",
        choices=("float32", "float16", "bfloat16"),
        default=None,
        help="store the full-precision rest (embedders, final layer, norms, scales, biases) in this dtype "
        "(default: as trained)",
    )
    p.add_argument("--sizes", default=None, metavar="PATH", help="also write the byte breakdown as JSON")
    p.add_argument(
        "--seed", type=int, default=0, help="taken by every command; exporting draws nothing random"
    )
    p.add_argument("--quiet", action="store_true", help="no messages")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    """Export, print the size line, write ``--sizes``."""
    from ditq.checkpoint import atomic_write
    from ditq.pipelines.qat import export_ternary

    if not str(args.out).endswith(".safetensors"):
        raise InvalidArgumentError(f"--out must be a .safetensors file, got {args.out}")
    result = export_ternary(
        args.source,
        args.out,
        weights=args.weights,
        float_dtype=args.float_dtype,
        command=_command(args),
        log=None if args.quiet else print,
    )
    if args.sizes:
        data = (json.dumps({"checkpoint": str(result.path), **result.sizes}, indent=2) + "\n").encode()
        with atomic_write(args.sizes, "size breakdown", size_hint=len(data)) as tmp:
            tmp.write_bytes(data)
    return 0


def _command(args: argparse.Namespace) -> str:
    parts = ["ditq", "export", str(args.source), "--out", str(args.out)]
    if args.weights != "auto":
        parts += ["--weights", args.weights]
    if args.float_dtype:
        parts += ["--float-dtype", args.float_dtype]
    return shlex.join(parts)
