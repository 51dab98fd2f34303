"""Drop saved widget state from notebooks: `python tools/strip_widget_state.py NOTEBOOK...`.

Executing a notebook saves the state of its ipywidgets controls in the notebook's metadata. The site
never shows a live control (each control's cell output is removed there, and a static rendering
follows it), so the state would only make the site load widget code from a CDN, which fails offline.
`make notebooks` runs this after executing each notebook.
"""

import sys

import nbformat


def strip(path: str) -> bool:
    nb = nbformat.read(path, as_version=nbformat.NO_CONVERT)
    if "widgets" not in nb.metadata:
        return False
    del nb.metadata["widgets"]
    nbformat.write(nb, path)
    return True


if __name__ == "__main__":
    for notebook in sys.argv[1:]:
        if strip(notebook):
            print(f"{notebook}: widget state removed")
