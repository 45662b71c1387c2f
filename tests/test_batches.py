"""The data order: each epoch visits every row once, and processes share each batch."""

from __future__ import annotations

import torch

from diffusion_lib.batches import _BatchPlan
from diffusion_lib.devices import ProcessGroup


def test_each_epoch_visits_every_image_once_and_processes_split_each_batch() -> None:
    single = _BatchPlan(12, 4, seed=5, group=ProcessGroup())
    for epoch in range(2):
        visited = torch.cat([single.indices(epoch * 3 + k, torch.device("cpu")) for k in range(3)])
        assert sorted(visited.tolist()) == list(range(12))
    ranks = [_BatchPlan(12, 4, seed=5, group=ProcessGroup(rank, 2)) for rank in range(2)]
    for step in range(6):
        shards = [plan.indices(step, torch.device("cpu")) for plan in ranks]
        assert torch.equal(torch.cat(shards), single.indices(step, torch.device("cpu")))
