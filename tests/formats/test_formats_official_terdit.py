"""Official TerDiT checkpoints: the fixture's state dict and a model_args.pth stand-in written to a folder
and loaded through ditq.load; config resolution for the official sizes; one-line errors; labels."""

from __future__ import annotations

import argparse
import collections

import pytest
import torch
from torch import nn

from ditq.errors import CheckpointError
from ditq.formats import load
from ditq.formats import official_terdit as terdit
from ditq.models import LargeDiT, LargeDiTConfig, map_class_labels
from ditq.quant import TernaryLinear

ATOL = RTOL = 1e-5


class _NotPlain:
    """A pickled class: torch.load(weights_only=True) must refuse it."""


def _write(folder, state_dict, args: dict | None, *, name: str = terdit.CHECKPOINT_FILE):
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(state_dict, folder / name)
    if args is not None:
        torch.save(argparse.Namespace(**args), folder / terdit.ARGS_FILE)
    return folder


@pytest.fixture
def release(tmp_path, terdit_ref):
    """A TerDiT release folder: the fixture's checkpoint and its model_args.pth stand-in."""
    return _write(tmp_path / "tiny", terdit_ref["state_dict"], terdit_ref["train_args"])


def _run(model, r):
    with torch.no_grad():
        return model(r["x"], r["t"], r["y"]), model.forward_with_cfg(r["cfg_x"], r["cfg_t"], r["cfg_y"], 4.0)


def test_load_folder_matches_original(release, terdit_ref):
    model = load(release, num_heads=4)
    assert isinstance(model, LargeDiT) and not model.training
    cfg = model.config
    assert (cfg.dim, cfg.n_layers, cfg.n_heads, cfg.input_size, cfg.num_classes) == (64, 2, 4, 8, 10)
    assert cfg.qk_norm and cfg.adaln_norm and cfg.learn_sigma and cfg.label_order == "lexicographic"
    layers = [n for n, m in model.named_modules() if isinstance(m, TernaryLinear)]
    assert len(layers) == 16 and "layers.1.adaLN_modulation.1" in layers
    assert list(model.state_dict()) == terdit_ref["state_dict_keys"]
    out, cfg_out = _run(model, terdit_ref)
    torch.testing.assert_close(out, terdit_ref["out"], atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(cfg_out, terdit_ref["cfg_out"], atol=ATOL, rtol=RTOL)


def test_describe_folder(release, terdit_ref):
    from ditq.formats import loader

    info = loader.describe(release, num_heads=4)
    assert info["format"] == "terdit-official" and info["num_tensors"] == 59
    assert info["config"]["arch"] == "large-dit" and info["config"]["n_heads"] == 4
    assert info["metadata"]["args"]["image_size"] == 64
    with torch.device("meta"):
        float_model = LargeDiT(LargeDiTConfig.from_dict(info["config"]))
    assert info["num_parameters"] == sum(p.numel() for p in float_model.parameters()) + 16  # + 16 alphas
    assert info["dtypes"] == {"float32": 43, "uint8": 16}


def test_load_file_path_and_heads_from_registry(release, terdit_ref):
    # The .pth file itself works too; heads come from the registry's TerDiT-tiny (dim 64, 2 layers).
    model = load(release / terdit.CHECKPOINT_FILE)
    assert model.config.n_heads == 4
    torch.testing.assert_close(_run(model, terdit_ref)[0], terdit_ref["out"], atol=ATOL, rtol=RTOL)


def test_load_qk_norm_false_and_half_precision_floats(tmp_path, terdit_ref):
    variant = terdit_ref["variant_qk_norm_false"]
    # Float tensors stored in bfloat16 load in float32 (as sample.py's copying load_state_dict does).
    sd = collections.OrderedDict(
        (k, v.to(torch.bfloat16) if k.startswith("y_embedder") else v)
        for k, v in variant["state_dict"].items()
    )
    folder = _write(tmp_path / "v", variant["state_dict"], {**terdit_ref["train_args"], "qk_norm": False})
    model = load(folder, num_heads=4)
    assert not model.config.qk_norm
    out, cfg_out = _run(model, terdit_ref)
    torch.testing.assert_close(out, variant["out"], atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(cfg_out, variant["cfg_out"], atol=ATOL, rtol=RTOL)
    bf = load(_write(tmp_path / "bf", sd, {**terdit_ref["train_args"], "qk_norm": False}), num_heads=4)
    assert bf.y_embedder.embedding_table.weight.dtype == torch.float32


def test_official_sizes_resolve_from_model_args():
    """600M and 3B ('4.2B') checkpoints: config from args + shapes, checked on the meta device."""
    for model_name, (dim, n_layers, heads) in terdit.OFFICIAL_SIZES.items():
        if model_name.startswith("DiT_Llama_7B"):
            continue
        args = {"model": model_name, "image_size": 256, "num_classes": 1000, "qk_norm": True}
        cfg = terdit.config_from_args(args, _official_shapes(dim, n_layers, heads))
        assert (cfg.dim, cfg.n_layers, cfg.n_heads, cfg.patch_size, cfg.input_size) == (
            dim,
            n_layers,
            heads,
            2,
            32,
        )
        assert cfg.num_classes == 1000 and cfg.adaln_norm and cfg.label_order == "lexicographic"
        skeleton = terdit.build_skeleton(cfg)
        assert terdit.official_shapes(skeleton) == _official_shapes(dim, n_layers, heads)


def _official_shapes(dim: int, n_layers: int, heads: int) -> dict[str, tuple[int, ...]]:
    """The official checkpoint's shapes, from the fixture README's layout (independent of ditq's code)."""
    cond, hidden = min(dim, 1024), 256 * -(-int(8 * dim / 3) // 256)
    shapes = {
        "x_embedder.weight": (dim, 16),
        "x_embedder.bias": (dim,),
        "t_embedder.mlp.0.weight": (cond, 256),
        "t_embedder.mlp.0.bias": (cond,),
        "t_embedder.mlp.2.weight": (cond, cond),
        "t_embedder.mlp.2.bias": (cond,),
        "y_embedder.embedding_table.weight": (1001, cond),
        "final_layer.linear.weight": (32, dim),
        "final_layer.linear.bias": (32,),
        "final_layer.adaLN_modulation.1.weight": (2 * dim, cond),
        "final_layer.adaLN_modulation.1.bias": (2 * dim,),
    }
    for i in range(n_layers):
        p = f"layers.{i}."
        for name, (out, k) in {
            "attention.wq": (dim, dim), "attention.wk": (dim, dim), "attention.wv": (dim, dim),
            "attention.wo": (dim, dim), "feed_forward.w1": (hidden, dim), "feed_forward.w2": (dim, hidden),
            "feed_forward.w3": (hidden, dim), "adaLN_modulation.1": (6 * dim, cond),
        }.items():  # fmt: skip
            shapes[p + name + ".alphas"] = (1,)
            shapes[p + name + ".weight"] = (out // 4, k)
        shapes[p + "adaLN_modulation.1.bias"] = (6 * dim,)
        shapes[p + "adaLN_modulation.2.weight"] = (6 * dim,)
        for norm in ("attention.q_norm", "attention.k_norm"):
            shapes[p + norm + ".weight"] = shapes[p + norm + ".bias"] = (dim,)
        shapes[p + "attention_norm.weight"] = shapes[p + "ffn_norm.weight"] = (dim,)
    return shapes


#################################################################################
#                                     Errors                                    #
#################################################################################


def _one_line_error(match: str, fn, *args, **kwargs) -> str:
    with pytest.raises(CheckpointError, match=match) as e:
        fn(*args, **kwargs)
    assert "\n" not in str(e.value)
    return str(e.value)


def test_folder_without_model_args(tmp_path, terdit_ref):
    folder = _write(tmp_path / "no_args", terdit_ref["state_dict"], None)
    _one_line_error("has no model_args.pth", load, folder)
    _one_line_error("has no model_args.pth", load, folder / terdit.CHECKPOINT_FILE)
    empty = tmp_path / "empty"
    empty.mkdir()
    torch.save(argparse.Namespace(image_size=64), empty / terdit.ARGS_FILE)
    _one_line_error("has no consolidated_ema_ternary", load, empty)


def test_packed_shapes_that_do_not_fit(tmp_path, terdit_ref):
    sd = dict(terdit_ref["state_dict"])
    sd["layers.0.attention.wq.weight"] = torch.zeros(64, 16, dtype=torch.uint8)  # k4-like, not official
    msg = _one_line_error(
        "shape mismatch", load, _write(tmp_path / "a", sd, terdit_ref["train_args"]), num_heads=4
    )
    assert "layers.0.attention.wq.weight: expected (16, 64), found (64, 16)" in msg
    sd = dict(terdit_ref["state_dict"])
    sd["layers.0.feed_forward.w1.weight"] = sd["layers.0.feed_forward.w1.weight"].float()
    _one_line_error("must be uint8", load, _write(tmp_path / "b", sd, terdit_ref["train_args"]), num_heads=4)
    sd = dict(terdit_ref["state_dict"])
    sd["layers.1.attention.wo.weight"] = torch.full((16, 64), 0xFF, dtype=torch.uint8)  # code 3 everywhere
    _one_line_error("code 3", load, _write(tmp_path / "c", sd, terdit_ref["train_args"]), num_heads=4)
    sd = {k: v for k, v in terdit_ref["state_dict"].items() if k != "layers.1.ffn_norm.weight"}
    _one_line_error(
        "missing keys layers.1.ffn_norm.weight", load, _write(tmp_path / "d", sd, terdit_ref["train_args"])
    )


def test_output_dims_not_divisible_by_4():
    holder = nn.Module()
    holder.proj = TernaryLinear(8, 6)  # k4 needs in % 4 == 0 only; the official layout needs out % 4 == 0
    _one_line_error("6 outputs, not divisible by 4", terdit.official_shapes, holder)
    # A Large-DiT whose dims are not multiples of 4 cannot hold packed weights at all.
    shapes = _official_shapes(64, 1, 4)
    shapes["x_embedder.weight"] = (66, 16)
    cfg = terdit.config_from_args({"image_size": 64}, shapes, num_heads=3)
    _one_line_error("cannot hold packed ternary weights", terdit.build_skeleton, cfg)


def test_model_args_that_do_not_fit(tmp_path, terdit_ref):
    r = terdit_ref
    bad = _write(tmp_path / "classes", r["state_dict"], {**r["train_args"], "num_classes": 1000})
    _one_line_error("num_classes=1000 but the weights have num_classes=10", load, bad, num_heads=4)
    bad = _write(tmp_path / "qk", r["state_dict"], {**r["train_args"], "qk_norm": False})
    _one_line_error("qk_norm", load, bad, num_heads=4)
    bad = _write(
        tmp_path / "size", r["state_dict"], {k: v for k, v in r["train_args"].items() if k != "image_size"}
    )
    _one_line_error("no image_size", load, bad, num_heads=4)
    shapes = _official_shapes(64, 3, 4)  # 3 layers of dim 64: no official or registry size
    _one_line_error("pass num_heads=", terdit.config_from_args, {"model": "mine", "image_size": 64}, shapes)
    good = _write(tmp_path / "good", r["state_dict"], r["train_args"])
    _one_line_error("not 256 px", load, good, num_heads=4, image_size=256)
    torch.save(_NotPlain(), good / terdit.ARGS_FILE)  # a class weights_only refuses
    _one_line_error("does not load", load, good, num_heads=4)
    torch.save([1, 2], good / terdit.ARGS_FILE)
    _one_line_error("not the argparse Namespace", load, good, num_heads=4)
    _write(good, {"model": torch.zeros(1)}, r["train_args"])
    _one_line_error("is not a TerDiT/Large-DiT state dict", load, good, num_heads=4)


#################################################################################
#                                 Class labels                                  #
#################################################################################


def test_imagenet_label_remap(terdit_ref):
    assert terdit.IMAGENET_CLASS_TO_IDX == list(terdit_ref["class_to_idx"])
    assert [terdit.IMAGENET_CLASS_TO_IDX[i] for i in (89, 0, 1, 10, 100)] == [878, 0, 1, 2, 3]
    cfg = terdit.config_from_args(
        {"model": "DiT_Llama_600M_patch2", "image_size": 256}, _official_shapes(1536, 16, 32)
    )
    with torch.device("meta"):
        model = LargeDiT(cfg)
    ids = torch.tensor(terdit_ref["sample_py_default_class_labels"])
    y = torch.cat([map_class_labels(model, ids), torch.full_like(ids, 1000)])
    assert y.tolist() == terdit_ref["sample_py_default_class_labels_mapped"] + [1000] * 8
    assert map_class_labels(model, torch.tensor([1000])).tolist() == [1000]  # the null label is not remapped
