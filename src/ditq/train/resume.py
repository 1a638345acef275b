"""Saving and resuming a run of :func:`~ditq.train.loop.fit`: what a training state holds, and how.

A training state is the model, the EMA, the optimizer (parameters by position;
by name under FSDP, converted on load either way), the step, every rank's RNG
states, the sampler's cursor, the loss scaler and the run's config. Rank 0
writes it (full, unsharded state dicts, so DDP, FSDP and single-process runs
resume each other's); the others wait at :func:`ditq.distributed.agree`, so a
failed write stops every process. Every process reads the state it resumes
from, and all must find the same one.

Resuming refuses, with a one-line :class:`~ditq.errors.CheckpointError`, a
state of another model or another quantization config: same tensor shapes do
not mean the same model, and a run that loaded anyway would silently train
something else. The stores themselves (files, keep-last-K folders) are
:mod:`ditq.train.checkpoint`'s.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ditq import distributed as dist
from ditq.distributed import get_rank, get_world_size, is_main_process
from ditq.errors import CheckpointError, DitqError
from ditq.train.checkpoint import StateStore, load_state


class RunState:
    """What a training state holds, and how to save it (rank 0) and resume from it (every rank)."""

    def __init__(self, model, ema, opt, sampler, scaler, device, fsdp: bool, extra: dict | None):
        self.model, self.ema, self.opt, self.sampler = model, ema, opt, sampler
        self.scaler, self.device, self.fsdp, self.extra = scaler, device, fsdp, extra
        # Optimizer states are saved as torch does (parameters by position) without FSDP and
        # by name with it (what torch.distributed.checkpoint gives); loading converts.
        self.names = [n for n, p in model.named_parameters() if p.requires_grad]

    def _rng_state(self) -> dict:
        state = {"torch": torch.get_rng_state()}
        if self.device.type == "cuda":
            state["cuda"] = torch.cuda.get_rng_state(self.device)
        return state

    def state(self, step: int) -> dict | None:
        """The training state at ``step`` on rank 0 (``None`` elsewhere). Collective."""
        rngs = dist.all_gather_objects(self._rng_state())
        if self.fsdp:
            model, ema = dist.fsdp_model_state(self.model), dist.fsdp_model_state(self.ema)
            opt, opt_format = dist.fsdp_optim_state(self.model, self.opt), "names"
        elif is_main_process():
            model, ema, opt, opt_format = (
                self.model.state_dict(),
                self.ema.state_dict(),
                self.opt.state_dict(),
                "positions",
            )
        if not is_main_process():
            return None
        state = {
            "step": step,
            "model": model,
            "ema": ema,
            "opt": opt,
            "opt_format": opt_format,
            "torch_rng": rngs[0]["torch"],  # rank 0's, as single-process states have it
            "rng_ranks": rngs,
            "sampler": self.sampler.state_dict(),
        }
        if "cuda" in rngs[0]:
            state["cuda_rng"] = rngs[0]["cuda"]
        if self.scaler is not None:
            state["scaler"] = self.scaler.state_dict()
        if self.extra is not None:
            state["config"] = self.extra
        return state

    def save(self, store: StateStore, step: int) -> Path | None:
        """Rank 0 writes the state at ``step`` into ``store``; the others wait. Returns its path."""
        error, path = None, None
        try:
            state = self.state(step)
            if state is not None:
                path = store.save(step, state)
        except Exception as e:  # noqa: BLE001 (re-raised below, after telling the other ranks)
            error = e
        if not dist.agree(error is None, self.device):
            if error is not None:
                raise error
            raise DitqError(
                f"rank 0 could not write the training state of step {step} (see its error); stopped"
            )
        if path is None:  # other ranks: where rank 0 wrote it (the folder is shared)
            path = store.latest()
        return path

    def resume(self, store: StateStore) -> tuple[int, Path | None]:
        """Load the newest state in ``store`` on every process; returns ``(step, path)`` (0, None: none)."""
        path, state, error = store.latest(), None, None
        try:
            if path is not None:
                state = load_state(path)
                _check_same_model(state, self.extra, path)
        except DitqError as e:
            error = e
        # Every process must find the same state (a folder not shared between nodes would not).
        seen = dist.all_gather_objects(
            (str(error) if error else None, int(state["step"]) if state is not None else None)
        )
        if error is not None:
            raise error
        if any(e is not None for e, _ in seen):
            raise CheckpointError(
                f"another process could not read the training state: {next(e for e, _ in seen if e)}"
            )
        steps = sorted({s for _, s in seen}, key=str)
        if len(steps) > 1:
            raise CheckpointError(
                f"the processes see different training states (steps {steps}); "
                "the output folder must be on a filesystem every node shares"
            )
        if state is None:
            return 0, None
        step = self._restore(state, path)
        return step, path

    def _restore(self, state: dict, path: Path) -> int:
        try:
            opt = _opt_state_as(
                state["opt"],
                state.get("opt_format", "positions"),
                "names" if self.fsdp else "positions",
                self.names,
            )
            if self.fsdp:
                dist.fsdp_load(self.model, state["model"], self.opt, opt)
                dist.fsdp_load(self.ema, state["ema"])
            else:
                self.model.load_state_dict(state["model"])
                self.ema.load_state_dict(state["ema"])
                self.opt.load_state_dict(opt)
        except (RuntimeError, ValueError, KeyError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise CheckpointError(
                f"training state {path} does not fit this model ({first}); resume with the config it was "
                "saved with"
            ) from None
        rank, world = get_rank(), get_world_size()
        rngs = state.get("rng_ranks")
        if rngs is not None and len(rngs) == world:
            torch.set_rng_state(rngs[rank]["torch"])
            if "cuda" in rngs[rank] and self.device.type == "cuda":
                torch.cuda.set_rng_state(rngs[rank]["cuda"], self.device)
        elif world == 1:  # a state from before per-rank RNG states
            torch.set_rng_state(state["torch_rng"])
            if "cuda_rng" in state and self.device.type == "cuda":
                torch.cuda.set_rng_state(state["cuda_rng"], self.device)
        # else: another number of processes; the global RNG (unused by DiT training) keeps its seed.
        if "sampler" in state:
            self.sampler.load_state_dict(state["sampler"])
        else:  # states written before the sampler existed: the cursor follows from the step
            self.sampler.cursor = int(state["step"]) * self.sampler.global_batch_size
        if self.scaler is not None and "scaler" in state:
            self.scaler.load_state_dict(state["scaler"])
        return int(state["step"])


def _opt_state_as(opt: dict, have: str, want: str, names: list[str]) -> dict:
    """An optimizer state dict with parameters keyed by position or by name, converted if needed."""
    if have == want:
        return opt
    if have == "positions":
        key = dict(enumerate(names))
    else:
        key = {name: i for i, name in enumerate(names)}
    try:
        return {
            "state": {key[k]: v for k, v in opt["state"].items()},
            "param_groups": [{**g, "params": [key[k] for k in g["params"]]} for g in opt["param_groups"]],
        }
    except KeyError as e:
        raise KeyError(f"the optimizer state has parameter {e} this model does not") from None


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
    # Quantization-aware runs record their quantization config; a changed one (other act_bits, say)
    # could load without a shape error and silently train something else.
    if saved is not None and mine is not None:
        saved_q, mine_q = state["config"].get("quant_config"), (extra or {}).get("quant_config")
        if saved_q != mine_q:
            raise CheckpointError(
                f"training state {path} was trained with quantization {_quant_words(saved_q)}, this run asks "
                f"for {_quant_words(mine_q)}; resume with the config it was saved with"
            )


def _quant_words(q: dict | None) -> str:
    if q is None:
        return "none (full precision)"
    return ", ".join(f"{k}={v}" for k, v in q.items() if k not in ("step", "include", "exclude"))
