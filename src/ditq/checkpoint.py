"""ditq's own checkpoint format: safetensors with a JSON metadata header.

A ditq checkpoint is a plain safetensors file. Its string metadata holds one
key, ``"ditq"``, whose value is a JSON object::

    {"format_version": 1, "model_config": {...}, "command": "...", "quant_config": {...}, ...}

Only ``format_version`` is fixed here; the rest is whatever the writer passes
(``ditq.save`` stores ``model_config``, the CLI adds ``command``, the
quantizer adds ``quant_config``). Any safetensors reader can open the tensors;
nothing in the file is ever executed.

Writes are atomic (temporary file in the same folder, fsync, ``os.replace``),
so a killed run leaves either the old file or the new one, never half of one.
Reading the metadata parses the header only, however large the file.

This module imports nothing from ditq but :mod:`ditq.errors`, so the training
loop, the quantizer and the CLI can all use it.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import struct
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, suppress
from pathlib import Path

import torch

from ditq.errors import CheckpointError, OutputError

FORMAT_VERSION = 1
"""Version of the metadata layout written by this ditq; readers refuse newer ones."""

METADATA_KEY = "ditq"
"""The safetensors metadata key holding ditq's JSON."""

# A header larger than this is not a real safetensors header but the first
# bytes of some other file read as a length (the safetensors library uses the
# same bound).
_MAX_HEADER_BYTES = 100 * 1024 * 1024

PathLike = str | os.PathLike


#################################################################################
#                                 Atomic writes                                 #
#################################################################################


OUTPUT_ERRNOS = {
    errno.ENOSPC: "the disk is full",
    errno.EDQUOT: "the disk quota is exceeded",
    errno.EROFS: "the file system is read-only",
    errno.EACCES: "permission denied",
    errno.EPERM: "permission denied",
}
"""The write failures that are the user's to fix, each turned into one :class:`OutputError` line."""

FAULT_ENV = "DITQ_FAULT_DISK_FULL_AFTER"
"""Fault injection for tests: with ``DITQ_FAULT_DISK_FULL_AFTER=N`` (bytes), an atomic write that would
bring this process's total past N fails as a full disk would, after its data was written (the partial
file exists, then goes). Never set it outside tests."""

FAULT_ERRNO_ENV = "DITQ_FAULT_WRITE_ERRNO"
"""Fault injection for tests: ``DITQ_FAULT_WRITE_ERRNO=EROFS`` (or ``EACCES``) makes every atomic write
fail with that error, as a read-only or unwritable folder would, also for a user (root) whom
permissions do not stop. Never set it outside tests."""

_written = 0  # bytes this process has written through atomic_write, for the fault injection


@contextmanager
def atomic_write(path: PathLike, what: str = "file", *, size_hint: int | None = None) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success fsync it and rename it onto ``path``.

    On any exception the temporary file is removed and ``path`` is left as it
    was. The folder is created if needed. A full disk, a read-only or
    unwritable folder (:data:`OUTPUT_ERRNOS`) becomes one :class:`OutputError`
    line naming ``what`` was being written, where, and how much space it needed
    (``size_hint`` bytes when the caller knows; else what was written before the
    failure) beside what was free.
    """
    global _written
    path = Path(path)
    # Same folder, so os.replace is a rename within one filesystem (atomic);
    # a hidden, unique name, so concurrent writers (torchrun ranks) never collide.
    tmp = path.parent / f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        yield tmp
        size = tmp.stat().st_size if tmp.exists() else 0
        _inject_disk_full(size)
        _fsync(tmp)
        # Some writers (safetensors) create 0600 files; give the file the permissions
        # a plain open() would have, so a checkpoint is as readable as any other output.
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
        _written += size
        _fsync_dir(path.parent)
    except BaseException as e:
        written = _size(tmp)
        with suppress(FileNotFoundError, PermissionError, IsADirectoryError):
            os.unlink(tmp)
        failure = _output_failure(e)
        if failure is not None:
            raise OutputError(_output_message(what, path, failure, size_hint, written)) from None
        raise


def output_error(e: BaseException, what: str, path: PathLike) -> OutputError | None:
    """The one-line :class:`OutputError` for ``e`` if it is a write failure the user can fix (a full disk,
    a read-only or unwritable folder) while writing ``what`` at ``path``, else None: for writes that
    cannot be atomic (appending to a log)."""
    failure = _output_failure(e)
    if failure is None:
        return None
    return OutputError(_output_message(what, Path(path), failure, None, 0))


def _inject_disk_full(size: int) -> None:
    name = os.environ.get(FAULT_ERRNO_ENV)
    if name:
        code = getattr(errno, name)
        raise OSError(code, os.strerror(code))
    limit = os.environ.get(FAULT_ENV)
    if limit is not None and _written + size > int(limit):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def _output_failure(e: BaseException) -> int | None:
    """The errno of ``e`` (or of the OSError it wraps, as torch and safetensors do) if the user can fix it."""
    seen = 0
    while e is not None and seen < 5:
        if isinstance(e, OSError) and e.errno in OUTPUT_ERRNOS:
            return e.errno
        text = str(e)
        if isinstance(e, RuntimeError) and ("No space left" in text or "unexpected pos" in text):
            return errno.ENOSPC  # torch.save's zip writer reports a full disk as a RuntimeError
        e, seen = e.__cause__ or e.__context__, seen + 1
    return None


def _output_message(what: str, path: Path, err: int, size_hint: int | None, written: int) -> str:
    where = path.parent if err in (errno.EROFS, errno.EACCES, errno.EPERM) else path
    message = f"cannot write the {what} {path}: {OUTPUT_ERRNOS[err]}"
    if err in (errno.ENOSPC, errno.EDQUOT):
        free = _free_bytes(path.parent)
        need = (
            human_bytes(size_hint)
            if size_hint
            else f"more than the {human_bytes(written)} written before it filled"
        )
        free_there = f"; {human_bytes(free)} free there" if free is not None else ""
        message += f" (it needs {need}{free_there})"
        advice = "free some space or write elsewhere"
    else:
        advice = f"make {where} writable or write elsewhere"
    keep = f"; the previous {path.name} is kept" if path.exists() else ""
    return f"{message}{keep}; {advice}, then run the same command again"


def _size(p: Path) -> int:
    try:
        return p.stat().st_size
    except OSError:
        return 0


def _free_bytes(folder: Path) -> int | None:
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return None


def human_bytes(n: int | None) -> str:
    """``"3.9 KB"``: a byte count for people (B, KB, MB, GB; powers of 1024)."""
    size = float(n or 0)
    for unit in ("B", "KB", "MB"):
        if size < 1024:
            return f"{int(size)} B" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GB"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync(path: Path) -> None:
    # Flush the data before the rename: otherwise a crash shortly after can
    # leave a renamed but empty file on some filesystems.
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(folder: Path) -> None:
    # Persist the rename itself. Not possible on every platform (Windows), and
    # the write is already complete, so failure here is not an error.
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


#################################################################################
#                                    Writing                                    #
#################################################################################


def save_checkpoint(
    path: PathLike, tensors: Mapping[str, torch.Tensor], metadata: Mapping, *, what: str = "checkpoint"
) -> None:
    """Write ``tensors`` and ``metadata`` to ``path`` as a ditq safetensors checkpoint, atomically.

    ``metadata`` must be JSON-serializable; it is stored under the ``"ditq"``
    key together with ``format_version``. Tensors are detached, moved to CPU
    and made contiguous; tensors sharing storage with an earlier one are
    cloned (safetensors stores each tensor on its own). ``what`` names the
    file in the one-line error of a failed write (``"quantized checkpoint"``).
    """
    path = Path(path)
    meta = {"format_version": FORMAT_VERSION, **{k: v for k, v in metadata.items() if k != "format_version"}}
    try:
        meta_json = json.dumps(meta)
    except (TypeError, ValueError) as e:
        raise TypeError(f"checkpoint metadata must be JSON-serializable: {e}") from e
    prepared = _prepare_tensors(tensors)

    from safetensors.torch import save_file

    size = sum(t.numel() * t.element_size() for t in prepared.values()) + len(meta_json)
    try:
        with atomic_write(path, what, size_hint=size) as tmp:
            save_file(prepared, str(tmp), metadata={METADATA_KEY: meta_json})
    except OSError as e:  # not the user's to fix (EIO, ...): still one line
        reason = e.strerror or str(e)
        raise CheckpointError(f"cannot write the {what} {path}: {reason}") from e


def _prepare_tensors(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    seen_storages: set[int] = set()
    for name, t in tensors.items():
        if not isinstance(name, str):
            raise TypeError(f"checkpoint tensor names must be strings, got {type(name).__name__}")
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"checkpoint entry '{name}' is a {type(t).__name__}, not a tensor")
        t = t.detach().to("cpu").contiguous()
        ptr = t.untyped_storage().data_ptr()
        # Tied weights or views of one buffer: safetensors refuses shared
        # storage, and a copy per name loads back the same values.
        if ptr != 0 and ptr in seen_storages:
            t = t.clone()
            ptr = t.untyped_storage().data_ptr()
        seen_storages.add(ptr)
        out[name] = t
    return out


#################################################################################
#                                    Reading                                    #
#################################################################################


def is_safetensors(path: PathLike) -> bool:
    """Whether ``path`` starts like a safetensors file (8-byte header length, then ``{``)."""
    try:
        with open(path, "rb") as f:
            head = f.read(9)
    except OSError:
        return False
    if len(head) < 9 or head[8:9] != b"{":
        return False
    (n,) = struct.unpack("<Q", head[:8])
    return 0 < n <= _MAX_HEADER_BYTES


def read_safetensors_header(path: PathLike) -> tuple[dict[str, dict], dict[str, str]]:
    """``(tensor_info, raw_metadata)`` of any safetensors file, reading the header only.

    ``tensor_info`` maps each name to ``{"dtype": "F32", "shape": [...]}``;
    ``raw_metadata`` is the file's string-to-string metadata. A missing,
    truncated or corrupt file raises :class:`CheckpointError`.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise _truncated(path, size, 8)
            (n,) = struct.unpack("<Q", head)
            if n > _MAX_HEADER_BYTES:
                raise _corrupt(path, f"header length {n} is not plausible")
            if 8 + n > size:
                raise _truncated(path, size, 8 + n)
            raw = f.read(n)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint not found: {path}; check the path") from None
    except IsADirectoryError:
        raise CheckpointError(f"{path} is a folder, not a checkpoint file; give the file's path") from None
    except OSError as e:
        raise CheckpointError(
            f"cannot read checkpoint {path}: {e.strerror or e}; check its permissions"
        ) from e

    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, ValueError):
        raise _corrupt(path, "its header is not valid JSON") from None
    if not isinstance(header, dict):
        raise _corrupt(path, "its header is not a JSON object")
    raw_meta = header.pop("__metadata__", None) or {}
    if not isinstance(raw_meta, dict):
        raise _corrupt(path, "its metadata is not a JSON object")

    info: dict[str, dict] = {}
    data_end = 0
    for name, entry in header.items():
        try:
            dtype, shape, (begin, end) = entry["dtype"], entry["shape"], entry["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise _corrupt(path, f"the header entry of '{name}' is malformed") from None
        info[name] = {"dtype": dtype, "shape": list(shape)}
        data_end = max(data_end, int(end))
        if int(begin) > int(end):
            raise _corrupt(path, f"the data offsets of '{name}' are reversed")
    expected = 8 + n + data_end
    if size < expected:
        raise _truncated(path, size, expected)
    return info, raw_meta


def read_metadata(path: PathLike) -> dict:
    """The ditq metadata of a ditq checkpoint (``format_version``, ``model_config``, ...); header only."""
    _, raw_meta = read_safetensors_header(path)
    return _parse_ditq_metadata(Path(path), raw_meta)


def _parse_ditq_metadata(path: Path, raw_meta: Mapping[str, str]) -> dict:
    if METADATA_KEY not in raw_meta:
        raise CheckpointError(
            f"{path} is a safetensors file without ditq metadata, so not a ditq checkpoint; "
            "load it with ditq.load, which infers the model from the tensor shapes"
        )
    try:
        meta = json.loads(raw_meta[METADATA_KEY])
    except ValueError:
        raise _corrupt(path, "its ditq metadata is not valid JSON") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("format_version"), int):
        raise _corrupt(path, "its ditq metadata has no integer format_version")
    if meta["format_version"] > FORMAT_VERSION:
        raise CheckpointError(
            f"{path} was written by a newer ditq (format_version {meta['format_version']}, "
            f"this ditq reads up to {FORMAT_VERSION}); upgrade ditq"
        )
    return meta


def load_tensors(path: PathLike, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """All tensors of a safetensors file (ditq or not), placed on ``device``."""
    path = Path(path)
    read_safetensors_header(path)  # one-line errors for missing/truncated files before the full read
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device=str(device))
    except (SafetensorError, OSError) as e:
        raise _corrupt(path, str(e).splitlines()[0] if str(e) else type(e).__name__) from e


def _truncated(path: Path, size: int, expected: int) -> CheckpointError:
    return CheckpointError(
        f"checkpoint {path} is truncated ({size} of at least {expected} bytes), probably cut off while "
        "being written or copied; re-create or re-download it"
    )


def _corrupt(path: Path, why: str) -> CheckpointError:
    return CheckpointError(f"checkpoint {path} is corrupt ({why}); re-create or re-download it")
