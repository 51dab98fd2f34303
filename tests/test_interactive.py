"""The chapters' live figures: controls over an image that each change redraws (no Output widget)."""

import pytest

widgets = pytest.importorskip("ipywidgets")
plt = pytest.importorskip("matplotlib.pyplot")

from minikernels.interactive import live_figure  # noqa: E402


def test_live_figure_redraws_on_every_change():
    calls = []

    def draw(width=1, kind="a"):
        calls.append((width, kind))
        plt.plot(range(width + 1))
        plt.title(kind)
        plt.show()

    slider = widgets.IntSlider(1, 1, 5)
    box = live_figure(draw, width=slider, kind=["a", "b"])
    slider_, dropdown, image = box.children
    assert slider_ is slider and slider.description == "width" and dropdown.description == "kind"
    first = image.value
    assert first[:8] == b"\x89PNG\r\n\x1a\n" and calls == [(1, "a")]
    slider.value = 4
    dropdown.value = "b"
    assert calls == [(1, "a"), (4, "a"), (4, "b")] and image.value != first
    assert plt.get_fignums() == []  # every figure closed after it was drawn
