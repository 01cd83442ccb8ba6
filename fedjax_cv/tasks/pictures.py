"""Pictures of predictions: test images beside what the model says and the truth."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

IGNORE_COLOUR = (1.0, 1.0, 1.0)  # where a mask has no label


def displayable(image: np.ndarray) -> np.ndarray:
    """A model input (normalised to [-1, 1], or uint8) as floats in [0, 1], [H, W, 3|1]."""
    image = np.asarray(image)
    if image.dtype == np.uint8:
        return image.astype(np.float32) / 255.0
    return np.clip(image.astype(np.float32) * 0.5 + 0.5, 0.0, 1.0)


def palette(num_classes: int) -> np.ndarray:
    """[num_classes, 3] distinct colours; class 0 (background in masks) dark grey."""
    from matplotlib import colormaps

    colours = colormaps["tab20"](np.arange(max(num_classes, 1)) % 20)[:, :3]
    colours[0] = (0.15, 0.15, 0.15)
    return colours


def colour_mask(mask: np.ndarray, num_classes: int, ignore_index: int = 255) -> np.ndarray:
    """Class-index mask [H, W] -> RGB [H, W, 3]; ignored pixels white."""
    mask = np.asarray(mask)
    colours = palette(num_classes)
    out = colours[np.clip(mask, 0, num_classes - 1)]
    out[mask == ignore_index] = IGNORE_COLOUR
    return out


def image_grid(
    panels: Sequence[np.ndarray],
    captions: Sequence[tuple[str, str]],
    *,
    columns: int,
    title: str = "",
    panel_size: float = 1.8,
    boxes: Sequence[Sequence[tuple[np.ndarray, Sequence[float], str]]] | None = None,
) -> Figure:
    """Panels (RGB floats in [0, 1] or single-channel) in rows of `columns`, each with a
    (caption, colour) below it; `boxes` adds, per panel, (x1, y1, x2, y2 in pixels, colour,
    label) rectangles drawn over it."""
    rows = -(-len(panels) // columns)
    figure = Figure(figsize=(panel_size * columns, (panel_size + 0.3) * rows + 0.4))
    FigureCanvasAgg(figure)
    for index, (panel, (caption, colour)) in enumerate(zip(panels, captions, strict=True)):
        axes = figure.add_subplot(rows, columns, index + 1)
        panel = np.asarray(panel)
        if panel.ndim == 3 and panel.shape[-1] == 1:
            axes.imshow(panel[..., 0], cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        else:
            axes.imshow(panel, interpolation="nearest")
        for box, box_colour, label in boxes[index] if boxes else ():
            x1, y1, x2, y2 = (float(v) for v in box)
            axes.add_patch(
                Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, edgecolor=box_colour, lw=1)
            )
            axes.text(
                x1,
                y1,
                label,
                color="white",
                fontsize=5,
                va="bottom",
                bbox={"facecolor": box_colour, "pad": 0.5, "lw": 0},
            )
        axes.set_xticks([])
        axes.set_yticks([])
        axes.set_xlabel(caption, color=colour, fontsize=8)
    if title:
        figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    return figure


def save(figure: Figure, path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    return path
