"""Command line: ``python -m diffusion_lib train ...`` trains a model, ``... sample ...`` draws from
it, ``... evaluate ...`` scores its samples (and its variational bound), ``... distill ...``
halves the sampling steps of a flow model (progressive distillation), and ``... restore ...``
restores damaged test images with a model as the prior.

A checkpoint written by ``train`` records the model's name and arguments, the schedule, the
dataset and its value range, so ``sample``, ``evaluate`` and ``distill`` rebuild everything from
the file alone.

This module is the entry point: it parses the arguments, runs the command and reports its errors.
The options and the help text are defined in :mod:`diffusion_lib.command_line`, each command in a
module of its own: :mod:`diffusion_lib.cli_train`, :mod:`diffusion_lib.cli_sample` (which also
reads and rebuilds checkpoints for ``evaluate`` and ``distill``), :mod:`diffusion_lib.cli_evaluate`
and :mod:`diffusion_lib.cli_distill`. Those modules import nothing from this one: under
``python -m diffusion_lib`` this file runs as ``__main__``, so a class they imported from
``diffusion_lib.__main__`` would be a second copy, not the one :func:`main` catches. That is why
:class:`CommandError` lives in :mod:`diffusion_lib.command_line` (and is imported here too).
"""

from __future__ import annotations

import sys

from diffusion_lib.checkpoints import CheckpointError
from diffusion_lib.cli_distill import run_distill
from diffusion_lib.cli_evaluate import run_evaluate
from diffusion_lib.cli_restore import run_restore
from diffusion_lib.cli_sample import run_sample
from diffusion_lib.cli_train import run_train
from diffusion_lib.command_line import CommandError, build_parser
from diffusion_lib.data import DataNotFoundError

COMMANDS = {
    "train": run_train,
    "sample": run_sample,
    "evaluate": run_evaluate,
    "distill": run_distill,
    "restore": run_restore,
}


def main(argv: list[str] | None = None) -> int:
    """Run the command line; return the exit status (0 success, 1 failure). A usage error exits
    through argparse with status 2."""
    args = build_parser().parse_args(argv)
    try:
        COMMANDS[args.command](args)
    except (CommandError, CheckpointError, DataNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
