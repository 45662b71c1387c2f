"""Execute chapter notebooks in place with their real settings, so the book shows real outputs.

    python book/execute.py book/chapters/02_forward_process.ipynb [...]

Refuses to run in smoke mode: committed outputs must come from the real settings.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient

from diffusion_lib.smoke import SMOKE_VARIABLE, smoke_mode


def execute(path: Path, timeout: int) -> float:
    """Run every cell of the notebook at ``path`` and write it back with its outputs."""
    notebook = nbformat.read(path, as_version=4)
    start = time.perf_counter()
    NotebookClient(
        notebook,
        timeout=timeout,
        kernel_name="python3",
        resources={"metadata": {"path": str(path.parent)}},
    ).execute()
    nbformat.write(notebook, path)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("notebooks", nargs="+", type=Path)
    parser.add_argument("--timeout", type=int, default=7200, help="seconds allowed per cell")
    args = parser.parse_args()
    if smoke_mode():
        sys.exit(
            f"{SMOKE_VARIABLE} is set: unset it, committed outputs must come from the real settings"
        )
    os.environ.setdefault("PYTHONHASHSEED", "0")
    for path in args.notebooks:
        seconds = execute(path, args.timeout)
        print(f"{path}: executed in {seconds:.0f} s")


if __name__ == "__main__":
    main()
