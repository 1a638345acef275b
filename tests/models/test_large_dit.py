"""Large-DiT (LLaMA-style DiT, TerDiT's base): architecture against the TerDiT golden fixture, config
round trips, and the class-label orders."""

from __future__ import annotations

import pytest
import torch

from ditq.errors import InvalidArgumentError
from ditq.formats import load, save
from ditq.models import (
    DiT,
    DiTConfig,
    LargeDiT,
    LargeDiTConfig,
    config_from_dict,
    create_model,
    get_config,
    map_class_labels,
)
from ditq.models.large_dit import ffn_hidden_dim, lexicographic_label_table, map_labels, rope_angles
from ditq.quant import TernaryLinear, TernaryQATConfig
from ditq.quant.ternary import empty_ternary_

ATOL = RTOL = 1e-5


def _fixture_config(model_args: dict) -> LargeDiTConfig:
    args = {k: v for k, v in model_args.items() if k != "n_kv_heads"}  # None in every official config
    return LargeDiTConfig(**args, adaln_norm=True)


def _official(model_args: dict, state_dict: dict) -> LargeDiT:
    """A Large-DiT with empty ternary layers, then a plain strict load_state_dict of the official tensors."""
    model = LargeDiT(_fixture_config(model_args))
    empty_ternary_(model, TernaryQATConfig(preset="large-dit"))
    model.load_state_dict(state_dict, strict=True)
    return model.eval()


@pytest.fixture(scope="module")
def ref(terdit_ref):
    return _official(terdit_ref["model_args"], terdit_ref["state_dict"])


def _maxdiff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


#################################################################################
#                            Golden fixture (TerDiT)                            #
#################################################################################


def test_state_dict_keys_and_order_are_the_originals(ref, terdit_ref):
    sd = ref.state_dict()
    assert list(sd) == terdit_ref["state_dict_keys"]
    for k, v in terdit_ref["state_dict"].items():
        if v.dtype == torch.uint8:  # repacked to ditq's "k4" layout: [out, in/4] instead of [out/4, in]
            out4, k_in = v.shape
            assert sd[k].dtype == torch.uint8 and tuple(sd[k].shape) == (4 * out4, k_in // 4)
        else:
            assert torch.equal(sd[k], v), k


def test_packed_weights_unpack_to_the_fixture_ternary_matrices(ref, terdit_ref):
    for key in ("ternary_example", "ternary_example2"):
        layer = ref.get_submodule(terdit_ref[f"{key}_key"].removesuffix(".weight"))
        assert isinstance(layer, TernaryLinear)
        assert torch.equal(layer.ternary_weight(), terdit_ref[f"{key}_unpacked"])


def test_forward_matches_original(ref, terdit_ref):
    with torch.no_grad():
        out = ref(terdit_ref["x"], terdit_ref["t"], terdit_ref["y"])
    assert out.shape == (4, 8, 8, 8)
    torch.testing.assert_close(out, terdit_ref["out"], atol=ATOL, rtol=RTOL)


def test_forward_with_cfg_matches_original(ref, terdit_ref):
    r = terdit_ref
    with torch.no_grad():
        raw = ref(r["cfg_x"], r["cfg_t"], r["cfg_y"])
        cfg = ref.forward_with_cfg(r["cfg_x"], r["cfg_t"], r["cfg_y"], r["cfg_scale"])
        main = ref.forward_with_cfg(r["x"], r["t"], r["y"], 4.0)
    torch.testing.assert_close(raw, r["cfg_forward_raw"], atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(cfg, r["cfg_out"], atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(main, r["cfg_out_main_inputs"], atol=ATOL, rtol=RTOL)
    assert r["cfg_guided_channels"] == 3
    # Channels 3.. keep the per-row conditional / unconditional values.
    torch.testing.assert_close(cfg[:, 3:], raw[:, 3:])
    assert _maxdiff(cfg[:2, :3], raw[:2, :3]) > 1e-3


def test_forward_with_cfg_all_channels(ref, terdit_ref):
    r = terdit_ref
    with torch.no_grad():
        raw = ref(r["cfg_x"], r["cfg_t"], r["cfg_y"])
        full = ref.forward_with_cfg(r["cfg_x"], r["cfg_t"], r["cfg_y"], 4.0, cfg_channels=None)
    cond, uncond = raw[:2, :4], raw[2:, :4]
    torch.testing.assert_close(full[:2, :4], uncond + 4.0 * (cond - uncond))
    torch.testing.assert_close(full[:, 4:], raw[:, 4:])


def test_intermediates_match_original(ref, terdit_ref):
    got: dict[str, torch.Tensor] = {}

    def keep(name):
        return lambda module, inputs, output: got.__setitem__(name, output)

    hooks = [
        ref.x_embedder.register_forward_hook(keep("x_embed")),
        ref.t_embedder.register_forward_hook(keep("t_emb")),
        ref.y_embedder.register_forward_hook(keep("y_emb")),
        ref.final_layer.register_forward_hook(keep("final_layer_out")),
    ]
    for i, layer in enumerate(ref.layers):
        hooks += [
            layer.adaLN_modulation.register_forward_hook(keep(f"layers.{i}.adaLN_modulation_out")),
            layer.attention.register_forward_hook(keep(f"layers.{i}.attention_out")),
            layer.feed_forward.register_forward_hook(keep(f"layers.{i}.feed_forward_out")),
            layer.register_forward_hook(keep(f"layers.{i}.out")),
        ]
    try:
        with torch.no_grad():
            ref(terdit_ref["x"], terdit_ref["t"], terdit_ref["y"])
    finally:
        for h in hooks:
            h.remove()
    expected = terdit_ref["intermediates"]
    assert set(got) == set(expected)
    for name, want in expected.items():
        torch.testing.assert_close(got[name], want, atol=ATOL, rtol=RTOL, msg=name)


def test_rope_angles_match_freqs_cis(terdit_ref):
    freqs = terdit_ref["freqs_cis_real"]  # (T=16, hd/2=8, (cos, sin))
    angles = rope_angles(16, 16)
    torch.testing.assert_close(torch.cos(angles), freqs[..., 0], atol=1e-6, rtol=0)
    torch.testing.assert_close(torch.sin(angles), freqs[..., 1], atol=1e-6, rtol=0)
    # Position 1 rotates pair i by theta^(-2i/hd): pair 0 by 1 rad, the last by 10000^(-14/16).
    assert angles[1, 0] == 1.0 and torch.isclose(angles[1, 7], torch.tensor(10000 ** (-14 / 16)))


def test_qk_norm_false_variant_matches_original(terdit_ref):
    variant = terdit_ref["variant_qk_norm_false"]
    assert variant["model_args"]["qk_norm"] is False
    model = _official(variant["model_args"], variant["state_dict"])
    assert len(model.state_dict()) == 51 and not any("q_norm" in k for k in model.state_dict())
    r = terdit_ref
    with torch.no_grad():
        out = model(r["x"], r["t"], r["y"])
        cfg = model.forward_with_cfg(r["cfg_x"], r["cfg_t"], r["cfg_y"], 4.0)
    torch.testing.assert_close(out, variant["out"], atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(cfg, variant["cfg_out"], atol=ATOL, rtol=RTOL)


def test_lexicographic_labels_are_terdit_class_to_idx(terdit_ref):
    table = lexicographic_label_table(1000)
    assert table == list(terdit_ref["class_to_idx"])
    ids = torch.tensor(terdit_ref["sample_py_default_class_labels"] + [terdit_ref["sample_py_null_label"]])
    mapped = map_labels(ids, 1000, "lexicographic")
    assert mapped.tolist() == terdit_ref["sample_py_default_class_labels_mapped"] + [1000]  # null kept


#################################################################################
#                              Architecture, configs                            #
#################################################################################


def test_ffn_hidden_sizes():
    assert [ffn_hidden_dim(d) for d in (64, 1536, 3072, 4096)] == [256, 4096, 8192, 11008]
    assert ffn_hidden_dim(64, ffn_dim_multiplier=2.0) == 512  # int(2 * 170) = 340 -> 512


def test_tiny_forward_shapes_and_adaln_zero():
    model = create_model("LargeDiT-tiny", input_size=8, num_classes=10).eval()
    assert not model.config.adaln_norm and len(model.layers[0].adaLN_modulation) == 2
    x = torch.randn(3, 4, 8, 8)
    out = model(x, torch.tensor([0, 5, 999]), torch.tensor([0, 9, 10]))
    assert out.shape == (3, 8, 8, 8)
    assert out.abs().max() == 0  # adaLN-Zero and a zero output layer
    tiny = create_model("TerDiT-tiny", input_size=8, num_classes=10)
    assert "layers.1.adaLN_modulation.2.weight" in tiny.state_dict()
    with pytest.raises(InvalidArgumentError, match="square latents"):
        model(torch.randn(1, 4, 8, 6), torch.tensor([0]), torch.tensor([0]))


def test_patchify_and_unpatchify_orders():
    model = LargeDiT(LargeDiTConfig(dim=64, n_layers=1, n_heads=4, input_size=4, patch_size=2, num_classes=2))
    x = torch.arange(4 * 4 * 4, dtype=torch.float32).view(1, 4, 4, 4)  # value = c*16 + row*4 + col
    tokens = model.patchify(x)  # (1, 4, 16)
    # Token 1 is the patch at rows 0-1, cols 2-3; features in (c, py, px) order.
    assert tokens[0, 1, :4].tolist() == [2.0, 3.0, 6.0, 7.0]  # channel 0
    assert tokens[0, 1, 4].item() == 16 + 2  # channel 1 starts at feature p*p
    # Unpatchify reads features in (py, px, c) order: feature (py*p + px)*C_out + c.
    feats = torch.zeros(1, 4, 2 * 2 * 8)
    feats[0, 1, (1 * 2 + 0) * 8 + 5] = 1.0  # token 1, py=1, px=0, channel 5
    img = model.unpatchify(feats)
    assert img.shape == (1, 8, 4, 4) and img[0, 5, 1, 2] == 1.0 and img.sum() == 1.0


def test_config_round_trip_and_validation(tmp_path):
    cfg = get_config("TerDiT-tiny", input_size=8, num_classes=10)
    d = cfg.to_dict()
    assert d["arch"] == "large-dit" and config_from_dict(d) == cfg
    with pytest.raises(InvalidArgumentError, match="unknown Large-DiT config field"):
        LargeDiTConfig.from_dict({**d, "depth": 3})
    for bad, match in (
        ({"n_heads": 3}, "even head size"),
        ({"input_size": 7}, "multiple of patch_size"),
        ({"label_order": "alphabetical"}, "label_order"),
        ({"dim": 0}, "positive integer"),
    ):
        with pytest.raises(InvalidArgumentError, match=match):
            LargeDiT(cfg, **bad)
    # A float Large-DiT saves and reloads as a ditq checkpoint, bit for bit.
    torch.manual_seed(0)
    model = LargeDiT(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.05)
    save(model.eval(), tmp_path / "m.safetensors")
    loaded = load(tmp_path / "m.safetensors")
    assert isinstance(loaded, LargeDiT) and loaded.config == cfg
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([3, 700]), torch.tensor([1, 10])
    with torch.no_grad():
        assert torch.equal(loaded(x, t, y), model(x, t, y))


def test_map_class_labels_follows_the_config():
    with torch.device("meta"):
        terdit = LargeDiT(LargeDiTConfig(dim=64, n_layers=1, n_heads=4, label_order="lexicographic"))
        dit = DiT(DiTConfig(depth=1, hidden_size=64, num_heads=4, input_size=8))
    y = torch.tensor([89, 0, 10, 100, 1000])
    assert map_class_labels(terdit, y).tolist() == [878, 0, 2, 3, 1000]
    assert terdit.map_labels(y).tolist() == [878, 0, 2, 3, 1000]
    assert map_class_labels(dit, y).tolist() == y.tolist()
    with pytest.raises(InvalidArgumentError, match="out of range"):
        map_class_labels(terdit, torch.tensor([1001]))
    with pytest.raises(InvalidArgumentError, match="integers"):
        map_class_labels(terdit, torch.tensor([1.0]))
