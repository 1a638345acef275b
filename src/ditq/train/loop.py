"""The training loop: AdamW, LR schedule, EMA, hybrid diffusion loss, periodic logging.

This first version trains on an in-memory dataset (images and labels as
tensors, which is how Fashion-MNIST and the synthetic data fit); data loaders,
distributed training and exact resume extend it.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from ditq.checkpoint import atomic_write
from ditq.diffusion import create_diffusion
from ditq.errors import DitqError
from ditq.train.ema import make_ema, update_ema


@dataclass
class TrainConfig:
    """Optimization settings (the model and data are passed separately)."""

    steps: int = 1000
    batch_size: int = 128
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


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up, constant, then one step decay at ``decay_at`` of training."""
    lr = cfg.lr * min(1.0, (step + 1) / cfg.warmup_steps) if cfg.warmup_steps > 0 else cfg.lr
    if step >= math.floor(cfg.decay_at * cfg.steps):
        lr *= cfg.decay_factor
    return lr


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
    RNG) is written there atomically every ``save_every`` steps and at the end,
    and a run finding that file continues from it.
    """
    if len(images) != len(labels) or len(images) == 0:
        raise DitqError(f"need as many labels as images (got {len(images)} images, {len(labels)} labels)")
    device = torch.device(device)
    torch.manual_seed(cfg.seed)
    gen = torch.Generator(device=device).manual_seed(cfg.seed)
    model = model.to(device).train()
    ema = make_ema(model)
    images, labels = images.to(device), labels.to(device)
    diffusion = create_diffusion("")
    opt = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=cfg.lr, weight_decay=cfg.weight_decay
    )
    forward = torch.compile(model) if cfg.compile else model
    dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[cfg.precision]
    if dtype is not None and device.type != "cuda":
        raise DitqError(
            f"precision {cfg.precision} needs a CUDA device; use --precision fp32 on {device.type}"
        )
    scaler = torch.amp.GradScaler("cuda") if cfg.precision == "fp16" else None

    start = 0
    if state_path is not None and Path(state_path).exists():
        start = _load_state(state_path, model, ema, opt, gen)

    records: list[dict] = []
    log_file = open(log_path, "a") if log_path else None  # noqa: SIM115 (kept open for the run)
    t0, seen, loss_sum, n_sum = time.perf_counter(), 0, 0.0, 0
    try:
        for step in range(start, cfg.steps):
            for group in opt.param_groups:
                group["lr"] = lr_at(step, cfg)
            idx = torch.randint(0, len(images), (cfg.batch_size,), device=device, generator=gen)
            x, y = images[idx], labels[idx]
            t = torch.randint(0, diffusion.num_timesteps, (cfg.batch_size,), device=device, generator=gen)
            with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                loss = diffusion.training_losses(forward, x, t, model_kwargs={"y": y})["loss"].mean()
            if not torch.isfinite(loss):
                raise DitqError(f"loss became {loss.item()} at step {step}; lower the learning rate")
            opt.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.unscale_(opt)
            else:
                loss.backward()
            grad_norm = (
                nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                if cfg.grad_clip > 0
                else torch.tensor(0.0)
            )
            if scaler is not None:
                scaler.step(opt)
                scaler.update()
            else:
                opt.step()
            update_ema(ema, model, cfg.ema_decay)
            seen += cfg.batch_size
            loss_sum += loss.detach().float()
            n_sum += 1
            if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
                elapsed = time.perf_counter() - t0
                rec = {
                    "step": step + 1,
                    "loss": float(loss_sum / n_sum),
                    "grad_norm": float(grad_norm),
                    "lr": lr_at(step, cfg),
                    "images_per_s": seen / elapsed,
                    "elapsed_s": elapsed,
                }
                loss_sum, n_sum = 0.0, 0
                records.append(rec)
                if log_file:
                    log_file.write(json.dumps(rec) + "\n")
                    log_file.flush()
                if on_log:
                    on_log(rec)
            if state_path is not None and (
                (save_every and (step + 1) % save_every == 0) or step + 1 == cfg.steps
            ):
                _save_state(state_path, model, ema, opt, gen, step + 1)
    finally:
        if log_file:
            log_file.close()
    return model.eval(), ema, records


def config_dict(cfg: TrainConfig) -> dict:
    return asdict(cfg)


def _save_state(path, model, ema, opt, gen, step: int) -> None:
    state = {
        "model": model.state_dict(),
        "ema": ema.state_dict(),
        "opt": opt.state_dict(),
        "step": step,
        "rng": gen.get_state(),
        "torch_rng": torch.get_rng_state(),
    }
    with atomic_write(path) as tmp:
        torch.save(state, tmp)


def _load_state(path, model, ema, opt, gen) -> int:
    state = torch.load(path, map_location="cpu", weights_only=True)
    model.load_state_dict(state["model"])
    ema.load_state_dict(state["ema"])
    opt.load_state_dict(state["opt"])
    gen.set_state(state["rng"])
    torch.set_rng_state(state["torch_rng"])
    return int(state["step"])
