"""``ditq eval SAMPLES --ref REF``: FID, sFID, IS, Precision and Recall, computed as the ADM evaluator does.

    ditq eval samples.npz --ref VIRTUAL_imagenet256_labeled.npz --json eval.json
    ditq eval samples.npz --ref ref.npz --metrics fid,is --device cuda

SAMPLES is an ADM sample batch (``arr_0`` uint8 NHWC images, as ``ditq sample``
writes); REF an ADM reference batch (``arr_0`` images and ``mu``, ``sigma``,
``mu_s``, ``sigma_s`` statistics, which are read, not recomputed). The FID
Inception weights (pytorch-fid's, 91 MB) are downloaded into the cache the
first time, or given with ``--inception-weights``.
"""

from __future__ import annotations

import argparse
import json
import sys

from ditq.errors import InvalidArgumentError

# How each metric is labelled in the table, and its number format.
_LABELS = {
    "fid": "FID",
    "sfid": "sFID",
    "is": "Inception Score",
    "precision": "Precision",
    "recall": "Recall",
}


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``eval`` on ``subparsers``; sets ``func=run``."""
    p = subparsers.add_parser(
        "eval",
        help="FID, sFID, IS, Precision, Recall of an .npz sample batch against a reference batch (ADM)",
        description=__doc__.split("\n\n")[0],
    )
    p.add_argument("samples", metavar="SAMPLES", help="ADM sample batch (.npz, arr_0 uint8 NHWC images)")
    p.add_argument(
        "--ref", required=True, metavar="REF", help="ADM reference batch (.npz with mu/sigma/mu_s/sigma_s)"
    )
    p.add_argument(
        "--metrics",
        default="fid,sfid,is,precision,recall",
        metavar="M1,M2,...",
        help="among fid,sfid,is,precision,recall (default: all)",
    )
    p.add_argument("--batch-size", type=int, default=64, help="images per Inception forward (default 64)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    p.add_argument(
        "--inception-weights",
        default=None,
        metavar="PATH",
        help="pytorch-fid's pt_inception-2015-12-05-6726825d.pth (default: the cache, downloaded once)",
    )
    p.add_argument(
        "--compute-ref-stats",
        action="store_true",
        help="compute missing reference statistics from its images (default: missing ones are an error)",
    )
    p.add_argument("--json", default=None, metavar="OUT", help="also write the results as JSON to OUT")
    p.add_argument(
        "--seed", type=int, default=0, help="accepted like every ditq command; evaluation draws no randomness"
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars; print nothing (use --json)")
    p.set_defaults(func=run)
    return p


def format_results(result: dict) -> str:
    """The human-readable table of an :func:`ditq.eval.evaluate` result."""
    rows = [(_LABELS[name], f"{value:.4f}") for name, value in result["metrics"].items()]
    width = max(len(label) for label, _ in rows) + 2
    samples, ref = result["samples"], result["reference"]
    h, w, _ = samples["image_shape"]
    read = ", ".join(f"{k}: {v}" for k, v in ref["statistics"].items()) or "not used"
    lines = [
        f"samples    {samples['path']} ({samples['num_images']} images, {h}x{w})",
        f"reference  {ref['path']} (statistics {read})",
        f"device     {result['settings']['device']}, {result['seconds']['total']:.1f} s",
        "",
    ]
    lines += [f"{label:<{width}}{value}" for label, value in rows]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    """Evaluate ``args.samples`` against ``args.ref``; print the table, write ``--json``."""
    from ditq.checkpoint import atomic_write
    from ditq.eval.evaluator import evaluate, parse_metrics

    metrics = parse_metrics(args.metrics)  # a typo fails before any file is read
    if args.batch_size < 1:
        raise InvalidArgumentError(f"--batch-size must be positive, got {args.batch_size}")
    result = evaluate(
        args.samples,
        args.ref,
        metrics=metrics,
        batch_size=args.batch_size,
        device=args.device,
        inception_weights=args.inception_weights,
        compute_ref_stats=args.compute_ref_stats,
        progress=not args.quiet and sys.stderr.isatty(),
    )
    if args.json:
        try:
            with atomic_write(args.json) as tmp, open(tmp, "w") as f:
                json.dump(result, f, indent=2)
                f.write("\n")
        except OSError as e:
            raise InvalidArgumentError(f"cannot write {args.json}: {e.strerror or e}") from None
    if not args.quiet:
        print(format_results(result))
        if args.json:
            print(f"wrote {args.json}")
    return 0
