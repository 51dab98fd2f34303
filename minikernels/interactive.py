"""Interactive figures for the chapters: controls over a matplotlib figure, redrawn as an image.

``ipywidgets.interact`` draws its function's figure into an Output widget. Executed headless (nbconvert,
nbval), a notebook with one then sometimes waits on that widget until the cell times out. Here the
figure is saved as a PNG into an Image widget that each change of a control redraws: no Output widget,
the same controls in Jupyter, and nothing that waits when no front end is attached.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Callable


def live_figure(draw: Callable[..., None], **controls):
    """Show ``controls`` (ipywidgets, or a list of options for a dropdown) above the figure that
    ``draw(**values)`` makes with matplotlib's pyplot (ending with ``plt.show()``, as for ``interact``),
    redrawn whenever a control changes. Returns the widget box (display is done here)."""
    import ipywidgets as widgets
    import matplotlib.pyplot as plt
    from IPython.display import display

    for name, control in list(controls.items()):
        if isinstance(control, (list, tuple)):
            controls[name] = control = widgets.Dropdown(options=list(control))
        if not control.description:
            control.description = name

    def render() -> bytes:
        shown = []
        with contextlib.ExitStack() as stack:
            stack.enter_context(plt.ioff())
            original = plt.show
            plt.show = lambda *args, **kwargs: shown.append(plt.gcf())  # capture, don't display
            stack.callback(setattr, plt, "show", original)
            draw(**{name: control.value for name, control in controls.items()})
        fig = shown[-1] if shown else plt.gcf()
        png = io.BytesIO()
        fig.savefig(png, format="png")
        plt.close("all")
        return png.getvalue()

    image = widgets.Image(value=render(), format="png")
    for control in controls.values():
        control.observe(lambda _change: setattr(image, "value", render()), names="value")
    box = widgets.VBox([*controls.values(), image])
    display(box)
    return box
