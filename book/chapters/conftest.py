"""The code that a chapter shows in its Markdown runs with the notebook tests.

The exercise solutions sit in Markdown toggles, and a few passages show a line to try in a live
notebook, so nbval, which tests code cells, never sees that code. For every chapter collected
with ``pytest --nbval-lax book/chapters``, this hook adds one test per fenced ``python`` block of
the chapter's Markdown cells. The blocks run in order after the chapter's last cell, in the same
kernel, so the chapter's variables are defined, as they are for a reader doing the exercises.
Their output is not compared, since the solutions quote numbers from real runs; a test fails
when its block raises.
"""

from __future__ import annotations

import re
from collections import defaultdict

import nbformat
import pytest
from nbval.plugin import IPyNbCell, IPyNbFile

PYTHON_BLOCK = re.compile(
    r"^(?P<fence>`{3,}|~{3,})python[ \t]*\n(?P<code>.*?)^(?P=fence)[ \t]*$",
    re.DOTALL | re.MULTILINE,
)


def markdown_python_blocks(notebook: nbformat.NotebookNode) -> list[str]:
    """The fenced ``python`` blocks of the notebook's Markdown cells, in order."""
    return [
        match["code"]
        for cell in notebook.cells
        if cell.cell_type == "markdown"
        for match in PYTHON_BLOCK.finditer(cell.source)
    ]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Insert each chapter's Markdown code after its last cell, to run in the chapter's kernel."""
    last_cell_of: dict[IPyNbFile, int] = {}
    for index, item in enumerate(items):
        if isinstance(item, IPyNbCell):
            last_cell_of[item.parent] = index
    # From the back, so that the positions still to be filled do not move.
    for notebook_file, index in sorted(last_cell_of.items(), key=lambda entry: -entry[1]):
        blocks = markdown_python_blocks(notebook_file.nb)  # read by nbval's collect()
        items[index + 1 : index + 1] = [
            IPyNbCell.from_parent(
                notebook_file,
                name=f"Markdown code {number}",
                cell_num=items[index].cell_num + number,
                cell=nbformat.v4.new_code_cell(code),
                options=defaultdict(bool, check=False),
            )
            for number, code in enumerate(blocks, start=1)
        ]
