"""matplotlib for the benchmarks' PNGs: headless (Agg), imported only when a plot is drawn."""

from __future__ import annotations


def pyplot():
    """matplotlib.pyplot on the Agg backend (ImportError when matplotlib is not installed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
