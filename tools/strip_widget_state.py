"""Drop saved widgets from notebooks: `python tools/strip_widget_state.py NOTEBOOK...`.

Executing a notebook saves the state of its ipywidgets controls in the notebook's metadata, and each
control as a cell output. The site never shows a live control (each control's cell output is removed
there, and a static rendering follows it), so the state would only make the site load widget code
from a CDN, which fails offline; and without its state, a saved control shows as a text repr
(`interactive(children=...)`) wherever the notebook is opened. Both go; the control comes back when
the cell runs in Jupyter. `make notebooks` runs this after executing each notebook.
"""

import sys

import nbformat

WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"


def strip(path: str) -> bool:
    nb = nbformat.read(path, as_version=nbformat.NO_CONVERT)
    changed = nb.metadata.pop("widgets", None) is not None
    for cell in nb.cells:
        outputs = cell.get("outputs", [])
        kept = [out for out in outputs if WIDGET_VIEW not in out.get("data", {})]
        if len(kept) != len(outputs):
            cell.outputs, changed = kept, True
    if changed:
        nbformat.write(nb, path)
    return changed


if __name__ == "__main__":
    for notebook in sys.argv[1:]:
        if strip(notebook):
            print(f"{notebook}: saved widgets removed")
