"""How fast, how small and how close are deployed low-bit DiTs, one sampling step at a time?

For one model (the embedded ``ditq-fmnist`` by default; ``--model DiT-XL/2``
and other registry names get random weights at their real shapes, adaLN and
the final layer included, so outputs are not trivially zero) the script builds
in memory, round-to-nearest and without calibration:

* ``fp32``: the float model (the baseline), run in ``--dtype`` like the others
  (bfloat16 on CUDA by default: the GPU targets are against bf16 eager);
* ``w8a8``: Q-DiT layers with symmetric per-channel int8 weights and dynamic
  symmetric per-token int8 activations (``w8a8_linear``); ``w8a8+adaln``: the
  same with the adaLN modulation linears quantized too (as the peers and TerDiT
  do; at a few images per step they only read weights, 4x fewer bytes in int8);
* ``w4a8``: Q-DiT W4A8 with groups of 128 (asymmetric 4-bit weights, dynamic
  asymmetric per-token 8-bit activations; ``w4a8_linear``);
* ``w1.58a8`` / ``w1.58a16``: TerDiT ternary layers (adaLN included) with int8
  activations (``w158a8_linear``) or float ones (``ternary_linear``).

With ``--fusion both`` (the default) the int8-activation variants
(``w8a8``, ``w1.58a8``) are also timed as ``<variant>/unfused``: the same
loaded model with producer fusion off (``ditq.kernels.use_fusion(False)``), so
each integer linear quantizes its own float input instead of taking the codes
of a LayerNorm-modulate or GELU fused with that quantization (ditq's C++
kernels on CPU for float32, Triton on CUDA; elsewhere both rows run the same path).

Each variant is saved as its checkpoint (``ditq ptq`` / ``ditq export``
format) and loaded back the way ``ditq sample`` loads it (meta device, packed
codes), so what is timed is the deployed model. Per variant and guidance
setting (``--cfg on,off``; on = a doubled batch, as the sampler runs it):

* ``ms``: median time of one sampling step = one model call at ``--batch-size``
  images (x2 rows with guidance) and a fresh timestep, over ``--steps`` steps,
  variants interleaved step by step so that other load hits all alike;
  ``speedup`` is ``fp32`` ms / ms, measured side by side;
* ``weight_bytes``: bytes of the model's parameters and buffers as loaded, plus
  the prepacked weight copies the AVX-512 CPU kernels keep (``prepacked_bytes``);
  on CUDA ``peak_cuda_bytes`` is ``torch.cuda.max_memory_allocated`` over a step;
* ``ckpt_bytes``: size of the saved file;
* ``max_abs_diff_vs_fake_quant``: one step's output through the kernels against
  the same model's fake-quant / float path (``quant.set_kernels(model, False)``),
  and ``max_abs_diff_vs_fp``, the quantization error itself, for scale.

``kernels`` counts what the quantized layers ran (``quant.kernel_plan``): under
``--backend auto`` an op without a fast implementation on the device (e.g.
``w4a8_linear`` on a CPU without AVX-512 VNNI) leaves its layers on the float path.

Peers, the int8 a user would pick instead of ditq (CPU, float32 only; with
``--variants ...,fbgemm,onnxruntime`` or ``--peers``): the float model quantized
by the peer itself, no ditq checkpoint (``benchmarks/_peers.py``), timed step by
step with the others, guidance on/off as for them (the guided form over a
doubled batch):

* ``fbgemm``: ``torch.ao.quantization.quantize_dynamic`` of the float model,
  every ``nn.Linear`` but the timestep embedder's MLP (it reads its first
  linear's weight dtype) as torch's dynamic int8 linear, engine fbgemm (its
  default qconfig: per-tensor s8 weights; u8 7-bit per-tensor activations);
* ``onnxruntime``: the float model exported to ONNX (TorchScript exporter,
  dynamic batch), every constant-weight MatMul quantized by onnxruntime's
  ``quantize_dynamic`` (s8 per-channel weights, u8 per-tensor activations;
  attention matmuls and the patch-embedding convolution stay float, as in
  ditq's variants), an ``InferenceSession`` with ``--threads`` intra-op threads;
  torch -> numpy and back are in the timed step. ``ckpt_bytes`` is the
  quantized ``.onnx`` file.

Their ``max_abs_diff_vs_fake_quant`` is not applicable (None); ``kernels``
counts what they ran (fbgemm linears; onnxruntime's optimized graph ops). A peer
that cannot run here (e.g. onnxruntime not installed: ``pip install
'ditq[bench]'``) is skipped with a note. Every row names the CPU (``cpu``) and
ditq's kernel ISA in force (``isa``; ``--isa`` caps it, the float model and the
peers keep the machine's best unless pinned by environment variables, see the
notes).

    python benchmarks/bench_e2e.py --device cpu --threads 1 --batch-size 16 --steps 3 --json out/e2e.json
    python benchmarks/bench_e2e.py --model DiT-XL/2 --steps 1 --batch-size 1 --variants fp32,w8a8
    python benchmarks/bench_e2e.py --device cpu --threads 1 --batch-size 2 --steps 3 --variants w8a8 --peers
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import sys
import tempfile
import time
from pathlib import Path

import _peers
import torch
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

import ditq
from ditq import models, quant
from ditq.diffusion import ClassifierFreeGuidance
from ditq.formats import qdit
from ditq.formats.ternary import save_ternary
from ditq.kernels import cpu, ops
from ditq.models import registry
from ditq.pipelines.deploy import W8A8_INTEGER, held_bytes

VARIANTS = ("fp32", "w8a8", "w8a8+adaln", "w4a8", "w1.58a8", "w1.58a16")
PEERS = ("fbgemm", "onnxruntime")  # the float model quantized by torch's fbgemm / onnxruntime (CPU)
QDIT = {
    "w8a8": W8A8_INTEGER,  # the settings w8a8_linear runs
    # ... with the adaLN modulation linears too, as the peers and TerDiT quantize them
    "w8a8+adaln": dataclasses.replace(W8A8_INTEGER, quantize_adaln=True),
    "w4a8": quant.QDiTConfig(w_bits=4, a_bits=8, w_group=128),
}
TERNARY = {"w1.58a8": 8, "w1.58a16": None}
FUSABLE = ("w8a8", "w1.58a8")  # int8 per-token activations: their producers can hand them int8 codes
UNFUSED = "/unfused"
CFG_SCALE = 1.5


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- models
def float_model(name: str, seed: int, depth: int | None = None) -> torch.nn.Module:
    """The embedded model with its weights, or a registry model with random weights at real shapes
    (``depth`` blocks instead of its own, when given)."""
    if name in models.loader.EMBEDDED_MODELS:
        if depth is not None:
            raise SystemExit("--depth applies to registry models, not the embedded one")
        return ditq.load(name)
    torch.manual_seed(seed)
    config = registry.get_config(name)
    if depth is not None:  # DiT counts blocks in `depth`, Large-DiT in `n_layers`
        config = registry.get_config(name, **{"depth" if hasattr(config, "depth") else "n_layers": depth})
    model = registry.build_model(config)
    with torch.no_grad():  # adaLN-Zero and the final layer start at 0: give every output a value
        for pname, p in model.named_parameters():
            if "adaLN" in pname or "final_layer" in pname:
                p.normal_(std=0.02)
    return model.eval()


def build_variant(variant: str, fp_path: Path, folder: Path) -> Path:
    """Quantize the float model of ``fp_path`` as ``variant`` (RTN) and save it; returns the file."""
    model = ditq.load(fp_path)
    path = folder / f"{variant}.safetensors"
    if variant in QDIT:
        quant.quantize_(model, QDIT[variant])
        qdit.save(model, path, QDIT[variant], command="bench_e2e")
    else:
        config = quant.TernaryQATConfig(act_bits=TERNARY[variant])
        quant.quantize_(model, config)  # prepare: alpha by least squares from the float weights
        quant.quantize_(model, quant.TernaryQATConfig(step="convert"))
        save_ternary(model, path, config, command="bench_e2e")
    return path


def prepacked_bytes(model: torch.nn.Module, device: torch.device) -> int:
    """Bytes of the prepacked weight copies ditq's SIMD CPU kernels cache for the layers that ran them."""
    if device.type != "cpu":
        return 0
    total = 0
    for m in model.modules():
        # the layers whose op runs one of ditq's C++ GEMMs (cpp-<isa>), which prepack their weight
        if not isinstance(m, (quant.QuantLinear, quant.TernaryLinear)) or not m.use_kernels:
            continue
        if not m.kernel_implementation(device).startswith("cpp-avx"):
            continue
        if m.kernel_op == "w8a8_linear":
            total += cpu.prepacked_bytes(m.out_features, m.in_features, 8)
        elif m.kernel_op == "w158a8_linear":
            total += cpu.prepacked_bytes(m.out_features, m.in_features, 2)
        elif m.kernel_op == "w4a8_linear":  # segments of gcd(activation group, weight group) inputs
            total += cpu.prepacked_bytes_w4(m.out_features, m.in_features, m.w_group or m.in_features)
    return total


def build_peer(peer: str, fp: torch.nn.Module, args):
    """The float model ``fp`` quantized by ``peer`` (fbgemm or onnxruntime), a callable ``fn(x, t, y)``;
    raises ``_peers.PeerUnavailable``."""
    if peer == "fbgemm":
        return _peers.fbgemm_model(fp)
    example = step_inputs(fp.config, args.batch_size, False, -1, torch.device("cpu"), args.seed)
    return _peers.onnxruntime_model(fp, (example[0], example[1], example[2]["y"]), torch.get_num_threads())


def step_fn(model, cfg: bool, fusion: bool = True, config=None):
    """What a sampler calls once per step: the model, or its guided form over a doubled batch;
    with ``fusion=False`` run with producer fusion off. ``config``: the model's (for a peer's callable)."""
    c = config or model.config
    fn = model
    if cfg:
        fn = ClassifierFreeGuidance(
            model, CFG_SCALE, 3 if c.in_channels == 4 else None, learn_sigma=c.learn_sigma
        )
    if fusion:
        return fn

    def unfused(*args, **kwargs):
        with ops.use_fusion(False):
            return fn(*args, **kwargs)

    return unfused


def step_inputs(
    config, batch: int, cfg: bool, step: int, device: torch.device, seed: int, dtype=torch.float32
):
    g = torch.Generator().manual_seed(seed + step)
    shape = (config.in_channels, config.input_size, config.input_size)
    x = torch.randn(batch, *shape, generator=g).to(dtype)
    y = torch.randint(0, config.num_classes, (batch,), generator=g)
    if cfg:
        x, y = torch.cat([x, x]), torch.cat([y, torch.full_like(y, config.num_classes)])
    t = torch.full((len(x),), 999 - (step * 97) % 1000, dtype=torch.long)
    return x.to(device), t.to(device), {"y": y.to(device)}


# ----------------------------------------------------------------------------- one setting
def bench_setting(loaded: dict, cfg: bool, args, fp_config, peers: dict | None = None) -> list[dict]:
    """Time ditq's ``loaded`` models and the ``peers`` (name -> callable) step by step, interleaved."""
    device, sync, dtype = args.device, synchronizer(args.device), getattr(torch, args.dtype)
    peers = peers or {}
    fns = {v: step_fn(m, cfg, fusion=not v.endswith(UNFUSED)) for v, m in loaded.items()}
    fns.update({v: step_fn(fn, cfg, config=fp_config) for v, fn in peers.items()})
    times: dict[str, list[float]] = {v: [] for v in fns}
    peak: dict[str, int | None] = dict.fromkeys(fns)
    with torch.inference_mode():
        warm = step_inputs(fp_config, args.batch_size, cfg, -1, device, args.seed, dtype)
        for fn in fns.values():  # warm-up: builds the CPU kernels, prepacks weights
            fn(*warm[:2], **warm[2])
        for step in range(args.steps):
            x, t, kw = step_inputs(fp_config, args.batch_size, cfg, step, device, args.seed, dtype)
            for v, fn in fns.items():
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                times[v].append(time_call(lambda fn=fn, x=x, t=t, kw=kw: fn(x, t, **kw), sync))
                if device.type == "cuda":
                    peak[v] = max(peak[v] or 0, torch.cuda.max_memory_allocated(device))
        # one step's output: kernels vs the same model's fake-quant / float path, and vs FP
        x, t, kw = step_inputs(fp_config, args.batch_size, cfg, 0, device, args.seed, dtype)
        ref_fp = fns["fp32"](x, t, **kw).float() if "fp32" in fns else None
        diffs = {}
        for v, m in loaded.items():
            out = fns[v](x, t, **kw).float()
            quant.set_kernels(m, False)
            fake = fns[v](x, t, **kw).float()
            quant.set_kernels(m, True)
            diffs[v] = (
                (out - fake).abs().max().item(),
                None if ref_fp is None else (out - ref_fp).abs().max().item(),
            )
        for v in peers:  # no fake-quant path: the peer quantized the float model itself
            out = fns[v](x, t, **kw).float()
            diffs[v] = (None, None if ref_fp is None else (out - ref_fp).abs().max().item())
    rows = []
    base_ms = median(times["fp32"]) * 1e3 if "fp32" in times else None
    c = fp_config
    tokens = (args.batch_size * (2 if cfg else 1)) * (c.input_size // c.patch_size) ** 2
    # width and MLP width: DiT's hidden_size and mlp_ratio, Large-DiT's dim and SwiGLU width
    width = getattr(c, "hidden_size", None) or c.dim
    mlp = int(c.hidden_size * c.mlp_ratio) if hasattr(c, "mlp_ratio") else c.ffn_hidden

    def row(v: str, **fields) -> dict:
        """The fields every row has, then the variant's own (``fields``)."""
        ms = median(times[v]) * 1e3
        return {
            "op": v,
            "model": args.model + ("" if args.depth is None else f" ({args.depth} blocks)"),
            "M": tokens,
            "K": width,
            "N": mlp,
            "ms": ms,
            "baseline": f"float model ({args.dtype})",
            "baseline_ms": base_ms,
            "speedup": None if base_ms is None else base_ms / ms,
            **fields,
            "max_abs_diff_vs_fp": diffs[v][1],
            "batch": args.batch_size,
            "cfg": cfg,
            "steps": args.steps,
            "device": device.type,
            **args.row_machine,
            "times_ms": [s * 1e3 for s in times[v]],
        }

    for v, m in loaded.items():
        plan = quant.kernel_plan(m, device)
        counts: dict[str, int] = {}
        for what in plan.values():
            counts[what] = counts.get(what, 0) + 1
        pre = prepacked_bytes(m, device)
        rows.append(
            row(
                v,
                weight_bytes=held_bytes(m) + pre,
                prepacked_bytes=pre,
                peak_cuda_bytes=peak[v],
                ckpt_bytes=args.ckpt_bytes[v.removesuffix(UNFUSED)],
                fusion=not v.endswith(UNFUSED),
                max_abs_diff_vs_fake_quant=diffs[v][0],
                backend=args.backend,
                resolved_backend=ops.resolve_backend(device),
                kernels=counts,
                peer=False,
            )
        )
    for v, fn in peers.items():
        rows.append(
            row(
                v,
                weight_bytes=fn.info["weight_bytes"],  # without the peer's internal prepacked copies
                prepacked_bytes=None,
                peak_cuda_bytes=None,
                ckpt_bytes=fn.info.get("file_bytes"),
                fusion=None,
                max_abs_diff_vs_fake_quant=None,
                backend=v,
                resolved_backend=fn.info["backend"],
                kernels=fn.info.get("kernels", {}),
                peer=True,
            )
        )
    log(
        f"[cfg {'on' if cfg else 'off'}] "
        + ", ".join(f"{r['op']} {r['ms']:.1f} ms ({(r['speedup'] or 0):.2f}x)" for r in rows)
    )
    return rows


# ----------------------------------------------------------------------------- report
def _mb(n) -> str:
    return "-" if n is None else f"{n / 2**20:.2f}"


def _e(x) -> str:
    return "-" if x is None else f"{x:.1e}"


def render(results: dict) -> str:
    m = results["machine"]
    a = results["args"]
    lines = [
        f"machine: {m['cpu']} ({m['torch_threads']} torch threads of {m['cpu_count']} CPUs)"
        + (f", GPU {m['gpu']}" if "gpu" in m else "")
        + f"; torch {m['torch']}, Python {m['python']}; {m['date']}",
        f"load average before/after: {m['load_average']} / {results.get('load_average_after')}",
        f"model {a['model']}"
        + ("" if a.get("depth") is None else f" ({a['depth']} blocks)")
        + f" in {a['dtype']}, batch {a['batch_size']}, median of {a['steps']} steps, "
        "kernel backend "
        f"{a['backend']} ({results['rows'][0]['resolved_backend'] if results['rows'] else '-'}); "
        f"CPU kernels: {results['cpu_backends'].get('extension', '-')}"
        f" (ISA in force {results['rows'][0]['isa'] if results['rows'] else '-'}; "
        f"CPU flags {' '.join(m.get('cpu_flags', [])) or '-'})",
        "",
    ]
    header = [
        "variant", "cfg", "M", "ms/step", "float ms", "speedup", "weights MB", "ckpt MB",
        "max|d| vs fake", "max|d| vs fp", "kernels",
    ]  # fmt: skip
    rows = [
        [
            r["op"], "on" if r["cfg"] else "off", r["M"], f"{r['ms']:.1f}", f"{r['baseline_ms']:.1f}",
            f"{r['speedup']:.2f}", _mb(r["weight_bytes"]), _mb(r["ckpt_bytes"]),
            _e(r["max_abs_diff_vs_fake_quant"]), _e(r["max_abs_diff_vs_fp"]),
            ", ".join(f"{n} {w}" for w, n in r["kernels"].items()) or "-",
        ]
        for r in results["rows"]
    ]  # fmt: skip
    lines.append(format_table(header, rows))
    for note in results["notes"]:
        lines.append(f"note: {note}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- CLI
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="ditq-fmnist", help="ditq-fmnist (embedded) or a registry name")
    p.add_argument(
        "--variants",
        default=",".join(VARIANTS),
        help=f"comma-separated of {', '.join(VARIANTS + PEERS)} (default: ditq's, no peers)",
    )
    p.add_argument(
        "--peers", action="store_true", help=f"add the peer variants ({', '.join(PEERS)}; CPU, float32)"
    )
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--backend", default="auto", choices=ops.BACKENDS, help="kernel backend (default auto)")
    p.add_argument("--batch-size", type=int, default=16, help="images per step (x2 rows with cfg)")
    p.add_argument("--cfg", default="on,off", help="guidance settings to time: on, off or on,off")
    p.add_argument("--steps", type=int, default=5, help="timed steps per setting (median kept)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    p.add_argument(
        "--dtype",
        default=None,
        choices=["float32", "bfloat16", "float16"],
        help="float dtype of the models and activations (default: bfloat16 on CUDA, float32 on CPU)",
    )
    p.add_argument(
        "--fusion",
        default="both",
        choices=["on", "off", "both"],
        help="producers fused with int8 quantization: on, off, or both side by side (default both)",
    )
    p.add_argument(
        "--depth",
        type=int,
        default=None,
        help="blocks of a registry model (default its own): the same per-block cost, more steps in the time",
    )
    p.add_argument(
        "--isa",
        default=None,
        help="cap ditq's CPU kernels at this instruction set (avx2, scalar; default: best)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="write the results here")
    args = p.parse_args(argv)
    if args.depth is not None and args.depth < 1:
        p.error(f"--depth must be at least 1, got {args.depth}")
    args.device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    args.dtype = args.dtype or ("bfloat16" if args.device.type == "cuda" else "float32")
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    for v in args.variants:
        if v not in VARIANTS + PEERS:
            p.error(f"unknown variant '{v}'; choose from {', '.join(VARIANTS + PEERS)}")
    if args.peers:
        args.variants += [v for v in PEERS if v not in args.variants]
    if "fp32" not in args.variants:
        args.variants.insert(0, "fp32")  # the baseline
    args.cfg = [{"on": True, "off": False}[s.strip()] for s in args.cfg.split(",") if s.strip()]
    return args


def build_peers(fp: torch.nn.Module, args, notes: list[str]) -> dict:
    """The peers among ``args.variants``, built from the float model; the ones that cannot run here
    are left out with a note."""
    wanted = [v for v in args.variants if v in PEERS]
    if not wanted:
        return {}
    if args.device.type != "cpu" or args.dtype != "float32":
        notes.append(
            f"peers ({', '.join(wanted)}) skipped: they run on CPU in float32 only "
            f"(here {args.device.type}, {args.dtype})"
        )
        return {}
    peers = {}
    for v in wanted:
        t0 = time.perf_counter()
        try:
            peers[v] = build_peer(v, fp, args)
        except _peers.PeerUnavailable as exc:
            notes.append(f"peer {v} skipped: {exc}")
            continue
        gc.collect()
        log(f"  {v}: {peers[v].info['backend']} in {time.perf_counter() - t0:.1f} s")
    return peers


def main(argv=None) -> dict:
    args = parse_args(argv)
    start = time.perf_counter()
    if args.threads:
        torch.set_num_threads(args.threads)
    ops.set_backend(args.backend)
    notes = []
    if args.device.type == "cpu":
        cpu.build()
        cap_isa(args.isa, notes)
    machine = machine_info(args.device)
    args.row_machine = row_machine(machine, args.device)
    results = {
        "benchmark": "bench_e2e",
        "command": " ".join([sys.executable, *sys.argv]),
        "machine": machine,
        "args": {
            k: (str(v) if isinstance(v, torch.device) else v)
            for k, v in vars(args).items()
            if k != "row_machine"
        },
        "cpu_backends": cpu.available_backends() if args.device.type == "cpu" else {},
        "rows": [],
        "notes": notes,
    }
    with tempfile.TemporaryDirectory(prefix="ditq-bench-e2e-") as tmp:
        folder = Path(tmp)
        log(f"building {args.model} and its variants in {folder}")
        fp = float_model(args.model, args.seed, args.depth)
        fp_config = fp.config
        fp_path = folder / "fp32.safetensors"
        ditq.save(fp, fp_path)
        peers = build_peers(fp, args, notes)
        del fp
        paths = {"fp32": fp_path}
        for v in args.variants:
            if v != "fp32" and v not in PEERS:
                t0 = time.perf_counter()
                paths[v] = build_variant(v, fp_path, folder)
                gc.collect()
                log(f"  {v}: {paths[v].stat().st_size / 2**20:.2f} MB in {time.perf_counter() - t0:.1f} s")
        args.ckpt_bytes = {v: p.stat().st_size for v, p in paths.items()}
        results["args"]["variants"] = [v for v in args.variants if v not in PEERS or v in peers]
        # the float parts (and the quantized layers' scales and biases) in --dtype; packed codes stay
        dtype = getattr(torch, args.dtype)
        loaded = {v: ditq.load(p, device=args.device).to(dtype) for v, p in paths.items()}
        if args.fusion == "both":
            for v in FUSABLE:
                if v in loaded:
                    loaded[v + UNFUSED] = loaded[v]  # the same model, timed with fusion off
        elif args.fusion == "off":
            ops.set_fusion(False)
        for cfg in args.cfg:
            results["rows"] += bench_setting(loaded, cfg, args, fp_config, peers)
    if args.device.type == "cpu" and args.backend == "auto":
        notes.append(
            "backend auto on CPU: ops without a C++ kernel here (see the kernels column) leave their layers "
            "on the float path (the references only emulate integer math); --backend reference forces them"
        )
    return finish(results, start, render, args.json)


if __name__ == "__main__":
    main()
