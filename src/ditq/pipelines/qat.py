"""TerDiT ternary QAT as a workflow: a trained run to a packed 2-bit checkpoint.

    import ditq
    from ditq.pipelines import qat
    qat.export_ternary("out/terdit_600m", "terdit-600m.safetensors")  # a run folder or a training state
    model = ditq.load("terdit-600m.safetensors")                      # never holds float ternary weights

Training itself is ``ditq train`` with a ``quant:`` section
(:mod:`ditq.pipelines.train`): it prepares the model, trains latent weights
and α, keeps that QAT state in its training states, and writes the converted
EMA as ``OUT/model.safetensors``. The file layout is documented in
:mod:`ditq.formats.ternary`; :func:`ditq.load` (and so ``ditq sample``) reads it.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, replace
from itertools import chain
from pathlib import Path

import torch
from torch import nn

from ditq import checkpoint as ckpt
from ditq import formats
from ditq.errors import CheckpointError, InvalidArgumentError
from ditq.formats import ternary as ternary_export
from ditq.models import registry
from ditq.quant import TernaryQATConfig, TernaryQATLinear, quantize_

PathLike = str | os.PathLike
WEIGHTS = ("ema", "model")


@dataclass
class ExportResult:
    """What :func:`export_ternary` wrote: the file, where it came from, and its byte counts."""

    path: Path
    source: str
    sizes: dict


def export_model(
    model: nn.Module,
    path: PathLike,
    config: TernaryQATConfig | None = None,
    *,
    command: str | None = None,
    extra_metadata: dict | None = None,
    float_dtype: str | None = None,
) -> Path:
    """Convert a QAT model **in place** (if it still has QAT layers) and write it as a ternary checkpoint."""
    if any(isinstance(m, TernaryQATLinear) for m in model.modules()):
        quantize_(model, replace(config or TernaryQATConfig(), step="convert"))
    return ternary_export.save_ternary(
        model, path, config, command=command, extra_metadata=extra_metadata, float_dtype=float_dtype
    )


def qat_model_from_state(
    state: dict, *, weights: str = "ema", source: str = "the training state"
) -> nn.Module:
    """The QAT model (latent weights and α) of a ``ditq train`` training state; ``weights`` is
    ``"ema"`` (what to export) or ``"model"``. Built on the meta device, then given the state's tensors."""
    if weights not in WEIGHTS:
        raise InvalidArgumentError(f"weights must be one of {', '.join(WEIGHTS)}, got {weights!r}")
    extra = state.get("config") if isinstance(state.get("config"), dict) else {}
    if not isinstance(extra.get("model_config"), dict):
        raise CheckpointError(f"{source} has no model_config; it was not written by ditq train")
    if not isinstance(extra.get("quant_config"), dict):
        raise CheckpointError(
            f"{source} is of a full-precision run (no quant_config); ditq export packs runs trained with "
            "a 'quant: {method: ternary}' section"
        )
    try:
        config = registry.config_from_dict(extra["model_config"])
        qconfig = TernaryQATConfig.from_dict(extra["quant_config"])
    except InvalidArgumentError as e:
        raise CheckpointError(f"{source}: {e}") from None
    with torch.device("meta"):
        model = registry.build_model(config)
    # alpha_init reads the weights, which meta tensors do not have; the state's α replace it anyway.
    quantize_(model, replace(qconfig, step="prepare", alpha_init="normal"))
    try:
        model.load_state_dict(state[weights], strict=True, assign=True)
    except (RuntimeError, KeyError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(
            f"{source}: its {weights} weights do not fit its own config ({first})"
        ) from None
    if any(t.is_meta for t in chain(model.parameters(), model.buffers())):
        raise CheckpointError(f"{source}: its {weights} weights leave tensors of the model unset")
    model.quant_config = qconfig
    return model.eval()


def export_ternary(
    source: PathLike,
    out: PathLike,
    *,
    weights: str = "auto",
    float_dtype: str | None = None,
    command: str | None = None,
    log: Callable[[str], None] | None = None,
) -> ExportResult:
    """Write the packed ternary checkpoint of ``source`` to ``out``.

    ``source`` is a ``ditq train`` run folder (its newest training state), one
    training state (``step_XXXXXXX.pt``) of a run with ``quant: ternary``, or a
    ternary checkpoint (rewritten, e.g. with another ``float_dtype``). From a
    training state, ``weights`` picks the EMA (``"ema"``), the raw weights
    (``"model"``) or, with ``"auto"`` (default), what the run itself exports: its
    ``checkpoint.export`` (``auto`` = the raw weights for ternary QAT, see
    :class:`ditq.train.config.CheckpointSpec`), so a run folder exports what the run
    wrote as its ``model.safetensors``.
    """
    if weights not in ("auto", *WEIGHTS):
        raise InvalidArgumentError(f"weights must be one of auto, {', '.join(WEIGHTS)}, got {weights!r}")
    from ditq.train.checkpoint import CheckpointDir, load_state
    from ditq.train.config import CheckpointSpec

    src = Path(source).expanduser()
    if src.is_dir():
        latest = CheckpointDir(src / "checkpoints").latest() if (src / "checkpoints").is_dir() else None
        if latest is None:
            final = src / "model.safetensors"
            if not ternary_export.is_ternary_checkpoint(final):
                raise CheckpointError(
                    f"{src} holds no training state (checkpoints/step_*.pt) nor a ternary model.safetensors; "
                    "give a ditq train output folder of a run with a quant section"
                )
            src = final
        else:
            src = latest
    if not src.is_file():
        raise CheckpointError(
            f"export source not found: {src}; give a run folder, a training state or a checkpoint"
        )
    meta: dict = {}
    what = formats.kind(src)  # one-line errors for files that are no checkpoint at all
    if what != "torch":
        if what != "ternary":
            raise CheckpointError(
                f"{src} holds {_KINDS.get(what, what)}; ditq export packs ternary QAT runs: give the run "
                "folder or a training state of a run trained with a 'quant: {method: ternary}' section"
            )
        model = ternary_export.load(src)
        meta = {k: v for k, v in ckpt.read_metadata(src).items() if k in _KEPT}
        config = model.quant_config
    else:
        state = load_state(src)
        run = state["config"].get("run") if isinstance(state.get("config"), dict) else None
        if weights == "auto":  # what the run exported itself (runs from before checkpoint.export: auto)
            chosen = ((run or {}).get("checkpoint") or {}).get("export", "auto")
            weights = CheckpointSpec(export=chosen).weights_to_export(quantized=True)
        model = qat_model_from_state(state, weights=weights, source=str(src))
        config = model.quant_config
        meta = {"weights": f"{weights} of step {state['step']}", "train_steps": state["step"]}
        if run is not None:
            meta["train_run"] = run
    path = export_model(model, out, config, command=command, extra_metadata=meta, float_dtype=float_dtype)
    sizes = ternary_export.checkpoint_sizes(path)
    if log is not None:
        log(f"wrote {path} from {src}: {ternary_export.sizes_line(sizes)}")
    return ExportResult(path, str(src), sizes)


_KEPT = ("weights", "train_steps", "train_run", "data", "class_names", "vae")
"""Metadata carried over when a ternary checkpoint is rewritten."""


_KINDS = {
    "ditq": "a full-precision model",
    "qdit": "a 'qdit' quantized model",
    "safetensors": "no ditq metadata",
    "terdit-official": "an official TerDiT checkpoint (already ternary: load it with ditq.load)",
}


__all__ = ["ExportResult", "export_model", "export_ternary", "qat_model_from_state"]
