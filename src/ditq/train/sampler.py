"""The order training reads data in: seeded epoch permutations, resumable from one integer.

The stream of dataset keys is the concatenation of one random permutation
per epoch, each drawn from ``(seed, epoch)``. Position ``p`` of the stream is
key ``epoch * n + perm_epoch[p % n]`` with ``epoch = p // n``, so

- the whole order follows from the seed, whatever the batch size;
- resuming needs only the cursor (stream positions consumed so far), which
  the training state stores;
- a batch may straddle two epochs, so any dataset size works with any batch
  size and no image is dropped;
- keys name an epoch as well as an item: a dataset can draw per-epoch
  augmentations from the key alone (:class:`ditq.data.ImageFolderDataset`
  flips that way), the same in every DataLoader worker. In-memory data
  indexes with ``key % n``.

With ``world_size`` processes, a global batch is ``world_size * batch_size``
consecutive positions and rank ``r`` reads the ``r``-th slice of it, so the
global order does not depend on how many processes share it.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from ditq.errors import InvalidArgumentError


class ResumableSampler:
    """Batches of dataset keys, epoch after epoch, forever, starting at ``cursor``.

    Iterating yields lists of ints (as a DataLoader ``batch_sampler`` wants);
    :meth:`keys` gives any stretch of the stream as a tensor.
    """

    def __init__(
        self,
        num_items: int,
        batch_size: int,
        *,
        seed: int = 0,
        cursor: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ):
        if num_items < 1:
            raise InvalidArgumentError(f"cannot sample from an empty dataset (num_items={num_items})")
        if batch_size < 1:
            raise InvalidArgumentError(f"batch_size must be positive, got {batch_size}")
        if not 0 <= rank < world_size:
            raise InvalidArgumentError(f"rank {rank} is not in [0, world_size={world_size})")
        self.num_items = num_items
        self.batch_size = batch_size
        self.seed = seed
        self.cursor = cursor
        self.rank = rank
        self.world_size = world_size
        self._perms: dict[int, torch.Tensor] = {}

    @property
    def global_batch_size(self) -> int:
        return self.batch_size * self.world_size

    def permutation(self, epoch: int) -> torch.Tensor:
        """The item order of ``epoch`` (a permutation of ``range(num_items)``)."""
        if epoch not in self._perms:
            # SeedSequence mixes (seed, epoch) into an unrelated 63-bit seed per epoch.
            s = int(np.random.SeedSequence([self.seed, epoch]).generate_state(2, np.uint64)[0]) >> 1
            gen = torch.Generator().manual_seed(s)
            if len(self._perms) >= 2:  # a batch rarely spans more than two epochs
                self._perms.pop(min(self._perms))
            self._perms[epoch] = torch.randperm(self.num_items, generator=gen)
        return self._perms[epoch]

    def keys(self, start: int, count: int) -> torch.Tensor:
        """Stream positions ``[start, start + count)`` as keys (int64)."""
        n = self.num_items
        parts, pos, end = [], start, start + count
        while pos < end:
            epoch, offset = divmod(pos, n)
            take = min(n - offset, end - pos)
            parts.append(self.permutation(epoch)[offset : offset + take] + epoch * n)
            pos += take
        return torch.cat(parts) if parts else torch.empty(0, dtype=torch.long)

    def next_keys(self) -> torch.Tensor:
        """This rank's keys of the next global batch; advances the cursor."""
        start = self.cursor + self.rank * self.batch_size
        self.cursor += self.global_batch_size
        return self.keys(start, self.batch_size)

    def __iter__(self) -> Iterator[list[int]]:
        # A copy, so a DataLoader prefetching ahead does not move this sampler's cursor:
        # the training loop advances the cursor itself, once per step it really took.
        other = ResumableSampler(
            self.num_items,
            self.batch_size,
            seed=self.seed,
            cursor=self.cursor,
            rank=self.rank,
            world_size=self.world_size,
        )
        while True:
            yield other.next_keys().tolist()

    def state_dict(self) -> dict:
        return {"cursor": self.cursor, "seed": self.seed, "num_items": self.num_items}

    def load_state_dict(self, state: dict) -> None:
        if state["num_items"] != self.num_items or state["seed"] != self.seed:
            raise InvalidArgumentError(
                f"the saved data order is for {state['num_items']} items with seed {state['seed']}, "
                f"but this run has {self.num_items} items with seed {self.seed}; resume with the same data "
                "and seed"
            )
        self.cursor = int(state["cursor"])
