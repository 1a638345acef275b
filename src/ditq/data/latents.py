"""Latents extracted once through a VAE, in safetensors shards, and the Dataset that trains on them.

Latent DiT training encodes every image through the VAE at every step; for
a fixed dataset that is the same work again each epoch, often more than the
DiT's own. :func:`extract_latents` does it once (``ditq extract-latents``)::

    DIR/manifest.json              what is in DIR (written atomically after each shard)
    DIR/shard_00000.safetensors    latents (N, C, h, w), labels (N,) int64[, latents_flip]
    DIR/shard_00001.safetensors    ...

Item ``i`` of the image dataset is row ``i - start`` of the shard whose
``[start, start + count)`` holds it; every shard but the last has
``shard_size`` items. A latent is what the VAE's ``encode`` returns: for the
Stable Diffusion VAE, ``latent_dist.sample() * 0.18215`` (``latent="sample"``,
what DiT trains on, drawn from a generator seeded by ``(seed, shard)``) or
``latent_dist.mean * 0.18215`` (``latent="mean"``), stored as float16 by
default. With ``flip``, ``latents_flip`` holds the latents of the mirrored
images (a VAE is not flip-equivariant, so they are encoded, not mirrored).

The manifest (``format: "ditq-latents"``) lists the finished shards with
their counts, the class names, the VAE, the image size, the latent shape and
the options. Extraction resumes: a shard listed there whose file is present
and whole is skipped, any other is (re)written; options that differ from the
manifest's are refused. One extraction at a time: the folder is locked
(:class:`~ditq.runlock.RunLock`), and SIGTERM, SIGINT or SIGUSR1 stops it
after the current shard with :class:`~ditq.errors.StoppedBySignal`, which
says how to resume. ``complete: true`` marks a finished folder, the only
kind :class:`LatentDataset` reads (``data: {kind: latents, path: DIR}`` in a
training config; the model's ``in_channels`` and ``input_size`` are then the
latents' channels and side, e.g. 4 and ``image_size / 8``).

This module takes the VAE as an object (anything with ``encode``,
``latent_channels`` and ``downsample``, see :mod:`ditq.models.vae`) and
imports nothing from ``ditq.models``.
"""

from __future__ import annotations

import bisect
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset

from ditq.checkpoint import atomic_write, read_safetensors_header
from ditq.data.folder import flip_bit
from ditq.errors import CheckpointError, DitqError, InvalidArgumentError, StoppedBySignal
from ditq.preemption import StopSignals
from ditq.runlock import RunLock

FORMAT = "ditq-latents"
VERSION = 1
MANIFEST = "manifest.json"
LATENT_KINDS = ("sample", "mean")
DTYPES = {"float16": torch.float16, "float32": torch.float32, "bfloat16": torch.bfloat16}

# Manifest entries that must be the same to resume an extraction into a folder.
_SETTINGS = (
    "format",
    "version",
    "vae",
    "image_size",
    "latent_shape",
    "dtype",
    "latent",
    "flip",
    "seed",
    "shard_size",
    "num_items",
    "class_names",
)


def shard_name(index: int) -> str:
    return f"shard_{index:05d}.safetensors"


@dataclass
class ExtractResult:
    """What :func:`extract_latents` did."""

    out: Path
    num_items: int
    num_shards: int
    written: int  # shards encoded by this call
    skipped: int  # shards found complete and kept
    manifest: dict


def extract_latents(
    dataset: Dataset,
    vae: Any,
    out: str | os.PathLike,
    *,
    vae_name: str,
    image_size: int,
    flip: bool = False,
    shard_size: int = 1024,
    batch_size: int = 32,
    dtype: str = "float16",
    latent: str = "sample",
    seed: int = 0,
    num_workers: int = 0,
    class_names: list[str] | None = None,
    source: str | None = None,
    log: Callable[[str], None] | None = None,
    progress: bool = False,
    command: str | None = None,
) -> ExtractResult:
    """Encode every ``(image, label)`` of ``dataset`` through ``vae`` into shards in ``out``; resumable.

    ``dataset`` yields images in [-1, 1] of side ``image_size`` (an
    :class:`~ditq.data.ImageFolderDataset` without random flips), read
    ``batch_size`` at a time by ``num_workers`` DataLoader workers.
    ``vae_name`` and ``source`` are recorded in the manifest (the name is what
    sampling should decode with). See the module doc for the layout.

    ``out`` is locked for the call (another live process there is a
    :class:`~ditq.errors.RunLockedError`); a signal stops it after the current
    shard with :class:`~ditq.errors.StoppedBySignal`, whose message says to
    resume with ``command`` (the command line of this run).
    """
    if shard_size < 1:
        raise InvalidArgumentError(f"shard_size must be at least 1, got {shard_size}")
    if batch_size < 1:
        raise InvalidArgumentError(f"batch_size must be at least 1, got {batch_size}")
    if dtype not in DTYPES:
        raise InvalidArgumentError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if latent not in LATENT_KINDS:
        raise InvalidArgumentError(f"latent must be one of {', '.join(LATENT_KINDS)}, got {latent!r}")
    down = int(vae.downsample)
    if image_size % down:
        raise InvalidArgumentError(
            f"image_size {image_size} is not a multiple of the VAE's downsampling {down}; "
            f"use a multiple of {down} (e.g. {max(down, image_size // down * down)})"
        )
    num_items = len(dataset)
    if num_items == 0:
        raise DitqError("the dataset is empty; nothing to extract")
    out = Path(out)
    if class_names is None:
        class_names = list(getattr(dataset, "classes", []) or []) or None
    side = image_size // down
    manifest = {
        "format": FORMAT,
        "version": VERSION,
        "vae": vae_name,
        "scale": float(getattr(vae, "scale", 1.0)),
        "image_size": image_size,
        "latent_shape": [int(vae.latent_channels), side, side],
        "dtype": dtype,
        "latent": latent,
        "flip": bool(flip),
        "seed": seed,
        "shard_size": shard_size,
        "num_items": num_items,
        "class_names": class_names,
        "source": source,
        "complete": False,
        "shards": [],
    }
    num_shards = -(-num_items // shard_size)
    say = log or (lambda _: None)
    if out.exists() and not out.is_dir():
        raise InvalidArgumentError(f"the output {out} is a file; give a folder for the latents")
    with RunLock(out, "latents folder", log=say), StopSignals() as stop:
        written = _extract_locked(
            dataset, vae, out, manifest, num_shards, say=say, stop=stop, command=command, progress=progress,
            batch_size=batch_size, num_workers=num_workers,
        )  # fmt: skip
    return ExtractResult(out, num_items, num_shards, written, num_shards - written, manifest)


def _extract_locked(
    dataset, vae, out, manifest, num_shards, *, say, stop, command, progress, batch_size, num_workers
) -> int:
    """The shards :func:`extract_latents` encodes, under its lock and signals; how many it wrote."""
    num_items, shard_size = manifest["num_items"], manifest["shard_size"]
    done = _finished_shards(out, manifest)
    manifest["shards"] = [done[i] for i in sorted(done)]
    if done:
        say(
            f"{len(done)} of {num_shards} shards already in {out}; "
            f"extracting the other {num_shards - len(done)}"
        )
    bar = _progress_bar(num_items, sum(e["count"] for e in done.values()), enabled=progress)
    written = 0
    try:
        for index in range(num_shards):
            if index in done:
                continue
            start = index * shard_size
            count = min(shard_size, num_items - start)
            tensors = _encode_shard(
                dataset,
                vae,
                start,
                count,
                batch_size=batch_size,
                num_workers=num_workers,
                flip=manifest["flip"],
                sample=manifest["latent"] == "sample",
                seed=manifest["seed"],
                index=index,
                dtype=DTYPES[manifest["dtype"]],
                on_batch=bar.update,
            )
            entry = {"index": index, "file": shard_name(index), "start": start, "count": count}
            _write_shard(out / entry["file"], tensors, entry)
            done[index] = entry
            manifest["shards"] = [done[i] for i in sorted(done)]
            write_manifest(out, manifest)
            written += 1
            # After the last shard only the manifest's "complete" is left to write: no reason to stop.
            if len(done) < num_shards and stop.should_stop():
                raise StoppedBySignal(
                    f"stopped after {len(done)} of {num_shards} shards by {stop.received}; the finished "
                    f"shards are in {out}; resume with: {command or 'the same extract_latents call'}"
                )
    finally:
        bar.close()
    manifest["complete"] = True
    write_manifest(out, manifest)
    return written


def _encode_shard(
    dataset, vae, start, count, *, batch_size, num_workers, flip, sample, seed, index, dtype, on_batch
) -> dict[str, torch.Tensor]:
    # One generator per shard, seeded by (seed, shard): re-extracting a shard gives the same bits.
    s = int(np.random.SeedSequence([seed, index]).generate_state(2, np.uint64)[0]) >> 1
    gen = torch.Generator().manual_seed(s)
    loader = DataLoader(
        Subset(dataset, range(start, start + count)), batch_size=batch_size, num_workers=num_workers
    )
    latents, flipped, labels = [], [], []
    for x, y in loader:
        z = vae.encode(x, batch_size=batch_size, generator=gen, sample=sample)
        latents.append(z.to("cpu", dtype))
        if flip:
            zf = vae.encode(x.flip(-1), batch_size=batch_size, generator=gen, sample=sample)
            flipped.append(zf.to("cpu", dtype))
        labels.append(torch.as_tensor(y, dtype=torch.int64))
        on_batch(len(x))
    tensors = {"latents": torch.cat(latents), "labels": torch.cat(labels)}
    if flip:
        tensors["latents_flip"] = torch.cat(flipped)
    if not torch.isfinite(tensors["latents"].float()).all():
        raise DitqError(
            f"the VAE gave non-finite latents for items {start}..{start + count - 1}; "
            "with --dtype float16, try float32"
        )
    return tensors


def _write_shard(path: Path, tensors: dict[str, torch.Tensor], entry: dict) -> None:
    from safetensors.torch import save_file

    try:
        size = sum(t.numel() * t.element_size() for t in tensors.values()) + 1024
        with atomic_write(path, "latents shard", size_hint=size) as tmp:
            save_file(
                {k: v.contiguous() for k, v in tensors.items()},
                str(tmp),
                metadata={FORMAT: json.dumps(entry)},
            )
    except OSError as e:
        raise DitqError(f"cannot write {path}: {e.strerror or e}; check that the folder is writable") from e


def write_manifest(out: str | os.PathLike, manifest: dict) -> None:
    """Write ``out/manifest.json`` atomically."""
    with atomic_write(Path(out) / MANIFEST, "latents manifest") as tmp:
        tmp.write_text(json.dumps(manifest, indent=1) + "\n")


def read_manifest(root: str | os.PathLike) -> dict:
    """The manifest of a latents folder (one-line errors for a missing or foreign one)."""
    path = Path(root) / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise DitqError(
            f"no latents in {root} ({MANIFEST} not found); write them with ditq extract-latents"
        ) from None
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot read {path}: {e}; extract the latents again") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a ditq latents manifest (format {FORMAT!r})")
    if manifest.get("version", 0) > VERSION:
        raise CheckpointError(
            f"{path} is version {manifest['version']} of the latents format; this ditq reads up to "
            f"{VERSION}: upgrade ditq"
        )
    return manifest


def _finished_shards(out: Path, manifest: dict) -> dict[int, dict]:
    """The shards of an earlier extraction into ``out`` that can be kept, by index."""
    if not (out / MANIFEST).exists():
        return {}
    old = read_manifest(out)
    changed = [k for k in _SETTINGS if old.get(k) != manifest.get(k)]
    if changed:
        what = ", ".join(f"{k} {old.get(k)!r} -> {manifest.get(k)!r}" for k in changed)
        raise DitqError(
            f"{out} holds latents extracted with other settings ({what}); "
            "extract with the same options to resume, or use another --out"
        )
    return {e["index"]: e for e in old.get("shards", []) if _shard_whole(out / e["file"], e, manifest)}


def _shard_whole(path: Path, entry: dict, manifest: dict) -> bool:
    try:
        info, _ = read_safetensors_header(path)
    except CheckpointError:  # missing or cut off: write it again
        return False
    shape = [entry["count"], *manifest["latent_shape"]]
    names = ["latents", "labels"] + (["latents_flip"] if manifest["flip"] else [])
    return all(n in info for n in names) and all(
        info[n]["shape"] == (shape if n != "labels" else shape[:1]) for n in names
    )


#################################################################################
#                                 Reading them back                             #
#################################################################################


class LatentDataset(Dataset):
    """The items of a latents folder as ``(latent (C, h, w) float32, label int)``.

    Indexed with sampler keys like :class:`~ditq.data.ImageFolderDataset`:
    key ``k`` is item ``k % len`` of epoch ``k // len``; with ``random_flip``
    and latents extracted with flips, the mirrored image's latents are taken
    when :func:`~ditq.data.folder.flip_bit` of ``(seed, k)`` says so, the same
    in every worker and after a resume. Shards are memory-mapped and read one
    row at a time, so a dataset larger than memory trains as well.
    """

    epoch_keys = True

    def __init__(self, root: str | os.PathLike, *, random_flip: bool = True, seed: int = 0):
        self.root = Path(root)
        self.manifest = m = read_manifest(self.root)
        if not m.get("complete"):
            raise DitqError(
                f"the latents in {self.root} are not complete ({len(m.get('shards', []))} shards written); "
                "run ditq extract-latents again with the same options to finish"
            )
        self.seed = seed
        self.flip = bool(random_flip and m["flip"])
        self.classes: list[str] | None = m.get("class_names")
        self.vae: str = m["vae"]
        self.image_size: int = int(m["image_size"])
        self.latent_channels, self.latent_size = int(m["latent_shape"][0]), int(m["latent_shape"][1])
        shards = sorted(m["shards"], key=lambda e: e["start"])
        self.files = [self.root / e["file"] for e in shards]
        self.starts = [int(e["start"]) for e in shards]
        self.num_items = int(m["num_items"])
        if sum(int(e["count"]) for e in shards) != self.num_items:
            raise CheckpointError(f"the manifest in {self.root} does not add up; extract the latents again")
        self._handles: dict[int, Any] = {}
        self.labels = torch.cat([self._open(i).get_tensor("labels") for i in range(len(self.files))])

    @property
    def num_classes(self) -> int:
        return len(self.classes) if self.classes else int(self.labels.max()) + 1

    def __len__(self) -> int:
        return self.num_items

    def _open(self, shard: int):
        from safetensors import safe_open

        if shard not in self._handles:
            try:
                self._handles[shard] = safe_open(str(self.files[shard]), framework="pt")
            except Exception as e:  # safetensors raises its own error types, OSError too
                raise CheckpointError(
                    f"cannot read latents shard {self.files[shard]}: {e}; run ditq extract-latents again"
                ) from None
        return self._handles[shard]

    def __getitem__(self, key: int) -> tuple[torch.Tensor, int]:
        key = int(key)
        if key < 0:
            raise IndexError(f"negative key {key}")
        i = key % self.num_items
        shard = bisect.bisect_right(self.starts, i) - 1
        row = i - self.starts[shard]
        name = "latents_flip" if self.flip and flip_bit(self.seed, key) else "latents"
        z = self._open(shard).get_slice(name)[row : row + 1][0]
        return z.float(), int(self.labels[i])

    def __getstate__(self) -> dict:
        # Open files do not cross process boundaries (spawned DataLoader workers reopen them).
        state = dict(self.__dict__)
        state["_handles"] = {}
        return state


class _NoBar:
    def update(self, n: int) -> None: ...
    def close(self) -> None: ...


def _progress_bar(total: int, initial: int, *, enabled: bool):
    if not enabled:
        return _NoBar()
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, unit="img", dynamic_ncols=True)


__all__ = [
    "FORMAT",
    "MANIFEST",
    "ExtractResult",
    "LatentDataset",
    "extract_latents",
    "read_manifest",
    "write_manifest",
]
