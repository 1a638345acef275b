"""The embedded synthetic shapes: deterministic, any size, and really ten classes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ditq.data import SYNTHETIC_CLASSES, load_synthetic_dataset
from ditq.errors import InvalidArgumentError


@pytest.mark.parametrize(("size", "channels"), [(8, 1), (32, 1), (24, 3)])
def test_shapes_range_and_balance(size, channels):
    x, y = load_synthetic_dataset(53, size, channels, seed=1)
    assert x.shape == (53, channels, size, size) and x.dtype == torch.float32
    assert y.shape == (53,) and y.dtype == torch.int64
    assert x.min() >= -1 and x.max() <= 1 and x.std() > 0.2
    counts = torch.bincount(y, minlength=10)
    assert len(SYNTHETIC_CLASSES) == 10 and counts.max() - counts.min() <= 1


def test_deterministic_from_the_seed():
    a, la = load_synthetic_dataset(40, 16, 3, seed=5)
    b, lb = load_synthetic_dataset(40, 16, 3, seed=5)
    c, _ = load_synthetic_dataset(40, 16, 3, seed=6)
    assert torch.equal(a, b) and torch.equal(la, lb)
    assert not torch.equal(a, c)


def test_three_channels_are_tinted_not_grey():
    x, _ = load_synthetic_dataset(20, 16, 3, seed=0)
    assert (x[:, 0] - x[:, 1]).abs().mean() > 0.02


def test_a_linear_classifier_tells_the_classes_apart():
    x, y = load_synthetic_dataset(800, 16, 1, seed=0)
    xt, yt = load_synthetic_dataset(300, 16, 1, seed=1)
    torch.manual_seed(0)
    clf = torch.nn.Linear(16 * 16, 10)
    opt = torch.optim.Adam(clf.parameters(), lr=1e-2)
    for _ in range(150):
        loss = F.cross_entropy(clf(x.flatten(1)), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    accuracy = (clf(xt.flatten(1)).argmax(1) == yt).float().mean().item()
    assert accuracy > 0.6  # chance is 0.1


def test_class_means_differ():
    # Nearest class mean, the simplest classifier: well above chance too.
    x, y = load_synthetic_dataset(500, 16, 1, seed=0)
    xt, yt = load_synthetic_dataset(200, 16, 1, seed=2)
    means = torch.stack([x[y == c].flatten(1).mean(0) for c in range(10)])
    accuracy = (torch.cdist(xt.flatten(1), means).argmin(1) == yt).float().mean().item()
    assert accuracy > 0.4


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"num_samples": 0}, "num_samples"), ({"image_size": 2}, "image_size"), ({"channels": 2}, "channels")],
)
def test_bad_arguments_are_one_line_errors(kwargs, match):
    with pytest.raises(InvalidArgumentError, match=match):
        load_synthetic_dataset(**{"num_samples": 10, **kwargs})
