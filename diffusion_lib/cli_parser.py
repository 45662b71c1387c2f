"""The argument parser of ``python -m diffusion_lib``: its description, the examples that close
its help, and its commands, whose options are in :mod:`diffusion_lib.cli_train_options`
(``train``, ``distill``), :mod:`diffusion_lib.cli_sample_options` (``sample``, ``evaluate``) and
:mod:`diffusion_lib.cli_restore_options` (``restore``)."""

from __future__ import annotations

import argparse

from diffusion_lib.cli_restore_options import add_restore_parser
from diffusion_lib.cli_sample_options import add_evaluate_parser, add_sample_parser
from diffusion_lib.cli_train_options import add_distill_parser, add_train_parser
from diffusion_lib.command_line import EPILOG


def build_parser() -> argparse.ArgumentParser:
    """The ``python -m diffusion_lib`` argument parser: ``train``, ``sample``, ``evaluate``,
    ``distill`` and ``restore``."""
    parser = argparse.ArgumentParser(
        prog="python -m diffusion_lib",
        description="Train denoising diffusion models on MNIST-like data, sample from them and "
        "score the samples.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(title="commands", dest="command", required=True)
    add_train_parser(commands)
    add_sample_parser(commands)
    add_evaluate_parser(commands)
    add_distill_parser(commands)
    add_restore_parser(commands)
    return parser
