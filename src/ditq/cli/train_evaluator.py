"""``ditq train-evaluator``: train the FID-FMNIST classifier on Fashion-MNIST and write its file.

    ditq train-evaluator --data /usr/share/datasets/fashion-mnist --out fmnist-classifier.safetensors

Trains the small CNN of :mod:`ditq.eval.fmnist` on the 60,000 training
images, then writes one safetensors file: the weights (float16), the
statistics of the 10,000 test images' features (the FID-FMNIST reference),
and in its metadata the test accuracy, the floor (FID-FMNIST of 10,000
training images) and this command. The file shipped in ditq
(``ditq/assets/fmnist-classifier.safetensors``) was made this way; copy a new
one there to replace it. Prints the test accuracy and the floor.
"""

from __future__ import annotations

import argparse
import shlex

from ditq.errors import InvalidArgumentError

DEFAULT_OUT = "out/fmnist-classifier.safetensors"
DEFAULT_DATA = "/usr/share/datasets/fashion-mnist"
DEFAULT_EPOCHS, DEFAULT_BATCH_SIZE, DEFAULT_LR, DEFAULT_SEED = 4, 128, 3e-3, 0


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``train-evaluator`` on ``subparsers``; sets ``func=run``."""
    # Literal defaults keep `ditq --help` light; a test checks them against
    # ditq.eval.fmnist.FMNISTTrainConfig and ditq.data.idx.FASHION_MNIST_DIR.
    p = subparsers.add_parser(
        "train-evaluator",
        help="train the FID-FMNIST classifier on Fashion-MNIST (the small-domain evaluator)",
        description=__doc__.split("\n\n")[0],
    )
    p.add_argument(
        "--data",
        default=DEFAULT_DATA,
        metavar="DIR",
        help=f"folder of the Fashion-MNIST idx files (default {DEFAULT_DATA})",
    )
    p.add_argument("--out", default=DEFAULT_OUT, help=f"the classifier file to write (default {DEFAULT_OUT})")
    p.add_argument(
        "--epochs", type=int, default=DEFAULT_EPOCHS, help=f"training epochs (default {DEFAULT_EPOCHS})"
    )
    p.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE, help=f"default {DEFAULT_BATCH_SIZE}")
    p.add_argument("--lr", type=float, default=DEFAULT_LR, help=f"peak learning rate (default {DEFAULT_LR})")
    p.add_argument("--seed", type=int, default=DEFAULT_SEED, help=f"random seed (default {DEFAULT_SEED})")
    p.add_argument(
        "--floor-images",
        type=int,
        default=10000,
        help="training images whose FID-FMNIST against the test set is the floor (default 10000)",
    )
    p.add_argument("--device", default="cpu", help="cpu, cuda, auto, ... (default cpu)")
    p.add_argument("--quiet", action="store_true", help="print nothing")
    p.set_defaults(func=run)
    return p


def _as_uint8(x):
    # load_idx_dataset gives u / 127.5 - 1 (padded to 32x32 with -1); undo it exactly.
    import torch

    return torch.round((x + 1.0) * 127.5).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


def run(args: argparse.Namespace) -> int:
    """Read the idx files, then :func:`ditq.eval.fmnist.build_fmnist_evaluator`; print the numbers."""
    from ditq.common import resolve_device
    from ditq.data import load_idx_dataset
    from ditq.eval.fmnist import FMNISTTrainConfig, build_fmnist_evaluator

    config = FMNISTTrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed)
    if args.floor_images < 2:
        raise InvalidArgumentError(f"--floor-images must be at least 2, got {args.floor_images}")
    device = resolve_device(args.device)
    log = (lambda _: None) if args.quiet else print
    x_train, y_train = load_idx_dataset(args.data, "train")
    x_test, y_test = load_idx_dataset(args.data, "test")
    log(f"data: {len(x_train)} training and {len(x_test)} test images from {args.data}")
    result = build_fmnist_evaluator(
        _as_uint8(x_train),
        y_train.numpy(),
        _as_uint8(x_test),
        y_test.numpy(),
        args.out,
        config=config,
        floor_images=args.floor_images,
        device=device,
        command=_command(args),
        data_description=f"Fashion-MNIST idx files ({args.data}), 28x28 padded to 32x32",
        log=log,
    )
    log(f"test accuracy   {result.test_accuracy:.4f}")
    log(f"floor FID-FMNIST {result.floor_fid_fmnist:.4f} ({result.floor_num_images} training images)")
    log(f"training took {result.train_seconds:.0f} s, everything {result.seconds:.0f} s")
    return 0


def _command(args: argparse.Namespace) -> str:
    # Rebuilt from the options rather than sys.argv, which is not ours when called as main([...]).
    parts = [
        "ditq", "train-evaluator", "--data", args.data, "--out", args.out, "--epochs", str(args.epochs),
        "--batch-size", str(args.batch_size), "--lr", str(args.lr), "--seed", str(args.seed),
        "--floor-images", str(args.floor_images), "--device", args.device,
    ]  # fmt: skip
    return shlex.join(parts)
