"""Per-layer granularity search (Q-DiT's automatic granularity allocation): an evolutionary search over
the weight **and** activation group size of every quantized layer, under a real cost constraint.

::

    from ditq import quant
    cfg = quant.QDiTConfig(w_bits=4, a_bits=8)
    result = quant.search(model, fitness, cfg, state_path="search.json", log=print)
    quant.write_layer_config("layers.json", result)              # what `ditq ptq --layer-config` reads
    quant.quantize_(model, quant.QDiTConfig(w_bits=4, a_bits=8,
                                            layers=quant.read_layer_config("layers.json")["layers"]))

**Space.** One gene per selected layer (:func:`~ditq.quant.api.select_layers` order): a pair
``(w_group, a_group)``. Each is drawn from the candidate set (METHODS §3: 32, 64, 128, 192, 288)
intersected with the sizes that divide the layer's input channels; 0 (per output channel / per
token) is a candidate only when listed. Activation groups are searched only for dynamic activation
quantization (Q-DiT); a weight-only or static layer keeps the config's ``a_group``.

**Cost, and the constraint.** Two numbers, both computed exactly (:class:`Cost`):

* ``weight_bytes``: deployed bytes of the searched layers, as :func:`~ditq.quant.api.model_size_bytes`
  counts them (codes at ``w_bits``, an fp16 scale and zero per (output row, weight group), the bias);
  ``model_bytes`` is the whole model's ``model_size_bytes(model, candidate_config)``;
* ``act_params``: the dynamic (scale, zero) pairs a kernel computes **per token**, summed over the
  searched layers: ``in_features / a_group`` for a layer (1 when per token).

A candidate is feasible when both are no larger than the uniform baseline's: ``w_group = a_group =
128`` where 128 divides the layer's inputs, per channel / per token (``0``) where it does not. The two
constraints are separate on purpose: finer weight groups cost memory once, finer activation groups
cost work on every token, and neither pays for the other. ``bitops`` (per token: ``out·in·w_bits·
a_bits`` for the integer products plus ``16·16`` per fp16 rescale of a partial sum, one partial sum
per segment where both the weight and the activation groups are constant) is reported, not
constrained. The original code used "mean group size >= 128" as a stand-in; ditq does not.

**Evolution** (all numbers configurable). Generation 0 is the baseline genome plus random feasible
genomes, so the search never ends worse than the baseline under the same fitness. Each later
generation is ``mutations`` mutants (a parent drawn uniformly from the top ``top_k``; every weight
and every activation gene resampled independently with ``mutation_prob``), ``crossovers`` uniform
crossovers of two distinct parents (each weight and activation gene from either), then random
genomes up to ``population``. A child that breaks a constraint is *repaired* -- random genes of the
broken part (weights or activations) move to a cheaper choice until it holds -- because in a
112-layer space a uniformly random genome almost never meets a budget on the *sum* of costs; a
child equal to an already evaluated genome (or to another child) is rejected. Each operator gets
``10 ×`` its count in attempts; a space too small to fill the population just yields fewer
candidates. The top-k is updated every generation over everything evaluated (elitist, ties to the
earlier candidate). All randomness comes from one ``numpy`` Generator seeded by ``seed``.

**Fitness** (``fitness(model) -> float``, lower is better, e.g. the FID of N samples) is called under
``torch.no_grad()`` with the model quantized in place under the candidate. It should seed its
sampler identically for every call and compute reference statistics (the reference batch's FID
statistics, fixed noise and labels, full-precision outputs) **once, outside**: the search calls it
per candidate, and recomputing references there was a defect of the original. Fitness values are
memoized per genome (parents are never re-evaluated); NaN counts as +inf.

**Proxy and pre-screening.** ``proxy(model) -> float`` (e.g. :func:`output_error_proxy`, the
noise-prediction error vs the full-precision model on calibration inputs) is computed for every new
candidate. With ``prescreen=k`` only the ``k`` best new candidates by proxy (in generation 0: the
baseline plus the best ``k - 1``) get the real fitness. Ranking: candidates with a real fitness,
by fitness, come before proxy-only ones, by proxy; so the result always has a real fitness.

**No copies.** A candidate is applied by swapping :class:`~ditq.quant.nn.QuantLinear` modules in
(:func:`applied`) and putting the very same float modules back afterwards, even on an exception.
Weight codes are computed once per (layer, weight group) for the whole search (round-to-nearest,
or a ``weights(name, w_group)`` callable such as GPTQ) and cached: the cache holds at most one
``uint8`` copy of a layer's weight per candidate group size.

**Resume.** After every generation a JSON state (settings, space, base config, every evaluated
genome with fitness/proxy/cost, the top-k, the Generator's state, the history) is written
atomically to ``state_path``; calling :func:`search` again with the same arguments continues from
it and ends exactly where an uninterrupted run would. ``generations`` may grow between calls; any
other difference is refused with a one-line error.

**Result.** :class:`SearchResult`; :func:`write_layer_config` stores its per-layer map as::

    {"format": "ditq-layer-config", "version": 1,
     "layers": {"blocks.0.attn.qkv": {"w_group": 64, "a_group": 288}, ...}, "meta": {...}}

and :func:`read_layer_config` returns that dict, its ``layers`` checked as ``QDiTConfig.layers``.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ditq.checkpoint import atomic_write
from ditq.errors import InvalidArgumentError
from ditq.quant.api import (
    _check_config,
    _few,
    _quant_bytes,
    _set_module,
    model_size_bytes,
    quantize_,
    select_layers,
)
from ditq.quant.config import LayerQuant, QDiTConfig
from ditq.quant.granularity import valid_group_sizes
from ditq.quant.nn import ActQuantizer, QuantLinear

Genome = tuple[tuple[int, int], ...]
"""One ``(w_group, a_group)`` pair per searched layer, in :func:`select_layers` order."""

DEFAULT_GROUPS = (32, 64, 128, 192, 288)
"""Q-DiT's candidate group sizes."""

BASELINE_GROUP = 128
"""The uniform group size whose cost a candidate may not exceed."""

LAYER_CONFIG_FORMAT = "ditq-layer-config"
LAYER_CONFIG_VERSION = 1
STATE_FORMAT = "ditq-granularity-search"
STATE_VERSION = 1

_ATTEMPTS = 10  # attempts per wanted child, per operator (as in the original SPOS-style search)
_RESCALE_BITOPS = 16 * 16  # one fp16 multiply-add per partial sum


# ----------------------------------------------------------------------------
# Cost and space
# ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Cost:
    """What a candidate costs; feasible when ``weight_bytes`` and ``act_params`` are within the baseline's.

    ``weight_bytes``: deployed bytes of the searched layers (codes, fp16 scales and zeros, bias, static
    ranges, as :func:`~ditq.quant.api.model_size_bytes` counts them); ``model_bytes``: the whole model;
    ``act_params``: dynamic activation (scale, zero) pairs per token over the searched layers;
    ``bitops``: per token, informational (see the module doc).
    """

    weight_bytes: int
    model_bytes: int
    act_params: int
    bitops: int

    def within(self, budget: Cost) -> bool:
        return self.weight_bytes <= budget.weight_bytes and self.act_params <= budget.act_params

    def to_dict(self) -> dict:
        return asdict(self)


def _group_list(groups, what: str, allow_none: bool = False) -> tuple[int, ...] | None:
    if groups is None and allow_none:
        return None
    if isinstance(groups, int) and not isinstance(groups, bool):
        groups = [groups]
    try:
        values = list(groups)
    except TypeError:
        values = None
    if not values or not all(isinstance(g, int) and not isinstance(g, bool) and g >= 0 for g in values):
        raise InvalidArgumentError(
            f"{what} must be a non-empty list of group sizes >= 0 (0 = per channel / per token), "
            f"got {groups!r}"
        )
    # Canonical order (ascending, 0 = the whole axis last) so a set gives the same search however listed.
    return tuple(sorted(set(values), key=lambda g: (g == 0, g)))


def _fits(g: int, channels: int) -> bool:
    return g == 0 or channels % g == 0


class SearchSpace:
    """The genomes of a model under a base config: per layer, candidate weight and activation groups.

    Build one with :func:`search_space`. ``layers`` are the searched layer names, ``w_choices[i]`` and
    ``a_choices[i]`` the candidate groups of layer ``i``, ``baseline`` the uniform genome whose cost
    bounds every candidate (``budget``).
    """

    def __init__(
        self,
        config: QDiTConfig,
        layers: Sequence[str],
        in_features: Sequence[int],
        out_features: Sequence[int],
        bits: Sequence[tuple[int, int | None]],
        act_searched: Sequence[bool],
        w_choices: Sequence[Sequence[int]],
        a_choices: Sequence[Sequence[int]],
        baseline: Genome,
        w_bytes: Sequence[Mapping[int, int]],
        other_bytes: int,
    ):
        self.config = config
        self.layers = tuple(layers)
        self.in_features = tuple(in_features)
        self.out_features = tuple(out_features)
        self.bits = tuple(bits)
        self.act_searched = tuple(act_searched)
        self.w_choices = tuple(tuple(c) for c in w_choices)
        self.a_choices = tuple(tuple(c) for c in a_choices)
        self.baseline = baseline
        self._w_bytes = [dict(t) for t in w_bytes]
        self._a_params = [
            {g: (1 if g <= 0 else c // g) if searched else 0 for g in set(ch) | {b[1]}}
            for c, searched, ch, b in zip(
                self.in_features, self.act_searched, self.a_choices, baseline, strict=True
            )
        ]
        self._other_bytes = other_bytes
        # cheaper[i][g]: the choices of layer i that cost less than g (repair moves a gene to one).
        self._w_cheaper = [
            {g: tuple(c for c in ch if t[c] < t[g]) for g in t}
            for t, ch in zip(self._w_bytes, self.w_choices, strict=True)
        ]
        self._a_cheaper = [
            {g: tuple(c for c in ch if t[c] < t[g]) for g in t}
            for t, ch in zip(self._a_params, self.a_choices, strict=True)
        ]
        self.budget = self.cost(baseline)

    def __len__(self) -> int:
        return len(self.layers)

    @property
    def size(self) -> int:
        """Number of genomes in the space (feasible or not)."""
        return math.prod(len(w) * len(a) for w, a in zip(self.w_choices, self.a_choices, strict=True))

    # -- costs -------------------------------------------------------------------------------------

    def cost(self, genome: Genome) -> Cost:
        """Bytes, activation parameters per token and BitOps per token of ``genome``."""
        wb = sum(t[w] for t, (w, _) in zip(self._w_bytes, genome, strict=True))
        ap = sum(t[a] for t, (_, a) in zip(self._a_params, genome, strict=True))
        bitops = 0
        for (w, a), c, o, (wbits, abits) in zip(
            genome, self.in_features, self.out_features, self.bits, strict=True
        ):
            wl = w or c
            segments = c // wl
            if abits is not None:
                al = a if a > 0 else c  # static per-tensor ranges and per-token both span the whole row
                segments = c // wl + c // al - c // math.lcm(wl, al)
            bitops += o * c * wbits * (abits or 16) + o * segments * _RESCALE_BITOPS
        return Cost(weight_bytes=wb, model_bytes=wb + self._other_bytes, act_params=ap, bitops=bitops)

    def feasible(self, genome: Genome) -> bool:
        """True when ``genome`` costs no more than the baseline (weight bytes and activation parameters)."""
        return self.cost(genome).within(self.budget)

    # -- genomes <-> configs -----------------------------------------------------------------------

    def overrides(self, genome: Genome) -> dict[str, dict]:
        """``QDiTConfig.layers`` entries for ``genome`` (``a_group`` only where activations are searched)."""
        out = {}
        for name, (w, a), searched in zip(self.layers, genome, self.act_searched, strict=True):
            out[name] = {"w_group": w, "a_group": a} if searched else {"w_group": w}
        return out

    def to_config(self, genome: Genome) -> QDiTConfig:
        """The base config with ``genome``'s group sizes as per-layer overrides (other overrides kept)."""
        layers = {k: dict(v) for k, v in self.config.layers.items()}
        for name, ov in self.overrides(genome).items():
            layers[name] = {**layers.get(name, {}), **ov}
        return replace(self.config, layers=layers)

    def check(self, genome) -> Genome:
        """``genome`` as a tuple of pairs, or a one-line error when it does not belong to this space."""
        try:
            genome = tuple((int(w), int(a)) for w, a in genome)
        except (TypeError, ValueError):
            raise InvalidArgumentError(
                f"a genome is a list of (w_group, a_group) pairs, got {genome!r:.80}"
            ) from None
        if len(genome) != len(self.layers):
            raise InvalidArgumentError(
                f"a genome for this space has {len(self.layers)} (w_group, a_group) pairs, got {len(genome)}"
            )
        for name, (w, a), wc, ac, (bw, ba) in zip(
            self.layers, genome, self.w_choices, self.a_choices, self.baseline, strict=True
        ):
            if w not in wc + (bw,) or a not in ac + (ba,):
                raise InvalidArgumentError(
                    f"genome gives layer {name!r} groups ({w}, {a}); its choices are w_group "
                    f"{list(wc)}, a_group {list(ac)}"
                )
        return genome

    def to_dict(self) -> dict:
        """JSON-able description (layers, shapes, choices, baseline), stored in search states."""
        return {
            "layers": list(self.layers),
            "in_features": list(self.in_features),
            "out_features": list(self.out_features),
            "w_choices": [list(c) for c in self.w_choices],
            "a_choices": [list(c) for c in self.a_choices],
            "baseline": [list(p) for p in self.baseline],
        }

    # -- sampling ----------------------------------------------------------------------------------

    def random_genome(self, rng: np.random.Generator) -> Genome | None:
        """A uniformly random genome, repaired to feasibility (None when it cannot be)."""
        w = [c[rng.integers(len(c))] for c in self.w_choices]
        a = [c[rng.integers(len(c))] for c in self.a_choices]
        return self.repair(w, a, rng)

    def repair(self, w: list[int], a: list[int], rng: np.random.Generator) -> Genome | None:
        """Move random genes of each over-budget part to a cheaper choice until both parts fit."""
        parts = (
            (w, self._w_bytes, self._w_cheaper, self.budget.weight_bytes),
            (a, self._a_params, self._a_cheaper, self.budget.act_params),
        )
        for genes, table, cheaper, budget in parts:
            total = sum(t[g] for t, g in zip(table, genes, strict=True))
            while total > budget:
                movable = [i for i, g in enumerate(genes) if cheaper[i][g]]
                if not movable:
                    return None
                i = movable[rng.integers(len(movable))]
                options = cheaper[i][genes[i]]
                c = options[rng.integers(len(options))]
                total += table[i][c] - table[i][genes[i]]
                genes[i] = c
        return tuple(zip(w, a, strict=True))


def search_space(
    model: nn.Module,
    config: QDiTConfig | None = None,
    *,
    groups: Sequence[int] = DEFAULT_GROUPS,
    a_groups: Sequence[int] | None = None,
    baseline_group: int = BASELINE_GROUP,
) -> SearchSpace:
    """The search space of ``model``'s layers selected by ``config`` (its float ``nn.Linear`` layers).

    ``groups`` are the candidate group sizes (weights, and activations unless ``a_groups`` is given);
    each layer keeps those that divide its input channels, and a layer left with none is a one-line
    error listing its valid sizes. ``baseline_group`` defines the uniform baseline (0 where it does
    not divide a layer).
    """
    config = _check_config(config)
    w_groups = _group_list(groups, "groups")
    a_list = _group_list(a_groups, "a_groups", allow_none=True) or w_groups
    if isinstance(baseline_group, bool) or not isinstance(baseline_group, int) or baseline_group < 0:
        raise InvalidArgumentError(f"baseline_group must be an integer >= 0, got {baseline_group!r}")
    layers = select_layers(model, config)
    if not layers:
        floats = [n for n, m in model.named_modules() if n and isinstance(m, nn.Linear)]
        raise InvalidArgumentError(
            f"the search found no float nn.Linear layer to quantize under the config; the model's linear "
            f"layers are e.g. {_few(floats)}"
        )
    ins, outs, bits, searched, wch, ach, base, w_bytes = [], [], [], [], [], [], [], []
    base_bytes = 0
    for name in layers:
        lin = model.get_submodule(name)
        c, o = lin.in_features, lin.out_features
        lq = config.for_layer(name)
        act = lq.a_bits is not None and lq.dynamic
        w_ok = tuple(g for g in w_groups if _fits(g, c))
        a_ok = tuple(g for g in a_list if _fits(g, c)) if act else (lq.a_group,)
        if not w_ok or not a_ok:
            given = w_groups if not w_ok else a_list
            sizes = ", ".join(map(str, valid_group_sizes(c)))
            raise InvalidArgumentError(
                f"layer {name!r} ({c} input channels): none of the candidate group sizes "
                f"{', '.join(map(str, given))} divides it; valid sizes: {sizes} (or 0 = per channel/token)"
            )
        b = baseline_group if _fits(baseline_group, c) else 0
        pair = (b, b if act else lq.a_group)
        static = 0
        if lq.a_bits is not None and not lq.dynamic:
            static = ActQuantizer(lq.a_bits, lq.a_group, False, False, c, layer=name).n_static_groups
        table = {
            g: _quant_bytes(c, o, LayerQuant(w_bits=lq.w_bits, w_group=g, w_sym=lq.w_sym), lin.bias, static)
            for g in set(w_ok) | {pair[0]}
        }
        ins.append(c)
        outs.append(o)
        bits.append((lq.w_bits, lq.a_bits))
        searched.append(act)
        wch.append(w_ok)
        ach.append(a_ok)
        base.append(pair)
        w_bytes.append(table)
        base_bytes += table[pair[0]]
    space = SearchSpace(config, layers, ins, outs, bits, searched, wch, ach, tuple(base), w_bytes, 0)
    # Everything outside the searched layers, counted once by the function the checkpoint size uses.
    other = model_size_bytes(model, space.to_config(space.baseline)) - base_bytes
    return SearchSpace(config, layers, ins, outs, bits, searched, wch, ach, tuple(base), w_bytes, other)


# ----------------------------------------------------------------------------
# Applying a candidate without copying the model
# ----------------------------------------------------------------------------


@contextmanager
def applied(
    model: nn.Module, config: QDiTConfig, *, weight_overrides: Mapping[str, object] | None = None
) -> Iterator[nn.Module]:
    """Quantize ``model`` in place under ``config`` for the block, then put the float layers back.

    The selected ``nn.Linear`` modules are kept by reference and restored (the same objects, so the
    same parameters) on exit, also when the block raises. ``weight_overrides`` as in
    :func:`~ditq.quant.api.quantize_`. Nothing is copied but the quantized codes.
    """
    config = _check_config(config)
    originals = {name: model.get_submodule(name) for name in select_layers(model, config)}
    try:
        quantize_(model, config, weight_overrides=weight_overrides)
        yield model
    finally:
        for name, module in originals.items():
            _set_module(model, name, module)


class _WeightCache:
    """Weight codes per (layer, bits, group, sym, clip), computed once: RTN, or ``weights(name, w_group)``."""

    def __init__(self, modules: Mapping[str, nn.Linear], weights: Callable | None = None):
        self.modules = dict(modules)  # the float layers, by reference
        self.weights = weights
        self._cache: dict[tuple, object] = {}

    def overrides(self, config: QDiTConfig) -> dict[str, object]:
        out = {}
        for name, linear in self.modules.items():
            lq = config.for_layer(name)
            key = (name, lq.w_bits, lq.w_group, lq.w_sym, str(lq.w_clip))
            if key not in self._cache:
                if self.weights is not None:
                    self._cache[key] = self.weights(name, lq.w_group)
                else:
                    q = QuantLinear.from_float(linear, lq, layer=name)
                    self._cache[key] = (q.qweight, q.w_scale, q.w_zero)
            out[name] = self._cache[key]
        return out


# ----------------------------------------------------------------------------
# Proxy fitness
# ----------------------------------------------------------------------------


def _call(model: nn.Module, batch):
    if isinstance(batch, Mapping):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    return model(batch)


def output_error_proxy(
    model: nn.Module, inputs: Sequence, *, output: Callable[[torch.Tensor], torch.Tensor] | None = None
) -> Callable[[nn.Module], float]:
    """A proxy fitness: relative squared error of the model's outputs vs its full-precision outputs.

    ``inputs``: calibration batches (tuples of positional arguments, e.g. ``(x_t, t, y)``, or dicts
    of keyword arguments). The reference outputs are computed **now**, from ``model`` as it is (call
    this before quantizing), once for the whole search. ``output`` selects what to compare, e.g.
    ``lambda out: out[:, :4]`` for the noise prediction of a learned-sigma DiT. The returned callable
    gives ``Σ‖q − f‖² / Σ‖f‖²`` over all batches.
    """
    batches = list(inputs)
    if not batches:
        raise InvalidArgumentError("output_error_proxy needs at least one calibration batch")
    select = output or (lambda out: out)
    with torch.no_grad():
        refs = [select(_call(model, b)).detach() for b in batches]
    denom = sum(float(r.double().pow(2).sum()) for r in refs) or 1.0

    def proxy(quantized: nn.Module) -> float:
        with torch.no_grad():
            err = sum(
                float((select(_call(quantized, b)).double() - r.double()).pow(2).sum())
                for b, r in zip(batches, refs, strict=True)
            )
        return err / denom

    return proxy


# ----------------------------------------------------------------------------
# Results
# ----------------------------------------------------------------------------


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
    every candidate in evaluation order.
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


# ----------------------------------------------------------------------------
# The search
# ----------------------------------------------------------------------------


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


class _Search:
    """The mutable state of one search: evaluated candidates, top-k, generator, history."""

    def __init__(self, model, space, fitness, proxy, weights, settings, log):
        self.model, self.space, self.fitness, self.proxy = model, space, fitness, proxy
        self.settings = settings
        self.log = log
        self.cache = _WeightCache({n: model.get_submodule(n) for n in space.layers}, weights)
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

    # -- state -------------------------------------------------------------------------------------

    def state(self) -> dict:
        index = {g: i for i, g in enumerate(self.records)}
        return {
            "format": STATE_FORMAT,
            "version": STATE_VERSION,
            "settings": {k: v for k, v in self.settings.items() if k != "generations"},
            "config": self.space.config.to_dict(),
            "space": self.space.to_dict(),
            "generation": self.generation,
            "evaluated": [c.to_dict() for c in self.records.values()],
            "top": [index[g] for g in self.top],
            "rng": self.rng.bit_generator.state,
            "history": self.history,
        }

    def save(self, path: Path) -> None:
        with atomic_write(path) as tmp:
            tmp.write_text(json.dumps(self.state()))  # compact: hundreds of genomes

    def load(self, path: Path) -> None:
        try:
            state = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise InvalidArgumentError(f"search state {path} is not readable JSON ({e}); remove it") from None
        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
            raise InvalidArgumentError(
                f"{path} is not a ditq granularity-search state; pass another state_path"
            )
        if state.get("version") != STATE_VERSION:
            raise InvalidArgumentError(
                f"search state {path} has version {state.get('version')!r}; this ditq reads {STATE_VERSION}"
            )
        mine = {
            "settings": {k: v for k, v in self.settings.items() if k != "generations"},
            "config": json.loads(json.dumps(self.space.config.to_dict())),
            "space": self.space.to_dict(),
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
                genome = self.space.check(c["genome"])
                self.records[genome] = Candidate(
                    genome, c["fitness"], c["proxy"], Cost(**c["cost"]), int(c["generation"])
                )
            genomes = list(self.records)
            self.top = [genomes[i] for i in state["top"]]
            self.rng.bit_generator.state = state["rng"]
            self.history = list(state["history"])
            self.generation = int(state["generation"])
        except (KeyError, TypeError, ValueError, IndexError) as e:
            raise InvalidArgumentError(f"search state {path} is damaged ({e!r}); remove it") from None

    def result(self) -> SearchResult:
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
) -> SearchResult:
    """Evolutionary search of per-layer weight and activation group sizes (see the module doc).

    ``model`` is a float model (its selected layers ``nn.Linear``), left as it was on return or on
    error. ``fitness(model)`` (lower is better) and ``proxy(model)`` are called with the model
    quantized in place under each candidate; ``prescreen=k`` gives the real fitness only to the
    ``k`` best new candidates by proxy per generation. ``weights(name, w_group)`` returns the codes
    of a layer at a group size (a ``GPTQResult`` or ``(codes, scale, zero)``; default round-to-
    nearest), called once per pair. ``state_path`` saves every generation and resumes from it.
    ``log`` gets one line per generation.
    """
    if not callable(fitness):
        raise InvalidArgumentError(f"fitness must be a callable fitness(model) -> float, got {fitness!r}")
    if proxy is not None and not callable(proxy):
        raise InvalidArgumentError(f"proxy must be a callable proxy(model) -> float, got {proxy!r}")
    if weights is not None and not callable(weights):
        raise InvalidArgumentError(f"weights must be a callable weights(name, w_group), got {weights!r}")
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
    run = _Search(model, space, fitness, proxy, weights, settings, log)
    path = Path(state_path) if state_path is not None else None
    if path is not None and path.exists():
        run.load(path)
        if log is not None:
            log(f"search resumed from {path} after {run.generation} generation(s)")
    while run.generation < generations:
        run.step()
        if path is not None:
            run.save(path)
    return run.result()


# ----------------------------------------------------------------------------
# Layer-config files
# ----------------------------------------------------------------------------


def write_layer_config(
    path: str | Path, result_or_layers: SearchResult | Mapping[str, Mapping], meta: Mapping | None = None
) -> Path:
    """Write a per-layer map (a :class:`SearchResult` or a ``QDiTConfig.layers`` dict) as JSON, atomically.

    With a result, ``meta`` starts from its :meth:`SearchResult.summary`; entries given win.
    """
    if isinstance(result_or_layers, SearchResult):
        layers = result_or_layers.layers
        info = result_or_layers.summary()
    elif isinstance(result_or_layers, Mapping):
        layers, info = dict(result_or_layers), {}
    else:
        raise InvalidArgumentError(
            f"write_layer_config takes a SearchResult or a layers dict, got {type(result_or_layers).__name__}"
        )
    if meta is not None and not isinstance(meta, Mapping):
        raise InvalidArgumentError(f"meta must be a dict, got {type(meta).__name__}")
    layers = QDiTConfig(layers=dict(layers)).layers  # one-line errors for bad entries
    doc = {
        "format": LAYER_CONFIG_FORMAT,
        "version": LAYER_CONFIG_VERSION,
        "layers": layers,
        "meta": {**info, **dict(meta or {})},
    }
    try:
        text = json.dumps(doc, indent=1)
    except (TypeError, ValueError) as e:
        raise InvalidArgumentError(f"layer-config meta must be JSON-able: {e}") from None
    path = Path(path)
    with atomic_write(path) as tmp:
        tmp.write_text(text + "\n")
    return path


def read_layer_config(path: str | Path) -> dict:
    """Read a file written by :func:`write_layer_config`: ``{"format", "version", "layers", "meta"}``.

    ``layers`` is checked as ``QDiTConfig.layers`` and can be passed to it directly; whether the
    names exist in a model is checked when quantizing (:func:`~ditq.quant.api.quantize_`).
    """
    path = Path(path)
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        raise InvalidArgumentError(f"layer config {path} does not exist") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InvalidArgumentError(f"layer config {path} is not readable JSON: {e}") from None
    fmt = doc.get("format") if isinstance(doc, dict) else None
    if fmt != LAYER_CONFIG_FORMAT:
        raise InvalidArgumentError(
            f"{path} is not a ditq layer config (format {fmt!r}, expected {LAYER_CONFIG_FORMAT!r}); "
            f"write one with ditq.quant.write_layer_config"
        )
    version = doc.get("version")
    if isinstance(version, bool) or not isinstance(version, int) or not 1 <= version <= LAYER_CONFIG_VERSION:
        raise InvalidArgumentError(
            f"layer config {path} has version {version!r}; this ditq reads version {LAYER_CONFIG_VERSION}"
        )
    meta = doc.get("meta", {})
    if not isinstance(meta, dict):
        raise InvalidArgumentError(f"layer config {path}: meta must be an object, got {type(meta).__name__}")
    try:
        layers = QDiTConfig(layers=doc.get("layers")).layers
    except InvalidArgumentError as e:
        raise InvalidArgumentError(f"layer config {path}: {e}") from None
    return {"format": fmt, "version": version, "layers": layers, "meta": meta}
