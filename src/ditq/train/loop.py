"""The training loop: AdamW, LR schedule, EMA, hybrid diffusion loss, logging, exact resume.

:func:`fit` is the loop. Data is either in memory (an ``(images, labels)``
pair of tensors, as Fashion-MNIST and the synthetic shapes are) or a
``torch.utils.data.Dataset`` read through a DataLoader (image folders). Both
read in the order of a :class:`~ditq.train.sampler.ResumableSampler`, so a
run is a function of its seed, and the training state (model, EMA,
optimizer, step, RNG states, data cursor) saved every ``save_every`` steps
lets a resumed run continue bit for bit where the saved one was.

:func:`train` is the original entry point (one state file), kept for scripts.

Only the main process (rank 0) logs and writes; see :mod:`ditq.train.distributed`.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ditq.diffusion import create_diffusion
from ditq.errors import CheckpointError, DitqError, InvalidArgumentError
from ditq.train.checkpoint import SingleFileState, StateStore, load_state
from ditq.train.distributed import get_rank, get_world_size, is_main_process
from ditq.train.ema import make_ema, update_ema
from ditq.train.sampler import ResumableSampler

PRECISIONS = ("fp32", "bf16", "fp16")


@dataclass
class TrainConfig:
    """Optimization settings (the model and data are passed separately)."""

    steps: int = 1000
    batch_size: int = 128  # per process
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


Data = tuple[torch.Tensor, torch.Tensor] | Dataset


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
) -> FitResult:
    """Train ``model`` on ``data`` (images in [-1, 1] with labels) for ``cfg.steps`` steps.

    ``data`` is ``(images, labels)`` tensors (moved to ``device`` whole) or a
    Dataset of ``(image, label)`` items, read by a DataLoader with
    ``num_workers`` workers. A Dataset with ``epoch_keys = True`` is indexed
    with the sampler's keys (``epoch * len + index``, for per-epoch
    augmentation); any other with plain indices. With a ``store``, the training state is saved
    every ``save_every`` steps (0: only at the end) and at the end; with
    ``resume``, a run finding a state there continues from it. ``state_extra``
    (JSON-like, e.g. the run config) is saved in every state under ``"config"``;
    when it has a ``"model_config"``, resuming checks that the state has the same.

    Every ``cfg.log_every`` steps a record (step, mean loss, grad norm, lr,
    images/s, elapsed s) goes to ``log_path`` (JSON lines, appended) and
    ``on_log``. A non-finite loss or gradient stops the run with a
    :class:`DitqError` before anything more is saved, so the last checkpoint
    in ``store`` is the last good one.
    """
    cfg.validate()
    device = torch.device(device)
    dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[cfg.precision]
    if dtype is not None and device.type != "cuda":
        raise DitqError(
            f"precision {cfg.precision} needs a CUDA device; use --precision fp32 on {device.type}"
        )
    main = is_main_process()
    world_size = get_world_size()
    torch.manual_seed(cfg.seed)
    gen = torch.Generator(device=device).manual_seed(cfg.seed)  # timesteps

    in_memory = not isinstance(data, Dataset)
    if in_memory:
        images, labels = data
        if len(images) != len(labels) or len(images) == 0:
            raise DitqError(f"need as many labels as images (got {len(images)} images, {len(labels)} labels)")
        images, labels = images.to(device), labels.to(device)
        num_items = len(images)
    else:
        num_items = len(data)
    sampler = ResumableSampler(
        num_items, cfg.batch_size, seed=cfg.seed, rank=get_rank(), world_size=world_size
    )

    model = model.to(device).train()
    ema = make_ema(model)
    diffusion = create_diffusion("")
    opt = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=cfg.lr, weight_decay=cfg.weight_decay
    )
    forward = torch.compile(model) if cfg.compile else model
    scaler = torch.amp.GradScaler("cuda") if cfg.precision == "fp16" else None

    result = FitResult(model, ema)
    if resume and store is not None and (path := store.latest()) is not None:
        state = load_state(path)
        _check_same_model(state, state_extra, path)
        result.start_step = _restore(state, path, model, ema, opt, gen, sampler, scaler, device)
        del state
        result.resumed_from = result.last_checkpoint = path
    start = result.start_step

    def save(step: int) -> None:
        if store is not None and main:
            state = _state(model, ema, opt, gen, sampler, scaler, step, device, state_extra)
            result.last_checkpoint = store.save(step, state)

    batches = None
    if not in_memory:
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

    records = result.records
    log_file = open(log_path, "a") if log_path and main else None  # noqa: SIM115 (kept open for the run)
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
            if in_memory:
                idx = (sampler.next_keys() % num_items).to(device)
                x, y = images[idx], labels[idx]
            else:
                x, y = next(batches)
                sampler.cursor += sampler.global_batch_size  # the loader reads from a copy
                x = x.to(device, non_blocking=True)
                y = torch.as_tensor(y).to(device, non_blocking=True)
            t = torch.randint(0, diffusion.num_timesteps, (len(x),), device=device, generator=gen)
            with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                loss = diffusion.training_losses(forward, x, t, model_kwargs={"y": y})["loss"].mean()
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
            is_log = done % cfg.log_every == 0 or done == cfg.steps
            is_save = store is not None and ((save_every and done % save_every == 0) or done == cfg.steps)
            if is_log or is_save:
                _check_finite(bad_step, bad_value, grad_clip=cfg.grad_clip, result=result)
            if is_save:
                save(done)
            if is_log:
                elapsed = time.perf_counter() - t0
                rec = {
                    "step": done,
                    "loss": float(loss_sum / n_sum),
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
                        log_file.write(json.dumps(rec) + "\n")
                        log_file.flush()
                    if on_log:
                        on_log(rec)
    finally:
        bar.close()
        if log_file:
            log_file.close()
        del batches  # shuts down DataLoader workers
    result.step = max(start, cfg.steps)
    model.eval()
    return result


def train(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    cfg: TrainConfig,
    *,
    device: str | torch.device = "cpu",
    log_path: str | Path | None = None,
    on_log: Callable[[dict], None] | None = None,
    state_path: str | Path | None = None,
    save_every: int = 0,
) -> tuple[nn.Module, nn.Module, list[dict]]:
    """Train ``model`` on (images in [-1, 1], labels); return (model, ema, log records).

    With ``state_path``, the full training state (model, EMA, optimizer, step,
    RNG, data cursor) is written there atomically every ``save_every`` steps
    and at the end, and a run finding that file continues from it.
    """
    store = SingleFileState(state_path) if state_path is not None else None
    result = fit(
        model,
        (images, labels),
        cfg,
        device=device,
        store=store,
        save_every=save_every,
        resume=True,
        log_path=log_path,
        on_log=on_log,
    )
    return result.model, result.ema, result.records


def config_dict(cfg: TrainConfig) -> dict:
    return asdict(cfg)


#################################################################################
#                                 Helpers                                       #
#################################################################################


def _check_finite(bad_step: torch.Tensor, bad_value: torch.Tensor, *, grad_clip: float, result: FitResult):
    step = int(bad_step)
    if step < 0:
        return
    value = float(bad_value)
    what = f"the loss became {value}" if not math.isfinite(value) else "the gradient norm became non-finite"
    fix = "lower the learning rate" + ("" if grad_clip > 0 else " or set grad_clip")
    if result.last_checkpoint is not None:
        then = f"the last good checkpoint is {result.last_checkpoint}; {fix} and resume from it"
    else:
        then = f"no checkpoint was written; {fix} and start again"
    raise DitqError(f"{what} at step {step}; stopped, {then}")


def _state(model, ema, opt, gen, sampler, scaler, step, device, extra) -> dict:
    state = {
        "step": step,
        "model": model.state_dict(),
        "ema": ema.state_dict(),
        "opt": opt.state_dict(),
        "rng": gen.get_state(),
        "torch_rng": torch.get_rng_state(),
        "sampler": sampler.state_dict(),
    }
    if device.type == "cuda":
        state["cuda_rng"] = torch.cuda.get_rng_state(device)
    if scaler is not None:
        state["scaler"] = scaler.state_dict()
    if extra is not None:
        state["config"] = extra
    return state


def _check_same_model(state: dict, extra: dict | None, path) -> None:
    # Same tensor shapes do not mean the same model (num_heads changes no shape), so
    # compare the configs when both sides recorded one.
    saved = (state.get("config") or {}).get("model_config") if isinstance(state.get("config"), dict) else None
    mine = (extra or {}).get("model_config")
    if saved is not None and mine is not None and saved != mine:
        diff = ", ".join(
            f"{k} {saved.get(k)!r} -> {mine.get(k)!r}"
            for k in sorted(set(saved) | set(mine))
            if saved.get(k) != mine.get(k)
        )
        raise CheckpointError(
            f"training state {path} is of another model ({diff}); resume with the config it was saved "
            "with, or train into a new output folder"
        )


def _restore(state, path, model, ema, opt, gen, sampler, scaler, device) -> int:
    """Load ``state`` into the run's objects; returns its step."""
    try:
        model.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        opt.load_state_dict(state["opt"])
    except (RuntimeError, ValueError, KeyError) as e:
        first = str(e).strip().splitlines()[0]
        raise CheckpointError(
            f"training state {path} does not fit this model ({first}); resume with the config it was "
            "saved with"
        ) from None
    gen.set_state(state["rng"])
    torch.set_rng_state(state["torch_rng"])
    if "cuda_rng" in state and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda_rng"], device)
    if "sampler" in state:
        sampler.load_state_dict(state["sampler"])
    else:  # states written before the sampler existed: the cursor follows from the step
        sampler.cursor = int(state["step"]) * sampler.global_batch_size
    if scaler is not None and "scaler" in state:
        scaler.load_state_dict(state["scaler"])
    return int(state["step"])


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
