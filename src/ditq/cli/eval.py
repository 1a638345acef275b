"""``ditq eval SAMPLES --ref REF``: FID, sFID, IS, Precision and Recall, computed as the ADM evaluator does.

    ditq eval samples.npz --ref VIRTUAL_imagenet256_labeled.npz --json eval.json
    ditq eval samples.npz --ref ref.npz --metrics fid,is --device cuda
    ditq eval samples.npz --evaluator fmnist --json eval.json

SAMPLES is an ADM sample batch (``arr_0`` uint8 NHWC images, as ``ditq sample``
writes); REF an ADM reference batch (``arr_0`` images and ``mu``, ``sigma``,
``mu_s``, ``sigma_s`` statistics, which are read, not recomputed). The FID
Inception weights (pytorch-fid's, 91 MB) are downloaded into the cache the
first time, or given with ``--inception-weights``.

``--evaluator fmnist`` is for 28-32 px grayscale models (Fashion-MNIST), where
the Inception means nothing: FID-FMNIST (the features of a small classifier
shipped with ditq, against the Fashion-MNIST test set, whose statistics ship
with it, so no ``--ref``) and, when the batch has labels (``arr_1``), the class
accuracy of the samples. See :mod:`ditq.eval.fmnist`.
"""

from __future__ import annotations

import argparse
import json
import sys

from ditq.errors import InvalidArgumentError

EVALUATORS = ("inception", "fmnist")

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
        "--ref",
        default=None,
        metavar="REF",
        help="ADM reference batch (.npz with mu/sigma/mu_s/sigma_s); required by the inception evaluator",
    )
    p.add_argument(
        "--evaluator",
        choices=EVALUATORS,
        default="inception",
        help="inception: ADM's metrics (default); fmnist: FID-FMNIST and class accuracy for 32x32 grayscale "
        "Fashion-MNIST models (reference statistics built in, no --ref)",
    )
    p.add_argument(
        "--classifier",
        default=None,
        metavar="PATH",
        help="fmnist: the classifier file (default: the one shipped in ditq, see ditq train-evaluator)",
    )
    p.add_argument(
        "--metrics",
        default=None,
        metavar="M1,M2,...",
        help="inception: among fid,sfid,is,precision,recall (default: all)",
    )
    p.add_argument("--batch-size", type=int, default=64, help="images per network forward (default 64)")
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


def format_fmnist_results(result: dict) -> str:
    """The human-readable table of a ``--evaluator fmnist`` result."""
    samples, clf = result["samples"], result["classifier"]
    lines = [
        f"samples    {samples['path']} ({result['num_images']} images)",
        f"evaluator  FID-FMNIST classifier {clf['path']} (test accuracy {clf['test_accuracy']:.4f})",
        f"device     {result['settings']['device']}, {result['seconds']['total']:.1f} s",
        "",
        f"{'FID-FMNIST':<16}{result['fid_fmnist']:.4f}",
    ]
    if "class_acc" in result:
        lines.append(f"{'Class accuracy':<16}{result['class_acc']:.4f}")
    else:
        lines.append(f"{'Class accuracy':<16}- (the batch has no labels, arr_1)")
    floor = result.get("floor_fid_fmnist_at_n")
    if floor is not None:
        lines.append(
            f"floor: real Fashion-MNIST training images score {floor['value']:.4f} at {floor['num_images']} "
            f"images ({result['floor_fid_fmnist']:.4f} at {clf['floor_num_images']})"
        )
    return "\n".join(lines)


def _evaluate_fmnist(args: argparse.Namespace) -> dict:
    import time

    from ditq.common import resolve_device
    from ditq.eval.fmnist import load_fmnist_evaluator
    from ditq.eval.npz import read_samples

    given = [
        flag
        for flag, value in (
            ("--ref", args.ref),
            ("--metrics", args.metrics),
            ("--inception-weights", args.inception_weights),
            ("--compute-ref-stats", args.compute_ref_stats),
        )
        if value
    ]
    if given:
        raise InvalidArgumentError(
            f"{', '.join(given)}: not used by --evaluator fmnist (its reference statistics ship with "
            "the classifier); drop them"
        )
    started = time.perf_counter()
    device = resolve_device(args.device)
    images, labels = read_samples(args.samples)
    evaluator = load_fmnist_evaluator(args.classifier, device=device)
    if labels is not None and ((labels < 0) | (labels >= evaluator.classifier.config.num_classes)).any():
        raise InvalidArgumentError(
            f"{args.samples}: 'arr_1' holds labels outside 0..{evaluator.classifier.config.num_classes - 1}; "
            "these are not Fashion-MNIST classes"
        )
    result = evaluator.evaluate(
        images, labels, batch_size=args.batch_size, progress=not args.quiet and sys.stderr.isatty()
    )
    meta = evaluator.metadata
    return {
        "evaluator": "fmnist",
        **result,
        "samples": {"path": str(args.samples), "labels": labels is not None},
        "classifier": {
            "path": str(evaluator.path),
            "test_accuracy": meta.get("test_accuracy"),
            "floor_num_images": meta.get("floor_num_images"),
        },
        "settings": {"batch_size": args.batch_size, "device": str(device)},
        "seconds": {"total": round(time.perf_counter() - started, 3)},
    }


def run(args: argparse.Namespace) -> int:
    """Evaluate ``args.samples`` (against ``args.ref``, or by FID-FMNIST); print a table, write ``--json``."""
    from ditq.eval.evaluator import evaluate, parse_metrics

    if args.batch_size < 1:
        raise InvalidArgumentError(f"--batch-size must be positive, got {args.batch_size}")
    if args.evaluator == "fmnist":
        result = _evaluate_fmnist(args)
        _write_json(args.json, result)
        if not args.quiet:
            print(format_fmnist_results(result))
            if args.json:
                print(f"wrote {args.json}")
        return 0
    metrics = parse_metrics(args.metrics)  # a typo fails before any file is read
    if args.ref is None:
        raise InvalidArgumentError(
            "--ref REF is required by the inception evaluator (or use --evaluator fmnist for "
            "Fashion-MNIST-like 32x32 grayscale samples)"
        )
    if args.classifier is not None:
        raise InvalidArgumentError("--classifier applies to --evaluator fmnist only")
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
    _write_json(args.json, result)
    if not args.quiet:
        print(format_results(result))
        if args.json:
            print(f"wrote {args.json}")
    return 0


def _write_json(path: str | None, result: dict) -> None:
    from ditq.checkpoint import atomic_write

    if not path:
        return
    try:
        with atomic_write(path) as tmp, open(tmp, "w") as f:
            json.dump(result, f, indent=2)
            f.write("\n")
    except OSError as e:
        raise InvalidArgumentError(f"cannot write {path}: {e.strerror or e}") from None
