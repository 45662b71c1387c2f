"""Every ``python -m diffusion_lib`` command that the README, the book or ``--help`` shows is a
command the parser accepts, and every documented ``train`` passes the checks that refuse options
which do not apply. A renamed option or a dropped choice then fails here, not in a reader's
terminal."""

from __future__ import annotations

import argparse
import re
import shlex
from pathlib import Path

import nbformat
import pytest

from diffusion_lib import cli_train
from diffusion_lib.cli_parser import build_parser
from diffusion_lib.command_line import EPILOG

ROOT = Path(__file__).resolve().parents[1]
PROGRAM = ["python", "-m", "diffusion_lib"]


def commands_in(text: str) -> list[str]:
    """The ``python -m diffusion_lib ...`` commands of ``text``, each on one line: backslash
    continuations joined, comments and other programs' lines left out."""
    joined = re.sub(r"\s*\\\n\s*", " ", text)
    return [
        line.strip()
        for line in joined.splitlines()
        if line.strip().startswith(" ".join(PROGRAM) + " ")
    ]


def documented_commands() -> list[tuple[str, str]]:
    """(where, command) for the README, the book's Markdown pages, the chapters' Markdown cells
    and the examples of ``--help``."""
    found = [("README.md", command) for command in commands_in((ROOT / "README.md").read_text())]
    for page in sorted((ROOT / "book").glob("*.md")):
        found += [(page.name, command) for command in commands_in(page.read_text())]
    for path in sorted((ROOT / "book" / "chapters").glob("*.ipynb")):
        notebook = nbformat.read(path, as_version=4)
        for cell in notebook.cells:
            if cell.cell_type == "markdown":
                found += [(path.name, command) for command in commands_in(cell.source)]
    found += [("--help", command) for command in commands_in(EPILOG)]
    return found


COMMANDS = documented_commands()


def test_the_commands_are_found_in_every_kind_of_source() -> None:
    """Guards the extraction itself: a change of format that hides the commands from it would
    otherwise leave the test below with nothing to check."""
    sources = {where for where, _ in COMMANDS}
    assert "README.md" in sources and "--help" in sources, sources
    assert any(where.endswith(".ipynb") for where in sources), sources
    assert len(COMMANDS) >= 40, f"only {len(COMMANDS)} documented commands found"
    subcommands = {shlex.split(command)[len(PROGRAM)] for _, command in COMMANDS}
    assert subcommands == {"train", "sample", "evaluate", "distill", "restore"}, subcommands


def test_commands_in_text_joins_continuations_and_skips_other_lines() -> None:
    text = (
        "cp -r runs/a runs/b\n"
        "# python -m diffusion_lib sample --checkpoint x\n"
        "python -m diffusion_lib train --model fc_unet \\\n    --steps 5 --output runs/a\n"
    )
    assert commands_in(text) == [
        "python -m diffusion_lib train --model fc_unet --steps 5 --output runs/a"
    ]


def parse(command: str) -> argparse.Namespace:
    words = shlex.split(command)
    assert words[: len(PROGRAM)] == PROGRAM, command
    return build_parser().parse_args(words[len(PROGRAM) :])


@pytest.mark.parametrize(
    ("where", "command"), COMMANDS, ids=[f"{w}: {c[23:70]}" for w, c in COMMANDS]
)
def test_documented_command_is_accepted(where: str, command: str, capsys) -> None:
    try:
        args = parse(command)
    except SystemExit:
        pytest.fail(f"{where}: the parser refuses {command!r}: {capsys.readouterr().err}")
    if args.command == "train":
        cli_train.check_options(args)


def test_a_refused_command_is_reported(capsys) -> None:
    """The check above fails for a command the parser refuses: an option of
    another command."""
    with pytest.raises(SystemExit):
        parse(
            "python -m diffusion_lib train --model fc_unet --dataset mnist --steps 5 --output a --num 5"
        )
    assert "unrecognized arguments: --num 5" in capsys.readouterr().err
