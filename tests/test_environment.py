"""environment.yml (for conda users) and pyproject.toml (for pip) must name the same dependencies with
the same version bounds, so that the two ways in cannot drift apart."""

import re
from pathlib import Path

import tomllib
import yaml

ROOT = Path(__file__).resolve().parents[1]
CONDA_NAMES = {"torch": "pytorch"}  # PyPI name -> conda-forge name, where they differ
# On PyPI only: conda users get these through the environment's pip line (`-e .[book,...]`).
PIP_ONLY = {"django-static-mathjax"}


def _split(requirement: str) -> tuple[str, str]:
    name, spec = re.match(r"^\s*([A-Za-z0-9_.\-]+)\s*(.*)$", requirement).groups()
    spec = ",".join(sorted(part.strip() for part in spec.split(",") if part.strip()))
    return name.lower().replace("_", "-"), spec


def _pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return project, project["optional-dependencies"]


def _environment():
    return yaml.safe_load((ROOT / "environment.yml").read_text())


def test_conda_and_pip_name_the_same_dependencies():
    project, extras = _pyproject()
    env = _environment()
    pip_lines = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    (editable,) = [line for line in pip_lines if line.startswith("-e .[")]
    named_extras = editable[len("-e .["):-1].split(",")
    assert sorted(named_extras) == sorted(extras), "environment.yml must install every extra of pyproject.toml"

    wanted = [*project["dependencies"], *(r for e in named_extras for r in extras[e])]
    from_pip = {CONDA_NAMES.get(n, n): s for n, s in map(_split, wanted) if n not in PIP_ONLY}
    conda = [d for d in env["dependencies"] if isinstance(d, str)]
    from_conda = {n: s for n, s in map(_split, conda) if n not in ("python", "pip")}
    assert from_conda == from_pip


def test_python_bounds_agree():
    project, _ = _pyproject()
    (python,) = [d for d in _environment()["dependencies"] if isinstance(d, str) and d.startswith("python")]
    assert _split(python)[1] == project["requires-python"]


def test_required_pieces_are_named():
    env = {_split(d)[0] for d in _environment()["dependencies"] if isinstance(d, str)}
    for piece in ["pytorch", "triton", "jupyterlab", "jupyter-book", "nbval", "matplotlib", "ipywidgets",
                  "otter-grader"]:
        assert piece in env, piece
