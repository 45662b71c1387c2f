"""What the commands of ``python -m diffusion_lib`` share: the choices and defaults of their
options (objectives, samplers, image size), the examples that close every ``--help``,
:class:`CommandError`, which a command raises when its inputs are wrong, and the checks that a
command's output paths can be written.

The argument parser is built in :mod:`diffusion_lib.cli_parser` from the options of
:mod:`diffusion_lib.cli_train_options`, :mod:`diffusion_lib.cli_sample_options` and
:mod:`diffusion_lib.cli_restore_options`. The commands themselves (what ``train``, ``sample``,
``evaluate``, ``distill`` and ``restore`` do with the parsed arguments) are in
:mod:`diffusion_lib.cli_train`, :mod:`diffusion_lib.cli_sample`, :mod:`diffusion_lib.cli_evaluate`,
:mod:`diffusion_lib.cli_distill` and :mod:`diffusion_lib.cli_restore`; the entry point,
:mod:`diffusion_lib.__main__`, runs the one asked for.
"""

from __future__ import annotations

import os
from pathlib import Path

from PIL import Image

from diffusion_lib.checkpoints import CHECKPOINT_NAME

# L_simple with a noise schedule, flow matching, EDM's preconditioned denoiser, L_hybrid (the
# noise and a learned variance, Nichol & Dhariwal 2021) with a noise schedule, or masked
# diffusion of images quantised to a few grey levels (the order-agnostic bound)
OBJECTIVES = ("noise", "flow", "edm", "hybrid", "masked")
SAMPLERS = {
    "noise": ("ddpm", "ddim", "dpm-solver", "heun"),
    "flow": ("euler", "heun"),
    "edm": ("heun", "euler"),
    "hybrid": ("ddpm", "ddim", "dpm-solver", "heun"),
    "masked": ("masked",),
}
DEFAULT_SAMPLERS = {
    "noise": "ddim",
    "flow": "euler",
    "edm": "heun",
    "hybrid": "ddpm",
    "masked": "masked",
}
# The objectives whose models are sampled on the training schedule's T timesteps
SCHEDULE_OBJECTIVES = ("noise", "hybrid")
IMAGE_SIZE, IMAGE_CHANNELS = 28, 1  # MNIST and Fashion-MNIST
# Defaults of train's options that --objective masked rejects when given: their parser default
# is None, so that a given value can be told from the default.
DEFAULT_SCHEDULE, DEFAULT_TIMESTEPS, DEFAULT_SIGMA_DATA = "linear", 1000, 0.5
# The default of --label-dropout, which applies to --conditional only: its parser default is None
# too, so that a value given without --conditional is refused
DEFAULT_LABEL_DROPOUT = 0.1
# train --compile: each choice and the value the trainer is given for it
COMPILE_CHOICES = {"auto": "auto", "on": True, "off": False}
# --objective masked: the grey levels K by default (black and white), and the most allowed
# (the 256 of an 8-bit image)
DEFAULT_MASKED_CLASSES, MAX_MASKED_CLASSES = 2, 256
# sample and evaluate for a masked checkpoint: the sampling steps, the masking schedule (in
# chapter 19 the cosine one drew better digits than the linear one at every step count) and the
# order in which masked pixels are revealed
DEFAULT_MASKED_STEPS, DEFAULT_MASKING_SCHEDULE, DEFAULT_REVEAL_ORDER = 100, "cosine", "random"
# restore: the tasks, the regions --hide can hide, and the methods
RESTORE_TASKS = ("super-resolution", "inpainting")
INPAINTING_REGIONS = ("bottom", "top", "left", "right", "center")
RESTORE_METHODS = ("pigdm", "dps", "repaint")
# restore's default chain lengths: the likelihood methods step through a respaced chain,
# RePaint walks each stretch of JUMP steps of a shorter one RESAMPLINGS times (chapter 21)
DEFAULT_RESTORE_STEPS = {"pigdm": 250, "dps": 250, "repaint": 100}
REPAINT_JUMP, REPAINT_RESAMPLINGS = 10, 10
# evaluate --bound-images for a masked checkpoint: unbiased draws of the bound averaged per image
MASKED_BOUND_DRAWS = 4
# sample and evaluate: --label all draws the classes in turn
ALL_LABELS = "all"


class CommandError(Exception):
    """A problem with the command's inputs, reported as one line on stderr (exit status 1)."""


def check_output_file(option: str, path: Path, example: str, *, image: bool = False) -> None:
    """Raise :class:`CommandError` unless the file ``path`` of ``option`` can be written: not a
    folder, for an image with an extension that PIL writes, and under folders that exist or can
    be made. Commands check their outputs before their work, which a late failure would waste."""
    kind = "an image file" if image else "a file"
    if path.is_dir():
        raise CommandError(f"{option} must name {kind} such as {example}; got {path} (a folder)")
    suffix = path.suffix.lower()
    if image and Image.registered_extensions().get(suffix) not in Image.SAVE:
        found = f"{suffix} is not an image format" if suffix else "no extension"
        raise CommandError(
            f"{option} must name {kind} such as {example}; got {path} ({found}; "
            ".png keeps every pixel)"
        )
    _check_folders_on_the_way(option, path, path.parent)


def check_output_folder(option: str, folder: Path) -> None:
    """Raise :class:`CommandError` unless ``folder``, where ``option`` has train or distill write
    checkpoint.pt, is a folder or can be made one; checked before the data are loaded."""
    if folder.exists() and not folder.is_dir():
        hint = f", e.g. {folder.parent}" if folder.name == CHECKPOINT_NAME else ""
        raise CommandError(
            f"{option} {folder} is a file; pass the folder that holds {CHECKPOINT_NAME}{hint}"
        )
    _check_folders_on_the_way(option, folder, folder)


def _check_folders_on_the_way(option: str, path: Path, folder: Path) -> None:
    """``folder`` (where ``path`` goes) must exist or be creatable: its nearest existing
    ancestor must be a writable folder."""
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent  # the first folder on the way that exists: the rest is made
    if not folder.is_dir():
        raise CommandError(f"{option} {path} cannot be written: {folder} is a file, not a folder")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise CommandError(f"{option} {path} cannot be written: {folder} is not writable")


EPILOG = """\
examples:
  python -m diffusion_lib train --model fc_unet --dataset mnist --steps 5000 --output runs/fc_unet
  python -m diffusion_lib train --model attention_unet --dataset fashion_mnist \\
      --schedule cosine --steps 20000 --batch-size 256 --conditional --output runs/fashion
  python -m diffusion_lib sample --checkpoint runs/fc_unet/checkpoint.pt --sampler ddim \\
      --steps 50 --num 64 --output samples.png
  python -m diffusion_lib sample --checkpoint runs/fc_unet/checkpoint.pt --sampler dpm-solver \\
      --steps 10 --output fast.png
  python -m diffusion_lib sample --checkpoint runs/fashion/checkpoint.pt --label 7 \\
      --guidance 3 --output sneakers.png
  python -m diffusion_lib sample --checkpoint runs/fashion/checkpoint.pt --label 7 \\
      --guidance 3 --guidance-interval 500 999 --output sneakers_interval.png
  python -m diffusion_lib sample --checkpoint runs/fc_unet/checkpoint.pt --guidance 1 \\
      --reference-checkpoint runs/fc_unet_early/checkpoint.pt --output autoguided.png
  python -m diffusion_lib evaluate --checkpoint runs/fc_unet/checkpoint.pt --num 1000 \\
      --json scores.json
  python -m diffusion_lib train --model fc_unet --dataset mnist --prediction v --snr-gamma 5 \\
      --steps 5000 --output runs/v
  python -m diffusion_lib train --model fc_unet --dataset mnist --objective flow --steps 5000 \\
      --output runs/flow
  python -m diffusion_lib sample --checkpoint runs/flow/checkpoint.pt --sampler euler --steps 20
  python -m diffusion_lib train --model fc_unet --dataset fashion_mnist --prediction v \\
      --zero-terminal-snr --steps 5000 --output runs/zero_snr
  python -m diffusion_lib train --model attention_unet --dataset mnist --objective edm \\
      --steps 20000 --output runs/edm
  python -m diffusion_lib sample --checkpoint runs/edm/checkpoint.pt --steps 18 --output edm.png
  python -m diffusion_lib train --model attention_unet --dataset mnist --objective hybrid \\
      --schedule cosine --steps 20000 --output runs/hybrid
  python -m diffusion_lib sample --checkpoint runs/hybrid/checkpoint.pt --steps 100 \\
      --output hybrid.png
  python -m diffusion_lib evaluate --checkpoint runs/hybrid/checkpoint.pt --steps 100 \\
      --bound-images 100 --ode-steps 100
  python -m diffusion_lib train --model attention_unet --dataset mnist --objective masked \\
      --steps 20000 --output runs/masked
  python -m diffusion_lib sample --checkpoint runs/masked/checkpoint.pt --steps 100 \\
      --masking-schedule cosine --output masked.png
  python -m diffusion_lib evaluate --checkpoint runs/masked/checkpoint.pt --bound-images 1000
  python -m diffusion_lib distill --checkpoint runs/flow/checkpoint.pt --student-steps 16 \\
      --steps 2000 --output runs/flow16
  python -m diffusion_lib distill --checkpoint runs/flow16/checkpoint.pt --student-steps 8 \\
      --steps 2000 --output runs/flow8
  python -m diffusion_lib sample --checkpoint runs/flow8/checkpoint.pt --output eight_steps.png
  python -m diffusion_lib restore --checkpoint runs/fc_unet/checkpoint.pt \\
      --task super-resolution --factor 4 --noise 0.05 --method pigdm --data-std 0.6
  python -m diffusion_lib restore --checkpoint runs/fc_unet/checkpoint.pt --task inpainting \\
      --hide bottom --method dps --step-size 0.3 --num 100 --json restored.json

Datasets are read from $DIFFUSION_LIB_DATA (torchvision layout). evaluate trains the reference
classifier of a dataset once and caches it in $DIFFUSION_LIB_CACHE (default
~/.cache/diffusion_lib). Set DIFFUSION_LIB_SMOKE=1 for a quick run with capped steps, data and
samples.
"""
