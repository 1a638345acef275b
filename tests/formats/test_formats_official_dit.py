"""ditq.formats.official_dit: official DiT state dicts and training checkpoints (config inferred from
tensor shapes, heads from the registry, the EMA taken), and official weights by name: downloaded once into
the cache, checked, never fetched with download=False, one-line errors."""

import argparse
import hashlib
import urllib.error
from dataclasses import replace

import pytest
import torch

from ditq.errors import CheckpointError, DownloadError
from ditq.formats import official_dit
from ditq.formats.loader import load
from ditq.models import DiT, DiTConfig, registry

TINY = DiTConfig(depth=2, hidden_size=32, num_heads=2, patch_size=2, input_size=8, num_classes=10)


def _tiny(config: DiTConfig = TINY, seed: int = 0) -> DiT:
    """A tiny DiT with every weight random (adaLN-Zero would make the output all zeros)."""
    torch.manual_seed(seed)
    model = DiT(config)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.05)
    return model.eval()


def _inputs(config: DiTConfig = TINY):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, config.in_channels, config.input_size, config.input_size, generator=g)
    return x, torch.tensor([0, 400, 999]), torch.tensor([1, 5, config.num_classes])


def _out(model, config: DiTConfig = TINY) -> torch.Tensor:
    with torch.no_grad():
        return model(*_inputs(config))


@pytest.fixture
def tiny_in_registry(monkeypatch):
    """Register the tiny size, so its heads can be looked up like DiT-S/B/L/XL."""
    monkeypatch.setitem(registry.MODEL_CONFIGS, "DiT-Tiny/2", TINY)


#################################################################################
#                         Official state dicts and shapes                       #
#################################################################################


@pytest.mark.parametrize(
    "config",
    [
        TINY,
        replace(TINY, patch_size=4, learn_sigma=False, num_classes=5),
        replace(TINY, in_channels=3, input_size=12, depth=3, mlp_ratio=2.0),
    ],
)
def test_official_state_dict_loads_with_inferred_config(tmp_path, config):
    model = _tiny(config)
    path = tmp_path / "DiT-tiny.pt"
    torch.save(model.state_dict(), path)
    loaded = load(path, num_heads=config.num_heads)
    assert loaded.config == config
    assert torch.equal(_out(loaded, config), _out(model, config))


def test_heads_come_from_the_registry_size(tmp_path, tiny_in_registry):
    path = tmp_path / "DiT-tiny.pt"
    torch.save(_tiny().state_dict(), path)
    assert load(path).config == TINY


def test_heads_unknown_without_registry_size(tmp_path):
    path = tmp_path / "DiT-tiny.pt"
    torch.save(_tiny().state_dict(), path)
    with pytest.raises(CheckpointError, match="num_heads"):
        load(path)


def test_official_fixture_state_dict_reproduces_original_outputs(tmp_path, dit_ref):
    path = tmp_path / "ref.pt"
    torch.save(dit_ref["state_dict"], path)
    model = load(path, num_heads=dit_ref["config"]["num_heads"])
    assert model.config == DiTConfig(**dit_ref["config"])
    with torch.no_grad():
        out = model(dit_ref["x"], dit_ref["t"], dit_ref["y"])
    assert (out - dit_ref["out"]).abs().max() <= 1e-5


def test_training_checkpoint_takes_ema(tmp_path, tiny_in_registry):
    model, ema = _tiny(seed=0), _tiny(seed=1)
    args = argparse.Namespace(model="DiT-Tiny/2", image_size=64, num_classes=10, lr=1e-4)
    path = tmp_path / "0100000.pt"
    torch.save(
        {"model": model.state_dict(), "ema": ema.state_dict(), "opt": {"state": {}}, "args": args}, path
    )
    loaded = load(path)
    assert torch.equal(_out(loaded), _out(ema))
    assert not torch.equal(_out(loaded), _out(model))


#################################################################################
#                            Official weights download                          #
#################################################################################


@pytest.fixture
def fake_official(monkeypatch, tmp_path):
    """Official entries that fit tiny models, and a fetcher serving their files; never the network."""
    models = {256: _tiny(seed=2), 512: _tiny(replace(TINY, input_size=16), seed=3)}
    entries = {
        ("DiT-XL/2", size): official_dit.OfficialWeights(
            "DiT-XL/2", size, f"DiT-XL-2-{size}x{size}.pt", m.config
        )
        for size, m in models.items()
    }
    monkeypatch.setattr(official_dit, "OFFICIAL_WEIGHTS", entries)
    served = tmp_path / "served"
    served.mkdir()
    for size, m in models.items():
        torch.save(m.state_dict(), served / f"DiT-XL-2-{size}x{size}.pt")
    calls = []

    def fetch(url, dst, *, progress=None):
        calls.append(url)
        dst.write_bytes((served / url.rsplit("/", 1)[-1]).read_bytes())

    monkeypatch.setattr(official_dit, "fetch_url", fetch)
    return models, entries, calls


def test_download_once_then_cache(tmp_path, fake_official):
    models, _, calls = fake_official
    cache = tmp_path / "cache"
    first = load("DiT-XL/2", cache_dir=cache)
    second = load("DiT-XL/2", cache_dir=cache)
    assert calls == ["https://dl.fbaipublicfiles.com/DiT/models/DiT-XL-2-256x256.pt"]
    assert [p.name for p in cache.iterdir()] == ["DiT-XL-2-256x256.pt"]  # no temp file left
    assert torch.equal(_out(first), _out(models[256]))
    assert torch.equal(_out(second), _out(models[256]))


def test_image_size_picks_the_512_file_and_env_cache(tmp_path, fake_official, monkeypatch):
    models, _, calls = fake_official
    monkeypatch.setenv("DITQ_CACHE", str(tmp_path / "envcache"))
    model = load("DiT-XL/2", image_size=512)
    assert model.config.input_size == 16
    assert (tmp_path / "envcache" / "DiT-XL-2-512x512.pt").is_file()
    assert calls == ["https://dl.fbaipublicfiles.com/DiT/models/DiT-XL-2-512x512.pt"]


def test_offline_error_names_url_and_target(tmp_path, fake_official, monkeypatch):
    def offline(url, dst, *, progress=None):
        raise urllib.error.URLError("Temporary failure in name resolution")

    monkeypatch.setattr(official_dit, "fetch_url", offline)
    cache = tmp_path / "cache"
    with pytest.raises(DownloadError) as e:
        load("DiT-XL/2", cache_dir=cache)
    msg = str(e.value)
    assert "\n" not in msg
    assert "https://dl.fbaipublicfiles.com/DiT/models/DiT-XL-2-256x256.pt" in msg
    assert str(cache / "DiT-XL-2-256x256.pt") in msg
    assert "name resolution" in msg
    assert not any(cache.iterdir())


def test_download_false_never_fetches(tmp_path, fake_official):
    _, _, calls = fake_official
    with pytest.raises(DownloadError, match="download=False") as e:
        load("DiT-XL/2", cache_dir=tmp_path, download=False)
    assert "https://dl.fbaipublicfiles.com/DiT/models/DiT-XL-2-256x256.pt" in str(e.value)
    assert str(tmp_path / "DiT-XL-2-256x256.pt") in str(e.value)
    assert calls == []


def test_manually_placed_file_is_used(tmp_path, fake_official):
    models, _, calls = fake_official
    torch.save(models[256].state_dict(), tmp_path / "DiT-XL-2-256x256.pt")
    assert torch.equal(_out(load("DiT-XL/2", cache_dir=tmp_path, download=False)), _out(models[256]))
    assert calls == []


@pytest.mark.parametrize("payload", ["garbage", "other_model", "html"])
def test_bad_download_fails_integrity_check_and_is_not_cached(tmp_path, fake_official, monkeypatch, payload):
    def fetch(url, dst, *, progress=None):
        if payload == "other_model":
            torch.save(_tiny(replace(TINY, depth=3)).state_dict(), dst)
        elif payload == "html":
            dst.write_bytes(b"<html><body>Access denied</body></html>")
        else:
            dst.write_bytes(b"\x80\x02" + b"\x00" * 100)

    monkeypatch.setattr(official_dit, "fetch_url", fetch)
    with pytest.raises(DownloadError, match="integrity check") as e:
        load("DiT-XL/2", cache_dir=tmp_path / "cache")
    assert "\n" not in str(e.value)
    assert not any((tmp_path / "cache").iterdir())


def test_sha256_is_checked_when_known(tmp_path, fake_official, monkeypatch):
    models, entries, _ = fake_official
    served = (tmp_path / "served" / "DiT-XL-2-256x256.pt").read_bytes()
    good = replace(entries[("DiT-XL/2", 256)], sha256=hashlib.sha256(served).hexdigest())
    monkeypatch.setitem(official_dit.OFFICIAL_WEIGHTS, ("DiT-XL/2", 256), good)
    assert torch.equal(_out(load("DiT-XL/2", cache_dir=tmp_path / "a")), _out(models[256]))

    bad = replace(good, sha256="0" * 64)
    monkeypatch.setitem(official_dit.OFFICIAL_WEIGHTS, ("DiT-XL/2", 256), bad)
    with pytest.raises(DownloadError, match="sha256"):
        load("DiT-XL/2", cache_dir=tmp_path / "b")


def test_official_entries_point_at_the_published_files():
    e256, e512 = (
        official_dit.OFFICIAL_WEIGHTS[("DiT-XL/2", 256)],
        official_dit.OFFICIAL_WEIGHTS[("DiT-XL/2", 512)],
    )
    assert e256.url == "https://dl.fbaipublicfiles.com/DiT/models/DiT-XL-2-256x256.pt"
    assert e512.url == "https://dl.fbaipublicfiles.com/DiT/models/DiT-XL-2-512x512.pt"
    assert (e256.config.input_size, e512.config.input_size) == (32, 64)
    assert (e256.config.depth, e256.config.hidden_size, e256.config.num_heads) == (28, 1152, 16)


def test_cache_dir_resolution(monkeypatch, tmp_path):
    monkeypatch.delenv("DITQ_CACHE", raising=False)
    assert official_dit.resolve_cache_dir().parts[-2:] == (".cache", "ditq")
    monkeypatch.setenv("DITQ_CACHE", str(tmp_path))
    assert official_dit.resolve_cache_dir() == tmp_path
    assert official_dit.resolve_cache_dir(tmp_path / "x") == tmp_path / "x"


def test_damaged_cache_file_says_how_to_recover(tmp_path, fake_official):
    cached = tmp_path / "DiT-XL-2-256x256.pt"
    torch.save(_tiny(replace(TINY, depth=3)).state_dict(), cached)
    with pytest.raises(CheckpointError, match="delete") as e:
        load("DiT-XL/2", cache_dir=tmp_path)
    assert str(cached) in str(e.value) and "\n" not in str(e.value)
