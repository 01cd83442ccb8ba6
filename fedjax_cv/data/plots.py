"""Pictures and tables of a partition: who holds which classes, and how much.

Figures are drawn on matplotlib's Agg canvas directly, never through pyplot, so importing this
module changes no global backend (a notebook keeps its own).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from fedjax_cv.data.partition import PartitionStats


def client_order(histograms: np.ndarray) -> np.ndarray:
    """Clients grouped by dominant class, most concentrated first within a group.

    Sorting this way turns a heatmap of a non-IID partition into blocks along the diagonal
    instead of noise, as in FedCV's figures.
    """
    histograms = np.asarray(histograms, np.float64)
    shares = histograms / np.maximum(histograms.sum(axis=1, keepdims=True), 1)
    dominant = shares.argmax(axis=1)
    return np.lexsort((-shares.max(axis=1), dominant))


def plot_class_heatmap(
    histograms: np.ndarray,
    path: str | os.PathLike,
    class_names: Sequence[str] | None = None,
    title: str | None = None,
    normalize: bool = True,
) -> Path:
    """Client x class heatmap PNG (He et al. 2021, FedCV Figs. 3 and 11); returns the path.

    Rows are clients sorted by `client_order`; cells are each client's class shares
    (`normalize`) or raw counts.
    """
    histograms = np.asarray(histograms, np.float64)
    order = client_order(histograms)
    values = histograms[order]
    if normalize:
        values = values / np.maximum(values.sum(axis=1, keepdims=True), 1)
    num_clients, num_classes = values.shape
    figure = Figure(figsize=(min(4 + 0.25 * num_classes, 16), min(3 + 0.12 * num_clients, 12)))
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    image = axes.imshow(values, aspect="auto", interpolation="nearest", cmap="viridis")
    figure.colorbar(image, ax=axes, label="share of client's examples" if normalize else "count")
    axes.set_xlabel("class")
    axes.set_ylabel("client (sorted by dominant class)")
    if class_names is not None and num_classes <= 40:
        axes.set_xticks(range(num_classes), class_names, rotation=90, fontsize=7)
    axes.set_title(title or f"{num_clients} clients x {num_classes} classes")
    figure.tight_layout()
    return _save(figure, path)


def plot_client_sizes(
    client_sizes: Sequence[int],
    path: str | os.PathLike,
    title: str | None = None,
    log_scale: bool = True,
) -> Path:
    """Sorted client sizes PNG (Hsu et al. 2020, Fig. 10 style); returns the path."""
    sizes = np.sort(np.asarray(client_sizes, np.int64))[::-1]
    figure = Figure(figsize=(6, 4))
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    axes.plot(np.arange(1, len(sizes) + 1), sizes, drawstyle="steps-mid")
    if log_scale and sizes.min() > 0 and sizes.max() > 10 * sizes.min():
        axes.set_yscale("log")
    axes.set_xlabel("client rank (largest first)")
    axes.set_ylabel("examples per client")
    axes.set_title(title or f"{len(sizes)} clients, {int(sizes.sum())} examples")
    axes.grid(True, alpha=0.3)
    figure.tight_layout()
    return _save(figure, path)


def client_table(
    stats: PartitionStats,
    class_names: Sequence[str] | None = None,
    max_rows: int | None = 20,
    top_classes: int = 3,
) -> str:
    """A compact per-client table: size, classes present, top classes (and boxes)."""
    histograms = np.asarray(stats.class_histograms, np.int64)
    boxes = stats.client_num_boxes
    header = f"{'client':>6} {'examples':>8} {'classes':>7}" + (" boxes" if boxes else "")
    lines = [
        f"{stats.num_clients} clients, {stats.num_examples} examples, "
        f"mean EMD {stats.mean_emd:.3f}" + (f", {stats.num_boxes} boxes" if boxes else ""),
        header + "  top classes",
    ]
    shown = range(stats.num_clients if max_rows is None else min(max_rows, stats.num_clients))
    for client in shown:
        row = histograms[client]
        top = [c for c in np.argsort(-row, kind="stable")[:top_classes] if row[c] > 0]
        names = ", ".join(
            f"{class_names[c] if class_names is not None else c}:{row[c]}" for c in top
        )
        line = f"{client:>6} {stats.client_sizes[client]:>8} {int(np.count_nonzero(row)):>7}"
        lines.append(line + (f" {boxes[client]:>5}" if boxes else "") + "  " + names)
    if len(shown) < stats.num_clients:
        lines.append(f"... {stats.num_clients - len(shown)} more clients")
    return "\n".join(lines)


def print_client_table(
    stats: PartitionStats,
    class_names: Sequence[str] | None = None,
    max_rows: int | None = 20,
) -> None:
    """Prints `client_table`."""
    print(client_table(stats, class_names, max_rows))


def _save(figure: Figure, path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    return path
