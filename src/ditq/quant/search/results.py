"""What a search records and returns: :class:`Candidate` (one evaluated genome), :class:`SearchResult`.

Both are plain data: :class:`Candidate` round-trips through the search state
(:mod:`ditq.quant.search.state`), :class:`SearchResult` is what :func:`~ditq.quant.search.search`
returns and what :func:`~ditq.quant.search.write_layer_config` stores.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from ditq.quant.config import QDiTConfig
from ditq.quant.search.space import Cost, Genome


@dataclass
class Candidate:
    """One evaluated genome: real fitness (None when only pre-screened), proxy, cost, generation."""

    genome: Genome
    fitness: float | None
    proxy: float | None
    cost: Cost
    generation: int

    def rank_key(self) -> tuple:
        if self.fitness is not None:
            return (0, self.fitness)
        return (1, self.proxy if self.proxy is not None else math.inf)

    def to_dict(self) -> dict:
        return {
            "genome": [list(p) for p in self.genome],
            "fitness": self.fitness,
            "proxy": self.proxy,
            "cost": self.cost.to_dict(),
            "generation": self.generation,
        }


@dataclass
class SearchResult:
    """The best genome found, its per-layer map and config, the baseline's numbers, and the history.

    ``layers`` is the ``QDiTConfig.layers`` override dict of the best genome; ``config`` the base
    config with it applied. ``history`` has one dict per generation (``generation``, ``candidates``,
    ``evaluations``, ``proxy_evaluations``, ``best``, ``mean``, ``seconds``). ``evaluated`` lists
    every candidate in evaluation order. ``stopped`` is True when ``should_stop`` ended the search
    after ``generations`` generations (the best so far; the same call again continues it).
    """

    layer_names: tuple[str, ...]
    best: Genome
    best_fitness: float
    best_cost: Cost
    baseline: Genome
    baseline_fitness: float
    baseline_cost: Cost
    layers: dict[str, dict]
    config: QDiTConfig
    generations: int
    evaluations: int
    history: list[dict] = field(default_factory=list)
    evaluated: list[Candidate] = field(default_factory=list)
    stopped: bool = False

    def summary(self) -> dict:
        """JSON-able numbers (no genomes): fitness and costs of the best and the baseline."""
        return {
            "best_fitness": self.best_fitness,
            "baseline_fitness": self.baseline_fitness,
            "best_cost": self.best_cost.to_dict(),
            "baseline_cost": self.baseline_cost.to_dict(),
            "generations": self.generations,
            "evaluations": self.evaluations,
        }
