"""How much does fusing a DiT block's producers with int8 activation quantization save?

A deployed DiT block with integer linears needs int8 codes of four activations.
Unfused, each producer writes its float output and the quantizer reads it back:
LayerNorm, ``1 + scale``, the product and the sum (adaLN modulation), then
``quantize_per_token_int8``; GELU, then the quantizer. Fused
(``layernorm_modulate_quantize_int8``, ``gelu_quantize_int8``) the float
activation is never written. Per DiT layer that feeds an integer linear (qkv and
fc1: LayerNorm-modulate over the hidden size; fc2: GELU over 4x it), this times
both ways side by side at the tokens of one sampling step and reports bytes
moved by each (counted: every tensor an op reads and writes once). Large-DiT
(TerDiT) blocks do the same with RMSNorm-modulate (``rmsnorm_modulate_quantize_int8``,
before wq/wk/wv and w1/w3) and SwiGLU (``swiglu_quantize_int8``, before w2).

    python benchmarks/bench_fused_quant.py --device cpu --threads 1 --json out/fused_cpu.json
    python benchmarks/bench_fused_quant.py --device cuda --dtype bfloat16 --json out/fused_cuda.json
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from _common import finish, format_table, machine_info, median, synchronizer, time_call

from ditq.kernels import cpu, ops
from ditq.models.layers import RMSNorm, modulate

# name: (family, samples B, tokens per sample T, hidden K, MLP width): DiT-XL/2 at 256 px with guidance
# (32 images), the embedded model, TerDiT-4.2B at 256 px (4 images with guidance)
MODELS = {
    "DiT-XL/2": ("dit", 64, 256, 1152, 4608),
    "ditq-fmnist": ("dit", 32, 64, 128, 512),
    "TerDiT-4.2B": ("large-dit", 8, 256, 3072, 8192),
}


FUSED_OP = {
    "layernorm_modulate (qkv, fc1)": "layernorm_modulate_quantize_int8",
    "gelu (fc2)": "gelu_quantize_int8",
    "rmsnorm_modulate (wq/wk/wv, w1/w3)": "rmsnorm_modulate_quantize_int8",
    "swiglu (w2)": "swiglu_quantize_int8",
}


def cases(model: str, device: torch.device, dtype: torch.dtype, seed: int):
    """(producer, shape, unfused fn, fused fn, unfused bytes, fused bytes) for one model."""
    family, b, t, k, hidden = MODELS[model]
    g = torch.Generator().manual_seed(seed)

    def randn(*shape, std=1.0):
        return (torch.randn(*shape, generator=g) * std).to(dtype).to(device)

    x, shift, scale = randn(b, t, k), randn(b, k), randn(b, k)
    e, n, rows = x.element_size(), x.numel(), b * t
    codes = n + rows * 4  # what every quantizer writes: int8 codes and a float32 scale per token
    if family == "dit":
        h = randn(b, t, hidden, std=2.0)
        nh = h.numel()
        # LayerNorm (r x, w n), mul (r n, w m), add (r m, w m), quantize (r m)
        norm_case = (
            "layernorm_modulate (qkv, fc1)",
            lambda: ops.quantize_per_token_int8(modulate(F.layer_norm(x, (k,), eps=1e-6), shift, scale)),
            lambda: ops.layernorm_modulate_quantize_int8(x, shift, scale, 1e-6),
            n * e * 7 + codes,
        )
        hidden_case = (
            "gelu (fc2)",
            lambda: ops.quantize_per_token_int8(F.gelu(h, approximate="tanh")),
            lambda: ops.gelu_quantize_int8(h),
            nh * e * 3 + nh + rows * 4,  # GELU (r h, w g), quantize (r g)
            nh * e + nh + rows * 4,
        )
    else:
        norm = RMSNorm(k).to(dtype).to(device)
        with torch.no_grad():
            norm.weight.uniform_(0.5, 1.5)
        weight = norm.weight.detach()
        gate, up = randn(b, t, hidden, std=2.0), randn(b, t, hidden)
        nh = gate.numel()
        # RMSNorm (see layers.RMSNorm): x.float() (16-bit x only), pow (r, w float32), mean (r),
        # x * rsqrt (r x, w float32), .to(dtype) (16-bit only), weight * (r, w); then as LayerNorm's
        casts = 0 if e == 4 else n * e + n * 4
        norm_case = (
            "rmsnorm_modulate (wq/wk/wv, w1/w3)",
            lambda: ops.quantize_per_token_int8(modulate(norm(x), shift, scale)),
            lambda: ops.rmsnorm_modulate_quantize_int8(x, weight, shift, scale, norm.eps),
            2 * casts + n * 4 * 3 + n * e + n * 4 + n * e * 2 + n * e * 5 + codes,
        )
        hidden_case = (
            "swiglu (w2)",
            lambda: ops.quantize_per_token_int8(F.silu(gate) * up),
            lambda: ops.swiglu_quantize_int8(gate, up),
            nh * e * 6 + nh + rows * 4,  # silu (r g, w s), mul (r s, r u, w p), quantize (r p)
            nh * e * 2 + nh + rows * 4,
        )
    producer, unfused, fused, unfused_bytes = norm_case
    return [
        (producer, (b, t, k), unfused, fused, unfused_bytes, n * e + codes),
        (hidden_case[0], (b, t, hidden), *hidden_case[1:]),
    ]


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
    p.add_argument("--models", default=",".join(MODELS), help=f"comma-separated of {', '.join(MODELS)}")
    p.add_argument("--repeats", type=int, default=10, help="timed calls per case (median kept)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    p.add_argument(
        "--isa", default=None, choices=list(cpu.ISAS), help="cap ditq's CPU kernels at this level (CPU)"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="write the results here")
    args = p.parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    names = [m.strip() for m in args.models.split(",") if m.strip()]
    for m in names:
        if m not in MODELS:
            p.error(f"unknown model '{m}'; choose from {', '.join(MODELS)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    if device.type == "cpu":
        cpu.build()
        if args.isa:
            cpu.set_isa(args.isa)  # both ways: the unfused path's quantizer is ditq's too
    sync = synchronizer(device)
    rows = []
    for model in names:
        for case in cases(model, device, dtype, args.seed):
            producer, shape, unfused, fused, bytes_unfused, bytes_fused = case
            unfused(), fused()  # warm-up (builds, autotunes, compiles)
            t_unfused, t_fused = [], []
            for _ in range(args.repeats):  # interleaved, so that other load hits both alike
                t_unfused.append(time_call(unfused, sync))
                t_fused.append(time_call(fused, sync))
            ms, base = median(t_fused) * 1e3, median(t_unfused) * 1e3
            rows.append(
                {
                    "op": producer, "model": model, "shape": list(shape), "M": shape[0] * shape[1],
                    "K": shape[2], "N": None, "ms": ms, "baseline": "unfused PyTorch ops + ditq quantizer",
                    "baseline_ms": base, "speedup": base / ms, "bytes": bytes_fused,
                    "baseline_bytes": bytes_unfused, "weight_bytes": 0, "dtype": str(dtype),
                    "device": device.type, "fast_impl": ops.has_fast_impl(FUSED_OP[producer], device),
                }
            )  # fmt: skip
    results = {
        "benchmark": "bench_fused_quant",
        "machine": machine_info(device),
        "args": {k: str(v) for k, v in vars(args).items()},
        "rows": rows,
    }
    return finish(results, start, render, args.json)


def render(results: dict) -> str:
    m = results["machine"]
    lines = [
        f"machine: {m['cpu']} ({m['torch_threads']} torch threads)"
        + (f", GPU {m['gpu']}" if "gpu" in m else "")
        + f"; torch {m['torch']}; {m['date']}; load {m['load_average']}"
        + ("" if results["args"]["isa"] == "None" else f"; ditq CPU kernels at {results['args']['isa']}"),
        "",
    ]
    header = [
        "model",
        "producer -> int8",
        "shape",
        "unfused ms",
        "fused ms",
        "speedup",
        "MB unfused",
        "MB fused",
    ]

    table = [
        [
            r["model"], r["op"], "x".join(map(str, r["shape"])), f"{r['baseline_ms']:.2f}", f"{r['ms']:.2f}",
            f"{r['speedup']:.2f}" + ("" if r["fast_impl"] else " (reference)"),
            f"{r['baseline_bytes'] / 2**20:.1f}", f"{r['bytes'] / 2**20:.1f}",
        ]
        for r in results["rows"]
    ]  # fmt: skip
    lines.append(format_table(header, table))
    return "\n".join(lines)


if __name__ == "__main__":
    main()
