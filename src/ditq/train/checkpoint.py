"""Training-state checkpoints: everything needed to continue a run exactly where it stopped.

A state is a dict of tensors and plain values (model, EMA, optimizer, step,
RNG states, data cursor, the run's config) saved with ``torch.save`` and read
back with ``torch.load(weights_only=True)``. Writes are atomic, so a killed
run leaves the previous checkpoint intact.

Two stores hold states:

- :class:`CheckpointDir`: ``DIR/step_0001000.pt`` files, keeping the last K;
  what ``ditq train`` uses.
- :class:`SingleFileState`: one file overwritten each time (the simplest
  form, for scripts).

Only the main process should call ``save`` (the training loop sees to it).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Protocol

import torch

from ditq.checkpoint import atomic_write
from ditq.errors import CheckpointError
from ditq.formats import pickles

_STEP_FILE = re.compile(r"^step_(\d+)\.pt$")


class StateStore(Protocol):
    """Where training states go: ``save`` one, find the ``latest``, ``load`` one."""

    def save(self, step: int, state: dict) -> Path: ...

    def latest(self) -> Path | None: ...


def save_state(path: str | os.PathLike, state: dict) -> None:
    """Write one training state atomically."""
    try:
        with atomic_write(path, "training state") as tmp:
            torch.save(state, tmp)
    except OSError as e:
        raise CheckpointError(
            f"cannot write training state {path}: {e.strerror or e}; check that the folder is writable "
            "and has space"
        ) from e


def load_state(path: str | os.PathLike) -> dict:
    """Read one training state (tensors and plain values only; nothing is executed)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"training state not found: {path}")
    try:
        state = pickles.torch_load(path)
    except CheckpointError as e:
        raise CheckpointError(
            f"training state {path} cannot be read: {e}; if it is the newest state of a run, "
            "delete it to resume from the one before"
        ) from None
    if not isinstance(state, dict) or "step" not in state or "model" not in state:
        raise CheckpointError(f"{path} is not a ditq training state (no 'step' and 'model' entries)")
    return state


class SingleFileState:
    """One state file, overwritten at every save."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    def save(self, step: int, state: dict) -> Path:
        save_state(self.path, state)
        return self.path

    def latest(self) -> Path | None:
        return self.path if self.path.is_file() else None


class CheckpointDir:
    """``folder/step_XXXXXXX.pt`` files; after each save only the newest ``keep_last`` remain (0: all)."""

    def __init__(self, folder: str | os.PathLike, keep_last: int = 0):
        self.folder = Path(folder)
        self.keep_last = keep_last

    def path_for(self, step: int) -> Path:
        return self.folder / f"step_{step:07d}.pt"

    def list(self) -> list[tuple[int, Path]]:
        """``(step, path)`` of every checkpoint, oldest first."""
        if not self.folder.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in self.folder.iterdir() if (m := _STEP_FILE.match(p.name))]
        return sorted(found)

    def latest(self) -> Path | None:
        found = self.list()
        return found[-1][1] if found else None

    def save(self, step: int, state: dict) -> Path:
        path = self.path_for(step)
        save_state(path, state)
        if self.keep_last > 0:
            for _, old in self.list()[: -self.keep_last]:
                old.unlink(missing_ok=True)
        return path
