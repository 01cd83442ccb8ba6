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


UPLOAD_KEY = "train/upload_bytes"


def cumulative_upload(records: list[dict], rounds) -> list[float]:
    """Bytes uploaded from the start to the end of each of `rounds`: the sum of
    `train/upload_bytes` over the rounds before. A round that is not logged
    (`log_every_rounds` > 1) counts as the next logged round's bytes (the last one's after
    it): exact when every round uploads alike."""
    logged = sorted((r["round"], r[UPLOAD_KEY]) for r in records if UPLOAD_KEY in r)
    out = []
    for end in rounds:
        total, previous = 0.0, 0
        for logged_round, upload in logged:
            total += upload * (min(logged_round, end) - previous)
            previous = logged_round
            if logged_round >= end:
                break
        if logged and previous < end:
            total += logged[-1][1] * (end - previous)
        out.append(total)
    return out


def plot_learning_curves(
    metrics_path: str | os.PathLike,
    out: str | os.PathLike,
    score_keys: tuple[str, ...] = ("train/accuracy", "eval/accuracy"),
) -> Path:
    """Train and eval loss (left, log scale) and the `score_keys` (middle) per round: the
    task's metrics, such as accuracy or mIoU; where the run reports `train/upload_bytes`,
    its eval scores against the cumulative bytes clients uploaded (right, FedVision's
    trade-off of accuracy and communication)."""
    records = read_metrics(metrics_path)
    uploaded = any(UPLOAD_KEY in r for r in records)
    figure = Figure(figsize=(15 if uploaded else 10, 4))
    FigureCanvasAgg(figure)
    loss_axes, score_axes, *upload_axes = figure.subplots(1, 3 if uploaded else 2)
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
    for axes in upload_axes:
        _plot_score_vs_upload(axes, records, score_keys)
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


def _plot_score_vs_upload(axes, records, score_keys) -> None:
    for key in (k for k in score_keys if k.startswith("eval/")):
        scored = [r for r in records if key in r]
        if scored:
            uploaded = cumulative_upload(records, [r["round"] for r in scored])
            axes.plot(uploaded, [r[key] for r in scored], label=key, marker=".")
    axes.set_xlabel("cumulative uploaded bytes (train/upload_bytes)")
    axes.set_ylabel("score")
    axes.grid(True, alpha=0.3)
    if axes.get_legend_handles_labels()[0]:
        axes.legend()
