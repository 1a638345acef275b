"""How fast are ditq's DiT forward and DDIM sampling, eager vs ``torch.compile``?

For each model (DiT-S/2 and DiT-XL/2 by default) on 256px-equivalent latents
(4x32x32, 1000 classes), with random weights (speed does not depend on values):

* forward throughput, images/s, at ``--batch-size``;
* sampling throughput, images/s of a whole DDIM loop of ``--steps`` steps with
  classifier-free guidance 1.5 through ``forward_with_cfg`` (the model sees a
  doubled batch: ``--sample-batch-size`` images -> 2x that many rows; by default
  half of ``--batch-size``, so forward and sampling run the model at one shape).

Eager and compiled runs are interleaved repeat by repeat, so other load on the
machine hits both alike; the median of ``--repeats`` is reported. The compiled
model's first call (tracing + code generation + one run, with cold on-disk
caches unless ``--warm-compile-cache``) is reported as compile seconds and is
never part of a timing. The analytic forward FLOPs (2*m*n*k per matmul) give
the achieved TFLOP/s, to compare against the device's peak.

    python benchmarks/bench_dit.py                                  # defaults for the device
    python benchmarks/bench_dit.py --models DiT-S/2 --batch-size 4 --steps 5 --json out.json
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import sys
import time

import torch
from _common import (
    cold_compile_cache,
    finish,
    format_table,
    machine_info,
    median,
    synchronizer,
    time_call,
)

from ditq.diffusion import create_diffusion, sample_loop
from ditq.errors import InvalidArgumentError
from ditq.models import create_model, get_config

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
FREQ_EMBED = 256  # DiT's TimestepEmbedder frequency_embedding_size


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- FLOPs
def forward_flops(cfg) -> dict[str, int]:
    """Matmul FLOPs (2*m*n*k) of one image's forward pass, by part; elementwise ops are not counted.

    The DiT paper's "Gflops" count multiply-adds, i.e. half of these (DiT-XL/2: 118.6).
    """
    D, p, L = cfg.hidden_size, cfg.patch_size, cfg.depth
    T = (cfg.input_size // p) ** 2  # tokens
    hidden = int(D * cfg.mlp_ratio)

    def mm(m: int, n: int, k: int) -> int:
        return 2 * m * n * k

    return {
        "patch_embed": mm(T, D, cfg.in_channels * p * p),
        "t_embed": mm(1, D, FREQ_EMBED) + mm(1, D, D),
        "adaLN": L * mm(1, 6 * D, D) + mm(1, 2 * D, D),  # blocks + final layer, once per image
        "qkv": L * mm(T, 3 * D, D),
        "attn_qk": L * mm(T, T, D),  # all heads: H * (T x hd) @ (hd x T)
        "attn_av": L * mm(T, D, T),  # all heads: H * (T x T) @ (T x hd)
        "proj": L * mm(T, D, D),
        "fc1": L * mm(T, hidden, D),
        "fc2": L * mm(T, D, hidden),
        "final": mm(T, p * p * cfg.out_channels, D),
    }


# ----------------------------------------------------------------------------- setup
def build(name: str, device: torch.device, seed: int) -> torch.nn.Module:
    """A registry model, random weights; adaLN-Zero's zeros get small values so outputs are non-trivial."""
    torch.manual_seed(seed)
    model = create_model(name).eval().to(device)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad and not p.any():
                p.normal_(std=0.02)
    return model


def ddim_diffusion(steps: int):
    """A DDIM respacing of ``steps`` steps (``"ddimN"``, or evenly spaced when no integer stride fits)."""
    try:
        return create_diffusion(f"ddim{steps}")
    except InvalidArgumentError:
        return create_diffusion(str(steps))


def try_compile(model: torch.nn.Module, mode: str | None):
    """``torch.compile(model)``, or the reason it cannot be used here (raised lazily at the first call)."""
    if not hasattr(torch, "compile"):
        return None, f"torch {torch.__version__} has no torch.compile"
    try:
        return torch.compile(model, mode=mode), None
    except Exception as exc:  # e.g. "Dynamo is not supported on Python 3.12+" on old torch
        return None, f"{type(exc).__name__}: {exc}"


def dynamo_graphs() -> int | None:
    """Graphs Dynamo compiled since the last reset (best effort: a private counter)."""
    try:
        from torch._dynamo.utils import counters

        return int(counters["stats"]["unique_graphs"])
    except Exception:
        return None


def short_error(exc: BaseException, limit: int = 600) -> str:
    text = f"{type(exc).__name__}: {exc}".strip()
    return text if len(text) <= limit else text[:limit] + " ..."


# ----------------------------------------------------------------------------- one model, one dtype
def bench_one(name: str, dtype_name: str, device: torch.device, args) -> tuple[list[dict], list[str]]:
    notes: list[str] = []
    sync = synchronizer(device)
    model = build(name, device, args.seed)
    cfg = model.config
    flops = sum(forward_flops(cfg).values())
    batch, n_img = args.batch_size, args.sample_batch_size
    shape = (batch, cfg.in_channels, cfg.input_size, cfg.input_size)

    # Inputs are inference tensors, like the ones the sampling loop makes: one set of
    # Dynamo guards then serves forward and sampling (else the loop recompiles).
    with torch.inference_mode():
        gen = torch.Generator().manual_seed(args.seed)
        x = torch.randn(shape, generator=gen).to(device)
        t = torch.randint(0, 1000, (batch,), generator=gen).to(device)
        y = torch.randint(0, cfg.num_classes, (batch,), generator=gen).to(device)
        z = torch.randn((n_img, *shape[1:]), generator=gen).to(device)
        z = torch.cat([z, z])  # guided half + null half, as DiT's sample.py
        labels = torch.randint(0, cfg.num_classes, (n_img,), generator=gen).to(device)
        y_cfg = torch.cat([labels, torch.full_like(labels, cfg.num_classes)])
    diffusion = ddim_diffusion(args.steps) if args.steps > 0 else None
    warm_diffusion = ddim_diffusion(2)  # (a 1-step learned-sigma process has no posterior variance)

    nets: dict[str, torch.nn.Module] = {}
    if "eager" in args.modes:
        nets["eager"] = model
    compile_s = graphs_before = None
    if "compile" in args.modes:
        torch._dynamo.reset()  # no graphs or cache-size budget carried over from the last model
        graphs_before = dynamo_graphs()
        compiled, why = try_compile(model, args.compile_mode)
        if compiled is None:
            notes.append(f"{name} {dtype_name}: compiled rows skipped: {why}")
        else:
            nets["compile"] = compiled

    amp = (
        torch.autocast(device.type, dtype=DTYPES[dtype_name])
        if dtype_name != "fp32"
        else contextlib.nullcontext()
    )

    def forward(net):
        return lambda: [net(x, t, y) for _ in range(args.forward_iters)]

    def sampler(net, diff):
        # forward_with_cfg unbound, so a compiled module's (compiled) forward is what it calls.
        fn = functools.partial(type(model).forward_with_cfg, net, cfg_scale=args.cfg_scale)
        return lambda: sample_loop(
            diff, fn, z.shape, sampler="ddim", noise=z, model_kwargs={"y": y_cfg}, clip_denoised=False
        )

    fwd_times: dict[str, list[float]] = {m: [] for m in nets}
    smp_times: dict[str, list[float]] = {m: [] for m in nets}
    max_rel_diff = None
    with torch.inference_mode(), amp:
        # Warm-up; the compiled model's first call is its compile time.
        for mode, net in list(nets.items()):
            try:
                if mode == "compile":
                    log(f"[{name} {dtype_name}] compiling ...")
                    compile_s = time_call(lambda net=net: net(x, t, y), sync)
                    log(f"[{name} {dtype_name}] first compiled call: {compile_s:.1f} s")
                for _ in range(args.warmup):
                    time_call(lambda net=net: net(x, t, y), sync)
                if diffusion is not None:  # a short loop at the shapes timed
                    time_call(sampler(net, warm_diffusion), sync)
            except Exception as exc:
                if mode != "compile":
                    raise
                why = short_error(exc)
                notes.append(f"{name} {dtype_name}: torch.compile failed, compiled rows skipped: {why}")
                log(notes[-1])
                del nets[mode], fwd_times[mode], smp_times[mode]
                compile_s = None
        if "eager" in nets and "compile" in nets:
            ref, out = nets["eager"](x, t, y).float(), nets["compile"](x, t, y).float()
            max_rel_diff = ((out - ref).abs().max() / ref.abs().max()).item()

        for r in range(args.repeats):
            for mode, net in nets.items():
                fwd_times[mode].append(time_call(forward(net), sync))
            log(
                f"[{name} {dtype_name}] forward repeat {r + 1}/{args.repeats}: "
                + ", ".join(f"{m} {v[-1]:.3f} s" for m, v in fwd_times.items())
            )
        if diffusion is not None:
            for r in range(args.repeats):
                for mode, net in nets.items():
                    smp_times[mode].append(time_call(sampler(net, diffusion), sync))
                log(
                    f"[{name} {dtype_name}] sampling repeat {r + 1}/{args.repeats}: "
                    + ", ".join(f"{m} {v[-1]:.3f} s" for m, v in smp_times.items())
                )

    rows = []
    for mode in nets:
        fwd_s = median(fwd_times[mode])
        fwd_ips = batch * args.forward_iters / fwd_s
        smp_s = median(smp_times[mode]) if smp_times[mode] else None
        row = {
            "model": name,
            "device": device.type,
            "dtype": dtype_name,
            "mode": mode,
            "batch": batch,
            "forward_s": fwd_s,
            "forward_img_s": fwd_ips,
            "forward_tflops": fwd_ips * flops / 1e12,
            "forward_times_s": fwd_times[mode],
            "sample_images": n_img,
            "sample_model_batch": 2 * n_img,
            "steps": args.steps,
            "sample_s": smp_s,
            "sample_img_s": n_img / smp_s if smp_s else None,
            "sample_tflops": args.steps * 2 * n_img * flops / smp_s / 1e12 if smp_s else None,
            "sample_times_s": smp_times[mode],
            "compile_s": compile_s if mode == "compile" else None,
            "gflops_per_image": flops / 1e9,
        }
        if mode == "compile":
            row["compiled_vs_eager_max_rel_diff"] = max_rel_diff
            after = dynamo_graphs()  # > 1 graph means a graph break or a recompile
            row["dynamo_graphs"] = None if after is None or graphs_before is None else after - graphs_before
        rows.append(row)
    eager = next((r for r in rows if r["mode"] == "eager"), None)
    for row in rows:
        if eager is not None and row is not eager:
            row["forward_ratio"] = row["forward_img_s"] / eager["forward_img_s"]
            if row["sample_img_s"] and eager["sample_img_s"]:
                row["sample_ratio"] = row["sample_img_s"] / eager["sample_img_s"]
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows, notes


# ----------------------------------------------------------------------------- report
def _f(v, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


def render(results: dict) -> str:
    m = results["machine"]
    lines = [
        f"machine: {m['cpu']} ({m['torch_threads']} torch threads of {m['cpu_count']} CPUs)"
        + (f", GPU {m['gpu']}" if "gpu" in m else "")
        + f"; torch {m['torch']}, Python {m['python']}; {m['date']}",
        f"load average before/after: {m['load_average']} / {results.get('load_average_after')}",
        "",
        "analytic forward GFLOPs per image (2*m*n*k over matmuls):",
    ]
    for name, parts in results["flops"].items():
        total = sum(parts.values())
        big = ", ".join(f"{k} {v / 1e9:.2f}" for k, v in parts.items() if v / total >= 0.01)
        lines.append(f"  {name}: {total / 1e9:.2f} GFLOPs ({big})")
    a = results["args"]
    lines += [
        "",
        f"forward: batch {a['batch_size']} x {a['forward_iters']} call(s) per repeat; sampling: DDIM "
        f"{a['steps']} steps, cfg {a['cfg_scale']}, {a['sample_batch_size']} images per loop "
        f"(model batch {2 * a['sample_batch_size']}); median of {a['repeats']} repeats",
        "",
    ]
    header = [
        "model",
        "device",
        "dtype",
        "mode",
        "batch",
        "fwd img/s",
        "fwd TFLOP/s",
        "sample img/s",
        "sample TFLOP/s",
        "compile s",
        "fwd x eager",
        "sample x eager",
    ]
    rows = [
        [
            r["model"],
            r["device"],
            r["dtype"],
            r["mode"],
            r["batch"],
            _f(r["forward_img_s"], ".3g"),
            _f(r["forward_tflops"], ".3f"),
            _f(r["sample_img_s"], ".3g"),
            _f(r["sample_tflops"], ".3f"),
            _f(r["compile_s"], ".1f"),
            _f(r.get("forward_ratio"), ".2f"),
            _f(r.get("sample_ratio"), ".2f"),
        ]
        for r in results["rows"]
    ]
    lines.append(format_table(header, rows))
    diffs = [
        f"{r['model']} {r['dtype']}: {r['compiled_vs_eager_max_rel_diff']:.1e} ({r['dynamo_graphs']} graphs)"
        for r in results["rows"]
        if r.get("compiled_vs_eager_max_rel_diff") is not None
    ]
    if diffs:
        lines += [
            "",
            "compiled vs eager forward, max |diff| / max |eager| (Dynamo graphs): " + "; ".join(diffs),
        ]
    for note in results["notes"]:
        lines.append(f"note: {note}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- CLI
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="DiT-S/2,DiT-XL/2", help="comma-separated registry names")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument(
        "--dtypes",
        default=None,
        help="comma-separated of fp32,bf16,fp16 (autocast); default fp32 on CPU, bf16 on CUDA",
    )
    p.add_argument("--modes", default="eager,compile", help="comma-separated of eager,compile")
    p.add_argument("--batch-size", type=int, default=None, help="forward batch (default 8 CPU, 64 GPU)")
    p.add_argument(
        "--sample-batch-size",
        type=int,
        default=None,
        help="images per sampling loop; the model sees twice as many (default batch/2)",
    )
    p.add_argument("--steps", type=int, default=None, help="DDIM steps (10 CPU, 50 GPU); 0: none")
    p.add_argument("--cfg-scale", type=float, default=1.5)
    p.add_argument("--repeats", type=int, default=None, help="timed repeats, median kept (3 CPU, 5 GPU)")
    p.add_argument("--warmup", type=int, default=None, help="untimed forward calls (default 1 CPU, 3 GPU)")
    p.add_argument(
        "--forward-iters", type=int, default=None, help="forward calls per repeat (default 1 CPU, 10 GPU)"
    )
    p.add_argument(
        "--compile-mode", default=None, help="torch.compile mode: default, reduce-overhead, max-autotune"
    )
    p.add_argument(
        "--warm-compile-cache",
        action="store_true",
        help="keep Inductor's on-disk cache (default: a fresh one, so compile times are cold)",
    )
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    p.add_argument("--tf32", action="store_true", help="allow TF32 matmuls for fp32 on CUDA")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="write the results here")
    args = p.parse_args(argv)

    args.device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    gpu = args.device.type == "cuda"
    args.models = [s.strip() for s in args.models.split(",") if s.strip()]
    args.dtypes = [s.strip() for s in (args.dtypes or ("bf16" if gpu else "fp32")).split(",") if s.strip()]
    args.modes = [s.strip() for s in args.modes.split(",") if s.strip()]
    for d in args.dtypes:
        if d not in DTYPES:
            p.error(f"unknown dtype '{d}'; choose from {', '.join(DTYPES)}")
    for m in args.modes:
        if m not in ("eager", "compile"):
            p.error(f"unknown mode '{m}'; choose from eager, compile")
    args.batch_size = args.batch_size or (64 if gpu else 8)
    args.sample_batch_size = args.sample_batch_size or max(1, args.batch_size // 2)
    args.steps = (50 if gpu else 10) if args.steps is None else args.steps
    args.repeats = args.repeats or (5 if gpu else 3)
    args.warmup = (3 if gpu else 1) if args.warmup is None else args.warmup
    args.forward_iters = args.forward_iters or (10 if gpu else 1)
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    start = time.perf_counter()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if "compile" in args.modes and not args.warm_compile_cache:
        cold_compile_cache()

    results = {
        "benchmark": "bench_dit",
        "command": " ".join([sys.executable, *sys.argv]),
        "machine": machine_info(args.device),
        "args": {k: (str(v) if isinstance(v, torch.device) else v) for k, v in vars(args).items()},
        "flops": {},
        "rows": [],
        "notes": [],
    }
    for name in args.models:
        results["flops"][name] = forward_flops(get_config(name))
        for dtype_name in args.dtypes:
            rows, notes = bench_one(name, dtype_name, args.device, args)
            results["rows"] += rows
            results["notes"] += notes
    return finish(results, start, render, args.json)


if __name__ == "__main__":
    main()
