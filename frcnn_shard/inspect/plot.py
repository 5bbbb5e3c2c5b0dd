"""Figures without pyplot: a matplotlib Figure on an Agg canvas, so nothing here switches the caller's
global backend. matplotlib is the optional ``viz`` extra and is imported only when a figure is made.
"""
from __future__ import annotations

DPI = 100


def new_figure(figsize: tuple[float, float]):
    """A matplotlib Figure on an Agg canvas, without pyplot (no global backend or figure state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, dpi=DPI)
    FigureCanvasAgg(fig)
    return fig
