"""The ``distill`` command: one round of progressive distillation, which trains a copy of a flow
checkpoint's model to sample in half the teacher's steps. The teacher is rebuilt as ``sample``
rebuilds a checkpoint, and the student is trained with ``train``'s engine options.
"""

from __future__ import annotations

import argparse
import copy
from typing import Any

from diffusion_lib.cli_sample import read_checkpoint, rebuild
from diffusion_lib.cli_train import engine_options, report_training
from diffusion_lib.command_line import CommandError, check_output_folder
from diffusion_lib.data import load_images
from diffusion_lib.devices import select_device
from diffusion_lib.distillation import ProgressiveDistillation
from diffusion_lib.flow_matching import RectifiedFlow
from diffusion_lib.training import train


def _check_teacher(config: dict[str, Any], student_steps: int) -> None:
    """A flow checkpoint can teach any N; a student that samples in M steps can teach only M / 2."""
    if config.get("objective", "noise") != "flow":
        raise CommandError(
            "distill needs a checkpoint trained with --objective flow (a velocity model); "
            f"this one was trained with --objective {config.get('objective', 'noise')}"
        )
    if student_steps < 1:
        raise CommandError(f"--student-steps must be >= 1, got {student_steps}")
    teacher_steps = config.get("distilled_steps")
    if teacher_steps is not None and teacher_steps != 2 * student_steps:
        hint = (
            f"choose --student-steps {teacher_steps // 2}"
            if teacher_steps % 2 == 0
            else "its steps cannot be halved"
        )
        raise CommandError(
            f"the teacher is a student that samples in {teacher_steps} steps, so the next "
            f"round must halve that: {hint}"
        )


def run_distill(args: argparse.Namespace) -> None:
    """``distill``: one round of progressive distillation from a flow checkpoint."""
    check_output_folder("--output", args.output)
    path, state = read_checkpoint(args.checkpoint)
    config = state["config"]
    _check_teacher(config, args.student_steps)
    device = select_device(args.device)
    teacher, _ = rebuild(path, state, device)
    student = copy.deepcopy(teacher).train().requires_grad_()
    images, labels = load_images(
        config["dataset"], train=True, value_range=tuple(config["value_range"]), limit=args.limit
    )
    conditional = bool(config.get("conditional"))
    result = train(
        student,
        RectifiedFlow(config["schedule"]["timesteps"]),
        images,
        labels=labels if conditional else None,
        label_dropout=0.1 if conditional else 0.0,  # the student keeps its unconditional half
        loss=ProgressiveDistillation(teacher, args.student_steps),
        device=device,
        **engine_options(args),
        config={**config, "distilled_steps": args.student_steps},
    )
    note = f"; the student samples in {args.student_steps} steps"
    report_training(result, args.time_limit, done="distilled", note=note)
