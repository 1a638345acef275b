"""The model registry (ditq.models.registry): every DiT and Large-DiT size builds with the original
names and parameter counts; listing by architecture; overrides and unknown names as clear errors."""

from __future__ import annotations

import pytest
import torch

from ditq.errors import InvalidArgumentError, UnknownModelError
from ditq.models import DiT, DiTConfig, create_model, get_config, list_models


def _expected_original_shapes(cfg: DiTConfig) -> dict[str, tuple[int, ...]]:
    """State-dict names and shapes of facebookresearch/DiT, written out independently."""
    D, p, C = cfg.hidden_size, cfg.patch_size, cfg.in_channels
    T = (cfg.input_size // p) ** 2
    hidden = int(D * cfg.mlp_ratio)
    c_out = 2 * C if cfg.learn_sigma else C
    shapes = {
        "pos_embed": (1, T, D),
        "x_embedder.proj.weight": (D, C, p, p),
        "x_embedder.proj.bias": (D,),
        "t_embedder.mlp.0.weight": (D, 256),
        "t_embedder.mlp.0.bias": (D,),
        "t_embedder.mlp.2.weight": (D, D),
        "t_embedder.mlp.2.bias": (D,),
        "y_embedder.embedding_table.weight": (cfg.num_classes + 1, D),
        "final_layer.linear.weight": (p * p * c_out, D),
        "final_layer.linear.bias": (p * p * c_out,),
        "final_layer.adaLN_modulation.1.weight": (2 * D, D),
        "final_layer.adaLN_modulation.1.bias": (2 * D,),
    }
    for i in range(cfg.depth):
        b = f"blocks.{i}."
        for name, (o, k) in {
            "attn.qkv": (3 * D, D),
            "attn.proj": (D, D),
            "mlp.fc1": (hidden, D),
            "mlp.fc2": (D, hidden),
            "adaLN_modulation.1": (6 * D, D),
        }.items():
            shapes[b + name + ".weight"] = (o, k)
            shapes[b + name + ".bias"] = (o,)
    return shapes


# Parameter counts at patch 2, input 32, from the paper / METHODS.md (in millions, 0.1 M precision).
PAPER_PARAMS_M = {"DiT-S/2": 33.0, "DiT-B/2": 130.5, "DiT-XL/2": 675.1}


@pytest.mark.parametrize("name", list_models("dit"))
def test_registry_configs_build_with_original_names(name):
    cfg = get_config(name)
    with torch.device("meta"):
        model = DiT(cfg)
    sd = model.state_dict()
    expected = _expected_original_shapes(cfg)
    assert {k: tuple(v.shape) for k, v in sd.items()} == expected
    # A state dict in the original naming loads strictly into a fresh model.
    with torch.device("meta"):
        fresh = DiT(cfg)
    fresh.load_state_dict(
        {k: torch.empty(s, device="meta") for k, s in expected.items()}, strict=True, assign=True
    )
    n_params = sum(p.numel() for p in model.parameters())
    if name in PAPER_PARAMS_M:
        assert round(n_params / 1e6, 1) == PAPER_PARAMS_M[name]


def test_registry_has_all_twelve():
    assert len(list_models("dit")) == 12
    assert get_config("DiT-L/4").depth == 24 and get_config("DiT-L/4").patch_size == 4


def test_overrides_and_errors():
    cfg = get_config("DiT-XL/2", input_size=64, num_classes=10)
    assert cfg.input_size == 64 and cfg.num_classes == 10 and cfg.depth == 28
    with pytest.raises(UnknownModelError, match="valid names: DiT-S/2"):
        get_config("DiT-XXL/2")
    with pytest.raises(InvalidArgumentError):
        get_config("DiT-S/2", bogus=1)
    with pytest.raises(InvalidArgumentError, match="multiple of patch_size"):
        create_model("DiT-S/8", input_size=12)


def _expected_params(dim: int, n_layers: int, heads: int, num_classes: int = 1000) -> int:
    """Float Large-DiT parameters with QK-norm and the adaLN RMSNorm, written out from the spec."""
    cond = min(dim, 1024)
    hidden = 256 * -(-int(8 * dim / 3) // 256)
    layer = 4 * dim * dim + 3 * dim * hidden  # wq wk wv wo, w1 w2 w3
    layer += 4 * dim + 2 * dim  # q_norm/k_norm weight+bias, attention_norm, ffn_norm
    layer += cond * 6 * dim + 6 * dim + 6 * dim  # adaLN linear + bias, adaLN RMSNorm
    embed = (16 + 1) * dim + (256 + 1) * cond + (cond + 1) * cond + (num_classes + 1) * cond
    final = (cond + 1) * 2 * dim + (dim + 1) * 32
    return n_layers * layer + embed + final


@pytest.mark.parametrize(
    "name, dims, billions",
    [("TerDiT-600M", (1536, 16, 32), 0.6), ("TerDiT-4.2B", (3072, 32, 32), 4.2)],
)
def test_registry_sizes_on_meta(name, dims, billions):
    cfg = get_config(name)
    assert (cfg.dim, cfg.n_layers, cfg.n_heads) == dims and cfg.adaln_norm and cfg.qk_norm
    with torch.device("meta"):
        model = create_model(name)
    n = sum(p.numel() for p in model.parameters())
    assert n == _expected_params(*dims)
    assert round(n / 1e9, 1) == billions
    assert model.layers[0].adaLN_modulation[1].in_features == 1024  # conditioning width min(dim, 1024)
    assert model.layers[0].feed_forward.w1.out_features == {1536: 4096, 3072: 8192}[dims[0]]


def test_list_models_by_arch():
    assert len(list_models("dit")) == 12
    assert {"TerDiT-600M", "TerDiT-4.2B", "TerDiT-tiny", "LargeDiT-tiny"} == set(list_models("large-dit"))
    assert set(list_models()) == set(list_models("dit")) | set(list_models("large-dit"))
    with pytest.raises(InvalidArgumentError, match="unknown architecture"):
        list_models("unet")
