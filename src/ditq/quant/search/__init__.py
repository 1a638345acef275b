"""Per-layer granularity search (Q-DiT's automatic granularity allocation): an evolutionary search over
the weight **and** activation group size of every quantized layer, under a real cost constraint.

::

    from ditq import quant
    cfg = quant.QDiTConfig(w_bits=4, a_bits=8)
    result = quant.search(model, fitness, cfg, state_path="search.json", log=print)
    quant.write_layer_config("layers.json", result)              # what `ditq ptq --layer-config` reads
    quant.quantize_(model, quant.QDiTConfig(w_bits=4, a_bits=8,
                                            layers=quant.read_layer_config("layers.json")["layers"]))

Modules, each documenting its part of the contract:

- :mod:`~ditq.quant.search.space`: the genomes (per layer, candidate weight and activation
  groups), their exact costs and the constraint (no more than the uniform-128 baseline).
- :mod:`~ditq.quant.search.evaluate`: a candidate applied in place, never copying the model;
  cached weight codes; a proxy fitness.
- :mod:`~ditq.quant.search.evolution`: :func:`search`, the evolution, fitness and pre-screening.
- :mod:`~ditq.quant.search.state`: the JSON state saved every generation, and exact resume.
- :mod:`~ditq.quant.search.results`: :class:`Candidate` and :class:`SearchResult`.
- :mod:`~ditq.quant.search.layer_config`: the per-layer map as a file
  (:func:`write_layer_config`, :func:`read_layer_config`).

``quant`` never imports ``models``, ``diffusion`` or ``eval``: the fitness is a callable.
"""

from ditq.quant.search.evaluate import applied, output_error_proxy
from ditq.quant.search.evolution import search
from ditq.quant.search.layer_config import (
    LAYER_CONFIG_FORMAT,
    LAYER_CONFIG_VERSION,
    read_layer_config,
    write_layer_config,
)
from ditq.quant.search.results import Candidate, SearchResult
from ditq.quant.search.space import BASELINE_GROUP, DEFAULT_GROUPS, Cost, Genome, SearchSpace, search_space
from ditq.quant.search.state import STATE_FORMAT, STATE_VERSION

__all__ = [
    "BASELINE_GROUP",
    "DEFAULT_GROUPS",
    "LAYER_CONFIG_FORMAT",
    "LAYER_CONFIG_VERSION",
    "STATE_FORMAT",
    "STATE_VERSION",
    "Candidate",
    "Cost",
    "Genome",
    "SearchResult",
    "SearchSpace",
    "applied",
    "output_error_proxy",
    "read_layer_config",
    "search",
    "search_space",
    "write_layer_config",
]
