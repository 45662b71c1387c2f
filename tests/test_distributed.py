"""Two CPU processes (gloo) under torchrun train as one model and write one checkpoint.

This file is both the test and, when run as a script by ``torch.distributed.run``, the
worker that each process executes.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

WORLD_SIZE = 2
STEPS, CHECKPOINT_EVERY = 6, 3


class SmallDenoiser(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(17, 16), nn.SiLU(), nn.Linear(16, 16))

    def forward(self, x_t: Tensor, t: Tensor) -> Tensor:
        features = torch.cat([x_t.flatten(1), t[:, None].float() / 20], dim=1)
        return self.net(features).reshape(x_t.shape)


def worker(output: Path) -> None:
    """Train with every process starting from different weights, then save what each ended with."""
    import diffusion_lib.trainer as trainer
    import diffusion_lib.training as training
    from diffusion_lib.schedules import NoiseSchedule

    rank = int(os.environ["RANK"])
    writes: list[int] = []
    write_checkpoint = trainer.save_checkpoint

    def counting_save(path: Path, state: dict) -> Path:
        writes.append(state["step"])
        return write_checkpoint(path, state)

    trainer.save_checkpoint = counting_save
    torch.manual_seed(100 + rank)  # different initial weights: DDP must make them agree
    model = SmallDenoiser()
    images = torch.randn(32, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    result = training.train(
        model, NoiseSchedule.from_name("linear", 20), images,
        steps=STEPS, batch_size=8, checkpoint_dir=output / "run", checkpoint_every=CHECKPOINT_EVERY,
        progress=False, device="cpu",
    )  # fmt: skip
    torch.save(
        {"model": result.model.state_dict(), "ema": result.ema_model.state_dict(),
         "loss": result.history.loss, "writes": writes, "initial_seed": 100 + rank},
        output / f"rank{rank}.pt",
    )  # fmt: skip


@pytest.mark.slow
def test_two_gloo_processes_end_with_identical_weights_and_one_checkpoint(tmp_path) -> None:
    launched = launch(tmp_path, "train")
    assert launched.returncode == 0, launched.stdout[-3000:] + launched.stderr[-3000:]
    ranks = [
        torch.load(tmp_path / f"rank{rank}.pt", weights_only=True) for rank in range(WORLD_SIZE)
    ]
    for name, tensor in ranks[0]["model"].items():
        assert torch.equal(ranks[1]["model"][name], tensor), name
    for name, tensor in ranks[0]["ema"].items():
        assert torch.equal(ranks[1]["ema"][name], tensor), name
    assert ranks[0]["loss"] == ranks[1]["loss"] and len(ranks[0]["loss"]) == STEPS
    # Only rank 0 writes, at every checkpoint_every steps and at the end.
    assert ranks[0]["writes"] == [CHECKPOINT_EVERY, STEPS] and ranks[1]["writes"] == []
    assert sorted(entry.name for entry in (tmp_path / "run").iterdir()) == ["checkpoint.pt"]
    saved = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert saved["step"] == STEPS and saved["data_order"]["world_size"] == WORLD_SIZE
    for name, tensor in ranks[0]["model"].items():
        assert torch.equal(saved["model"][name], tensor), name
    # Rank 1 started elsewhere, so agreement means its weights really were synchronised.
    starts = []
    for rank in range(WORLD_SIZE):
        torch.manual_seed(ranks[rank]["initial_seed"])
        starts.append(SmallDenoiser().net[0].weight.detach())
    assert not torch.equal(starts[0], starts[1])


def time_limited_worker(output: Path) -> None:
    """Rank 1's clock never runs out; rank 0's decision must stop both, at the same step."""
    import diffusion_lib.training as training
    import diffusion_lib.training_loop as loop
    from diffusion_lib.schedules import NoiseSchedule

    rank = int(os.environ["RANK"])
    if rank == 1:
        loop._Clock.seconds_left = lambda self: float("inf")
    images = torch.randn(32, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    result = training.train(
        SmallDenoiser(), NoiseSchedule.from_name("linear", 20), images,
        steps=10**6, time_limit=1.0, batch_size=8, progress=False, device="cpu",
    )  # fmt: skip
    torch.save({"steps": result.steps}, output / f"rank{rank}.pt")


def launch(output: Path, mode: str) -> subprocess.CompletedProcess:
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    for variable in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        environment.pop(variable, None)
    return subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone",
         f"--nproc_per_node={WORLD_SIZE}", __file__, str(output), mode],
        capture_output=True, text=True, env=environment, timeout=180,
    )  # fmt: skip


@pytest.mark.slow
def test_a_time_limit_stops_every_process_at_the_same_step(tmp_path) -> None:
    launched = launch(tmp_path, "time-limit")
    assert launched.returncode == 0, launched.stdout[-3000:] + launched.stderr[-3000:]
    steps = [torch.load(tmp_path / f"rank{rank}.pt")["steps"] for rank in range(WORLD_SIZE)]
    assert steps[0] == steps[1] and 1 <= steps[0] < 10**6


if __name__ == "__main__":
    {"train": worker, "time-limit": time_limited_worker}[sys.argv[2]](Path(sys.argv[1]))
