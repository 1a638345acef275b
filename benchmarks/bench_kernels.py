"""How fast are ditq's low-bit linear ops against a float linear, layer by layer?

For each layer shape (DiT-XL/2: K=1152 with N in {1152, 3456, 4608} and K=4608,
N=1152; TerDiT-4.2B: dim 3072, FFN 8192) and each token count M, one row per op:

* ``w8a8_linear`` / ``w158a8_linear``: the integer GEMM alone (int8 activations
  already quantized), W8A8 with per-channel int8 weights and W1.58A8 with 2-bit
  ternary weights ("k4" plus the kernels' prepacked copy);
* ``w4a8_linear``: Q-DiT's W4A8, int4 weights in groups of 128 inputs with
  zero points, per-token int8 activations (``uint8``: asymmetric, with zero
  points);
* ``...+quant``: float activations in, i.e. ``quantize_per_token_int8`` then the
  GEMM: what replaces ``F.linear`` in a model;
* ``ternary_linear`` / ``int4_linear``: weight-only, float activations (the
  baseline's dtype) against the 2-bit ternary or the Q-DiT int4 weights (on CPU,
  ditq's GEMM for few tokens, blocks of dequantized columns through BLAS beyond);
* CPU only, for comparison: ``torch._int_mm`` (oneDNN int8 GEMM + the same
  epilogue);
* CPU only, the peers a user would pick instead of ditq (``--peers``, the
  default; ``--no-peers`` leaves them out; ``--ops`` does not filter them),
  each built once from the layer's fp32 weight and bias and called with the
  same float ``x`` (``benchmarks/_peers.py``): ``fbgemm dynamic int8``, torch's
  ``torch.ao.nn.quantized.dynamic.Linear`` (s8 per-channel weights, engine
  fbgemm; quantizes its input itself, u8 per tensor), and ``onnxruntime dynamic
  int8``, a one-linear ONNX graph through onnxruntime's ``quantize_dynamic``
  (s8 per-channel weights; DynamicQuantizeLinear + MatMulInteger, fused by
  onnxruntime into DynamicQuantizeMatMul) in an ``InferenceSession`` with
  ``--threads`` intra-op threads (torch -> numpy and back inside the timed
  call). A peer that cannot run here (e.g. onnxruntime not installed: ``pip
  install 'ditq[bench]'``) is skipped with a note.

Every op is timed against the baseline of the device, fp32 ``F.linear`` on CPU
and bf16 ``F.linear`` on CUDA, interleaved call by call so that other load on
the machine hits both alike; the median of ``--repeats`` is kept, each repeat
running the op enough times to last ``--min-ms``. ``weight_bytes`` is what the
op holds for the layer's weight (int8: codes + prepacked copy; ternary: 2-bit
codes + 2-bit prepacked copy; baseline: the float weight), with its ratio to
fp32 (peers: their int8 codes and per-channel scales, not their internal
prepacked copies); ``rel_err_vs_baseline`` compares the output with a float
linear of the op's own dequantized weight (the activation quantization plus
the kernel; for the peers, whose weights are quantized inside, the fp32 weight),
and ``rel_err_vs_fp32`` (every row) with ``F.linear`` of the original fp32
weight, so that ditq's ops and the peers compare on the same footing. Every row
names the CPU (``cpu``) and ditq's kernel ISA in force (``isa``; ``--isa`` caps
it, the fp32 baseline and the peers keep the machine's best unless pinned by
environment variables, see the notes). Only ops with a fast implementation on
the device are timed (the references are not benchmarks). On CPU, M is capped
at 1024 by default.

    python benchmarks/bench_kernels.py --device cpu --json out/bench_kernels_cpu.json
    python benchmarks/bench_kernels.py --device cpu --shapes dit --m 1,16 --repeats 3
    python benchmarks/bench_kernels.py --device cpu --shapes dit --m 16 --threads 1 --ops w8a8_linear+quant
"""

from __future__ import annotations

import argparse
import sys
import time

import _peers
import torch
import torch.nn.functional as F
from _common import (
    cap_isa,
    finish,
    format_table,
    machine_info,
    median,
    row_machine,
    synchronizer,
    time_call,
)

from ditq.kernels import cpu, ops, pack_int4, pack_ternary, unpack_ternary

W4_GROUP = 128  # Q-DiT's weight group size in the W4A8 rows

SHAPES = {
    "dit": [  # DiT-XL/2 (hidden 1152, MLP 4608): proj, qkv, fc1, fc2
        ("DiT-XL/2 proj", 1152, 1152),
        ("DiT-XL/2 qkv", 1152, 3456),
        ("DiT-XL/2 fc1", 1152, 4608),
        ("DiT-XL/2 fc2", 4608, 1152),
    ],
    "terdit": [  # TerDiT-4.2B (dim 3072, FFN 8192): attention, w1/w3, w2
        ("TerDiT-4.2B attn", 3072, 3072),
        ("TerDiT-4.2B w1/w3", 3072, 8192),
        ("TerDiT-4.2B w2", 8192, 3072),
    ],
}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- one layer
def layer_inputs(m: int, k: int, n: int, device: torch.device, gen: torch.Generator) -> dict:
    """Random float weights/activations and their quantized forms (speed does not depend on values)."""
    w = torch.randn(n, k, generator=gen) / k**0.5
    x = torch.randn(m, k, generator=gen)
    b = torch.randn(n, generator=gen) * 0.1
    ws = w.abs().amax(dim=1) / 127
    wq = torch.round(w / ws[:, None]).clamp(-127, 127).to(torch.int8)
    gamma = w.abs().mean()
    wt = torch.round(w / gamma).clamp(-1, 1)
    d = {
        "x": x,
        "w": w,
        "b": b,
        "wq": wq,
        "ws": ws,
        "wt_packed": pack_ternary(wt),
        "gamma": gamma.reshape(1),
    }
    # Q-DiT W4A8: asymmetric int4 weights in groups of 128 inputs, asymmetric uint8 activations per token
    wg = w.reshape(n, k // W4_GROUP, W4_GROUP)
    lo, hi = wg.amin(dim=-1).clamp(max=0), wg.amax(dim=-1).clamp(min=0)
    w4s = ((hi - lo) / 15).clamp(min=1e-8)
    w4z = torch.round(-lo / w4s)
    codes = (torch.round(wg / w4s[..., None]) + w4z[..., None]).clamp(0, 15)
    d["w4_packed"], d["w4_scale"], d["w4_zero"] = pack_int4(codes.reshape(n, k).to(torch.uint8)), w4s, w4z
    d["w4_float"] = ((codes - w4z[..., None]) * w4s[..., None]).reshape(n, k)
    xlo, xhi = x.amin(dim=-1, keepdim=True).clamp(max=0), x.amax(dim=-1, keepdim=True).clamp(min=0)
    d["xs_u8"] = ((xhi - xlo) / 255).clamp(min=1e-8)
    d["xz_u8"] = torch.round(-xlo / d["xs_u8"])
    d["xq_u8"] = (torch.round(x / d["xs_u8"]) + d["xz_u8"]).clamp(0, 255).to(torch.uint8)
    d = {key: v.to(device) for key, v in d.items()}
    d["xq"], d["xs"] = ops.quantize_per_token_int8(d["x"])
    return d


PEERS = {  # row name -> builder from the fp32 weight and bias (and the thread count)
    "fbgemm dynamic int8": lambda w, b, threads: _peers.fbgemm_linear(w, b),
    "onnxruntime dynamic int8": _peers.onnxruntime_linear,
}


def candidates(
    d: dict, device: torch.device, baseline_dtype: torch.dtype, peers: bool = False, notes: list | None = None
) -> dict:
    """name -> (callable, weight bytes, backend, float weight it stands for); the baseline first.

    ``peers``: add the peer rows (CPU); a peer that cannot be built is left out with a line in ``notes``.
    """
    n, k = d["w"].shape
    xb, wb, bb = (d[key].to(baseline_dtype) for key in ("x", "w", "b"))
    c = {
        "baseline": (
            lambda: F.linear(xb, wb, bb),
            n * k * wb.element_size(),
            f"F.linear {baseline_dtype}",
            d["w"],
        )
    }
    backends = cpu.available_backends() if device.type == "cpu" else {}
    # the SIMD kernels (cpp-avx2, cpp-avx_vnni, cpp-avx512_vnni) keep a prepacked copy beside the input
    pre8 = cpu.prepacked_bytes(n, k, 8) if backends.get("w8a8_linear", "").startswith("cpp-avx") else 0
    pre2 = cpu.prepacked_bytes(n, k, 2) if backends.get("w158a8_linear", "").startswith("cpp-avx") else 0
    x, xq, xs, wq, ws, b = d["x"], d["xq"], d["xs"], d["wq"], d["ws"], d["b"]
    wt, gamma = d["wt_packed"], d["gamma"]
    w8_float = wq.float() * ws[:, None]
    w2_float = (unpack_ternary(wt.cpu()).float() * gamma.cpu()).to(device)
    if ops.registered_impl("w8a8_linear", device.type):
        w8_bytes = n * k + pre8 + 4 * n
        be = backends.get("w8a8_linear", device.type)
        c["w8a8_linear"] = (lambda: ops.w8a8_linear(xq, xs, wq, ws, b), w8_bytes, be, w8_float)
        c["w8a8_linear+quant"] = (
            lambda: ops.w8a8_linear(*ops.quantize_per_token_int8(x), wq, ws, b),
            w8_bytes,
            be,
            w8_float,
        )
    if ops.registered_impl("w158a8_linear", device.type):
        w2_bytes = n * k // 4 + pre2 + 4
        be = backends.get("w158a8_linear", device.type)
        c["w158a8_linear"] = (lambda: ops.w158a8_linear(xq, xs, wt, gamma, b), w2_bytes, be, w2_float)
        c["w158a8_linear+quant"] = (
            lambda: ops.w158a8_linear(*ops.quantize_per_token_int8(x), wt, gamma, b),
            w2_bytes,
            be,
            w2_float,
        )
    if ops.registered_impl("w4a8_linear", device.type):
        w4p, w4s, w4z = d["w4_packed"], d["w4_scale"], d["w4_zero"]
        pre4 = (
            cpu.prepacked_bytes_w4(n, k, W4_GROUP)
            if backends.get("w4a8_linear", "").startswith("cpp-avx")
            else 0
        )
        w4_bytes = n * k // 2 + pre4 + 8 * w4s.numel()
        be = backends.get("w4a8_linear", device.type)
        c["w4a8_linear"] = (
            lambda: ops.w4a8_linear(xq, xs, None, w4p, w4s, w4z, b),
            w4_bytes,
            be,
            d["w4_float"],
        )
        xu, xsu, xzu = d["xq_u8"], d["xs_u8"], d["xz_u8"]
        c["w4a8_linear uint8"] = (
            lambda: ops.w4a8_linear(xu, xsu, xzu, w4p, w4s, w4z, b),
            w4_bytes,
            be,
            d["w4_float"],
        )
        c["w4a8_linear+quant"] = (
            lambda: ops.w4a8_linear(*ops.quantize_per_token_int8(x), None, w4p, w4s, w4z, b),
            w4_bytes,
            be,
            d["w4_float"],
        )
    # weight-only ops (float activations)
    if ops.registered_impl("ternary_linear", device.type):
        c["ternary_linear"] = (
            lambda: ops.ternary_linear(xb, wt, gamma, bb),
            n * k // 4 + 4,
            backends.get("ternary_linear", device.type),
            w2_float,
        )
    if ops.registered_impl("int4_linear", device.type):
        w4p, w4s, w4z = d["w4_packed"], d["w4_scale"], d["w4_zero"]
        c["int4_linear"] = (
            lambda: ops.int4_linear(xb, w4p, w4s, w4z, bb),
            n * k // 2 + 8 * w4s.numel(),
            backends.get("int4_linear", device.type),
            d["w4_float"],
        )
    # PyTorch's own int8 GEMM (oneDNN on CPU; cuBLASLt on CUDA, which asks M > 16) and an
    # unfused epilogue: on a GPU, the yardstick for the Triton int8 kernels' main loop.
    if device.type == "cpu" or xq.shape[0] > 16:
        wqt = wq.t()

        def int_mm():
            return torch._int_mm(xq, wqt).float() * xs * ws + b

        c["torch._int_mm"] = (
            int_mm,
            n * k + 4 * n,
            "oneDNN" if device.type == "cpu" else "cuBLASLt",
            w8_float,
        )
    # the peers: quantized by themselves from the fp32 weight, float x in, float out
    if peers and device.type == "cpu":
        for name, build in PEERS.items():
            try:
                fn = build(d["w"], b, torch.get_num_threads())
            except _peers.PeerUnavailable as exc:
                note = f"{name} rows skipped: {exc}"
                if notes is not None and note not in notes:
                    notes.append(note)
                continue
            c[name] = (lambda fn=fn: fn(x), fn.info["weight_bytes"], fn.info["backend"], d["w"])
    return c


def bench_layer(label: str, k: int, n: int, m: int, args, gen) -> list[dict]:
    device, sync = args.device, synchronizer(args.device)
    baseline_dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    with torch.inference_mode():
        d = layer_inputs(m, k, n, device, gen)
        fns = candidates(d, device, baseline_dtype, args.peers, args.notes)
        names = [
            name for name in fns if name == "baseline" or name in PEERS or name in args.ops or not args.ops
        ]
        # Warm up (builds the CPU kernels and prepacks weights), then pick calls per repeat
        # so that one timing lasts at least --min-ms.
        iters = {}
        for name in names:
            fn = fns[name][0]
            fn()
            t = max(time_call(fn, sync), 1e-6)
            iters[name] = max(1, min(1000, int(args.min_ms / 1e3 / t)))
        times: dict[str, list[float]] = {name: [] for name in names}
        for _ in range(args.repeats):
            for name in names:
                fn, reps = fns[name][0], iters[name]
                calls = lambda fn=fn, reps=reps: [fn() for _ in range(reps)]
                times[name].append(time_call(calls, sync) / reps)
        # error against a float linear with the op's own (dequantized) weight: activation
        # quantization plus kernel error, not the weight quantization error; and against the fp32 weight
        errs, errs_fp32 = {}, {}
        ref_fp32 = F.linear(d["x"].float(), d["w"].float(), d["b"].float())
        for name in names:
            out = fns[name][0]().float()
            ref = F.linear(d["x"].float(), fns[name][3].float(), d["b"].float())
            errs[name] = ((out - ref).norm() / ref.norm()).item()
            errs_fp32[name] = ((out - ref_fp32).norm() / ref_fp32.norm()).item()
    base_ms = median(times["baseline"]) * 1e3
    fp32_bytes = n * k * 4
    rows = []
    for name in names:
        ms = median(times[name]) * 1e3
        _, wbytes, backend, _ = fns[name]
        rows.append(
            {
                "op": "F.linear" if name == "baseline" else name,
                "layer": label,
                "M": m,
                "K": k,
                "N": n,
                "ms": ms,
                "baseline": f"F.linear {str(baseline_dtype).replace('torch.', '')}",
                "baseline_ms": base_ms,
                "speedup": base_ms / ms,
                "weight_bytes": wbytes,
                "weight_vs_fp32": wbytes / fp32_bytes,
                "rel_err_vs_baseline": errs[name],
                "rel_err_vs_fp32": errs_fp32[name],
                "backend": backend,
                "peer": name in PEERS,
                "device": device.type,
                **args.row_machine,
                "times_ms": [t * 1e3 for t in times[name]],
                "calls_per_repeat": iters[name],
            }
        )
    log(f"[{label} M={m}] " + ", ".join(f"{r['op']} {r['ms']:.2f} ms ({r['speedup']:.2f}x)" for r in rows))
    return rows


# ----------------------------------------------------------------------------- report
def render(results: dict) -> str:
    m = results["machine"]
    lines = [
        f"machine: {m['cpu']} ({m['torch_threads']} torch threads of {m['cpu_count']} CPUs)"
        + (f", GPU {m['gpu']}" if "gpu" in m else "")
        + f"; torch {m['torch']}, Python {m['python']}; {m['date']}",
        f"load average before/after: {m['load_average']} / {results.get('load_average_after')}",
        f"backends: {results['backends']}",
        f"ditq's kernel ISA {results['rows'][0]['isa'] if results['rows'] else '-'}; "
        f"CPU flags {' '.join(m.get('cpu_flags', [])) or '-'}",
        f"median of {results['args']['repeats']} repeats, each >= {results['args']['min_ms']} ms of calls; "
        "speedup = baseline ms / op ms, measured side by side",
        "",
    ]
    header = [
        "layer", "M", "K", "N", "op", "ms", "baseline ms", "speedup", "weight MB", "w/fp32", "rel err",
        "err vs fp32",
    ]  # fmt: skip
    rows = [
        [
            r["layer"],
            r["M"],
            r["K"],
            r["N"],
            r["op"],
            f"{r['ms']:.3f}",
            f"{r['baseline_ms']:.3f}",
            f"{r['speedup']:.2f}",
            f"{r['weight_bytes'] / 2**20:.2f}",
            f"{r['weight_vs_fp32']:.3f}",
            f"{r['rel_err_vs_baseline']:.1e}",
            f"{r['rel_err_vs_fp32']:.1e}",
        ]
        for r in results["rows"]
    ]
    lines.append(format_table(header, rows))
    for note in results["notes"]:
        lines.append(f"note: {note}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- CLI
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--shapes", default="dit,terdit", help="comma-separated of dit,terdit")
    p.add_argument(
        "--m", default=None, help="token counts (default 1,16,512,1024 on CPU; 1,16,512,8192 on CUDA)"
    )
    p.add_argument("--ops", default="", help="comma-separated op names to time (default: all available)")
    p.add_argument("--repeats", type=int, default=None, help="timed repeats, median kept (3 CPU, 10 GPU)")
    p.add_argument("--min-ms", type=float, default=None, help="shortest timing of one repeat (20 CPU, 5 GPU)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    p.add_argument(
        "--isa",
        default=None,
        help="cap ditq's CPU kernels at this instruction set (avx2, scalar; default: best)",
    )
    p.add_argument(
        "--peers",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="time the peers (torch's fbgemm and onnxruntime dynamic int8 linears, CPU) beside ditq's ops",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="write the results here")
    args = p.parse_args(argv)
    args.device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    gpu = args.device.type == "cuda"
    args.shapes = [s.strip() for s in args.shapes.split(",") if s.strip()]
    for s in args.shapes:
        if s not in SHAPES:
            p.error(f"unknown shape set '{s}'; choose from {', '.join(SHAPES)}")
    args.m = [int(v) for v in (args.m or ("1,16,512,8192" if gpu else "1,16,512,1024")).split(",")]
    args.ops = [s.strip() for s in args.ops.split(",") if s.strip()]
    args.repeats = args.repeats or (10 if gpu else 3)
    args.min_ms = args.min_ms if args.min_ms is not None else (5.0 if gpu else 20.0)
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    start = time.perf_counter()
    if args.threads:
        torch.set_num_threads(args.threads)
    notes = []
    if args.device.type == "cpu":
        cpu.build()
        cap_isa(args.isa, notes)
        if max(args.m) > 1024:
            notes.append("M above 1024 on CPU takes long; the default caps M at 1024")
    elif args.peers:
        notes.append("the peers (fbgemm, onnxruntime) run on CPU only: not timed on this device")
    machine = machine_info(args.device)
    args.notes, args.row_machine = notes, row_machine(machine, args.device)
    results = {
        "benchmark": "bench_kernels",
        "command": " ".join([sys.executable, *sys.argv]),
        "machine": machine,
        "args": {
            key: (str(v) if isinstance(v, torch.device) else v)
            for key, v in vars(args).items()
            if key not in ("notes", "row_machine")
        },
        "backends": cpu.available_backends() if args.device.type == "cpu" else {},
        "rows": [],
        "notes": notes,
    }
    gen = torch.Generator().manual_seed(args.seed)
    for shape_set in args.shapes:
        for label, k, n in SHAPES[shape_set]:
            for m in args.m:
                results["rows"] += bench_layer(label, k, n, m, args, gen)
            cpu.clear_prepack_cache()
    return finish(results, start, render, args.json)


if __name__ == "__main__":
    main()
