"""PNG plots for reports: bar, grouped-bar and line charts on matplotlib's Agg canvas, written atomically.

No pyplot and no global backend switch: each figure is a ``matplotlib.figure.Figure`` drawn on its
own ``FigureCanvasAgg``, so plotting works headless and from any thread, and never changes the
backend of a caller's interactive session. Files are written to a temporary name in the target
folder and renamed into place (a reader sees the old PNG or the whole new one).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

__all__ = ["bar_chart", "grouped_bar_chart", "line_plot", "new_figure", "plot_layer_importance", "save_png",
           "series_colors"]

BAR_COLOR = "#4C72B0"
HIGHLIGHT_COLOR = "#C44E52"
REFERENCE_COLOR = "black"
SERIES_COLORS = ("#4C72B0", "#DD8452", "#55A868", "#C44E52", "#8172B3", "#937860", "#DA8BC3", "#8C8C8C", "#CCB974",
                 "#64B5CD")
"""Colour cycle of :func:`series_colors` (seaborn "deep"): a series keeps its colour across figures."""


def new_figure(rows: int = 1, cols: int = 1, width_in: float = 8.0, height_in: float = 3.0) -> tuple[Figure, list[Axes]]:
    """A figure of ``rows x cols`` panels, each ``width_in x height_in`` inches, on an Agg canvas; the axes flattened."""
    fig = Figure(figsize=(width_in * cols, height_in * rows), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, cols, squeeze=False)
    return fig, [ax for row in axes for ax in row]


def bar_chart(ax: Axes, values: Sequence[float], labels: Sequence | None = None, *, title: str = "",
              xlabel: str = "", ylabel: str = "", highlight: Sequence[int] = (), annotate: bool = False) -> Axes:
    """Draw one bar per value on ``ax``; bars at indices ``highlight`` in a second colour.

    Args:
        ax: the panel (from :func:`new_figure`).
        values: bar heights (any unit; negative bars point down from a zero line).
        labels: tick label per bar (default ``0 .. len(values) - 1``).
        title, xlabel, ylabel: panel texts (put units in ``ylabel``).
        highlight: indices of bars to mark (e.g. the layers a reduction would drop).
        annotate: write each value above its bar (for a handful of bars).

    Returns:
        ``ax``. Raises ValueError when ``labels`` and ``values`` differ in length.
    """
    labels = list(range(len(values))) if labels is None else list(labels)
    if len(labels) != len(values):
        raise ValueError(f"bar_chart got {len(values)} values but {len(labels)} labels")
    marked = set(highlight)
    colors = [HIGHLIGHT_COLOR if i in marked else BAR_COLOR for i in range(len(values))]
    bars = ax.bar(range(len(values)), values, color=colors)
    ax.set_xticks(range(len(values)), [str(label) for label in labels])
    ax.axhline(0.0, color="black", linewidth=0.6)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if annotate:
        ax.bar_label(bars, fmt="%.3g", fontsize=7)
    return ax


def series_colors(names: Sequence[str]) -> dict[str, str]:
    """``{name: colour}`` in :data:`SERIES_COLORS` order (cycling), so one series has one colour in every figure."""
    return {name: SERIES_COLORS[i % len(SERIES_COLORS)] for i, name in enumerate(names)}


def grouped_bar_chart(ax: Axes, groups: Sequence[str], series: dict[str, Sequence[float]], *,
                      colors: dict[str, str] | None = None, hatched: Sequence[str] = (),
                      reference: Sequence[float] | None = None, reference_label: str = "", title: str = "",
                      ylabel: str = "", annotate: bool = False, missing_label: str = "") -> Axes:
    """One group of bars per entry of ``groups``, one bar per series in each group.

    Args:
        ax: the panel (from :func:`new_figure`).
        groups: group labels on x (e.g. languages).
        series: ``{series name: one value per group}``; a NaN value leaves its bar out (not run).
        colors: ``{series name: colour}`` (default :func:`series_colors`).
        hatched: series drawn hatched (``//``), e.g. baselines, so they read apart from the others.
        reference: one value per group drawn as a black horizontal line across the group (e.g. the
            teacher); NaN leaves a group without one.
        reference_label: legend entry of the reference line.
        title, ylabel: panel texts (put units in ``ylabel``).
        annotate: write each value above its bar.
        missing_label: text written upright where a NaN bar would stand (e.g. ``"not run"``).

    The legend goes right of the panel, clear of the bars.

    Returns:
        ``ax``. Raises ValueError when a series or ``reference`` does not have one value per group.
    """
    colors = colors or series_colors(list(series))
    width = 0.8 / max(1, len(series))
    for i, (name, values) in enumerate(series.items()):
        _check_per_group(name, values, groups)
        xs = [g + (i - (len(series) - 1) / 2) * width for g in range(len(groups))]
        bars = ax.bar(xs, values, width=width, color=colors[name], label=name, edgecolor="white",
                      hatch="//" if name in hatched else None)
        if annotate:
            ax.bar_label(bars, fmt="%.3g", fontsize=7)
        if missing_label:
            _label_missing(ax, xs, values, missing_label)
    if reference is not None:
        _check_per_group(reference_label or "reference", reference, groups)
        ax.hlines(reference, [g - 0.45 for g in range(len(groups))], [g + 0.45 for g in range(len(groups))],
                  colors=REFERENCE_COLOR, linewidth=1.5, label=reference_label or None)
    ax.set_xticks(range(len(groups)), [str(g) for g in groups])
    ax.set_title(title)
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return ax


def _label_missing(ax: Axes, xs: Sequence[float], values: Sequence[float], text: str) -> None:
    """Write ``text`` upright from the zero line at each NaN value (``v != v`` only for NaN)."""
    for x, value in zip(xs, values):
        if value != value:
            ax.text(x, 0.0, f" {text}", rotation=90, ha="center", va="bottom", fontsize=7, color="gray")


def _check_per_group(name: str, values: Sequence[float], groups: Sequence[str]) -> None:
    if len(values) != len(groups):
        raise ValueError(f"grouped_bar_chart: {name!r} has {len(values)} values for {len(groups)} groups")


def line_plot(ax: Axes, series: dict[str, tuple[Sequence[float], Sequence[float]]], *,
              colors: dict[str, str] | None = None, title: str = "", xlabel: str = "", ylabel: str = "",
              marker: str | None = ".") -> Axes:
    """One line per series: ``{name: (xs, ys)}``; a series with no points is left out of the panel.

    Args:
        ax: the panel (from :func:`new_figure`).
        series: ``{name: (x values, y values)}`` of equal lengths, x increasing.
        colors: ``{name: colour}`` (default :func:`series_colors`).
        title, xlabel, ylabel: panel texts (put units in the labels).
        marker: point marker (``None`` for a bare line).

    Returns:
        ``ax``. Raises ValueError when a series' xs and ys differ in length.
    """
    colors = colors or series_colors(list(series))
    for name, (xs, ys) in series.items():
        if len(xs) != len(ys):
            raise ValueError(f"line_plot: {name!r} has {len(xs)} x values but {len(ys)} y values")
        if len(xs):
            ax.plot(xs, ys, marker=marker, markersize=3, color=colors[name], label=name)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if any(len(xs) for xs, _ in series.values()):
        ax.legend(fontsize=7)
    return ax


def save_png(fig: Figure, path: str | Path, dpi: int = 120) -> Path:
    """Write ``fig`` as a PNG at ``path`` (temp file in the same folder + ``os.replace``); returns ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            fig.savefig(f, format="png", dpi=dpi)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def plot_layer_importance(importance, path: str | Path, mark: int = 1) -> Path:
    """Two bar panels of an :class:`~megadistill.importance.Importance`: ``1 - cos`` and skip loss per layer.

    Layers are on x; the ``mark`` least important layers of each metric are highlighted; the title
    names the model (``meta.model.path``). Returns ``path`` (a PNG, written atomically).

    Raises:
        ValueError: ``mark`` outside ``[0, num_layers]``.
    """
    model = (importance.meta.get("model") or {}).get("path") or "model"
    fig, (top, bottom) = new_figure(2, 1, width_in=max(6.0, 0.35 * len(importance.layer_cosine)), height_in=2.8)
    bar_chart(top, importance.layer_cosine, title="block influence (ShortGPT)", ylabel="1 - cos(in, out)",
              highlight=importance.least_important_layers(mark, "cosine"))
    bar_chart(bottom, importance.layer_skip_loss, title=f"skip loss (base {importance.base_loss:.3f} nats/token)",
              xlabel="layer", ylabel="CE increase, nats/token",
              highlight=importance.least_important_layers(mark, "skip_loss"))
    fig.suptitle(f"layer importance: {Path(str(model)).name or model}")
    return save_png(fig, path)
