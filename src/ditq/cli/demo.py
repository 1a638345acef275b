"""``ditq demo``: a labelled grid from a tiny embedded Fashion-MNIST DiT, scored by FID-FMNIST; the model
quantized (Q-DiT PTQ ladder), distilled to ternary weights (TerDiT, data-free) and deployed (size and
latency); then a tiny training run."""

from __future__ import annotations

import argparse
import sys


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``demo`` on ``subparsers``; sets ``func=run``."""
    p = subparsers.add_parser(
        "demo",
        help="sample a labelled grid from the tiny embedded model, then train a tiny one (no download)",
        description=__doc__,
    )
    p.add_argument(
        "--out", default="out/demo", help="output folder for grid.png and samples.npz (default out/demo)"
    )
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--steps", type=int, default=20, help="DDIM steps (default 20)")
    p.add_argument("--samples-per-class", type=int, default=2, help="grid rows (default 2)")
    p.add_argument("--cfg-scale", type=float, default=3.0, help="classifier-free guidance scale (default 3)")
    p.add_argument(
        "--eval-samples",
        type=int,
        default=100,
        help="images scored by FID-FMNIST and class accuracy, the grid's among them (default 100; 0: none)",
    )
    p.add_argument(
        "--ptq-samples",
        type=int,
        default=100,
        help="images per row of the fast PTQ ladder (FP, W8A8, W4A8 three ways; default 100; 0: none)",
    )
    p.add_argument(
        "--ternary-steps",
        type=int,
        default=150,
        help="steps of the demo's data-free ternary (TerDiT) distillation (default 150; 0: none)",
    )
    p.add_argument(
        "--skip-deploy", action="store_true", help="skip the size and latency table (FP32, W8A8, ternary)"
    )
    p.add_argument("--skip-train", action="store_true", help="skip the short training run (synthetic shapes)")
    p.add_argument("--train-steps", type=int, default=80, help="steps of the short training run (default 80)")
    p.add_argument("--quiet", action="store_true", help="print nothing")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    """Run :func:`ditq.pipelines.demo.run_demo` with the parsed options."""
    from ditq.pipelines.demo import run_demo

    run_demo(
        args.out,
        seed=args.seed,
        samples_per_class=args.samples_per_class,
        steps=args.steps,
        cfg_scale=args.cfg_scale,
        progress=not args.quiet and sys.stderr.isatty(),
        log=(lambda _: None) if args.quiet else print,
        train=not args.skip_train,
        train_steps=args.train_steps,
        eval_samples=args.eval_samples,
        ptq_samples=args.ptq_samples,
        ternary_steps=args.ternary_steps,
        deploy=not args.skip_deploy,
    )
    return 0
