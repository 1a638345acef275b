"""The evolutionary search itself: :func:`search` and the run it drives (:class:`SearchRun`).

**Evolution** (all numbers configurable). Generation 0 is the baseline genome plus random feasible
genomes, so the search never ends worse than the baseline under the same fitness. Each later
generation is ``mutations`` mutants (a parent drawn uniformly from the top ``top_k``; every weight
and every activation gene resampled independently with ``mutation_prob``), ``crossovers`` uniform
crossovers of two distinct parents (each weight and activation gene from either), then random
genomes up to ``population``. A child that breaks a constraint is repaired
(:meth:`~ditq.quant.search.space.SearchSpace.repair`); a child equal to an already evaluated genome
(or to another child) is rejected. Each operator gets ``10 ×`` its count in attempts; a space too
small to fill the population just yields fewer candidates. The top-k is updated every generation
over everything evaluated (elitist, ties to the earlier candidate). All randomness comes from one
``numpy`` Generator seeded by ``seed``.

**Fitness** (``fitness(model) -> float``, lower is better, e.g. the FID of N samples) is called under
``torch.no_grad()`` with the model quantized in place under the candidate. It should seed its
sampler identically for every call and compute reference statistics (the reference batch's FID
statistics, fixed noise and labels, full-precision outputs) **once, outside**: the search calls it
per candidate, and recomputing references there was a defect of the original. Fitness values are
memoized per genome (parents are never re-evaluated); NaN counts as +inf.

**Proxy and pre-screening.** ``proxy(model) -> float`` (e.g.
:func:`~ditq.quant.search.evaluate.output_error_proxy`) is computed for every new candidate. With
``prescreen=k`` only the ``k`` best new candidates by proxy (in generation 0: the baseline plus the
best ``k - 1``) get the real fitness. Ranking: candidates with a real fitness, by fitness, come
before proxy-only ones, by proxy; so the result always has a real fitness.

After every generation the run is saved to ``state_path`` (:mod:`ditq.quant.search.state`), and a
later call with the same arguments resumes from it. Then ``should_stop()`` (e.g.
:meth:`ditq.preemption.StopSignals.should_stop`), when given, is asked whether to stop there: the
result is then the best so far, with ``stopped`` set, and the same call again continues.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ditq.errors import InvalidArgumentError
from ditq.quant.config import QDiTConfig
from ditq.quant.search.evaluate import WeightCache, applied
from ditq.quant.search.results import Candidate, SearchResult
from ditq.quant.search.space import BASELINE_GROUP, DEFAULT_GROUPS, Genome, search_space
from ditq.quant.search.state import load_state, save_state

_ATTEMPTS = 10  # attempts per wanted child, per operator (as in the original SPOS-style search)


def _number(value, what: str) -> float:
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
        raise InvalidArgumentError(f"the {what} callable must return a number, got {type(value).__name__}")
    value = float(value)
    return math.inf if math.isnan(value) else value


def _positive(v, name: str, minimum: int = 1) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
        raise InvalidArgumentError(f"{name} must be an integer >= {minimum}, got {v!r}")
    return v


class SearchRun:
    """The mutable state of one search: evaluated candidates, top-k, generator, history."""

    def __init__(self, model, space, fitness, proxy, weights, settings, log):
        self.model, self.space, self.fitness, self.proxy = model, space, fitness, proxy
        self.settings = settings
        self.log = log
        self.cache = WeightCache({n: model.get_submodule(n) for n in space.layers}, weights)
        self.rng = np.random.default_rng(settings["seed"])
        self.records: dict[Genome, Candidate] = {}
        self.top: list[Genome] = []
        self.history: list[dict] = []
        self.generation = 0  # generations completed

    # -- evaluation --------------------------------------------------------------------------------

    def _measure(self, genome: Genome, fns: Sequence[tuple[str, Callable]]) -> list[float]:
        config = self.space.to_config(genome)
        with applied(self.model, config, weight_overrides=self.cache.overrides(config)), torch.no_grad():
            return [_number(fn(self.model), what) for what, fn in fns]

    def evaluate(self, genomes: list[Genome], generation: int) -> tuple[int, int]:
        """Evaluate new genomes (proxy for all when given; real fitness for all or the pre-screened k)."""
        k = self.settings["prescreen"]
        proxies: dict[Genome, float] = {}
        real = list(genomes)
        n_proxy = 0
        if self.proxy is not None and k is not None:
            for g in genomes:
                proxies[g] = self._measure(g, [("proxy", self.proxy)])[0]
            n_proxy = len(genomes)
            forced = [g for g in genomes if g == self.space.baseline]
            rest = sorted((g for g in genomes if g not in forced), key=lambda g: proxies[g])  # stable
            real = forced + rest[: max(k - len(forced), 0)]
        chosen = set(real)
        for g in genomes:
            fit = None
            if g in chosen:
                fns = [("fitness", self.fitness)]
                if self.proxy is not None and g not in proxies:
                    fns.append(("proxy", self.proxy))
                    n_proxy += 1
                values = self._measure(g, fns)
                fit = values[0]
                if len(values) > 1:
                    proxies[g] = values[1]
            self.records[g] = Candidate(g, fit, proxies.get(g), self.space.cost(g), generation)
        return len(chosen), n_proxy

    def update_top(self) -> None:
        order = {g: i for i, g in enumerate(self.records)}
        ranked = sorted(self.records.values(), key=lambda c: (c.rank_key(), order[c.genome]))
        self.top = [c.genome for c in ranked[: self.settings["top_k"]]]

    # -- breeding ----------------------------------------------------------------------------------

    def _accept(self, genome: Genome | None, children: list[Genome], seen: set) -> None:
        if genome is not None and genome not in seen and genome not in self.records:
            children.append(genome)
            seen.add(genome)

    def _fill_random(self, children: list[Genome], seen: set, target: int) -> None:
        for _ in range(_ATTEMPTS * max(target - len(children), 0)):
            if len(children) >= target:
                break
            self._accept(self.space.random_genome(self.rng), children, seen)

    def initial(self) -> list[Genome]:
        children, seen = [], set()
        self._accept(self.space.baseline, children, seen)
        self._fill_random(children, seen, self.settings["population"])
        return children

    def breed(self) -> list[Genome]:
        s, rng, space = self.settings, self.rng, self.space
        children: list[Genome] = []
        seen: set = set()
        parents = self.top
        n = len(space.layers)
        want = len(children) + s["mutations"]
        for _ in range(_ATTEMPTS * s["mutations"]):
            if len(children) >= want or not parents:
                break
            w, a = map(list, zip(*parents[rng.integers(len(parents))], strict=True))
            flips = rng.random((2, n)) < s["mutation_prob"]
            for i in range(n):
                if flips[0, i]:
                    w[i] = space.w_choices[i][rng.integers(len(space.w_choices[i]))]
                if flips[1, i]:
                    a[i] = space.a_choices[i][rng.integers(len(space.a_choices[i]))]
            self._accept(space.repair(w, a, rng), children, seen)
        want = len(children) + s["crossovers"]
        for _ in range(_ATTEMPTS * s["crossovers"]):
            if len(children) >= want or len(parents) < 2:
                break
            i, j = rng.choice(len(parents), size=2, replace=False)
            p, q = parents[i], parents[j]
            pick = rng.random((2, n)) < 0.5
            w = [p[m][0] if pick[0, m] else q[m][0] for m in range(n)]
            a = [p[m][1] if pick[1, m] else q[m][1] for m in range(n)]
            self._accept(space.repair(w, a, rng), children, seen)
        self._fill_random(children, seen, s["population"])
        return children

    # -- one generation ----------------------------------------------------------------------------

    def step(self) -> None:
        start = time.perf_counter()
        g = self.generation
        children = self.initial() if g == 0 else self.breed()
        n_real, n_proxy = self.evaluate(children, g)
        self.update_top()
        fits = [self.records[c].fitness for c in children if self.records[c].fitness is not None]
        finite = [f for f in fits if math.isfinite(f)]
        entry = {
            "generation": g,
            "candidates": len(children),
            "evaluations": n_real,
            "proxy_evaluations": n_proxy,
            "best": self.records[self.top[0]].fitness,
            "mean": sum(finite) / len(finite) if finite else None,
            "seconds": round(time.perf_counter() - start, 3),
        }
        self.history.append(entry)
        self.generation = g + 1
        if self.log is not None:
            mean = f"{entry['mean']:.6g}" if entry["mean"] is not None else "-"
            total = sum(h["evaluations"] for h in self.history)
            self.log(
                f"search generation {g + 1}/{self.settings['generations']}: best {entry['best']:.6g}, "
                f"mean {mean}, {n_real} evaluations ({total} in all), {entry['seconds']:.1f}s"
            )

    def result(self, stopped: bool = False) -> SearchResult:
        best = self.records[self.top[0]]
        base = self.records[self.space.baseline]
        return SearchResult(
            layer_names=self.space.layers,
            best=best.genome,
            best_fitness=best.fitness,
            best_cost=best.cost,
            baseline=base.genome,
            baseline_fitness=base.fitness,
            baseline_cost=base.cost,
            layers=self.space.overrides(best.genome),
            config=self.space.to_config(best.genome),
            generations=self.generation,
            evaluations=sum(c.fitness is not None for c in self.records.values()),
            history=list(self.history),
            evaluated=list(self.records.values()),
            stopped=stopped,
        )


def search(
    model: nn.Module,
    fitness: Callable[[nn.Module], float],
    config: QDiTConfig | None = None,
    *,
    groups: Sequence[int] = DEFAULT_GROUPS,
    a_groups: Sequence[int] | None = None,
    baseline_group: int = BASELINE_GROUP,
    population: int = 50,
    generations: int = 10,
    top_k: int = 10,
    mutations: int = 25,
    crossovers: int = 25,
    mutation_prob: float = 0.1,
    proxy: Callable[[nn.Module], float] | None = None,
    prescreen: int | None = None,
    weights: Callable[[str, int], object] | None = None,
    seed: int = 0,
    state_path: str | Path | None = None,
    log: Callable[[str], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> SearchResult:
    """Evolutionary search of per-layer weight and activation group sizes (see the module doc).

    ``model`` is a float model (its selected layers ``nn.Linear``), left as it was on return or on
    error. ``fitness(model)`` (lower is better) and ``proxy(model)`` are called with the model
    quantized in place under each candidate; ``prescreen=k`` gives the real fitness only to the
    ``k`` best new candidates by proxy per generation. ``weights(name, w_group)`` returns the codes
    of a layer at a group size (a ``GPTQResult`` or ``(codes, scale, zero)``; default round-to-
    nearest), called once per pair. ``state_path`` saves every generation and resumes from it.
    ``log`` gets one line per generation. ``should_stop()`` is asked after each generation (and its
    save); when it says yes the search returns its best so far with ``stopped=True`` and
    ``generations`` the number done.
    """
    if not callable(fitness):
        raise InvalidArgumentError(f"fitness must be a callable fitness(model) -> float, got {fitness!r}")
    if proxy is not None and not callable(proxy):
        raise InvalidArgumentError(f"proxy must be a callable proxy(model) -> float, got {proxy!r}")
    if weights is not None and not callable(weights):
        raise InvalidArgumentError(f"weights must be a callable weights(name, w_group), got {weights!r}")
    if should_stop is not None and not callable(should_stop):
        raise InvalidArgumentError(
            f"should_stop must be a callable should_stop() -> bool, got {should_stop!r}"
        )
    population = _positive(population, "population")
    generations = _positive(generations, "generations")
    top_k = _positive(top_k, "top_k")
    mutations = _positive(mutations, "mutations", 0)
    crossovers = _positive(crossovers, "crossovers", 0)
    if mutations + crossovers > population:
        raise InvalidArgumentError(
            f"mutations + crossovers ({mutations} + {crossovers}) must not exceed population ({population})"
        )
    if isinstance(mutation_prob, bool) or not isinstance(mutation_prob, (int, float)):
        raise InvalidArgumentError(f"mutation_prob must be a probability, got {mutation_prob!r}")
    if not 0.0 <= mutation_prob <= 1.0:
        raise InvalidArgumentError(f"mutation_prob must be in [0, 1], got {mutation_prob!r}")
    if prescreen is not None:
        prescreen = _positive(prescreen, "prescreen")
        if proxy is None:
            raise InvalidArgumentError("prescreen needs a proxy fitness (proxy=...) to rank candidates by")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise InvalidArgumentError(f"seed must be an integer >= 0, got {seed!r}")

    space = search_space(model, config, groups=groups, a_groups=a_groups, baseline_group=baseline_group)
    settings = {
        "population": population,
        "generations": generations,
        "top_k": top_k,
        "mutations": mutations,
        "crossovers": crossovers,
        "mutation_prob": float(mutation_prob),
        "prescreen": prescreen,
        "seed": seed,
        "proxy": proxy is not None,
        "weights": weights is not None,
        "baseline_group": baseline_group,
    }
    run = SearchRun(model, space, fitness, proxy, weights, settings, log)
    path = Path(state_path) if state_path is not None else None
    if path is not None and path.exists():
        load_state(run, path)
        if log is not None:
            log(f"search resumed from {path} after {run.generation} generation(s)")
    while run.generation < generations:
        run.step()
        if path is not None:
            save_state(run, path)
        if should_stop is not None and should_stop():
            return run.result(stopped=True)
    return run.result()
