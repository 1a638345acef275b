"""``ditq sample``: class-conditional samples from a DiT, as an ADM ``.npz`` or a PNG grid.

    ditq sample --model DiT-XL/2 --num-samples 16 --cfg-scale 4 --out grid.png
    ditq sample --model ckpt.safetensors --num-samples 50000 --out samples.npz

The output format follows the suffix of ``--out`` (``.npz``, ``.png``, ``.jpg``).
"""

from __future__ import annotations

import argparse
import sys
import time

from ditq.errors import InvalidArgumentError


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
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    p.add_argument(
        "--vae", default=None, help="VAE name or folder (default: sd-vae-ft-ema for latent models)"
    )
    p.add_argument("--no-labels", action="store_true", help="grid only: no label captions under the images")
    p.add_argument("--out", default="samples.npz", help="output file, .npz or .png (default samples.npz)")
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
    from ditq import models
    from ditq.images import output_format, save_grid, save_npz
    from ditq.models.vae import vae_for_model
    from ditq.pipelines.sample import check_sample_options, make_labels, resolve_device, sample

    # Everything that can be checked without the model is checked first, so a
    # typo fails at once rather than after a download.
    fmt = output_format(args.out)
    class_labels = parse_class_labels(args.class_labels)
    steps = check_sample_options(
        num_samples=args.num_samples,
        batch_size=args.batch_size,
        sampler=args.sampler,
        steps=args.steps,
        cfg_scale=args.cfg_scale,
        eta=args.eta,
    )
    device = resolve_device(args.device)
    say = (lambda _: None) if args.quiet else print
    progress = not args.quiet and sys.stderr.isatty()

    model = models.load(args.model, device=device, image_size=args.image_size)
    if class_labels is not None:  # a label out of range fails before the VAE is built
        make_labels(class_labels, args.num_samples, model.config.num_classes)
    vae = vae_for_model(model.config, args.vae, device=device)
    cfg_channels = {None: "auto", "3": 3, "all": None}[args.cfg_channels]
    say(
        f"sampling {args.num_samples} images from {args.model} with {args.sampler.upper()}-{steps}, "
        f"cfg scale {args.cfg_scale}, seed {args.seed}, on {device}"
    )
    started = time.perf_counter()
    images, labels = sample(
        model,
        num_samples=args.num_samples,
        batch_size=args.batch_size,
        sampler=args.sampler,
        steps=steps,
        cfg_scale=args.cfg_scale,
        cfg_channels=cfg_channels,
        class_labels=class_labels,
        seed=args.seed,
        eta=args.eta,
        vae=vae,
        progress=progress,
    )
    if fmt == "npz":
        path = save_npz(args.out, images, labels)
    else:
        path = save_grid(args.out, images, None if args.no_labels else labels)
    n, h, w, _ = images.shape
    say(f"wrote {n} images ({h}x{w}) to {path} in {time.perf_counter() - started:.1f} s")
    return 0
