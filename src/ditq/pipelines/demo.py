"""``ditq demo``: first contact in seconds on a laptop CPU, with nothing to download.

Samples a labelled grid of the ten Fashion-MNIST classes from a tiny
pixel-space class-conditional DiT, and writes it with the ADM ``.npz`` batch.
The model is the one embedded in the package (``ditq/assets/ditq-fmnist.safetensors``)
when it is there; otherwise a randomly initialized tiny DiT stands in, and the
demo says plainly that its images are noise.

Then it judges the samples with the small-domain evaluator shipped beside the
model (:mod:`ditq.eval.fmnist`): FID-FMNIST and class accuracy of a modest
balanced batch (the grid is its first rows), next to the floor (real
Fashion-MNIST images at the same count) and, from a source checkout, the
1000-sample figures of ``docs/results/embedded_eval.json``.

Then a fast Q-DiT ladder (W8A8 and W4A8 a few ways, scored on the same
images), a short data-free ternary distillation (TerDiT layers, W1.58A8: the
embedded model teaches a ternary copy of itself on its own samples; FID-FMNIST
and checkpoint size next to FP), and a size and latency table of the model
deployed as FP32, W8A8 and ternary (:mod:`ditq.pipelines.deploy`: packed
weights, integer kernels where this machine has them).

Last, it trains a fresh, very small DiT on the embedded synthetic shapes for a
few dozen steps (``ditq train`` in miniature: log, checkpoint, EMA model),
showing the loss fall.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ditq import formats
from ditq.data import FASHION_MNIST_CLASSES
from ditq.errors import DitqError, InvalidArgumentError
from ditq.eval.fmnist import default_evaluator_path, evaluate_fmnist
from ditq.images import save_grid, save_npz
from ditq.models import DiT, DiTConfig
from ditq.pipelines.sample import sample
from ditq.pipelines.train import CHECKPOINT_DIR, CONFIG_FILE, LOG_FILE, MODEL_FILE, TrainResult, run_training
from ditq.train.config import CheckpointSpec, DataSpec, InitSpec, ModelSpec, QuantSpec, TrainRun
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

# Images scored per row of the demo's fast PTQ ladder (DDIM-10, no guidance).
DEMO_PTQ_SAMPLES = 100

# Images scored by FID-FMNIST: FID on the 20 grid images means nothing, and each
# further 80 (beyond the grid) cost 29 s at DDIM-20 with guidance on a busy 2-core CPU.
DEMO_EVAL_SAMPLES = 100

# The demo's data-free ternary distillation (TerDiT layers, the embedded model as its own teacher):
# steps of batch DEMO_DISTILL_BATCH on a pool of DEMO_DISTILL_POOL teacher samples (DDIM-10).
DEMO_DISTILL_STEPS = 150
DEMO_DISTILL_BATCH = 32
DEMO_DISTILL_POOL = 128

# The embedded model's reference evaluation (scripts/eval_embedded.py), found in a source checkout.
EMBEDDED_EVAL_JSON = Path("docs") / "results" / "embedded_eval.json"


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


def demo_distill_run(
    out_dir: str | Path,
    teacher: str | Path,
    model_config: dict,
    steps: int = DEMO_DISTILL_STEPS,
    seed: int = 0,
) -> TrainRun:
    """The :class:`TrainRun` of the demo's ternary part: ``configs/fmnist_ternary_distill.yaml`` in
    miniature (the student starts from the teacher's weights and never reads a dataset)."""
    return TrainRun(
        model=ModelSpec(name=None, config={**model_config, "adaln_norm": True}),  # TerDiT's adaLN RMSNorm
        init=InitSpec(from_=str(teacher)),
        data=DataSpec(
            kind="distill", teacher=str(teacher), pool_size=DEMO_DISTILL_POOL, pool_steps=10, pool_refresh=0
        ),
        # TerDiT's layers (learnable α, least-squares init; adaLN RMSNorm) with int8 per-token
        # activations (W1.58A8): the ablation found them as good as weight-only, and they run on
        # the integer w158a8_linear kernel when deployed, weight-only ternary on no CPU kernel.
        quant=QuantSpec(act_bits=8),
        optim=TrainConfig(
            steps=steps,
            batch_size=DEMO_DISTILL_BATCH,
            lr=5e-4,
            warmup_steps=min(10, steps),
            decay_at=0.85,
            ema_decay=0.95,
            grad_clip=2.0,
            log_every=max(1, min(25, steps // 2)),
        ),
        checkpoint=CheckpointSpec(every=0, keep_last=1),
        out=str(out_dir),
        seed=seed,
        device="cpu",
    )


def find_embedded_model() -> Path | None:
    """The path of the embedded demo checkpoint, or ``None`` when this install has none."""
    return formats.embedded_model_path("ditq-fmnist")


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
    evaluation: dict | None = None  # evaluate_fmnist's result; None when skipped
    ptq: list[dict] | None = None  # the fast PTQ ladder's rows; None when skipped
    ternary: dict | None = None  # the data-free ternary distillation's scores; None when skipped
    deployed: list[dict] | None = None  # the size and latency table's rows; None when skipped

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
    eval_samples: int = DEMO_EVAL_SAMPLES,
    ptq_samples: int = DEMO_PTQ_SAMPLES,
    ternary_steps: int = DEMO_DISTILL_STEPS,
    deploy: bool = True,
) -> DemoResult:
    """Sample each class with DDIM-``steps``; write ``grid.png`` and ``samples.npz`` into ``out_dir``.

    Draws ``samples_per_class`` images of each class; the grid has one column
    per class, captioned with its name. With ``eval_samples`` (0 skips it),
    that many images, classes in turn (the grid's first, then a second draw
    from ``seed + 1``), are scored by FID-FMNIST and class accuracy and
    written to ``eval_samples.npz``. With ``ptq_samples`` (0 skips it), a fast
    Q-DiT ladder: the model quantized W8A8 and W4A8 a few ways, each scored on
    the same ``ptq_samples`` images (DDIM-10, no guidance) next to full
    precision, with its size. Then, with ``train``, trains a fresh
    tiny DiT on synthetic shapes for ``train_steps`` steps into ``out_dir/train``
    (log, checkpoint, EMA model). ``log`` receives one line per thing done
    (pass ``lambda _: None`` for silence).
    """
    if samples_per_class < 1:
        raise InvalidArgumentError(f"samples_per_class must be positive, got {samples_per_class}")
    if train and train_steps < 1:
        raise InvalidArgumentError(f"train_steps must be positive, got {train_steps}")
    if ternary_steps < 0:
        raise InvalidArgumentError(
            f"ternary_steps must be 0 (no ternary part) or positive, got {ternary_steps}"
        )
    if ptq_samples < 0 or ptq_samples == 1:
        raise InvalidArgumentError(f"ptq_samples must be 0 (no PTQ part) or at least 2, got {ptq_samples}")
    if eval_samples < 0 or eval_samples == 1:
        raise InvalidArgumentError(
            f"eval_samples must be 0 (no evaluation) or at least 2, got {eval_samples}"
        )
    out_dir = Path(out_dir)
    started = time.perf_counter()
    model_path = find_embedded_model()
    if model_path is not None:
        model = formats.load(model_path, device="cpu")
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
    evaluation = None
    if eval_samples:
        options = {"steps": steps, "cfg_scale": cfg_scale, "seed": seed, "progress": progress}
        evaluation = _eval_part(model, images, labels, eval_samples, options, model_path, out_dir, log)
    ladder_rows = _ptq_part(model, ptq_samples, seed, log) if ptq_samples else None
    ternary = None
    if ternary_steps and model_path is not None:
        fp_row = ladder_rows[0] if ladder_rows else None
        count = ptq_samples or DEMO_PTQ_SAMPLES
        ternary = _ternary_part(
            model, model_path, out_dir / "ternary", ternary_steps, count, seed, fp_row, log
        )
    deployed = _deploy_part(model, out_dir / "deploy", ternary, log) if deploy else None
    training = _train_part(out_dir / "train", train_steps, seed, log) if train else None
    seconds = time.perf_counter() - started
    log(f"done in {seconds:.1f} s")
    return DemoResult(
        grid_path,
        npz_path,
        model_path,
        len(labels),
        seconds,
        training,
        evaluation,
        ladder_rows,
        ternary,
        deployed,
    )


def published_evaluation() -> dict | None:
    """The embedded model's reference evaluation, ``docs/results/embedded_eval.json``, if this is a checkout.

    Installed packages carry no docs: then None, as for a file that does not parse.
    """
    path = Path(__file__).resolve().parents[3] / EMBEDDED_EVAL_JSON  # src/ditq/pipelines -> the root
    try:
        result = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    keys = ("fid_fmnist", "class_acc", "samples", "steps")
    return result if isinstance(result, dict) and all(k in result for k in keys) else None


def _eval_part(
    model: nn.Module,
    images: np.ndarray,
    labels: np.ndarray,
    count: int,
    options: dict,
    model_path: Path | None,
    out_dir: Path,
    log: Callable[[str], None],
) -> dict | None:
    """FID-FMNIST and class accuracy of ``count`` samples (the grid's first), with numbers for scale."""
    evaluator_path = default_evaluator_path()
    if evaluator_path is None:
        log(
            "no FID-FMNIST classifier in this install (ditq/assets/fmnist-classifier.safetensors): not scored"
        )
        return None
    started = time.perf_counter()
    more = count - len(images)
    if more > 0:
        # A second draw (seed + 1), in large batches (faster than the grid's), classes in turn again.
        log(f"sampling {more} more images (seed {options['seed'] + 1}) so that FID-FMNIST sees {count} ...")
        extra, extra_labels = sample(
            model,
            num_samples=more,
            batch_size=min(more, 100),
            sampler="ddim",
            steps=options["steps"],
            cfg_scale=options["cfg_scale"],
            class_labels=list(range(model.config.num_classes)),
            seed=options["seed"] + 1,
            device="cpu",
            progress=options["progress"],
        )
        images, labels = np.concatenate([images, extra]), np.concatenate([labels, extra_labels])
    images, labels = images[:count], labels[:count]
    sampled = time.perf_counter()
    eval_npz = save_npz(out_dir / "eval_samples.npz", images, labels)
    try:
        result = evaluate_fmnist(images, labels, evaluator=evaluator_path)
    except DitqError as e:  # a damaged classifier file must not end the demo
        log(f"FID-FMNIST not computed: {e}")
        return None
    log(
        f"FID-FMNIST {result['fid_fmnist']:.2f} and class accuracy {result['class_acc']:.1%} on "
        f"{result['num_images']} samples (DDIM-{options['steps']}, cfg scale {options['cfg_scale']}; "
        f"sampled in {sampled - started:.1f} s, scored in {time.perf_counter() - sampled:.1f} s); "
        "lower FID is better"
    )
    at_n = result.get("floor_fid_fmnist_at_n")
    if at_n is not None:
        log(
            f"  floor: real Fashion-MNIST training images score {at_n['value']:.3g} at {at_n['num_images']} "
            f"images ({result['floor_fid_fmnist']:.3g} at {result['floor_num_images']}); "
            "FID falls as the sample count grows"
        )
    published = published_evaluation() if model_path is not None else None
    if published is not None:
        log(
            f"  the embedded model's reference evaluation ({EMBEDDED_EVAL_JSON}): FID-FMNIST "
            f"{published['fid_fmnist']:.2f}, class accuracy {published['class_acc']:.1%} on "
            f"{published['samples']} samples, DDIM-{published['steps']}, "
            f"cfg scale {published.get('cfg_scale')}"
        )
    log(f"  score them again: ditq eval {eval_npz} --evaluator fmnist")
    return result


# The fast ladder: each rung adds one ingredient; all score the same images.
DEMO_PTQ_RUNGS = (
    ("W8A8", 8, "+dynamic", "RTN, groups of 128, dynamic per-token activations"),
    ("W4A8", 4, "rtn", "RTN, per-channel weights, static per-tensor activations"),
    ("W4A8", 4, "+dynamic", "+ groups of 128, dynamic activations"),
    ("W4A8", 4, "+gptq", "+ GPTQ weights (uniform groups; the full ladder also searches them)"),
)


def _ptq_part(model: nn.Module, num_samples: int, seed: int, log: Callable[[str], None]) -> list[dict] | None:
    """Quantize the model a few ways (Q-DiT's ladder, fast) and score each on the same samples."""
    from ditq.pipelines import ladder, ptq

    try:
        quality = ptq.quality_function(model)
    except DitqError as e:
        log(f"PTQ ladder skipped: {e}")
        return None
    spec = ptq.EvalSpec(num_samples=num_samples, steps=10, cfg_scale=1.0, batch_size=num_samples, seed=seed)
    log(
        f"post-training quantization (Q-DiT), fast: {num_samples} images per row, DDIM-{spec.steps}, "
        "no guidance, the same seed and labels in every row ..."
    )
    started = time.perf_counter()
    with _threads(1):
        calib = ptq.record_calibration(model, ptq.CalibSpec(num_samples=32, steps=10), cache=False)
        rows = ladder.fp_rows(model, spec, quality, seeds=(seed,))
        for _, bits, rung, _ in DEMO_PTQ_RUNGS:
            rows += ladder.ladder_rows(model, bits, spec, quality, calib, rungs=(rung,), search_layers={})
    fp = rows[0]
    lines = [("FP32", "full precision", fp)] + [
        (name, text, row) for (name, _, _, text), row in zip(DEMO_PTQ_RUNGS, rows[1:], strict=True)
    ]
    for name, text, row in lines:
        acc = "" if row.class_acc is None else f", class acc {100 * row.class_acc:4.1f}%"
        ratio = f"x{row.fid / fp.fid:.2f}"
        log(f"  {name:5s} FID-FMNIST {row.fid:6.2f} ({ratio}){acc}, {row.size_mb:5.2f} MB  {text}")
    log(
        f"  ({time.perf_counter() - started:.0f} s; FID on {num_samples} images is noisy: compare rows, not "
        "with the 1000-sample figures; the full ladder: scripts/ptq_ladder.py, README)"
    )
    return [r.to_dict() for r in rows]


def _train_part(out_dir: Path, steps: int, seed: int, log: Callable[[str], None]) -> TrainResult:
    """Train the demo's tiny DiT on synthetic shapes; report the loss at start and end."""
    _fresh_run_dir(out_dir)
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


def _deploy_part(
    model: nn.Module, out_dir: Path, ternary: dict | None, log: Callable[[str], None]
) -> list[dict]:
    """Size and latency of the model deployed: float32, W8A8 on the integer kernels, the demo's ternary."""
    from ditq.pipelines import deploy

    out_dir.mkdir(parents=True, exist_ok=True)
    fp_path = out_dir / "fp32.safetensors"
    formats.save(model.float(), fp_path, command="ditq demo")
    paths = {
        "FP32": fp_path,
        "W8A8": deploy.save_w8a8(model, out_dir / "w8a8.safetensors", command="ditq demo"),
    }
    if ternary is not None:
        paths["ternary"] = Path(ternary["model_path"])
    batch = 20
    log(
        f"deployed on this CPU (one thread): checkpoints loaded as ditq sample loads them, one sampling step "
        f"of {batch} images with guidance ({2 * batch} model rows), fastest of 7 ..."
    )
    with _threads(1):
        rows = deploy.compare(paths, batch_size=batch, cfg=True, repeats=7)
    for line in deploy.table(rows):
        log("  " + line)
    log(
        "  (W8A8: RTN per-channel weights, per-token activations, the fast path of ditq's integer kernels; "
        "tiny layers (128 wide) leave the kernels little to win here, see docs/benchmarks.md for real shapes)"
    )
    return [r.to_dict() for r in rows]


def _fresh_run_dir(out_dir: Path) -> None:
    """A demo run replaces the previous one: only the files a run writes are removed."""
    for name in (CONFIG_FILE, LOG_FILE, MODEL_FILE):
        (out_dir / name).unlink(missing_ok=True)
    for old in (out_dir / CHECKPOINT_DIR).glob("step_*.pt"):
        old.unlink()


def _ternary_part(
    model: nn.Module,
    model_path: Path,
    out_dir: Path,
    steps: int,
    num_samples: int,
    seed: int,
    fp_row: dict | None,
    log: Callable[[str], None],
) -> dict | None:
    """Data-free ternary distillation of the embedded model; its FID-FMNIST and file size next to FP."""
    from ditq.formats.ternary import checkpoint_sizes
    from ditq.pipelines import ptq

    try:
        quality = ptq.quality_function(model)
    except DitqError as e:
        log(f"ternary distillation skipped: {e}")
        return None
    _fresh_run_dir(out_dir)
    log(
        f"ternary (TerDiT, W1.58A8), data-free: the embedded model teaches a ternary copy of itself for "
        f"{steps} steps of {DEMO_DISTILL_BATCH} on {DEMO_DISTILL_POOL} of its own DDIM-10 samples "
        "(no dataset read) ..."
    )
    started = time.perf_counter()
    spec = ptq.EvalSpec(num_samples=num_samples, steps=10, cfg_scale=1.0, batch_size=num_samples, seed=seed)
    with _threads(1):
        run = demo_distill_run(out_dir, model_path, model.config.to_dict(), steps, seed)
        result = run_training(run, log=lambda _: None)
        trained = time.perf_counter()
        student = formats.load(result.model_path)
        if fp_row is None or fp_row.get("samples") != num_samples:  # no PTQ ladder row to reuse
            fp_scores = quality(*ptq.draw_samples(model, spec))
            fp_row = {"fid": ptq.primary_score(fp_scores), "class_acc": fp_scores.get("class_acc")}
        scores = quality(*ptq.draw_samples(student, spec))
    first, last = result.records[0], result.records[-1]
    fp_bytes, ternary_bytes = model_path.stat().st_size, result.model_path.stat().st_size
    fid = ptq.primary_score(scores)
    sizes = checkpoint_sizes(result.model_path)
    row = {
        "fid": fid,
        "class_acc": scores.get("class_acc"),
        "checkpoint_bytes": ternary_bytes,
        "fp_fid": fp_row["fid"],
        "fp_class_acc": fp_row.get("class_acc"),
        "fp_checkpoint_bytes": fp_bytes,
        "fp32_bytes": sizes["fp32_bytes"],
        "steps": steps,
        "samples": num_samples,
        "train_seconds": round(trained - started, 1),
        "loss_first": first["loss"],
        "loss_last": last["loss"],
        "model_path": str(result.model_path),
    }

    def acc(a):
        return "" if a is None else f", class acc {100 * a:4.1f}%"

    log(
        f"  FP32     FID-FMNIST {fp_row['fid']:6.2f}{acc(fp_row.get('class_acc'))}, "
        f"{sizes['fp32_bytes'] / 1e6:5.2f} MB in float32 (the shipped file: float16, {fp_bytes / 1e6:.2f} MB)"
    )
    log(
        f"  ternary  FID-FMNIST {fid:6.2f} (x{fid / fp_row['fid']:.2f}){acc(row['class_acc'])}, "
        f"{ternary_bytes / 1e6:5.2f} MB ({sizes['vs_fp32']:.1f}x smaller than float32, "
        f"{sizes['vs_bf16']:.1f}x than 16-bit: block linears at 2 bits, embedders and final layer in float)"
    )
    log(
        f"  distillation loss {first['loss']:.4f} -> {last['loss']:.4f} in {trained - started:.0f} s; "
        f"{num_samples} images, DDIM-10, no guidance, as the PTQ rows; a short run: the ablation "
        "(scripts/ternary_ablation.py, README) trains far longer"
    )
    log(f"  wrote {result.model_path} (sample it: ditq sample --model {result.model_path} --out grid.png)")
    return row


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
