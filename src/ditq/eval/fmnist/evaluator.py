"""FID-FMNIST: the classifier with the test set's reference statistics, its file, and scoring images.

The Fréchet distance is taken between the classifier's penultimate features
(:class:`~ditq.eval.fmnist.classifier.FMNISTClassifier`) of the samples and
of the Fashion-MNIST **test set**, whose statistics ship with the
classifier; its predictions give the **class accuracy** of class-conditional
samples (:func:`evaluate_fmnist`, :meth:`FMNISTEvaluator.evaluate`).

The shipped file ``ditq/assets/fmnist-classifier.safetensors`` holds the
weights (float16), the test-set ``mu``/``sigma`` (float64) and, in its
metadata, the test accuracy, the **floor**: the FID-FMNIST of real training
images against the test statistics (at 10,000 images, and at smaller counts,
since FID grows as the sample shrinks), the training settings and the
command that made it: ``ditq train-evaluator``
(:func:`~ditq.eval.fmnist.build.build_fmnist_evaluator`). :func:`save_fmnist_evaluator`
and :func:`load_fmnist_evaluator` write and read that file.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ditq.errors import CheckpointError, InvalidArgumentError
from ditq.eval import metrics as M
from ditq.eval.features import extract_features
from ditq.eval.fmnist.classifier import FMNISTClassifier, FMNISTClassifierConfig
from ditq.eval.fmnist.images import batches, check_images, check_labels, to_model_input

ASSET_NAME = "fmnist-classifier.safetensors"
"""The shipped classifier's file name in ``ditq/assets``."""

FEATURE_KEY = "features"
"""The feature-extractor key whose statistics FID-FMNIST compares."""

_PREFIX_CLASSIFIER = "classifier."
_KEY_MU, _KEY_SIGMA = "reference.mu", "reference.sigma"


@dataclass
class FMNISTEvaluator:
    """The FID-FMNIST classifier with the test-set reference statistics; also a feature extractor.

    Called on a uint8 batch (as :func:`check_images` takes) it returns
    ``{"features": (B, D), "logits": (B, C), "probs": (B, C)}``, so it plugs
    into :func:`ditq.eval.features.extract_features`.
    """

    classifier: FMNISTClassifier
    mu: np.ndarray  # (D,) float64, mean of the test set's features
    sigma: np.ndarray  # (D, D) float64
    metadata: dict = field(default_factory=dict)
    path: Path | None = None

    @property
    def device(self) -> torch.device:
        return next(self.classifier.parameters()).device

    @property
    def floor_fid(self) -> float | None:
        """FID-FMNIST of 10,000 real training images against the test statistics (from the file)."""
        return self.metadata.get("floor_fid_fmnist")

    def floor_at(self, num_images: int) -> tuple[int, float] | None:
        """``(n, floor)`` from the tabulated floors at the count nearest ``num_images`` (log scale)."""
        table = {int(n): float(v) for n, v in (self.metadata.get("floor_fid_fmnist_by_n") or {}).items()}
        if not table or num_images < 1:
            return None
        n = min(table, key=lambda k: (abs(np.log(k / num_images)), k))
        return n, table[n]

    @torch.inference_mode()
    def __call__(self, batch) -> dict[str, torch.Tensor]:
        x = to_model_input(check_images(batch, "images"), self.device)
        feats = self.classifier.features(x)  # B, D
        logits = self.classifier.head(feats)  # B, C
        return {FEATURE_KEY: feats, "logits": logits, "probs": torch.softmax(logits, dim=1)}

    def extract(
        self, images, *, batch_size: int = 500, progress: bool | None = False
    ) -> dict[str, np.ndarray]:
        """``features`` (N, D) and ``logits`` (N, C) of all ``images``, float32, in order."""
        images = check_images(images)
        if batch_size < 1:
            raise InvalidArgumentError(f"batch size must be positive, got {batch_size}")
        return extract_features(
            batches(images, batch_size),
            self,
            (FEATURE_KEY, "logits"),
            total=len(images),
            progress=progress,
            desc="FID-FMNIST features",
        )

    def evaluate(
        self, images, labels=None, *, batch_size: int = 500, progress: bool | None = False
    ) -> dict[str, Any]:
        """FID-FMNIST of ``images`` against the test set, and class accuracy when ``labels`` are given.

        Returns ``{"fid_fmnist", "num_images", "floor_fid_fmnist",
        "floor_num_images", "floor_fid_fmnist_at_n"}`` (the floor at 10,000 images, and at the
        tabulated count nearest ``num_images``: FID falls as the count grows,
        so compare with the floor at the same count) plus, with labels,
        ``"class_acc"`` (share of images the classifier assigns to their
        label) and ``"class_acc_per_class"`` (None for absent classes).
        FID needs at least 2 images, and is biased upwards at small counts
        (strongly below a few hundred: the covariance of the 128-d features
        is then poorly estimated).
        """
        images = check_images(images)
        if labels is not None:
            labels = check_labels(labels, len(images), self.classifier.config.num_classes)
        if len(images) < 2:
            raise InvalidArgumentError(f"FID-FMNIST needs at least 2 images, got {len(images)}")
        feats = self.extract(images, batch_size=batch_size, progress=progress)
        mu, sigma = M.feature_statistics(feats[FEATURE_KEY])
        at_n = self.floor_at(len(images))
        result: dict[str, Any] = {
            "fid_fmnist": M.frechet_distance(mu, sigma, self.mu, self.sigma),
            "num_images": len(images),
            "floor_fid_fmnist": self.floor_fid,
            "floor_num_images": self.metadata.get("floor_num_images"),
            "floor_fid_fmnist_at_n": None if at_n is None else {"num_images": at_n[0], "value": at_n[1]},
        }
        if labels is not None:
            preds = feats["logits"].argmax(axis=1)
            result["class_acc"] = float((preds == labels).mean())
            result["class_acc_per_class"] = [
                float((preds[labels == c] == c).mean()) if (labels == c).any() else None
                for c in range(self.classifier.config.num_classes)
            ]
        return result


def default_evaluator_path() -> Path | None:
    """The shipped ``ditq/assets/fmnist-classifier.safetensors``, or None when this install lacks it."""
    from importlib import resources

    asset = resources.files("ditq").joinpath("assets", ASSET_NAME)
    return Path(str(asset)) if asset.is_file() else None


def load_fmnist_evaluator(
    path: str | os.PathLike | None = None, *, device: torch.device | str = "cpu"
) -> FMNISTEvaluator:
    """The FID-FMNIST classifier and reference statistics from ``path`` (default: the shipped file)."""
    from ditq import checkpoint as ckpt

    if path is None:
        path = default_evaluator_path()
        if path is None:
            raise CheckpointError(
                f"the FID-FMNIST classifier is not in this install (expected ditq/assets/{ASSET_NAME}); "
                "reinstall ditq, or make one with: ditq train-evaluator --out fmnist-classifier.safetensors"
            )
    path = Path(path)
    meta = ckpt.read_metadata(path)
    if meta.get("kind") != "fid-fmnist" or "model_config" not in meta:
        raise CheckpointError(
            f"{path} is a ditq checkpoint but not an FID-FMNIST classifier (no kind 'fid-fmnist')"
        )
    tensors = ckpt.load_tensors(path)
    if _KEY_MU not in tensors or _KEY_SIGMA not in tensors:
        raise CheckpointError(f"{path} has no reference statistics ('{_KEY_MU}', '{_KEY_SIGMA}')")
    try:
        config = FMNISTClassifierConfig.from_dict(meta["model_config"])
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: its model_config is malformed ({e})") from None
    model = FMNISTClassifier(config)
    state = {k[len(_PREFIX_CLASSIFIER) :]: v for k, v in tensors.items() if k.startswith(_PREFIX_CLASSIFIER)}
    reference = model.state_dict()
    if set(state) != set(reference) or any(state[k].shape != reference[k].shape for k in reference):
        raise CheckpointError(f"{path}: the classifier weights do not fit its model_config {config}")
    # Stored as float16; computed in float32 (the statistics were made from these same rounded weights).
    model.load_state_dict({k: v.to(reference[k].dtype) for k, v in state.items()}, strict=True)
    mu = tensors[_KEY_MU].double().numpy()
    sigma = tensors[_KEY_SIGMA].double().numpy()
    if mu.shape != (config.feature_dim,) or sigma.shape != (config.feature_dim,) * 2:
        raise CheckpointError(
            f"{path}: reference statistics {mu.shape}, {sigma.shape} do not fit the features"
        )
    return FMNISTEvaluator(model.to(device).eval(), mu, sigma, meta, path)


def evaluate_fmnist(
    images,
    labels=None,
    *,
    evaluator: FMNISTEvaluator | str | os.PathLike | None = None,
    batch_size: int = 500,
    device: torch.device | str = "cpu",
    progress: bool | None = False,
) -> dict[str, Any]:
    """FID-FMNIST (and class accuracy, with ``labels``) of uint8 images: see :meth:`FMNISTEvaluator.evaluate`.

    ``evaluator``: a loaded :class:`FMNISTEvaluator`, a classifier file, or
    None for the shipped one. Returns ``{"fid_fmnist": float, "num_images":
    int, "floor_fid_fmnist": float, "class_acc": float, ...}``.
    """
    images = check_images(images)  # cheap checks before loading anything
    if labels is not None:
        labels = check_labels(labels, len(images))
    if not isinstance(evaluator, FMNISTEvaluator):
        evaluator = load_fmnist_evaluator(evaluator, device=device)
    return evaluator.evaluate(images, labels, batch_size=batch_size, progress=progress)


def save_fmnist_evaluator(
    path: str | os.PathLike, classifier: FMNISTClassifier, mu, sigma, metadata: Mapping[str, Any]
) -> Path:
    """Write an FID-FMNIST evaluator file (atomically): weights as float16, ``mu``/``sigma`` as float64.

    ``metadata`` (JSON) gets ``kind``, ``model_config`` and ``feature_key``
    added; :func:`build_fmnist_evaluator` adds the test accuracy, the floor
    and how the classifier was trained. The statistics must come from the
    float16-rounded weights, which are what a load gives back.
    """
    from ditq import checkpoint as ckpt

    mu, sigma = np.asarray(mu, np.float64), np.asarray(sigma, np.float64)
    d = classifier.config.feature_dim
    if mu.shape != (d,) or sigma.shape != (d, d):
        raise InvalidArgumentError(f"statistics {mu.shape}, {sigma.shape} do not fit {d}-d features")
    tensors = {
        _PREFIX_CLASSIFIER + k: v.half() if v.is_floating_point() else v
        for k, v in classifier.state_dict().items()
    }
    tensors[_KEY_MU] = torch.from_numpy(mu)
    tensors[_KEY_SIGMA] = torch.from_numpy(sigma)
    meta = {
        **metadata,
        "kind": "fid-fmnist",
        "model_config": classifier.config.to_dict(),
        "feature_key": FEATURE_KEY,
    }
    ckpt.save_checkpoint(path, tensors, meta)
    return Path(path)
