"""ditq.pipelines.ladder: the rungs' configs, identical samples across rows, the table."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ditq import quant
from ditq.models import DiT, DiTConfig
from ditq.pipelines import ladder, ptq

TINY = DiTConfig(
    depth=1, hidden_size=128, num_heads=2, patch_size=4, input_size=16, in_channels=1, num_classes=4
)


def _dit() -> DiT:
    torch.manual_seed(0)
    model = DiT(TINY)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.05)
    return model.eval()


def test_each_rung_adds_one_ingredient():
    rtn = ladder.rung_config("rtn", 4)
    assert (rtn.w_group, rtn.a_group, rtn.dynamic) == (0, -1, False)
    g = ladder.rung_config("+group128", 4)
    assert (g.w_group, g.a_group, g.dynamic) == (128, 128, False)
    d = ladder.rung_config("+dynamic", 6)
    assert (d.w_bits, d.w_group, d.a_group, d.dynamic, d.layers) == (6, 128, 128, True, {})
    layers = {"blocks.0.attn.qkv": {"w_group": 32, "a_group": 16}}
    assert ladder.rung_config("+search", 4, layers=layers).layers == layers
    assert ladder.rung_config("+gptq", 4, layers=layers).layers == layers
    with pytest.raises(ValueError, match="searched"):
        ladder.rung_config("+search", 4)
    with pytest.raises(ValueError, match="unknown rung"):
        ladder.rung_config("+magic", 4)


def test_rows_share_samples_and_the_search_runs_once(tmp_path):
    model = _dit()
    seen_labels, searches = [], []

    def quality(images, labels):
        seen_labels.append(labels.copy())
        return {"fid": float(images.astype(np.float64).std()), "class_acc": 0.5}

    def search_fn(m, base):
        searches.append(base)
        assert not quant.quantized_layers(m)  # the float model, not a quantized copy
        return {"blocks.0.mlp.fc1": {"w_group": 32, "a_group": 32}}

    calib = quant.CalibrationData(
        torch.randn(8, 1, 16, 16), torch.randint(0, 1000, (8,)), {"y": torch.randint(0, 5, (8,))}
    )
    spec = ptq.EvalSpec(num_samples=8, steps=2, batch_size=8)
    fp = ladder.fp_rows(model, spec, quality, seeds=(0, 1), cache_dir=tmp_path)
    rows = ladder.ladder_rows(model, 4, spec, quality, calib, search_fn=search_fn, cache_dir=tmp_path)
    assert len(list(tmp_path.glob("*.npz"))) == 2 + len(ladder.RUNGS)  # every row's samples are kept
    calls = len(seen_labels)
    again = ladder.fp_rows(model, spec, quality, seeds=(1,), cache_dir=tmp_path)
    assert again[0].fid == fp[1].fid and len(seen_labels) == calls + 1  # evaluated, not re-sampled
    assert [r.method for r in rows] == list(ladder.RUNGS)
    assert len(searches) == 1 and searches[0].a_group == 128
    assert not quant.quantized_layers(model)  # every rung quantized a copy
    assert all(np.array_equal(seen_labels[0], lab) for lab in seen_labels)
    assert rows[-1].size_mb < fp[0].size_mb
    assert "search_seconds" in rows[3].extra
    d = rows[0].to_dict()
    assert set(d) >= {"method", "w_bits", "a_bits", "fid", "class_acc", "size_mb", "samples", "steps"}
    table = ladder.markdown_table(fp + rows)
    assert table.count("\n") == 2 + 2 + 5
    assert "| W4A8 | + GPTQ weights |" in table and "(seed 1)" in table
