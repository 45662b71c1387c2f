"""The book's frame: configuration, table of contents, references and the committed notebooks.

These tests read files only; nothing is executed. They check what a reader of the built book
relies on: every page exists, every citation resolves, every equation reference has its
label, and every notebook carries the outputs of a real, error-free run.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import os
import re
from pathlib import Path

import nbformat
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
BOOK = ROOT / "book"
CHAPTERS = BOOK / "chapters"
CHAPTER_NOTEBOOKS = sorted(CHAPTERS.glob("*.ipynb"))
SKIPPED_FOLDERS = {".git", ".venv", "_build", "__pycache__", ".pytest_cache", ".ruff_cache"}
CONFIG_SUFFIXES = {".yml", ".yaml", ".toml", ".cfg", ".ini"}
CONFIG_NAMES = {"Makefile", "setup.py"}

CITE = re.compile(r"\{cite(?::[a-z]+)?\}`([^`]*)`")
EQ_REF = re.compile(r"\{eq\}`([^`]*)`")
MATH_LABEL = re.compile(r"^[ \t>]*:label:\s*(\S+)\s*$", re.MULTILINE)
DOLLAR_LABEL = re.compile(r"\$\$\s*\(([^)\s]+)\)")
BIB_KEY = re.compile(r"^@(\w+)\s*\{\s*([^,\s]+)\s*,", re.MULTILINE)
PIP_URL = re.compile(r"%pip install[^\n]*git\+(https://[^\s\"'@#]+)")


def load_yaml(path: Path) -> dict:
    with path.open(encoding="utf-8") as file:
        return yaml.safe_load(file)


def repository_url() -> str:
    return load_yaml(BOOK / "_config.yml")["repository"]["url"]


def read_notebook(path: Path) -> nbformat.NotebookNode:
    return nbformat.read(path, as_version=4)


def markdown_of(notebook: nbformat.NotebookNode) -> str:
    return "\n\n".join(cell.source for cell in notebook.cells if cell.cell_type == "markdown")


def code_cells(notebook: nbformat.NotebookNode) -> list[nbformat.NotebookNode]:
    return [cell for cell in notebook.cells if cell.cell_type == "code"]


def output_texts(cell: nbformat.NotebookNode) -> list[str]:
    """Every piece of text a code cell shows: streams, text results, errors."""
    texts = []
    for output in cell.get("outputs", []):
        if output.output_type == "stream":
            texts.append(output.text)
        elif output.output_type == "error":
            texts.append(output.ename + ": " + output.evalue)
        else:
            data = output.get("data", {})
            texts += [
                data[kind] for kind in ("text/plain", "text/html", "text/markdown") if kind in data
            ]
    return ["".join(text) if isinstance(text, list) else text for text in texts]


def toc_files(entry: object) -> list[str]:
    """Every ``file:`` (and the ``root:``) named anywhere in a parsed _toc.yml, in order."""
    if isinstance(entry, dict):
        found = [entry[key] for key in ("root", "file") if key in entry]
        for value in entry.values():
            if isinstance(value, (list, dict)):
                found += toc_files(value)
        return found
    if isinstance(entry, list):
        return [name for item in entry for name in toc_files(item)]
    return []


def repository_files() -> list[Path]:
    """Every file of the working tree, without the virtual environment, caches and builds."""
    files = []
    for folder, subfolders, names in os.walk(ROOT):
        subfolders[:] = sorted(name for name in subfolders if name not in SKIPPED_FOLDERS)
        files += [Path(folder) / name for name in sorted(names)]
    return files


def book_sources() -> list[Path]:
    """The book's pages: Markdown files and notebooks under book/, build output excluded."""
    return sorted(
        path
        for path in BOOK.rglob("*")
        if path.suffix in (".md", ".ipynb")
        and not SKIPPED_FOLDERS.intersection(path.relative_to(BOOK).parts)
        and ".ipynb_checkpoints" not in path.parts
    )


def page_text(path: Path) -> str:
    """The prose of a page: a Markdown file, or a notebook's Markdown cells."""
    if path.suffix == ".ipynb":
        return markdown_of(read_notebook(path))
    return path.read_text(encoding="utf-8")


def bibliography_keys() -> list[str]:
    return [key for _, key in BIB_KEY.findall((BOOK / "references.bib").read_text("utf-8"))]


def equation_labels(text: str) -> list[str]:
    return MATH_LABEL.findall(text) + DOLLAR_LABEL.findall(text)


def equation_references(text: str) -> set[str]:
    """Labels named by {eq} roles; ``{eq}`text <label>``` names ``label``."""
    references = set()
    for target in EQ_REF.findall(text):
        explicit = re.search(r"<([^>]+)>\s*$", target)
        references.add((explicit.group(1) if explicit else target).strip())
    return references


# ---------------------------------------------------------------------------- configuration
def test_config_is_a_book_that_never_executes() -> None:
    config = load_yaml(BOOK / "_config.yml")
    assert config["title"] == "Diffusion Models from Scratch"
    assert config["execute"]["execute_notebooks"] == "off"
    assert config["only_build_toc_files"] is True
    assert config["bibtex_bibfiles"] == ["references.bib"]
    assert config["repository"]["branch"] == "main"
    assert config["repository"]["path_to_book"] == "book"
    assert config["launch_buttons"]["colab_url"] == "https://colab.research.google.com"
    assert "execute.py" in config["exclude_patterns"]


def test_repository_url_is_written_in_one_config_place() -> None:
    url = repository_url()
    assert re.fullmatch(r"https://github\.com/[\w.-]+/[\w.-]+", url), url
    address = url.removeprefix("https://")
    places = []
    for path in repository_files():
        if path.suffix in CONFIG_SUFFIXES or path.name in CONFIG_NAMES:
            count = path.read_text(encoding="utf-8", errors="replace").count(address)
            places += [path.relative_to(ROOT).as_posix()] * count
    assert places == ["book/_config.yml"]


@pytest.mark.parametrize("path", CHAPTER_NOTEBOOKS, ids=lambda path: path.stem)
def test_colab_install_cell_uses_the_repository_url(path: Path) -> None:
    first = code_cells(read_notebook(path))[0]
    assert 'if "google.colab" in sys.modules:' in first.source
    urls = PIP_URL.findall(first.source)
    assert urls == [repository_url()], f"{path.name}: the first code cell installs from {urls}"


# ---------------------------------------------------------------------------- table of contents
def test_every_page_in_the_toc_exists_once() -> None:
    toc = load_yaml(BOOK / "_toc.yml")
    assert toc["format"] == "jb-book"
    files = toc_files(toc)
    assert files[0] == "intro"
    assert len(files) == len(set(files)), f"listed twice: {files}"
    missing = [
        name
        for name in files
        if not any((BOOK / name).with_suffix(suffix).is_file() for suffix in (".md", ".ipynb"))
    ]
    assert not missing, f"in _toc.yml but not in book/: {missing}"


def test_every_chapter_is_in_the_toc_in_numbered_order() -> None:
    listed = [
        name for name in toc_files(load_yaml(BOOK / "_toc.yml")) if name.startswith("chapters/")
    ]
    on_disk = [f"chapters/{path.stem}" for path in CHAPTER_NOTEBOOKS]
    assert sorted(set(on_disk) - set(listed)) == [], "chapter notebooks missing from _toc.yml"
    assert listed == sorted(listed), f"chapters out of order in _toc.yml: {listed}"


# ---------------------------------------------------------------------------- chapter notebooks
@pytest.mark.parametrize("path", CHAPTER_NOTEBOOKS, ids=lambda path: path.stem)
def test_chapter_was_executed_top_to_bottom_without_errors(path: Path) -> None:
    notebook = read_notebook(path)
    assert notebook.metadata["kernelspec"]["name"] == "python3"
    cells = code_cells(notebook)
    counts = [cell.execution_count for cell in cells]
    assert None not in counts, f"{path.name}: some code cells were never run"
    assert counts == list(range(counts[0], counts[0] + len(counts))), (
        f"{path.name}: cells were not run once each, in order: {counts}"
    )
    assert any(cell.outputs for cell in cells), f"{path.name} carries no outputs"
    errors = [out.ename for cell in cells for out in cell.outputs if out.output_type == "error"]
    assert not errors, f"{path.name} has error outputs: {errors}"


@pytest.mark.parametrize("path", CHAPTER_NOTEBOOKS, ids=lambda path: path.stem)
def test_chapter_outputs_come_from_a_real_run(path: Path) -> None:
    for index, cell in enumerate(code_cells(read_notebook(path)), start=1):
        for text in output_texts(cell):
            assert "smoke" not in text.lower(), f"{path.name}, code cell {index}: {text[:200]!r}"


@pytest.mark.parametrize("path", CHAPTER_NOTEBOOKS, ids=lambda path: path.stem)
def test_chapter_has_goals_summary_and_exercises(path: Path) -> None:
    text = markdown_of(read_notebook(path))
    assert re.match(r"#\s+\S", text.lstrip()), f"{path.name} does not open with a title"
    assert re.search(r"learning goals", text, re.IGNORECASE), f"{path.name}: no learning goals"
    headings = re.findall(r"^#{2,}\s+(.+)$", text, re.MULTILINE)
    assert "Summary" in [heading.strip() for heading in headings], f"{path.name}: no Summary"
    assert "Exercises" in [heading.strip() for heading in headings], f"{path.name}: no Exercises"
    exercises = text[re.search(r"^#{2,}\s+Exercises\s*$", text, re.MULTILINE).start() :]
    assert ":class: dropdown" in exercises, f"{path.name}: exercise solutions are not in a toggle"


def test_the_markdown_code_hook_finds_every_python_block() -> None:
    """book/chapters/conftest.py runs the ``python`` blocks of the chapters' Markdown with the
    notebook tests. If its pattern stopped matching, those tests would vanish without failing,
    so its count is compared with a plain count of the fences that open a python block."""
    spec = importlib.util.spec_from_file_location("chapter_hook", CHAPTERS / "conftest.py")
    hook = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hook)
    found = opened = 0
    for path in CHAPTER_NOTEBOOKS:
        notebook = read_notebook(path)
        found += len(hook.markdown_python_blocks(notebook))
        opened += len(
            re.findall(r"^(?:`{3,}|~{3,})python\s*$", markdown_of(notebook), re.MULTILINE)
        )
    assert found == opened > 30, (found, opened)


@pytest.mark.parametrize("path", CHAPTER_NOTEBOOKS, ids=lambda path: path.stem)
def test_every_cell_has_its_own_id(path: Path) -> None:
    """nbformat 4.5 requires an id on every cell; a cell added without one makes every reader
    of the notebook warn, and nbformat will refuse such files in a future version. The file is
    read as plain JSON because nbformat.read quietly fills missing ids in."""
    notebook = json.loads(path.read_text(encoding="utf-8"))
    assert (notebook["nbformat"], notebook["nbformat_minor"]) >= (4, 5), path.name
    ids = [cell.get("id") for cell in notebook["cells"]]
    missing = [index for index, cell_id in enumerate(ids) if not cell_id]
    assert not missing, f"{path.name}: cells {missing} have no id"
    repeated = sorted({cell_id for cell_id in ids if ids.count(cell_id) > 1})
    assert not repeated, f"{path.name}: ids used by more than one cell: {repeated}"


@pytest.mark.parametrize("path", CHAPTER_NOTEBOOKS, ids=lambda path: path.stem)
def test_cell_sources_hold_no_control_characters(path: Path) -> None:
    """A Python string written without r"" turns \\b or \\a in LaTeX into invisible control
    characters, and the rendered formula silently loses its command."""
    for index, cell in enumerate(read_notebook(path).cells):
        found = re.search(r"[\x00-\x08\x0b-\x1f\x7f]", cell.source)
        assert found is None, (
            f"{path.name}, cell {index}: control character {found.group()!r} in "
            f"{cell.source[max(found.start() - 30, 0) : found.end() + 30]!r}"
        )


@pytest.mark.parametrize("path", book_sources(), ids=lambda path: path.stem)
def test_no_line_of_inline_math_starts_a_markdown_block(path: Path) -> None:
    """Markdown reads a line that starts with "+ ", "- ", "1) ", "> " or "# " as a new list,
    quote or heading even inside ``$...$``: the formula splits and shows as raw LaTeX."""
    block_start = re.compile(r"^\s*([+\-*>#]|\d+[.)])\s|^\s*[-=]+\s*$")
    for paragraph in re.split(r"\n\s*\n", page_text(path)):
        dollars = 0
        for line in paragraph.split("\n"):
            assert dollars % 2 == 0 or not block_start.match(line), (
                f"{path.name}: a line inside inline math starts a Markdown block: {line!r}"
            )
            dollars += line.replace("$$", "").count("$") - line.count("\\$")


def test_printed_markdown_renders_tables_and_math_and_streams_merge() -> None:
    """Chapters print result tables with Markdown(...); CommonMark, MyST-NB's default for such
    outputs, has no tables or dollar math. One cell's prints belong in one output block."""
    sphinx_config = load_yaml(BOOK / "_config.yml")["sphinx"]["config"]
    assert sphinx_config["nb_render_markdown_format"] == "myst"
    assert sphinx_config["nb_merge_streams"] is True


SECTION_HEADER = re.compile(
    r"^(Args|Returns|Raises|Yields|Shapes|Examples?|Notes?|Attributes):\s*$"
)


def quoted_blocks(docstring: str) -> list[str]:
    """Paragraphs of a cleaned docstring that an indented block follows without "::" (reST
    then makes the block a quote). Google-style sections, indented by design, are skipped."""
    lines, found, in_section = docstring.split("\n"), [], False
    for index, line in enumerate(lines):
        if SECTION_HEADER.match(line):
            in_section = True
        elif line.strip() and not line.startswith(" "):
            in_section = False
        starts_block = index >= 2 and line.startswith(" ") and not lines[index - 1].strip()
        paragraph = lines[index - 2] if index >= 2 else ""
        follows_prose = paragraph.strip() and paragraph[0] != " "
        if starts_block and not in_section and follows_prose and not paragraph.endswith("::"):
            found.append(paragraph.strip())
    return found


def test_docstring_formulas_are_literal_blocks() -> None:
    """An indented formula in a docstring must follow a paragraph ending in "::"; otherwise
    the API appendix shows it as a block quote whose line breaks and alignment are lost."""
    offenders = []
    for module in sorted((ROOT / "diffusion_lib").rglob("*.py")):
        for node in ast.walk(ast.parse(module.read_text("utf-8"))):
            if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef):
                docstring = ast.get_docstring(node, clean=True) or ""
                offenders += [f"{module.name}: {text[:60]!r}" for text in quoted_blocks(docstring)]
    assert not offenders, offenders


def test_the_docstring_check_finds_a_quoted_formula() -> None:
    quoted = "The bound is\n\n    L = L_T + L_0,\n\nin bits."
    literal = "The bound is ::\n\n    L = L_T + L_0,\n\nin bits."
    arguments = "Args:\n    x: the input.\n\n        More about x."
    assert quoted_blocks(quoted) == ["The bound is"]
    assert quoted_blocks(literal) == [] and quoted_blocks(arguments) == []


# ---------------------------------------------------------------------------- references
def test_bibliography_keys_are_unique() -> None:
    keys = bibliography_keys()
    assert len(keys) >= 20
    assert len(keys) == len(set(keys)), sorted(key for key in keys if keys.count(key) > 1)


def test_every_citation_is_in_the_bibliography() -> None:
    keys = set(bibliography_keys())
    unknown = {}
    for path in book_sources():
        for group in CITE.findall(page_text(path)):
            cited = {key.strip() for key in group.split(",") if key.strip()}
            if cited - keys:
                unknown.setdefault(str(path.relative_to(BOOK)), set()).update(cited - keys)
    assert not unknown, f"cited but not in references.bib: {unknown}"


@pytest.mark.parametrize("path", CHAPTER_NOTEBOOKS, ids=lambda path: path.stem)
def test_every_equation_reference_has_a_label_in_its_notebook(path: Path) -> None:
    text = markdown_of(read_notebook(path))
    missing = equation_references(text) - set(equation_labels(text))
    assert not missing, f"{path.name}: {{eq}} references without a :label: {sorted(missing)}"


def test_equation_labels_are_unique_across_the_book() -> None:
    owners: dict[str, list[str]] = {}
    for path in book_sources():
        for label in equation_labels(page_text(path)):
            owners.setdefault(label, []).append(path.name)
    repeated = {label: pages for label, pages in owners.items() if len(pages) > 1}
    assert not repeated, f"equation labels defined more than once: {repeated}"


def test_the_api_appendix_documents_every_library_module() -> None:
    """Every module of diffusion_lib except the command line has an automodule in api.md."""
    package = ROOT / "diffusion_lib"
    modules = {
        ".".join(path.relative_to(package).with_suffix("").parts).removesuffix(".__init__")
        for path in package.rglob("*.py")
        if not path.name.startswith(("cli_", "__main__")) and path.name != "command_line.py"
    }
    modules = {name for name in modules if name and name != "__init__"}
    documented = set(re.findall(r"^\.\. automodule:: diffusion_lib\.([\w.]+)$",
                                (BOOK / "api.md").read_text(), re.MULTILINE))  # fmt: skip
    assert documented == modules
