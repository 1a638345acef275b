"""``ditq train``: train a DiT from a YAML recipe; flags override the file.

    ditq train --config configs/fmnist_tiny.yaml
    ditq train --config configs/synthetic_tiny.yaml --steps 200 --out out/try
    ditq train --resume --out out/try                 # continue where it stopped
    ditq train --config configs/fmnist_ternary.yaml   # ternary QAT (TerDiT); model.safetensors is packed
    ditq train --config configs/fmnist_ternary_distill.yaml   # data-free, from the ditq-fmnist teacher
    torchrun --nproc_per_node=4 -m ditq.cli.main train --config run.yaml [--strategy fsdp]

Writes OUT/log.jsonl, training states OUT/checkpoints/step_XXXXXXX.pt (the
last K) and, at the end, OUT/model.safetensors: the EMA model, or for a run with a
``quant:`` section the raw weights converted to ternary, packed at 2 bits
(``checkpoint.export: auto|ema|model``; ``ditq export --weights ema|model`` packs any
of its training states). ``--init`` starts from full-precision weights
(fine-tuning). Under torchrun, --batch-size is the global batch (split over the
processes) and rank 0 writes.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

import yaml

from ditq.errors import InvalidArgumentError


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``train`` on ``subparsers``; sets ``func=run``."""
    p = subparsers.add_parser(
        "train",
        help="train a DiT from a YAML recipe (synthetic shapes, Fashion-MNIST, image folders, latents)",
        description=__doc__.split("\n\n")[0],
    )
    p.add_argument("--config", default=None, help="YAML or JSON run config (see configs/)")
    p.add_argument("--out", default=None, help="output folder (default: the config's out)")
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue from the newest checkpoint in the output folder (its config.yaml when no --config)",
    )
    p.add_argument("--steps", type=int, default=None, help="total training steps")
    p.add_argument(
        "--batch-size", type=int, default=None, help="images per step, over all processes (global batch)"
    )
    p.add_argument("--lr", type=float, default=None, help="peak learning rate")
    p.add_argument("--seed", type=int, default=None, help="seed of the model init, data and noise")
    p.add_argument(
        "--init",
        default=None,
        metavar="NAME_OR_PATH",
        help="start from these full-precision weights (fine-tuning; sets init.from)",
    )
    p.add_argument(
        "--device",
        default=None,
        help="auto (default: CUDA when available), cpu, cuda, cuda:N (under torchrun: cuda:LOCAL_RANK)",
    )
    p.add_argument(
        "--strategy",
        choices=("ddp", "fsdp"),
        default=None,
        help="under torchrun: ddp (whole model per process) or fsdp (FSDP2, sharded); default: the config's",
    )
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override any config value by its dotted key, e.g. --set optim.warmup_steps=100 (repeatable)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar or messages")
    p.set_defaults(func=run)
    return p


def build_run(args: argparse.Namespace):
    """The :class:`~ditq.train.config.TrainRun` of the parsed options: file, then --set, then flags."""
    from ditq.pipelines.train import CONFIG_FILE
    from ditq.train.config import TrainRun, read_config_file, set_dotted

    if args.config is not None:
        data = read_config_file(args.config)
    elif args.resume and args.out is not None and (Path(args.out) / CONFIG_FILE).is_file():
        data = read_config_file(Path(args.out) / CONFIG_FILE)
    elif args.resume:
        raise InvalidArgumentError(
            f"--resume needs the run's folder: --out DIR holding {CONFIG_FILE}, or --config FILE"
        )
    else:
        raise InvalidArgumentError(
            "give a run config: --config FILE (e.g. configs/synthetic_tiny.yaml in the ditq repository)"
        )
    for item in args.overrides:
        key, sep, text = item.partition("=")
        if not sep:
            raise InvalidArgumentError(f"--set takes KEY=VALUE, got '{item}'")
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError:
            value = text
        set_dotted(data, key.strip(), value)
    flags = {
        "out": args.out,
        "seed": args.seed,
        "device": args.device,
        "distributed.strategy": args.strategy,
        "optim.steps": args.steps,
        "optim.batch_size": args.batch_size,
        "optim.lr": args.lr,
        "init.from": args.init,
    }
    for key, value in flags.items():
        if value is not None:
            set_dotted(data, key, value)
    return TrainRun.from_dict(data)


def run(args: argparse.Namespace) -> int:
    """Build the run from the options and train it."""
    from ditq.pipelines.train import run_training

    train_run = build_run(args)
    quiet = args.quiet
    run_training(
        train_run,
        resume=args.resume,
        command=_command(args),
        progress=not quiet and sys.stderr.isatty(),
        log=(lambda _: None) if quiet else print,
        on_log=None if quiet or sys.stderr.isatty() else _print_record,
    )
    return 0


def _command(args: argparse.Namespace) -> str:
    # Rebuilt from the options rather than sys.argv, which is not ours when called as main([...]).
    parts = ["ditq", "train"]
    for flag in ("config", "out", "steps", "batch_size", "lr", "seed", "init", "device", "strategy"):
        value = getattr(args, flag)
        if value is not None:
            parts += [f"--{flag.replace('_', '-')}", str(value)]
    for item in args.overrides:
        parts += ["--set", item]
    if args.resume:
        parts.append("--resume")
    return shlex.join(parts)


def _print_record(rec: dict) -> None:
    # Without a terminal there is no progress bar: one line per log interval instead.
    print(
        f"step {rec['step']}: loss {rec['loss']:.4f}, grad norm {rec['grad_norm']:.3f}, "
        f"lr {rec['lr']:.2e}, {rec['images_per_s']:.0f} img/s",
        flush=True,
    )
