"""Sampling at scale: N images split into shards, spread over processes, resumable, merged into one ``.npz``.

Evaluating a generator takes tens of thousands of samples (50,000 for FID),
hours of work that should survive a killed job and use every GPU. The work
is cut into a fixed plan that depends on nothing but the run's settings:

- **Labels** for all N samples are drawn up front (:func:`make_eval_labels`):
  uniform at random, or balanced (every class equally often), from the seed.
- **Shards**: shard ``k`` holds samples ``[k*S, min((k+1)*S, N))`` for a
  shard size ``S`` and is drawn by ``generate(labels, seed)`` with its own
  seed (:func:`shard_seed`, from the run seed and ``k``). Its images depend
  only on ``(seed, S, labels)`` and the generator, never on how many
  processes share the work: that is what makes 2 processes write the same
  images as 1, bit for bit.
- **Processes**: shard ``k`` belongs to rank ``k % world_size``. Each rank
  writes its shards as ADM batches ``shard_000000.npz``, ... (atomically:
  a shard file either is complete or does not exist).
- **Resume**: a folder keeps a ``manifest.json`` of the settings. Run again
  with the same settings and complete shards are kept, missing or damaged
  ones are drawn; with other settings it is an error, never a silent mix.
- **Merge**: :func:`merge_shards` streams the shards, in sample order, into
  one ADM ``.npz`` (``arr_0`` images, ``arr_1`` labels) without holding
  all images in memory. Under ``torchrun`` rank 0 merges once every rank is
  done (the pipeline ``ditq.pipelines.sample.sample_to_npz`` does that).
- **Stopping**: with a ``boundary`` callback, ranks draw their shards in
  rounds (round ``r``: shard ``r * world_size + rank``) and all call it at
  the same points, after the setup and after each round, whether they drew
  a shard there or not. It can stop the run there (a SIGTERM: the pipeline
  passes :meth:`ditq.preemption.StopSignals.should_stop`, a collective) or
  end it on every rank when one failed; a stopped run is resumed as a killed
  one is.

``eval`` takes callables: this module imports neither ``ditq.models`` nor
``ditq.quant``; ``generate`` is whatever draws images.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
import zipfile
from collections.abc import Callable, Mapping
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ditq.checkpoint import atomic_write
from ditq.common import show_progress
from ditq.errors import InvalidArgumentError, StoppedBySignal
from ditq.images import save_npz
from ditq.runlock import LOCK_FILE

MANIFEST = "manifest.json"
MANIFEST_FORMAT = "ditq-sample-shards"
MANIFEST_VERSION = 1
_SHARD_RE = re.compile(r"^shard_(\d{6,})\.npz$")
# Temporary files atomic_write leaves behind when a process is killed mid-write.
_TMP_RE = re.compile(r"^\.(shard_\d{6,}\.npz|manifest\.json)\..*\.tmp$")

Generate = Callable[[np.ndarray, int], np.ndarray]
Boundary = Callable[[Exception | None], bool]


def _check_int(name: str, value: Any, minimum: int) -> int:
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < minimum:
        what = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        raise InvalidArgumentError(f"{name} must be {what}, got {value!r}")
    return int(value)


#################################################################################
#                              Labels and the plan                              #
#################################################################################


def make_eval_labels(num_samples: int, num_classes: int, seed: int, balanced: bool = False) -> np.ndarray:
    """int64 labels for ``num_samples`` samples of a ``num_classes``-class model, from ``seed``.

    Uniform: i.i.d. uniform classes from numpy's stream of ``seed`` (the very
    labels :func:`ditq.pipelines.sample.make_labels` draws, so an ``.npz`` and
    a grid of the same command agree). Balanced: every class
    ``num_samples // num_classes`` times, one more for the first
    ``num_samples % num_classes`` classes, in an order shuffled by ``seed``;
    the per-class counts then differ by at most one, which removes the label
    sampling noise from class-conditional metrics.
    """
    num_samples = _check_int("num_samples", num_samples, 1)
    num_classes = _check_int("num_classes", num_classes, 1)
    seed = _check_int("seed", seed, 0)
    rng = np.random.default_rng(seed)
    if not balanced:
        return rng.integers(0, num_classes, size=num_samples, dtype=np.int64)
    per_class, extra = divmod(num_samples, num_classes)
    counts = np.full(num_classes, per_class, dtype=np.int64)
    counts[:extra] += 1
    return rng.permutation(np.repeat(np.arange(num_classes, dtype=np.int64), counts))


def shard_seed(seed: int, index: int) -> int:
    """The seed of shard ``index`` of a run seeded with ``seed``: a function of the two only.

    Shard 0 uses ``seed`` itself, so a run of a single shard draws what one
    call of the generator with ``seed`` draws (``ditq sample`` writes the same
    images to an ``.npz`` as to a grid). Later shards get independent streams
    from numpy's ``SeedSequence`` of ``(seed, index)``, shifted to 63 bits so
    that any framework's ``manual_seed`` takes them.
    """
    seed = _check_int("seed", seed, 0)
    index = _check_int("shard index", index, 0)
    if index == 0:
        return seed
    return int(np.random.SeedSequence([seed, index]).generate_state(1, np.uint64)[0] >> np.uint64(1))


@dataclass(frozen=True)
class Shard:
    """Samples ``[start, stop)`` of a run, drawn with ``seed``, written to ``shard_{index:06d}.npz``."""

    index: int
    start: int
    stop: int
    seed: int

    @property
    def size(self) -> int:
        return self.stop - self.start

    @property
    def name(self) -> str:
        return f"shard_{self.index:06d}.npz"


def plan_shards(num_samples: int, shard_size: int, seed: int) -> list[Shard]:
    """All shards of a run: ``ceil(num_samples / shard_size)`` of them, the last one possibly shorter."""
    num_samples = _check_int("num_samples", num_samples, 1)
    shard_size = _check_int("shard_size", shard_size, 1)
    return [
        Shard(k, start, min(start + shard_size, num_samples), shard_seed(seed, k))
        for k, start in enumerate(range(0, num_samples, shard_size))
    ]


def shards_of_rank(shards: list[Shard], rank: int, world_size: int) -> list[Shard]:
    """The shards rank ``rank`` of ``world_size`` draws: round robin, ``k % world_size == rank``.

    Round robin rather than contiguous blocks keeps the ranks' loads within
    one shard of each other, and lets the merged file grow from the front.
    """
    world_size = _check_int("world_size", world_size, 1)
    rank = _check_int("rank", rank, 0)
    if rank >= world_size:
        raise InvalidArgumentError(f"rank must be in 0..{world_size - 1}, got {rank}")
    return [s for s in shards if s.index % world_size == rank]


#################################################################################
#                                   Manifest                                    #
#################################################################################


def _labels_hash(labels: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(labels, dtype="<i8").tobytes()).hexdigest()


def _json_meta(meta: Mapping[str, Any] | None) -> dict:
    # A JSON round trip, so that what is compared is what the file holds (tuples become lists...).
    try:
        return json.loads(json.dumps(dict(meta or {}), sort_keys=True))
    except (TypeError, ValueError) as e:
        raise InvalidArgumentError(f"sampling meta must be JSON-serializable ({e})") from None


def _manifest(num_samples: int, shard_size: int, seed: int, labels: np.ndarray, meta: dict) -> dict:
    return {
        "format": MANIFEST_FORMAT,
        "version": MANIFEST_VERSION,
        "num_samples": num_samples,
        "shard_size": shard_size,
        "num_shards": -(-num_samples // shard_size),
        "seed": seed,
        "labels_sha256": _labels_hash(labels),
        "meta": meta,
    }


def read_manifest(out_dir: str | os.PathLike) -> dict | None:
    """The settings a shard folder was written with; ``None`` when it has no manifest."""
    path = Path(out_dir) / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise InvalidArgumentError(
            f"{path} is not readable ({e}); delete the folder {path.parent} or use another one"
        ) from None
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        raise InvalidArgumentError(f"{path} is not a ditq sample-shard manifest; use another shard folder")
    return manifest


def _check_same_run(out_dir: Path, old: dict, new: dict) -> None:
    """Raise a one-line error naming the first setting in which ``old`` (the folder's) and ``new`` differ."""
    differ = None
    for key in ("version", "num_samples", "shard_size", "seed"):
        if old.get(key) != new[key]:
            differ = (key, old.get(key), new[key])
            break
    else:
        old_meta, new_meta = old.get("meta") or {}, new["meta"]
        for key in sorted(set(old_meta) | set(new_meta)):
            if old_meta.get(key) != new_meta.get(key):
                differ = (key, old_meta.get(key), new_meta.get(key))
                break
        else:
            if old.get("labels_sha256") != new["labels_sha256"]:
                differ = ("class labels", "other labels", "these labels")
    if differ is not None:
        key, was, now = differ
        raise InvalidArgumentError(
            f"{out_dir} holds shards of another sampling run ({key} was {was!r}, now {now!r}); "
            "use another shard folder, or the same settings to resume that run"
        )


def list_shards(out_dir: str | os.PathLike) -> list[int]:
    """Indices of the shard files in ``out_dir`` (complete or not), sorted."""
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        return []
    found = (_SHARD_RE.match(p.name) for p in out_dir.iterdir())
    return sorted(int(m.group(1)) for m in found if m)


#################################################################################
#                                    Shards                                     #
#################################################################################


def _read_npy_header(f) -> tuple[tuple[int, ...], np.dtype, bool]:
    version = np.lib.format.read_magic(f)
    read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, fortran, dtype = read(f)
    return tuple(int(s) for s in shape), np.dtype(dtype), fortran


def _shard_problem(path: Path, labels: np.ndarray, *, full_check: bool) -> str | None:
    """Why the shard at ``path`` cannot be used for ``labels`` (``None`` when it can).

    A shard is good when it is a readable zip with uint8 (n, H, W, 3) images
    and exactly ``labels``. With ``full_check`` every byte's CRC is verified
    too (a resume reads each shard once; damage would otherwise surface only
    in the merge or, worse, not at all).
    """
    try:
        with zipfile.ZipFile(path) as zf:
            if full_check and zf.testzip() is not None:
                return "a damaged member"
            with zf.open("arr_1.npy") as f:
                got = np.lib.format.read_array(f)
            if got.shape != labels.shape or not np.array_equal(got, labels):
                return f"other labels ({got.shape[0] if got.ndim else 0} of them)"
            info = zf.getinfo("arr_0.npy")
            with zf.open(info) as f:
                shape, dtype, fortran = _read_npy_header(f)
                header = f.tell()
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
        return f"unreadable ({e})"
    if len(shape) != 4 or shape[0] != len(labels) or shape[-1] != 3 or dtype != np.uint8 or fortran:
        return f"images {dtype} {shape}, not uint8 ({len(labels)}, H, W, 3)"
    if info.file_size != header + int(np.prod(shape)):
        return "cut-off images"
    return None


def _check_images(images: Any, shard: Shard) -> np.ndarray:
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim not in (3, 4) or len(images) != shard.size:
        raise InvalidArgumentError(
            f"generate must return {shard.size} uint8 images (N, H, W, C) for shard {shard.index}, "
            f"got {images.dtype} {images.shape}"
        )
    return images


@dataclass
class ShardRun:
    """What :func:`sample_shards` did on this rank."""

    out_dir: Path
    num_shards: int  # in the whole run, over all ranks
    drawn: list[int] = field(default_factory=list)  # indices of the shards drawn now
    kept: list[int] = field(default_factory=list)  # already complete, skipped
    redrawn: dict[int, str] = field(default_factory=dict)  # shards that were there but unusable: why
    images_drawn: int = 0
    seconds: float = 0.0
    stopped: bool = False  # the boundary callback stopped the run (at a boundary every rank reached)


def sample_shards(
    generate: Generate,
    labels: np.ndarray,
    out_dir: str | os.PathLike,
    *,
    shard_size: int,
    seed: int,
    rank: int = 0,
    world_size: int = 1,
    meta: Mapping[str, Any] | None = None,
    progress: bool | None = None,
    boundary: Boundary | None = None,
) -> ShardRun:
    """Draw this rank's shards of a run into ``out_dir``, keeping those already complete.

    Args:
        generate: ``generate(labels, seed)`` -> uint8 (n, H, W, C) images for
            the int64 ``labels`` of one shard, drawn from ``seed`` alone (it
            must not depend on global state, or resuming changes the images).
        labels: int64 labels of all N samples (:func:`make_eval_labels`).
        out_dir: the shard folder (created if needed).
        shard_size: samples per shard (the last shard may be shorter).
        seed: the run seed; shard ``k`` is drawn with :func:`shard_seed`.
        rank, world_size: this process's share, shards ``k % world_size == rank``.
            Each rank writes only its own shards; ranks talk only in ``boundary``.
        meta: more settings to record and compare on resume (model, sampler,
            steps, guidance...). JSON values; nothing rank-specific.
        progress: a bar of images/s and time left, on rank 0 (``None``: when
            stderr is a terminal).
        boundary: ``boundary(error)``, called by every rank at the same
            points: after the setup (manifest, checking the shards there) and
            after each round of shards, with the exception this rank met
            there (``None`` when all went well). It returns whether to stop
            now (the result then says ``stopped``), or raises to end the run.
            Without it an exception propagates at once and nothing stops.

    A folder holding a manifest of other settings is an
    :class:`InvalidArgumentError` naming the first difference; so is a folder
    holding shard files but no manifest (their settings are unknown). Shards
    that are incomplete, damaged or hold other labels are drawn again.
    """
    from tqdm.auto import tqdm

    labels = np.asarray(labels)
    if labels.ndim != 1 or len(labels) == 0 or not np.issubdtype(labels.dtype, np.integer):
        raise InvalidArgumentError(
            f"labels must be a non-empty 1-d integer array, got {labels.dtype} {labels.shape}"
        )
    labels = labels.astype(np.int64, copy=False)
    shards = plan_shards(len(labels), shard_size, seed)
    mine = shards_of_rank(shards, rank, world_size)
    out_dir = Path(out_dir)
    manifest = _manifest(len(labels), int(shard_size), int(seed), labels, _json_meta(meta))
    run = ShardRun(out_dir, len(shards))

    def sync(error: Exception | None) -> bool:
        if boundary is not None:
            return boundary(error)
        if error is not None:
            raise error
        return False

    error = None
    try:
        todo = _prepare(out_dir, manifest, mine, labels, run)
    except Exception as e:  # noqa: BLE001 (the boundary raises it, on every rank)
        error = e
    if sync(error):
        run.stopped = True
        return run

    started = time.perf_counter()
    desc = "sampling" if world_size == 1 else f"sampling (rank 0 of {world_size})"
    with tqdm(
        total=sum(s.size for s in todo.values()),
        unit="img",
        desc=desc,
        dynamic_ncols=True,
        disable=rank != 0 or not show_progress(progress) or not todo,
    ) as bar:
        # In rounds, so that every rank reaches the boundary as often as every other, its shard
        # there or not (the last round may have none for some ranks, a resumed run none for many).
        for first in range(0, len(shards), world_size):
            shard, error = todo.get(first + rank), None
            if shard is not None:
                shard_labels = labels[shard.start : shard.stop]
                try:
                    # A copy: generate must not be able to alter the run's labels.
                    images = _check_images(generate(shard_labels.copy(), shard.seed), shard)
                    save_npz(out_dir / shard.name, images, shard_labels, what="sample shard")
                except Exception as e:  # noqa: BLE001 (the boundary raises it, on every rank)
                    error = e
                else:
                    run.drawn.append(shard.index)
                    run.images_drawn += shard.size
                    bar.update(shard.size)
            if sync(error):
                run.stopped = True
                break
    run.seconds = time.perf_counter() - started
    return run


def _prepare(out_dir: Path, manifest: dict, mine: list[Shard], labels: np.ndarray, run: ShardRun) -> dict:
    """Check (or write) the folder's manifest and this rank's shards there: those to draw, by index."""
    if out_dir.exists() and not out_dir.is_dir():
        raise InvalidArgumentError(f"the shard folder {out_dir} is a file; use another folder")
    # Shards are listed before the manifest is read: a rank writes the manifest
    # before any shard, so shards seen without a manifest were there before this
    # run (their settings unknown), never another rank's work in progress.
    present = set(list_shards(out_dir))
    old = read_manifest(out_dir)
    if old is None and present:
        raise InvalidArgumentError(
            f"{out_dir} holds shard files but no {MANIFEST}, so their settings are unknown; "
            "use another shard folder or delete those files"
        )
    if old is not None:
        _check_same_run(out_dir, old, manifest)
    else:
        # Every rank writes it (the same bytes, atomically): no rank draws a shard
        # into a folder without a manifest, whatever order the ranks start in.
        with atomic_write(out_dir / MANIFEST, "shard manifest") as tmp:
            tmp.write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    todo = {}
    for shard in mine:
        if shard.index in present:
            problem = _shard_problem(out_dir / shard.name, labels[shard.start : shard.stop], full_check=True)
            if problem is None:
                run.kept.append(shard.index)
                continue
            run.redrawn[shard.index] = problem
        todo[shard.index] = shard
    return todo


def merge_shards(
    out_dir: str | os.PathLike, out_path: str | os.PathLike, *, stop: Callable[[], bool] | None = None
) -> Path:
    """Write the shards of ``out_dir``, in sample order, as one ADM batch ``out_path``; returns it.

    Streams shard by shard into the zip member (one shard in memory at a time,
    not the whole 10 GB of 50,000 256-px images), atomically. The result is
    what :func:`ditq.images.save_npz` writes: ``arr_0`` uint8 (N, H, W, 3) and
    ``arr_1`` int64 labels. Missing or damaged shards are an
    :class:`InvalidArgumentError` that lists them; running the same sampling
    command again draws them. ``stop()`` is asked before each shard is copied:
    when it says so the merge is abandoned (no partial file is left) with
    :class:`~ditq.errors.StoppedBySignal`.
    """
    out_dir, out_path = Path(out_dir), Path(out_path)
    manifest = read_manifest(out_dir)
    if manifest is None:
        raise InvalidArgumentError(f"{out_dir} has no {MANIFEST}; it is not a folder of sample shards")
    shards = plan_shards(manifest["num_samples"], manifest["shard_size"], manifest["seed"])

    # Check every shard (headers and labels, cheap) before writing anything.
    missing, bad, labels, image_shape = [], [], [], None
    for shard in shards:
        path = out_dir / shard.name
        if not path.is_file():
            missing.append(shard.index)
            continue
        try:
            with zipfile.ZipFile(path) as zf:
                with zf.open("arr_1.npy") as f:
                    shard_labels = np.lib.format.read_array(f)
                with zf.open("arr_0.npy") as f:
                    shape, dtype, fortran = _read_npy_header(f)
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
            bad.append(shard.index)
            continue
        ok = len(shape) == 4 and dtype == np.uint8 and not fortran and shape[0] == shard.size
        ok = ok and shard_labels.shape == (shard.size,) and (image_shape in (None, shape[1:]))
        if not ok:
            bad.append(shard.index)
            continue
        image_shape = shape[1:]
        labels.append(shard_labels.astype(np.int64, copy=False))
    if missing or bad:
        what = []
        if missing:
            what.append(f"missing {_ranges(missing)}")
        if bad:
            what.append(f"damaged {_ranges(bad)}")
        raise InvalidArgumentError(
            f"{out_dir} is not complete: of {len(shards)} shards, {'; '.join(what)}; "
            "run the same sampling command again to draw them"
        )
    labels = np.concatenate(labels)
    if _labels_hash(labels) != manifest["labels_sha256"]:
        raise InvalidArgumentError(
            f"the shards in {out_dir} hold other labels than its {MANIFEST} records; "
            "run the same sampling command again to draw them again"
        )

    total = (len(labels), *image_shape)
    size = int(np.prod(total)) + labels.nbytes + 1024
    try:
        with (
            atomic_write(out_path, "merged samples", size_hint=size) as tmp,
            zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED) as out,
        ):
            # force_zip64: the member's size is unknown to zipfile until it is written, and may pass 4 GB.
            with out.open("arr_0.npy", "w", force_zip64=True) as dst:
                header = {"descr": np.dtype(np.uint8).str, "fortran_order": False, "shape": total}
                np.lib.format.write_array_header_1_0(dst, header)
                for shard in shards:
                    if stop is not None and stop():
                        raise StoppedBySignal(
                            f"stopped while merging the shards of {out_dir} into {out_path}"
                        )
                    with zipfile.ZipFile(out_dir / shard.name) as zf, zf.open("arr_0.npy") as src:
                        _read_npy_header(src)
                        # Read to the end: zipfile checks the member's CRC there.
                        shutil.copyfileobj(src, dst, 16 << 20)
            with out.open("arr_1.npy", "w", force_zip64=True) as dst:
                np.lib.format.write_array(dst, labels)
    except (zipfile.BadZipFile, EOFError) as e:
        raise InvalidArgumentError(
            f"a shard in {out_dir} is damaged ({e}); run the same sampling command again to redraw it"
        ) from None
    return out_path


def remove_shards(out_dir: str | os.PathLike) -> None:
    """Delete the shards, manifest, lock file and leftover temporary files in ``out_dir``, then the folder
    if empty.

    Only files this module (and the pipeline's :class:`~ditq.runlock.RunLock`) writes are touched: a
    folder that also holds other files keeps them (and stays).
    """
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        return
    for path in out_dir.iterdir():
        if _SHARD_RE.match(path.name) or _TMP_RE.match(path.name) or path.name in (MANIFEST, LOCK_FILE):
            with suppress(FileNotFoundError):
                path.unlink()
    with suppress(OSError):
        out_dir.rmdir()


def _ranges(indices: list[int]) -> str:
    """``[0, 1, 2, 5]`` -> ``"0-2, 5"`` (at most 8 runs shown)."""
    runs: list[list[int]] = []
    for i in indices:
        if runs and i == runs[-1][1] + 1:
            runs[-1][1] = i
        else:
            runs.append([i, i])
    text = [f"{a}" if a == b else f"{a}-{b}" for a, b in runs[:8]]
    if len(runs) > 8:
        text.append("...")
    return ", ".join(text)


__all__ = [
    "MANIFEST",
    "Shard",
    "ShardRun",
    "list_shards",
    "make_eval_labels",
    "merge_shards",
    "plan_shards",
    "read_manifest",
    "remove_shards",
    "sample_shards",
    "shard_seed",
    "shards_of_rank",
]
