"""Exact checkpoint sizes of ternary models vs fp32 and bf16, into docs/results/ternary_sizes.json.

    .venv/bin/python scripts/ternary_sizes.py --out docs/results/ternary_sizes.json

Sizes depend on shapes only, so every model is built on the meta device (no memory, no weights):
the embedded model's architecture (ditq-fmnist with the adaLN RMSNorm that ternary training adds),
TerDiT-600M and TerDiT-4.2B, with their ternary layers swapped for packed TernaryLinear modules as
`ditq export` writes them (2-bit codes, one fp32 scale per layer, the rest in fp32).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import sys
from pathlib import Path

import torch

import ditq
from ditq import models, quant
from ditq.checkpoint import atomic_write
from ditq.formats.ternary import checkpoint_sizes
from ditq.quant.ternary import empty_ternary_


def sizes(name: str) -> dict:
    if name == "ditq-fmnist":
        config = dataclasses.replace(ditq.load("ditq-fmnist").config, adaln_norm=True)
        build = lambda: models.DiT(config)  # noqa: E731
    else:
        build = lambda: models.create_model(name)  # noqa: E731
    with torch.device("meta"):
        model = build()
    empty_ternary_(model, quant.TernaryQATConfig())
    s = checkpoint_sizes(model)
    return {"model": name, **s}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="ditq-fmnist,TerDiT-600M,TerDiT-4.2B")
    p.add_argument("--out", required=True)
    args = p.parse_args()
    rows = [sizes(m) for m in args.models.split(",")]
    for r in rows:
        print(
            f"{r['model']:12s} ternary checkpoint {r['tensor_bytes']:>14,} B; fp32 {r['fp32_bytes']:>14,} B "
            f"({r['vs_fp32']:.1f}x smaller); bf16 {r['bf16_bytes']:>14,} B ({r['vs_bf16']:.1f}x)"
        )
    payload = {
        "date": datetime.date.today().isoformat(),
        "command": " ".join(["scripts/ternary_sizes.py", *sys.argv[1:]]),
        "note": "tensor bytes of the checkpoint as ditq export writes it (fp32 float rest); file = + header",
        "rows": rows,
    }
    with atomic_write(Path(args.out)) as tmp:
        tmp.write_text(json.dumps(payload, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
