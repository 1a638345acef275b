"""The resumable data order: seeded epoch permutations addressed by one cursor."""

from __future__ import annotations

import itertools

import pytest
import torch

from ditq.errors import InvalidArgumentError
from ditq.train.sampler import ResumableSampler


def test_each_epoch_is_a_permutation_and_keys_name_the_epoch():
    s = ResumableSampler(7, 3, seed=1)
    keys = s.keys(0, 21)
    for epoch in range(3):
        part = keys[7 * epoch : 7 * (epoch + 1)]
        assert torch.equal((part // 7), torch.full((7,), epoch))
        assert sorted((part % 7).tolist()) == list(range(7))
    assert not torch.equal(keys[:7] % 7, keys[7:14] % 7)  # reshuffled each epoch


def test_order_follows_the_seed_only():
    a = ResumableSampler(10, 4, seed=3).keys(0, 30)
    b = ResumableSampler(10, 5, seed=3).keys(0, 30)  # batch size does not change the order
    c = ResumableSampler(10, 4, seed=4).keys(0, 30)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_resuming_from_the_cursor_continues_the_stream():
    s = ResumableSampler(5, 3, seed=0)
    first = [s.next_keys().tolist() for _ in range(4)]  # batches straddle epochs (3 does not divide 5)
    state = s.state_dict()
    rest = [s.next_keys().tolist() for _ in range(3)]
    t = ResumableSampler(5, 3, seed=0)
    t.load_state_dict(state)
    assert [t.next_keys().tolist() for _ in range(3)] == rest
    assert list(itertools.islice(iter(ResumableSampler(5, 3, seed=0)), 7)) == first + rest


def test_iterating_does_not_move_the_cursor():
    s = ResumableSampler(5, 2, seed=0, cursor=4)
    list(itertools.islice(iter(s), 3))
    assert s.cursor == 4


def test_batches_larger_than_the_dataset():
    s = ResumableSampler(3, 8, seed=0)
    keys = s.next_keys()
    assert len(keys) == 8 and sorted((keys[:6] % 3).tolist()) == [0, 0, 1, 1, 2, 2]


def test_ranks_share_each_global_batch():
    whole = ResumableSampler(10, 6, seed=2)
    ranks = [ResumableSampler(10, 3, seed=2, rank=r, world_size=2) for r in range(2)]
    for _ in range(4):
        assert torch.equal(whole.next_keys(), torch.cat([r.next_keys() for r in ranks]))


def test_mismatched_state_and_bad_arguments():
    s = ResumableSampler(5, 2, seed=0)
    with pytest.raises(InvalidArgumentError, match="same data and seed"):
        ResumableSampler(6, 2, seed=0).load_state_dict(s.state_dict())
    with pytest.raises(InvalidArgumentError, match="empty"):
        ResumableSampler(0, 2)
    with pytest.raises(InvalidArgumentError, match="rank"):
        ResumableSampler(5, 2, rank=2, world_size=2)
