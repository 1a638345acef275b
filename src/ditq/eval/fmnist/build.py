"""Making an FID-FMNIST evaluator file (``ditq train-evaluator``): train, measure, write.

:func:`build_fmnist_evaluator` trains the classifier, rounds it to the float16
it is stored in, takes the test set's feature statistics as the reference,
measures the floor (real training images against that reference) at
:data:`FLOOR_COUNTS`, and writes the file with
:func:`~ditq.eval.fmnist.evaluator.save_fmnist_evaluator`.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ditq.errors import InvalidArgumentError
from ditq.eval import metrics as M
from ditq.eval.fmnist.classifier import FMNISTClassifier, FMNISTClassifierConfig
from ditq.eval.fmnist.evaluator import FEATURE_KEY, FMNISTEvaluator, save_fmnist_evaluator
from ditq.eval.fmnist.images import batches, check_images, check_labels, to_model_input
from ditq.eval.fmnist.train import FMNISTTrainConfig, train_fmnist_classifier

FLOOR_COUNTS = (100, 200, 500, 1000, 2000, 5000, 10000)
"""Sample counts at which the floor (real training images vs the test statistics) is tabulated."""


def classifier_accuracy(
    evaluator_or_model: FMNISTEvaluator | FMNISTClassifier, images, labels, *, batch_size: int = 500
) -> tuple[float, list[float]]:
    """Accuracy on ``(images, labels)`` overall and per class (NaN for a class with no image)."""
    model = (
        evaluator_or_model.classifier
        if isinstance(evaluator_or_model, FMNISTEvaluator)
        else evaluator_or_model
    )
    images = check_images(images)
    labels = check_labels(labels, len(images), model.config.num_classes)
    device = next(model.parameters()).device
    with torch.inference_mode():
        preds = np.concatenate(
            [model(to_model_input(b, device)).argmax(1).cpu().numpy() for b in batches(images, batch_size)]
        )
    per_class = [
        float((preds[labels == c] == c).mean()) if (labels == c).any() else float("nan")
        for c in range(model.config.num_classes)
    ]
    return float((preds == labels).mean()), per_class


@dataclass
class FMNISTBuildResult:
    """What :func:`build_fmnist_evaluator` made: the file and its headline numbers."""

    path: Path
    test_accuracy: float
    floor_fid_fmnist: float
    floor_num_images: int
    train_seconds: float
    seconds: float
    metadata: dict


def _round_to_float16_(model: nn.Module) -> None:
    # The file stores float16; compute the statistics with exactly the weights a load gives back.
    with torch.no_grad():
        for t in [*model.parameters(), *model.buffers()]:
            if t.is_floating_point():
                t.copy_(t.half().float())


def build_fmnist_evaluator(
    train_images,
    train_labels,
    test_images,
    test_labels,
    out: str | os.PathLike,
    *,
    config: FMNISTTrainConfig | None = None,
    model_config: FMNISTClassifierConfig | None = None,
    floor_images: int = 10000,
    device: torch.device | str = "cpu",
    command: str | None = None,
    data_description: str = "Fashion-MNIST",
    log: Callable[[str], None] | None = None,
) -> FMNISTBuildResult:
    """Train the classifier, measure it, and write the FID-FMNIST evaluator file ``out`` (atomically).

    1. :func:`train_fmnist_classifier` on the training set;
    2. weights rounded to float16 (as stored);
    3. test accuracy, and the test set's feature statistics (the reference);
    4. the floor: FID-FMNIST of ``floor_images`` training images (a seeded
       random subset) against the reference, and at the smaller counts of
       :data:`FLOOR_COUNTS` (mean over disjoint subsets of the same images).

    Images are uint8 as :func:`check_images` takes (the idx files' 28x28 is
    padded to 32x32). ``command`` is recorded in the metadata.
    """

    started = time.perf_counter()
    config = config or FMNISTTrainConfig()
    log = log or (lambda _: None)
    train_images = check_images(train_images, "training images")
    test_images = check_images(test_images, "test images")
    train_labels = check_labels(train_labels, len(train_images))
    test_labels = check_labels(test_labels, len(test_images))
    if len(test_images) < 2:
        raise InvalidArgumentError(
            f"the reference statistics need at least 2 test images, got {len(test_images)}"
        )
    if floor_images < 2:
        raise InvalidArgumentError(f"floor_images must be at least 2, got {floor_images}")
    device = torch.device(device)

    log(f"training the FID-FMNIST classifier on {len(train_images)} images for {config.epochs} epochs ...")
    model = train_fmnist_classifier(
        train_images, train_labels, config, model_config=model_config, device=device, log=log
    )
    train_seconds = time.perf_counter() - started
    _round_to_float16_(model)

    test_acc, per_class = classifier_accuracy(model, test_images, test_labels)
    log(f"test accuracy {test_acc:.4f} ({len(test_images)} images)")
    placeholder = np.zeros(model.config.feature_dim)
    evaluator = FMNISTEvaluator(model, placeholder, np.eye(len(placeholder)))
    mu, sigma = M.feature_statistics(evaluator.extract(test_images)[FEATURE_KEY])
    evaluator.mu, evaluator.sigma = mu, sigma

    n_floor = min(floor_images, len(train_images))
    pick = np.random.default_rng(config.seed).permutation(len(train_images))[:n_floor]
    floor_feats = evaluator.extract(train_images[pick])[FEATURE_KEY]
    floor = M.frechet_distance(*M.feature_statistics(floor_feats), mu, sigma)
    by_n: dict[str, float] = {}
    for n in [c for c in FLOOR_COUNTS if c < n_floor] + [n_floor]:
        parts = [floor_feats[i : i + n] for i in range(0, n_floor - n + 1, n)][:5]  # up to 5 disjoint draws
        by_n[str(n)] = float(
            np.mean([M.frechet_distance(*M.feature_statistics(p), mu, sigma) for p in parts])
        )
    log(f"floor: FID-FMNIST of {n_floor} training images vs the test statistics {floor:.4f}")

    metadata = {
        "name": "fmnist-classifier",
        "input": "uint8 32x32 grayscale (28x28 zero-padded); x = u / 127.5 - 1",
        "data": data_description,
        "num_train_images": len(train_images),
        "num_test_images": len(test_images),
        "test_accuracy": test_acc,
        "test_accuracy_per_class": per_class,
        "reference": f"statistics (mu, sigma, float64) of the {len(test_images)} test images' features",
        "floor_fid_fmnist": floor,
        "floor_num_images": n_floor,
        "floor_fid_fmnist_by_n": by_n,
        "floor_note": "FID-FMNIST of real training images (seeded random subset) vs the test statistics; "
        "by_n: mean over up to 5 disjoint subsets of that size",
        "train_config": asdict(config),
        "train_seconds": round(train_seconds, 1),
        "device": str(device) if device.type != "cuda" else torch.cuda.get_device_name(device),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d"),
        "weights": "float16 (computed in float32)",
        "command": command,
    }
    out = save_fmnist_evaluator(out, model, mu, sigma, metadata)
    seconds = time.perf_counter() - started
    log(f"wrote {out} in {seconds:.0f} s")
    return FMNISTBuildResult(out, test_acc, floor, n_floor, train_seconds, seconds, metadata)
