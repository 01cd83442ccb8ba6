"""`shapes`: the embedded default dataset, generated procedurally, no download.

Images of simple shapes of random size, position and colour on a styled background. Each
style (background colour, foreground palette, noise level) stands for one client's camera, so a
federated split has feature skew besides whatever label skew its partitioner adds. The same
generator returns class-index masks and boxes of every shape, for segmentation and detection.
Everything is a deterministic function of the seed.
"""

from __future__ import annotations

import dataclasses

import numpy as np

SHAPE_NAMES = ("circle", "square", "triangle", "cross", "diamond", "ring")
# Farthest pixel of any shape from its centre, in radii: the triangle's base corners.
_REACH = 1.25
_PLACEMENT_TRIES = 20  # random centres tried for a shape that must not touch the others


@dataclasses.dataclass(frozen=True)
class ShapesImages:
    """Rendered images and their annotations.

    images uint8 [N, H, W, 3]; labels int32 [N] (class of the first shape); masks uint8
    [N, H, W], 0 for background and c + 1 for a pixel of class c (later shapes on top); boxes
    float32 [N, max_shapes, 4] as normalised (x0, y0, x1, y1); box_classes int32
    [N, max_shapes]; box_mask bool [N, max_shapes].
    """

    images: np.ndarray
    labels: np.ndarray
    masks: np.ndarray
    boxes: np.ndarray
    box_classes: np.ndarray
    box_mask: np.ndarray


@dataclasses.dataclass(frozen=True)
class Style:
    background: np.ndarray  # float [3] in [0, 255]
    palette: np.ndarray  # float [3, 3]: foreground colours, each contrasting the background
    noise: float  # std of per-pixel Gaussian noise


def make_style(seed: int, style_id: int) -> Style:
    rng = np.random.default_rng([seed, style_id, 0x5A17])
    background = rng.uniform(0, 255, 3)
    luminance = background.mean()
    # Foreground on the far side of mid-grey from the background keeps every shape visible.
    low, high = (0, 110) if luminance > 128 else (145, 255)
    palette = rng.uniform(low, high, (3, 3))
    return Style(background=background, palette=palette, noise=float(rng.uniform(4, 20)))


def _shape_masks(kind, cx, cy, r, yy, xx):
    """Boolean masks [N, H, W] of shapes of class `kind` [N] centred at (cx, cy), radius r."""
    dx = xx[None] - cx[:, None, None]
    dy = yy[None] - cy[:, None, None]
    rr = r[:, None, None]
    dist = np.sqrt(dx**2 + dy**2)
    masks = np.stack(
        [
            dist <= rr,
            np.maximum(np.abs(dx), np.abs(dy)) <= rr * 0.85,
            (dy <= rr * 0.75) & (dy >= -rr + 1.75 * np.abs(dx)),
            ((np.abs(dx) <= rr * 0.3) & (np.abs(dy) <= rr))
            | ((np.abs(dy) <= rr * 0.3) & (np.abs(dx) <= rr)),
            np.abs(dx) + np.abs(dy) <= rr,
            (dist <= rr) & (dist >= rr * 0.55),
        ]
    )  # [kinds, N, H, W]
    return masks[kind, np.arange(len(kind))]


def _clear_centres(rng, r, size, placed):
    """Centres (cx, cy) [N] for shapes of radii r [N] clear of the `placed` ones, and whether
    each image found one within `_PLACEMENT_TRIES` tries."""
    n = len(r)
    low, high = r[:, None], size - r[:, None]
    cx = rng.uniform(low, high, (n, _PLACEMENT_TRIES))
    cy = rng.uniform(low, high, (n, _PLACEMENT_TRIES))
    clear = np.ones((n, _PLACEMENT_TRIES), bool)
    for px, py, pr, present in placed:
        gap = np.hypot(cx - px[:, None], cy - py[:, None]) - _REACH * (r + pr)[:, None]
        clear &= (gap >= 1.0) | ~present[:, None]
    first = np.argmax(clear, axis=1)
    rows = np.arange(n)
    return cx[rows, first], cy[rows, first], clear.any(axis=1)


def render(
    labels: np.ndarray,
    style_ids: np.ndarray,
    *,
    seed: int,
    image_size: int = 28,
    num_classes: int = 4,
    max_shapes: int = 1,
    overlap: bool = True,
) -> ShapesImages:
    """Renders one image per label: the label's shape first, then up to `max_shapes - 1`
    extra shapes of random classes. `style_ids[i]` picks image i's style.

    With `overlap=False` no shape touches another (for boxes that each frame one whole
    shape): a shape goes to the first of `_PLACEMENT_TRIES` random centres at least a pixel
    clear of the shapes before it, and is left out, with the slots after it, when none is.
    The default draws exactly the random numbers it always has, so existing data is unchanged.
    """
    labels = np.asarray(labels, np.int32)
    style_ids = np.asarray(style_ids)
    if not 1 <= num_classes <= len(SHAPE_NAMES):
        raise ValueError(
            f"data.num_classes={num_classes!r} is not allowed for shapes; "
            f"must be in [1, {len(SHAPE_NAMES)}]"
        )
    if image_size < 8:
        raise ValueError(f"data.image_size={image_size!r} is not allowed; must be >= 8")
    n, size = len(labels), image_size
    rng = np.random.default_rng([seed, 0xC0FFEE, n])
    styles = {s: make_style(seed, int(s)) for s in np.unique(style_ids)}
    background = np.stack([styles[int(s)].background for s in style_ids])
    noise = np.array([styles[int(s)].noise for s in style_ids])
    palettes = np.stack([styles[int(s)].palette for s in style_ids])

    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    images = np.broadcast_to(background[:, None, None, :], (n, size, size, 3)).copy()
    masks = np.zeros((n, size, size), np.uint8)
    boxes = np.zeros((n, max_shapes, 4), np.float32)
    box_classes = np.zeros((n, max_shapes), np.int32)
    count = np.ones(n, np.int64) if max_shapes == 1 else rng.integers(1, max_shapes + 1, n)
    placed = []  # (cx, cy, r, present) of the slots before
    for slot in range(max_shapes):
        kind = labels if slot == 0 else rng.integers(0, num_classes, n).astype(np.int32)
        r = (
            rng.uniform(0.18, 0.38, n) * size
            if max_shapes == 1
            else rng.uniform(0.1, 0.25, n) * size
        )
        if overlap:
            cx = rng.uniform(r, size - r)
            cy = rng.uniform(r, size - r)
        else:
            cx, cy, clear = _clear_centres(rng, r, size, placed)
            count = np.where((count > slot) & ~clear, slot, count)
        colour = palettes[np.arange(n), rng.integers(0, 3, n)] + rng.normal(0, 12, (n, 3))
        present = count > slot
        shape = _shape_masks(kind, cx, cy, r, yy, xx) & present[:, None, None]
        images = np.where(shape[..., None], colour[:, None, None, :], images)
        masks = np.where(shape, (kind + 1).astype(np.uint8)[:, None, None], masks)
        x_any, y_any = shape.any(axis=1), shape.any(axis=2)
        has = x_any.any(axis=1)
        x0 = np.argmax(x_any, axis=1)
        x1 = size - np.argmax(x_any[:, ::-1], axis=1)
        y0 = np.argmax(y_any, axis=1)
        y1 = size - np.argmax(y_any[:, ::-1], axis=1)
        boxes[:, slot] = np.where(has[:, None], np.stack([x0, y0, x1, y1], 1) / size, 0.0)
        box_classes[:, slot] = kind
        count = np.where(present & ~has, slot, count)  # a shape too small to draw is absent
        placed.append((cx, cy, r, count > slot))
    images = images + rng.normal(0, 1, images.shape) * noise[:, None, None, None]
    box_mask = np.arange(max_shapes)[None] < count[:, None]
    return ShapesImages(
        images=np.clip(images, 0, 255).astype(np.uint8),
        labels=labels,
        masks=masks,
        boxes=np.where(box_mask[..., None], boxes, 0.0),
        box_classes=np.where(box_mask, box_classes, 0),
        box_mask=box_mask,
    )
