"""``ditq extract-latents``: encode an image folder through a VAE once, for training on latents.

    ditq extract-latents --data imagenet/train --vae ema --out latents/in256 --image-size 256 --flip
    ditq train --config run.yaml --set data.kind=latents --set data.path=latents/in256

Writes DIR/shard_XXXXX.safetensors (latents + labels, ``--shard-size`` items
each) and DIR/manifest.json; run the same command again to finish an
interrupted extraction (finished shards are kept). SIGTERM, SIGINT or SIGUSR1
stops it after the current shard (exit 75, printing the command that resumes
it); a second process on DIR is refused (exit 2), a full disk or read-only
folder is exit 74. See ditq.data.latents.
"""

from __future__ import annotations

import argparse
import sys

from ditq.cli import command_line


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``extract-latents`` on ``subparsers``; sets ``func=run``."""
    p = subparsers.add_parser(
        "extract-latents",
        help="encode an image folder through a VAE into latent shards, to train on latents",
        description=__doc__.split("\n\n")[0],
    )
    p.add_argument("--data", required=True, help="image folder, one subfolder per class")
    p.add_argument(
        "--vae",
        required=True,
        help="ema | mse (the SD VAEs DiT uses), a Hugging Face id, a local folder, or 'pixel' (no VAE)",
    )
    p.add_argument("--out", required=True, help="output folder for the shards and manifest.json")
    p.add_argument("--image-size", type=int, default=256, help="center-crop side in pixels (default 256)")
    p.add_argument("--flip", action="store_true", help="also store the latents of the mirrored images")
    p.add_argument("--shard-size", type=int, default=1024, help="items per shard file (default 1024)")
    p.add_argument("--batch-size", type=int, default=32, help="images per VAE call (default 32)")
    p.add_argument("--device", default="auto", help="auto (default: CUDA when available), cpu, cuda, cuda:N")
    p.add_argument(
        "--dtype", choices=("float16", "float32", "bfloat16"), default="float16", help="stored dtype"
    )
    p.add_argument(
        "--latent",
        choices=("sample", "mean"),
        default="sample",
        help="store a posterior sample (as DiT trains on; default) or the posterior mean, times the scale",
    )
    p.add_argument("--workers", type=int, default=0, help="DataLoader processes decoding images")
    p.add_argument("--seed", type=int, default=0, help="seed of the posterior samples")
    p.add_argument("--quiet", action="store_true", help="no progress bar or messages")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    """Build the dataset and the VAE, then extract."""
    from ditq.common import resolve_device
    from ditq.data import ImageFolderDataset, extract_latents
    from ditq.models.vae import PIXEL_SPACE_NAMES, PixelSpace, StableDiffusionVAE

    say = (lambda _: None) if args.quiet else print
    device = resolve_device(args.device)
    dataset = ImageFolderDataset(args.data, args.image_size, random_flip=False)
    if args.vae in PIXEL_SPACE_NAMES:
        vae, name = PixelSpace(3), "pixel"
    else:
        vae = StableDiffusionVAE(args.vae, device=device)
        name = vae.name_or_path
    say(f"encoding {len(dataset)} images of {len(dataset.classes)} classes from {args.data} with {name}")
    result = extract_latents(
        dataset,
        vae,
        args.out,
        vae_name=name,
        image_size=args.image_size,
        flip=args.flip,
        shard_size=args.shard_size,
        batch_size=args.batch_size,
        dtype=args.dtype,
        latent=args.latent,
        seed=args.seed,
        num_workers=args.workers,
        source=str(args.data),
        log=say,
        progress=not args.quiet and sys.stderr.isatty(),
        command=command_line(args, add_parser),
    )
    shape = "x".join(map(str, result.manifest["latent_shape"]))
    say(
        f"wrote {result.written} shard(s), kept {result.skipped}, in {result.out}: {result.num_items} "
        f"latents of {shape}{' (and flipped)' if args.flip else ''}"
    )
    return 0
