"""``ditq demo``: first contact in seconds on a laptop CPU, with nothing to download.

Samples a labelled grid of the ten Fashion-MNIST classes from a tiny
pixel-space class-conditional DiT, and writes it with the ADM ``.npz`` batch.
The model is the one embedded in the package (``ditq/assets/ditq-fmnist.safetensors``)
when it is there; otherwise a randomly initialized tiny DiT stands in, and the
demo says plainly that its images are noise.

Then it trains a fresh, very small DiT on the embedded synthetic shapes for a
few dozen steps (``ditq train`` in miniature: log, checkpoint, EMA model),
showing the loss fall.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ditq import models
from ditq.data import FASHION_MNIST_CLASSES
from ditq.errors import InvalidArgumentError
from ditq.images import save_grid, save_npz
from ditq.models import DiT, DiTConfig
from ditq.pipelines.sample import sample
from ditq.pipelines.train import CHECKPOINT_DIR, CONFIG_FILE, LOG_FILE, MODEL_FILE, TrainResult, run_training
from ditq.train.config import CheckpointSpec, DataSpec, ModelSpec, TrainRun
from ditq.train.loop import TrainConfig

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


# The training part: 16x16 grey shapes, 16 tokens, a 2-block DiT of 0.18M parameters,
# so each step takes tens of milliseconds on one CPU core.
DEMO_TRAIN_STEPS = 80


def demo_train_run(out_dir: str | Path, steps: int = DEMO_TRAIN_STEPS, seed: int = 0) -> TrainRun:
    """The :class:`TrainRun` of the demo's training part (like ``configs/synthetic_tiny.yaml``)."""
    return TrainRun(
        model=ModelSpec(name="DiT-S/4", overrides={"depth": 2, "hidden_size": 64, "num_heads": 2}),
        data=DataSpec(kind="synthetic", image_size=16, channels=1, num_samples=1000),
        optim=TrainConfig(
            steps=steps,
            batch_size=32,
            lr=1e-3,
            warmup_steps=min(10, steps),
            ema_decay=0.99,
            grad_clip=1.0,
            log_every=max(1, min(10, steps // 2)),
        ),
        checkpoint=CheckpointSpec(every=0, keep_last=1),
        out=str(out_dir),
        seed=seed,
        device="cpu",
    )


def find_embedded_model() -> Path | None:
    """The path of the embedded demo checkpoint, or ``None`` when this install has none."""
    return models.hub.embedded_model_path("ditq-fmnist")


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
    training: TrainResult | None = None  # None when the training part was skipped

    @property
    def trained(self) -> bool:
        return self.model_path is not None


def run_demo(
    out_dir: str | Path = "out/demo",
    *,
    seed: int = 0,
    samples_per_class: int = 2,
    steps: int = 20,
    cfg_scale: float = 3.0,
    progress: bool = False,
    log: Callable[[str], None] = print,
    train: bool = True,
    train_steps: int = DEMO_TRAIN_STEPS,
) -> DemoResult:
    """Sample each class with DDIM-``steps``; write ``grid.png`` and ``samples.npz`` into ``out_dir``.

    Draws ``samples_per_class`` images of each class; the grid has one column
    per class, captioned with its name. Then, with ``train``, trains a fresh
    tiny DiT on synthetic shapes for ``train_steps`` steps into ``out_dir/train``
    (log, checkpoint, EMA model). ``log`` receives one line per thing done
    (pass ``lambda _: None`` for silence).
    """
    if samples_per_class < 1:
        raise InvalidArgumentError(f"samples_per_class must be positive, got {samples_per_class}")
    if train and train_steps < 1:
        raise InvalidArgumentError(f"train_steps must be positive, got {train_steps}")
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
    log(f"wrote {grid_path} (one column per class) and {npz_path} (ADM format: arr_0 images, arr_1 labels)")
    training = _train_part(out_dir / "train", train_steps, seed, log) if train else None
    seconds = time.perf_counter() - started
    log(f"done in {seconds:.1f} s")
    return DemoResult(grid_path, npz_path, model_path, len(labels), seconds, training)


def _train_part(out_dir: Path, steps: int, seed: int, log: Callable[[str], None]) -> TrainResult:
    """Train the demo's tiny DiT on synthetic shapes; report the loss at start and end."""
    # A demo run replaces the previous one: only the files a run writes are removed.
    for name in (CONFIG_FILE, LOG_FILE, MODEL_FILE):
        (out_dir / name).unlink(missing_ok=True)
    for old in (out_dir / CHECKPOINT_DIR).glob("step_*.pt"):
        old.unlink()
    log(f"training a fresh tiny DiT on synthetic shapes (no download) for {steps} steps ...")
    with _threads(1):
        result = run_training(demo_train_run(out_dir, steps, seed), log=lambda _: None)
    first, last = result.records[0], result.records[-1]
    log(
        f"loss {first['loss']:.3f} (mean of steps 1-{first['step']}) -> {last['loss']:.3f} "
        f"(step {last['step']}) in {last['elapsed_s']:.1f} s"
    )
    log(f"wrote the log {result.log_path}, the training state {result.last_checkpoint}")
    log(
        f"and the EMA model {result.model_path} (sample it: ditq sample --model {result.model_path} "
        "--sampler ddim --steps 20 --out grid.png)"
    )
    return result


@contextmanager
def _threads(n: int):
    # A tiny model's ops are too small to split: with more threads, synchronization costs
    # more than it saves (and far more on a busy machine).
    before = torch.get_num_threads()
    torch.set_num_threads(min(n, before))
    try:
        yield
    finally:
        torch.set_num_threads(before)
