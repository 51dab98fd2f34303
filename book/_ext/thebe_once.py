"""Keep each <script> once per page.

With jupyter-book 1.0.4, sphinx-thebe 0.3.1 registers its configuration script twice, so every page
declared `const THEBE_JS_URL` twice and the browser logged a SyntaxError (found by
tests/test_book.py). This drops exact duplicates from the page's script list.
"""


def _dedupe_scripts(app, pagename, templatename, context, doctree):
    seen, unique = set(), []
    for script in context.get("script_files", []):
        # the two copies differ only in filename: None for one, "" for the other
        key = (getattr(script, "filename", None) or "", repr(getattr(script, "attributes", None)))
        if key not in seen:
            seen.add(key)
            unique.append(script)
    context["script_files"] = unique


def setup(app):
    app.connect("html-page-context", _dedupe_scripts, priority=900)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
