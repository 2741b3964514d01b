"""Plots as inline SVG (matplotlib, Agg), in colours readable for colour-blind readers.

Every figure is returned as an ``<svg>`` element for direct inclusion in the page: no XML
prolog, no namespace URLs, no metadata block, text kept as text (so the page holds no
reference to anything outside itself).
"""

from __future__ import annotations

import io
import re
from collections.abc import Sequence

import numpy as np

# Okabe & Ito's palette: distinguishable with every common colour-vision deficiency.
PALETTE = ["#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#F0E442", "#000000"]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update(
        {
            "svg.fonttype": "none",
            "svg.hashsalt": "visbatch",  # the same figure gives the same ids: reports diff cleanly
            "font.size": 9,
            "axes.spines.top": False,
            "axes.spines.right": False,
            "axes.prop_cycle": matplotlib.cycler(color=PALETTE),
        }
    )
    return plt


def _svg(fig) -> str:
    plt = _pyplot()
    buffer = io.StringIO()
    fig.savefig(buffer, format="svg", bbox_inches="tight", metadata={"Date": None, "Creator": None})
    plt.close(fig)
    text = buffer.getvalue()
    text = text[text.index("<svg") :]
    text = re.sub(r"<metadata>.*?</metadata>", "", text, flags=re.S)
    text = re.sub(r'\s+xmlns(:\w+)?="[^"]*"', "", text)
    return re.sub(r"<!--.*?-->", "", text, flags=re.S)


def histogram(values: Sequence[float], title: str, xlabel: str, marks: dict[str, float] | None = None) -> str:
    """A histogram over every value (however many), with optional labelled vertical marks."""
    plt = _pyplot()
    data = np.asarray([v for v in values if v is not None], dtype=np.float64)
    data = data[np.isfinite(data)]
    fig, ax = plt.subplots(figsize=(5.2, 2.6))
    if data.size:
        ax.hist(data, bins=min(50, max(5, int(np.sqrt(data.size)))), color=PALETTE[0])
    for n, (label, x) in enumerate((marks or {}).items()):
        ax.axvline(x, color=PALETTE[3 + n % 4], linestyle="--", label=f"{label} {x:.3g}")
    if marks:
        ax.legend(frameon=False)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("images")
    _integer_ticks(ax.yaxis)  # counts: never 0.2, 0.4, ...
    return _svg(fig)


def _integer_ticks(axis) -> None:
    from matplotlib.ticker import MaxNLocator

    axis.set_major_locator(MaxNLocator(integer=True))


def bars(labels: Sequence[str], counts: Sequence[float], title: str, xlabel: str = "images") -> str:
    """Horizontal bars, largest first as given."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.2, 0.3 * max(3, len(labels)) + 0.6))
    positions = np.arange(len(labels))[::-1]
    ax.barh(positions, counts, color=PALETTE[0])
    ax.set_yticks(positions, [str(label)[:40] for label in labels])
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    if all(float(c).is_integer() for c in counts):
        _integer_ticks(ax.xaxis)
    return _svg(fig)


def curves(series: dict[str, tuple[Sequence[float], Sequence[float]]], title: str, xlabel: str, ylabel: str) -> str:
    """Lines, one per named series (each with its own marker, so colour is not the only cue)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(4.2, 3.2))
    markers = "osD^v<>P"
    for n, (name, (x, y)) in enumerate(series.items()):
        ax.plot(x, y, label=name, marker=markers[n % len(markers)], markersize=3, linewidth=1.4)
    if series:
        ax.legend(frameon=False)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    return _svg(fig)


def curve_band(curves: dict[str, np.ndarray], title: str, xlabel: str, ylabel: str, per_image: int = 40) -> str:
    """Per-image curves (``[n, k]`` per name, thin and faint, a sample of ``per_image``) under
    their mean over every image (bold, with a marker)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(4.6, 3.2))
    markers = "osD^v<>P"
    for n, (name, matrix) in enumerate(curves.items()):
        if matrix.size == 0:
            continue
        x = np.linspace(0, 1, matrix.shape[1])
        colour = PALETTE[n % len(PALETTE)]
        step = max(1, matrix.shape[0] // per_image)
        for row in matrix[::step][:per_image]:
            ax.plot(x, row, color=colour, alpha=0.18, linewidth=0.7)
        ax.plot(
            x,
            matrix.mean(axis=0),
            color=colour,
            marker=markers[n % len(markers)],
            markersize=3,
            linewidth=2,
            label=f"{name} (mean of {matrix.shape[0]})",
        )
    if curves:
        ax.legend(frameon=False)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    return _svg(fig)
