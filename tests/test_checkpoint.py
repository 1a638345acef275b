import ast
import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import ditq.checkpoint as ckpt
from ditq.checkpoint import (
    FORMAT_VERSION,
    is_safetensors,
    load_tensors,
    read_metadata,
    read_safetensors_header,
    save_checkpoint,
)
from ditq.errors import CheckpointError


def _tensors() -> dict[str, torch.Tensor]:
    return {
        "w": torch.randn(4, 3),
        "half": torch.randn(5).half(),
        "bf": torch.randn(2, 2).bfloat16(),
        "ids": torch.arange(6),
        "empty": torch.zeros(0, 3),
    }


def _assert_one_line(e: pytest.ExceptionInfo, path: Path) -> None:
    msg = str(e.value)
    assert "\n" not in msg
    assert str(path) in msg


def test_round_trip_is_exact(tmp_path):
    path = tmp_path / "c.safetensors"
    tensors = _tensors()
    meta = {
        "model_config": {"depth": 2, "mlp_ratio": 4.0},
        "command": "ditq ptq --wbits 4",
        "nested": [1, {"a": None}],
    }
    save_checkpoint(path, tensors, meta)
    assert read_metadata(path) == {"format_version": FORMAT_VERSION, **meta}
    loaded = load_tensors(path)
    assert set(loaded) == set(tensors)
    for k, v in tensors.items():
        assert loaded[k].dtype == v.dtype
        assert torch.equal(loaded[k], v)


def test_format_version_is_ours_even_if_caller_passes_one(tmp_path):
    path = tmp_path / "c.safetensors"
    save_checkpoint(path, {"x": torch.ones(1)}, {"format_version": 99})
    assert read_metadata(path)["format_version"] == FORMAT_VERSION


def test_metadata_is_one_json_string_under_ditq_key(tmp_path):
    path = tmp_path / "c.safetensors"
    save_checkpoint(path, {"x": torch.ones(1)}, {"command": "c"})
    _, raw = read_safetensors_header(path)
    assert set(raw) == {"ditq"}
    assert json.loads(raw["ditq"]) == {"format_version": 1, "command": "c"}


def test_non_contiguous_and_shared_tensors_are_saved(tmp_path):
    base = torch.arange(12.0).reshape(3, 4)
    tensors = {
        "a": base,
        "tied": base,
        "t": base.t(),
        "row": base[1],
        "param": torch.nn.Parameter(base.clone()),
    }
    path = tmp_path / "c.safetensors"
    save_checkpoint(path, tensors, {})
    loaded = load_tensors(path)
    for k, v in tensors.items():
        assert torch.equal(loaded[k], v.detach())
    assert loaded["a"].data_ptr() != loaded["tied"].data_ptr()


def test_atomic_write_leaves_no_temp_file(tmp_path):
    path = tmp_path / "sub" / "c.safetensors"  # the folder is created
    save_checkpoint(path, {"x": torch.ones(2)}, {})
    save_checkpoint(path, {"x": torch.zeros(2)}, {})  # overwrite in place
    assert [p.name for p in path.parent.iterdir()] == ["c.safetensors"]
    assert torch.equal(load_tensors(path)["x"], torch.zeros(2))


def test_failed_write_keeps_old_file_and_removes_temp(tmp_path, monkeypatch):
    path = tmp_path / "c.safetensors"
    save_checkpoint(path, {"x": torch.ones(2)}, {"run": 1})

    def dying_save(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial")
        raise KeyboardInterrupt  # a killed run

    monkeypatch.setattr("safetensors.torch.save_file", dying_save)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, {"x": torch.zeros(2)}, {"run": 2})
    assert [p.name for p in tmp_path.iterdir()] == ["c.safetensors"]
    assert read_metadata(path)["run"] == 1


@pytest.mark.parametrize("keep", [0.5, 0.999, 20, 5])
def test_truncated_file_raises_one_line(tmp_path, keep):
    path = tmp_path / "c.safetensors"
    save_checkpoint(path, {"w": torch.randn(64, 64)}, {"command": "x"})
    data = path.read_bytes()
    n = int(len(data) * keep) if isinstance(keep, float) else keep
    path.write_bytes(data[:n])
    for reader in (read_metadata, load_tensors):
        with pytest.raises(CheckpointError, match="truncated") as e:
            reader(path)
        _assert_one_line(e, path)


def test_missing_and_corrupt_files(tmp_path):
    missing = tmp_path / "nope.safetensors"
    with pytest.raises(CheckpointError, match="not found") as e:
        load_tensors(missing)
    _assert_one_line(e, missing)

    corrupt = tmp_path / "bad.safetensors"
    header = b'{"w": 12}'
    corrupt.write_bytes(struct.pack("<Q", len(header)) + header)
    with pytest.raises(CheckpointError, match="corrupt") as e:
        read_metadata(corrupt)
    _assert_one_line(e, corrupt)

    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\xff" * 64)
    with pytest.raises(CheckpointError) as e:
        read_metadata(garbage)
    _assert_one_line(e, garbage)

    with pytest.raises(CheckpointError, match="folder"):
        read_metadata(tmp_path)


def test_plain_safetensors_is_not_a_ditq_checkpoint(tmp_path):
    path = tmp_path / "plain.safetensors"
    save_file({"x": torch.ones(3)}, str(path))
    with pytest.raises(CheckpointError, match="without ditq metadata"):
        read_metadata(path)
    assert torch.equal(load_tensors(path)["x"], torch.ones(3))  # tensors still readable


def test_newer_format_version_is_refused(tmp_path):
    path = tmp_path / "future.safetensors"
    save_file(
        {"x": torch.ones(1)}, str(path), metadata={"ditq": json.dumps({"format_version": FORMAT_VERSION + 1})}
    )
    with pytest.raises(CheckpointError, match="upgrade ditq"):
        read_metadata(path)


def test_bad_inputs_are_type_errors(tmp_path):
    with pytest.raises(TypeError, match="JSON"):
        save_checkpoint(tmp_path / "c.safetensors", {"x": torch.ones(1)}, {"bad": object()})
    with pytest.raises(TypeError, match="not a tensor"):
        save_checkpoint(tmp_path / "c.safetensors", {"x": [1, 2]}, {})
    assert list(tmp_path.iterdir()) == []


def test_is_safetensors(tmp_path):
    st, pt = tmp_path / "a.safetensors", tmp_path / "a.pt"
    save_checkpoint(st, {"x": torch.ones(1)}, {})
    torch.save({"x": torch.ones(1)}, pt)
    assert is_safetensors(st)
    assert not is_safetensors(pt)
    assert not is_safetensors(tmp_path / "missing")


def test_imports_nothing_from_ditq_but_errors():
    tree = ast.parse(Path(ckpt.__file__).read_text())
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    imported |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    assert {m for m in imported if m.startswith("ditq")} == {"ditq.errors"}


# ----------------------------------------------------------------------------
# A full disk or an unwritable folder: one line, the previous file kept, nothing partial
# ----------------------------------------------------------------------------


def test_a_full_disk_keeps_the_previous_file_and_says_what_it_needed(tmp_path, monkeypatch):
    import os

    from ditq import checkpoint as ckpt
    from ditq.errors import EXIT_OUTPUT, OutputError

    path = tmp_path / "model.safetensors"
    ckpt.save_checkpoint(path, {"w": torch.zeros(256)}, {"n": 1})
    monkeypatch.setattr(ckpt, "_written", 0)
    monkeypatch.setenv(ckpt.FAULT_ENV, "100")  # the disk fills after 100 bytes
    with pytest.raises(OutputError) as e:
        ckpt.save_checkpoint(path, {"w": torch.ones(256)}, {"n": 2})
    message = str(e.value)
    assert "checkpoint" in message and str(path) in message and "disk is full" in message
    assert "it needs 1.0 KB" in message and "previous model.safetensors is kept" in message
    assert "\n" not in message and e.value.exit_status == EXIT_OUTPUT
    assert os.listdir(tmp_path) == ["model.safetensors"]  # no temporary file left
    assert torch.equal(ckpt.load_tensors(path)["w"], torch.zeros(256))


@pytest.mark.parametrize("name,words", [("EROFS", "read-only"), ("EACCES", "permission denied")])
def test_an_unwritable_folder_is_one_line(tmp_path, monkeypatch, name, words):
    from ditq import checkpoint as ckpt
    from ditq.errors import OutputError

    monkeypatch.setenv(ckpt.FAULT_ERRNO_ENV, name)
    with pytest.raises(OutputError) as e, ckpt.atomic_write(tmp_path / "r.json", "report") as tmp:
        tmp.write_text("{}")
    assert f"cannot write the report {tmp_path / 'r.json'}: " in str(e.value) and words in str(e.value)
    assert f"make {tmp_path} writable" in str(e.value)
    assert list(tmp_path.iterdir()) == []
