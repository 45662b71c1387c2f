"""Execute chapter notebooks in place with their real settings, so the book shows real outputs.

    python book/execute.py book/chapters/02_forward_process.ipynb [...]
    python book/execute.py --jobs 14 book/chapters/*.ipynb   # all chapters at once on a GPU

Refuses to run in smoke mode: committed outputs must come from the real settings. A notebook is
written back only when every cell ran; one that fails is left as it was, and the others go on.
With ``--jobs N``, N notebooks run side by side, each in its own kernel: on a GPU machine with
many cores this uses the GPU far better than one chapter at a time, because the book's small
networks are limited by kernel launches on the host (benchmarks/PROFILE.md).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
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


def _execute_and_report(path: Path, timeout: int) -> bool:
    """Execute one notebook; print how long it took, or why it failed."""
    try:
        seconds = execute(path, timeout)
    except Exception as error:  # a failing cell, a timeout or a dead kernel: report, go on
        print(f"{path}: FAILED, left unchanged: {type(error).__name__}: {error}", flush=True)
        return False
    print(f"{path}: executed in {seconds:.0f} s", flush=True)
    return True


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("notebooks", nargs="+", type=Path)
    parser.add_argument("--timeout", type=int, default=7200, help="seconds allowed per cell")
    parser.add_argument("--jobs", type=int, default=1, help="notebooks executed side by side")
    args = parser.parse_args(argv)
    if smoke_mode():
        sys.exit(
            f"{SMOKE_VARIABLE} is set: unset it, committed outputs must come from the real settings"
        )
    if args.jobs < 1:
        parser.error(f"--jobs must be at least 1, got {args.jobs}")
    missing = [str(path) for path in args.notebooks if not path.is_file()]
    if missing:
        parser.error(f"no such notebook: {', '.join(missing)}")
    os.environ.setdefault("PYTHONHASHSEED", "0")
    # Each kernel is a process of its own; threads only wait for them.
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        succeeded = list(
            pool.map(lambda path: _execute_and_report(path, args.timeout), args.notebooks)
        )
    if not all(succeeded):
        sys.exit(f"{succeeded.count(False)} of {len(succeeded)} notebooks failed")


if __name__ == "__main__":
    main()
