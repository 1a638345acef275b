"""``ditq eval`` (ditq.cli.eval) end to end: with a tiny feature extractor (no Inception weights), and with
``--evaluator fmnist`` and a tiny FID-FMNIST classifier; bad options and files as one-line errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from ditq.cli.main import main
from ditq.eval import evaluator as E
from ditq.eval import metrics as M
from ditq.eval.npz import write_reference
from ditq.images import save_npz

_PROJ = torch.Generator().manual_seed(0)
_W_POOL = torch.randn(48, 6, generator=_PROJ)
_W_PROBS = torch.randn(48, 5, generator=_PROJ)


def tiny_extractor(batch: np.ndarray) -> dict[str, torch.Tensor]:
    """Deterministic stand-in for the Inception: 4x4 mean-pooled pixels, projected."""
    x = torch.from_numpy(np.asarray(batch)).float().permute(0, 3, 1, 2) / 255
    x = torch.nn.functional.adaptive_avg_pool2d(x, 4).flatten(1)  # N, 48
    return {
        "pool": x @ _W_POOL,
        "spatial": x[:, :4],
        "logits": x @ _W_PROBS,
        "probs": torch.softmax(4 * x @ _W_PROBS, 1),
    }


def _images(n, seed, shift=0):
    rng = np.random.default_rng(seed)
    return np.clip(rng.integers(0, 200, size=(n, 8, 8, 3)) + shift, 0, 255).astype(np.uint8)


def _stats(images, key):
    return M.feature_statistics(tiny_extractor(images)[key].numpy())


@pytest.fixture
def files(tmp_path, monkeypatch):
    monkeypatch.setattr(E, "load_inception", lambda *a, **k: tiny_extractor)
    samples, ref_images = _images(40, seed=1), _images(30, seed=2, shift=20)
    save_npz(tmp_path / "samples.npz", samples, np.arange(40) % 10)
    mu, sigma = _stats(ref_images, "pool")
    mu_s, sigma_s = _stats(ref_images, "spatial")
    write_reference(tmp_path / "ref.npz", images=ref_images, mu=mu, sigma=sigma, mu_s=mu_s, sigma_s=sigma_s)
    write_reference(tmp_path / "ref_images_only.npz", images=ref_images)
    write_reference(tmp_path / "ref_stats_only.npz", mu=mu, sigma=sigma, mu_s=mu_s, sigma_s=sigma_s)
    return {"dir": tmp_path, "samples": samples, "ref_images": ref_images}


#################################################################################
#                                  ditq eval                                    #
#################################################################################


def test_cli_eval_prints_a_table_and_writes_json(files, capsys):
    d = files["dir"]
    out = d / "out" / "eval.json"
    rc = main(
        [
            "eval",
            str(d / "samples.npz"),
            "--ref",
            str(d / "ref.npz"),
            "--batch-size",
            "16",
            "--json",
            str(out),
        ]
    )
    assert rc == 0
    stdout = capsys.readouterr().out
    for label in ("FID", "sFID", "Inception Score", "Precision", "Recall", "40 images, 8x8"):
        assert label in stdout
    result = json.loads(out.read_text())
    direct = E.evaluate(d / "samples.npz", d / "ref.npz", progress=False)
    assert result["metrics"] == pytest.approx(direct["metrics"])
    assert f"{result['metrics']['fid']:.4f}" in stdout


def test_cli_eval_metric_subset_and_quiet(files, capsys):
    d = files["dir"]
    out = d / "eval.json"
    argv = ["eval", str(d / "samples.npz"), "--ref", str(d / "ref.npz"), "--metrics", "is,fid", "--quiet"]
    assert main(argv + ["--json", str(out)]) == 0
    assert capsys.readouterr().out == ""
    assert list(json.loads(out.read_text())["metrics"]) == ["fid", "is"]


@pytest.mark.parametrize(
    "extra, match",
    [
        (["--metrics", "fid,kid"], "unknown metric"),
        (["--batch-size", "0"], "batch-size"),
        (["--device", "cuda:7" if not torch.cuda.is_available() else "nonsense"], "device"),
    ],
)
def test_cli_eval_bad_options_are_one_line_errors(files, capsys, extra, match):
    d = files["dir"]
    assert main(["eval", str(d / "samples.npz"), "--ref", str(d / "ref.npz"), *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ditq: error: ") and err.count("\n") == 1 and match in err


def test_cli_eval_bad_files_are_one_line_errors(files, capsys):
    d = files["dir"]
    for argv in (
        ["eval", str(d / "nope.npz"), "--ref", str(d / "ref.npz")],
        ["eval", str(d / "samples.npz"), "--ref", str(d / "nope.npz")],
        ["eval", str(d / "samples.npz"), "--ref", str(d / "ref_images_only.npz")],
    ):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("ditq: error: ") and err.count("\n") == 1


#################################################################################
#                          ditq eval --evaluator fmnist                          #
#################################################################################


def _textures(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """uint8 (n, 28, 28) images of 10 classes (a periodic 4x4 texture each, noisy), and their labels."""
    tiles = np.random.default_rng(1234).integers(0, 2, (10, 4, 4)) * 200
    labels = np.arange(n) % 10
    images = np.tile(tiles[labels], (1, 7, 7)) + np.random.default_rng(seed).integers(0, 50, (n, 28, 28))
    return np.clip(images, 0, 255).astype(np.uint8), labels


@pytest.fixture(scope="module")
def fmnist_files(tmp_path_factory):
    """A tiny FID-FMNIST classifier file, and sample batches of 32x32 grayscale-as-RGB images."""
    from ditq.eval.fmnist import FMNISTClassifierConfig, FMNISTTrainConfig, build_fmnist_evaluator

    d = tmp_path_factory.mktemp("fmnist")
    x, y = _textures(200, 0)
    xt, yt = _textures(100, 1)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        build_fmnist_evaluator(
            x, y, xt, yt, d / "clf.safetensors",
            config=FMNISTTrainConfig(epochs=1, batch_size=32, max_shift=0),
            model_config=FMNISTClassifierConfig(widths=(8, 16)), floor_images=150,
        )  # fmt: skip
    finally:
        torch.set_num_threads(threads)
    samples, labels = _textures(40, 2)
    padded = np.pad(samples, ((0, 0), (2, 2), (2, 2)))[..., None]  # (40, 32, 32, 1), as a DiT samples
    save_npz(d / "samples.npz", padded, labels)  # written as RGB, the channel repeated
    save_npz(d / "unlabelled.npz", padded)
    save_npz(d / "colour.npz", np.random.default_rng(0).integers(0, 255, (4, 32, 32, 3), dtype=np.uint8))
    save_npz(d / "bad_labels.npz", padded[:4], np.array([0, 1, 2, 11]))
    return {"dir": d, "images": padded, "labels": labels}


def test_cli_eval_fmnist_prints_fid_and_class_accuracy(fmnist_files, capsys):
    from ditq.eval.fmnist import evaluate_fmnist

    d = fmnist_files["dir"]
    out = d / "eval.json"
    argv = [
        "eval",
        str(d / "samples.npz"),
        "--evaluator",
        "fmnist",
        "--classifier",
        str(d / "clf.safetensors"),
    ]
    assert main([*argv, "--device", "cpu", "--json", str(out)]) == 0
    stdout = capsys.readouterr().out
    result = json.loads(out.read_text())
    direct = evaluate_fmnist(fmnist_files["images"], fmnist_files["labels"], evaluator=d / "clf.safetensors")
    assert result["evaluator"] == "fmnist" and result["num_images"] == 40
    # (tiny features: FID ~1e-5 here, so allow for cancellation in tr S1 + tr S2 - 2 tr sqrt(S1 S2))
    assert result["fid_fmnist"] == pytest.approx(direct["fid_fmnist"], rel=1e-4, abs=1e-9)
    assert result["class_acc"] == direct["class_acc"]
    assert result["floor_fid_fmnist_at_n"]["num_images"] == 100
    for text in ("FID-FMNIST", "Class accuracy", f"{result['fid_fmnist']:.4f}", f"{result['class_acc']:.4f}",
                 "floor"):  # fmt: skip
        assert text in stdout
    assert (
        main([*argv[:3], "--classifier", str(d / "clf.safetensors"), "--quiet"]) == 2
    )  # inception: no --ref
    capsys.readouterr()


def test_cli_eval_fmnist_without_labels_gives_no_class_accuracy(fmnist_files, capsys):
    d = fmnist_files["dir"]
    out = d / "unlabelled.json"
    argv = [
        "eval",
        str(d / "unlabelled.npz"),
        "--evaluator",
        "fmnist",
        "--classifier",
        str(d / "clf.safetensors"),
    ]
    assert main([*argv, "--json", str(out), "--quiet"]) == 0
    assert capsys.readouterr().out == ""
    result = json.loads(out.read_text())
    assert "class_acc" not in result and result["fid_fmnist"] > 0


@pytest.mark.parametrize(
    "extra, match",
    [
        (["--ref", "ref.npz"], "--ref"),
        (["--metrics", "fid"], "--metrics"),
        (["--compute-ref-stats"], "--compute-ref-stats"),
    ],
)
def test_cli_eval_fmnist_rejects_inception_options(fmnist_files, capsys, extra, match):
    d = fmnist_files["dir"]
    argv = [
        "eval",
        str(d / "samples.npz"),
        "--evaluator",
        "fmnist",
        "--classifier",
        str(d / "clf.safetensors"),
    ]
    assert main([*argv, *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ditq: error: ") and err.count("\n") == 1 and match in err


@pytest.mark.parametrize(
    "name, classifier, match",
    [
        ("colour.npz", "clf.safetensors", "colour"),
        ("bad_labels.npz", "clf.safetensors", "labels outside"),
        ("samples.npz", "nope.safetensors", "not found"),
        ("nope.npz", "clf.safetensors", "no such file"),
    ],
)
def test_cli_eval_fmnist_bad_input_is_one_line(fmnist_files, capsys, name, classifier, match):
    d = fmnist_files["dir"]
    argv = ["eval", str(d / name), "--evaluator", "fmnist", "--classifier", str(d / classifier)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("ditq: error: ") and err.count("\n") == 1 and match in err


def test_cli_eval_inception_needs_ref(files, capsys):
    assert main(["eval", str(files["dir"] / "samples.npz")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ditq: error: ") and err.count("\n") == 1 and "--ref" in err


def test_cli_eval_fmnist_with_the_shipped_classifier(fmnist_files, capsys):
    from ditq.eval.fmnist import default_evaluator_path

    if default_evaluator_path() is None:
        pytest.skip("no shipped FID-FMNIST classifier in this install")
    d = fmnist_files["dir"]
    assert main(["eval", str(d / "samples.npz"), "--evaluator", "fmnist", "--json", str(d / "s.json")]) == 0
    result = json.loads((d / "s.json").read_text())
    assert result["classifier"]["test_accuracy"] >= 0.9 and result["fid_fmnist"] > result["floor_fid_fmnist"]
    assert "FID-FMNIST" in capsys.readouterr().out
