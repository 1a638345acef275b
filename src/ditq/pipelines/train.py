"""``ditq train`` as a Python call: a :class:`~ditq.train.config.TrainRun` in, a trained model out.

:func:`run_training` builds the data and the model the run describes, trains
with :func:`ditq.train.loop.fit`, and writes into the run's output folder::

    OUT/config.yaml                   the run, as resolved (flags applied)
    OUT/log.jsonl                     one JSON record per log interval
    OUT/checkpoints/step_XXXXXXX.pt   training states (the last K), to resume from
    OUT/model.safetensors             the EMA weights as a ditq checkpoint (at the end)

``resume=True`` continues from the newest training state exactly (same
parameters, EMA and data order as an uninterrupted run).

Under ``torchrun --nproc_per_node=K`` the same call trains on K processes
(:func:`ditq.train.distributed.init_distributed` starts the process group
from the environment, and destroys it at the end): ``optim.batch_size`` is
the global batch, ``distributed.strategy`` picks DDP or FSDP2, rank 0 writes
everything and every rank reads the checkpoint it resumes from. A run
resumes under another number of processes too (same data order and noise).
"""

from __future__ import annotations

import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.data import Dataset

from ditq.errors import DitqError
from ditq.models import DiTConfig, build_model, config_from_dict, get_config, save
from ditq.train.checkpoint import CheckpointDir
from ditq.train.config import ConfigError, DataSpec, ModelSpec, TrainRun
from ditq.train.distributed import agree, init_distributed
from ditq.train.loop import fit

CONFIG_FILE = "config.yaml"
LOG_FILE = "log.jsonl"
CHECKPOINT_DIR = "checkpoints"
MODEL_FILE = "model.safetensors"


@dataclass
class TrainResult:
    """What :func:`run_training` did and wrote."""

    out_dir: Path
    model_path: Path
    log_path: Path
    checkpoint_dir: Path
    last_checkpoint: Path | None
    model_config: DiTConfig
    start_step: int  # > 0 after a resume
    steps: int
    seconds: float
    records: list[dict] = field(default_factory=list)


@dataclass
class TrainData:
    """The data of a run: tensors or a Dataset, with what the model needs to know about it."""

    data: tuple[torch.Tensor, torch.Tensor] | Dataset
    num_classes: int
    channels: int
    image_size: int
    description: str
    class_names: list[str] | None = None
    vae: str | None = None  # latents: the VAE that encoded them (and decodes samples)


def load_data(spec: DataSpec, seed: int = 0, warn: Callable[[str], None] | None = None) -> TrainData:
    """Build the data a :class:`DataSpec` describes (one-line errors for missing paths)."""
    size, channels = spec.image_size, spec.num_channels
    if spec.kind == "synthetic":
        from ditq.data import SYNTHETIC_CLASSES, load_synthetic_dataset

        images, labels = load_synthetic_dataset(spec.num_samples, size, channels, seed=seed)
        desc = f"synthetic shapes ({len(images)} images, {size}x{size}, {channels} channel(s))"
        return TrainData(
            (images, labels), len(SYNTHETIC_CLASSES), channels, size, desc, list(SYNTHETIC_CLASSES)
        )
    path = Path(spec.path)
    if not path.exists():
        raise ConfigError(f"data.path not found: {path}")
    if spec.kind == "latents":
        from ditq.data import LatentDataset

        ds = LatentDataset(path, random_flip=spec.random_flip, seed=seed)
        c, side = ds.latent_channels, ds.latent_size
        desc = (
            f"latents {path} ({len(ds)} items, {c}x{side}x{side} from {ds.image_size}px images via "
            f"{ds.vae}{', flipped at random' if ds.flip else ''})"
        )
        return TrainData(ds, ds.num_classes, c, side, desc, ds.classes, vae=ds.vae)
    if spec.kind == "idx":
        from ditq.data import load_idx_dataset

        images, labels = load_idx_dataset(path, spec.split, size)
        desc = f"idx {path} {spec.split} ({len(images)} images, {size}x{size}, 1 channel)"
        return TrainData((images, labels), int(labels.max()) + 1, 1, size, desc)
    from ditq.data import ImageFolderDataset

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dataset = ImageFolderDataset(path, size, channels=channels, random_flip=spec.random_flip, seed=seed)
    for w in caught:
        (warn or _stderr)(f"warning: {w.message}")
    desc = (
        f"image folder {path} ({len(dataset)} images, {len(dataset.classes)} classes, "
        f"center-cropped to {size}x{size}{', random flips' if spec.random_flip else ''})"
    )
    return TrainData(dataset, len(dataset.classes), channels, size, desc, list(dataset.classes))


def resolve_model_config(spec: ModelSpec, data: TrainData) -> DiTConfig:
    """The model config of a run: registry name + overrides (or a full config), fitted to the data.

    ``input_size``, ``in_channels`` and ``num_classes`` follow the data unless
    given; given ones must agree with it (``num_classes`` may be larger).
    """
    try:
        if spec.config is not None:
            config = config_from_dict(spec.config)
            given = set(spec.config)
        else:
            config = get_config(spec.name, **spec.overrides)
            given = set(spec.overrides)
    except TypeError as e:
        raise ConfigError(f"model: {e}") from None
    fitted = {"input_size": data.image_size, "in_channels": data.channels, "num_classes": data.num_classes}
    for key, value in fitted.items():
        if key not in given:
            setattr(config, key, value)
        elif key == "num_classes" and getattr(config, key) < value:
            raise ConfigError(f"model num_classes is {config.num_classes} but the data has {value} classes")
        elif key != "num_classes" and getattr(config, key) != value:
            raise ConfigError(
                f"model {key} is {getattr(config, key)} but the data gives {value}; drop it from the model "
                "config (it follows the data) or change the data"
            )
    config.validate()
    return config


def run_training(
    run: TrainRun,
    *,
    resume: bool = False,
    command: str | None = None,
    progress: bool = False,
    log: Callable[[str], None] = print,
    warn: Callable[[str], None] | None = None,
    on_log: Callable[[dict], None] | None = None,
) -> TrainResult:
    """Train the model ``run`` describes; write config, log, checkpoints and the EMA model to ``run.out``.

    Without ``resume``, an output folder that already holds a run is an error
    (so nothing is overwritten by accident). ``log`` receives one line per
    thing done; ``on_log`` each training log record; ``command`` is stored in
    the model's metadata.
    """
    from ditq.common import resolve_device

    run.validate()
    started = time.perf_counter()
    ctx = init_distributed(
        resolve_device(run.device), backend=run.distributed.backend, timeout_s=run.distributed.timeout_s
    )
    try:
        return _run_training(
            run,
            ctx,
            started,
            resume=resume,
            command=command,
            progress=progress,
            log=log,
            warn=warn,
            on_log=on_log,
        )
    finally:
        ctx.close()


def _run_training(run, ctx, started, *, resume, command, progress, log, warn, on_log) -> TrainResult:
    main, device = ctx.is_main, ctx.device
    out = Path(run.out)
    log_path, ckpt_dir, model_path = out / LOG_FILE, out / CHECKPOINT_DIR, out / MODEL_FILE
    store = CheckpointDir(ckpt_dir, keep_last=run.checkpoint.keep_last)
    existing = store.list()
    taken = not resume and bool(existing or log_path.exists() or model_path.exists())
    # Every process looks before rank 0 writes anything, and all stop if one saw a run there.
    if not agree(not taken, device):
        raise DitqError(
            f"{out} already holds a training run; pass --resume to continue it, or choose another --out"
        )
    cfg = run.train_config()
    if cfg.batch_size % ctx.world_size:
        raise ConfigError(
            f"optim.batch_size {cfg.batch_size} is the global batch and must divide by the "
            f"{ctx.world_size} processes; use a multiple of {ctx.world_size}"
        )

    data = load_data(run.data, seed=run.seed, warn=warn if main else (lambda _: None))
    model_config = resolve_model_config(run.model, data)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(run.seed)
        model = build_model(model_config)
    params = sum(p.numel() for p in model.parameters())

    if main:
        out.mkdir(parents=True, exist_ok=True)
        run.save(out / CONFIG_FILE)
        if resume and existing:
            step, path = existing[-1]
            _truncate_log(log_path, step)
            log(f"resuming from step {step} ({path})")
        elif resume:
            log(f"no checkpoint in {ckpt_dir}; starting from step 0")
            log_path.unlink(missing_ok=True)
        where = str(device)
        if ctx.world_size > 1:
            where = (
                f"{ctx.world_size} processes ({run.distributed.strategy.upper()}, {ctx.backend}, "
                f"{cfg.batch_size // ctx.world_size} each, {device.type})"
            )
        log(
            f"training a {params / 1e6:.2f}M-parameter DiT (depth {model_config.depth}, hidden "
            f"{model_config.hidden_size}, patch {model_config.patch_size}) on {data.description} "
            f"for {cfg.steps} steps of batch {cfg.batch_size}, lr {cfg.lr:g}, seed {run.seed}, on {where}"
        )

    result = fit(
        model,
        data.data,
        cfg,
        device=device,
        store=store,
        save_every=run.checkpoint.every,
        resume=resume,
        log_path=log_path,
        on_log=on_log,
        num_workers=run.data.num_workers,
        progress=progress,
        state_extra={"run": run.to_dict(), "model_config": model_config.to_dict()},
        strategy=run.distributed.strategy,
    )
    error = None
    if main:
        metadata = {
            "weights": f"EMA (decay {cfg.ema_decay})",
            "train_steps": result.step,
            "data": data.description,
            "train_run": run.to_dict(),
        }
        if data.class_names is not None:
            metadata["class_names"] = data.class_names
        if data.vae is not None:
            metadata["vae"] = data.vae
        try:
            save(result.ema, model_path, command=command, extra_metadata=metadata)
        except Exception as e:  # noqa: BLE001 (re-raised below, after telling the other ranks)
            error = e
        else:
            log(f"wrote {model_path} (EMA weights), log {log_path}, checkpoints in {ckpt_dir}")
    if not agree(error is None, device):
        raise error or DitqError(f"rank 0 could not write {model_path} (see its error)")
    return TrainResult(
        out_dir=out,
        model_path=model_path,
        log_path=log_path,
        checkpoint_dir=ckpt_dir,
        last_checkpoint=result.last_checkpoint,
        model_config=model_config,
        start_step=result.start_step,
        steps=result.step,
        seconds=time.perf_counter() - started,
        records=result.records,
    )


def _truncate_log(log_path: Path, step: int) -> None:
    """Drop log records past ``step``: the resumed run writes them again."""
    import json

    from ditq.checkpoint import atomic_write

    if not log_path.exists():
        return
    kept = []
    for line in log_path.read_text().splitlines():
        try:
            if json.loads(line).get("step", 0) <= step:
                kept.append(line)
        except ValueError:  # a line cut off by a kill
            continue
    with atomic_write(log_path) as tmp:
        tmp.write_text("".join(line + "\n" for line in kept))


def _stderr(message: str) -> None:
    print(message, file=sys.stderr)


__all__ = [
    "TrainData",
    "TrainResult",
    "load_data",
    "resolve_model_config",
    "run_training",
]
