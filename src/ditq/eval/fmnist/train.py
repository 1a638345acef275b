"""Training the FID-FMNIST classifier: AdamW with a one-cycle schedule and random shifts.

Deterministic for a given seed, device and thread count (every draw comes from
seeded generators and the global RNG is restored), so ``ditq train-evaluator``
remakes the shipped classifier (:mod:`ditq.eval.fmnist.build`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ditq.errors import InvalidArgumentError
from ditq.eval.fmnist.classifier import FMNISTClassifier, FMNISTClassifierConfig
from ditq.eval.fmnist.images import check_images, check_labels, to_model_input


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
        # channels-last convolutions are faster on CPU (oneDNN's native layout; docs/benchmarks.md)
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
