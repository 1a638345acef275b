"""``ditq demo``: first contact in seconds on a laptop CPU, with nothing to download.

Samples a labelled grid of the ten Fashion-MNIST classes from a tiny
pixel-space class-conditional DiT, and writes it with the ADM ``.npz`` batch.
The model is the one embedded in the package (``ditq/assets/ditq-fmnist.safetensors``)
when it is there; otherwise a randomly initialized tiny DiT stands in, and the
demo says plainly that its images are noise.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch
from torch import nn

from ditq import models
from ditq.data import FASHION_MNIST_CLASSES
from ditq.errors import InvalidArgumentError
from ditq.images import save_grid, save_npz
from ditq.models import DiT, DiTConfig
from ditq.pipelines.sample import sample

EMBEDDED_MODEL = "ditq-fmnist.safetensors"

# Fashion-MNIST padded to 32x32, one channel; 4x4 patches give 64 tokens, so
# a forward pass costs about a millisecond per image on a CPU core.
DEMO_CONFIG = DiTConfig(
    depth=4,
    hidden_size=128,
    num_heads=4,
    patch_size=4,
    input_size=32,
    in_channels=1,
    num_classes=len(FASHION_MNIST_CLASSES),
)


def find_embedded_model() -> Path | None:
    """The path of the embedded demo checkpoint, or ``None`` when this install has none."""
    try:
        asset = resources.files("ditq").joinpath("assets", EMBEDDED_MODEL)
    except (ModuleNotFoundError, TypeError):
        return None
    return Path(str(asset)) if asset.is_file() else None


def tiny_demo_model(seed: int = 0) -> nn.Module:
    """A randomly initialized :data:`DEMO_CONFIG` DiT in eval mode (global RNG left untouched)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = DiT(DEMO_CONFIG)
    return model.eval()


@dataclass
class DemoResult:
    """What :func:`run_demo` did and wrote."""

    grid_path: Path
    npz_path: Path
    model_path: Path | None  # None: the random stand-in model
    num_samples: int
    seconds: float

    @property
    def trained(self) -> bool:
        return self.model_path is not None


def run_demo(
    out_dir: str | Path = "out/demo",
    *,
    seed: int = 0,
    samples_per_class: int = 2,
    steps: int = 20,
    cfg_scale: float = 2.0,
    progress: bool = False,
    log: Callable[[str], None] = print,
) -> DemoResult:
    """Sample each class with DDIM-``steps``; write ``grid.png`` and ``samples.npz`` into ``out_dir``.

    Draws ``samples_per_class`` images of each class; the grid has one column
    per class, captioned with its name. ``log`` receives one line per thing
    done (pass ``lambda _: None`` for silence).
    """
    if samples_per_class < 1:
        raise InvalidArgumentError(f"samples_per_class must be positive, got {samples_per_class}")
    out_dir = Path(out_dir)
    started = time.perf_counter()
    model_path = find_embedded_model()
    if model_path is not None:
        model = models.load(model_path, device="cpu")
        log(f"model: the embedded Fashion-MNIST DiT ({model_path.name})")
    else:
        model = tiny_demo_model(seed)
        log(
            "model: no trained model is embedded in this install, so a randomly initialized tiny DiT "
            "stands in; its images are noise, not clothes"
        )
    config = model.config
    num_classes = config.num_classes
    class_names = FASHION_MNIST_CLASSES if num_classes == len(FASHION_MNIST_CLASSES) else None
    num_samples = samples_per_class * num_classes
    log(
        f"sampling {num_samples} images ({samples_per_class} per class, {num_classes} classes, "
        f"{config.input_size}x{config.input_size}) with DDIM-{steps}, cfg scale {cfg_scale}, seed {seed}"
    )
    images, labels = sample(
        model,
        num_samples=num_samples,
        batch_size=num_samples,
        sampler="ddim",
        steps=steps,
        cfg_scale=cfg_scale,
        class_labels=list(range(num_classes)),
        seed=seed,
        device="cpu",
        progress=progress,
    )
    grid_path = save_grid(out_dir / "grid.png", images, labels, class_names, nrow=num_classes)
    npz_path = save_npz(out_dir / "samples.npz", images, labels)
    seconds = time.perf_counter() - started
    log(f"wrote {grid_path} (one column per class) and {npz_path} (ADM format: arr_0 images, arr_1 labels)")
    log(f"done in {seconds:.1f} s")
    return DemoResult(grid_path, npz_path, model_path, len(labels), seconds)
