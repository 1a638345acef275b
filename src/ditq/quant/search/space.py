"""The search space and its costs: per layer, candidate weight and activation group sizes.

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

A genome that breaks a constraint is *repaired* (:meth:`SearchSpace.repair`): random genes of the
broken part move to a cheaper choice until it holds, because in a 112-layer space a uniformly random
genome almost never meets a budget on the *sum* of costs.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, replace

import numpy as np
from torch import nn

from ditq.errors import InvalidArgumentError
from ditq.quant.act_quant import ActQuantizer
from ditq.quant.api import select_layers
from ditq.quant.config import LayerQuant, QDiTConfig, as_qdit_config
from ditq.quant.granularity import valid_group_sizes
from ditq.quant.presets import few_names
from ditq.quant.size import model_size_bytes, quant_bytes

Genome = tuple[tuple[int, int], ...]
"""One ``(w_group, a_group)`` pair per searched layer, in :func:`select_layers` order."""

DEFAULT_GROUPS = (32, 64, 128, 192, 288)
"""Q-DiT's candidate group sizes."""

BASELINE_GROUP = 128
"""The uniform group size whose cost a candidate may not exceed."""

_RESCALE_BITOPS = 16 * 16  # one fp16 multiply-add per partial sum


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
    config = as_qdit_config(config)
    w_groups = _group_list(groups, "groups")
    a_list = _group_list(a_groups, "a_groups", allow_none=True) or w_groups
    if isinstance(baseline_group, bool) or not isinstance(baseline_group, int) or baseline_group < 0:
        raise InvalidArgumentError(f"baseline_group must be an integer >= 0, got {baseline_group!r}")
    layers = select_layers(model, config)
    if not layers:
        floats = [n for n, m in model.named_modules() if n and isinstance(m, nn.Linear)]
        raise InvalidArgumentError(
            f"the search found no float nn.Linear layer to quantize under the config; the model's linear "
            f"layers are e.g. {few_names(floats)}"
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
            g: quant_bytes(c, o, LayerQuant(w_bits=lq.w_bits, w_group=g, w_sym=lq.w_sym), lin.bias, static)
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
