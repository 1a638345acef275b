"""Large-DiT: the LLaMA-style DiT that TerDiT builds on.

TerDiT: Lu et al., "Ternary Diffusion Models with Transformers". A
re-implementation of Alpha-VLLM Large-DiT ``DiT_Llama`` as TerDiT's
inference code runs it (``Lucky-Lance/TerDiT`` ``models.py``), with the same
module tree and state-dict names, so an official TerDiT checkpoint loads into
it (see :mod:`ditq.formats.official_terdit`). Differences from DiT: pre-norm RMSNorm
(eps 1e-5), attention ``wq/wk/wv/wo`` without bias and with optional QK-norm
(LayerNorm over the full q and k projections, before RoPE), 1-D rotary
position embedding over the flattened patch sequence instead of an absolute
one, a SwiGLU feed-forward, a conditioning width of ``min(dim, 1024)``, and a
patch embedding that is a ``Linear`` over patchified features.

``adaln_norm=True`` is TerDiT's one architectural change: an RMSNorm over all
``6·dim`` outputs of each block's adaLN linear, before chunking. Official
TerDiT checkpoints have it (``layers.{i}.adaLN_modulation.2.weight``).

Every linear here is a float ``nn.Linear``; ternary layers are a module swap
(:func:`ditq.quant.quantize_` with a ``TernaryQATConfig``, or the official
checkpoint loader), never a different model class.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

from ditq.errors import InvalidArgumentError
from ditq.models.layers import (
    LabelEmbedder,
    ModulatedRMSNorm,
    RMSNorm,
    SwiGLU,
    TimestepEmbedder,
    modulate,
)

LABEL_ORDERS = ("identity", "lexicographic")
"""How class ids map to the rows of the label table (see :attr:`LargeDiTConfig.label_order`)."""


@dataclass
class LargeDiTConfig:
    """Everything needed to build a :class:`LargeDiT`; field names follow ``DiT_Llama.__init__``.

    ``label_order`` says which label-table row a class id uses: ``"identity"``
    (row = id), or ``"lexicographic"`` (row = position of ``str(id)`` in the
    sorted list of ``str(0..num_classes-1)``: official TerDiT checkpoints were
    trained on an ImageFolder of folders named by ImageNet id, so 89 -> 878).
    ``forward`` always takes rows; :meth:`LargeDiT.map_labels` turns ids into rows.
    """

    input_size: int = 32
    patch_size: int = 2
    in_channels: int = 4
    dim: int = 1536
    n_layers: int = 16
    n_heads: int = 32
    multiple_of: int = 256
    ffn_dim_multiplier: float | None = None
    norm_eps: float = 1e-5
    class_dropout_prob: float = 0.1
    num_classes: int = 1000
    learn_sigma: bool = True
    qk_norm: bool = True
    adaln_norm: bool = False
    rope_theta: float = 10000.0
    label_order: str = "identity"

    arch = "large-dit"

    def to_dict(self) -> dict:
        return {"arch": self.arch, **asdict(self)}

    @classmethod
    def from_dict(cls, d: dict) -> LargeDiTConfig:
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names - {"arch"})
        if unknown:
            raise InvalidArgumentError(f"unknown Large-DiT config field(s): {', '.join(unknown)}")
        return cls(**{k: v for k, v in d.items() if k in names})

    def validate(self) -> None:
        """Raise a one-line error when the numbers cannot make a model."""
        for name in ("input_size", "patch_size", "in_channels", "dim", "n_layers", "n_heads", "multiple_of"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise InvalidArgumentError(
                    f"Large-DiT config: {name} must be a positive integer, got {value!r}"
                )
        if self.input_size % self.patch_size:
            raise InvalidArgumentError(
                f"Large-DiT config: input_size {self.input_size} is not a multiple of "
                f"patch_size {self.patch_size}"
            )
        if self.dim % self.n_heads or (self.dim // self.n_heads) % 2:
            raise InvalidArgumentError(
                f"Large-DiT config: dim {self.dim} / n_heads {self.n_heads} must be an even head size "
                "(RoPE rotates pairs)"
            )
        if self.num_classes < 1:
            raise InvalidArgumentError(f"Large-DiT config: num_classes must be >= 1, got {self.num_classes}")
        if self.label_order not in LABEL_ORDERS:
            raise InvalidArgumentError(
                f"Large-DiT config: label_order must be one of {', '.join(LABEL_ORDERS)}, "
                f"got {self.label_order!r}"
            )
        if self.ffn_dim_multiplier is not None and self.ffn_dim_multiplier <= 0:
            raise InvalidArgumentError(
                "Large-DiT config: ffn_dim_multiplier must be positive or None, "
                f"got {self.ffn_dim_multiplier}"
            )

    @property
    def out_channels(self) -> int:
        return self.in_channels * 2 if self.learn_sigma else self.in_channels

    @property
    def cond_dim(self) -> int:
        """Width of the conditioning vector c = t_emb + y_emb: ``min(dim, 1024)``."""
        return min(self.dim, 1024)

    @property
    def ffn_hidden(self) -> int:
        """SwiGLU width: ``int(2·4·dim/3)``, times ``ffn_dim_multiplier``, rounded up to ``multiple_of``."""
        return ffn_hidden_dim(self.dim, self.multiple_of, self.ffn_dim_multiplier)

    @property
    def num_tokens(self) -> int:
        return (self.input_size // self.patch_size) ** 2


def ffn_hidden_dim(dim: int, multiple_of: int = 256, ffn_dim_multiplier: float | None = None) -> int:
    """LLaMA's SwiGLU hidden size: 64 -> 256, 1536 -> 4096, 3072 -> 8192, 4096 -> 11008."""
    hidden = int(2 * (4 * dim) / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


#################################################################################
#                          Norms and rotary embedding                           #
#################################################################################


def rope_angles(num_tokens: int, head_dim: int, theta: float = 10000.0, device=None) -> torch.Tensor:
    """(T, head_dim/2) float32 angles ``pos · theta^(-2i/head_dim)`` for positions 0..T-1."""
    freqs = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device)[: head_dim // 2].float() / head_dim))
    pos = torch.arange(num_tokens, device=device, dtype=torch.float32)
    return torch.outer(pos, freqs)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent feature pairs (2i, 2i+1) of x (B, T, H, hd) by the angles of cos/sin (T, hd/2).

    The LLaMA-1 interleaved layout (``view_as_complex``), not GPT-NeoX's
    half split, computed in float32 with real arithmetic (works on any device).
    """
    xf = x.float().reshape(*x.shape[:-1], -1, 2)  # (B, T, H, hd/2, 2)
    x0, x1 = xf[..., 0], xf[..., 1]
    cos, sin = cos[None, :, None, :], sin[None, :, None, :]  # (1, T, 1, hd/2)
    out = torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], dim=-1)
    return out.flatten(-2).type_as(x)


#################################################################################
#                            Attention and feed-forward                         #
#################################################################################


class Attention(nn.Module):
    """Multi-head self-attention: wq/wk/wv/wo without bias, optional QK-norm, 1-D RoPE."""

    def __init__(self, dim: int, n_heads: int, qk_norm: bool):
        super().__init__()
        self.n_heads = n_heads
        self.head_dim = dim // n_heads
        self.wq = nn.Linear(dim, dim, bias=False)
        self.wk = nn.Linear(dim, dim, bias=False)
        self.wv = nn.Linear(dim, dim, bias=False)
        self.wo = nn.Linear(dim, dim, bias=False)
        # LayerNorm over the whole projection (all heads together), before RoPE.
        self.q_norm = nn.LayerNorm(dim, eps=1e-5) if qk_norm else nn.Identity()
        self.k_norm = nn.LayerNorm(dim, eps=1e-5) if qk_norm else nn.Identity()

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        q, k, v = self.q_norm(self.wq(x)), self.k_norm(self.wk(x)), self.wv(x)  # each (B, T, D)
        q = apply_rope(q.view(B, T, self.n_heads, self.head_dim), cos, sin)  # (B, T, H, hd)
        k = apply_rope(k.view(B, T, self.n_heads, self.head_dim), cos, sin)  # (B, T, H, hd)
        v = v.view(B, T, self.n_heads, self.head_dim)  # (B, T, H, hd)
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        )  # (B,H,T,hd)
        return self.wo(out.transpose(1, 2).reshape(B, T, D))  # (B, T, D)


class FeedForward(nn.Module):
    """SwiGLU feed-forward: ``w2(silu(w1 x) * w3 x)``, no biases."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)
        self.act = SwiGLU()  # no parameters: the state dict is w1, w2, w3 as in the original

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(self.act(self.w1(x), self.w3(x)))  # (..., hidden) -> (..., dim)


#################################################################################
#                                Large-DiT model                                #
#################################################################################


class TransformerBlock(nn.Module):
    """Pre-norm (RMSNorm) block with DiT's adaLN: six chunks from ``SiLU -> Linear [-> RMSNorm]``."""

    def __init__(self, config: LargeDiTConfig):
        super().__init__()
        D = config.dim
        # Registration order gives the original state-dict key order.
        self.attention = Attention(D, config.n_heads, config.qk_norm)
        self.feed_forward = FeedForward(D, config.ffn_hidden)
        self.attention_norm = ModulatedRMSNorm(D, eps=config.norm_eps)
        self.ffn_norm = ModulatedRMSNorm(D, eps=config.norm_eps)
        modulation: list[nn.Module] = [nn.SiLU(), nn.Linear(config.cond_dim, 6 * D, bias=True)]
        if config.adaln_norm:  # TerDiT: normalize the whole 6·dim vector, before chunking
            modulation.append(RMSNorm(6 * D, eps=config.norm_eps))
        self.adaLN_modulation = nn.Sequential(*modulation)

    def forward(self, x: torch.Tensor, c: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(
            6, dim=1
        )  # each (N, D)
        h = self.attention_norm(x, shift_msa, scale_msa)  # (N, T, D)
        x = x + gate_msa.unsqueeze(1) * self.attention(h, cos, sin)  # (N, T, D)
        h = self.ffn_norm(x, shift_mlp, scale_mlp)  # (N, T, D)
        return x + gate_mlp.unsqueeze(1) * self.feed_forward(h)  # (N, T, D)


class FinalLayer(nn.Module):
    """LayerNorm (no affine) -> adaLN (shift, scale; full precision, no RMSNorm) -> linear to patch pixels."""

    def __init__(self, dim: int, cond_dim: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(dim, patch_size * patch_size * out_channels, bias=True)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(cond_dim, 2 * dim, bias=True))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)  # each (N, D)
        return self.linear(modulate(self.norm_final(x), shift, scale))  # (N, T, p*p*C_out)


class LargeDiT(nn.Module):
    """LLaMA-style DiT (``DiT_Llama``); ``forward(x, t, y)`` predicts eps (and sigma)."""

    def __init__(self, config: LargeDiTConfig | None = None, **overrides):
        super().__init__()
        config = config or LargeDiTConfig()
        if overrides:
            config = LargeDiTConfig.from_dict({**asdict(config), **overrides})
        config.validate()
        self.config = config
        self.learn_sigma = config.learn_sigma
        self.in_channels = config.in_channels
        self.out_channels = config.out_channels
        self.patch_size = config.patch_size
        self.num_classes = config.num_classes

        p, C, D, cond = config.patch_size, config.in_channels, config.dim, config.cond_dim
        self.x_embedder = nn.Linear(p * p * C, D, bias=True)
        self.t_embedder = TimestepEmbedder(cond)
        self.y_embedder = LabelEmbedder(config.num_classes, cond, config.class_dropout_prob)
        self.layers = nn.ModuleList([TransformerBlock(config) for _ in range(config.n_layers)])
        self.final_layer = FinalLayer(D, cond, p, self.out_channels)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """DiT's initialization: Xavier linears, N(0, 0.02) embedders, adaLN-Zero, zero output."""

        def _basic_init(module: nn.Module) -> None:
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.constant_(module.bias, 0)

        self.apply(_basic_init)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for layer in self.layers:  # adaLN-Zero: every block starts as the identity
            nn.init.constant_(layer.adaLN_modulation[1].weight, 0)
            nn.init.constant_(layer.adaLN_modulation[1].bias, 0)
        nn.init.constant_(self.final_layer.adaLN_modulation[1].weight, 0)
        nn.init.constant_(self.final_layer.adaLN_modulation[1].bias, 0)
        nn.init.constant_(self.final_layer.linear.weight, 0)
        nn.init.constant_(self.final_layer.linear.bias, 0)

    def patchify(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) -> (N, T, C*p*p); tokens in raster order, features in (c, py, px) order."""
        N, C, H, W = x.shape
        p = self.patch_size
        x = x.view(N, C, H // p, p, W // p, p).permute(0, 2, 4, 1, 3, 5)  # (N, h, w, C, p, p)
        return x.flatten(-3).flatten(1, 2)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """(N, T, p*p*C) -> (N, C, H, W); features in (py, px, c) order (unlike :meth:`patchify`)."""
        c = self.out_channels
        p = self.patch_size
        h = w = int(x.shape[1] ** 0.5)
        assert h * w == x.shape[1]
        x = x.reshape(x.shape[0], h, w, p, p, c)
        x = torch.einsum("nhwpqc->nchpwq", x)
        return x.reshape(x.shape[0], c, h * p, w * p)

    def rope(self, num_tokens: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin), each (T, head_dim/2) float32, of the 1-D rotary embedding over tokens 0..T-1."""
        angles = rope_angles(
            num_tokens, self.config.dim // self.config.n_heads, self.config.rope_theta, device
        )
        return torch.cos(angles), torch.sin(angles)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """x (N, C, H, W) latents, t (N,) timesteps, y (N,) label rows -> (N, C_out, H, W)."""
        if x.shape[-1] != x.shape[-2] or x.shape[-1] % self.patch_size:
            raise InvalidArgumentError(
                f"Large-DiT takes square latents with a side divisible by {self.patch_size}, "
                f"got {tuple(x.shape)}"
            )
        x = self.x_embedder(self.patchify(x))  # (N, T, D)
        # Not a buffer: the angles are cheap, and the original keeps them out of the state dict.
        cos, sin = self.rope(x.shape[1], x.device)  # each (T, hd/2)
        t = self.t_embedder(t)  # (N, cond)
        y = self.y_embedder(y, self.training)  # (N, cond)
        c = t + y  # (N, cond)
        for layer in self.layers:
            x = layer(x, c, cos, sin)  # (N, T, D)
        x = self.final_layer(x, c)  # (N, T, p*p*C_out)
        return self.unpatchify(x)  # (N, C_out, H, W)

    def forward_with_cfg(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        y: torch.Tensor,
        cfg_scale: float,
        cfg_channels: int | None = 3,
    ) -> torch.Tensor:
        """Classifier-free guidance over a batch whose second half carries null labels.

        Only the first half of ``x`` is used (duplicated). ``cfg_channels=3``
        reproduces the original (DiT's code, copied by Large-DiT and TerDiT),
        which guides the first three channels only; ``None`` guides every eps
        channel.
        """
        half = x[: len(x) // 2]
        combined = torch.cat([half, half], dim=0)
        model_out = self.forward(combined, t, y)
        n = self.in_channels if cfg_channels is None else cfg_channels
        eps, rest = model_out[:, :n], model_out[:, n:]
        cond_eps, uncond_eps = torch.split(eps, len(eps) // 2, dim=0)
        half_eps = uncond_eps + cfg_scale * (cond_eps - uncond_eps)
        eps = torch.cat([half_eps, half_eps], dim=0)
        return torch.cat([eps, rest], dim=1)

    def map_labels(self, class_ids: torch.Tensor) -> torch.Tensor:
        """Class ids (e.g. ImageNet ids) -> the label rows this model was trained with (null stays null)."""
        return map_labels(class_ids, self.config.num_classes, self.config.label_order)


def lexicographic_label_table(num_classes: int) -> list[int]:
    """``table[id]`` = position of ``str(id)`` in ``sorted(str(i) for i in range(num_classes))``.

    An ImageFolder over folders named ``0 .. num_classes-1`` numbers its classes
    this way; for ImageNet it is TerDiT's ``class_to_idx.json`` (89 -> 878).
    """
    names = sorted(str(i) for i in range(num_classes))
    position = {name: i for i, name in enumerate(names)}
    return [position[str(i)] for i in range(num_classes)]


def map_labels(class_ids: torch.Tensor, num_classes: int, label_order: str = "identity") -> torch.Tensor:
    """Class ids in ``[0, num_classes]`` -> label rows under ``label_order``; the null id is kept."""
    if label_order not in LABEL_ORDERS:
        raise InvalidArgumentError(
            f"label_order must be one of {', '.join(LABEL_ORDERS)}, got {label_order!r}"
        )
    ids = torch.as_tensor(class_ids)
    if ids.is_floating_point() or ids.dtype == torch.bool:
        raise InvalidArgumentError(f"class labels must be integers, got {ids.dtype}")
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) > num_classes):
        bad = int(ids.min()) if int(ids.min()) < 0 else int(ids.max())
        raise InvalidArgumentError(
            f"class label {bad} is out of range: this model has {num_classes} classes "
            f"(0..{num_classes - 1}, and {num_classes} for the null label)"
        )
    if label_order == "identity":
        return ids
    table = torch.tensor(lexicographic_label_table(num_classes) + [num_classes], device=ids.device)
    return table[ids.long()].to(ids.dtype)


def map_class_labels(model: nn.Module, class_ids: torch.Tensor) -> torch.Tensor:
    """Class ids -> the labels ``model`` was trained with (``config.label_order``); the null label is kept.

    The identity for DiT and every model trained by ditq; the lexicographic
    ImageFolder order for official TerDiT checkpoints (ImageNet 89 -> 878).
    """
    config = getattr(model, "config", None)
    if config is None:
        return torch.as_tensor(class_ids)
    return map_labels(class_ids, config.num_classes, getattr(config, "label_order", "identity"))


__all__ = [
    "LABEL_ORDERS",
    "LargeDiT",
    "LargeDiTConfig",
    "RMSNorm",
    "apply_rope",
    "ffn_hidden_dim",
    "lexicographic_label_table",
    "map_class_labels",
    "map_labels",
    "rope_angles",
]
