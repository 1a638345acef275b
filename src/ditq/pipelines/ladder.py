"""The Q-DiT ablation ladder: each rung adds one ingredient, all measured on identical samples.

Rungs at each weight bit width (activations 8-bit), after full precision:

    rtn          round-to-nearest, per-channel weights, static per-tensor activations
    +group128    group size 128 for weights and (static) activation ranges
    +dynamic     dynamic activations: per token and group of 128 channels, every call
    +search      the per-layer weight/activation group sizes found by the granularity search
    +gptq        the searched map with GPTQ weights

Every rung quantizes a fresh copy of the float model and draws the same
samples (seed, labels, noise, DDIM steps) as the FP row, so the differences
are the quantization's. ``scripts/ptq_ladder.py`` runs the full ladder into
``docs/results/ptq_ladder.json``; ``ditq demo`` runs a few rungs, small.
"""

from __future__ import annotations

import copy
import hashlib
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from torch import nn

from ditq import quant
from ditq.checkpoint import atomic_write
from ditq.pipelines.ptq import (
    CalibrationData,
    EvalSpec,
    QualityFn,
    draw_samples,
    primary_score,
    quantize_model,
)

Log = Callable[[str], None]

RUNGS = ("rtn", "+group128", "+dynamic", "+search", "+gptq")
"""The rungs of the ladder, in order; each adds one ingredient to the one before."""

DESCRIPTIONS = {
    "fp": "full precision",
    "rtn": "RTN, per-channel weights, static per-tensor activations",
    "+group128": "+ group size 128 (weights and static activation ranges)",
    "+dynamic": "+ dynamic activations (per token, groups of 128)",
    "+search": "+ searched per-layer weight/activation group sizes",
    "+gptq": "+ GPTQ weights",
}


def rung_config(rung: str, w_bits: int, a_bits: int = 8, layers: dict | None = None) -> quant.QDiTConfig:
    """The :class:`~ditq.quant.QDiTConfig` of a rung (``layers``: the searched map, for the last two)."""
    if rung == "rtn":
        return quant.QDiTConfig(w_bits=w_bits, a_bits=a_bits, w_group=0, a_group=-1, dynamic=False)
    if rung == "+group128":
        return quant.QDiTConfig(w_bits=w_bits, a_bits=a_bits, w_group=128, a_group=128, dynamic=False)
    if rung in ("+dynamic", "+search", "+gptq"):
        searched = rung != "+dynamic"
        if searched and layers is None:
            raise ValueError(f"rung {rung} needs the searched per-layer map")
        return quant.QDiTConfig(
            w_bits=w_bits,
            a_bits=a_bits,
            w_group=128,
            a_group=128,
            layers=dict(layers or {}) if searched else {},
        )
    raise ValueError(f"unknown rung {rung!r}; rungs are {', '.join(RUNGS)}")


@dataclass
class LadderRow:
    """One measured row (the fields of ``docs/results/ptq_ladder.json``)."""

    method: str
    w_bits: int | None
    a_bits: int | None
    fid: float
    class_acc: float | None
    size_mb: float
    samples: int
    steps: int
    seconds: float
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        d = {k: getattr(self, k) for k in ("method", "w_bits", "a_bits", "fid", "class_acc", "size_mb")}
        d.update(samples=self.samples, steps=self.steps, seconds=round(self.seconds, 1), **self.extra)
        return d


def _measure(model: nn.Module, spec: EvalSpec, quality: QualityFn, cache: Path | None = None) -> dict:
    """Quality of ``spec`` samples; with ``cache`` (an .npz path) the samples are kept and reused."""
    if cache is not None and cache.is_file():
        with np.load(cache) as f:
            images, labels = f["arr_0"], f["arr_1"]
    else:
        images, labels = draw_samples(model, spec)
        if cache is not None:  # the arrays as drawn (ADM's save_npz would widen grayscale to RGB)
            cache.parent.mkdir(parents=True, exist_ok=True)
            with atomic_write(cache, "sample cache") as tmp, open(tmp, "wb") as f:
                np.savez(f, arr_0=images, arr_1=labels)
    return quality(images, labels)


def _cache(cache_dir, name: str, spec: EvalSpec) -> Path | None:
    if cache_dir is None:
        return None
    return (
        Path(cache_dir) / f"{name}-n{spec.num_samples}-ddim{spec.steps}-cfg{spec.cfg_scale}-s{spec.seed}.npz"
    )


def _row(method, w_bits, a_bits, q: dict, model, spec: EvalSpec, seconds: float, **extra) -> LadderRow:
    return LadderRow(
        method=method,
        w_bits=w_bits,
        a_bits=a_bits,
        fid=primary_score(q),
        class_acc=None if q.get("class_acc") is None else float(q["class_acc"]),
        size_mb=quant.model_size_bytes(model) / 1e6,
        samples=spec.num_samples,
        steps=spec.steps,
        seconds=seconds,
        extra=extra,
    )


def fp_rows(
    model: nn.Module,
    spec: EvalSpec,
    quality: QualityFn,
    seeds: Sequence[int] = (0,),
    log: Log | None = None,
    cache_dir: str | Path | None = None,
) -> list[LadderRow]:
    """The full-precision row at each seed (the spread over seeds is the noise floor of the ladder).

    ``cache_dir`` keeps each row's samples as an ADM .npz and reuses them on the next call.
    """
    rows = []
    for seed in seeds:
        started = time.perf_counter()
        s = EvalSpec(spec.num_samples, spec.steps, spec.cfg_scale, spec.batch_size, seed)
        rows.append(
            _row(
                "fp",
                None,
                None,
                _measure(model, s, quality, _cache(cache_dir, "fp", s)),
                model,
                s,
                time.perf_counter() - started,
                seed=seed,
            )
        )
        if log:
            log(_line(rows[-1]))
    return rows


def ladder_rows(
    model: nn.Module,
    w_bits: int,
    spec: EvalSpec,
    quality: QualityFn,
    calib: CalibrationData,
    *,
    rungs: Sequence[str] = RUNGS,
    a_bits: int = 8,
    search_layers: dict | None = None,
    search_fn: Callable[[nn.Module, quant.QDiTConfig], dict] | None = None,
    log: Log | None = None,
    cache_dir: str | Path | None = None,
) -> list[LadderRow]:
    """Measure ``rungs`` at ``w_bits``/``a_bits`` on copies of the float ``model``.

    The searched map comes from ``search_layers`` or, when a searched rung is
    asked for without one, from ``search_fn(model, base_config)`` (run once).
    ``cache_dir`` keeps each row's samples (see :func:`fp_rows`); those of the
    searched rungs are keyed by a hash of the map.
    """
    rows = []
    for rung in rungs:
        started = time.perf_counter()
        extra = {}
        if rung in ("+search", "+gptq") and search_layers is None:
            if search_fn is None:
                raise ValueError(f"rung {rung} needs search_layers or a search_fn")
            t = time.perf_counter()
            search_layers = search_fn(model, rung_config("+dynamic", w_bits, a_bits))
            extra["search_seconds"] = round(time.perf_counter() - t, 1)
        config = rung_config(rung, w_bits, a_bits, search_layers)
        q = copy.deepcopy(model)
        quantize_model(q, config, calib=calib, gptq=rung == "+gptq")
        name = f"w{w_bits}a{a_bits}{rung}"
        if rung in ("+search", "+gptq"):  # these samples belong to this map only
            name += "-" + hashlib.sha256(json.dumps(config.layers, sort_keys=True).encode()).hexdigest()[:10]
        measured = _measure(q, spec, quality, _cache(cache_dir, name, spec))
        row = _row(rung, w_bits, a_bits, measured, q, spec, time.perf_counter() - started, **extra)
        rows.append(row)
        if log:
            log(_line(row))
        del q
    return rows


def _line(row: LadderRow) -> str:
    bits = "FP" if row.w_bits is None else f"W{row.w_bits}A{row.a_bits}"
    acc = "" if row.class_acc is None else f", class acc {row.class_acc:.3f}"
    return f"{bits:7s} {row.method:10s} FID {row.fid:8.3f}{acc}, {row.size_mb:.3f} MB ({row.seconds:.0f} s)"


def markdown_table(rows: Sequence[LadderRow | dict], fid_name: str = "FID-FMNIST", seed: int = 0) -> str:
    """The ladder as a markdown table; "× FP" divides by the FP row drawn with the same samples
    (``seed``, the quantized rows' seed), since paired rows differ far less than seeds do."""
    rows = [r.to_dict() if isinstance(r, LadderRow) else r for r in rows]
    fp = [r for r in rows if r["method"] == "fp"]
    paired = next((r for r in fp if r.get("seed", seed) == seed), fp[0] if fp else None)
    fp_mean = paired["fid"] if paired else None
    lines = [
        f"| bits | method | {fid_name} | × FP | class acc | size (MB) |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        bits = "FP" if r["w_bits"] is None else f"W{r['w_bits']}A{r['a_bits']}"
        ratio = f"{r['fid'] / fp_mean:.3f}" if fp_mean else "-"
        acc = "-" if r.get("class_acc") is None else f"{100 * r['class_acc']:.1f}%"
        name = DESCRIPTIONS.get(r["method"], r["method"])
        if r["method"] == "fp" and "seed" in r:
            name += f" (seed {r['seed']})"
        lines.append(f"| {bits} | {name} | {r['fid']:.3f} | {ratio} | {acc} | {r['size_mb']:.3f} |")
    return "\n".join(lines) + "\n"
