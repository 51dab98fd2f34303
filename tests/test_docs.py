"""The front door and the back matter: the README's results table is what `python -m minikernels.results`
prints from the recorded runs, the README keeps no run history, every engineering-notes page renders
recorded runs from JSON, and every bibliography entry links to its paper."""

import re
from pathlib import Path

import pybtex.database
import pytest

from minikernels import results

ROOT = Path(__file__).resolve().parents[1]
NOTES = ROOT / "book" / "notes"
README = (ROOT / "README.md").read_text()


def _results_block():
    match = re.search(r"<!-- results:start -->\n(.*?)\n<!-- results:end -->", README, re.S)
    assert match, "README has no results block"
    return match


def test_readme_results_table_is_generated_from_the_recorded_runs():
    assert _results_block().group(1) == results.table(), \
        "README's results table differs from `python -m minikernels.results`: paste its output"


def test_readme_keeps_no_run_history():
    outside = README.replace(_results_block().group(0), "")
    assert not re.findall(r"\b20\d\d-[01]\d-[0-3]\d\b", outside), "dates in the README outside the results table"
    assert not re.findall(r"\b(?=[0-9a-f]*\d)(?=[0-9a-f]*[a-f])[0-9a-f]{7,40}\b", outside), "commit hashes"


def test_results_compare_each_kernel_with_its_fastest_anchor():
    record = {"rows": [
        {"impl": "minikernels", "pass": "fwd", "shape": "a", "ms": 1.0},
        {"impl": "slow", "pass": "fwd", "shape": "a", "ms": 3.0},
        {"impl": "fast", "pass": "fwd", "shape": "a", "ms": 2.0},
        {"impl": "minikernels", "pass": "fwd", "shape": "b", "ms": 2.0},
        {"impl": "fast", "pass": "fwd", "shape": "b", "ms": 1.0},
        {"impl": "fast", "pass": "fwd", "shape": "c", "ms": 1.0},  # ours did not run: not compared
    ]}
    (row,) = results.compare(record)
    assert row["anchors"] == ["fast"] and row["shapes"] == 2
    assert (row["low"], row["high"]) == (0.5, 2.0)


def test_results_never_take_our_own_variants_for_anchors():
    record = {"rows": [
        {"impl": "minikernels paged16", "pass": "fwd", "shape": "a", "cache": "bfloat16", "ms": 2.0},
        {"impl": "minikernels", "pass": "fwd", "shape": "a", "cache": "bfloat16", "ms": 1.0},  # ours, dense
        {"impl": "mk.flash padded", "pass": "fwd", "shape": "a", "cache": "bfloat16", "ms": 0.5},
        {"impl": "sdpa", "pass": "fwd", "shape": "a", "cache": "bfloat16", "ms": 3.0},
        {"impl": "minikernels int8", "pass": "fwd", "shape": "a", "cache": "int8", "ms": 1.5},
    ]}
    (paged,) = results.compare(record, ours="minikernels paged16")
    assert paged["anchors"] == ["sdpa"] and paged["low"] == 1.5
    (int8,) = results.compare(record, ours="minikernels int8")  # the cache is how it ran, not the problem
    assert int8["anchors"] == ["sdpa"] and int8["low"] == 2.0
    (own,) = results.compare(record, ours="minikernels paged16", anchors={"minikernels": "dense"})
    assert own["anchors"] == ["dense"] and own["low"] == 0.5


def test_contributors_have_the_design_in_the_repository():
    text = (ROOT / "CONTRIBUTING.md").read_text().lower()
    for topic in ["## layout", "## the api", "## one code path, two machines", "## what \"verified\" means",
                  "bounds: float32", "how a run is recorded"]:
        assert topic in text, topic


NOTES_PAGES = sorted(p for p in NOTES.glob("*.md") if p.name != "index.md")


def test_every_kernel_has_a_notes_page():
    names = {p.stem for p in NOTES_PAGES}
    assert {"softmax", "flash_decode", "block_sparse", "linear_attention", "selective_scan", "ssd"} <= names


@pytest.mark.parametrize("page", NOTES_PAGES, ids=lambda p: p.name)
def test_notes_page_renders_recorded_runs(page):
    tables = re.findall(r"```\{bench-table\}\s+(\S+)", page.read_text())
    assert tables, "a notes page shows its recorded runs with the bench-table directive"
    for name in tables:
        assert (ROOT / "book" / "data" / "bench" / name).is_file(), name


def test_every_reference_links_to_its_paper():
    bib = pybtex.database.parse_file(ROOT / "book" / "references.bib")
    unlinked = [key for key, entry in bib.entries.items()
                if not {"eprint", "doi", "url"} & {f.lower() for f in entry.fields}]
    assert not unlinked, f"entries with no arXiv id, DOI or URL: {unlinked}"
    for key, entry in bib.entries.items():
        fields = {f.lower(): v for f, v in entry.fields.items()}
        if "eprint" in fields:
            assert re.fullmatch(r"\d{4}\.\d{4,5}", fields["eprint"]), key
            assert fields.get("archiveprefix", "").lower() == "arxiv", key
