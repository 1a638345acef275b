"""Saving and resuming a search: one JSON state, written atomically after every generation.

**Resume.** After every generation a JSON state (settings, space, base config, every evaluated
genome with fitness/proxy/cost, the top-k, the Generator's state, the history) is written
atomically to ``state_path``; calling :func:`~ditq.quant.search.search` again with the same
arguments continues from it and ends exactly where an uninterrupted run would. ``generations`` may
grow between calls; any other difference is refused with a one-line error.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from ditq.checkpoint import atomic_write
from ditq.errors import InvalidArgumentError
from ditq.quant.search.results import Candidate
from ditq.quant.search.space import Cost

if TYPE_CHECKING:
    from ditq.quant.search.evolution import SearchRun

STATE_FORMAT = "ditq-granularity-search"
STATE_VERSION = 1


def state_dict(run: SearchRun) -> dict:
    """The JSON-able state of ``run`` after its last completed generation."""
    index = {g: i for i, g in enumerate(run.records)}
    return {
        "format": STATE_FORMAT,
        "version": STATE_VERSION,
        "settings": {k: v for k, v in run.settings.items() if k != "generations"},
        "config": run.space.config.to_dict(),
        "space": run.space.to_dict(),
        "generation": run.generation,
        "evaluated": [c.to_dict() for c in run.records.values()],
        "top": [index[g] for g in run.top],
        "rng": run.rng.bit_generator.state,
        "history": run.history,
    }


def save_state(run: SearchRun, path: Path) -> None:
    """Write ``run``'s state to ``path`` atomically (a full disk or a read-only folder: one
    :class:`~ditq.errors.OutputError` line, the previous state kept)."""
    data = json.dumps(state_dict(run)).encode()  # compact: hundreds of genomes
    with atomic_write(path, "search state", size_hint=len(data)) as tmp:
        tmp.write_bytes(data)


def load_state(run: SearchRun, path: Path) -> None:
    """Continue ``run`` from the state at ``path``; a one-line error when it was made differently."""
    try:
        state = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InvalidArgumentError(f"search state {path} is not readable JSON ({e}); remove it") from None
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise InvalidArgumentError(f"{path} is not a ditq granularity-search state; pass another state_path")
    if state.get("version") != STATE_VERSION:
        raise InvalidArgumentError(
            f"search state {path} has version {state.get('version')!r}; this ditq reads {STATE_VERSION}"
        )
    mine = {
        "settings": {k: v for k, v in run.settings.items() if k != "generations"},
        "config": json.loads(json.dumps(run.space.config.to_dict())),
        "space": run.space.to_dict(),
    }
    for key, want in mine.items():
        got = state.get(key)
        if got != want:
            diff = (
                [k for k in sorted(set(want) | set(got)) if want.get(k) != got.get(k)]
                if isinstance(got, dict)
                else [key]
            )
            raise InvalidArgumentError(
                f"search state {path} was made with a different {key} ({', '.join(diff)} differ); "
                f"resume with the same arguments, or pass a new state_path"
            )
    try:
        for c in state["evaluated"]:
            genome = run.space.check(c["genome"])
            run.records[genome] = Candidate(
                genome, c["fitness"], c["proxy"], Cost(**c["cost"]), int(c["generation"])
            )
        genomes = list(run.records)
        run.top = [genomes[i] for i in state["top"]]
        run.rng.bit_generator.state = state["rng"]
        run.history = list(state["history"])
        run.generation = int(state["generation"])
    except (KeyError, TypeError, ValueError, IndexError) as e:
        raise InvalidArgumentError(f"search state {path} is damaged ({e!r}); remove it") from None
