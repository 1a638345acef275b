"""How fast does ditq train a DiT, eager vs ``torch.compile``, and how much memory does a step take?

For each model (DiT-S/2 and DiT-XL/2 by default) on 256px-equivalent latents
(4x32x32, 1000 classes), one training step is what :func:`ditq.train.loop.fit`
does: timesteps and noise drawn on the device, DiT's hybrid diffusion loss
(:func:`ditq.train.loop.diffusion_loss`, MSE on epsilon + the VB term) under the
precision's autocast, ``zero_grad(set_to_none=True)``, backward (through a
``GradScaler`` for fp16), gradient clipping (``--grad-clip``, 0: off), AdamW and
the EMA update (:func:`ditq.train.ema.update_ema`). The compiled mode compiles
the model as ``fit(..., TrainConfig(compile=True))`` does: ``torch.compile(model)``,
the optimizer and EMA stay eager. Weights are the registry's initialization
(speed does not depend on values); the latents are random and fixed.

Reported per model, dtype and mode:

* images/s and ms per step, the median of ``--repeats`` repeats of ``--steps`` steps;
  eager and compiled repeats are interleaved (one model, optimizer and EMA,
  two forwards), so other load on the machine hits both alike;
* the achieved training TFLOP/s, counting a step as 3x the analytic forward
  FLOPs of ``bench_dit.forward_flops`` (backward ~ 2x forward);
* compile seconds: the compiled step's first call (forward and backward graphs,
  cold Inductor caches unless ``--warm-compile-cache``), never part of a timing;
* peak memory over the timed steps. CUDA: ``torch.cuda.max_memory_allocated``
  (reset before each repeat). CPU: the process's resident-set high-water mark
  (``VmHWM`` of /proc/self/status, reset before each repeat through
  /proc/self/clear_refs) minus the resident set before the model was built;
  where that reset is not available, ``resource.getrusage().ru_maxrss`` (a
  lifetime mark, so later rows include earlier peaks). ``peak_mem_source``
  says which. Either way it covers weights, gradients, AdamW state, the EMA
  and activations.

``--quant fp,ternary,ternary-a8`` also times TerDiT's quantization-aware training
of the same model: its block linears (and adaLN linears) prepared by
``quantize_(model, TernaryQATConfig())`` (absmean ternarization with
straight-through gradients and a learnable α per layer, weight-only or with int8
per-token activations), everything else as above; ``x fp`` is the overhead of the
fake ternarization (the ternary row's images/s over the float row's, same mode).

``--dry-run`` builds each model on the meta device (no memory, no steps) and
prints its parameters, FLOPs and the state a step keeps, to check a
configuration before paying for it.

    python benchmarks/bench_train.py                                  # defaults for the device
    python benchmarks/bench_train.py --models DiT-S/2 --batch-size 2 --steps 2 --repeats 1 --json out.json
    python benchmarks/bench_train.py --models DiT-XL/2 --dry-run
    python benchmarks/bench_train.py --models DiT-S/2 --modes eager --quant fp,ternary,ternary-a8
"""

from __future__ import annotations

import argparse
import re
import resource
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
    write_json,
)
from bench_dit import dynamo_graphs, forward_flops, log, short_error, try_compile
from torch import nn

from ditq import quant
from ditq.diffusion import create_diffusion
from ditq.models import build_model, get_config
from ditq.train.ema import make_ema, update_ema
from ditq.train.loop import diffusion_loss

DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
QUANTS = {"fp": None, "ternary": quant.TernaryQATConfig(), "ternary-a8": quant.TernaryQATConfig(act_bits=8)}
MODES = {"eager": "eager", "compile": "compile", "compiled": "compile"}


# ----------------------------------------------------------------------------- memory
def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            m = re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.MULTILINE)
        return int(m.group(1)) if m else None
    except OSError:
        return None


class PeakMemory:
    """Peak memory of the work between :meth:`reset` and :meth:`read`, in bytes (see the module doc)."""

    def __init__(self, device: torch.device):
        self.device = device
        if device.type == "cuda":
            self.source = "cuda max_memory_allocated"
            self.baseline = 0
            return
        self.baseline = (_status_kib("VmRSS") or 0) * 1024  # before the model exists
        if self._clear_hwm():
            self.source = "cpu VmHWM (reset per repeat) - RSS before the model"
        else:
            self.source = "cpu ru_maxrss (lifetime high-water mark) - RSS before the model"

    @staticmethod
    def _clear_hwm() -> bool:
        # Writing 5 to clear_refs resets the peak RSS (Linux >= 4.0).
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            return _status_kib("VmHWM") is not None
        except OSError:
            return False

    def reset(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        elif "VmHWM" in self.source:
            self._clear_hwm()

    def read(self) -> int:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device)
        if "VmHWM" in self.source:
            peak = (_status_kib("VmHWM") or 0) * 1024
        else:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (
                1 if sys.platform == "darwin" else 1024
            )
        return max(0, peak - self.baseline)


# ----------------------------------------------------------------------------- setup
def state_bytes(params: int) -> int:
    """Bytes a step keeps besides activations: fp32 weights, gradients, AdamW's two moments, the EMA.

    The same under autocast, which keeps the weights (and so gradients and optimizer state) in fp32.
    """
    return params * 4 * 5


def count_params(name: str) -> int:
    """Parameters of a registry model, built on the meta device (no memory)."""
    with torch.device("meta"):
        model = build_model(get_config(name))
    return sum(p.numel() for p in model.parameters())


class Trainer:
    """One model, its AdamW and EMA, and the training step of ``ditq.train.loop.fit``."""

    def __init__(self, name: str, device: torch.device, dtype_name: str, args, quant_name: str = "fp"):
        torch.manual_seed(args.seed)
        self.device, self.args = device, args
        self.model = build_model(get_config(name)).to(device).train()
        if QUANTS[quant_name] is not None:  # TerDiT QAT: latent float weights, ternary forward
            quant.quantize_(self.model, QUANTS[quant_name])
        self.cfg = self.model.config
        self.ema = make_ema(self.model)
        self.opt = torch.optim.AdamW(
            [p for p in self.model.parameters() if p.requires_grad], lr=1e-4, weight_decay=0.0
        )
        self.diffusion = create_diffusion("")  # 1000 steps, learned sigma: the hybrid loss
        self.dtype = DTYPES[dtype_name]
        self.scaler = torch.amp.GradScaler(device.type) if dtype_name == "fp16" else None
        gen = torch.Generator().manual_seed(args.seed)
        shape = (args.batch_size, self.cfg.in_channels, self.cfg.input_size, self.cfg.input_size)
        self.x = torch.randn(shape, generator=gen).to(device)
        self.y = torch.randint(0, self.cfg.num_classes, (args.batch_size,), generator=gen).to(device)
        self.gen = torch.Generator(device=device).manual_seed(args.seed)

    def step(self, forward) -> torch.Tensor:
        """One training step through ``forward`` (the model, or its compiled wrapper); returns the loss."""
        x, y, opt = self.x, self.y, self.opt
        kw = {"generator": self.gen, "device": self.device}
        t = torch.randint(0, self.diffusion.num_timesteps, (len(x),), **kw)
        noise = torch.randn(x.shape, **kw)
        with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype is not None):
            loss = diffusion_loss(forward, self.diffusion, x, t, y, noise)
        opt.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(opt)
        else:
            loss.backward()
        if self.args.grad_clip > 0:
            nn.utils.clip_grad_norm_(self.model.parameters(), self.args.grad_clip)
        if self.scaler is not None:
            self.scaler.step(opt)
            self.scaler.update()
        else:
            opt.step()
        update_ema(self.ema, self.model, 0.9999)
        return loss.detach()


# ----------------------------------------------------------------------------- one model, one dtype
def bench_one(
    name: str, dtype_name: str, device: torch.device, args, quant_name: str = "fp"
) -> tuple[list[dict], list[str]]:
    notes: list[str] = []
    sync = synchronizer(device)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    mem = PeakMemory(device)
    trainer = Trainer(name, device, dtype_name, args, quant_name)
    params = sum(p.numel() for p in trainer.model.parameters())
    flops = 3 * sum(forward_flops(trainer.cfg).values())
    batch, steps = args.batch_size, args.steps

    forwards: dict[str, nn.Module] = {}
    if "eager" in args.modes:
        forwards["eager"] = trainer.model
    compile_s = graphs_before = None
    if "compile" in args.modes:
        torch._dynamo.reset()  # no graphs or cache-size budget carried over from the last model
        graphs_before = dynamo_graphs()
        compiled, why = try_compile(trainer.model, args.compile_mode)
        if compiled is None:
            notes.append(f"{name} {dtype_name}: compiled rows skipped: {why}")
        else:
            forwards["compile"] = compiled

    def run_steps(fwd, n):
        return lambda: [trainer.step(fwd) for _ in range(n)]

    losses: dict[str, float] = {}
    for mode, fwd in list(forwards.items()):
        try:
            if mode == "compile":
                log(f"[{name} {dtype_name}] compiling (forward and backward) ...")
                compile_s = time_call(run_steps(fwd, 1), sync)
                log(f"[{name} {dtype_name}] first compiled step: {compile_s:.1f} s")
            for _ in range(args.warmup):
                time_call(run_steps(fwd, 1), sync)
            losses[mode] = float(trainer.step(fwd))
        except Exception as exc:
            if mode != "compile":
                raise
            notes.append(
                f"{name} {dtype_name}: torch.compile failed, compiled rows skipped: {short_error(exc)}"
            )
            log(notes[-1])
            del forwards[mode]
            compile_s = None

    times: dict[str, list[float]] = {m: [] for m in forwards}
    peaks: dict[str, int] = {m: 0 for m in forwards}
    for r in range(args.repeats):
        for mode, fwd in forwards.items():
            mem.reset()
            times[mode].append(time_call(run_steps(fwd, steps), sync))
            peaks[mode] = max(peaks[mode], mem.read())
        log(
            f"[{name} {dtype_name}] repeat {r + 1}/{args.repeats}: "
            + ", ".join(f"{m} {v[-1] / steps * 1e3:.1f} ms/step" for m, v in times.items())
        )

    rows = []
    for mode in forwards:
        step_s = median(times[mode]) / steps
        ips = batch / step_s
        row = {
            "model": name,
            "device": device.type,
            "dtype": dtype_name,
            "quant": quant_name,
            "mode": mode,
            "batch": batch,
            "images_per_s": ips,
            "step_ms": step_s * 1e3,
            "peak_mem_bytes": peaks[mode],
            "peak_mem_source": mem.source,
            "compile_s": compile_s if mode == "compile" else None,
            "params": params,
            "train_tflops": ips * flops / 1e12,
            "train_gflops_per_image": flops / 1e9,
            "steps": steps,
            "repeat_times_s": times[mode],
            "loss_after_warmup": losses.get(mode),
        }
        if mode == "compile":
            after = dynamo_graphs()  # > 1 graph means a graph break or a recompile
            row["dynamo_graphs"] = None if after is None or graphs_before is None else after - graphs_before
        rows.append(row)
    eager = next((r for r in rows if r["mode"] == "eager"), None)
    for row in rows:
        if eager is not None and row is not eager:
            row["vs_eager"] = row["images_per_s"] / eager["images_per_s"]
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows, notes


# ----------------------------------------------------------------------------- report
def _f(v, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


def _gib(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**30:.2f}"


def machine_name(m: dict) -> str:
    cpu = f"{m['cpu']} ({m['torch_threads']} threads)"
    return f"{m['gpu']}; {cpu}" if "gpu" in m else cpu


def render(results: dict) -> str:
    m, a = results["machine"], results["args"]
    lines = [
        f"machine: {m['cpu']} ({m['torch_threads']} torch threads of {m['cpu_count']} CPUs)"
        + (f", GPU {m['gpu']}" if "gpu" in m else "")
        + f"; torch {m['torch']}, Python {m['python']}; {m['date']}",
        f"load average before/after: {m['load_average']} / {results.get('load_average_after')}",
        "",
        f"training step: hybrid diffusion loss, AdamW, grad clip {a['grad_clip'] or 'off'}, EMA; "
        f"{a['steps']} steps per repeat, median of {a['repeats']} repeats after {a['warmup']} warm-up "
        "step(s); "
        "TFLOP/s count 3x the forward matmul FLOPs",
        "",
    ]
    header = [
        "model", "device", "dtype", "quant", "mode", "batch", "img/s", "ms/step", "TFLOP/s", "peak GiB",
        "compile s", "x eager", "x fp", "params (M)",
    ]  # fmt: skip
    rows = [
        [
            r["model"],
            r["device"],
            r["dtype"],
            r.get("quant", "fp"),
            r["mode"],
            r["batch"],
            _f(r["images_per_s"], ".3g"),
            _f(r["step_ms"], ".1f"),
            _f(r["train_tflops"], ".3f"),
            _gib(r["peak_mem_bytes"]),
            _f(r["compile_s"], ".1f"),
            _f(r.get("vs_eager"), ".2f"),
            _f(r.get("vs_fp"), ".2f"),
            f"{r['params'] / 1e6:.1f}",
        ]
        for r in results["rows"]
    ]
    lines.append(format_table(header, rows))
    sources = sorted({r["peak_mem_source"] for r in results["rows"]})
    if sources:
        lines += ["", "peak memory: " + "; ".join(sources)]
    graphs = [
        f"{r['model']} {r['dtype']}: {r['dynamo_graphs']}" for r in results["rows"] if "dynamo_graphs" in r
    ]
    if graphs:
        lines.append("Dynamo graphs (forward; > 1: a graph break or recompile): " + "; ".join(graphs))
    for note in results["notes"]:
        lines.append(f"note: {note}")
    return "\n".join(lines)


def dry_run(args) -> dict:
    """Build each model on the meta device; print what a run would train, without training."""
    out = {}
    for name in args.models:
        cfg = get_config(name)
        params = count_params(name)
        flops = 3 * sum(forward_flops(cfg).values())
        out[name] = {"params": params, "train_gflops_per_image": flops / 1e9}
        print(
            f"{name}: {params / 1e6:.1f}M parameters, {flops / 1e9:.1f} training GFLOPs per image "
            f"(3x forward), input {cfg.in_channels}x{cfg.input_size}x{cfg.input_size}, "
            f"{cfg.num_classes} classes; weights + grads + AdamW + EMA "
            f"{state_bytes(params) / 2**30:.2f} GiB before activations"
        )
    return out


# ----------------------------------------------------------------------------- CLI
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="DiT-S/2,DiT-XL/2", help="comma-separated registry names")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument(
        "--dtypes",
        default=None,
        help="comma-separated of fp32,bf16,fp16 (autocast; fp16 with a GradScaler); "
        "default fp32 on CPU, bf16 on CUDA",
    )
    p.add_argument("--modes", default="eager,compile", help="comma-separated of eager,compile")
    p.add_argument(
        "--quant",
        default="fp",
        help="comma-separated of fp, ternary, ternary-a8 (TerDiT QAT of the same model; default fp)",
    )
    p.add_argument("--batch-size", type=int, default=None, help="images per step (default 4 CPU, 32 GPU)")
    p.add_argument("--steps", type=int, default=None, help="timed steps per repeat (default 3 CPU, 20 GPU)")
    p.add_argument("--repeats", type=int, default=None, help="timed repeats, median kept (3 CPU, 5 GPU)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps per mode (default 1 CPU, 3 GPU)")
    p.add_argument("--grad-clip", type=float, default=1.0, help="max gradient norm; 0: no clipping")
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
    p.add_argument("--dry-run", action="store_true", help="build on the meta device and print sizes only")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="write the results here")
    args = p.parse_args(argv)

    args.device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    gpu = args.device.type == "cuda"
    args.models = [s.strip() for s in args.models.split(",") if s.strip()]
    args.dtypes = [s.strip() for s in (args.dtypes or ("bf16" if gpu else "fp32")).split(",") if s.strip()]
    for d in args.dtypes:
        if d not in DTYPES:
            p.error(f"unknown dtype '{d}'; choose from {', '.join(DTYPES)}")
    modes = [s.strip() for s in args.modes.split(",") if s.strip()]
    for m in modes:
        if m not in MODES:
            p.error(f"unknown mode '{m}'; choose from eager, compile")
    args.modes = list(dict.fromkeys(MODES[m] for m in modes))
    args.quant = [s.strip() for s in args.quant.split(",") if s.strip()]
    for q in args.quant:
        if q not in QUANTS:
            p.error(f"unknown --quant '{q}'; choose from {', '.join(QUANTS)}")
    args.batch_size = args.batch_size or (32 if gpu else 4)
    args.steps = args.steps or (20 if gpu else 3)
    args.repeats = args.repeats or (5 if gpu else 3)
    args.warmup = (3 if gpu else 1) if args.warmup is None else args.warmup
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.dry_run:
        results = {"benchmark": "bench_train", "dry_run": True, "models": dry_run(args)}
        if args.json:
            write_json(args.json, results)
        return results
    start = time.perf_counter()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if "compile" in args.modes and not args.warm_compile_cache:
        cold_compile_cache()

    machine = machine_info(args.device)
    command = " ".join([sys.executable, *(sys.argv if argv is None else [sys.argv[0], *argv])])
    results = {
        "benchmark": "bench_train",
        "command": command,
        "machine": machine,
        "args": {k: (str(v) if isinstance(v, torch.device) else v) for k, v in vars(args).items()},
        "rows": [],
        "notes": [],
    }
    for name in args.models:
        for dtype_name in args.dtypes:
            float_rows: dict[str, dict] = {}
            for quant_name in args.quant:
                rows, notes = bench_one(name, dtype_name, args.device, args, quant_name)
                for row in rows:  # each row names where and how it was measured
                    row.update(machine=machine_name(machine), command=command, date=machine["date"])
                    if quant_name == "fp":
                        float_rows[row["mode"]] = row
                    elif row["mode"] in float_rows:  # the QAT overhead, same model, dtype and mode
                        row["vs_fp"] = row["images_per_s"] / float_rows[row["mode"]]["images_per_s"]
                results["rows"] += rows
                results["notes"] += notes
    return finish(results, start, render, args.json)


if __name__ == "__main__":
    main()
