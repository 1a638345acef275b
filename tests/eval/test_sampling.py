"""ditq.eval.sampling: labels, the shard plan, resuming, damaged shards, settings checks, the merge.

A fake ``generate`` (numpy noise from the shard seed, the label in one pixel)
stands in for a model: these tests are about which shard is drawn with which
labels and seed, and what lands in the files. Ranks are played one after the
other in this process; the two-process launch is in tests/cli/test_cli_sample.py.
"""

from __future__ import annotations

import json
import zipfile

import numpy as np
import pytest

from ditq.errors import InvalidArgumentError, StoppedBySignal
from ditq.eval.npz import read_samples
from ditq.eval.sampling import (
    MANIFEST,
    list_shards,
    make_eval_labels,
    merge_shards,
    plan_shards,
    read_manifest,
    remove_shards,
    sample_shards,
    shard_seed,
    shards_of_rank,
)
from ditq.pipelines.sample import make_labels


class FakeModel:
    """``generate(labels, seed)``: 4x4 RGB noise from ``seed``, label in pixel (0, 0, 0); counts calls."""

    def __init__(self, fail_at: int | None = None, channels: int = 3, side: int = 4):
        self.calls: list[tuple[list[int], int]] = []
        self.fail_at, self.channels, self.side = fail_at, channels, side

    def __call__(self, labels: np.ndarray, seed: int) -> np.ndarray:
        if self.fail_at is not None and len(self.calls) == self.fail_at:
            raise KeyboardInterrupt  # a run killed in the middle
        self.calls.append((labels.tolist(), seed))
        shape = (len(labels), self.side, self.side, self.channels)
        images = np.random.default_rng(seed).integers(0, 256, shape, np.uint8)
        images[:, 0, 0, 0] = labels
        return images


LABELS = make_eval_labels(23, 5, seed=1)
RUN = dict(shard_size=5, seed=1)


def run(out_dir, model=None, labels=LABELS, **kwargs):
    return sample_shards(model or FakeModel(), labels, out_dir, **{**RUN, **kwargs})


def merged(out_dir, tmp_path, name="out.npz"):
    with np.load(merge_shards(out_dir, tmp_path / name)) as data:
        return data["arr_0"], data["arr_1"]


def assert_one_line(error, *fragments):
    message = str(error.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, message


# --- labels ----------------------------------------------------------------------------------


def test_uniform_labels_are_determined_by_the_seed_and_match_sample():
    a = make_eval_labels(200, 7, seed=3)
    assert a.dtype == np.int64 and a.shape == (200,) and set(a.tolist()) == set(range(7))
    np.testing.assert_array_equal(a, make_eval_labels(200, 7, seed=3))
    assert not np.array_equal(a, make_eval_labels(200, 7, seed=4))
    # The labels sample() draws for the same seed: an .npz and a grid of one command agree.
    np.testing.assert_array_equal(a, make_labels(None, 200, 7, seed=3))


def test_balanced_labels_give_every_class_its_share_shuffled():
    labels = make_eval_labels(23, 5, seed=0, balanced=True)
    assert labels.dtype == np.int64
    assert np.bincount(labels, minlength=5).tolist() == [5, 5, 5, 4, 4]  # the remainder to the first classes
    np.testing.assert_array_equal(labels, make_eval_labels(23, 5, seed=0, balanced=True))
    other = make_eval_labels(23, 5, seed=1, balanced=True)
    assert not np.array_equal(labels, other) and sorted(labels) == sorted(other)
    assert not np.array_equal(labels, np.sort(labels))
    assert (
        np.bincount(make_eval_labels(3, 10, seed=0, balanced=True), minlength=10).tolist()
        == [1] * 3 + [0] * 7
    )


@pytest.mark.parametrize(
    "args, match",
    [
        ((0, 5, 0), "num_samples must be a positive integer, got 0"),
        ((5, 0, 0), "num_classes must be a positive integer, got 0"),
        ((5, 5, -1), "seed must be an integer >= 0, got -1"),
        ((2.5, 5, 0), "num_samples must be a positive integer"),
    ],
)
def test_label_arguments_are_checked(args, match):
    with pytest.raises(InvalidArgumentError, match=match) as e:
        make_eval_labels(*args)
    assert_one_line(e)


# --- the plan --------------------------------------------------------------------------------


def test_shards_cover_the_samples_with_seeds_of_their_own():
    shards = plan_shards(23, 5, seed=1)
    assert [(s.index, s.start, s.stop) for s in shards] == [
        (0, 0, 5),
        (1, 5, 10),
        (2, 10, 15),
        (3, 15, 20),
        (4, 20, 23),
    ]
    assert shards[0].seed == 1  # one shard draws what the generator alone draws with the seed
    seeds = [s.seed for s in shards]
    assert len(set(seeds)) == 5 and all(0 <= s < 2**63 for s in seeds)
    assert seeds == [shard_seed(1, k) for k in range(5)] == [s.seed for s in plan_shards(23, 5, seed=1)]
    assert seeds[1:] != [s.seed for s in plan_shards(23, 5, seed=2)][1:]
    assert shards[1].name == "shard_000001.npz" and shards[4].size == 3
    assert [s.index for s in shards_of_rank(shards, 0, 2)] == [0, 2, 4]
    assert [s.index for s in shards_of_rank(shards, 1, 2)] == [1, 3]
    assert [s.index for s in shards_of_rank(shards, 1, 8)] == [1]
    assert shards_of_rank(shards, 7, 8) == []
    with pytest.raises(InvalidArgumentError, match="rank must be in 0..1, got 2"):
        shards_of_rank(shards, 2, 2)
    with pytest.raises(InvalidArgumentError, match="shard_size must be a positive integer"):
        plan_shards(23, 0, seed=1)


def test_any_number_of_ranks_writes_the_same_images(tmp_path):
    one = FakeModel()
    run(tmp_path / "one", one)
    expected = merged(tmp_path / "one", tmp_path, "one.npz")
    # What each shard was drawn from: exactly its labels and its seed.
    shards = plan_shards(23, 5, seed=1)
    assert one.calls == [(LABELS[s.start : s.stop].tolist(), s.seed) for s in shards]
    for world in (2, 3, 8):
        models = [FakeModel() for _ in range(world)]
        for rank in reversed(range(world)):  # the order ranks finish in does not matter
            result = run(tmp_path / f"w{world}", models[rank], rank=rank, world_size=world)
            assert result.drawn == [s.index for s in shards_of_rank(shards, rank, world)]
        assert sum(len(m.calls) for m in models) == 5
        got = merged(tmp_path / f"w{world}", tmp_path, f"w{world}.npz")
        np.testing.assert_array_equal(got[0], expected[0])
        np.testing.assert_array_equal(got[1], expected[1])
    np.testing.assert_array_equal(expected[1], LABELS)
    np.testing.assert_array_equal(expected[0][:, 0, 0, 0], LABELS)  # in sample order


def test_other_shard_size_gives_other_images(tmp_path):
    run(tmp_path / "a")
    run(tmp_path / "b", shard_size=6)
    assert not np.array_equal(
        merged(tmp_path / "a", tmp_path, "a.npz")[0], merged(tmp_path / "b", tmp_path)[0]
    )


# --- resume ----------------------------------------------------------------------------------


def test_a_killed_run_resumes_where_it_stopped(tmp_path):
    out = tmp_path / "shards"
    with pytest.raises(KeyboardInterrupt):
        run(out, FakeModel(fail_at=3))
    assert list_shards(out) == [0, 1, 2]
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]

    again = FakeModel()
    result = run(out, again, meta=None)
    assert [seed for _, seed in again.calls] == [shard_seed(1, 3), shard_seed(1, 4)]
    assert (result.kept, result.drawn, result.images_drawn, result.num_shards) == ([0, 1, 2], [3, 4], 8, 5)

    run(tmp_path / "whole")
    for a, b in zip(merged(out, tmp_path, "r.npz"), merged(tmp_path / "whole", tmp_path), strict=True):
        np.testing.assert_array_equal(a, b)

    third = FakeModel()
    assert run(out, third).kept == [0, 1, 2, 3, 4] and third.calls == []


class Boundary:
    """A ``boundary`` callback that records what it is given and stops at call ``stop_at`` (0: after the
    setup, 1: after the first round...), or raises the error it gets, as the pipeline's does."""

    def __init__(self, stop_at: int | None = None):
        self.stop_at, self.errors = stop_at, []

    def __call__(self, error):
        self.errors.append(error)
        if error is not None:
            raise error
        return len(self.errors) - 1 == self.stop_at


def test_every_rank_reaches_the_boundary_as_often_and_a_stop_keeps_its_shards(tmp_path):
    """Ranks go through the shards in rounds: with 5 shards on 2 ranks, rank 0 draws 0, 2, 4 and rank 1
    draws 1, 3, yet both call the boundary 1 + 3 times, so a collective there never waits for a rank
    that has left; likewise a rank that has all its shards already."""
    counts = []
    for rank in (0, 1):
        boundary = Boundary()
        result = run(tmp_path / "whole", rank=rank, world_size=2, boundary=boundary)
        assert not result.stopped
        counts.append(len(boundary.errors))
    kept = Boundary()
    assert run(tmp_path / "whole", rank=1, world_size=2, boundary=kept).kept == [1, 3]
    assert counts == [4, 4] and len(kept.errors) == 4 and set(kept.errors) == {None}

    out = tmp_path / "stopped"
    for rank, drew in ((0, [0, 2]), (1, [1, 3])):  # both ranks stop after the second round
        model = FakeModel()
        result = run(out, model, rank=rank, world_size=2, boundary=Boundary(stop_at=2))
        assert result.stopped and result.drawn == drew and len(model.calls) == 2
    assert list_shards(out) == [0, 1, 2, 3]
    assert not run(tmp_path / "early", boundary=Boundary(stop_at=0)).drawn  # stopped before any shard
    again = FakeModel()
    result = run(out, again)  # the resume draws the rest only, and the same images as a whole run
    assert result.kept == [0, 1, 2, 3] and result.drawn == [4] and len(again.calls) == 1
    for a, b in zip(merged(out, tmp_path, "r.npz"), merged(tmp_path / "whole", tmp_path), strict=True):
        np.testing.assert_array_equal(a, b)


def test_a_failed_shard_goes_to_the_boundary(tmp_path):
    calls = []

    def fails_on_the_second(labels, seed):
        calls.append(seed)
        if len(calls) == 2:
            return np.zeros((1, 4, 4, 3), np.uint8)
        return FakeModel()(labels, seed)

    boundary = Boundary()
    with pytest.raises(InvalidArgumentError, match="generate must return 5 uint8 images"):
        run(tmp_path / "s", fails_on_the_second, boundary=boundary)
    assert boundary.errors[:2] == [None, None] and isinstance(boundary.errors[2], InvalidArgumentError)
    assert list_shards(tmp_path / "s") == [0]
    (tmp_path / "f").write_text("not a folder")
    boundary = Boundary()  # a failed setup reaches it too
    with pytest.raises(InvalidArgumentError, match="is a file"):
        run(tmp_path / "f", boundary=boundary)
    assert len(boundary.errors) == 1


def test_a_stopped_merge_leaves_no_file(tmp_path):
    out = tmp_path / "shards"
    run(out)
    asked = []
    with pytest.raises(StoppedBySignal, match="stopped while merging"):
        merge_shards(out, tmp_path / "x.npz", stop=lambda: asked.append(1) or len(asked) == 3)
    assert len(asked) == 3 and sorted(p.name for p in tmp_path.iterdir()) == ["shards"]
    assert list_shards(out) == [0, 1, 2, 3, 4]
    merge_shards(out, tmp_path / "x.npz", stop=lambda: False)
    assert read_samples(tmp_path / "x.npz")[0].shape == (23, 4, 4, 3)


def test_damaged_shards_are_drawn_again(tmp_path):
    out = tmp_path / "shards"
    run(out)
    before = merged(out, tmp_path, "before.npz")
    path = out / "shard_000001.npz"
    path.write_bytes(path.read_bytes()[:-40])  # cut off
    data = bytearray((out / "shard_000002.npz").read_bytes())
    data[200] ^= 0xFF  # a flipped bit in the images: only the CRC tells
    (out / "shard_000002.npz").write_bytes(bytes(data))
    np.savez(out / "shard_000003.npz", arr_0=np.zeros((5, 4, 4, 3), np.uint8), arr_1=np.zeros(5, np.int64))
    np.savez(out / "shard_000004.npz", arr_0=np.zeros((2, 4, 4, 3), np.uint8), arr_1=LABELS[20:22])

    with pytest.raises(InvalidArgumentError, match=r"of 5 shards, damaged 1-2, 4; run the same") as e:
        merge_shards(out, tmp_path / "x.npz")
    assert_one_line(e)
    assert not (tmp_path / "x.npz").exists()

    again = FakeModel()
    result = run(out, again)
    assert result.kept == [0] and result.drawn == [1, 2, 3, 4]
    assert set(result.redrawn) == {1, 2, 3, 4} and "damaged" in result.redrawn[2]
    for a, b in zip(merged(out, tmp_path, "after.npz"), before, strict=True):
        np.testing.assert_array_equal(a, b)

    # A complete shard of other labels alone: the merge sees it by the labels' hash.
    np.savez(out / "shard_000003.npz", arr_0=np.zeros((5, 4, 4, 3), np.uint8), arr_1=np.zeros(5, np.int64))
    with pytest.raises(InvalidArgumentError, match="hold other labels than its manifest.json records") as e:
        merge_shards(out, tmp_path / "x.npz")
    assert_one_line(e)


def test_damage_deep_in_the_images_is_found_on_resume(tmp_path):
    out = tmp_path / "shards"
    run(out, FakeModel(side=32))  # shards large enough that reading the headers reads no image bytes
    data = bytearray((out / "shard_000002.npz").read_bytes())
    data[10_000] ^= 0xFF
    (out / "shard_000002.npz").write_bytes(bytes(data))
    result = run(out, FakeModel(side=32))
    assert result.drawn == [2] and "damaged" in result.redrawn[2]


def test_damage_deep_in_the_images_is_caught_by_the_merge(tmp_path):
    out = tmp_path / "shards"
    run(out, FakeModel(side=32))  # shards large enough that checking the headers reads no image bytes
    data = bytearray((out / "shard_000002.npz").read_bytes())
    data[10_000] ^= 0xFF
    (out / "shard_000002.npz").write_bytes(bytes(data))
    with pytest.raises(InvalidArgumentError, match="is damaged .*run the same sampling command again") as e:
        merge_shards(out, tmp_path / "x.npz")
    assert_one_line(e)
    assert not (tmp_path / "x.npz").exists() and not list(tmp_path.glob(".x.npz*"))


@pytest.mark.parametrize(
    "change, fragment",
    [
        (dict(shard_size=4), "shard_size was 5, now 4"),
        (dict(seed=2), "seed was 1, now 2"),
        (dict(labels=LABELS[:20]), "num_samples was 23, now 20"),
        (dict(labels=make_eval_labels(23, 5, seed=1, balanced=True)), "class labels"),
        (dict(meta={"model": "b", "steps": 4}), "model was 'a', now 'b'"),
        (dict(meta={"model": "a", "steps": 5}), "steps was 4, now 5"),
        (dict(meta={"model": "a"}), "steps was 4, now None"),
    ],
)
def test_other_settings_in_the_same_folder_are_a_one_line_error(tmp_path, change, fragment):
    out = tmp_path / "shards"
    with pytest.raises(KeyboardInterrupt):
        run(out, FakeModel(fail_at=2), meta={"model": "a", "steps": 4})
    model = FakeModel()
    with pytest.raises(InvalidArgumentError) as e:
        run(out, model, **{"meta": {"model": "a", "steps": 4}, **change})
    assert_one_line(e, str(out), fragment, "use another shard folder, or the same settings to resume")
    assert model.calls == [] and list_shards(out) == [0, 1]
    assert read_manifest(out)["meta"] == {"model": "a", "steps": 4}


def test_shards_without_a_manifest_are_not_trusted(tmp_path):
    out = tmp_path / "shards"
    run(out)
    (out / MANIFEST).unlink()
    model = FakeModel()
    with pytest.raises(InvalidArgumentError, match="holds shard files but no manifest.json") as e:
        run(out, model)
    assert_one_line(e)
    assert model.calls == []
    with pytest.raises(InvalidArgumentError, match="has no manifest.json"):
        merge_shards(out, tmp_path / "x.npz")


def test_an_unreadable_manifest_is_a_one_line_error(tmp_path):
    out = tmp_path / "shards"
    out.mkdir()
    (out / MANIFEST).write_text("{not json")
    with pytest.raises(InvalidArgumentError, match="is not readable") as e:
        run(out)
    assert_one_line(e)
    (out / MANIFEST).write_text(json.dumps({"format": "something else"}))
    with pytest.raises(InvalidArgumentError, match="not a ditq sample-shard manifest"):
        run(out)


# --- files -----------------------------------------------------------------------------------


def test_shards_and_merge_are_adm_batches(tmp_path):
    out = tmp_path / "shards"
    run(out, FakeModel(channels=1), meta={"sampler": "ddim", "cfg": (1, 2)})
    manifest = read_manifest(out)
    assert (manifest["num_samples"], manifest["shard_size"], manifest["num_shards"], manifest["seed"]) == (
        23,
        5,
        5,
        1,
    )
    assert manifest["meta"] == {"sampler": "ddim", "cfg": [1, 2]}
    with np.load(out / "shard_000004.npz") as shard:
        assert shard["arr_0"].shape == (3, 4, 4, 3)  # grayscale written as RGB, as ADM expects
        np.testing.assert_array_equal(shard["arr_1"], LABELS[20:])
    path = merge_shards(out, tmp_path / "samples.npz")
    images, labels = read_samples(path)
    assert images.shape == (23, 4, 4, 3) and images.dtype == np.uint8
    np.testing.assert_array_equal(labels, LABELS)
    np.testing.assert_array_equal(images[..., 0], images[..., 2])
    with zipfile.ZipFile(path) as zf:
        assert sorted(zf.namelist()) == ["arr_0.npy", "arr_1.npy"]
    with np.load(path) as data:
        np.testing.assert_array_equal(data["arr_0"], images)


def test_missing_shards_are_listed(tmp_path):
    out = tmp_path / "shards"
    run(out, rank=0, world_size=2)
    with pytest.raises(InvalidArgumentError, match=r"of 5 shards, missing 1, 3; run the same") as e:
        merge_shards(out, tmp_path / "x.npz")
    assert_one_line(e)


def test_generate_must_return_the_images_of_its_shard(tmp_path):
    def bad(labels, seed):
        return np.zeros((len(labels) - 1, 4, 4, 3), np.uint8)

    with pytest.raises(InvalidArgumentError, match="generate must return 5 uint8 images") as e:
        run(tmp_path / "s", bad)
    assert_one_line(e)
    with pytest.raises(InvalidArgumentError, match="labels must be a non-empty 1-d integer array"):
        run(tmp_path / "s", labels=np.zeros(0, np.int64))
    with pytest.raises(InvalidArgumentError, match="JSON-serializable"):
        run(tmp_path / "t", meta={"model": object})


def test_remove_shards_leaves_other_files(tmp_path):
    out = tmp_path / "shards"
    run(out)
    (out / ".shard_000001.npz.123.abcd.tmp").write_bytes(b"left by a killed writer")
    (out / ".ditq.lock").write_bytes(b"")  # the pipeline's lock (its holder removes it)
    remove_shards(out)
    assert not out.exists()
    run(out)
    (out / "notes.txt").write_text("mine")
    remove_shards(out)
    assert [p.name for p in out.iterdir()] == ["notes.txt"]


def test_progress_bar_on_rank_0_only(tmp_path, capsys):
    run(tmp_path / "a", progress=True)
    err = capsys.readouterr().err
    assert "23/23" in err and "img/s" in err
    run(tmp_path / "b", progress=True, rank=1, world_size=2)
    run(tmp_path / "c", progress=None)  # stderr is not a terminal here
    assert capsys.readouterr().err == ""
