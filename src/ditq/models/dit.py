"""DiT: Scalable Diffusion Models with Transformers (Peebles & Xie).

A faithful re-implementation of facebookresearch/DiT ``models.py``: the same
module tree and state-dict names, the same initialization, the same numbers.
Attention runs through ``F.scaled_dot_product_attention``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

import torch
from torch import nn

from ditq.errors import InvalidArgumentError
from ditq.models.layers import (
    Attention,
    LabelEmbedder,
    Mlp,
    ModulatedLayerNorm,
    PatchEmbed,
    RMSNorm,
    TimestepEmbedder,
    get_2d_sincos_pos_embed,
    modulate,
)


@dataclass
class DiTConfig:
    """Everything needed to build a :class:`DiT`; stored in every ditq checkpoint."""

    depth: int = 28
    hidden_size: int = 1152
    num_heads: int = 16
    patch_size: int = 2
    input_size: int = 32
    in_channels: int = 4
    num_classes: int = 1000
    class_dropout_prob: float = 0.1
    learn_sigma: bool = True
    mlp_ratio: float = 4.0
    # TerDiT's RMSNorm over each block's 6·hidden adaLN outputs (adaLN_modulation.2), for ternary QAT.
    adaln_norm: bool = False

    arch = "dit"

    def to_dict(self) -> dict:
        return {"arch": self.arch, **asdict(self)}

    @classmethod
    def from_dict(cls, d: dict) -> DiTConfig:
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names - {"arch"})
        if unknown:
            raise InvalidArgumentError(f"unknown DiT config field(s): {', '.join(unknown)}")
        return cls(**{k: v for k, v in d.items() if k in names})

    def validate(self) -> None:
        """Raise a one-line error when the numbers cannot make a model."""
        for name in ("depth", "hidden_size", "num_heads", "patch_size", "input_size", "in_channels"):
            if getattr(self, name) <= 0:
                raise InvalidArgumentError(f"DiT config: {name} must be positive, got {getattr(self, name)}")
        if self.input_size % self.patch_size:
            raise InvalidArgumentError(
                f"DiT config: input_size {self.input_size} is not a multiple of patch_size {self.patch_size}"
            )
        if self.hidden_size % self.num_heads:
            raise InvalidArgumentError(
                f"DiT config: hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}"
            )
        if self.hidden_size % 4:
            raise InvalidArgumentError("DiT config: hidden_size must be a multiple of 4 (sin-cos embedding)")
        if self.num_classes < 1:
            raise InvalidArgumentError(f"DiT config: num_classes must be >= 1, got {self.num_classes}")

    @property
    def out_channels(self) -> int:
        return self.in_channels * 2 if self.learn_sigma else self.in_channels


#################################################################################
#                                 Core DiT Model                                #
#################################################################################


class DiTBlock(nn.Module):
    """A DiT block with adaptive layer norm zero (adaLN-Zero) conditioning.

    ``adaln_norm`` appends TerDiT's RMSNorm (eps 1e-5) over all six chunks:
    ``RMSNorm(Linear(SiLU(c)))``; it tames the ternary adaLN linear's outputs.
    """

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0, adaln_norm: bool = False):
        super().__init__()
        self.norm1 = ModulatedLayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads=num_heads, qkv_bias=True)
        self.norm2 = ModulatedLayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(in_features=hidden_size, hidden_features=int(hidden_size * mlp_ratio))
        modulation: list[nn.Module] = [nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size, bias=True)]
        if adaln_norm:
            modulation.append(RMSNorm(6 * hidden_size, eps=1e-5))
        self.adaLN_modulation = nn.Sequential(*modulation)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(
            6, dim=1
        )  # each (N, D)
        x = x + gate_msa.unsqueeze(1) * self.attn(self.norm1(x, shift_msa, scale_msa))  # (N, T, D)
        x = x + gate_mlp.unsqueeze(1) * self.mlp(self.norm2(x, shift_mlp, scale_mlp))  # (N, T, D)
        return x


class FinalLayer(nn.Module):
    """The final layer of DiT: adaLN (shift, scale) then a linear to patch pixels."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels, bias=True)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size, bias=True))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)  # each (N, D)
        x = modulate(self.norm_final(x), shift, scale)  # (N, T, D)
        return self.linear(x)  # (N, T, p*p*C_out)


class DiT(nn.Module):
    """Diffusion model with a Transformer backbone; ``forward(x, t, y)`` predicts eps (and sigma)."""

    def __init__(self, config: DiTConfig | None = None, **overrides):
        super().__init__()
        config = config or DiTConfig()
        if overrides:
            config = DiTConfig.from_dict({**asdict(config), **overrides})
        config.validate()
        self.config = config
        self.learn_sigma = config.learn_sigma
        self.in_channels = config.in_channels
        self.out_channels = config.out_channels
        self.patch_size = config.patch_size
        self.num_heads = config.num_heads
        self.num_classes = config.num_classes

        D = config.hidden_size
        self.x_embedder = PatchEmbed(config.input_size, config.patch_size, config.in_channels, D, bias=True)
        self.t_embedder = TimestepEmbedder(D)
        self.y_embedder = LabelEmbedder(config.num_classes, D, config.class_dropout_prob)
        # Fixed sin-cos table, a frozen Parameter as in the original: the state-dict
        # key is the same either way, and parameter counts then match the paper's.
        self.pos_embed = nn.Parameter(torch.zeros(1, self.x_embedder.num_patches, D), requires_grad=False)
        self.blocks = nn.ModuleList(
            [
                DiTBlock(D, config.num_heads, mlp_ratio=config.mlp_ratio, adaln_norm=config.adaln_norm)
                for _ in range(config.depth)
            ]
        )
        self.final_layer = FinalLayer(D, config.patch_size, self.out_channels)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """The original initialization: Xavier linears, sin-cos positions, adaLN-Zero."""

        def _basic_init(module: nn.Module) -> None:
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.constant_(module.bias, 0)

        self.apply(_basic_init)

        grid = int(self.x_embedder.num_patches**0.5)
        pos_embed = get_2d_sincos_pos_embed(self.pos_embed.shape[-1], grid)
        self.pos_embed.data.copy_(torch.from_numpy(pos_embed).float().unsqueeze(0))

        # Patch embedding like an nn.Linear (not the Conv2d default).
        w = self.x_embedder.proj.weight.data
        nn.init.xavier_uniform_(w.view([w.shape[0], -1]))
        nn.init.constant_(self.x_embedder.proj.bias, 0)

        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)

        # adaLN-Zero: every block starts as the identity, the output as zero.
        for block in self.blocks:
            nn.init.constant_(block.adaLN_modulation[1].weight, 0)
            nn.init.constant_(block.adaLN_modulation[1].bias, 0)
        nn.init.constant_(self.final_layer.adaLN_modulation[-1].weight, 0)
        nn.init.constant_(self.final_layer.adaLN_modulation[-1].bias, 0)
        nn.init.constant_(self.final_layer.linear.weight, 0)
        nn.init.constant_(self.final_layer.linear.bias, 0)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """(N, T, p*p*C) -> (N, C, H, W); features are in (py, px, c) order."""
        c = self.out_channels
        p = self.x_embedder.patch_size
        h = w = int(x.shape[1] ** 0.5)
        assert h * w == x.shape[1]
        x = x.reshape(x.shape[0], h, w, p, p, c)
        x = torch.einsum("nhwpqc->nchpwq", x)
        return x.reshape(x.shape[0], c, h * p, w * p)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """x (N, C, H, W) latents, t (N,) timesteps, y (N,) labels -> (N, C_out, H, W)."""
        x = self.x_embedder(x) + self.pos_embed  # (N, T, D)
        t = self.t_embedder(t)  # (N, D)
        y = self.y_embedder(y, self.training)  # (N, D)
        c = t + y  # (N, D)
        for block in self.blocks:
            x = block(x, c)  # (N, T, D)
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
        reproduces the original, which guides the first three channels only
        (kept for exact reproducibility of official results); ``None`` guides
        every eps channel.
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
