"""Deployed models side by side: checkpoint size, weight memory and sampling-step latency.

    from ditq.pipelines import deploy
    rows = deploy.compare({"FP32": fp_path, "W8A8": w8a8_path, "ternary": ternary_path}, batch_size=20)
    print(deploy.table(rows))

Each checkpoint is loaded as a user would (:func:`ditq.load`:
quantized layers hold their packed codes and run the integer ops of
:mod:`ditq.kernels` where this machine has them), then one sampling step (the
model on a batch of noisy inputs, doubled for classifier-free guidance) is
timed, the variants in turn, repeatedly, so that a change of machine load
touches them all alike; the fastest repeat is kept (the one least disturbed by
other work on the machine, as ``timeit`` does). :func:`save_w8a8` writes the W8A8 checkpoint the
integer ``w8a8_linear`` op runs: symmetric per-channel 8-bit weights (RTN),
dynamic symmetric per-token 8-bit activations. :func:`describe_kernels` says what
the layers of a checkpoint would run here, from its header alone (``ditq info``).
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ditq import formats, quant
from ditq.errors import InvalidArgumentError
from ditq.pipelines.sample import kernel_summary

PathLike = str | os.PathLike

W8A8_INTEGER = quant.QDiTConfig(w_bits=8, a_bits=8, w_group=0, w_sym=True, a_sym=True)
"""The W8A8 settings ``w8a8_linear`` runs (per-channel symmetric weights, per-token dynamic activations)."""


@dataclass
class DeployRow:
    """One deployed model: its file, the bytes it holds and one step's time."""

    name: str
    path: Path
    checkpoint_bytes: int
    held_bytes: int  # parameters and buffers of the loaded model (packed codes at their stored size)
    step_ms: float  # the fastest of the repeats
    kernels: str | None  # what its quantized layers run (None: a float model)
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "path": str(self.path),
            "checkpoint_bytes": self.checkpoint_bytes,
            "held_bytes": self.held_bytes,
            "step_ms": round(self.step_ms, 3),
            "kernels": self.kernels,
            **self.extra,
        }


def save_w8a8(model: nn.Module, path: PathLike, *, command: str | None = None) -> Path:
    """Quantize a copy of float ``model`` RTN to :data:`W8A8_INTEGER` and save it; returns the file."""
    import copy

    q = copy.deepcopy(model).eval()
    quant.quantize_(q, W8A8_INTEGER)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    formats.save(q, path, config=W8A8_INTEGER, command=command)
    return path


def held_bytes(model: nn.Module) -> int:
    """Bytes of the parameters and buffers of ``model`` (each tensor once)."""
    seen, total = set(), 0
    for t in [*model.parameters(), *model.buffers()]:
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


def _step_inputs(config, batch_size: int, cfg: bool, seed: int):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch_size, config.in_channels, config.input_size, config.input_size, generator=g)
    y = torch.randint(0, config.num_classes, (batch_size,), generator=g)
    if cfg:  # a guided step runs the conditional and the null-label rows in one batch
        x, y = torch.cat([x, x]), torch.cat([y, torch.full_like(y, config.num_classes)])
    t = torch.full((len(x),), 500, dtype=torch.long)
    return x, t, y


def compare(
    checkpoints: Mapping[str, PathLike],
    *,
    batch_size: int = 16,
    cfg: bool = True,
    repeats: int = 7,
    seed: int = 0,
) -> list[DeployRow]:
    """Load each checkpoint (CPU) and time one sampling step of each, interleaved, ``repeats`` times;
    each row keeps its fastest step and, in ``extra``, the median."""
    if not checkpoints:
        raise InvalidArgumentError("compare needs at least one checkpoint")
    if batch_size < 1 or repeats < 1:
        raise InvalidArgumentError(f"batch_size and repeats must be positive, got {batch_size} and {repeats}")
    loaded = {name: formats.load(path).eval() for name, path in checkpoints.items()}
    configs = {name: m.config for name, m in loaded.items()}
    inputs = {name: _step_inputs(c, batch_size, cfg, seed) for name, c in configs.items()}
    times: dict[str, list[float]] = {name: [] for name in loaded}
    with torch.inference_mode():
        for name, m in loaded.items():  # warm-up: builds the CPU kernels and their prepacked weights
            x, t, y = inputs[name]
            m(x, t, y)
        for _ in range(repeats):
            for name, m in loaded.items():
                x, t, y = inputs[name]
                start = time.perf_counter()
                m(x, t, y)
                times[name].append(1e3 * (time.perf_counter() - start))
    return [
        DeployRow(
            name=name,
            path=Path(path),
            checkpoint_bytes=Path(path).stat().st_size,
            held_bytes=held_bytes(loaded[name]),
            step_ms=min(times[name]),
            kernels=kernel_summary(loaded[name]),
            extra={
                "batch_size": batch_size,
                "cfg": cfg,
                "repeats": repeats,
                "median_step_ms": round(statistics.median(times[name]), 3),
            },
        )
        for name, path in checkpoints.items()
    ]


def table(rows: list[DeployRow], baseline: str | None = None) -> list[str]:
    """Aligned text lines: size on disk and in memory, ms per step and speed-up over ``baseline``
    (default: the first row)."""
    base = next((r for r in rows if r.name == baseline), rows[0])
    width = max(len(r.name) for r in rows)
    lines = [f"{'':{width}s}  {'file MB':>8s}  {'held MB':>8s}  {'ms/step':>8s}  {'speed':>6s}  layers run"]
    for r in rows:
        lines.append(
            f"{r.name:{width}s}  {r.checkpoint_bytes / 1e6:8.2f}  {r.held_bytes / 1e6:8.2f}  "
            f"{r.step_ms:8.1f}  {base.step_ms / r.step_ms:5.2f}x  {_short_kernels(r.kernels)}"
        )
    return lines


def _short_kernels(summary: str | None) -> str:
    if summary is None:
        return "float (F.linear)"
    return summary.split(": ", 1)[-1]


def describe_kernels(path: str | os.PathLike, device: str | torch.device = "auto") -> dict:
    """Which kernels the quantized layers of checkpoint ``path`` would run on ``device`` under the
    kernel backend in force: ``backend``, ``device``, ``resolved`` (the concrete backend),
    ``available`` (this machine's backends) and ``layers`` (``{op or "float: <why>": count}``).
    Reads the header only and builds no kernels (not-yet-built CPU kernels count as buildable)."""
    from ditq.common import resolve_device
    from ditq.kernels import ops

    device = resolve_device(device)
    model = formats.skeleton(path)
    counts: dict[str, int] = {}
    for what in (quant.kernel_plan(model, device, build=False) if model is not None else {}).values():
        counts[what] = counts.get(what, 0) + 1
    return {
        "backend": ops.get_backend(),
        "device": device.type,
        "resolved": ops.resolve_backend(device),
        "available": ops.available_backends(),
        "layers": counts,
    }
