import pytest
import torch

from ditq.errors import InvalidArgumentError, UnknownModelError
from ditq.models import DiT, DiTConfig, create_model, get_config, list_models


def test_fixture_state_dict_has_original_names(dit_ref):
    model = DiT(DiTConfig(**dit_ref["config"]))
    assert list(model.state_dict()) == list(dit_ref["state_dict"])
    assert len(dit_ref["state_dict"]) == 32


def test_forward_matches_original(ref_model, dit_ref):
    with torch.no_grad():
        out = ref_model(dit_ref["x"], dit_ref["t"], dit_ref["y"])
    assert out.shape == dit_ref["out"].shape
    assert (out - dit_ref["out"]).abs().max() <= 1e-5


def test_forward_with_cfg_matches_original(ref_model, dit_ref):
    with torch.no_grad():
        out = ref_model.forward_with_cfg(
            dit_ref["cfg_x"], dit_ref["cfg_t"], dit_ref["cfg_y"], dit_ref["cfg_scale"]
        )
    assert (out - dit_ref["out_cfg"]).abs().max() <= 1e-5


def test_forward_with_cfg_all_channels_guides_channel_3(ref_model, dit_ref):
    args = (dit_ref["cfg_x"], dit_ref["cfg_t"], dit_ref["cfg_y"], 4.0)
    with torch.no_grad():
        orig = ref_model.forward_with_cfg(*args)
        full = ref_model.forward_with_cfg(*args, cfg_channels=None)
        raw = ref_model(torch.cat([args[0][:2], args[0][:2]]), args[1], args[2])
    torch.testing.assert_close(full[:, :3], orig[:, :3])
    cond, uncond = raw[:2, 3], raw[2:, 3]
    torch.testing.assert_close(full[:2, 3], uncond + 4.0 * (cond - uncond))
    torch.testing.assert_close(orig[:2, 3], raw[:2, 3])  # the original leaves channel 3 unguided
    torch.testing.assert_close(full[:, 4:], raw[:, 4:])  # sigma channels never guided


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


def test_initialization_is_adaln_zero():
    model = create_model("DiT-S/4", input_size=16, num_classes=10)
    x = torch.randn(2, 4, 16, 16)
    out = model(x, torch.tensor([1, 500]), torch.tensor([0, 10]))
    assert out.shape == (2, 8, 16, 16)
    assert out.abs().max() == 0  # adaLN-Zero: the untrained model outputs zeros
    for block in model.blocks:
        assert block.adaLN_modulation[-1].weight.abs().max() == 0
    assert model.pos_embed.requires_grad is False


def test_pos_embed_is_fixed_sincos():
    model = create_model("DiT-S/4", input_size=16)
    pe = model.pos_embed[0]  # (16 tokens, 384)
    # token 0 sits at the origin: sin terms 0, cos terms 1 in both halves
    half = pe.shape[1] // 2
    assert torch.allclose(pe[0, : half // 2], torch.zeros(half // 2))
    assert torch.allclose(pe[0, half // 2 : half], torch.ones(half // 2))
    assert torch.allclose(pe[1, half:], pe[0, half:])  # same row -> same second half
    assert not torch.allclose(pe[1, :half], pe[0, :half])  # next column -> first half differs


def test_label_dropout_only_in_training():
    model = create_model("DiT-S/4", input_size=8, num_classes=10, class_dropout_prob=0.5)
    y = torch.zeros(1000, dtype=torch.long)
    dropped = model.y_embedder.token_drop(y)
    assert 0.4 < (dropped == 10).float().mean() < 0.6
    emb = model.y_embedder(y, train=False)
    assert torch.equal(emb, model.y_embedder.embedding_table.weight[0].expand(1000, -1))


def test_timestep_embedding_cos_first():
    from ditq.models.layers import TimestepEmbedder

    emb = TimestepEmbedder.timestep_embedding(torch.tensor([0.0, 3.0]), 256)
    assert torch.equal(emb[0, :128], torch.ones(128)) and torch.equal(emb[0, 128:], torch.zeros(128))
    assert torch.isclose(emb[1, 0], torch.cos(torch.tensor(3.0)))
    assert torch.isclose(emb[1, 128], torch.sin(torch.tensor(3.0)))
