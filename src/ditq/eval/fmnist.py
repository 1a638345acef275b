"""FID-FMNIST: FID and class accuracy for 28-32 px grayscale models, where Inception means nothing.

The Inception-v3 of FID sees 299x299 colour photographs; a Fashion-MNIST
sample upscaled tenfold tells it little. FID-FMNIST swaps in a small CNN
trained by ditq on Fashion-MNIST (:class:`FMNISTClassifier`, ~92% test
accuracy): the Fréchet distance is taken between its 128-d penultimate
features (global-average-pooled last conv, like Inception's ``pool_3``) of the
samples and of the Fashion-MNIST **test set**, whose statistics ship with the
classifier; its predictions give the **class accuracy** of class-conditional
samples::

    from ditq.eval.fmnist import evaluate_fmnist
    evaluate_fmnist(images, labels)   # {"fid_fmnist": ..., "class_acc": ..., "num_images": ...}

Images are uint8 (N, 32, 32, 1) (also (N, 32, 32), and 28x28, which is
zero-padded to 32x32 exactly as :func:`ditq.data.load_idx_dataset` pads;
RGB with three equal channels, as ``.npz`` sample batches store grayscale, is
taken too). Pixels go to ``u / 127.5 - 1``, the scaling of the training data.

The shipped file ``ditq/assets/fmnist-classifier.safetensors`` holds the
weights (float16), the test-set ``mu``/``sigma`` (float64) and, in its
metadata, the test accuracy, the **floor**: the FID-FMNIST of real training
images against the test statistics (at 10,000 images, and at smaller counts,
since FID grows as the sample shrinks), the training settings and the
command that made it: ``ditq train-evaluator`` (:func:`build_fmnist_evaluator`).

FID-FMNIST numbers compare only with FID-FMNIST numbers made with the same
classifier file; they are not Inception FIDs.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ditq.errors import CheckpointError, InvalidArgumentError
from ditq.eval import metrics as M
from ditq.eval.features import extract_features

ASSET_NAME = "fmnist-classifier.safetensors"
"""The shipped classifier's file name in ``ditq/assets``."""

IMAGE_SIZE = 32
NUM_CLASSES = 10
FEATURE_KEY = "features"
"""The feature-extractor key whose statistics FID-FMNIST compares."""

FLOOR_COUNTS = (100, 200, 500, 1000, 2000, 5000, 10000)
"""Sample counts at which the floor (real training images vs the test statistics) is tabulated."""

_PREFIX_CLASSIFIER = "classifier."
_KEY_MU, _KEY_SIGMA = "reference.mu", "reference.sigma"


#################################################################################
#                                 The classifier                                #
#################################################################################


@dataclass(frozen=True)
class FMNISTClassifierConfig:
    """Shape of :class:`FMNISTClassifier`: conv widths (the last one is the feature size), classes."""

    widths: tuple[int, ...] = (32, 64, 128, 128)
    num_classes: int = NUM_CLASSES
    dropout: float = 0.2

    @property
    def feature_dim(self) -> int:
        return self.widths[-1]

    def to_dict(self) -> dict:
        return {"widths": list(self.widths), "num_classes": self.num_classes, "dropout": self.dropout}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> FMNISTClassifierConfig:
        return cls(
            widths=tuple(int(w) for w in d["widths"]),
            num_classes=int(d["num_classes"]),
            dropout=float(d["dropout"]),
        )


class _ConvBN(nn.Sequential):
    """3x3 conv (no bias: BN follows), batch norm, ReLU."""

    def __init__(self, cin: int, cout: int):
        super().__init__(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())


class FMNISTClassifier(nn.Module):
    """A small CNN for 32x32 grayscale images: conv-BN-ReLU blocks, 2x2 max-pools, global average pool.

    With the default widths: 32x32 -> 16x16 -> 8x8 -> 4x4 feature maps, the
    last block's 128 channels averaged into the penultimate features, then
    dropout and a linear layer to the logits. 0.24M parameters, ~12M
    multiply-adds per image: it trains on two CPU cores in minutes.
    """

    def __init__(self, config: FMNISTClassifierConfig | None = None):
        super().__init__()
        self.config = config = config or FMNISTClassifierConfig()
        if not config.widths or config.num_classes < 2:
            raise InvalidArgumentError(f"bad classifier config {config}")
        layers: list[nn.Module] = []
        cin = 1
        for i, w in enumerate(config.widths):
            layers.append(_ConvBN(cin, w))
            if i < len(config.widths) - 1 and i < 3:  # pool to 4x4 at most: 32 -> 16 -> 8 -> 4
                layers.append(nn.MaxPool2d(2))
            cin = w
        self.body = nn.Sequential(*layers)
        self.dropout = nn.Dropout(config.dropout)
        self.head = nn.Linear(config.feature_dim, config.num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate features (N, D) of images (N, 1, 32, 32) in [-1, 1]."""
        return self.body(x).mean(dim=(2, 3))  # N, D (global average pool)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (N, num_classes) of images (N, 1, 32, 32) in [-1, 1]."""
        return self.head(self.dropout(self.features(x)))  # N, C


#################################################################################
#                                 Image checks                                  #
#################################################################################


def check_images(images, name: str = "images") -> np.ndarray:
    """uint8 grayscale images as (N, 32, 32, 1); 28x28 is zero-padded, equal-channel RGB made gray.

    Accepts numpy arrays or tensors shaped (N, H, W), (N, H, W, 1) or
    (N, H, W, 3) with three equal channels, H = W = 28 or 32, dtype uint8.
    Anything else is a one-line :class:`InvalidArgumentError`.
    """
    if isinstance(images, torch.Tensor):
        images = images.detach().cpu().numpy()
    images = np.asarray(images)
    if images.dtype != np.uint8:
        raise InvalidArgumentError(
            f"{name} must be uint8 pixels 0-255, got {images.dtype}; convert with ditq.images.to_uint8"
        )
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim != 4 or images.shape[-1] not in (1, 3) or images.shape[1] != images.shape[2]:
        raise InvalidArgumentError(
            f"{name} must be grayscale NHWC (N, 32, 32, 1) or (N, 28, 28, 1), got shape {images.shape}"
        )
    if images.shape[1] not in (28, IMAGE_SIZE):
        raise InvalidArgumentError(
            f"{name} are {images.shape[1]}x{images.shape[2]}; FID-FMNIST takes 32x32 or 28x28 images"
        )
    if len(images) == 0:
        raise InvalidArgumentError(f"{name} holds no images")
    if images.shape[-1] == 3:
        # Sample batches store grayscale as RGB (the channel repeated); anything else is colour.
        if not ((images[..., 0] == images[..., 1]).all() and (images[..., 0] == images[..., 2]).all()):
            raise InvalidArgumentError(
                f"{name} are colour images (their RGB channels differ); FID-FMNIST takes grayscale images"
            )
        images = images[..., :1]
    if images.shape[1] == 28:  # as load_idx_dataset: a 2-pixel black border
        images = np.pad(images, ((0, 0), (2, 2), (2, 2), (0, 0)))
    return np.ascontiguousarray(images)


def check_labels(labels, num_images: int, num_classes: int = NUM_CLASSES) -> np.ndarray:
    """Integer labels (N,) in ``[0, num_classes)``, one per image, as int64."""
    if isinstance(labels, torch.Tensor):
        labels = labels.detach().cpu().numpy()
    labels = np.asarray(labels)
    if labels.shape != (num_images,) or not (
        np.issubdtype(labels.dtype, np.integer) or labels.dtype == np.bool_
    ):
        raise InvalidArgumentError(
            f"labels must be one integer per image ({num_images},), got {labels.dtype} {labels.shape}"
        )
    labels = labels.astype(np.int64)
    bad = labels[(labels < 0) | (labels >= num_classes)]
    if len(bad):
        raise InvalidArgumentError(f"label {int(bad[0])} is out of range 0..{num_classes - 1}")
    return labels


def to_model_input(batch: np.ndarray, device: torch.device | str = "cpu") -> torch.Tensor:
    """uint8 (B, 32, 32, 1) -> float32 (B, 1, 32, 32) ``u / 127.5 - 1``: exactly the training data's scale."""
    x = torch.from_numpy(np.ascontiguousarray(batch)).to(device)
    return x.permute(0, 3, 1, 2).float() / 127.5 - 1.0  # B, 1, 32, 32


def _batches(images: np.ndarray, batch_size: int) -> Iterator[np.ndarray]:
    for i in range(0, len(images), batch_size):
        yield images[i : i + batch_size]


#################################################################################
#                                   Training                                    #
#################################################################################


@dataclass(frozen=True)
class FMNISTTrainConfig:
    """How :func:`train_fmnist_classifier` trains: AdamW with a one-cycle schedule, random shifts."""

    epochs: int = 4
    batch_size: int = 128
    lr: float = 3e-3
    weight_decay: float = 5e-4
    max_shift: int = 2  # random translation by up to this many pixels (black fill), per image
    seed: int = 0

    def __post_init__(self):
        for name in ("epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise InvalidArgumentError(f"{name} must be positive, got {getattr(self, name)}")
        if not self.lr > 0 or self.weight_decay < 0 or self.max_shift < 0:
            raise InvalidArgumentError(
                f"lr must be positive and weight_decay, max_shift non-negative; got {self}"
            )


def _random_shift(x: torch.Tensor, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    """Translate each image (B, 1, H, W) by its own random offset in ±``max_shift``, filling with -1."""
    if max_shift == 0:
        return x
    b, _, h, w = x.shape
    padded = F.pad(x, (max_shift,) * 4, value=-1.0)
    offsets = torch.randint(0, 2 * max_shift + 1, (b, 2), generator=generator).to(x.device)
    rows = (offsets[:, 0, None] + torch.arange(h, device=x.device))[:, :, None]  # B, H, 1
    cols = (offsets[:, 1, None] + torch.arange(w, device=x.device))[:, None, :]  # B, 1, W
    return padded[torch.arange(b, device=x.device)[:, None, None], 0, rows, cols].unsqueeze(1)


def train_fmnist_classifier(
    images,
    labels,
    config: FMNISTTrainConfig | None = None,
    *,
    model_config: FMNISTClassifierConfig | None = None,
    device: torch.device | str = "cpu",
    log: Callable[[str], None] | None = None,
) -> FMNISTClassifier:
    """Train a :class:`FMNISTClassifier` on uint8 ``images`` (as :func:`check_images` takes) and ``labels``.

    Deterministic for a given ``config.seed``, device and thread count: the
    initialization, the shuffling, the shifts and dropout all draw from
    seeded generators (the global RNG is restored afterwards). ``log``
    receives one line per epoch. Returns the model in eval mode.
    """
    config = config or FMNISTTrainConfig()
    images = check_images(images, "training images")
    labels = check_labels(labels, len(images), (model_config or FMNISTClassifierConfig()).num_classes)
    device = torch.device(device)
    log = log or (lambda _: None)
    x_all = to_model_input(images)  # N, 1, 32, 32, on the CPU; batches move to the device
    y_all = torch.from_numpy(labels)
    steps_per_epoch = max(1, len(x_all) // config.batch_size)  # drop the ragged last batch
    total = steps_per_epoch * config.epochs

    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(config.seed)  # initialization and dropout
        model = FMNISTClassifier(model_config).to(device)
        # channels-last convolutions are ~20% faster on CPU (oneDNN's native layout)
        model = model.to(memory_format=torch.channels_last)
        generator = torch.Generator().manual_seed(config.seed)  # order and shifts
        optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
        schedule = torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=config.lr, total_steps=total, pct_start=0.15
        )
        model.train()
        started = time.perf_counter()
        for epoch in range(config.epochs):
            order = torch.randperm(len(x_all), generator=generator)
            loss_sum, correct, seen = 0.0, 0, 0
            for i in range(steps_per_epoch):
                idx = order[i * config.batch_size : (i + 1) * config.batch_size]
                x = _random_shift(x_all[idx], config.max_shift, generator).to(device)
                x = x.contiguous(memory_format=torch.channels_last)
                y = y_all[idx].to(device)
                logits = model(x)
                loss = F.cross_entropy(logits, y)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
                loss_sum += loss.item() * len(y)
                correct += (logits.argmax(1) == y).sum().item()
                seen += len(y)
            log(
                f"epoch {epoch + 1}/{config.epochs}: loss {loss_sum / seen:.4f}, "
                f"train accuracy {correct / seen:.4f}, {time.perf_counter() - started:.0f} s"
            )
    model = model.to(memory_format=torch.contiguous_format)
    return model.eval()


#################################################################################
#                                  Evaluation                                   #
#################################################################################


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
            _batches(images, batch_size),
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


#################################################################################
#                          Making the shipped evaluator                         #
#################################################################################


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
            [model(to_model_input(b, device)).argmax(1).cpu().numpy() for b in _batches(images, batch_size)]
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


__all__ = [
    "ASSET_NAME",
    "FEATURE_KEY",
    "FLOOR_COUNTS",
    "FMNISTBuildResult",
    "FMNISTClassifier",
    "FMNISTClassifierConfig",
    "FMNISTEvaluator",
    "FMNISTTrainConfig",
    "build_fmnist_evaluator",
    "check_images",
    "check_labels",
    "classifier_accuracy",
    "default_evaluator_path",
    "evaluate_fmnist",
    "load_fmnist_evaluator",
    "save_fmnist_evaluator",
    "to_model_input",
    "train_fmnist_classifier",
]
