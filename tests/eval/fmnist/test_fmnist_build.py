"""Making the evaluator file (ditq.eval.fmnist.build): its reference is the test set."""

from __future__ import annotations

import pytest
from fmnist_helpers import FAST, TINY

from ditq import checkpoint as ckpt
from ditq.eval.fmnist import evaluate_fmnist, load_fmnist_evaluator


def test_build_writes_a_file_whose_reference_is_the_test_set(built):
    result, (xt, yt) = built
    ev = load_fmnist_evaluator(result.path)
    assert ev.classifier.config == TINY and ev.path == result.path
    # the stored statistics are the test set's, made with the stored (float16) weights
    scores = evaluate_fmnist(xt, yt, evaluator=ev)
    assert abs(scores["fid_fmnist"]) < 1e-6
    assert scores["class_acc"] == pytest.approx(result.test_accuracy) and result.test_accuracy > 0.4
    assert scores["num_images"] == 150
    meta = ev.metadata
    assert meta["kind"] == "fid-fmnist" and meta["command"] == "test"
    assert meta["test_accuracy"] == result.test_accuracy
    assert meta["floor_fid_fmnist"] == result.floor_fid_fmnist == scores["floor_fid_fmnist"] > 0
    assert meta["floor_num_images"] == 250 == result.floor_num_images
    assert list(meta["floor_fid_fmnist_by_n"]) == ["100", "200", "250"]
    assert meta["train_config"]["epochs"] == FAST.epochs
    assert scores["floor_fid_fmnist_at_n"]["num_images"] == 200  # nearest tabulated count to 150
    info, _ = ckpt.read_safetensors_header(result.path)
    assert info["reference.sigma"]["dtype"] == "F64" and info["classifier.head.weight"]["dtype"] == "F16"
