"""The training loop: AdamW, LR schedule, EMA, hybrid diffusion loss, logging, exact resume.

:func:`fit` is the loop. Data is either in memory (an ``(images, labels)``
pair of tensors, as Fashion-MNIST and the synthetic shapes are), a
``torch.utils.data.Dataset`` read through a DataLoader (image folders,
pre-extracted latents), or a :class:`StepData` that makes each step's batch
itself (the teacher's sample pool of data-free distillation,
:mod:`ditq.train.distill`). All read in the order of a
:class:`~ditq.train.sampler.ResumableSampler`, so a run is a function of its
seed, and the training state (model, EMA, optimizer, step, RNG states, data
cursor, see :mod:`ditq.train.resume`) saved every ``save_every`` steps lets a
resumed run continue bit for bit where the saved one was.

Randomness is a function of the *global* sample position, not of the
process: at every step one generator, seeded from ``(seed, step)``, draws
the timesteps, the noise and the label-dropout coins of the whole global
batch, and each process keeps its slice (the same slice of keys the sampler
gave it). So ranks draw different noise, a run on K processes sees exactly
the samples and noise a single process with the same global batch sees
(equal up to float rounding), and resuming needs no generator state. The
model's own classifier-free-guidance label dropout (DiT's ``LabelEmbedder``)
is drawn here for the same reason (see :class:`_LabelDrop`); anything else a
model draws itself comes from the global RNG, seeded ``seed + rank``.

Under ``torchrun`` (see :mod:`ditq.distributed`) the model is wrapped
in DDP, or sharded with FSDP2 (``strategy="fsdp"``); ``cfg.batch_size`` is
the global batch, split evenly. The EMA is kept on every process: with DDP
the weights are identical everywhere, so every process's EMA is too; with
FSDP the EMA is sharded like the model and each process averages its own
shard. Rank 0 logs and writes checkpoints (full, unsharded state dicts in
every case), the others wait for it; every process reads the checkpoint it
resumes from.
"""

from __future__ import annotations

import copy
import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ditq import distributed as dist
from ditq.checkpoint import output_error
from ditq.diffusion import create_diffusion
from ditq.distributed import STRATEGIES, get_rank, get_world_size, is_main_process
from ditq.errors import DitqError, InvalidArgumentError
from ditq.preemption import StopSignals
from ditq.train.checkpoint import StateStore
from ditq.train.ema import make_ema, update_ema
from ditq.train.resume import RunState
from ditq.train.sampler import ResumableSampler

PRECISIONS = ("fp32", "bf16", "fp16")


@dataclass
class TrainConfig:
    """Optimization settings (the model and data are passed separately)."""

    steps: int = 1000
    batch_size: int = 128  # global: split evenly over the processes of a distributed run
    lr: float = 1e-4
    weight_decay: float = 0.0
    warmup_steps: int = 0
    decay_at: float = 1.0  # fraction of training after which the LR is multiplied by decay_factor
    decay_factor: float = 0.1
    ema_decay: float = 0.9999
    grad_clip: float = 0.0  # 0 = off
    precision: str = "fp32"  # fp32 | bf16 | fp16 (autocast; CUDA only for the latter two)
    compile: bool = False
    log_every: int = 100
    seed: int = 0

    def validate(self) -> None:
        """Raise a one-line :class:`InvalidArgumentError` for a value that cannot train."""
        checks = [
            ("steps", self.steps >= 1, "must be at least 1"),
            ("batch_size", self.batch_size >= 1, "must be at least 1"),
            ("lr", self.lr > 0 and math.isfinite(self.lr), "must be positive"),
            ("weight_decay", self.weight_decay >= 0, "must be >= 0"),
            ("warmup_steps", self.warmup_steps >= 0, "must be >= 0"),
            ("decay_at", 0 <= self.decay_at <= 1, "must be in [0, 1]"),
            ("decay_factor", self.decay_factor > 0, "must be positive"),
            ("ema_decay", 0 <= self.ema_decay <= 1, "must be in [0, 1]"),
            ("grad_clip", self.grad_clip >= 0, "must be >= 0 (0 = off)"),
            ("precision", self.precision in PRECISIONS, f"must be one of {', '.join(PRECISIONS)}"),
            ("log_every", self.log_every >= 1, "must be at least 1"),
        ]
        for name, ok, why in checks:
            if not ok:
                raise InvalidArgumentError(f"{name} {why}, got {getattr(self, name)!r}")


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up, constant, then one step decay at ``decay_at`` of training."""
    lr = cfg.lr * min(1.0, (step + 1) / cfg.warmup_steps) if cfg.warmup_steps > 0 else cfg.lr
    if step >= math.floor(cfg.decay_at * cfg.steps):
        lr *= cfg.decay_factor
    return lr


@dataclass
class FitResult:
    """What :func:`fit` returns: the trained model (eval mode), its EMA, the log records."""

    model: nn.Module
    ema: nn.Module
    records: list[dict] = field(default_factory=list)
    start_step: int = 0  # where this call started (> 0 after a resume)
    step: int = 0  # where it ended (cfg.steps)
    resumed_from: Path | None = None
    last_checkpoint: Path | None = None
    stopped_by: str | None = None  # the signal that stopped the run early (see ditq.preemption), or None


class StepData(Protocol):
    """Data made per step (not a Dataset): ``len()`` items, and ``batch(step, keys) -> (x, y)``.

    ``keys`` are this process's sampler keys (``epoch * len + index``) for
    ``step``; the batch must be a function of ``(step, keys)`` alone, so a
    resumed run sees what the uninterrupted one saw. ``x`` and ``y`` are on the
    training device.
    """

    def __len__(self) -> int: ...

    def batch(self, step: int, keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...


LossFn = Callable[..., torch.Tensor]
"""``loss_fn(forward, diffusion, x, t, y, noise) -> scalar loss``, in place of the hybrid diffusion loss."""

Data = tuple[torch.Tensor, torch.Tensor] | Dataset | StepData


def _is_step_data(data) -> bool:
    return not isinstance(data, (Dataset, tuple, list)) and callable(getattr(data, "batch", None))


def diffusion_loss(forward, diffusion, x, t, y, noise) -> torch.Tensor:
    """The default objective: DiT's hybrid loss (MSE on ε + the VB term), batch mean."""
    return diffusion.training_losses(forward, x, t, model_kwargs={"y": y}, noise=noise)["loss"].mean()


def fit(
    model: nn.Module,
    data: Data,
    cfg: TrainConfig,
    *,
    device: str | torch.device = "cpu",
    store: StateStore | None = None,
    save_every: int = 0,
    resume: bool = False,
    log_path: str | Path | None = None,
    on_log: Callable[[dict], None] | None = None,
    num_workers: int = 0,
    progress: bool = False,
    state_extra: dict | None = None,
    strategy: str = "ddp",
    loss_fn: LossFn | None = None,
    stop: StopSignals | None = None,
) -> FitResult:
    """Train ``model`` on ``data`` (images or latents, with labels) for ``cfg.steps`` steps.

    ``data`` is ``(images, labels)`` tensors (moved to ``device`` whole), a
    Dataset of ``(image, label)`` items, read by a DataLoader with
    ``num_workers`` workers, or a :class:`StepData`. ``loss_fn`` replaces the
    hybrid diffusion loss (:func:`diffusion_loss`); it runs under the
    precision's autocast. A Dataset with ``epoch_keys = True`` is indexed
    with the sampler's keys (``epoch * len + index``, for per-epoch
    augmentation); any other with plain indices. With a ``store``, the training state is saved
    every ``save_every`` steps (0: only at the end) and at the end; with
    ``resume``, a run finding a state there continues from it. ``state_extra``
    (JSON-like, e.g. the run config) is saved in every state under ``"config"``;
    when it has a ``"model_config"``, resuming checks that the state has the same.

    In a distributed run (a process group is initialized, see
    :mod:`ditq.distributed`), ``cfg.batch_size`` is the global batch and
    must divide by the number of processes; ``strategy`` is ``"ddp"`` or
    ``"fsdp"`` (FSDP2; ignored by a single process). Every process must call
    ``fit`` with the same arguments. The returned model and EMA are plain
    (unwrapped, unsharded) modules, except under FSDP on ranks other than 0,
    which get their sharded modules.

    With ``stop`` (a :class:`~ditq.preemption.StopSignals` in force), a SIGTERM, SIGINT or SIGUSR1
    ends the run after the step it arrives in: the state is saved to ``store`` at that step (every
    rank agrees on it), and the result says ``stopped_by``; ``resume`` continues from there to the
    same numbers as a run that was never stopped.

    Every ``cfg.log_every`` steps a record (step, mean loss over all
    processes, grad norm, lr, images/s, elapsed s) goes to ``log_path`` (JSON
    lines, appended) and ``on_log``, on rank 0. A non-finite loss or gradient
    stops the run with a :class:`DitqError` before anything more is saved, so
    the last checkpoint in ``store`` is the last good one.
    """
    cfg.validate()
    device = torch.device(device)
    dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[cfg.precision]
    if dtype is not None and device.type != "cuda":
        raise DitqError(
            f"precision {cfg.precision} needs a CUDA device; use --precision fp32 on {device.type}"
        )
    if strategy not in STRATEGIES:
        raise InvalidArgumentError(f"strategy must be one of {', '.join(STRATEGIES)}, got {strategy!r}")
    main, rank, world_size = is_main_process(), get_rank(), get_world_size()
    if cfg.batch_size % world_size:
        raise InvalidArgumentError(
            f"batch_size {cfg.batch_size} (the global batch) does not divide by the {world_size} processes; "
            f"use a multiple of {world_size}"
        )
    local_batch = cfg.batch_size // world_size
    fsdp = strategy == "fsdp" and world_size > 1
    if fsdp and cfg.precision == "fp16":
        raise InvalidArgumentError("precision fp16 (a loss scaler) is not supported with FSDP; use bf16")
    # The global RNG serves only what a model draws itself (not the noise, see the module doc).
    torch.manual_seed(cfg.seed + rank)

    stepwise = _is_step_data(data)
    in_memory = not stepwise and not isinstance(data, Dataset)
    if stepwise:
        num_items = len(data)
    elif in_memory:
        images, labels = data
        if len(images) != len(labels) or len(images) == 0:
            raise DitqError(f"need as many labels as images (got {len(images)} images, {len(labels)} labels)")
        data = images.to(device), labels.to(device)
        num_items = len(images)
    else:
        num_items = len(data)
    sampler = ResumableSampler(num_items, local_batch, seed=cfg.seed, rank=rank, world_size=world_size)

    # Weightless, made before the model moves: to rebuild full modules from FSDP's shards at the end.
    template = dist.meta_copy(model) if fsdp and main else None
    model = model.to(device).train()
    dist.broadcast_module_(model)  # DDP would do it; FSDP shards each process's own copy
    ema = make_ema(model)
    label_drop = _LabelDrop.take_over(model)  # after make_ema: the EMA keeps its settings
    if fsdp:
        dist.shard_fsdp([model, ema], device)
        wrapped = model
    elif world_size > 1:
        wrapped = dist.wrap_ddp(model, device)
    else:
        wrapped = model
    diffusion = create_diffusion("")
    opt = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=cfg.lr, weight_decay=cfg.weight_decay
    )
    forward = torch.compile(wrapped) if cfg.compile else wrapped
    scaler = torch.amp.GradScaler("cuda") if cfg.precision == "fp16" else None
    noise_gen = _StepNoise(cfg.seed, device)
    run = RunState(model, ema, opt, sampler, scaler, device, fsdp, state_extra)
    run.forward, run.diffusion, run.noise, run.label_drop = forward, diffusion, noise_gen, label_drop
    run.loss_fn = loss_fn or diffusion_loss

    result = FitResult(model, ema)
    try:
        if resume and store is not None:
            start, path = run.resume(store)
            if path is not None:
                result.start_step, result.resumed_from, result.last_checkpoint = start, path, path
        result.records = _steps(
            run,
            data,
            cfg,
            result,
            store=store,
            save_every=save_every,
            log_path=log_path,
            on_log=on_log,
            num_workers=num_workers,
            progress=progress,
            stop=stop,
        )
    finally:
        if label_drop is not None:
            label_drop.restore()
    if result.stopped_by is None:
        result.step = max(result.start_step, cfg.steps)
    if fsdp:
        model_state, ema_state = dist.fsdp_model_state(model), dist.fsdp_model_state(ema)
        if main:
            result.model = dist.unsharded(copy.deepcopy(template), model_state)
            result.ema = dist.unsharded(template, ema_state).requires_grad_(False)
    result.model.eval()
    result.ema.eval()
    return result


def _steps(
    run, data, cfg, result, *, store, save_every, log_path, on_log, num_workers, progress, stop=None
) -> list[dict]:
    """Steps ``result.start_step .. cfg.steps`` of :func:`fit`; returns the log records (rank 0's)."""
    model, ema, opt, scaler = run.model, run.ema, run.opt, run.scaler
    sampler, device = run.sampler, run.device
    forward, diffusion, noise_gen, label_drop = run.forward, run.diffusion, run.noise, run.label_drop
    dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[cfg.precision]
    main, rank, world_size = is_main_process(), get_rank(), get_world_size()
    lo, hi = rank * sampler.batch_size, (rank + 1) * sampler.batch_size  # this process's slice
    start = result.start_step
    stepwise = _is_step_data(data)
    in_memory = not stepwise and not isinstance(data, Dataset)
    batches = None
    if in_memory:
        images, labels = data
        num_items = len(images)
    elif not stepwise:  # a Dataset (StepData makes each step's batch itself)
        loader = DataLoader(
            data if getattr(data, "epoch_keys", False) else _ModuloKeys(data),
            batch_sampler=sampler,
            num_workers=num_workers,
            pin_memory=device.type == "cuda",
            # Its own generator: building the iterator must not draw from the global RNG,
            # or a resumed run's noise would differ from the uninterrupted one's.
            generator=torch.Generator().manual_seed(cfg.seed),
        )
        batches = iter(loader)

    records: list[dict] = []
    log_file = _open_log(log_path) if log_path and main else None
    bar = _progress_bar(start, cfg.steps, enabled=progress and main)
    # Non-finite losses are noted on the device and checked at log and save points
    # only: a per-step check would synchronize the GPU every step.
    bad_step = torch.full((), -1, dtype=torch.long, device=device)
    bad_value = torch.zeros((), device=device)
    t0, seen, loss_sum, n_sum = time.perf_counter(), 0, torch.zeros((), device=device), 0
    try:
        for step in range(start, cfg.steps):
            for group in opt.param_groups:
                group["lr"] = lr_at(step, cfg)
            if stepwise:
                x, y = data.batch(step, sampler.next_keys())
            elif in_memory:
                idx = (sampler.next_keys() % num_items).to(device)
                x, y = images[idx], labels[idx]
            else:
                x, y = next(batches)
                sampler.cursor += sampler.global_batch_size  # the loader reads from a copy
                x = x.to(device, non_blocking=True)
                y = torch.as_tensor(y).to(device, non_blocking=True)
            t, noise, coins = noise_gen.draw(
                step, sampler.global_batch_size, tuple(x.shape[1:]), diffusion.num_timesteps, lo, hi
            )
            if label_drop is not None:
                y = label_drop.apply(y, coins)
            with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                loss = run.loss_fn(forward, diffusion, x, t, y, noise)
            opt.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.unscale_(opt)
            else:
                loss.backward()
            grad_norm = (
                nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                if cfg.grad_clip > 0
                else torch.zeros((), device=device)
            )
            if hasattr(grad_norm, "full_tensor"):  # a replicated DTensor under FSDP
                grad_norm = grad_norm.full_tensor()
            if scaler is not None:
                scaler.step(opt)
                scaler.update()
                finite = torch.isfinite(loss)  # the scaler skips steps with inf/nan gradients itself
            else:
                opt.step()
                finite = torch.isfinite(loss) & torch.isfinite(grad_norm)
            newly_bad = (~finite) & (bad_step < 0)
            bad_step = torch.where(newly_bad, step + 1, bad_step)
            bad_value = torch.where(newly_bad, loss.detach().float(), bad_value)
            update_ema(ema, model, cfg.ema_decay)
            seen += len(x) * world_size
            loss_sum += loss.detach().float()
            n_sum += 1
            done = step + 1
            bar.update(1)
            stopping = stop is not None and done < cfg.steps and stop.should_stop()
            is_log = done % cfg.log_every == 0 or done == cfg.steps
            is_save = store is not None and (
                (save_every and done % save_every == 0) or done == cfg.steps or stopping
            )
            if is_log or is_save:
                _check_finite(bad_step, bad_value, grad_clip=cfg.grad_clip, result=result)
            if is_save:
                result.last_checkpoint = run.save(store, done)
            if is_log:
                mean_loss = float(dist.all_reduce_mean(loss_sum / n_sum))
                elapsed = time.perf_counter() - t0
                rec = {
                    "step": done,
                    "loss": mean_loss,
                    "grad_norm": float(grad_norm),
                    "lr": lr_at(step, cfg),
                    "images_per_s": seen / elapsed,
                    "elapsed_s": elapsed,
                }
                loss_sum.zero_()
                n_sum = 0
                if main:
                    records.append(rec)
                    bar.set_postfix(loss=f"{rec['loss']:.4f}")
                    if log_file:
                        _append(log_file, json.dumps(rec) + "\n", log_path)
                    if on_log:
                        on_log(rec)
            if stopping:
                result.stopped_by, result.step = stop.received, done
                break
    finally:
        bar.close()
        if log_file:
            log_file.close()
        del batches  # shuts down DataLoader workers
    return records


def _open_log(path):
    try:
        return open(path, "a")  # noqa: SIM115 (kept open for the run)
    except OSError as e:
        error = output_error(e, "training log", path)
        if error is None:
            raise
        raise error from None


def _append(log_file, line: str, path) -> None:
    """Append a log line; a full disk or a read-only folder is one OutputError line (the log is a journal:
    a resumed run truncates it to its state's step, so a half-written line is never read)."""
    try:
        log_file.write(line)
        log_file.flush()
    except OSError as e:
        error = output_error(e, "training log", path)
        if error is None:
            raise
        raise error from None


def config_dict(cfg: TrainConfig) -> dict:
    return asdict(cfg)


#################################################################################
#                                 Helpers                                       #
#################################################################################


def _check_finite(bad_step: torch.Tensor, bad_value: torch.Tensor, *, grad_clip: float, result: FitResult):
    # Every process learns of the first bad step of any process, so all stop together.
    never = torch.iinfo(torch.long).max
    first = dist.all_reduce_min(torch.where(bad_step < 0, never, bad_step).to(_reduce_device(bad_step)))
    step = int(first)
    if step == never:
        return
    mine = bad_value if int(bad_step) == step else torch.zeros_like(bad_value)
    # nan/inf survive a sum; a finite sum means only the gradient norm went bad.
    value = float(dist.all_reduce_mean(mine.to(_reduce_device(mine))))
    what = f"the loss became {value}" if not math.isfinite(value) else "the gradient norm became non-finite"
    fix = "lower the learning rate" + ("" if grad_clip > 0 else " or set grad_clip")
    if result.last_checkpoint is not None:
        then = f"the last good checkpoint is {result.last_checkpoint}; {fix} and resume from it"
    else:
        then = f"no checkpoint was written; {fix} and start again"
    raise DitqError(f"{what} at step {step}; stopped, {then}")


def _reduce_device(x: torch.Tensor) -> torch.device:
    # gloo reduces CPU tensors; NCCL CUDA ones.
    if get_world_size() > 1 and torch.distributed.get_backend() != "nccl":
        return torch.device("cpu")
    return x.device


def _step_seed(seed: int, step: int) -> int:
    # SeedSequence mixes (seed, step) into an unrelated 63-bit seed; the tag keeps it apart
    # from the sampler's per-epoch seeds.
    return int(np.random.SeedSequence([seed, step, 0x6E6F697365]).generate_state(2, np.uint64)[0]) >> 1


class _StepNoise:
    """The randomness of each step, a function of ``(seed, step)`` and the global sample position.

    One generator, reseeded every step, draws the timesteps, the noise and the
    label-dropout coins of the whole global batch (in that order), and each
    process keeps rows ``[lo, hi)``: its slice of the batch, the one its data
    came from. Drawing the global batch on every process costs one
    ``randn`` of the global batch per step, which is small next to the model.
    """

    def __init__(self, seed: int, device: torch.device):
        self.seed = seed
        self.device = device
        self.gen = torch.Generator(device=device)

    def draw(self, step: int, global_batch: int, shape: tuple, num_timesteps: int, lo: int, hi: int):
        self.gen.manual_seed(_step_seed(self.seed, step))
        kw = {"generator": self.gen, "device": self.device}
        t = torch.randint(0, num_timesteps, (global_batch,), **kw)[lo:hi]
        noise = torch.randn((global_batch, *shape), **kw)[lo:hi]
        coins = torch.rand((global_batch,), **kw)[lo:hi]
        return t, noise, coins


class _LabelDrop:
    """Classifier-free-guidance label dropout drawn by the loop instead of the model.

    DiT's ``LabelEmbedder`` drops labels with the global RNG, which would make
    the dropped labels depend on how the batch is split over processes. The
    loop takes this over for the duration of :func:`fit`: it sets the
    embedder's ``dropout_prob`` to 0 and passes the null label
    (``num_classes``) itself, with the per-step coins of :class:`_StepNoise`;
    the probability is put back at the end. Models without exactly one such
    module (anything with ``token_drop``, ``dropout_prob`` > 0 and ``num_classes``)
    are left alone.
    """

    def __init__(self, module: nn.Module):
        self.module = module
        self.p = float(module.dropout_prob)
        self.null = int(module.num_classes)

    @classmethod
    def take_over(cls, model: nn.Module) -> _LabelDrop | None:
        found = [
            m
            for m in model.modules()
            if callable(getattr(m, "token_drop", None))
            and isinstance(getattr(m, "dropout_prob", None), (int, float))
            and m.dropout_prob > 0
            and isinstance(getattr(m, "num_classes", None), int)
        ]
        if len(found) != 1:
            return None
        drop = cls(found[0])
        found[0].dropout_prob = 0.0
        return drop

    def apply(self, y: torch.Tensor, coins: torch.Tensor) -> torch.Tensor:
        return torch.where(coins < self.p, torch.full_like(y, self.null), y)

    def restore(self) -> None:
        self.module.dropout_prob = self.p


class _ModuloKeys(Dataset):
    """A dataset read with sampler keys (``epoch * n + index``) that knows only indices."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset
        self.n = len(dataset)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, key: int):
        return self.dataset[key % self.n]


class _NoBar:
    def update(self, n: int) -> None: ...
    def set_postfix(self, **kwargs) -> None: ...
    def close(self) -> None: ...


def _progress_bar(start: int, total: int, *, enabled: bool):
    if not enabled:
        return _NoBar()
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=start, unit="step", dynamic_ncols=True)
