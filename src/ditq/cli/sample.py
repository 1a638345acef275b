"""``ditq sample``: class-conditional samples from a DiT, as an ADM ``.npz`` or a PNG grid.

    ditq sample --model DiT-XL/2 --num-samples 16 --cfg-scale 4 --out grid.png
    ditq sample --model ckpt.safetensors --num-samples 50000 --balanced --out samples.npz
    torchrun --nproc_per_node=8 -m ditq.cli.main sample --model DiT-XL/2 --num-samples 50000 \
        --sampler ddim --cfg-scale 1.5 --out samples.npz

Quantized checkpoints (``ditq ptq``, ``ditq export``) run their quantized layers
on the integer kernels of ``ditq.kernels``; ``--backend`` chooses them: ``auto``
(default: the fastest this device has), ``reference`` (plain PyTorch), ``cpu``
or ``triton``. Asking for one this machine lacks is an error naming those it has.

The output format follows the suffix of ``--out`` (``.npz``, ``.png``, ``.jpg``).
An ``.npz`` is drawn in shards of ``--shard-size`` samples, written to
``--shard-dir`` (default ``samples.shards/`` beside ``samples.npz``) and
merged at the end (the shards are then deleted, unless ``--keep-shards``). A
killed run resumes: run the same command again and the complete shards are
kept. SIGTERM, SIGINT or SIGUSR1 stops it after the current shard (exit 75,
printing the command that resumes it); a second process on the same shard
folder is refused (exit 2), a full disk or read-only folder is exit 74.
Under torchrun the shards are shared out among the processes and rank 0
writes the ``.npz``; the images are the same for any number of processes.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from ditq.cli import command_line
from ditq.errors import InvalidArgumentError

if TYPE_CHECKING:
    import torch


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``sample`` on ``subparsers``; sets ``func=run``."""
    p = subparsers.add_parser(
        "sample",
        help="draw class-conditional samples to an .npz batch or a PNG grid",
        description=__doc__.split("\n\n")[0],
    )
    p.add_argument(
        "--model", required=True, help="registry name with official weights (DiT-XL/2) or a checkpoint"
    )
    p.add_argument(
        "--image-size", type=int, default=None, help="image side in pixels (official weights: 256, 512)"
    )
    p.add_argument("--num-samples", type=int, default=16, help="how many images (default 16)")
    p.add_argument("--batch-size", type=int, default=32, help="images per forward pass (default 32)")
    p.add_argument(
        "--sampler", choices=("ddpm", "ddim"), default="ddpm", help="reverse process (default ddpm)"
    )
    p.add_argument(
        "--steps", type=int, default=None, help="sampling steps (default 250 for ddpm, 50 for ddim)"
    )
    p.add_argument("--eta", type=float, default=0.0, help="DDIM eta (default 0: deterministic)")
    p.add_argument(
        "--cfg-scale", type=float, default=1.0, help="classifier-free guidance scale; 1 = off (default)"
    )
    p.add_argument(
        "--cfg-channels",
        choices=("3", "all"),
        default=None,
        help="eps channels to guide: 3 as the original DiT (default for latent models) or all",
    )
    p.add_argument(
        "--class-labels",
        default=None,
        metavar="L1,L2,...",
        help="labels, repeated to --num-samples (default: uniform at random from the seed)",
    )
    p.add_argument(
        "--balanced",
        action="store_true",
        help="every class equally often (shuffled) instead of uniform random labels",
    )
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    p.add_argument(
        "--backend",
        choices=("auto", "reference", "cpu", "triton"),
        default="auto",
        help="kernels of quantized layers: auto (default: the fastest on the device), reference (plain "
        "PyTorch), cpu (ditq's C++ kernels), triton (CUDA)",
    )
    p.add_argument(
        "--vae", default=None, help="VAE name or folder (default: sd-vae-ft-ema for latent models)"
    )
    p.add_argument("--no-labels", action="store_true", help="grid only: no label captions under the images")
    p.add_argument("--out", default="samples.npz", help="output file, .npz or .png (default samples.npz)")
    p.add_argument(
        "--shard-size",
        type=int,
        default=None,
        help=".npz only: samples per shard, the unit of resuming (default: about 1000, a multiple of "
        "--batch-size)",
    )
    p.add_argument(
        "--shard-dir",
        default=None,
        help=".npz only: folder of the shards (default: OUT with the suffix .shards, beside it)",
    )
    p.add_argument(
        "--keep-shards", action="store_true", help=".npz only: keep the shard folder after merging"
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars or messages")
    p.set_defaults(func=run)
    return p


def parse_class_labels(text: str | None) -> list[int] | None:
    """``"1,2,3"`` -> ``[1, 2, 3]``; ``None`` stays ``None``."""
    if text is None:
        return None
    try:
        labels = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise InvalidArgumentError(
            f"--class-labels must be integers separated by commas, got '{text}'"
        ) from None
    if not labels:
        raise InvalidArgumentError("--class-labels is empty; give e.g. --class-labels 207,360,387")
    return labels


def run(args: argparse.Namespace) -> int:
    """Check every option, load the model, sample, write ``--out``."""
    from ditq.images import output_format

    # Everything that can be checked without the model is checked first, so a
    # typo fails at once rather than after a download.
    fmt = output_format(args.out)
    class_labels = parse_class_labels(args.class_labels)
    if args.balanced and class_labels is not None:
        raise InvalidArgumentError("--balanced and --class-labels exclude each other; drop one of them")
    if fmt != "npz":
        from ditq.distributed import env_world_size

        if env_world_size() > 1:
            raise InvalidArgumentError(
                f"a grid ('{args.out}') is drawn by one process; run it without torchrun "
                "(torchrun shares out .npz sampling)"
            )
        for flag, value in (("--shard-size", args.shard_size), ("--shard-dir", args.shard_dir)):
            if value is not None:
                raise InvalidArgumentError(f"{flag} applies to .npz output only, not to '{args.out}'")
        if args.keep_shards:
            raise InvalidArgumentError(f"--keep-shards applies to .npz output only, not to '{args.out}'")
    elif args.shard_size is not None and args.shard_size < 1:
        raise InvalidArgumentError(f"--shard-size must be a positive integer, got {args.shard_size}")
    return (_run_npz if fmt == "npz" else _run_grid)(args, class_labels)


def _check(args: argparse.Namespace) -> tuple[int, torch.device]:
    from ditq.pipelines.sample import check_kernel_backend, check_sample_options, resolve_device

    steps = check_sample_options(
        num_samples=args.num_samples,
        batch_size=args.batch_size,
        sampler=args.sampler,
        steps=args.steps,
        cfg_scale=args.cfg_scale,
        eta=args.eta,
    )
    device = resolve_device(args.device)
    check_kernel_backend(getattr(args, "backend", "auto"), device)  # before loading (maybe downloading)
    return steps, device


# --cfg-channels as sample() takes it.
CFG_CHANNELS = {None: "auto", "3": 3, "all": None}


def _run_npz(args: argparse.Namespace, class_labels: list[int] | None) -> int:
    from ditq.distributed import env_world_size
    from ditq.formats import load as load_model
    from ditq.pipelines.sample import sample_to_npz

    steps, device = _check(args)
    say = (lambda _: None) if args.quiet else print
    # Under torchrun every process would load onto the same default device
    # (cuda:0) first; load on the CPU and let the pipeline move the model to
    # the process's own device.
    model = load_model(
        args.model, device="cpu" if env_world_size() > 1 else device, image_size=args.image_size
    )
    # Recorded in the shard manifest: a resume with another model is an error.
    model_id = str(Path(args.model).resolve()) if Path(args.model).is_file() else args.model
    result = sample_to_npz(
        model,
        args.out,
        num_samples=args.num_samples,
        batch_size=args.batch_size,
        shard_size=args.shard_size,
        balanced=args.balanced,
        class_labels=class_labels,
        sampler=args.sampler,
        steps=steps,
        cfg_scale=args.cfg_scale,
        cfg_channels=CFG_CHANNELS[args.cfg_channels],
        seed=args.seed,
        eta=args.eta,
        device=device,
        vae=args.vae,
        shard_dir=args.shard_dir,
        keep_shards=args.keep_shards,
        meta={"model": model_id},
        kernel_backend=getattr(args, "backend", "auto"),
        progress=not args.quiet and sys.stderr.isatty(),
        log=say,
        command=command_line(args, add_parser),
    )
    if result.is_main:  # under torchrun, the other processes stay quiet
        h, w, _ = result.image_shape
        say(f"wrote {result.num_samples} images ({h}x{w}) to {result.path} in {result.seconds:.1f} s")
    return 0


def _run_grid(args: argparse.Namespace, class_labels: list[int] | None) -> int:
    from ditq.eval.sampling import make_eval_labels
    from ditq.formats import load as load_model
    from ditq.images import save_grid
    from ditq.kernels import use_backend
    from ditq.models.vae import vae_for_model
    from ditq.pipelines.sample import kernel_summary, make_labels, sample

    steps, device = _check(args)
    say = (lambda _: None) if args.quiet else print
    model = load_model(args.model, device=device, image_size=args.image_size)
    if class_labels is not None:  # a label out of range fails before the VAE is built
        make_labels(class_labels, args.num_samples, model.config.num_classes)
    elif args.balanced:
        class_labels = make_eval_labels(
            args.num_samples, model.config.num_classes, args.seed, balanced=True
        ).tolist()
    vae = vae_for_model(model.config, args.vae, device=device)
    say(
        f"sampling {args.num_samples} images from {args.model} with {args.sampler.upper()}-{steps}, "
        f"cfg scale {args.cfg_scale}, seed {args.seed}, on {device}"
    )
    backend = getattr(args, "backend", "auto")
    with use_backend(backend):
        if kernels := kernel_summary(model, device):
            say(kernels)
    started = time.perf_counter()
    images, labels = sample(
        model,
        num_samples=args.num_samples,
        batch_size=args.batch_size,
        sampler=args.sampler,
        steps=steps,
        cfg_scale=args.cfg_scale,
        cfg_channels=CFG_CHANNELS[args.cfg_channels],
        class_labels=class_labels,
        seed=args.seed,
        eta=args.eta,
        vae=vae,
        kernel_backend=backend,
        progress=not args.quiet and sys.stderr.isatty(),
    )
    path = save_grid(args.out, images, None if args.no_labels else labels)
    n, h, w, _ = images.shape
    say(f"wrote {n} images ({h}x{w}) to {path} in {time.perf_counter() - started:.1f} s")
    return 0
