"""Compile the Triton kernels for an NVIDIA GPU (no GPU needed) at the benchmark shapes and report
what each autotuning config compiled to.

For every op and shape of ``bench_kernels.py`` (DiT-XL/2 and TerDiT-4.2B layers,
M in {1, 16, 512, 8192}; the fused producer quantizers at the layers they feed:
LayerNorm and GELU in DiT, RMSNorm and SwiGLU in TerDiT) the host code's real
launch is recorded on ``meta`` tensors and compiled for ``sm_<arch>`` once per
autotuning config its pruning keeps (:mod:`ditq.kernels.triton.aot`). Per
variant: shared memory, registers, stack (spills), the tensor-core instruction
(``wgmma`` / ``mma.sync``), the number of software-pipelined loads, programs,
programs per SM and waves on an H200 (132 SMs). Static facts, not timings: they
show whether a kernel can reach the ceiling and what a GPU run would find.

    python benchmarks/triton_compile.py --arch 90 --json docs/results/triton_compile_sm90.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
from _common import finish, format_table, machine_info
from bench_kernels import SHAPES

from ditq.kernels.triton import aot

GEMM_OPS = ("w8a8_linear", "w158a8_linear", "w4a8_linear", "ternary_linear", "int4_linear")
QUANT_OPS = ("quantize_per_token_int8", "quantize_per_token_asym")
PRODUCER_LAYERS = {  # fused producer + quantizer -> the layers whose input it makes (others skipped)
    "layernorm_modulate_quantize_int8": ("DiT-XL/2 qkv", "DiT-XL/2 fc1"),
    "gelu_quantize_int8": ("DiT-XL/2 fc2",),
    "rmsnorm_modulate_quantize_int8": ("TerDiT-4.2B attn", "TerDiT-4.2B w1/w3"),
    "swiglu_quantize_int8": ("TerDiT-4.2B w2",),
}
"""DiT blocks use LayerNorm and GELU; TerDiT's (Large-DiT's) RMSNorm and a SwiGLU."""


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def rows_for(op: str, label: str, m: int, k: int, n: int, arch: int) -> list[dict]:
    rows = []
    for v in aot.compile_op(op, *aot.meta_args(op, m, k, n), arch=arch):
        per_sm = aot.ctas_per_sm(v)
        w = aot.waves(v)
        rows.append(
            {
                "op": op,
                "layer": label,
                "M": m,
                "K": k,
                "N": n,
                "kernel": v.kernel,
                "config": v.config,
                "programs": v.programs,
                "shared_bytes": v.shared_bytes,
                "registers": v.registers,
                "stack_bytes": v.stack_bytes,
                "mma": v.mma,
                "pipelined_loads": v.pipelined_loads,
                "fma_f32": v.fma_f32,
                "ctas_per_sm": per_sm,
                "waves_h200": None if w is None else round(w, 3),
                "compile_s": v.compile_s,
                "error": v.error,
            }
        )
    return rows


def _cfg(c: dict) -> str:
    keys = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "num_warps", "num_stages")
    return "x".join(str(c[k]) for k in keys if k in c)


def render(results: dict) -> str:
    header = [
        "op",
        "layer",
        "M",
        "config (BMxBNxBK x warps x stages)",
        "smem KiB",
        "regs",
        "stack",
        "mma",
        "pipelined",
        "CTA/SM",
        "waves",
    ]
    rows = [
        [
            r["op"],
            r["layer"],
            r["M"],
            _cfg(r["config"]),
            "-" if r["shared_bytes"] is None else f"{r['shared_bytes'] / 1024:.0f}",
            r["registers"],
            r["stack_bytes"],
            r["mma"],
            r["pipelined_loads"],
            r["ctas_per_sm"],
            r["waves_h200"],
        ]
        if not r["error"]
        else [r["op"], r["layer"], r["M"], _cfg(r["config"]), "ERROR", r["error"], "", "", "", "", ""]
        for r in results["rows"]
    ]
    s = results["summary"]
    lines = [
        f"sm_{results['arch']}, Triton {results['triton']}: {len(rows)} variants",
        format_table(header, rows),
        f"errors: {s['errors']}; variants that spill registers: {s['spilling']}; "
        f"K loops not pipelined: {s['unpipelined']}",
    ]
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", type=int, default=aot.HOPPER, help="compute capability x10 (90: H100/H200)")
    p.add_argument("--shapes", default="dit,terdit", help="comma-separated of " + ",".join(SHAPES))
    p.add_argument("--m", default="1,16,512,8192", help="token counts")
    p.add_argument(
        "--ops",
        default=",".join(QUANT_OPS + tuple(PRODUCER_LAYERS) + GEMM_OPS),
        help="comma-separated op names",
    )
    p.add_argument("--json", default=None, help="write the results here")
    args = p.parse_args(argv)
    args.shapes = [s.strip() for s in args.shapes.split(",") if s.strip()]
    for s in args.shapes:
        if s not in SHAPES:
            p.error(f"unknown shape set '{s}'; choose from {', '.join(SHAPES)}")
    args.ops = [s.strip() for s in args.ops.split(",") if s.strip()]
    for op in args.ops:
        if op not in aot.OPS:
            p.error(f"unknown op '{op}'; choose from {', '.join(aot.OPS)}")
    args.m = [int(v) for v in args.m.split(",")]
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    if not aot.available():
        sys.exit("this Triton cannot compile for NVIDIA GPUs here (no NVIDIA backend or ptxas)")
    start = time.perf_counter()
    import triton

    results = {
        "benchmark": "triton_compile",
        "command": " ".join([sys.executable, *sys.argv]),
        "machine": machine_info(torch.device("cpu")),
        "arch": args.arch,
        "triton": triton.__version__,
        "args": vars(args),
        "rows": [],
    }
    for shape_set in args.shapes:
        for label, k, n in SHAPES[shape_set]:
            for m in args.m:
                for op in args.ops:
                    if op in PRODUCER_LAYERS and label not in PRODUCER_LAYERS[op]:
                        continue
                    log(f"{op} {label} M={m}")
                    results["rows"] += rows_for(op, label, m, k, n, args.arch)
    rows = results["rows"]
    results["summary"] = {
        "variants": len(rows),
        "errors": sum(1 for r in rows if r["error"]),
        "spilling": sum(1 for r in rows if r["stack_bytes"]),
        "unpipelined": sum(1 for r in rows if r["mma"] not in (None, "none") and not r["pipelined_loads"]),
    }
    finish(results, start, render, None)
    if args.json:
        write_rows_json(args.json, results)
        print(f"wrote {args.json}")
    return results


def write_rows_json(path: str, results: dict) -> None:
    """The results as JSON with one row per line (1,400 rows: an indented file would be ~0.8 MB)."""
    head = {k: v for k, v in results.items() if k != "rows"}
    text = json.dumps(head, indent=2)[:-2]  # drop the closing "\n}"
    rows = ",\n    ".join(json.dumps(r, separators=(",", ":")) for r in results["rows"])
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        f.write(f'{text},\n  "rows": [\n    {rows}\n  ]\n}}\n')


if __name__ == "__main__":
    main()
