"""Command line: ``python -m diffusion_lib train ...`` trains a model, ``... sample ...`` draws from
it, ``... evaluate ...`` scores its samples (and its variational bound), ``... distill ...``
halves the sampling steps of a flow model (progressive distillation), and ``... restore ...``
restores damaged test images with a model as the prior.

A checkpoint written by ``train`` records the model's name and arguments, the schedule, the
dataset and its value range, so ``sample``, ``evaluate`` and ``distill`` rebuild everything from
the file alone.

This module is the entry point: it parses the arguments, runs the command and reports its errors.
The parser is built in :mod:`diffusion_lib.cli_parser`, the choices and help text the commands
share are in :mod:`diffusion_lib.command_line`, and each command is in a module of its own:
:mod:`diffusion_lib.cli_train`, :mod:`diffusion_lib.cli_sample` (which also reads and rebuilds
checkpoints for ``evaluate`` and ``distill``), :mod:`diffusion_lib.cli_evaluate`,
:mod:`diffusion_lib.cli_distill` and :mod:`diffusion_lib.cli_restore`. Those modules import nothing
from this one: under ``python -m diffusion_lib`` this file runs as ``__main__``, so a class they
imported from ``diffusion_lib.__main__`` would be a second copy, not the one :func:`main` catches.
That is why :class:`CommandError` lives in :mod:`diffusion_lib.command_line` (and is imported here
too).
"""

from __future__ import annotations

import sys

from diffusion_lib.checkpoints import CheckpointError
from diffusion_lib.cli_distill import run_distill
from diffusion_lib.cli_evaluate import run_evaluate
from diffusion_lib.cli_parser import build_parser
from diffusion_lib.cli_restore import run_restore
from diffusion_lib.cli_sample import run_sample
from diffusion_lib.cli_train import run_train
from diffusion_lib.command_line import CommandError
from diffusion_lib.data import DataNotFoundError

COMMANDS = {
    "train": run_train,
    "sample": run_sample,
    "evaluate": run_evaluate,
    "distill": run_distill,
    "restore": run_restore,
}


# The exit status of a command stopped by Ctrl-C, as shells report a process ended by SIGINT
INTERRUPTED_STATUS = 130


def _describe_os_error(error: OSError) -> str:
    """An OSError in one line: what went wrong and the file, without the errno prefix."""
    if error.strerror and error.filename is not None:
        return f"{error.strerror}: {error.filename}"
    return str(error)


def main(argv: list[str] | None = None) -> int:
    """Run the command line; return the exit status (0 success, 1 failure, 130 when Ctrl-C
    stopped it). A usage error exits through argparse with status 2."""
    args = build_parser().parse_args(argv)
    try:
        COMMANDS[args.command](args)
    except (CommandError, CheckpointError, DataNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except OSError as error:  # a file that cannot be read or written: no traceback either
        print(f"error: {_describe_os_error(error)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as error:  # train saved its last step and says where to go on
        print(str(error) or "interrupted", file=sys.stderr)
        return INTERRUPTED_STATUS
    return 0


if __name__ == "__main__":
    sys.exit(main())
