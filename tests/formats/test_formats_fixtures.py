"""``ditq.load`` reads the golden fixture of the original DiT as a user's files would hold it (a bare
state dict, an original training checkpoint, and the ditq checkpoint ``ditq.save`` makes of it), and the
model it builds computes the original's outputs. The TerDiT fixture is read in
tests/formats/test_formats_official_terdit.py."""

from __future__ import annotations

import argparse

import torch

import ditq


def _check(model, dit_ref) -> None:
    with torch.no_grad():
        out = model(dit_ref["x"], dit_ref["t"], dit_ref["y"])
    assert (out - dit_ref["out"]).abs().max() <= 1e-5  # the tolerance of tests/models/test_dit.py


def test_the_official_dit_fixture_loads_from_every_form(tmp_path, dit_ref):
    heads = dit_ref["config"]["num_heads"]  # no registry size is this small: heads are not in the shapes
    bare = tmp_path / "DiT-tiny.pt"
    torch.save(dit_ref["state_dict"], bare)
    model = ditq.load(bare, num_heads=heads)
    _check(model, dit_ref)

    training = tmp_path / "0001000.pt"  # what the original train.py writes; the EMA is what loads
    junk = {k: torch.zeros_like(v) for k, v in dit_ref["state_dict"].items()}
    torch.save(
        {"model": junk, "ema": dit_ref["state_dict"], "opt": {}, "args": argparse.Namespace(model="x")},
        training,
    )
    _check(ditq.load(training, num_heads=heads), dit_ref)

    mine = ditq.save(model, tmp_path / "tiny.safetensors")
    again = ditq.load(mine)
    assert again.config == model.config
    _check(again, dit_ref)
    assert ditq.describe(mine)["config"] == model.config.to_dict()
