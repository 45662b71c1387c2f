"""The install paths agree: pyproject.toml is the one source of dependencies."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import yaml

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_environment_yml_installs_this_package_with_every_extra() -> None:
    environment = yaml.safe_load((ROOT / "environment.yml").read_text())
    conda = [d for d in environment["dependencies"] if isinstance(d, str)]
    pip = next(d["pip"] for d in environment["dependencies"] if isinstance(d, dict))
    assert sorted(re.split(r"[<>=]", d)[0] for d in conda) == ["pip", "python"], (
        "list packages in pyproject.toml, not in environment.yml"
    )
    python = next(d for d in conda if d.startswith("python"))
    assert python.removeprefix("python") == PYPROJECT["project"]["requires-python"]
    assert len(pip) == 1
    match = re.fullmatch(r"-e \.\[(.*)\]", pip[0])
    assert match, f"environment.yml should install the checkout with its extras, found {pip[0]!r}"
    assert set(match.group(1).split(",")) == set(PYPROJECT["project"]["optional-dependencies"])


def test_torch_and_torchvision_are_declared_as_a_pair() -> None:
    names = {re.split(r"[<>=!~ \[]", d)[0] for d in PYPROJECT["project"]["dependencies"]}
    assert {"torch", "torchvision", "numpy", "matplotlib", "ipywidgets", "tqdm"} <= names
    book = " ".join(PYPROJECT["project"]["optional-dependencies"]["book"])
    assert "jupyter-book>=1.0.4,<2" in book


def test_ci_runs_the_readme_test_command() -> None:
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    assert "make test" in readme and "make book" in readme
    assert re.search(r"^make test$", ci, flags=re.MULTILINE)


def test_the_installed_torchvision_imports_with_the_installed_torch() -> None:
    import torch
    import torchvision

    images = torch.rand(4, 1, 8, 8)
    assert torchvision.utils.make_grid(images, nrow=2).shape == (3, 2 * 8 + 6, 2 * 8 + 6)


def test_pre_commit_hooks_use_the_ruff_release_that_make_test_installs() -> None:
    test_extra = PYPROJECT["project"]["optional-dependencies"]["test"]
    pinned = [d for d in test_extra if d.startswith("ruff")]
    assert len(pinned) == 1 and "==" in pinned[0], f"pin ruff exactly in the test extra: {pinned}"
    config = yaml.safe_load((ROOT / ".pre-commit-config.yaml").read_text())
    hooks = [hook for repo in config["repos"] for hook in repo["hooks"]]
    assert {hook["id"] for hook in hooks} == {"ruff-check", "ruff-format"}
    for hook in hooks:
        assert hook["additional_dependencies"] == pinned, hook["id"]
