"""``ditq ptq``: Q-DiT post-training quantization of a DiT into a reloadable quantized checkpoint.

    ditq ptq --model ditq-fmnist --wbits 4 --abits 8 --gptq --out w4a8.safetensors --report w4a8
    ditq ptq --model DiT-XL/2 --wbits 4 --abits 8 --search --ref VIRTUAL_imagenet256_labeled.npz \\
             --gptq --out xl-w4a8.safetensors
    ditq ptq --model ckpt.safetensors --layer-config w4a8.safetensors.layers.json --out q.safetensors

The checkpoint holds integer codes, group scales/zeros and the full
quantization config (per-layer map included); ``ditq sample --model`` reads it.

A search with ``--search-state`` resumes from that file, which one process at a
time may use (a second exits 2 naming the first); SIGTERM, SIGINT or SIGUSR1
stops it after the current generation is saved (exit 75, printing the command
that resumes it). A write that fails for a full disk or a read-only folder is
one line and exit 74, with the previous file kept.
"""

from __future__ import annotations

import argparse
import shlex
import sys

from ditq.errors import InvalidArgumentError


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``ptq`` on ``subparsers``; sets ``func=run``."""
    p = subparsers.add_parser(
        "ptq",
        help="quantize a DiT (Q-DiT: group-wise weights, dynamic activations, GPTQ, granularity search)",
        description=__doc__.split("\n\n")[0],
    )
    p.add_argument("--model", required=True, help="registry name (DiT-XL/2), embedded name or checkpoint")
    p.add_argument("--out", required=True, help="output checkpoint (.safetensors)")
    q = p.add_argument_group("quantization")
    q.add_argument("--wbits", type=int, default=4, help="weight bits, 2-8 (default 4)")
    q.add_argument("--abits", type=int, default=8, help="activation bits, 2-8, or 16 for float (default 8)")
    q.add_argument(
        "--w-group",
        type=int,
        default=128,
        help="weight group size along inputs; 0 = per channel (default 128)",
    )
    q.add_argument(
        "--a-group",
        type=int,
        default=0,
        help="activation group size; 0 = per token, -1 = per tensor (default 0)",
    )
    q.add_argument(
        "--static", action="store_true", help="calibrated static activation ranges (default dynamic)"
    )
    q.add_argument("--w-sym", action="store_true", help="symmetric weights (default asymmetric)")
    q.add_argument(
        "--w-clip", default="max", help="weight clipping: max, mse, percentile or a ratio (default max)"
    )
    q.add_argument("--adaln", action="store_true", help="also quantize the adaLN linears")
    q.add_argument("--gptq", action="store_true", help="GPTQ weights (damping 0.01, block 128)")
    q.add_argument("--act-order", action="store_true", help="GPTQ with act-order (static groups)")
    q.add_argument(
        "--layer-config", default=None, metavar="PATH", help="per-layer group sizes (a search's output)"
    )
    c = p.add_argument_group("calibration")
    c.add_argument("--calib-samples", type=int, default=256, help="samples recorded (default 256)")
    c.add_argument("--calib-steps", type=int, default=50, help="DDIM steps while recording (default 50)")
    c.add_argument("--calib-cfg", type=float, default=1.5, help="guidance while recording (default 1.5)")
    c.add_argument("--calib-data", default=None, metavar="PATH", help="calibration inputs saved earlier")
    s = p.add_argument_group("granularity search")
    s.add_argument("--search", action="store_true", help="search per-layer weight and activation group sizes")
    s.add_argument(
        "--search-groups",
        default="32,64,128,192,288",
        metavar="G1,G2,...",
        help="candidate group sizes (default 32,64,128,192,288; 0 = per channel/token)",
    )
    s.add_argument("--search-population", type=int, default=50, help="population (default 50)")
    s.add_argument("--search-generations", type=int, default=10, help="generations (default 10)")
    s.add_argument(
        "--search-prescreen", type=int, default=None, metavar="K", help="real fitness for the K best by proxy"
    )
    s.add_argument("--search-samples", type=int, default=800, help="samples per fitness FID (default 800)")
    s.add_argument("--search-steps", type=int, default=50, help="DDIM steps for fitness samples (default 50)")
    s.add_argument(
        "--search-state",
        default=None,
        metavar="PATH",
        help="state file, saved every generation: the same command resumes a stopped or killed search",
    )
    e = p.add_argument_group("evaluation")
    e.add_argument(
        "--eval-samples", type=int, default=0, help="FP vs quantized quality on N samples (default off)"
    )
    e.add_argument("--eval-steps", type=int, default=50, help="DDIM steps (default 50)")
    e.add_argument("--eval-cfg", type=float, default=1.0, help="guidance scale (default 1: none)")
    e.add_argument("--ref", default=None, help="ADM reference batch for Inception FID (latent/RGB models)")
    p.add_argument("--report", default=None, metavar="PATH", help="write PATH.json and PATH.md")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--device", default="auto", help="cpu, cuda, ... (default: cuda when available)")
    p.add_argument("--quiet", action="store_true", help="print nothing")
    p.set_defaults(func=run)
    return p


def _groups(text: str) -> tuple[int, ...]:
    try:
        groups = tuple(int(g) for g in text.split(",") if g.strip())
    except ValueError:
        raise InvalidArgumentError(
            f"--search-groups must be integers separated by commas, got '{text}'"
        ) from None
    if not groups:
        raise InvalidArgumentError("--search-groups is empty")
    return groups


def options_from_args(args: argparse.Namespace):
    """The :class:`~ditq.pipelines.ptq.PTQOptions` of a parsed command line (checked, nothing loaded)."""
    from ditq.pipelines.ptq import CalibSpec, EvalSpec, PTQOptions

    for flag in ("calib_samples", "calib_steps", "search_population", "search_generations", "search_samples"):
        if getattr(args, flag) < 1:
            raise InvalidArgumentError(
                f"--{flag.replace('_', '-')} must be positive, got {getattr(args, flag)}"
            )
    if args.eval_samples < 0:
        raise InvalidArgumentError(f"--eval-samples must be >= 0, got {args.eval_samples}")
    if args.search and args.layer_config:
        raise InvalidArgumentError(
            "--search and --layer-config exclude each other: a search writes a layer config"
        )
    clip = args.w_clip
    try:
        clip = float(clip)
    except ValueError:
        pass
    opts = PTQOptions(
        model=args.model,
        out=args.out,
        w_bits=args.wbits,
        a_bits=args.abits,
        w_group=args.w_group,
        a_group=args.a_group,
        dynamic=not args.static,
        w_sym=args.w_sym,
        w_clip=clip,
        quantize_adaln=args.adaln,
        gptq=args.gptq,
        act_order=args.act_order,
        layer_config=args.layer_config,
        calib=CalibSpec(args.calib_samples, args.calib_steps, args.calib_cfg, seed=args.seed),
        calib_data=args.calib_data,
        search=args.search,
        search_groups=_groups(args.search_groups),
        search_population=args.search_population,
        search_generations=args.search_generations,
        search_prescreen=args.search_prescreen,
        search_eval=EvalSpec(args.search_samples, args.search_steps, 1.0, seed=args.seed),
        search_state=args.search_state,
        eval=EvalSpec(args.eval_samples, args.eval_steps, args.eval_cfg, seed=args.seed)
        if args.eval_samples
        else None,
        ref=args.ref,
        report=args.report,
        seed=args.seed,
        device=args.device,
        command=_command(args),
    )
    opts.qdit_config()  # bits and group sizes are checked before the model loads
    return opts


def _command(args: argparse.Namespace) -> str:
    """The command line of ``args``: what the checkpoint records and what resumes a stopped search.

    Rebuilt from the options rather than sys.argv, which is not ours when called as main([...]);
    options left at their defaults are left out."""
    parser = add_parser(argparse.ArgumentParser().add_subparsers())
    parts = ["ditq", "ptq"]
    for action in parser._actions:
        if not action.option_strings or action.dest == "help":
            continue
        value = getattr(args, action.dest, action.default)
        if value == action.default:
            continue
        flag = max(action.option_strings, key=len)
        parts += [flag] if action.nargs == 0 else [flag, str(value)]
    return shlex.join(parts)


def run(args: argparse.Namespace) -> int:
    """Quantize ``--model`` as asked; write ``--out`` (and ``--report``)."""
    from ditq.pipelines.ptq import run_ptq

    options = options_from_args(args)
    say = (lambda _: None) if args.quiet else print
    result = run_ptq(options, log=say, progress=not args.quiet and sys.stderr.isatty())
    for path in result.report_paths:
        say(f"wrote {path}")
    return 0
