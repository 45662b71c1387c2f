"""Which rows of the dataset each training step takes, and the seeds of every random draw.

Both depend only on ``seed``, a purpose, the step number (or epoch) and the process's rank,
never on what ran before, so a run resumed from a checkpoint takes the same batches and draws
the same noise as the uninterrupted run, and every process agrees on the data order.
"""

from __future__ import annotations

import hashlib

import torch
from torch import Tensor

from diffusion_lib.devices import ProcessGroup


def _derived_seed(seed: int, *parts: object) -> int:
    """A 63-bit seed determined by ``seed`` and ``parts`` only (e.g. a purpose and a step)."""
    digest = hashlib.sha256(repr((seed, *parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


class _BatchPlan:
    """Which dataset rows each step uses: epoch e visits a permutation seeded by (seed, e).

    ``batch_size`` is global; the process of rank r takes rows ``[r b, (r + 1) b)`` of every
    global batch, with ``b = batch_size / world_size``. Incomplete batches at an epoch's end
    are skipped, so each step has exactly ``batch_size`` images. Permutations are drawn on
    the CPU, so the data order is the same on every device.
    """

    def __init__(self, dataset_size: int, batch_size: int, seed: int, group: ProcessGroup) -> None:
        self.dataset_size = dataset_size
        self.batch_size = batch_size
        self.seed = seed
        self.group = group
        self.steps_per_epoch = dataset_size // batch_size
        self._epoch = -1
        self._permutation: Tensor | None = None

    def indices(self, step: int, device: torch.device) -> Tensor:
        """This process's rows of the dataset for ``step``, shape (batch_size / world_size,)."""
        epoch, position = divmod(step, self.steps_per_epoch)
        if epoch != self._epoch or self._permutation is None:
            generator = torch.Generator().manual_seed(_derived_seed(self.seed, "order", epoch))
            self._permutation = torch.randperm(self.dataset_size, generator=generator).to(device)
            self._epoch = epoch
        shard = self.batch_size // self.group.world_size
        start = position * self.batch_size + self.group.rank * shard
        return self._permutation[start : start + shard]


def _seed_global_generators(seed: int, rank: int, device: torch.device) -> None:
    """Seed the generators that layers such as dropout draw from (restored when train returns)."""
    torch.default_generator.manual_seed(_derived_seed(seed, "global", rank))
    if device.type == "cuda":
        torch.cuda.default_generators[device.index].manual_seed(_derived_seed(seed, "cuda", rank))
