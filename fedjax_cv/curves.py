"""Learning curves of a run, drawn from its metrics.jsonl."""

from __future__ import annotations

import json
import os
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """The records of a metrics.jsonl, skipping a line cut short by a kill."""
    records = []
    for line in Path(path).read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def plot_learning_curves(
    metrics_path: str | os.PathLike,
    out: str | os.PathLike,
    score_keys: tuple[str, ...] = ("train/accuracy", "eval/accuracy"),
) -> Path:
    """Train and eval loss (left, log scale) and the `score_keys` (right) per round: the
    task's metrics, such as accuracy or mIoU."""
    records = read_metrics(metrics_path)
    figure = Figure(figsize=(10, 4))
    FigureCanvasAgg(figure)
    loss_axes, score_axes = figure.subplots(1, 2)
    for key, axes in (("train/loss", loss_axes), ("eval/loss", loss_axes)):
        points = [(r["round"], r[key]) for r in records if key in r]
        if points:
            axes.plot(*zip(*points, strict=True), label=key, marker="." if "eval" in key else None)
    for key in score_keys:
        points = [(r["round"], r[key]) for r in records if key in r]
        if points:
            score_axes.plot(
                *zip(*points, strict=True), label=key, marker="." if "eval" in key else None
            )
    loss_axes.set_yscale("log")
    for axes, label in ((loss_axes, "loss"), (score_axes, "score")):
        axes.set_xlabel("round")
        axes.set_ylabel(label)
        axes.grid(True, alpha=0.3)
        axes.legend()
    figure.tight_layout()
    out = Path(out)
    figure.savefig(out, dpi=100)
    return out
