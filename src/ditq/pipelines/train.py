"""``ditq train`` as a Python call: a :class:`~ditq.train.config.TrainRun` in, a trained model out.

:func:`run_training` builds the data and the model the run describes, trains
with :func:`ditq.train.loop.fit`, and writes into the run's output folder::

    OUT/config.yaml                   the run, as resolved (flags applied)
    OUT/log.jsonl                     one JSON record per log interval
    OUT/checkpoints/step_XXXXXXX.pt   training states (the last K), to resume from
    OUT/model.safetensors             the final weights as a ditq checkpoint: the EMA, or for ternary
                                      QAT the raw weights (``checkpoint.export``)

``resume=True`` continues from the newest training state exactly (same
parameters, EMA and data order as an uninterrupted run).

Three ways to start, and quantization-aware training on top of any:

- from scratch (the registry init, seeded);
- ``init: {from: NAME_OR_PATH}``: full-precision weights (anything
  :func:`ditq.load` takes) loaded into the model before anything else
  (fine-tuning); TerDiT's adaLN RMSNorm gains, which a float model lacks, start
  at the RMS of the float adaLN outputs (``adaln_gain: rms``, see
  :func:`adaln_rms_gains_`; with gains of 1, ``adaln_gain: one``, a ternary
  student of ditq-fmnist starts with 13x the distillation loss);
- ``data: {kind: distill, teacher: ...}``: no dataset; the student learns the
  teacher's outputs on the teacher's own samples (:mod:`ditq.train.distill`).

With ``quant: {method: ternary, ...}`` the model is then prepared
(:class:`~ditq.quant.TernaryQATConfig`, step ``prepare``) before the optimizer
is built, so the latent weights and each layer's α train; EMA and training
states hold that QAT state (``--resume`` continues it exactly), and
``OUT/model.safetensors`` holds the *converted* raw weights (``checkpoint.export:
auto``; ``ema`` for the EMA, see :class:`~ditq.train.config.CheckpointSpec` for why
not by default): packed 2-bit weights (:mod:`ditq.formats.ternary`), loadable by
:func:`ditq.load` and ``ditq sample``. ``ditq export RUN
--weights ema|model`` converts either from a training state.

Under ``torchrun --nproc_per_node=K`` the same call trains on K processes
(:func:`ditq.distributed.init_distributed` starts the process group
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
from torch import nn
from torch.utils.data import Dataset

from ditq.distributed import agree, held_by_rank0, init_distributed
from ditq.errors import CheckpointError, DitqError, InvalidArgumentError, StoppedBySignal
from ditq.formats.ditq_float import write as save
from ditq.models import build_model, config_from_dict, get_config
from ditq.models.registry import ModelConfig
from ditq.preemption import StopSignals
from ditq.runlock import RunLock
from ditq.train.checkpoint import CheckpointDir
from ditq.train.config import ConfigError, DataSpec, ModelSpec, QuantSpec, TrainRun
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
    model_config: ModelConfig
    start_step: int  # > 0 after a resume
    steps: int
    seconds: float
    records: list[dict] = field(default_factory=list)


@dataclass
class TrainData:
    """The data of a run: tensors or a Dataset, with what the model needs to know about it.

    For distillation ``data`` is None and ``teacher`` the model whose samples
    (made on the training device, see :mod:`ditq.train.distill`) are the data.
    """

    data: tuple[torch.Tensor, torch.Tensor] | Dataset | None
    num_classes: int
    channels: int
    image_size: int
    description: str
    class_names: list[str] | None = None
    vae: str | None = None  # latents: the VAE that encoded them (and decodes samples)
    teacher: nn.Module | None = None  # distill: the frozen full-precision teacher
    source: str = "the data"  # what the model's input size, channels and classes follow (messages)


def load_data(spec: DataSpec, seed: int = 0, warn: Callable[[str], None] | None = None) -> TrainData:
    """Build the data a :class:`DataSpec` describes (one-line errors for missing paths)."""
    size, channels = spec.image_size, spec.num_channels
    if spec.kind == "distill":
        from ditq.train.distill import load_teacher

        teacher = load_teacher(spec.teacher)
        c = teacher.config
        renew = f"a new one every {spec.pool_refresh} steps" if spec.pool_refresh else "one for the run"
        desc = (
            f"data-free distillation from {spec.teacher} (a pool of {spec.pool_size} teacher samples, "
            f"DDIM-{spec.pool_steps}, {renew})"
        )
        return TrainData(
            None,
            c.num_classes,
            c.in_channels,
            c.input_size,
            desc,
            teacher=teacher,
            source=f"teacher {spec.teacher}",
        )
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


def resolve_model_config(spec: ModelSpec, data: TrainData, quant: QuantSpec | None = None) -> ModelConfig:
    """The model config of a run: registry name + overrides (or a full config), fitted to the data.

    ``input_size``, ``in_channels`` and ``num_classes`` follow the data unless
    given; given ones must agree with it (``num_classes`` may be larger, but
    not for a teacher). ``quant.adaln_norm`` (unless null) sets ``adaln_norm``.
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
        elif key == "num_classes" and data.teacher is None and getattr(config, key) < value:
            raise ConfigError(f"model num_classes is {config.num_classes} but the data has {value} classes")
        elif (key != "num_classes" or data.teacher is not None) and getattr(config, key) != value:
            what = "teacher" if data.teacher is not None else "data"
            raise ConfigError(
                f"model {key} is {getattr(config, key)} but {data.source} gives {value}; drop it from the "
                f"model config (it follows {data.source}) or change the {what}"
            )
    if quant is not None and quant.adaln_norm is not None:
        config.adaln_norm = quant.adaln_norm
    try:
        config.validate()
    except InvalidArgumentError as e:
        raise ConfigError(f"model: {e}") from None
    return config


def init_from(
    model: nn.Module, source: str, log: Callable[[str], None] | None = None, *, adaln_gain: str = "rms"
) -> None:
    """Load full-precision weights (anything :func:`ditq.load` takes) into ``model``, a float model.

    The source's config must be ``model``'s but for ``adaln_norm`` and
    ``class_dropout_prob``. The adaLN RMSNorm gains ``model`` has and the
    source lacks start at 1 (``adaln_gain="one"``) or, by default (``"rms"``),
    at the mean RMS of each block's adaLN outputs (see :func:`adaln_rms_gains_`).
    """
    from ditq.formats import load

    try:
        loaded = load(source)
    except CheckpointError as e:
        raise CheckpointError(f"init.from: {e}") from None
    if any(not isinstance(p, torch.Tensor) or p.dtype == torch.uint8 for p in loaded.state_dict().values()):
        raise ConfigError(f"init.from {source} is not a full-precision model (it holds packed weights)")
    mine, theirs = model.config.to_dict(), loaded.config.to_dict()
    ignored = ("adaln_norm", "class_dropout_prob")
    diff = [
        f"{k} {theirs.get(k)!r} (run: {mine.get(k)!r})"
        for k in sorted(set(mine) | set(theirs))
        if k not in ignored and mine.get(k) != theirs.get(k)
    ]
    if diff:
        raise ConfigError(
            f"init.from {source} is another model: {', '.join(diff[:4])}; make the model section match it"
        )
    state = loaded.state_dict()
    own = model.state_dict()
    # TerDiT's RMSNorm after each adaLN linear (adaLN_modulation.2) is all a float model may lack.
    norms = {k for k in own if k not in state and k.endswith("adaLN_modulation.2.weight")}
    missing = [k for k in own if k not in state and k not in norms]
    unexpected = [k for k in state if k not in own]
    shapes = [k for k in state if k in own and state[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        what = "; ".join(
            f"{label} {', '.join(keys[:3])}"
            for label, keys in (("missing", missing), ("unexpected", unexpected), ("other shapes", shapes))
            if keys
        )
        raise ConfigError(f"init.from {source} does not fit the run's model: {what}")
    with torch.no_grad():
        for k, v in state.items():
            own[k].copy_(v)
    fresh = ""
    if norms and adaln_gain == "rms":
        gains = adaln_rms_gains_(model, {k.removesuffix(".weight") for k in norms})
        fresh = (
            f"; {len(norms)} new adaLN RMSNorm gains start at the float outputs' RMS ({_few_floats(gains)})"
        )
    elif norms:
        fresh = f"; {len(norms)} new adaLN RMSNorm gains start at 1"
    if log is not None:
        log(f"init: full-precision weights from {source}{fresh}")


@torch.no_grad()
def adaln_rms_gains_(model: nn.Module, norms: set[str], num_conditions: int = 256) -> list[float]:
    """Set each named adaLN RMSNorm's gain to the mean RMS of what it normalizes; returns the gains.

    An RMSNorm put after a trained adaLN linear (TerDiT's change) rescales
    every output vector to RMS 1 times the gain; the float model's vectors have
    RMS well below 1 (shift, scale and gate are small), so gains of 1 start the
    blocks far from the float model. The RMS of a block's adaLN output varies
    little with the condition, so its mean over ``num_conditions`` conditions
    (timesteps evenly over [0, 1000), labels cycling through every class and
    the null label) restores the float model's scale. Data-free: the
    conditions go through the model's own timestep and label embedders.
    """
    n = num_conditions
    t = torch.arange(n) * 1000 // n
    rows = model.y_embedder.embedding_table.num_embeddings  # classes, plus the null label if any
    y = torch.arange(n) % rows
    c = model.t_embedder(t) + model.y_embedder(y, False)  # (n, cond)
    gains = []
    for name in sorted(norms, key=_natural):
        modulation = model.get_submodule(name.rpartition(".")[0])  # the Sequential(SiLU, Linear, RMSNorm)
        out = modulation[:-1](c).float()  # (n, 6D): what the norm sees
        rms = float(out.pow(2).mean(-1).sqrt().mean())
        if rms > 0:  # all-zero adaLN linears (adaLN-Zero, untrained) have no scale to keep
            modulation[-1].weight.fill_(rms)
        gains.append(rms)
    return gains


def _natural(name: str) -> list:
    return [int(p) if p.isdigit() else p for p in name.split(".")]


def _few_floats(values: list[float], n: int = 3) -> str:
    shown = ", ".join(f"{v:.3g}" for v in values[:n])
    return shown + (", ..." if len(values) > n else "")


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
    """Train the model ``run`` describes; write config, log, checkpoints and the final model to ``run.out``.

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
    out = Path(run.out)
    # One process (one torchrun job) per run folder.
    with held_by_rank0(RunLock(out, "training run", log=log), ctx):
        return _train_locked(run, ctx, started, out, resume=resume, command=command, progress=progress,
                             log=log, warn=warn, on_log=on_log)  # fmt: skip


def _train_locked(run, ctx, started, out, *, resume, command, progress, log, warn, on_log) -> TrainResult:
    main, device = ctx.is_main, ctx.device
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
    model_config = resolve_model_config(run.model, data, run.quant)
    if data.teacher is not None:
        from ditq.train.distill import check_teacher

        try:
            check_teacher(data.teacher.config, model_config, run.data.teacher)
        except InvalidArgumentError as e:
            raise ConfigError(str(e)) from None
    resuming = resume and bool(existing)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(run.seed)
        model = build_model(model_config)
        params = sum(p.numel() for p in model.parameters())
        # A resumed run's weights come from its state: the init weights would be overwritten at once.
        if run.init is not None and not resuming:
            init_from(model, run.init.from_, log if main else None, adaln_gain=run.init.adaln_gain)
        qconfig = None
        if run.quant is not None:
            from ditq import quant

            qconfig = run.quant.ternary_config("prepare")
            try:
                quant.quantize_(model, qconfig)
            except InvalidArgumentError as e:
                raise ConfigError(f"quant: {e}") from None

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
            f"training a {params / 1e6:.2f}M-parameter {_model_words(model_config)}"
            f"{_quant_words(run.quant, model)} on {data.description} for {cfg.steps} steps of batch "
            f"{cfg.batch_size}, lr {cfg.lr:g}, seed {run.seed}, on {where}"
        )

    train_data, loss_fn = data.data, None
    if data.teacher is not None:
        from ditq.train.distill import TeacherPool

        spec = run.data
        pool = TeacherPool(
            data.teacher, size=spec.pool_size, steps=spec.pool_steps, refresh=spec.pool_refresh,
            cfg_scale=spec.pool_cfg_scale, seed=run.seed, device=device, autocast_dtype=_autocast(cfg),
            log=log if main else None,
        )  # fmt: skip
        train_data, loss_fn = pool, pool.loss
    extra = {"run": run.to_dict(), "model_config": model_config.to_dict()}
    if qconfig is not None:
        extra["quant_config"] = qconfig.to_dict()
    with StopSignals() as stop:
        result = fit(
            model,
            train_data,
            cfg,
            device=device,
            store=store,
            save_every=run.checkpoint.every,
            resume=resume,
            log_path=log_path,
            on_log=on_log,
            num_workers=run.data.num_workers,
            progress=progress,
            state_extra=extra,
            strategy=run.distributed.strategy,
            loss_fn=loss_fn,
            stop=stop,
        )
    if result.stopped_by is not None:  # the state at result.step is saved; the final model is not written
        again = command if command and "--resume" in command.split() else None
        again = again or (f"{command} --resume" if command else f"ditq train --resume --out {out}")
        raise StoppedBySignal(
            f"stopped at step {result.step} of {cfg.steps} by {result.stopped_by}; its state is "
            f"{result.last_checkpoint}; resume with: {again}"
        )
    error = None
    if main:
        use_ema = run.checkpoint.weights_to_export(quantized=qconfig is not None) == "ema"
        weights = f"EMA (decay {cfg.ema_decay})" if use_ema else "raw (the online weights, not the EMA)"
        final = result.ema if use_ema else result.model
        metadata = {
            "weights": weights,
            "train_steps": result.step,
            "data": data.description,
            "train_run": run.to_dict(),
        }
        if data.class_names is not None:
            metadata["class_names"] = data.class_names
        if data.vae is not None:
            metadata["vae"] = data.vae
        try:
            if qconfig is None:
                save(final, model_path, command=command, extra_metadata=metadata)
            else:  # converted: packed 2-bit weights; the QAT state stays in the training states
                from ditq.pipelines.qat import export_model

                metadata["weights"] += ", ternary (converted)"
                export_model(final, model_path, qconfig, command=command, extra_metadata=metadata)
        except Exception as e:  # noqa: BLE001 (re-raised below, after telling the other ranks)
            error = e
        else:
            what = (
                ("EMA" if use_ema else "raw")
                + " weights"
                + ("" if qconfig is None else ", ternary, packed 2 bits each")
            )
            log(f"wrote {model_path} ({what}), log {log_path}, checkpoints in {ckpt_dir}")
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


def _model_words(config) -> str:
    if config.arch == "large-dit":
        return f"Large-DiT (depth {config.n_layers}, dim {config.dim}, patch {config.patch_size})"
    return f"DiT (depth {config.depth}, hidden {config.hidden_size}, patch {config.patch_size})"


def _quant_words(spec: QuantSpec | None, model: nn.Module) -> str:
    if spec is None:
        return ""
    from ditq.quant import ternary_layers

    acts = "" if spec.act_bits is None else f", int{spec.act_bits} activations"
    return f", ternary QAT ({len(ternary_layers(model))} layers, scale {spec.scale}{acts})"


def _autocast(cfg) -> torch.dtype | None:
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[cfg.precision]


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
    with atomic_write(log_path, "training log") as tmp:
        tmp.write_text("".join(line + "\n" for line in kept))


def _stderr(message: str) -> None:
    print(message, file=sys.stderr)


__all__ = [
    "TrainData",
    "TrainResult",
    "adaln_rms_gains_",
    "init_from",
    "load_data",
    "resolve_model_config",
    "run_training",
]
