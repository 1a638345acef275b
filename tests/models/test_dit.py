"""DiT (ditq.models.dit) against facebookresearch/DiT's outputs (fixtures/dit_ref_tiny.pt), its
adaLN-Zero initialization, and the optional adaLN RMSNorm."""

import torch

from ditq.formats.official_dit import infer_config
from ditq.models import DiT, DiTConfig, create_model


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


def test_initialization_is_adaln_zero():
    model = create_model("DiT-S/4", input_size=16, num_classes=10)
    x = torch.randn(2, 4, 16, 16)
    out = model(x, torch.tensor([1, 500]), torch.tensor([0, 10]))
    assert out.shape == (2, 8, 16, 16)
    assert out.abs().max() == 0  # adaLN-Zero: the untrained model outputs zeros
    for block in model.blocks:
        assert block.adaLN_modulation[-1].weight.abs().max() == 0
    assert model.pos_embed.requires_grad is False


def test_dit_adaln_norm_is_off_by_default_and_adds_one_key_per_block():
    cfg = DiTConfig(depth=2, hidden_size=64, num_heads=4, input_size=8, num_classes=10)
    plain = DiT(cfg)
    assert len(plain.state_dict()) == 32 and cfg.to_dict()["adaln_norm"] is False
    normed = DiT(cfg, adaln_norm=True)
    extra = set(normed.state_dict()) - set(plain.state_dict())
    assert extra == {"blocks.0.adaLN_modulation.2.weight", "blocks.1.adaLN_modulation.2.weight"}
    assert infer_config(normed.state_dict(), num_heads=4).adaln_norm is True
    assert infer_config(plain.state_dict(), num_heads=4).adaln_norm is False
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([1, 2]), torch.tensor([0, 10])
    assert normed(x, t, y).abs().max() == 0  # still adaLN-Zero: RMSNorm(0) = 0
    with torch.no_grad():
        for p in normed.parameters():
            if p.requires_grad:
                p.normal_(0, 0.05)
    block = normed.blocks[0]
    c = torch.randn(2, 64)
    lin = block.adaLN_modulation[1](torch.nn.functional.silu(c))
    want = lin * torch.rsqrt(lin.pow(2).mean(-1, keepdim=True) + 1e-5) * block.adaLN_modulation[2].weight
    torch.testing.assert_close(block.adaLN_modulation(c), want)
