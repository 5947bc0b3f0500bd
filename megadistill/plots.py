"""PNG plots for reports: bar charts on matplotlib's Agg canvas, written atomically.

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

__all__ = ["bar_chart", "new_figure", "plot_layer_importance", "save_png"]

BAR_COLOR = "#4C72B0"
HIGHLIGHT_COLOR = "#C44E52"


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
