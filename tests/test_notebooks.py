"""Every notebook is a valid nbformat 4 document as nbformat itself reads it, cell ids included
(a cell without one is a warning today and an error in later nbformat), and was executed: each code
cell has an execution count, as `make notebooks` leaves it, so nbval has committed outputs to check.
The chapters also read as a textbook on the site: no dates or commit hashes, no visible nbval
comments, code that fits the page, no stray reprs, static renderings of interactive controls, and a
"What limits this kernel" section that links to the kernel's engineering notes."""

import re
import warnings
from pathlib import Path

import nbformat
import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))


def test_there_are_notebooks():
    assert len(NOTEBOOKS) >= 5


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_is_valid_and_executed(path):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # MissingIDFieldWarning and the like fail the test
        nb = nbformat.read(path, as_version=nbformat.NO_CONVERT)
        nbformat.validate(nb)
    ids = [cell.get("id") for cell in nb.cells]
    assert all(ids) and len(set(ids)) == len(ids), "every cell needs a unique id"
    unexecuted = [i for i, cell in enumerate(nb.cells) if cell.cell_type == "code" and cell.execution_count is None]
    assert not unexecuted, f"code cells never executed: {unexecuted}"


# --- what a reader of the site sees -----------------------------------------------------------------

DATE = re.compile(r"\b20\d\d-[01]\d-[0-3]\d\b")
COMMIT = re.compile(r"\b(?=[0-9a-f]*\d)(?=[0-9a-f]*[a-f])[0-9a-f]{7,40}\b")
STRAY_REPR = re.compile(r"^(<function |<bound method |interactive\(children=|\[?<matplotlib\.|Text\(-?\d|"
                        r"<Figure size )", re.M)
CODE_COLUMNS = 88  # notebooks/ruff.toml: longer lines scroll sideways on the site
CHAPTERS = [p for p in NOTEBOOKS if re.match(r"\d\d_", p.name)]


def _cells(path):
    return nbformat.read(path, as_version=4).cells


def _tags(cell):
    return set(cell.get("metadata", {}).get("tags", []))


@pytest.mark.parametrize("path", CHAPTERS, ids=lambda p: p.name)
def test_chapter_holds_no_dates_or_commit_hashes(path):
    """Chapters teach; the engineering notes keep the history. A date shown in a figure comes from
    the JSON it plots, so only outputs may carry one."""
    found = [(i, m.group()) for i, cell in enumerate(_cells(path))
             for m in [*DATE.finditer(cell.source), *COMMIT.finditer(cell.source)]]
    assert not found, f"dates or commit hashes in cell sources: {found}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_nbval_markers_are_tags_not_comments(path):
    visible = [i for i, cell in enumerate(_cells(path)) if cell.cell_type == "code" and "NBVAL" in cell.source]
    assert not visible, f"cells with a visible nbval comment (use the cell tag): {visible}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_code_fits_the_page(path):
    long = [(i, line) for i, cell in enumerate(_cells(path)) if cell.cell_type == "code"
            for line in cell.source.splitlines() if len(line) > CODE_COLUMNS]
    assert not long, f"code lines over {CODE_COLUMNS} columns: {long[:5]}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_no_stray_reprs_on_the_page(path):
    stray = []
    for i, cell in enumerate(_cells(path)):
        if cell.cell_type != "code" or "remove-output" in _tags(cell):
            continue
        for out in cell.get("outputs", []):
            text = out.get("text") or out.get("data", {}).get("text/plain", "")
            text = "".join(text) if isinstance(text, list) else text
            if "image/png" in out.get("data", {}):  # the site shows the image, not its text form
                continue
            stray += [(i, m.group()) for m in STRAY_REPR.finditer(text)]
    assert not stray, f"outputs that show a Python repr instead of a result: {stray}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_interactive_cells_have_a_static_rendering(path):
    """A widget is dead on the static site: its cell's output is removed there (and not checked), and
    the next cells show what it shows. No widget state is saved, so the site loads no widget code."""
    cells = _cells(path)
    for i, cell in enumerate(cells):
        if cell.cell_type == "code" and re.search(r"^\s*(import ipywidgets|from ipywidgets )", cell.source, re.M):
            assert {"remove-output", "nbval-ignore-output"} <= _tags(cell), f"cell {i}"
            after = cells[i + 1:i + 3]
            assert any(c.cell_type == "code" and "nbval-ignore-output" not in _tags(c) and c.get("outputs")
                       for c in after), f"cell {i}: no checked static rendering right after the control"
    assert "widgets" not in nbformat.read(path, as_version=4).metadata, "saved widget state"
    saved = [i for i, cell in enumerate(cells) for out in cell.get("outputs", [])
             if "application/vnd.jupyter.widget-view+json" in out.get("data", {})]
    assert not saved, f"cells with a saved control, which shows as a text repr without its state: {saved}"


@pytest.mark.parametrize("path", CHAPTERS, ids=lambda p: p.name)
def test_chapter_says_what_limits_its_kernel(path):
    markdown = "\n".join(c.source for c in _cells(path) if c.cell_type == "markdown")
    assert re.search(r"^#+ .*What limits this kernel", markdown, re.M | re.I), "no 'What limits this kernel'"
    assert "book/notes/" in markdown, "no link to the kernel's engineering notes"
