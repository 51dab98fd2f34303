"""Offer each chapter's student notebook as a download on the site, never the instructor's master.

The student versions are generated, not committed: before Sphinx reads the sources, `otter assign`
builds each exercise's student notebook (no solutions, no hidden tests, no instructor notice) into
`book/handouts/` (ignored by git), where the chapters' `{download}` links point; Sphinx then copies
them into the site's `_downloads/`. Building all five takes a few seconds (the masters' tests are run by
`make test`, not here).
"""

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def build_handouts(app, config):
    spec = importlib.util.spec_from_file_location("minikernels_handouts", ROOT / "tools" / "handouts.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    tool.build(ROOT / "book" / "handouts")


def setup(app):
    app.connect("config-inited", build_handouts)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
