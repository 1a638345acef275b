"""The FID-FMNIST classifier: a small CNN for 32x32 grayscale images in [-1, 1].

Its 128-d penultimate features (global-average-pooled last conv, like
Inception's ``pool_3``) are what FID-FMNIST compares; its logits give the class
accuracy of class-conditional samples. Initialization is PyTorch's default; the
trained weights ship in ``ditq/assets`` (:mod:`ditq.eval.fmnist.evaluator`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ditq.errors import InvalidArgumentError

NUM_CLASSES = 10


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
    multiply-adds per image: small enough to train on a laptop CPU (time: docs/benchmarks.md).
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
