"""Class-conditional sampling from a DiT, in batches, reproducibly: ``sample(model, num_samples=...)``.

This is DiT's ``sample.py``/``sample_ddp.py`` as a function: Gaussian noise,
an ancestral DDPM (250 steps) or DDIM (50 steps) reverse process, optional
classifier-free guidance over a doubled batch with the null label, a VAE
decode, and DiT's uint8 rule. All randomness comes from one generator seeded
with ``seed`` (labels from a separate numpy stream), so a run is determined by
``(seed, batch_size, device)``.

:func:`sample_to_npz` is the same at evaluation scale (``ditq sample --out
x.npz``): the samples are cut into shards (:mod:`ditq.eval.sampling`), spread
over the processes of a ``torchrun`` launch, kept on disk so that a killed run
resumes, and merged into one ADM ``.npz`` by rank 0. Its images depend on
``(seed, shard_size, batch_size, labels, device type)``, not on the number of
processes.

Quantized models (``ditq ptq`` and ``ditq export`` checkpoints) run the integer
ops of :mod:`ditq.kernels` in their quantized layers; ``kernel_backend``
(``ditq sample --backend``) chooses the implementation for the run: ``"auto"``
(the fastest this device has), ``"reference"``, ``"cpu"`` or ``"triton"`` (see
:func:`ditq.kernels.set_backend`); ``None`` keeps the process-wide choice.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from ditq.common import resolve_device
from ditq.diffusion import ClassifierFreeGuidance, create_diffusion, sample_loop
from ditq.distributed import agree, all_gather_objects, held_by_rank0, init_distributed
from ditq.errors import DitqError, InvalidArgumentError, StoppedBySignal
from ditq.eval.npz import open_images
from ditq.eval.sampling import (
    list_shards,
    make_eval_labels,
    merge_shards,
    plan_shards,
    remove_shards,
    sample_shards,
)
from ditq.images import to_uint8
from ditq.kernels import KernelError
from ditq.kernels import ops as kernel_ops
from ditq.models.large_dit import map_class_labels
from ditq.models.vae import VAE, vae_for_model
from ditq.preemption import StopSignals
from ditq.runlock import RunLock

SAMPLERS = ("ddpm", "ddim")
# DiT samples with 250 ancestral steps; Q-DiT evaluates with DDIM-50.
DEFAULT_STEPS = {"ddpm": 250, "ddim": 50}
# Samples per shard by default: a shard is the unit of resumption (work lost
# when killed) and of progress, so minutes of work, not hours; and few enough
# files for 50,000 samples.
TARGET_SHARD_SIZE = 1000


def default_steps(sampler: str) -> int:
    """The default number of steps for ``sampler`` (250 for DDPM, 50 for DDIM)."""
    if sampler not in DEFAULT_STEPS:
        raise InvalidArgumentError(f"unknown sampler '{sampler}'; choose one of {', '.join(SAMPLERS)}")
    return DEFAULT_STEPS[sampler]


def check_sample_options(
    *,
    num_samples: int,
    batch_size: int,
    sampler: str = "ddpm",
    steps: int | None = None,
    cfg_scale: float = 1.0,
    eta: float = 0.0,
) -> int:
    """Validate the model-independent options of :func:`sample`; returns the step count to use.

    Cheap on purpose: the CLI calls it before loading (maybe downloading) a model.
    """
    default = default_steps(sampler)  # also rejects an unknown sampler
    steps = default if steps is None else steps
    for name, value in (("num_samples", num_samples), ("batch_size", batch_size), ("steps", steps)):
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
            raise InvalidArgumentError(f"{name} must be a positive integer, got {value!r}")
    if steps > 1000:
        raise InvalidArgumentError(f"steps must be at most 1000 (the length of the process), got {steps}")
    if not math.isfinite(cfg_scale) or cfg_scale < 1.0:
        raise InvalidArgumentError(f"cfg_scale must be >= 1 (1 disables guidance), got {cfg_scale}")
    if not 0.0 <= eta <= 1.0:
        raise InvalidArgumentError(f"eta must be in [0, 1], got {eta}")
    return int(steps)


def make_labels(
    class_labels: Sequence[int] | None, num_samples: int, num_classes: int, seed: int = 0
) -> np.ndarray:
    """``num_samples`` labels: ``class_labels`` cycled (0,1,2,0,1,2,...), or uniform at random (``seed``)."""
    if class_labels is None:
        # numpy's stream, not torch's: labels stay independent of the noise drawn with the same seed.
        return np.random.default_rng(seed).integers(0, num_classes, size=num_samples, dtype=np.int64)
    labels = np.asarray(list(class_labels), dtype=np.int64)
    if labels.ndim != 1 or len(labels) == 0:
        raise InvalidArgumentError("class_labels must be a non-empty list of integers")
    bad = labels[(labels < 0) | (labels >= num_classes)]
    if len(bad):
        raise InvalidArgumentError(
            f"class label {int(bad[0])} is out of range: "
            f"this model has {num_classes} classes (0..{num_classes - 1})"
        )
    return np.resize(labels, num_samples)


def check_kernel_backend(name: str | None, device: torch.device | str | None = None) -> str | None:
    """``name`` if this machine can run that kernel backend (for ``device``'s tensors, when given);
    else a one-line :class:`InvalidArgumentError` naming the available ones. ``None`` passes."""
    if name is None:
        return None
    try:
        kernel_ops.check_backend(name)
        if device is not None:
            kernel_ops.resolve_backend(resolve_device(device), name)
    except KernelError as e:
        raise InvalidArgumentError(str(e)) from None
    return name


def kernel_summary(model: nn.Module, device: torch.device | str | None = None) -> str | None:
    """One line on what the quantized layers of ``model`` run on ``device`` under the kernel backend in
    force (e.g. ``"kernel backend auto -> cpu: 24 layers w8a8_linear"``); None for a float model."""
    from ditq.quant import kernel_plan

    plan = kernel_plan(model, device)
    if not plan:
        return None
    if device is None:
        device = next(model.parameters()).device
    counts: dict[str, int] = {}
    for what in plan.values():
        counts[what] = counts.get(what, 0) + 1
    backend = kernel_ops.get_backend()
    resolved = kernel_ops.resolve_backend(device)
    head = f"kernel backend {backend}" + (f" -> {resolved}" if backend == "auto" else "")
    return (
        head + f" on {torch.device(device).type}: " + ", ".join(f"{n} layers {w}" for w, n in counts.items())
    )


def _config(model: nn.Module) -> Any:
    config = getattr(model, "config", None)
    needed = ("in_channels", "input_size", "num_classes", "learn_sigma")
    if config is None or not all(hasattr(config, k) for k in needed):
        raise InvalidArgumentError(
            f"cannot sample from {type(model).__name__}: it needs a .config with {', '.join(needed)}"
        )
    return config


def _resolve_cfg_channels(cfg_channels: int | str | None, in_channels: int) -> int | None:
    if cfg_channels == "auto":
        # The original guides 3 of the 4 latent channels; reproduce that for latent models only.
        return 3 if in_channels == 4 else None
    if cfg_channels is None or cfg_channels == "all":
        return None
    if isinstance(cfg_channels, str):
        if not cfg_channels.isdigit():
            raise InvalidArgumentError(
                f"cfg_channels must be a number, 'all' or 'auto', got '{cfg_channels}'"
            )
        cfg_channels = int(cfg_channels)
    if not 1 <= cfg_channels <= in_channels:
        raise InvalidArgumentError(f"cfg_channels must be in 1..{in_channels}, got {cfg_channels}")
    return int(cfg_channels)


class _CastInputs:
    """Runs a half/bfloat16 model on the sampler's float32 tensors; returns float32."""

    def __init__(self, model: nn.Module, dtype: torch.dtype):
        self.model, self.dtype = model, dtype

    def __call__(self, x: torch.Tensor, t: torch.Tensor, **kwargs) -> torch.Tensor:
        return self.model(x.to(self.dtype), t, **kwargs).float()


def sample(
    model: nn.Module,
    *,
    num_samples: int,
    batch_size: int = 32,
    sampler: str = "ddpm",
    steps: int | None = None,
    cfg_scale: float = 1.0,
    cfg_channels: int | str | None = "auto",
    class_labels: Sequence[int] | None = None,
    seed: int = 0,
    eta: float = 0.0,
    device: torch.device | str | None = None,
    vae: VAE | None = None,
    clip_denoised: bool | None = None,
    kernel_backend: str | None = None,
    progress: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Draw ``num_samples`` class-conditional images from a DiT.

    Args:
        model: a DiT-like module ``model(x, t, y)`` with a ``.config``
            (``in_channels``, ``input_size``, ``num_classes``, ``learn_sigma``).
            It is run in eval mode (its training flag is restored afterwards)
            and moved to ``device`` when one is given.
        num_samples, batch_size: how many images, and how many per forward
            (guidance doubles the forward batch).
        sampler: ``"ddpm"`` (ancestral) or ``"ddim"``; ``steps`` defaults to
            250 for DDPM and 50 for DDIM (respaced from 1000).
        cfg_scale: classifier-free guidance scale; 1 disables it, > 1 runs a
            doubled batch whose second half has the null label ``num_classes``.
        cfg_channels: eps channels to guide: ``"auto"`` (3 for 4-channel latent
            models, reproducing DiT's ``forward_with_cfg``; all otherwise), an
            int, or ``None``/``"all"``.
        class_labels: labels cycled to ``num_samples``; ``None`` draws them
            uniformly at random from ``seed``.
        seed: seeds the generator of all noise (initial and per step).
        eta: DDIM's eta (0 = deterministic DDIM).
        device: where to sample; ``None`` = where the model is.
        vae: the decoder; ``None`` = :func:`ditq.models.vae.vae_for_model`.
        clip_denoised: clip x_0 predictions to [-1, 1]; ``None`` = only in
            pixel space (latent DiT never clips).
        kernel_backend: the :mod:`ditq.kernels` backend the quantized layers
            use during this call (``"auto"``, ``"reference"``, ``"cpu"``,
            ``"triton"``); ``None`` keeps the current one.
        progress: show progress bars.

    Returns:
        ``(images, labels)``: uint8 (N, H, W, C) from ``clamp(127.5 x + 128)``
        and int64 (N,).

    Raises:
        InvalidArgumentError: a non-positive count, a label outside
            ``[0, num_classes)``, ``cfg_scale < 1``, an unknown sampler, a
            kernel backend this machine or device does not have...
    """
    check_kernel_backend(kernel_backend)
    steps = check_sample_options(
        num_samples=num_samples,
        batch_size=batch_size,
        sampler=sampler,
        steps=steps,
        cfg_scale=cfg_scale,
        eta=eta,
    )
    config = _config(model)
    labels = make_labels(class_labels, num_samples, config.num_classes, seed)
    guided_channels = _resolve_cfg_channels(cfg_channels, config.in_channels)
    if device is not None:
        model.to(resolve_device(device))
    param = next(model.parameters())
    device, dtype = param.device, param.dtype
    check_kernel_backend(kernel_backend, device)
    if vae is None:
        vae = vae_for_model(config, device=device)
    if vae.latent_channels != config.in_channels:
        raise InvalidArgumentError(
            f"the VAE has {vae.latent_channels} latent channels but the model takes {config.in_channels}"
        )
    if clip_denoised is None:
        clip_denoised = bool(getattr(vae, "pixel_space", False))

    diffusion = create_diffusion(
        str(steps) if sampler == "ddpm" else f"ddim{steps}", learn_sigma=config.learn_sigma
    )
    model_fn = model if dtype == torch.float32 else _CastInputs(model, dtype)
    use_cfg = cfg_scale > 1.0
    if use_cfg:
        model_fn = ClassifierFreeGuidance(
            model_fn, cfg_scale, guided_channels, learn_sigma=config.learn_sigma
        )
    generator = torch.Generator(device=device).manual_seed(seed)
    shape = (config.in_channels, config.input_size, config.input_size)

    was_training = model.training
    model.eval()  # the label embedder drops labels in training mode
    images = []
    with kernel_ops.use_backend(kernel_backend):
        try:
            starts = range(0, num_samples, batch_size)
            for start in tqdm(
                starts, desc="batches", disable=not progress or len(starts) < 2, dynamic_ncols=True
            ):
                y = torch.from_numpy(labels[start : start + batch_size]).to(device)
                # Class ids -> the labels the model was trained with (official TerDiT: ImageFolder order).
                y = map_class_labels(model, y)
                n = len(y)
                z = torch.randn((n, *shape), generator=generator, device=device)
                if use_cfg:
                    z = torch.cat([z, z], dim=0)
                    y = torch.cat([y, torch.full_like(y, config.num_classes)], dim=0)
                out = sample_loop(
                    diffusion,
                    model_fn,
                    tuple(z.shape),
                    sampler=sampler,
                    noise=z,
                    clip_denoised=clip_denoised,
                    model_kwargs={"y": y},
                    eta=eta,
                    device=device,
                    generator=generator,
                    progress=progress,
                )
                latents = out[:n]  # the null-label half is only there for guidance
                images.append(to_uint8(vae.decode(latents, batch_size=batch_size)))
        finally:
            model.train(was_training)
    return np.concatenate(images), labels


#################################################################################
#                       Sharded, resumable, multi-process                       #
#################################################################################


def default_shard_size(batch_size: int) -> int:
    """About :data:`TARGET_SHARD_SIZE` samples: the smallest multiple of ``batch_size`` not below it.

    A multiple of the batch size, so that no shard ends in a short batch.
    """
    return max(1, math.ceil(TARGET_SHARD_SIZE / batch_size)) * batch_size


def default_shard_dir(out_path: str | Path) -> Path:
    """Where the shards of ``out_path`` go by default: ``samples.npz`` -> ``samples.shards/`` beside it."""
    return Path(out_path).with_suffix(".shards")


@dataclass
class ShardedSampleResult:
    """What :func:`sample_to_npz` did, seen from one process."""

    path: Path | None  # the merged .npz (every rank knows it; rank 0 wrote it)
    shard_dir: Path
    num_samples: int
    image_shape: tuple[int, int, int] | None  # (H, W, C) of the merged file, on rank 0
    rank: int
    world_size: int
    shards_drawn: int  # by this process
    shards_kept: int  # found complete from an earlier run, by this process
    seconds: float

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _json_value(value: Any) -> Any:
    # Config objects become plain JSON (what the manifest stores and compares).
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = value.to_dict() if hasattr(value, "to_dict") else dataclasses.asdict(value)
    return json.loads(json.dumps(value, default=str, sort_keys=True))


def sample_to_npz(
    model: nn.Module,
    out_path: str | Path,
    *,
    num_samples: int,
    batch_size: int = 32,
    shard_size: int | None = None,
    balanced: bool = False,
    class_labels: Sequence[int] | None = None,
    sampler: str = "ddpm",
    steps: int | None = None,
    cfg_scale: float = 1.0,
    cfg_channels: int | str | None = "auto",
    seed: int = 0,
    eta: float = 0.0,
    device: torch.device | str | None = None,
    vae: VAE | str | None = None,
    clip_denoised: bool | None = None,
    shard_dir: str | Path | None = None,
    keep_shards: bool = False,
    meta: Mapping[str, Any] | None = None,
    backend: str = "auto",
    kernel_backend: str | None = None,
    progress: bool | None = None,
    log: Callable[[str], None] = print,
    command: str | None = None,
) -> ShardedSampleResult:
    """Draw ``num_samples`` images into one ADM ``.npz``, in resumable shards, on every ``torchrun`` process.

    Alone, this is :func:`sample` written to ``out_path``. Under ``torchrun
    --nproc_per_node=K`` (``WORLD_SIZE > 1``) it starts the process group
    (gloo on CPU, NCCL on CUDA with each process on ``cuda:LOCAL_RANK``),
    each process draws its shards, rank 0 merges once all are done, and the
    group is closed again (unless it was started by the caller).

    The labels are drawn first: ``class_labels`` cycled, or uniform at random
    from ``seed``, or balanced (``balanced=True``: every class equally often,
    shuffled). Shard ``k`` (``shard_size`` samples, default about 1000, a
    multiple of ``batch_size``) is :func:`sample` of exactly its labels with
    :func:`ditq.eval.sampling.shard_seed` ``(seed, k)``; shard 0 uses ``seed``,
    so a run of one shard equals :func:`sample` with the same seed.

    Shards go to ``shard_dir`` (default :func:`default_shard_dir`, e.g.
    ``samples.shards/`` beside ``samples.npz``) with a manifest of the
    settings. Run the same call again after a crash and the complete shards are
    kept; other settings in that folder are an error naming the one that
    differs. Once merged the shards are deleted, unless ``keep_shards`` (then
    a rerun only merges again). The shard folder is locked for the run
    (:class:`~ditq.runlock.RunLock`). SIGTERM, SIGINT or SIGUSR1 (on any rank)
    stops every rank after its current shard, or the merge, with a
    :class:`~ditq.errors.StoppedBySignal` that says how to resume (``command``).

    Args:
        model, batch_size, sampler, steps, cfg_scale, cfg_channels, eta,
        clip_denoised: as for :func:`sample`.
        device: where to sample (``None``: where the model is); under torchrun
            a CUDA device becomes ``cuda:LOCAL_RANK``.
        vae: a decoder, or a name for :func:`ditq.models.vae.vae_for_model`
            (``None``: the model's default), built on this process's device.
        meta: more settings to record and check on resume, e.g.
            ``{"model": "DiT-XL/2"}`` (the model's config is recorded already).
        backend: ``"auto"``, ``"gloo"`` or ``"nccl"`` for the process group.
        kernel_backend: the :mod:`ditq.kernels` backend of quantized layers
            (as for :func:`sample`; not recorded in the manifest: backends
            differ by float rounding only).
        progress: a bar with images/s and time left on rank 0 (``None``: when
            stderr is a terminal).
        log: receives a few lines of what is being done, on rank 0 only.

    Raises:
        InvalidArgumentError: bad options (see :func:`sample`), ``balanced``
            with ``class_labels``, an ``out_path`` that is not ``.npz``, a
            shard folder holding another run.
        RunLockedError: another live process samples into the shard folder.
        OutputError: a full disk or an unwritable folder (finished shards are kept).
        StoppedBySignal: a signal stopped the run (see above).
    """
    steps = check_sample_options(
        num_samples=num_samples,
        batch_size=batch_size,
        sampler=sampler,
        steps=steps,
        cfg_scale=cfg_scale,
        eta=eta,
    )
    check_kernel_backend(kernel_backend)
    shard_size = default_shard_size(batch_size) if shard_size is None else shard_size
    if not isinstance(shard_size, (int, np.integer)) or isinstance(shard_size, bool) or shard_size < 1:
        raise InvalidArgumentError(f"shard_size must be a positive integer, got {shard_size!r}")
    num_shards = len(plan_shards(num_samples, shard_size, seed))  # also checks the seed (>= 0)
    out_path = Path(out_path)
    if out_path.suffix.lower() != ".npz":
        raise InvalidArgumentError(f"sharded sampling writes an .npz file, not '{out_path.name}'")
    if out_path.is_dir():
        raise InvalidArgumentError(f"{out_path} is a folder; give the path of the .npz file to write")
    if balanced and class_labels is not None:
        raise InvalidArgumentError(
            "balanced labels and given class labels exclude each other; drop one of them"
        )
    config = _config(model)
    if class_labels is not None:
        labels = make_labels(class_labels, num_samples, config.num_classes)
        label_kind = "given"
    else:
        labels = make_eval_labels(num_samples, config.num_classes, seed, balanced=balanced)
        label_kind = "balanced" if balanced else "uniform"
    guided_channels = _resolve_cfg_channels(cfg_channels, config.in_channels)
    shard_dir = default_shard_dir(out_path) if shard_dir is None else Path(shard_dir)
    if shard_dir.exists() and not shard_dir.is_dir():
        raise InvalidArgumentError(f"the shard folder {shard_dir} is a file; use another folder")
    again = command or "the same sample_to_npz call"
    retry = "run the same command again to resume"

    started = time.perf_counter()
    ctx = init_distributed(
        resolve_device(device) if device is not None else next(model.parameters()).device, backend=backend
    )
    # One run per shard folder, and a signal stops it at a shard boundary (every rank at the same one).
    with closing(ctx), held_by_rank0(RunLock(shard_dir, "shard folder", log=log), ctx), StopSignals() as stop:
        model.to(ctx.device)
        check_kernel_backend(kernel_backend, ctx.device)
        if vae is None or isinstance(vae, str):
            vae = vae_for_model(config, vae, device=ctx.device)
        run_meta = {
            "model_class": type(model).__name__,
            "model_config": _json_value(config),
            "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
            # The name, not repr(): that names the device, which differs between ranks.
            "vae": str(getattr(vae, "name_or_path", type(vae).__name__)),
            "labels": label_kind,
            "batch_size": int(batch_size),
            "sampler": sampler,
            "steps": steps,
            "cfg_scale": float(cfg_scale),
            "cfg_channels": guided_channels,
            "eta": float(eta),
            "clip_denoised": clip_denoised,
            **_json_value(dict(meta or {})),
        }

        def generate(shard_labels: np.ndarray, shard_seed: int) -> np.ndarray:
            images, _ = sample(
                model,
                num_samples=len(shard_labels),
                batch_size=batch_size,
                sampler=sampler,
                steps=steps,
                cfg_scale=cfg_scale,
                cfg_channels=cfg_channels,
                class_labels=shard_labels.tolist(),
                seed=shard_seed,
                eta=eta,
                vae=vae,
                clip_denoised=clip_denoised,
                kernel_backend=kernel_backend,
            )
            return images

        if ctx.is_main:
            where = str(ctx.device)
            if ctx.world_size > 1:
                where = f"{ctx.world_size} processes ({ctx.backend}, {ctx.device.type})"
            name = run_meta.get("model", type(model).__name__)
            log(
                f"sampling {num_samples} images ({label_kind} labels) from {name} with "
                f"{sampler.upper()}-{steps}, cfg scale {cfg_scale:g}, seed {seed}, "
                f"in {num_shards} shard{'s' * (num_shards > 1)} of {shard_size} in {shard_dir}, on {where}"
            )
            with kernel_ops.use_backend(kernel_backend):
                if kernels := kernel_summary(model, ctx.device):
                    log(kernels)
            if existing := list_shards(shard_dir):
                log(
                    f"resuming: {len(existing)} of {num_shards} shards are already there (kept when complete)"
                )

        def boundary(error: Exception | None) -> bool:
            # Every rank, after the setup and each round of shards: one that failed stops them all
            # (rank 0 would wait for shards that never come), and so does a signal to any of them.
            if not agree(error is None, ctx.device):
                raise error or DitqError(f"another process failed while sampling (see its error); {retry}")
            return stop.should_stop()

        run = sample_shards(
            generate,
            labels,
            shard_dir,
            shard_size=shard_size,
            seed=seed,
            rank=ctx.rank,
            world_size=ctx.world_size,
            meta=run_meta,
            progress=progress,
            boundary=boundary,
        )
        if run.stopped:  # every rank stopped at this boundary; their shards so far are all written
            done = sum(all_gather_objects(len(run.kept) + len(run.drawn)))
            raise StoppedBySignal(
                f"stopped after {done} of {num_shards} shards by {stop.received}; the finished shards are "
                f"in {shard_dir}; resume with: {again}"
            )

        image_shape, error = None, None
        if ctx.is_main:
            try:
                merge_shards(shard_dir, out_path, stop=lambda: stop.received is not None)
                image_shape = open_images(out_path).shape[1:]
                if not keep_shards:
                    remove_shards(shard_dir)
            except StoppedBySignal:  # no partial file is left; the shards are all there
                error = StoppedBySignal(
                    f"stopped while merging the {num_shards} shards by {stop.received}; they are in "
                    f"{shard_dir}; resume with: {again}"
                )
            except Exception as e:  # noqa: BLE001 (re-raised below, after telling the other ranks)
                error = e
        # Every rank learns how rank 0 fared: stopped by a signal there (a stop, not an error), or failed.
        fared = all_gather_objects(error and (isinstance(error, StoppedBySignal), str(error)))[0]
        if fared is not None:
            stopped, message = fared
            failed = DitqError(f"rank 0 could not write {out_path} (see its error)")
            raise error or (StoppedBySignal(message) if stopped else failed)
        return ShardedSampleResult(
            path=out_path,
            shard_dir=shard_dir,
            num_samples=num_samples,
            image_shape=image_shape,
            rank=ctx.rank,
            world_size=ctx.world_size,
            shards_drawn=len(run.drawn),
            shards_kept=len(run.kept),
            seconds=time.perf_counter() - started,
        )
