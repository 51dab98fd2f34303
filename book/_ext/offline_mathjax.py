"""Serve MathJax from the site itself, so that the book's mathematics renders with no network.

Sphinx loads MathJax from a CDN by default; offline, every formula stays raw TeX. The MathJax
release used here comes from a Python package that ships it (`django-static-mathjax`, pinned in
pyproject.toml's `book` extra: MathJax 3.2.2, the major version Sphinx expects), so `make setup`
installs it like any other dependency. Its `es5/` folder (the browser build: loader, TeX input,
CommonHTML output and its fonts, plus the components MathJax loads on demand) is copied into the
site's `_static/mathjax/`, and `mathjax_path` points there.
"""

import importlib.util
import shutil
from pathlib import Path

ENTRY = "tex-mml-chtml.js"  # the combined component Sphinx uses by default: TeX and MathML in, HTML out
# Other combined builds that the page never loads (SVG output, the "full" and speech variants, node).
UNUSED = ["mml-chtml.js", "mml-svg.js", "tex-chtml-full-speech.js", "tex-chtml-full.js", "tex-mml-svg.js",
          "tex-svg-full.js", "tex-svg.js", "node-main.js", "output/svg"]


def mathjax_es5():
    spec = importlib.util.find_spec("mathjax")
    locations = list(spec.submodule_search_locations or []) if spec else []
    for location in locations:
        es5 = Path(location) / "static" / "mathjax" / "es5"
        if (es5 / ENTRY).is_file():
            return es5
    raise RuntimeError("MathJax is missing: install the book's dependencies (`make setup`, which installs "
                       "pyproject.toml's `book` extra with django-static-mathjax)")


def _copy_mathjax(app, exception):
    if exception is not None or app.builder.format != "html":
        return
    target = Path(app.outdir) / "_static" / "mathjax"
    ignore = shutil.ignore_patterns(*[Path(p).name for p in UNUSED if "/" not in p])
    shutil.copytree(mathjax_es5(), target, ignore=ignore, dirs_exist_ok=True)
    for path in UNUSED:
        if "/" in path:
            shutil.rmtree(target / path, ignore_errors=True)


def _point_at_local_copy(app, config):
    mathjax_es5()  # fail at the start of the build, not after it, when MathJax is not installed
    config.mathjax_path = f"mathjax/{ENTRY}"  # relative to _static


def setup(app):
    app.connect("config-inited", _point_at_local_copy)
    app.connect("build-finished", _copy_mathjax)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
