"""Calibration data for post-training quantization: model inputs ``(x_t, t, y)`` recorded while sampling.

Q-DiT calibrates on 256 inputs recorded while sampling with DDIM-50 and
classifier-free guidance 1.5, one random timestep per sample. The recorder
here does that for any sampler and any model callable ``model(x, t, **kwargs)``:

    recorder = CalibrationRecorder(model, steps=50, seed=0)
    for labels in batches:
        with recorder.batch():
            run_sampler(recorder, labels)   # calls recorder(x, t, y=y) once per step
    data = recorder.data()                  # CalibrationData
    data.save("calib.safetensors", meta={...})

For each *sample* of a batch the recorder draws one step index in
``[0, steps)`` and keeps that sample's model inputs at that step. With
guidance the model sees a doubled batch (conditional rows, then the same
``x_t`` with the null label); both rows of a sample are kept at the sample's
step, because the quantized model will see both at inference. So 256 samples
give 512 inputs with guidance and 256 without.

``quant`` knows nothing of samplers or models: the caller runs the sampler
(:mod:`ditq.pipelines.ptq` does). The recorder only checks that the sampler
called it exactly ``steps`` times per batch, since otherwise "one random
timestep per sample" would silently mean something else.
"""

from __future__ import annotations

import inspect
import json
import os
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from ditq.checkpoint import load_tensors, read_safetensors_header, save_checkpoint
from ditq.errors import CheckpointError, InvalidArgumentError

CALIBRATION_FORMAT = "ditq-calibration"
"""The ``kind`` stored in a calibration file's metadata."""

_KW_PREFIX = "kw."


@dataclass
class CalibrationData:
    """Model inputs for calibration: ``x`` [N, ...], ``t`` [N] and keyword tensors (``y``) [N, ...].

    ``meta`` describes how they were made (sampler, steps, guidance, seed, model);
    :meth:`save` stores it and :meth:`load` returns it, so a cache can be
    checked against the settings of the run that wants to reuse it.
    """

    x: torch.Tensor
    t: torch.Tensor
    kwargs: dict[str, torch.Tensor] = field(default_factory=dict)
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name, v in (("x", self.x), ("t", self.t), *self.kwargs.items()):
            if not isinstance(v, torch.Tensor):
                raise InvalidArgumentError(f"calibration {name} must be a tensor, got {type(v).__name__}")
        n = len(self.x)
        if n == 0:
            raise InvalidArgumentError("calibration data is empty")
        if self.t.dim() != 1:
            raise InvalidArgumentError(f"calibration t must be 1-D [N], got shape {tuple(self.t.shape)}")
        for name, v in (("t", self.t), *self.kwargs.items()):
            if len(v) != n:
                raise InvalidArgumentError(
                    f"calibration {name} has {len(v)} rows but x has {n}; every input needs one per row"
                )

    def __len__(self) -> int:
        return len(self.x)

    @property
    def input_shape(self) -> tuple[int, ...]:
        """The shape of one ``x`` row, e.g. (4, 32, 32)."""
        return tuple(self.x.shape[1:])

    def check_input_shape(self, shape: Sequence[int], what: str = "the model") -> None:
        """One-line error unless every ``x`` row has ``shape`` (what ``what`` takes)."""
        if tuple(shape) != self.input_shape:
            raise InvalidArgumentError(
                f"calibration inputs are {list(self.input_shape)} per sample but {what} takes "
                f"{list(shape)}; record calibration data with this model (drop --calib-data or the cache)"
            )

    def batches(
        self, batch_size: int, device: torch.device | str | None = None
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]]:
        """``(x, t, kwargs)`` batches of at most ``batch_size`` rows, in order, moved to ``device``."""
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise InvalidArgumentError(f"batch_size must be a positive integer, got {batch_size!r}")
        for i in range(0, len(self), batch_size):
            sl = slice(i, i + batch_size)
            yield (
                self.x[sl].to(device),
                self.t[sl].to(device),
                {k: v[sl].to(device) for k, v in self.kwargs.items()},
            )

    def subset(self, n: int) -> CalibrationData:
        """The first ``n`` rows (all when ``n`` >= len)."""
        return CalibrationData(
            self.x[:n], self.t[:n], {k: v[:n] for k, v in self.kwargs.items()}, dict(self.meta)
        )

    # -- files -------------------------------------------------------------------------------------

    def save(
        self, path: str | os.PathLike, meta: Mapping | None = None, *, what: str = "calibration data"
    ) -> None:
        """Write a safetensors file (atomic) with ``meta`` (default ``self.meta``) in its header;
        ``what`` names it in the one-line error of a failed write."""
        tensors = {"x": self.x, "t": self.t, **{_KW_PREFIX + k: v for k, v in self.kwargs.items()}}
        meta = dict(self.meta if meta is None else meta)
        save_checkpoint(path, tensors, {"kind": CALIBRATION_FORMAT, "calibration": meta}, what=what)

    @classmethod
    def load(cls, path: str | os.PathLike) -> CalibrationData:
        """Read a file written by :meth:`save`; a one-line :class:`CheckpointError` for anything else."""
        _, raw = read_safetensors_header(path)
        try:
            info = json.loads(raw.get("ditq", "{}"))
        except json.JSONDecodeError:
            info = {}
        if info.get("kind") != CALIBRATION_FORMAT:
            raise CheckpointError(f"{path} is not a ditq calibration file (no '{CALIBRATION_FORMAT}' header)")
        tensors = load_tensors(path)
        if "x" not in tensors or "t" not in tensors:
            raise CheckpointError(f"{path}: calibration file lacks its 'x' or 't' tensor")
        kwargs = {k[len(_KW_PREFIX) :]: v for k, v in tensors.items() if k.startswith(_KW_PREFIX)}
        try:
            return cls(tensors["x"], tensors["t"], kwargs, dict(info.get("calibration", {})))
        except InvalidArgumentError as e:
            raise CheckpointError(f"{path}: {e}") from None


class CalibrationRecorder(nn.Module):
    """Wraps a model; inside :meth:`batch`, keeps each sample's inputs at one random step.

    Forward passes go to the wrapped model unchanged. ``steps`` is how many
    times the sampler calls the model per batch; ``seed`` seeds the choice of
    steps. A ``config`` attribute of the model is exposed too, so samplers that
    read ``model.config`` accept the recorder in the model's place.
    """

    def __init__(self, model: nn.Module, steps: int, seed: int = 0):
        super().__init__()
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise InvalidArgumentError(f"steps must be a positive integer, got {steps!r}")
        self.model = model
        # A new Module starts in training mode; a sampler that puts the recorder in eval mode and back
        # would then leave the wrapped model in training mode. Take the model's mode instead.
        self.training = model.training
        self.steps = steps
        if hasattr(model, "config"):
            self.config = model.config
        self._generator = torch.Generator().manual_seed(int(seed))
        self._rows: list[tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]] = []
        self._calls: int | None = None  # None: outside a batch
        self._pick: torch.Tensor | None = None
        self._samples = 0

    @contextmanager
    def batch(self) -> Iterator[CalibrationRecorder]:
        """One sampling run of a batch happens inside; each of its samples is recorded once."""
        if self._calls is not None:
            raise InvalidArgumentError("CalibrationRecorder.batch() blocks cannot be nested")
        self._calls, self._pick = 0, None
        try:
            yield self
            if self._calls != self.steps:
                raise InvalidArgumentError(
                    f"the sampler called the model {self._calls} times for one batch but the recorder "
                    f"expected steps={self.steps}; pass the sampler's number of steps"
                )
        finally:
            self._calls = None

    def forward(self, x: torch.Tensor, t: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self._calls is not None:
            self._record(x, t, self._named(args, kwargs))
            self._calls += 1
        return self.model(x, t, *args, **kwargs)

    def _named(self, args: tuple, kwargs: dict) -> dict:
        """Keyword form of the extra inputs (``model(x, t, y)`` -> ``{"y": y}``) for replays by name."""
        if not args:
            return kwargs
        fail = InvalidArgumentError(
            "the sampler passes positional inputs the recorder cannot name; pass them as keywords"
        )
        try:
            sig = inspect.signature(getattr(self.model, "forward", self.model))
            bound = sig.bind(None, None, *args, **kwargs)
        except (TypeError, ValueError):
            raise fail from None
        named = dict(list(bound.arguments.items())[2:])
        if any(sig.parameters[k].kind is inspect.Parameter.VAR_POSITIONAL for k in named):
            raise fail
        return named

    def _record(self, x: torch.Tensor, t: torch.Tensor, kwargs: dict) -> None:
        rows = len(x)
        if self._pick is None:
            # Guidance doubles the batch as [conditional; null]; both halves are one sample.
            self._halves = 2 if self._is_doubled(x) else 1
            n = rows // self._halves
            self._pick = torch.randint(0, self.steps, (n,), generator=self._generator)
            self._samples += n
        n = len(self._pick)
        if rows != n * self._halves:
            raise InvalidArgumentError(
                f"the batch changed size during sampling ({n * self._halves} rows, then {rows})"
            )
        chosen = (self._pick == self._calls).nonzero().flatten()
        if len(chosen) == 0:
            return
        idx = torch.cat([chosen + h * n for h in range(self._halves)]).to(x.device)
        tensors = {k: v for k, v in kwargs.items() if isinstance(v, torch.Tensor) and len(v) == rows}
        self._rows.append(
            (
                x.detach()[idx].cpu(),
                t.detach()[idx].cpu(),
                {k: v.detach()[idx].cpu() for k, v in tensors.items()},
            )
        )

    @staticmethod
    def _is_doubled(x: torch.Tensor) -> bool:
        # The guided sampler feeds the same noise to both halves; for a run of
        # real samples an exact match of the two halves happens only then.
        rows = len(x)
        return rows % 2 == 0 and rows > 0 and bool(torch.equal(x[: rows // 2], x[rows // 2 :]))

    @property
    def num_samples(self) -> int:
        """Samples seen so far (each recorded once)."""
        return self._samples

    def data(self, meta: Mapping | None = None) -> CalibrationData:
        """Everything recorded, as :class:`CalibrationData` (rows in recording order)."""
        if not self._rows:
            raise InvalidArgumentError("nothing was recorded: run the sampler inside recorder.batch()")
        keys = set(self._rows[0][2])
        for _, _, kw in self._rows:
            keys &= set(kw)
        return CalibrationData(
            torch.cat([r[0] for r in self._rows]),
            torch.cat([r[1] for r in self._rows]),
            {k: torch.cat([r[2][k] for r in self._rows]) for k in sorted(keys)},
            dict(meta or {}),
        )


def run_calibration(model: nn.Module, data: CalibrationData, batch_size: int = 64) -> None:
    """Run ``model(x, t, **kwargs)`` over ``data`` under ``torch.no_grad`` (e.g. inside ``calibrate``)."""
    device = next((p.device for p in model.parameters()), None)
    if device is None:
        device = next((b.device for b in model.buffers()), torch.device("cpu"))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for x, t, kw in data.batches(batch_size, device):
                model(x, t, **kw)
    finally:
        model.train(was_training)
