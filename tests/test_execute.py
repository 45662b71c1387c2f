"""book/execute.py: notebooks run in real kernels, side by side, and failures lose nothing."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import nbformat
import pytest

from diffusion_lib.smoke import SMOKE_VARIABLE

SCRIPT = Path(__file__).resolve().parents[1] / "book" / "execute.py"


@pytest.fixture(scope="module")
def execute_script():
    spec = importlib.util.spec_from_file_location("book_execute", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_notebook(path: Path, *sources: str) -> Path:
    notebook = nbformat.v4.new_notebook()
    notebook.cells = [nbformat.v4.new_code_cell(source) for source in sources]
    nbformat.write(notebook, path)
    return path


def outputs_text(path: Path) -> str:
    notebook = nbformat.read(path, as_version=4)
    return "".join(
        output.get("text", "") for cell in notebook.cells for output in cell.get("outputs", [])
    )


@pytest.mark.slow
def test_notebooks_run_side_by_side_and_a_failure_is_left_unchanged(
    execute_script, tmp_path, monkeypatch, capsys
) -> None:
    monkeypatch.delenv(SMOKE_VARIABLE, raising=False)
    good = [write_notebook(tmp_path / f"good{i}.ipynb", f"print({i} * 7)") for i in (6, 7)]
    bad = write_notebook(tmp_path / "bad.ipynb", "print('before')", "1 / 0")
    bad_before = bad.read_bytes()
    with pytest.raises(SystemExit, match="1 of 3 notebooks failed"):
        execute_script.main(["--jobs", "3", str(good[0]), str(bad), str(good[1])])
    assert outputs_text(good[0]) == "42\n"
    assert outputs_text(good[1]) == "49\n"
    assert bad.read_bytes() == bad_before
    printed = capsys.readouterr().out
    assert "bad.ipynb: FAILED, left unchanged: CellExecutionError" in printed
    assert printed.count("executed in") == 2


def test_smoke_mode_is_refused(execute_script, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv(SMOKE_VARIABLE, "1")
    notebook = write_notebook(tmp_path / "n.ipynb", "1")
    with pytest.raises(SystemExit, match=SMOKE_VARIABLE):
        execute_script.main([str(notebook)])


@pytest.mark.parametrize(
    ("arguments", "message"),
    [(["--jobs", "0", "n.ipynb"], "--jobs must be at least 1"), (["x.ipynb"], "no such notebook")],
)
def test_bad_arguments_are_explained(
    execute_script, tmp_path, monkeypatch, capsys, arguments, message
) -> None:
    monkeypatch.delenv(SMOKE_VARIABLE, raising=False)
    monkeypatch.chdir(tmp_path)
    write_notebook(tmp_path / "n.ipynb", "1")
    with pytest.raises(SystemExit):
        execute_script.main(arguments)
    assert message in capsys.readouterr().err
