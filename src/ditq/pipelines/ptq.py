"""Q-DiT post-training quantization as a whole workflow with a report: calibrate, (search,) quantize, save.

    import ditq
    from ditq.pipelines import ptq
    model = ditq.load("ditq-fmnist")
    calib = ptq.record_calibration(model, ptq.CalibSpec(num_samples=256))   # DDIM-50, cfg 1.5
    ptq.quantize_model(model, ditq.QDiTConfig(w_bits=4, a_bits=8), calib=calib, gptq=True)
    ditq.save(model, "w4a8.safetensors")
    model = ditq.load("w4a8.safetensors")                                    # identical outputs

``ditq ptq`` is :func:`run_ptq`. The checkpoint format is :mod:`ditq.formats.qdit`.

Long searches survive preemption: the search state (``search_state``) is locked for the run (a second
process on it gets a one-line error naming the first, exit 2), a SIGTERM, SIGINT or SIGUSR1 during the
search stops it after the current generation is saved (:class:`~ditq.errors.StoppedBySignal`, exit 75,
with the command that resumes it), and a full disk or read-only folder fails any write in one line
(exit 74) with the previous file kept. A calibration cache that cannot be written is only a warning.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ditq import checkpoint as ckpt
from ditq import formats, quant
from ditq.errors import CheckpointError, InvalidArgumentError, OutputError, StoppedBySignal
from ditq.formats.official_dit import resolve_cache_dir
from ditq.models.dit import DiT
from ditq.pipelines.sample import make_labels, sample
from ditq.preemption import StopSignals
from ditq.quant.calibration import CalibrationData, CalibrationRecorder
from ditq.quant.search import output_error_proxy
from ditq.runlock import RunLock

Log = Callable[[str], None]

# ----------------------------------------------------------------------------
# Calibration data
# ----------------------------------------------------------------------------


@dataclass(frozen=True)
class CalibSpec:
    """How calibration inputs are recorded (Q-DiT: 256 samples, DDIM-50, cfg 1.5, one random step each)."""

    num_samples: int = 256
    steps: int = 50
    cfg_scale: float = 1.5
    batch_size: int = 64
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("num_samples", "steps", "batch_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise InvalidArgumentError(f"calibration {name} must be a positive integer, got {v!r}")
        if not self.cfg_scale >= 1.0:
            raise InvalidArgumentError(f"calibration cfg_scale must be >= 1, got {self.cfg_scale}")


def model_fingerprint(model: nn.Module) -> str:
    """A short hash of the model's config and float weights (names the calibration cache)."""
    h = hashlib.sha256()
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "to_dict"):
        h.update(json.dumps(config.to_dict(), sort_keys=True).encode())
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def _calib_cache_path(model: nn.Module, spec: CalibSpec, cache_dir: str | os.PathLike | None) -> Path:
    key = hashlib.sha256(json.dumps(asdict(spec), sort_keys=True).encode()).hexdigest()[:12]
    return resolve_cache_dir(cache_dir) / "calibration" / f"{model_fingerprint(model)}-{key}.safetensors"


def record_calibration(
    model: nn.Module,
    spec: CalibSpec | None = None,
    *,
    cache: bool = True,
    cache_dir: str | os.PathLike | None = None,
    progress: bool = False,
    log: Log | None = None,
    warn: Log | None = None,
) -> CalibrationData:
    """Record ``spec.num_samples`` calibration inputs while sampling ``model`` (see :class:`CalibSpec`).

    Labels are uniform at random from ``spec.seed``. With ``cache`` the
    inputs are kept in ``$DITQ_CACHE/calibration/`` under a hash of the
    model's weights and ``spec``, and read back on the next run. A cache that
    cannot be written (full disk, read-only folder) is one line to ``warn``
    (default stderr), and the inputs are returned all the same.
    """
    spec = spec or CalibSpec()
    path = _calib_cache_path(model, spec, cache_dir) if cache else None
    if path is not None and path.is_file():
        try:
            data = CalibrationData.load(path)
            if log:
                log(f"calibration: {len(data)} inputs from the cache {path}")
            return data
        except CheckpointError:
            pass  # a damaged cache entry is recorded again
    started = time.perf_counter()
    config = model.config
    labels = make_labels(None, spec.num_samples, config.num_classes, spec.seed)
    recorder = CalibrationRecorder(model, steps=spec.steps, seed=spec.seed)
    for i, start in enumerate(range(0, spec.num_samples, spec.batch_size)):
        batch = labels[start : start + spec.batch_size]
        with recorder.batch():
            sample(
                recorder, num_samples=len(batch), batch_size=len(batch), sampler="ddim", steps=spec.steps,
                cfg_scale=spec.cfg_scale, class_labels=batch.tolist(), seed=spec.seed * 100_003 + i,
                progress=progress,
            )  # fmt: skip
    data = recorder.data(meta={**asdict(spec), "model": model_fingerprint(model)})
    if path is not None:
        try:
            data.save(path, what="calibration cache")
        except (OutputError, CheckpointError) as e:
            why = str(e).rsplit("; ", 1)[0] if isinstance(e, OutputError) else str(e)  # not its advice
            (warn or _stderr)(
                f"warning: {why}; going on without caching the calibration inputs (the next run records "
                "them again; set DITQ_CACHE to a writable folder with space to keep them)"
            )
    if log:
        log(
            f"calibration: recorded {len(data)} inputs from {spec.num_samples} samples (DDIM-{spec.steps}, "
            f"cfg {spec.cfg_scale}) in {time.perf_counter() - started:.1f} s"
        )
    return data


def check_calibration(data: CalibrationData, model: nn.Module) -> None:
    """One-line error unless ``data`` holds inputs this model takes (shape of x, labels present)."""
    c = model.config
    data.check_input_shape((c.in_channels, c.input_size, c.input_size), "the model")
    if "y" not in data.kwargs:
        raise InvalidArgumentError("calibration data has no class labels 'y'; record it with this model")
    y = data.kwargs["y"]
    if y.dim() != 1 or int(y.min()) < 0 or int(y.max()) > c.num_classes:
        raise InvalidArgumentError(
            f"calibration labels must be 1-D in 0..{c.num_classes} (the null label included) for this model"
        )


# ----------------------------------------------------------------------------
# Quantize
# ----------------------------------------------------------------------------


def needs_calibration(config: quant.QDiTConfig, gptq: bool) -> bool:
    """GPTQ and static activation ranges need calibration inputs; RTN with dynamic activations does not."""
    return gptq or (not config.dynamic and not config.weight_only)


def quantize_model(
    model: nn.Module,
    config: quant.QDiTConfig,
    *,
    calib: CalibrationData | None = None,
    gptq: bool = False,
    act_order: bool = False,
    batch_size: int = 64,
    log: Log | None = None,
) -> nn.Module:
    """Quantize ``model`` in place with ``quantize_``: round-to-nearest, or GPTQ block by block
    (:class:`~ditq.quant.GPTQConfig`); static activation ranges are calibrated on ``calib``, which
    is checked against the model first. Returns ``model``."""
    if needs_calibration(config, gptq) and calib is None:
        what = "GPTQ" if gptq else "static activation quantization"
        raise InvalidArgumentError(f"{what} needs calibration data (calib=...)")
    if calib is not None and hasattr(model, "config"):
        check_calibration(calib, model)
    if gptq:
        method = quant.GPTQConfig(config, calib, act_order=act_order, batch_size=batch_size, log=log)
        return quant.quantize_(model, method)
    return quant.quantize_(model, config, calibration=calib, batch_size=batch_size)


# ----------------------------------------------------------------------------
# Evaluation helpers shared by the report, the search and the ladder
# ----------------------------------------------------------------------------


@dataclass(frozen=True)
class EvalSpec:
    """Samples drawn to measure quality: identical seeds and labels for every model compared."""

    num_samples: int = 1000
    steps: int = 50
    cfg_scale: float = 1.0
    batch_size: int = 250
    seed: int = 0


def eval_labels(spec: EvalSpec, num_classes: int) -> np.ndarray:
    """Balanced labels (each class equally often, cycled), the same for every model compared."""
    return make_labels(list(range(num_classes)), spec.num_samples, num_classes)


def draw_samples(
    model: nn.Module, spec: EvalSpec, *, progress: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """``spec.num_samples`` DDIM images with balanced labels and the spec's seed."""
    labels = eval_labels(spec, model.config.num_classes)
    return sample(
        model, num_samples=spec.num_samples, batch_size=spec.batch_size, sampler="ddim", steps=spec.steps,
        cfg_scale=spec.cfg_scale, class_labels=labels.tolist(), seed=spec.seed, progress=progress,
    )  # fmt: skip


QualityFn = Callable[[np.ndarray, np.ndarray], dict]
"""``quality(images uint8 NHWC, labels) -> {"fid": ..., ...}``: the first key is what a search minimizes."""


def primary_score(scores: dict) -> float:
    """The first value of a :data:`QualityFn` result: its FID, what a search minimizes."""
    return float(next(iter(scores.values())))


def quality_function(
    model: nn.Module,
    *,
    ref: str | os.PathLike | None = None,
    device: str | torch.device | None = "auto",
    inception_weights: str | os.PathLike | None = None,
) -> QualityFn:
    """How sample quality is measured for ``model``: FID-FMNIST (+ class accuracy) for 32x32 grayscale
    10-class models (the embedded evaluator, no reference file needed), else Inception FID against the
    ADM reference batch ``ref`` (its precomputed statistics are read once)."""
    c = model.config
    if ref is None and c.in_channels == 1 and c.input_size == 32 and c.num_classes == 10:
        from ditq.eval.fmnist import evaluate_fmnist, load_fmnist_evaluator

        evaluator = load_fmnist_evaluator()

        def fmnist(images: np.ndarray, labels: np.ndarray) -> dict:
            r = evaluate_fmnist(images, labels, evaluator=evaluator)
            return {"fid_fmnist": r["fid_fmnist"], "class_acc": r["class_acc"]}

        return fmnist
    if ref is None:
        raise InvalidArgumentError(
            "measuring quality of this model needs an ADM reference batch: pass --ref REF.npz "
            "(e.g. VIRTUAL_imagenet256_labeled.npz)"
        )
    import tempfile

    from ditq.eval import evaluate, read_reference
    from ditq.images import save_npz

    read_reference(ref)  # a bad reference fails now, not after sampling

    def inception(images: np.ndarray, labels: np.ndarray) -> dict:
        with tempfile.TemporaryDirectory() as tmp:
            path = save_npz(Path(tmp) / "samples.npz", images, labels)
            r = evaluate(path, ref, metrics=("fid",), device=device, inception_weights=inception_weights)
        return {"fid": r["metrics"]["fid"]}

    return inception


@dataclass
class PTQOptions:
    """Everything ``ditq ptq`` does, as data (see :func:`run_ptq`)."""

    model: str
    out: str
    w_bits: int = 4
    a_bits: int | None = 8
    w_group: int = 128
    a_group: int = 0
    dynamic: bool = True
    w_sym: bool = False
    w_clip: str | float = "max"
    quantize_adaln: bool = False
    gptq: bool = False
    act_order: bool = False
    layer_config: str | None = None
    calib: CalibSpec = CalibSpec()
    calib_data: str | None = None
    search: bool = False
    search_groups: tuple[int, ...] = (32, 64, 128, 192, 288)
    search_population: int = 50
    search_generations: int = 10
    search_prescreen: int | None = None
    search_eval: EvalSpec = EvalSpec(num_samples=800, cfg_scale=1.0)
    search_state: str | None = None
    eval: EvalSpec | None = None
    ref: str | None = None
    report: str | None = None
    seed: int = 0
    device: str = "auto"
    command: str | None = None

    def qdit_config(self, layers: dict | None = None) -> quant.QDiTConfig:
        return quant.QDiTConfig(
            w_bits=self.w_bits, a_bits=self.a_bits, w_group=self.w_group, a_group=self.a_group,
            w_sym=self.w_sym, w_clip=self.w_clip, dynamic=self.dynamic, quantize_adaln=self.quantize_adaln,
            layers=layers or {},
        )  # fmt: skip


@dataclass
class PTQResult:
    """What :func:`run_ptq` wrote and measured."""

    checkpoint: Path
    config: quant.QDiTConfig
    report: dict
    report_paths: list[Path]
    layer_config: Path | None = None


def _size_mb(model: nn.Module) -> float:
    return quant.model_size_bytes(model) / 1e6


def run_ptq(
    options: PTQOptions,
    *,
    log: Log = print,
    progress: bool = False,
    quality: QualityFn | None = None,
    warn: Log | None = None,
) -> PTQResult:
    """Quantize a DiT with Q-DiT: calibrate, optionally search group sizes, RTN or GPTQ, save, report.

    Order: the base config (bits, groups, clip, dynamic/static) with the
    per-layer map of ``layer_config`` (a file written by a search) or of a new
    search; calibration inputs when GPTQ, static ranges or the search's proxy
    need them; quantization; the checkpoint; then, with ``eval``, the quality
    of samples from the FP and the quantized model drawn with identical seeds
    and labels. The report (JSON, and markdown beside it) records settings,
    sizes, quality and the time of each phase. ``quality`` replaces the
    default measure (:func:`quality_function`); ``warn`` gets warnings (default stderr).

    A search with a ``search_state`` holds that state's lock for the whole run
    (:meth:`~ditq.runlock.RunLock.for_file`); a signal during the search raises
    :class:`~ditq.errors.StoppedBySignal` after the current generation is saved
    (see the module doc), and the same options again resume it.
    """
    base = options.qdit_config()  # bad bits / groups fail before loading
    lock = None
    if options.search and options.search_state:
        lock = RunLock.for_file(options.search_state, "search state", log=log).acquire()
    try:
        return _run_ptq(options, base, log=log, progress=progress, quality=quality, warn=warn)
    finally:
        if lock is not None:
            lock.release()


def _run_ptq(options: PTQOptions, base, *, log: Log, progress: bool, quality, warn) -> PTQResult:
    from ditq.common import resolve_device

    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    device = resolve_device(options.device)
    layers = {}
    if options.layer_config:
        layers = quant.read_layer_config(options.layer_config)["layers"]
    model = formats.load(options.model, device=device)
    if not isinstance(model, DiT):
        raise InvalidArgumentError(f"ditq ptq quantizes float DiT models; {options.model} is not one")
    timings["load"] = time.perf_counter() - t0
    fp_size = _size_mb(model)
    log(f"model: {options.model} ({sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters)")

    calib = None
    if needs_calibration(base, options.gptq) or (options.search and options.search_prescreen):
        t = time.perf_counter()
        if options.calib_data:
            calib = CalibrationData.load(options.calib_data)
            check_calibration(calib, model)
            log(f"calibration: {len(calib)} inputs from {options.calib_data}")
        else:
            calib = record_calibration(model, options.calib, progress=progress, log=log, warn=warn)
        timings["calibration"] = time.perf_counter() - t

    if quality is None and (options.search or options.eval is not None):
        quality = quality_function(model, ref=options.ref, device=device)

    layer_config_path = None
    search_summary = None
    if options.search:
        t = time.perf_counter()
        with StopSignals() as stop:
            result = _search(model, base, options, calib, quality, log, progress, stop.should_stop)
        if result.stopped:
            raise StoppedBySignal(_stopped_message(options, result, stop.received))
        layers = result.layers
        layer_config_path = Path(str(options.out) + ".layers.json")
        quant.write_layer_config(layer_config_path, result, meta={"model": options.model})
        search_summary = result.summary()
        timings["search"] = time.perf_counter() - t
        log(f"search: wrote the per-layer map {layer_config_path}")
    config = options.qdit_config(layers)

    fp_quality = None
    if options.eval is not None:
        t = time.perf_counter()
        fp_quality = quality(*draw_samples(model, options.eval, progress=progress))
        timings["eval_fp"] = time.perf_counter() - t

    t = time.perf_counter()
    quantize_model(model, config, calib=calib, gptq=options.gptq, act_order=options.act_order, log=log)
    timings["quantize"] = time.perf_counter() - t
    q_quality = None
    if options.eval is not None:
        t = time.perf_counter()
        q_quality = quality(*draw_samples(model, options.eval, progress=progress))
        timings["eval_quantized"] = time.perf_counter() - t

    path = formats.save(model, options.out, config=config, command=options.command)
    timings["total"] = time.perf_counter() - t0
    report = {
        "model": options.model,
        "checkpoint": str(path),
        "settings": {
            "w_bits": config.w_bits, "a_bits": config.a_bits, "w_group": config.w_group,
            "a_group": config.a_group, "dynamic": config.dynamic, "w_clip": config.w_clip,
            "gptq": options.gptq, "act_order": options.act_order, "search": options.search,
            "layer_config": str(layer_config_path or options.layer_config or "") or None,
            "calibration": None if calib is None else {"inputs": len(calib), **asdict(options.calib)},
            "seed": options.seed,
        },
        "quant_config": config.to_dict(),
        "size_mb": {"fp": fp_size, "quantized": _size_mb(model)},
        "quantized_layers": len(quant.quantized_layers(model)),
        "quality": None if q_quality is None else {
            "fp": fp_quality, "quantized": q_quality, "samples": asdict(options.eval)},
        "search": search_summary,
        "seconds": timings,
        "device": str(device),
    }  # fmt: skip
    paths = write_report(report, options.report) if options.report else []
    log(
        f"wrote {path} ({report['size_mb']['quantized']:.2f} MB, FP {fp_size:.2f} MB) in "
        f"{timings['total']:.1f} s"
    )
    if q_quality is not None:
        log("quality: " + _quality_line(fp_quality, q_quality))
    return PTQResult(path, config, report, paths, layer_config_path)


def _quality_line(fp: dict, q: dict) -> str:
    return ", ".join(f"{k} {q[k]:.4g} (FP {fp[k]:.4g})" for k in q)


def _search(model, base, options: PTQOptions, calib, quality: QualityFn, log: Log, progress, should_stop):
    return granularity_search(
        model, base, quality, options.search_eval, calib=calib, groups=options.search_groups,
        population=options.search_population, generations=options.search_generations,
        prescreen=options.search_prescreen, seed=options.seed, state_path=options.search_state,
        log=log, progress=progress, should_stop=should_stop,
    )  # fmt: skip


def _stopped_message(options: PTQOptions, result: quant.SearchResult, signal: str | None) -> str:
    where = (
        f"stopped after generation {result.generations} of {options.search_generations} by "
        f"{signal or 'a signal'}"
    )
    if not options.search_state:
        return (
            f"{where}; without --search-state its progress is not kept: run again with --search-state "
            "PATH to make the search resumable"
        )
    again = options.command or f"the same options (search_state {options.search_state})"
    return f"{where}; the search state is {options.search_state}; resume with: {again}"


def granularity_search(
    model: nn.Module,
    base: quant.QDiTConfig,
    quality: QualityFn,
    spec: EvalSpec,
    *,
    calib: CalibrationData | None = None,
    groups: tuple[int, ...] = (32, 64, 128, 192, 288),
    population: int = 50,
    generations: int = 10,
    prescreen: int | None = None,
    seed: int = 0,
    state_path: str | os.PathLike | None = None,
    log: Log | None = None,
    progress: bool = False,
    should_stop: Callable[[], bool] | None = None,
) -> quant.SearchResult:
    """:func:`ditq.quant.search` with Q-DiT's fitness: the quality (first metric, e.g. FID) of
    ``spec`` samples drawn with the same seed and labels for every candidate. With ``prescreen`` the
    noise-prediction error vs the float model on 64 calibration inputs pre-screens candidates.
    Mutations and crossovers are half the population each, parents the best ``min(10, population)``.
    ``should_stop`` is asked after every generation (see :func:`ditq.quant.search`); the state is
    not locked here (:func:`run_ptq` locks it)."""

    def fitness(quantized: nn.Module) -> float:
        images, labels = draw_samples(quantized, spec, progress=progress)
        return primary_score(quality(images, labels))

    proxy = None
    if prescreen:
        if calib is None:
            raise InvalidArgumentError("pre-screening candidates needs calibration data")
        batches = [(x, t, kw["y"]) for x, t, kw in calib.subset(64).batches(64)]
        eps = model.config.in_channels
        proxy = output_error_proxy(model, batches, output=lambda out: out[:, :eps])
    return quant.search(
        model, fitness, base, groups=groups, population=population, generations=generations,
        top_k=min(10, population), mutations=population // 2, crossovers=population // 2,
        proxy=proxy, prescreen=prescreen, seed=seed, state_path=state_path, log=log,
        should_stop=should_stop,
    )  # fmt: skip


def write_report(report: dict, path: str | os.PathLike) -> list[Path]:
    """Write ``report`` as JSON and markdown: ``x.json`` + ``x.md`` (any suffix of ``path`` is replaced)."""
    base = Path(path)
    base = base.with_suffix("") if base.suffix in (".json", ".md") else base
    json_path, md_path = base.with_name(base.name + ".json"), base.with_name(base.name + ".md")
    for target, text in (
        (json_path, json.dumps(report, indent=2) + "\n"),
        (md_path, report_markdown(report)),
    ):
        data = text.encode()
        with ckpt.atomic_write(target, "report", size_hint=len(data)) as tmp:
            tmp.write_bytes(data)
    return [json_path, md_path]


def report_markdown(report: dict) -> str:
    """A human-readable PTQ report."""
    s = report["settings"]
    a = "float" if s["a_bits"] is None else f"{s['a_bits']}-bit {'dynamic' if s['dynamic'] else 'static'}"
    lines = [
        f"# PTQ report: {report['model']}",
        "",
        f"- checkpoint: `{report['checkpoint']}`",
        f"- weights: {s['w_bits']}-bit, group {s['w_group'] or 'per channel'}, clip {s['w_clip']}, "
        f"{'GPTQ' if s['gptq'] else 'round-to-nearest'}",
        f"- activations: {a}, group {s['a_group']}",
        f"- per-layer map: {s['layer_config'] or 'none (uniform)'}",
        f"- size: {report['size_mb']['quantized']:.3f} MB (FP {report['size_mb']['fp']:.3f} MB)",
        f"- quantized layers: {report['quantized_layers']}",
        f"- device: {report['device']}; time: "
        + ", ".join(f"{k} {v:.1f} s" for k, v in report["seconds"].items()),
    ]
    q = report.get("quality")
    if q:
        e = q["samples"]
        lines += [
            "",
            f"Quality on {e['num_samples']} samples (DDIM-{e['steps']}, cfg {e['cfg_scale']}, "
            f"seed {e['seed']}, identical labels):",
            "",
            "| metric | FP | quantized |",
            "|---|---|---|",
        ]
        lines += [f"| {k} | {q['fp'][k]:.4f} | {q['quantized'][k]:.4f} |" for k in q["quantized"]]
    if report.get("search"):
        lines += ["", "Search: " + json.dumps(report["search"])]
    return "\n".join(lines) + "\n"


def _stderr(message: str) -> None:
    print(message, file=sys.stderr)
