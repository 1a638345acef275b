"""Which linear layers Q-DiT quantizes in known DiT families, as module-name patterns.

Q-DiT quantizes the attention and MLP linears of every transformer block
(weights and their input activations), optionally the blocks' adaLN linears,
and keeps embedders, the final layer and norms in floating point. A
:class:`Preset` says that with names only, so :mod:`ditq.quant` needs no model
class; :func:`preset_for` recognizes a family from the module names.

Families (names checked against the original code):

* ``dit``: facebookresearch/DiT and :class:`ditq.models.DiT`
  (``blocks.{i}.attn.qkv``, ``.attn.proj``, ``.mlp.fc1``, ``.mlp.fc2``; adaLN
  ``blocks.{i}.adaLN_modulation.1``; kept: ``x_embedder``, ``t_embedder``,
  ``y_embedder``, ``final_layer``).
* ``diffusers``: diffusers' ``DiTTransformer2DModel`` and
  ``PixArtTransformer2DModel`` (``BasicTransformerBlock``:
  ``transformer_blocks.{i}.attn1.to_q/to_k/to_v/to_out.0``, the cross-attention
  ``attn2.*`` of PixArt, ``ff.net.0.proj``, ``ff.net.2``; adaLN: DiT's per-block
  ``norm1.linear``, PixArt's shared ``adaln_single.linear``; kept: the per-block
  timestep/label embedders ``norm1.emb.*``, ``caption_projection``,
  ``proj_out*``).
* ``large-dit``: Large-DiT / TerDiT (``layers.{i}.attention.wq/wk/wv/wo``,
  ``layers.{i}.feed_forward.w1/w2/w3``; adaLN ``layers.{i}.adaLN_modulation.1``;
  kept: ``x_embedder`` (a Linear), ``t_embedder``, ``final_layer``).
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable
from dataclasses import dataclass

from torch import nn

from ditq.errors import InvalidArgumentError
from ditq.quant.nn import QuantLinear


def match(name: str, pattern: str) -> bool:
    """fnmatch (``*`` also crosses dots), or ``re:`` + a regex that must match the whole name."""
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], name) is not None
    return fnmatch.fnmatchcase(name, pattern)


def match_any(name: str, patterns: Iterable[str]) -> bool:
    return any(match(name, p) for p in patterns)


@dataclass(frozen=True)
class Preset:
    """A DiT family: the linears to quantize, the optional adaLN ones, and how to recognize it."""

    name: str
    include: tuple[str, ...]
    adaln: tuple[str, ...]
    signature: tuple[str, ...]  # each must match some nn.Linear name for the family to be recognized
    description: str = ""

    def patterns(self, quantize_adaln: bool = False) -> list[str]:
        """Include patterns: the block linears, plus the adaLN linears when asked."""
        return list(self.include) + (list(self.adaln) if quantize_adaln else [])

    def matches(self, linear_names: Iterable[str]) -> bool:
        names = list(linear_names)
        return all(any(match(n, p) for n in names) for p in self.signature)


DIT = Preset(
    name="dit",
    include=("blocks.*.attn.qkv", "blocks.*.attn.proj", "blocks.*.mlp.fc1", "blocks.*.mlp.fc2"),
    adaln=("blocks.*.adaLN_modulation.1",),
    signature=("blocks.*.attn.qkv", "blocks.*.mlp.fc1"),
    description="facebookresearch/DiT naming (ditq.models.DiT)",
)

DIFFUSERS = Preset(
    name="diffusers",
    include=tuple(
        f"transformer_blocks.*.{attn}.{proj}"
        for attn in ("attn1", "attn2")
        for proj in ("to_q", "to_k", "to_v", "to_out.0")
    )
    + ("transformer_blocks.*.ff.net.0.proj", "transformer_blocks.*.ff.net.2"),
    adaln=("transformer_blocks.*.norm1.linear", "adaln_single.linear"),
    signature=("transformer_blocks.*.attn1.to_q", "transformer_blocks.*.ff.net.2"),
    description="diffusers DiTTransformer2DModel / PixArtTransformer2DModel",
)

LARGE_DIT = Preset(
    name="large-dit",
    include=tuple(f"layers.*.attention.w{c}" for c in "qkvo")
    + tuple(f"layers.*.feed_forward.w{c}" for c in "123"),
    adaln=("layers.*.adaLN_modulation.1",),
    signature=("layers.*.attention.wq", "layers.*.feed_forward.w1"),
    description="Large-DiT / TerDiT naming",
)

PRESETS: dict[str, Preset] = {p.name: p for p in (DIT, DIFFUSERS, LARGE_DIT)}


def get_preset(name: str | Preset) -> Preset:
    """A preset by name (``"dit"``, ``"diffusers"``, ``"large-dit"``)."""
    if isinstance(name, Preset):
        return name
    if name not in PRESETS:
        raise InvalidArgumentError(
            f"unknown quantization preset {name!r}; known: {', '.join(PRESETS)} (or 'auto', or None "
            f"for every nn.Linear)"
        )
    return PRESETS[name]


def linear_names(model: nn.Module) -> list[str]:
    """Names of the model's ``nn.Linear`` and :class:`QuantLinear` modules, in ``named_modules`` order."""
    return [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, QuantLinear))]


def preset_for(model: nn.Module | Iterable[str]) -> Preset | None:
    """The preset whose layer names the model has (first match), or None for an unknown family.

    Takes a model or the names of its linear layers.
    """
    names = linear_names(model) if isinstance(model, nn.Module) else list(model)
    for preset in PRESETS.values():
        if preset.matches(names):
            return preset
    return None


def few_names(names, k: int = 5) -> str:
    """``"a, b, c, ... (12 in all)"``: the first ``k`` names, for one-line error messages."""
    names = list(names)
    shown = ", ".join(names[:k]) or "(none)"
    return shown + (f", ... ({len(names)} in all)" if len(names) > k else "")


def set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    """Replace the submodule ``name`` (dotted) of ``model`` by ``module``."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def nothing_selected(
    model: nn.Module, inc: list[str], exc: list[str], already: int, done: str = "quantized"
) -> InvalidArgumentError:
    """The one-line error for include/exclude patterns that select no float linear layer."""
    floats = [n for n, m in model.named_modules() if n and isinstance(m, nn.Linear)]
    hint = f" ({already} layers are already {done})" if already else ""
    return InvalidArgumentError(
        f"no nn.Linear layer matches include {inc} minus exclude {exc}{hint}; the model's linear layers "
        f"are e.g. {few_names(floats)}"
    )
