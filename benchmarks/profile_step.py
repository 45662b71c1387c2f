"""Where a training step of ``AttentionUNet`` spends its time, and what makes it faster.

    python benchmarks/profile_step.py [--device cuda] [--steps 40]

Prints the PyTorch profiler's kernel table for five eager steps (bf16 autocast, fused AdamW,
batch 128, the loss of :func:`diffusion_lib.diffusion_loss`), then the time per step of
variants: fp32, cuDNN autotuning, channels-last weights, larger batches, ``torch.compile`` in
its default mode and with CUDA graphs ("reduce-overhead"), and the forward pass alone at the
sampling batch of 2000. ``benchmarks/PROFILE.md`` holds the figures of one H100.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

from diffusion_lib import AttentionUNet, NoiseSchedule, diffusion_loss


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def training_step(
    model: nn.Module, schedule: NoiseSchedule, batch: int, device: torch.device, *, amp: bool,
    graphs: bool = False,
) -> Callable[[], None]:  # fmt: skip
    """One step of the engine's recipe on a fixed random batch, as a closure."""
    images = torch.randn(batch, 1, 28, 28, device=device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")

    def step() -> None:
        if graphs:
            torch.compiler.cudagraph_mark_step_begin()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            loss = diffusion_loss(model, schedule, images)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def time_steps(name: str, step: Callable[[], None], batch: int, steps: int, device) -> None:
    """Warm up (compiling, if any), then print the mean time of ``steps`` steps."""
    started = time.perf_counter()
    for _ in range(5):
        step()
    synchronize(device)
    warm_up = time.perf_counter() - started
    started = time.perf_counter()
    for _ in range(steps):
        step()
    synchronize(device)
    seconds = (time.perf_counter() - started) / steps
    print(
        f"{name}: batch {batch}: warm-up {warm_up:.0f} s, {seconds * 1e3:.2f} ms/step, "
        f"{batch / seconds:,.0f} images/s",
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--steps", type=int, default=40, help="timed steps per variant")
    args = parser.parse_args()
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    schedule = NoiseSchedule.from_name("linear").to(device)

    def variant(name, batch, *, amp=cuda, compile_mode=None, channels_last=False, steps=None):
        model = AttentionUNet().to(device)
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
        graphs = compile_mode == "reduce-overhead"
        if compile_mode is not None:
            model = torch.compile(model, mode=None if compile_mode == "default" else compile_mode)
        step = training_step(model, schedule, batch, device, amp=amp, graphs=graphs)
        time_steps(name, step, batch, steps or args.steps, device)
        return step

    step = variant("eager bf16", 128)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as profiler:
        for _ in range(5):
            step()
        synchronize(device)
    sort_by = "cuda_time_total" if cuda else "cpu_time_total"
    print(profiler.key_averages().table(sort_by=sort_by, row_limit=25, max_name_column_width=60))
    variant("eager fp32", 128, amp=False)
    torch.backends.cudnn.benchmark = True
    variant("eager bf16, cudnn.benchmark", 128)
    variant("eager bf16, channels-last, cudnn.benchmark", 128, channels_last=True)
    torch.backends.cudnn.benchmark = False
    for batch in (256, 512, 1024):
        variant("eager bf16", batch, steps=max(args.steps // 3, 1))
    variant("compiled, default mode", 128, compile_mode="default")
    if cuda:
        variant("compiled, reduce-overhead (CUDA graphs)", 128, compile_mode="reduce-overhead")

    model = AttentionUNet().to(device).eval()
    images = torch.randn(2000, 1, 28, 28, device=device)
    t = torch.full((2000,), 500, device=device)
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
        time_steps("forward pass only", lambda: model(images, t), 2000, args.steps, device)


if __name__ == "__main__":
    main()
