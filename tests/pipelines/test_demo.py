"""ditq.pipelines.demo: the first-contact run, end to end, kept small."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

import ditq
from ditq.errors import InvalidArgumentError
from ditq.eval.fmnist import FMNISTClassifier, FMNISTClassifierConfig, save_fmnist_evaluator
from ditq.pipelines import demo
from ditq.pipelines.demo import (
    DEMO_CONFIG,
    FASHION_MNIST_CLASSES,
    find_embedded_model,
    tiny_demo_model,
)


def run_demo(*args, **kwargs):
    """:func:`demo.run_demo` without its ternary and deployment parts unless a test asks for them
    (they have tests of their own below)."""
    kwargs.setdefault("ternary_steps", 0)
    kwargs.setdefault("deploy", False)
    return demo.run_demo(*args, **kwargs)


def test_find_embedded_model_is_a_file_or_none():
    path = find_embedded_model()
    assert path is None or (path.is_file() and path.name == "ditq-fmnist.safetensors")


def test_tiny_demo_model_is_small_and_seeded():
    model = tiny_demo_model(seed=3)
    assert model.config == DEMO_CONFIG and not model.training
    assert model.config.num_classes == len(FASHION_MNIST_CLASSES) == 10
    assert sum(p.numel() for p in model.parameters()) < 2_000_000
    same = tiny_demo_model(seed=3)
    assert all(
        (a == b).all() for a, b in zip(model.state_dict().values(), same.state_dict().values(), strict=True)
    )


def test_run_demo_with_the_random_stand_in(tmp_path, monkeypatch):
    monkeypatch.setattr(demo, "find_embedded_model", lambda: None)
    lines: list[str] = []
    result = run_demo(
        tmp_path / "out",
        ptq_samples=0,
        samples_per_class=1,
        steps=2,
        log=lines.append,
        train=False,
        eval_samples=0,
    )
    assert not result.trained and result.num_samples == 10 and result.training is None
    assert result.evaluation is None and not (tmp_path / "out" / "eval_samples.npz").exists()
    assert any("randomly initialized" in line for line in lines)
    assert any(str(result.grid_path) in line for line in lines)
    with np.load(result.npz_path) as data:
        assert data["arr_0"].shape == (10, 32, 32, 3) and data["arr_0"].dtype == np.uint8
        assert data["arr_1"].tolist() == list(range(10))
    with Image.open(result.grid_path) as im:
        assert im.format == "PNG"


def test_run_demo_loads_the_embedded_model(tmp_path, monkeypatch):
    path = tmp_path / "ditq-fmnist.safetensors"
    ditq.save(tiny_demo_model(seed=1), path)
    monkeypatch.setattr(demo, "find_embedded_model", lambda: path)
    lines: list[str] = []
    result = run_demo(
        tmp_path / "out",
        ptq_samples=0,
        samples_per_class=1,
        steps=2,
        log=lines.append,
        train=False,
        eval_samples=0,
    )
    assert result.trained and result.model_path == path
    assert any("embedded" in line for line in lines)
    assert not any("randomly" in line for line in lines)


def test_run_demo_rejects_nonpositive_counts(tmp_path):
    with pytest.raises(InvalidArgumentError, match="samples_per_class"):
        run_demo(tmp_path, ptq_samples=0, samples_per_class=0, log=lambda _: None)
    with pytest.raises(InvalidArgumentError, match="eval_samples") as e:
        run_demo(tmp_path, ptq_samples=0, eval_samples=1, log=lambda _: None)
    assert "\n" not in str(e.value)


def test_run_demo_trains_a_tiny_model_and_can_run_again(tmp_path, monkeypatch):
    monkeypatch.setattr(demo, "find_embedded_model", lambda: None)
    for _ in range(2):  # a second demo replaces the first one's training run
        lines: list[str] = []
        result = run_demo(
            tmp_path,
            ptq_samples=0,
            samples_per_class=1,
            steps=2,
            train_steps=3,
            log=lines.append,
            eval_samples=0,
        )
    training = result.training
    assert training is not None and training.steps == 3
    assert training.model_path.is_file() and training.log_path.is_file()
    assert training.last_checkpoint.is_file()
    assert any(line.startswith("loss ") for line in lines)
    assert any(str(training.model_path) in line for line in lines)
    assert ditq.load(training.model_path).config.input_size == 16


#################################################################################
#                            Scoring with FID-FMNIST                            #
#################################################################################


@pytest.fixture
def tiny_classifier(tmp_path, monkeypatch):
    """An untrained tiny FID-FMNIST classifier file standing in for the shipped one."""
    path = tmp_path / "clf.safetensors"
    model = FMNISTClassifier(FMNISTClassifierConfig(widths=(8, 16))).eval()
    floors = {"100": 3.0, "1000": 1.0}
    meta = {"floor_fid_fmnist": 1.0, "floor_num_images": 1000, "floor_fid_fmnist_by_n": floors}
    save_fmnist_evaluator(path, model, np.zeros(16), np.eye(16), meta)
    monkeypatch.setattr(demo, "default_evaluator_path", lambda: path)
    monkeypatch.setattr(demo, "find_embedded_model", lambda: None)
    return path


def test_run_demo_scores_a_balanced_batch_whose_first_rows_are_the_grid(tmp_path, tiny_classifier):
    lines: list[str] = []
    kwargs = dict(samples_per_class=1, steps=2, train=False, seed=4)
    result = run_demo(tmp_path / "a", ptq_samples=0, eval_samples=30, log=lines.append, **kwargs)
    evaluation = result.evaluation
    assert evaluation is not None and evaluation["num_images"] == 30
    assert evaluation["fid_fmnist"] > 0 and 0 <= evaluation["class_acc"] <= 1
    assert evaluation["floor_fid_fmnist_at_n"] == {"num_images": 100, "value": 3.0}
    assert any(line.startswith("FID-FMNIST ") and "on 30 samples" in line for line in lines)
    assert any("floor" in line and "3 at 100 images (1 at 1000)" in line for line in lines)
    assert any("ditq eval" in line and "--evaluator fmnist" in line for line in lines)
    with np.load(tmp_path / "a" / "eval_samples.npz") as data:
        scored, labels = data["arr_0"], data["arr_1"]
    assert scored.shape == (30, 32, 32, 3) and np.bincount(labels).tolist() == [3] * 10
    with np.load(result.npz_path) as data:
        grid = data["arr_0"]
    assert grid.shape == (10, 32, 32, 3) and (grid == scored[:10]).all()
    # the grid is the same images as without scoring: the extra samples come after it
    plain = run_demo(tmp_path / "b", ptq_samples=0, eval_samples=0, log=lambda _: None, **kwargs)
    with np.load(plain.npz_path) as data:
        assert (data["arr_0"] == grid).all()


def test_run_demo_names_the_published_evaluation_for_the_embedded_model(
    tmp_path, tiny_classifier, monkeypatch
):
    path = tmp_path / "ditq-fmnist.safetensors"
    ditq.save(tiny_demo_model(seed=1), path)
    monkeypatch.setattr(demo, "find_embedded_model", lambda: path)
    published = {"fid_fmnist": 12.5, "class_acc": 0.875, "samples": 1000, "steps": 50, "cfg_scale": 3.0}
    monkeypatch.setattr(demo, "published_evaluation", lambda: published)
    lines: list[str] = []
    run_demo(
        tmp_path / "out",
        ptq_samples=0,
        samples_per_class=1,
        steps=2,
        train=False,
        eval_samples=10,
        log=lines.append,
    )
    assert any("FID-FMNIST 12.50, class accuracy 87.5% on 1000 samples, DDIM-50" in line for line in lines)


def test_run_demo_without_a_classifier_says_so(tmp_path, monkeypatch):
    monkeypatch.setattr(demo, "default_evaluator_path", lambda: None)
    monkeypatch.setattr(demo, "find_embedded_model", lambda: None)
    lines: list[str] = []
    result = run_demo(
        tmp_path, ptq_samples=0, samples_per_class=1, steps=2, train=False, eval_samples=50, log=lines.append
    )
    assert result.evaluation is None and any("no FID-FMNIST classifier" in line for line in lines)
    with np.load(result.npz_path) as data:
        assert len(data["arr_0"]) == 10  # nothing more was sampled


def test_published_evaluation_is_none_or_has_the_documented_keys():
    published = demo.published_evaluation()
    if published is None:
        pytest.skip("docs/results/embedded_eval.json is not beside this checkout")
    for key in ("fid_fmnist", "class_acc", "floor_fid_fmnist", "samples", "steps"):
        assert key in published


def test_the_fast_ptq_ladder_scores_every_rung_on_the_same_samples(tmp_path):
    if find_embedded_model() is None:
        pytest.skip("no embedded model in this install")
    lines: list[str] = []
    result = run_demo(
        tmp_path, samples_per_class=1, steps=2, train=False, eval_samples=0, ptq_samples=4, log=lines.append
    )
    rows = result.ptq
    assert [(r["method"], r["w_bits"]) for r in rows] == [
        ("fp", None), ("+dynamic", 8), ("rtn", 4), ("+dynamic", 4), ("+gptq", 4)
    ]  # fmt: skip
    assert all(r["samples"] == 4 and r["steps"] == 10 for r in rows)
    assert rows[2]["size_mb"] < rows[1]["size_mb"] < rows[0]["size_mb"]
    assert sum("FID-FMNIST" in line for line in lines) == 5
    with pytest.raises(InvalidArgumentError, match="ptq_samples"):
        run_demo(tmp_path, ptq_samples=1, log=lambda _: None)


@pytest.mark.skipif(find_embedded_model() is None, reason="no embedded model in this install")
def test_the_ternary_part_distils_scores_and_deploys(tmp_path, monkeypatch):
    from ditq.quant import TernaryLinear

    monkeypatch.setattr(demo, "DEMO_DISTILL_POOL", 8)  # teacher samples
    monkeypatch.setattr(demo, "DEMO_DISTILL_BATCH", 4)
    monkeypatch.setattr(demo, "DEMO_PTQ_SAMPLES", 4)  # images scored, FP and ternary alike
    lines: list[str] = []
    result = run_demo(
        tmp_path, samples_per_class=1, steps=2, train=False, eval_samples=0, ptq_samples=0,
        ternary_steps=3, deploy=True, log=lines.append,
    )  # fmt: skip
    t = result.ternary
    path = tmp_path / "ternary" / "model.safetensors"
    assert t is not None and t["model_path"] == str(path) and t["steps"] == 3 and t["samples"] == 4
    assert t["checkpoint_bytes"] == path.stat().st_size < t["fp32_bytes"] / 7  # 2-bit block linears
    assert np.isfinite(t["fid"]) and np.isfinite(t["fp_fid"])
    student = ditq.load(path)
    layers = [m for m in student.modules() if isinstance(m, TernaryLinear)]
    assert len(layers) == 30 and all(m.act_bits == 8 for m in layers)  # every block linear, W1.58A8
    assert student.config.adaln_norm  # TerDiT's adaLN RMSNorm
    text = "\n".join(lines)
    assert "no dataset read" in text and "ternary  FID-FMNIST" in text and "x smaller than float32" in text
    assert [r["name"] for r in result.deployed] == ["FP32", "W8A8", "ternary"]
    from ditq.kernels import ops

    if "cpu" in ops.available_backends():  # the deployed ternary model runs the integer kernel
        assert "w158a8_linear" in result.deployed[2]["kernels"]
    assert "ms/step" in text and (tmp_path / "deploy" / "w8a8.safetensors").is_file()


def test_run_demo_rejects_negative_ternary_steps(tmp_path):
    with pytest.raises(InvalidArgumentError, match="ternary_steps"):
        run_demo(tmp_path, ptq_samples=0, ternary_steps=-1, log=lambda _: None)
