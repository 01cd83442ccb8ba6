"""Data augmentation in numpy: images, boxes and class-index masks moved together.

Every random function takes an explicit `np.random.Generator`, so the input pipeline can seed
one per example from (seed, round, client, occurrence, position) and the result never depends
on which worker ran it or when.

Conventions (those of `fedjax_cv.data.sources`, which the pipeline carries):
- image: uint8 [..., H, W, C]; functions named for images also take a batch of them.
- boxes: float32 [N, 4] as (ymin, xmin, ymax, xmax) normalised to [0, 1] by the image height
  and width (tfds' BBoxFeature). `fedjax_cv.data.shapes` renders (x0, y0, x1, y1): convert it
  with `xyxy_to_yxyx` before it enters a pipeline. `box_mask` [N] marks real boxes; a box that a
  transform pushes out of the image is dropped by clearing its mask.
- mask: uint8 [H, W] of class ids, `IGNORE_LABEL` (255) where no loss applies; it is resized
  by nearest neighbour and filled with the ignore label where a transform invents pixels.
- letterbox: float32 [5] = (scale, offset_y, offset_x, height, width), added by a letterbox or
  a mosaic: pixel coordinate p of the original height x width image lands at p * scale +
  offset (`original_boxes` maps boxes back); it stacks into [B, 5] like any other key.

Detection (the "detection" preset) follows YOLOv5's training inputs: `letterbox_example`,
`mosaic_example` (whose three other images the pipeline draws from the same client's
examples), a random scale and shift in the same resampling, `random_hsv`, flips; boxes a cut
leaves too small are dropped by YOLOv5's `box_candidates` rule.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from PIL import Image

from fedjax_cv.data.sources import IGNORE_LABEL

Example = dict[str, Any]
CROP_MODES = ("reflect", "zero")
# Keys that hold one entry per box: they are dropped, truncated and padded with the boxes.
PER_BOX_KEYS = ("box_labels", "box_classes", "difficult")


# --------------------------------------------------------------------------- boxes


def xyxy_to_yxyx(boxes: np.ndarray) -> np.ndarray:
    """(x0, y0, x1, y1) of `fedjax_cv.data.shapes` -> (ymin, xmin, ymax, xmax) of the pipeline."""
    return np.asarray(boxes)[..., [1, 0, 3, 2]]


def yxyx_to_xyxy(boxes: np.ndarray) -> np.ndarray:
    """(ymin, xmin, ymax, xmax) -> (x0, y0, x1, y1); the same swap, named for the reader."""
    return np.asarray(boxes)[..., [1, 0, 3, 2]]


def flip_boxes(boxes: np.ndarray) -> np.ndarray:
    """Normalised yxyx boxes mirrored left-right: x -> 1 - x, so xmin and xmax swap roles."""
    ymin, xmin, ymax, xmax = np.moveaxis(np.asarray(boxes, np.float32), -1, 0)
    return np.stack([ymin, 1.0 - xmax, ymax, 1.0 - xmin], axis=-1)


def affine_boxes(
    boxes: np.ndarray, box_mask: np.ndarray, scale: tuple[float, float], shift: tuple[float, float]
) -> tuple[np.ndarray, np.ndarray]:
    """Maps normalised yxyx boxes by y -> y * scale[0] + shift[0] (x likewise), clips them to
    the image and drops (clears the mask of) boxes left with no area."""
    factor = np.array([scale[0], scale[1], scale[0], scale[1]], np.float32)
    offset = np.array([shift[0], shift[1], shift[0], shift[1]], np.float32)
    moved = np.clip(np.asarray(boxes, np.float32) * factor + offset, 0.0, 1.0)
    has_area = (moved[..., 2] > moved[..., 0]) & (moved[..., 3] > moved[..., 1])
    keep = np.asarray(box_mask, bool) & has_area
    return np.where(keep[..., None], moved, 0.0).astype(np.float32), keep


def pad_boxes(
    example: Example, max_boxes: int, per_box_keys: tuple[str, ...] = PER_BOX_KEYS
) -> Example:
    """Real boxes first, truncated or zero-padded to `max_boxes`, with a bool `box_mask`, so
    that examples with different box counts stack into one batch."""
    boxes = np.asarray(example["boxes"], np.float32).reshape(-1, 4)
    box_mask = np.asarray(example.get("box_mask", np.ones(len(boxes), bool)), bool)
    kept = np.flatnonzero(box_mask)[:max_boxes]
    out = dict(example)
    for key in ("boxes", *(k for k in per_box_keys if k in example)):
        values = np.asarray(example[key])
        padded = np.zeros((max_boxes,) + values.shape[1:], values.dtype)
        padded[: len(kept)] = values[kept]
        out[key] = padded
    out["box_mask"] = np.arange(max_boxes) < len(kept)
    return out


# --------------------------------------------------------------------------- pixels


def flip_images(images: np.ndarray) -> np.ndarray:
    """Mirrors [..., H, W, C] images left-right."""
    return images[..., ::-1, :]


def to_channels(images: np.ndarray, channels: int) -> np.ndarray:
    """[..., H, W, 1] grayscale images repeated to `channels`; others must already have them."""
    if images.shape[-1] == channels:
        return images
    if images.shape[-1] != 1:
        raise ValueError(
            f"image has {images.shape[-1]} channels; data.augmentation.channels={channels} "
            "converts only 1-channel (grayscale) images"
        )
    return np.repeat(images, channels, axis=-1)


def _reflect(index: np.ndarray, size: int) -> np.ndarray:
    """Out-of-range indices mirrored about the edge pixels (numpy's "reflect" padding)."""
    if size == 1:
        return np.zeros_like(index)
    period = 2 * (size - 1)
    index = np.abs(index) % period
    return np.where(index >= size, period - index, index)


def crop_with_padding(
    images: np.ndarray,
    top: np.ndarray | int,
    left: np.ndarray | int,
    padding: int,
    mode: str = "zero",
    fill: int = 0,
) -> np.ndarray:
    """Pads [..., H, W, C] images by `padding` on every side (zeros, or `fill`, or a mirror
    image) and crops H x W back, starting at (top, left) of the padded image; one offset per
    image, shape [...].

    Slices and gathers instead of calling `np.pad`, which alone costs more than the whole crop
    of a 32x32 image.
    """
    if mode not in CROP_MODES:
        raise ValueError(f"crop mode {mode!r} is not allowed; must be one of {CROP_MODES}")
    height, width = images.shape[-3:-1]
    if images.ndim == 3 and mode == "zero":
        return place(images, (height, width), padding - int(top), padding - int(left), fill)
    rows = np.asarray(top)[..., None] - padding + np.arange(height)  # [..., H]
    cols = np.asarray(left)[..., None] - padding + np.arange(width)  # [..., W]
    if mode == "reflect":
        rows, cols = _reflect(rows, height), _reflect(cols, width)
        if images.ndim == 3:
            return np.take(np.take(images, rows, axis=0), cols, axis=1)
        inside = None
    else:
        row_inside, col_inside = (rows >= 0) & (rows < height), (cols >= 0) & (cols < width)
        inside = row_inside[..., :, None, None] & col_inside[..., None, :, None]
        rows, cols = np.clip(rows, 0, height - 1), np.clip(cols, 0, width - 1)
    batch = images.shape[:-3]
    flat = images.reshape((-1, height, width, images.shape[-1]))
    rows, cols = rows.reshape(-1, height), cols.reshape(-1, width)
    out = flat[np.arange(len(flat))[:, None, None], rows[:, :, None], cols[:, None, :]]
    out = out.reshape(batch + out.shape[1:])
    return out if inside is None else np.where(inside, out, np.asarray(fill, images.dtype))


_WEIGHT_ONE = 256  # fixed-point 1.0 of the uint8 bilinear weights


def _resize_axis(array: np.ndarray, size: int, axis: int, nearest: bool) -> np.ndarray:
    """Resamples one axis with half-pixel centres (the convention of PIL and jax.image).

    uint8 stays uint8 between the two passes and blends in 8-bit fixed point, as PIL does:
    three to four times faster than float32 on a 640x480 photo, at most one level off.
    """
    length = array.shape[axis]
    if length == size:
        return array
    return _sample_axis(array, (np.arange(size) + 0.5) * (length / size), axis, nearest)


def _sample_axis(array: np.ndarray, position: np.ndarray, axis: int, nearest: bool) -> np.ndarray:
    """`array` read along `axis` at continuous coordinates `position` (pixel i spans [i, i + 1)):
    the pixel holding each position, or bilinear between pixel centres, clamped at the ends."""
    length = array.shape[axis]
    if nearest:
        return np.take(array, np.clip(position.astype(np.int64), 0, length - 1), axis=axis)
    source = np.clip(position - 0.5, 0.0, length - 1)
    lower = source.astype(np.int64)
    upper = np.minimum(lower + 1, length - 1)
    shape = [1] * array.ndim
    shape[axis] = len(position)
    weight = (source - lower).reshape(shape)
    if array.dtype == np.uint8:
        fixed = np.rint(weight * _WEIGHT_ONE).astype(np.uint16)
        below = np.take(array, lower, axis=axis).astype(np.uint16)
        above = np.take(array, upper, axis=axis).astype(np.uint16)
        blend = below * (_WEIGHT_ONE - fixed) + above * fixed + _WEIGHT_ONE // 2
        return (blend >> 8).astype(np.uint8)
    below = np.take(array, lower, axis=axis).astype(np.float32)
    above = np.take(array, upper, axis=axis).astype(np.float32)
    out = below + (above - below) * weight.astype(np.float32)
    return (np.rint(out) if np.issubdtype(array.dtype, np.integer) else out).astype(array.dtype)


def resize_images(images: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of [..., H, W, C] images to `size` (height, width), same dtype."""
    height, width = images.shape[-3:-1]
    # The axis that shrinks most first, so the second pass reads the smaller intermediate.
    order = (-3, -2) if size[0] / height <= size[1] / width else (-2, -3)
    out = images
    for axis in order:
        out = _resize_axis(out, size[axis + 3], out.ndim + axis, nearest=False)
    return out


def resize_masks(masks: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize of [..., H, W] class-id masks: no label is ever invented."""
    out = _resize_axis(masks, size[0], masks.ndim - 2, nearest=True)
    return _resize_axis(out, size[1], masks.ndim - 1, nearest=True)


def place(
    image: np.ndarray, size: tuple[int, int], top: int, left: int, fill: int = 0
) -> np.ndarray:
    """An H x W canvas of `fill` with `image` [h, w, ...] pasted at (top, left), which may be
    negative or overhang: the part outside the canvas is cut off."""
    canvas = np.full(tuple(size) + image.shape[2:], fill, image.dtype)
    y0, x0 = max(top, 0), max(left, 0)
    y1, x1 = min(top + image.shape[0], size[0]), min(left + image.shape[1], size[1])
    if y1 > y0 and x1 > x0:
        canvas[y0:y1, x0:x1] = image[y0 - top : y1 - top, x0 - left : x1 - left]
    return canvas


# --------------------------------------------------------------------------- random, per image


def random_flip(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Mirrors each of [..., H, W, C] images left-right with probability 1/2."""
    flips = rng.random(images.shape[:-3]) < 0.5
    return np.where(np.asarray(flips)[..., None, None, None], flip_images(images), images)


def random_crop(
    images: np.ndarray, rng: np.random.Generator, padding: int = 4, mode: str = "zero"
) -> np.ndarray:
    """Pad by `padding`, crop the original size at a random place (CIFAR: pad 4, crop 32); one
    offset per image of [..., H, W, C]."""
    offsets = rng.integers(0, 2 * padding + 1, size=images.shape[:-3] + (2,))
    return crop_with_padding(images, offsets[..., 0], offsets[..., 1], padding, mode)


def _draw_offsets(rng: np.random.Generator, low: np.ndarray, high: np.ndarray) -> np.ndarray:
    """Uniform integers in [low, high], elementwise. One `rng.random` call costs a tenth of an
    `rng.integers` call, which counts at one call per example."""
    low, high = np.asarray(low), np.asarray(high)
    return low + (rng.random(low.shape) * (high - low + 1)).astype(np.int64)


def _scaled_placement(
    rng: np.random.Generator, size: tuple[int, int], scale_range: tuple[float, float]
) -> tuple[tuple[int, int], int, int]:
    factor = rng.uniform(*scale_range)
    scaled = (max(1, round(size[0] * factor)), max(1, round(size[1] * factor)))
    # Larger: a random window of the scaled image; smaller: a random spot on the canvas.
    low = np.minimum(0, np.subtract(size, scaled))
    high = np.maximum(0, np.subtract(size, scaled))
    top, left = (int(v) for v in _draw_offsets(rng, low, high))
    return scaled, top, left


def random_scale(
    images: np.ndarray, rng: np.random.Generator, scale_range: tuple[float, float] = (0.8, 1.2)
) -> np.ndarray:
    """Resize each image by a factor ~ U(scale_range), then crop (if larger) or zero-pad (if
    smaller) back to its size at a random place."""
    if images.ndim > 3:
        flat = images.reshape((-1,) + images.shape[-3:])
        return np.stack([random_scale(image, rng, scale_range) for image in flat]).reshape(
            images.shape
        )
    size = images.shape[:2]
    scaled, top, left = _scaled_placement(rng, size, scale_range)
    return place(resize_images(images, scaled), size, top, left)


def normalize(images: np.ndarray) -> np.ndarray:
    """uint8 -> float32 with mean = std = 0.5 per channel (FedCV: no client knows the
    population statistics); `fedjax_cv.data.cohort.normalize_images`."""
    # Imported here: cohort.py imports JAX, which this numpy module has no other use for.
    from fedjax_cv.data.cohort import normalize_images

    return normalize_images(images)


# --------------------------------------------------------------------------- whole examples


def flip_example(example: Example) -> Example:
    """Mirrors the image, and the mask and boxes when present, left-right."""
    out = dict(example)
    out["image"] = flip_images(example["image"])
    if "mask" in example:
        out["mask"] = np.asarray(example["mask"])[..., ::-1]
    if "boxes" in example:
        # Padding boxes stay all-zero rather than becoming (0, 1, 0, 1).
        out["boxes"] = np.where(_box_mask(example)[:, None], flip_boxes(example["boxes"]), 0.0)
    return out


def _box_mask(example: Example) -> np.ndarray:
    return np.asarray(example.get("box_mask", np.ones(len(example["boxes"]), bool)), bool)


def resize_example(example: Example, size: tuple[int, int]) -> Example:
    """Stretches the image (bilinear) and mask (nearest) to `size`; normalised boxes are
    unchanged by a stretch, so they need no work."""
    out = dict(example)
    out["image"] = resize_images(example["image"], size)
    if "mask" in example:
        out["mask"] = resize_masks(np.asarray(example["mask"]), size)
    return out


def scale_example(
    example: Example,
    scaled: tuple[int, int],
    top: int,
    left: int,
    size: tuple[int, int] | None = None,
) -> Example:
    """Resizes the example to `scaled` (height, width) and pastes it at (top, left) of a canvas
    of `size` (default: its own size): image padded with 0, mask with the ignore label, boxes
    moved."""
    out = dict(example)
    image = example["image"]
    size = tuple(size or image.shape[:2])
    out["image"] = place(resize_images(image, scaled), size, top, left)
    if "mask" in example:
        mask = resize_masks(np.asarray(example["mask"]), scaled)
        out["mask"] = place(mask, size, top, left, fill=IGNORE_LABEL)
    if "boxes" in example:
        out["boxes"], out["box_mask"] = affine_boxes(
            example["boxes"],
            _box_mask(example),
            (scaled[0] / size[0], scaled[1] / size[1]),
            (top / size[0], left / size[1]),
        )
    return out


def crop_example(example: Example, top: int, left: int, padding: int, mode: str) -> Example:
    """`crop_with_padding` of the image, and of the mask (ignore label where zero-padded) and
    boxes when present. Reflected borders copy pixels and mask labels but not boxes."""
    out = dict(example)
    image = example["image"]
    out["image"] = crop_with_padding(image, top, left, padding, mode)
    if "mask" in example:
        mask = np.asarray(example["mask"])[..., None]
        out["mask"] = crop_with_padding(mask, top, left, padding, mode, IGNORE_LABEL)[..., 0]
    if "boxes" in example:
        height, width = image.shape[:2]
        out["boxes"], out["box_mask"] = affine_boxes(
            example["boxes"],
            _box_mask(example),
            (1.0, 1.0),
            ((padding - top) / height, (padding - left) / width),
        )
    return out


# --------------------------------------------------------------------------- detection

LETTERBOX_STRIDE = 32  # letterboxed sides are multiples of the coarsest stride of a YOLO head
LETTERBOX_FILL = 114  # YOLOv5's grey, for the pixels a letterbox or a mosaic invents
# YOLOv5's `box_candidates` (utils/augmentations.py), the rule for boxes that a mosaic or the
# random affine cuts: a box stays when, in output pixels, both its sides exceed MIN_BOX_SIDE,
# it keeps more than MIN_AREA_FRACTION of its area before the cut (at the new scale), and
# max(w / h, h / w) < MAX_ASPECT_RATIO.
MIN_BOX_SIDE = 2.0
MIN_AREA_FRACTION = 0.1
MAX_ASPECT_RATIO = 100.0
_EPS = 1e-16
# Keys a mosaic builds from its four examples; the others are the anchor example's.
_MOSAIC_KEYS = ("image", "mask", "boxes", "box_mask", "letterbox")


def letterbox_params(shape: tuple[int, ...], size: tuple[int, int]) -> tuple[float, int, int]:
    """(scale, pad_top, pad_left) that fit an image of `shape` (height, width, ...) into `size`
    keeping its aspect ratio, centred: YOLOv5's letterbox without `auto` (which pads only to a
    multiple of the stride). An odd pixel of padding goes to the bottom or the right."""
    height, width = shape[:2]
    scale = min(size[0] / height, size[1] / width)
    top = (size[0] - round(height * scale)) // 2
    left = (size[1] - round(width * scale)) // 2
    return scale, top, left


def _window(
    length: int, scale: float, offset: float, source_length: int, low: float, high: float
) -> tuple[int, int, np.ndarray]:
    """Output pixels [start, stop) of one axis whose centres show the source (at a source
    coordinate in [0, source_length)) and lie in [low, high); their source coordinates."""
    centres = np.arange(length) + 0.5
    source = (centres - offset) / scale
    shown = (source >= 0) & (source < source_length) & (centres >= low) & (centres < high)
    inside = np.flatnonzero(shown)
    if len(inside) == 0:
        return 0, 0, source[:0]
    start, stop = int(inside[0]), int(inside[-1]) + 1
    return start, stop, source[start:stop]


def warp_into(
    canvas: np.ndarray,
    image: np.ndarray,
    scale: float,
    offset: tuple[float, float],
    window: tuple[float, float, float, float] | None = None,
    nearest: bool = False,
) -> np.ndarray:
    """Paints `image` [h, w, ...] onto `canvas` [H, W, ...] in place, scaled by `scale` and
    moved by `offset` (y, x): pixel coordinate p of the image lands at p * scale + offset of
    the canvas. Only canvas pixels whose centres fall on the image, and inside `window`
    (y0, x0, y1, x1) when given, change. Bilinear without anti-aliasing (cv2.warpAffine's
    INTER_LINEAR, which YOLOv5 uses), or nearest neighbour for class-id masks."""
    height, width = canvas.shape[:2]
    y0, x0, y1, x1 = (0, 0, height, width) if window is None else window
    top, bottom, rows = _window(height, scale, offset[0], image.shape[0], y0, y1)
    left, right, cols = _window(width, scale, offset[1], image.shape[1], x0, x1)
    if bottom > top and right > left:
        part = _sample_axis(image, rows, 0, nearest)
        canvas[top:bottom, left:right] = _sample_axis(part, cols, 1, nearest)
    return canvas


def _pixel_boxes(example: Example, scale: float, offset: tuple[float, float]) -> np.ndarray:
    """The example's boxes [N, 4] in pixels of its image, moved by p -> p * scale + offset."""
    height, width = example["image"].shape[:2]
    boxes = np.asarray(example["boxes"], np.float64).reshape(-1, 4)
    return boxes * np.array([height, width, height, width]) * scale + np.tile(offset, 2)


def _clip_boxes(boxes: np.ndarray, y0: float, x0: float, y1: float, x1: float) -> np.ndarray:
    return np.clip(boxes, [y0, x0, y0, x0], [y1, x1, y1, x1])


def box_candidates(before: np.ndarray, after: np.ndarray) -> np.ndarray:
    """Which pixel boxes [N, 4] (ymin, xmin, ymax, xmax) a cut leaves worth keeping, by
    YOLOv5's rule (MIN_BOX_SIDE, MIN_AREA_FRACTION, MAX_ASPECT_RATIO): `before` at the new
    scale but uncut, `after` cut."""
    h1, w1 = before[:, 2] - before[:, 0], before[:, 3] - before[:, 1]
    h2, w2 = after[:, 2] - after[:, 0], after[:, 3] - after[:, 1]
    aspect = np.maximum(w2 / (h2 + _EPS), h2 / (w2 + _EPS))
    return (
        (w2 > MIN_BOX_SIDE)
        & (h2 > MIN_BOX_SIDE)
        & (w2 * h2 / (w1 * h1 + _EPS) > MIN_AREA_FRACTION)
        & (aspect < MAX_ASPECT_RATIO)
    )


def _kept_boxes(
    before: np.ndarray, box_mask: np.ndarray, size: tuple[int, int], cut_rule: bool
) -> tuple[np.ndarray, np.ndarray]:
    """Pixel boxes clipped to a canvas of `size` and normalised by it, and which stay: those
    with area left, or with `cut_rule` those `box_candidates` keeps."""
    after = _clip_boxes(before, 0, 0, size[0], size[1])
    if cut_rule:
        keep = box_candidates(before, after)
    else:
        keep = (after[:, 2] > after[:, 0]) & (after[:, 3] > after[:, 1])
    keep &= np.asarray(box_mask, bool)
    boxes = after / np.array([size[0], size[1], size[0], size[1]])
    return np.where(keep[:, None], boxes, 0.0).astype(np.float32), keep


def letterbox_example(
    example: Example,
    size: tuple[int, int],
    fill: int = LETTERBOX_FILL,
    scale: float = 1.0,
    shift: tuple[float, float] = (0.0, 0.0),
    cut_rule: bool = False,
) -> Example:
    """Fits the example into `size` (height, width) keeping its aspect ratio, centred on a
    canvas of `fill` (YOLOv5's letterbox); then scales it by `scale` about the canvas centre
    and shifts it by `shift` pixels (YOLOv5's random affine without rotation, shear or
    perspective; 1 and (0, 0) for evaluation), in one resampling.

    A mask follows by nearest neighbour, the ignore label where invented. Boxes move with the
    pixels, are clipped to the canvas and dropped when no area is left, or with `cut_rule` by
    `box_candidates`. `letterbox`, float32 [5] = (scale, offset_y, offset_x, height, width),
    records the map: pixel coordinate p of the original height x width image lands at
    p * scale + offset (`original_boxes` inverts it). Flips that follow are not recorded.
    """
    fit, top, left = letterbox_params(example["image"].shape, size)
    centre = (size[0] / 2, size[1] / 2)
    offset = tuple(
        (pad - middle) * scale + middle + move
        for pad, middle, move in zip((top, left), centre, shift, strict=True)
    )
    return _placed_example(example, fit * scale, offset, size, fill, cut_rule)


def _placed_example(
    example: Example,
    scale: float,
    offset: tuple[float, float],
    size: tuple[int, int],
    fill: int,
    cut_rule: bool,
) -> Example:
    out = dict(example)
    image = example["image"]
    canvas = np.full(tuple(size) + image.shape[2:], fill, image.dtype)
    out["image"] = warp_into(canvas, image, scale, offset)
    if "mask" in example:
        mask = np.asarray(example["mask"])
        canvas = np.full(tuple(size), IGNORE_LABEL, mask.dtype)
        out["mask"] = warp_into(canvas, mask, scale, offset, nearest=True)
    if "boxes" in example:
        before = _pixel_boxes(example, scale, offset)
        out["boxes"], out["box_mask"] = _kept_boxes(before, _box_mask(example), size, cut_rule)
    height, width = image.shape[:2]
    out["letterbox"] = np.array([scale, offset[0], offset[1], height, width], np.float32)
    return out


def mosaic_example(
    examples: Sequence[Example],
    size: tuple[int, int],
    centre: tuple[float, float],
    scale: float = 1.0,
    shift: tuple[float, float] = (0.0, 0.0),
    fill: int = LETTERBOX_FILL,
    per_box_keys: tuple[str, ...] = PER_BOX_KEYS,
) -> Example:
    """YOLOv5's 4-image mosaic, in one resampling per image.

    Each of the four examples is fitted into `size` (H, W) keeping its aspect ratio and put on
    a 2H x 2W canvas of `fill` with one corner at `centre` (y, x): the first above and left of
    it, the second above and right, the third below and left, the fourth below and right, so
    that none overlaps another and only the canvas edge cuts them. The output, of `size`, is
    the canvas scaled by `scale` about its centre and shifted by `shift` pixels: canvas point
    c lands at (c - (H, W)) * scale + (H / 2, W / 2) + shift.

    Boxes go with their pixels, clipped to the canvas, then to the output, and kept by
    `box_candidates` (against the canvas-clipped box, as YOLOv5); per-box keys follow their
    boxes, masks their pixels. Other keys are the first example's. `letterbox` is the
    identity of the output, (1, 0, 0, H, W): a mosaic has no single original image.
    """
    if len(examples) != 4:
        raise ValueError(f"a mosaic takes 4 examples; got {len(examples)}")
    height, width = size
    # Where canvas point (0, 0) lands, and the canvas's extent in the output.
    base = (height / 2 + shift[0] - height * scale, width / 2 + shift[1] - width * scale)
    window = (base[0], base[1], base[0] + 2 * height * scale, base[1] + 2 * width * scale)
    first = examples[0]
    image = first["image"]
    out = dict(first)
    out["image"] = np.full((height, width) + image.shape[2:], fill, image.dtype)
    if "mask" in first:
        out["mask"] = np.full((height, width), IGNORE_LABEL, np.asarray(first["mask"]).dtype)
    boxes, keeps = [], []
    box_keys = [key for key in per_box_keys if key in first]
    per_box = {key: [] for key in box_keys}
    for quadrant, example in enumerate(examples):
        fit, _, _ = letterbox_params(example["image"].shape, size)
        extent = np.asarray(example["image"].shape[:2]) * fit
        corner = (
            centre[0] - extent[0] if quadrant < 2 else centre[0],
            centre[1] - extent[1] if quadrant % 2 == 0 else centre[1],
        )
        offset = (base[0] + corner[0] * scale, base[1] + corner[1] * scale)
        warp_into(out["image"], example["image"], fit * scale, offset, window)
        if "mask" in out:
            mask = np.asarray(example["mask"])
            warp_into(out["mask"], mask, fit * scale, offset, window, nearest=True)
        if "boxes" in first:
            on_canvas = _clip_boxes(_pixel_boxes(example, fit, corner), 0, 0, 2 * height, 2 * width)
            before = on_canvas * scale + np.tile(base, 2)
            moved, keep = _kept_boxes(before, _box_mask(example), size, cut_rule=True)
            boxes.append(moved)
            keeps.append(keep)
            for key in box_keys:
                per_box[key].append(np.asarray(example[key]))
    if "boxes" in first:
        out["boxes"] = np.concatenate(boxes).reshape(-1, 4)
        out["box_mask"] = np.concatenate(keeps)
        for key in box_keys:
            out[key] = np.concatenate(per_box[key])
    out["letterbox"] = np.array([1.0, 0.0, 0.0, height, width], np.float32)
    return out


def original_boxes(boxes: np.ndarray, letterbox: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Pixel (ymin, xmin, ymax, xmax) boxes on the original image of normalised boxes
    [..., N, 4] of a letterboxed example of `size` (height, width), or a batch of them
    (`letterbox` [..., 5]): the inverse of the map `letterbox` records, clipped to the
    original image. float32."""
    record = np.asarray(letterbox, np.float64)[..., None, :]  # [..., 1, 5]
    scale, offset_y, offset_x, height, width = (record[..., i] for i in range(5))
    pixels = np.asarray(boxes, np.float64) * np.array([size[0], size[1], size[0], size[1]])
    ys = [np.clip((pixels[..., i] - offset_y) / scale, 0, height) for i in (0, 2)]
    xs = [np.clip((pixels[..., i] - offset_x) / scale, 0, width) for i in (1, 3)]
    return np.stack([ys[0], xs[0], ys[1], xs[1]], axis=-1).astype(np.float32)


def hsv_gains(image: np.ndarray, gains: tuple[float, float, float]) -> np.ndarray:
    """A uint8 RGB image [H, W, 3] with hue, saturation and value multiplied by `gains`, as
    YOLOv5's augment_hsv: hue wraps around the colour circle, saturation and value clip at
    255 (PIL's conversion, hue in 256 steps). A one-channel image is grey: only value applies."""
    if image.dtype != np.uint8:
        raise ValueError(f"HSV jitter needs uint8 images; got {image.dtype}")
    levels = np.arange(256, dtype=np.float64)
    hue = np.mod(levels * gains[0], 256)
    saturation, value = (np.clip(levels * gain, 0, 255) for gain in gains[1:])
    if image.shape[-1] == 1:
        return value.astype(np.uint8)[image]
    if image.shape[-1] != 3:
        raise ValueError(f"HSV jitter needs 1 or 3 channels; got {image.shape[-1]}")
    lookup = np.stack([hue, saturation, value], axis=-1).astype(np.uint8)  # [256, 3]
    hsv = np.asarray(Image.fromarray(image, "RGB").convert("HSV"))
    hsv = np.take_along_axis(lookup, hsv.reshape(-1, 3).astype(np.int64), axis=0)
    return np.asarray(Image.fromarray(hsv.reshape(image.shape), "HSV").convert("RGB"))


def random_hsv(
    image: np.ndarray, rng: np.random.Generator, gains: tuple[float, float, float]
) -> np.ndarray:
    """`hsv_gains` by factors 1 + U(-g, g) for the gains g (h, s, v), as YOLOv5 draws them."""
    return hsv_gains(image, tuple(rng.uniform(-1.0, 1.0, 3) * np.asarray(gains) + 1.0))


# --------------------------------------------------------------------------- configuration


@dataclasses.dataclass(frozen=True)
class Augmentation:
    """Which transforms an example goes through, in this order: grayscale to `channels`;
    geometry: a letterbox or mosaic (below), else resize to `image_size` or random scale;
    random crop with padding; HSV jitter; random flip; boxes padded to `max_boxes`. The
    default does nothing.

    With `letterbox` (YOLOv5's input geometry), images fit `image_size` (multiples of 32)
    keeping their aspect ratio, padded with `fill`, and every example records the map in
    `letterbox` (see `letterbox_example`). With probability `mosaic` an example instead
    becomes a 4-image mosaic of itself and three examples drawn from `pool`, the
    example's client's own examples (see `mosaic_example`; without a pool, itself four
    times). Either way, a random scale U(scale_range) about the centre and a random shift up
    to `translate` of the size follow in the same resampling, and boxes cut by them are kept
    or dropped by YOLOv5's rule (`box_candidates`).
    """

    name: str = "custom"
    image_size: tuple[int, int] | None = None  # (height, width); needed for images of mixed size
    channels: int | None = None  # grayscale images repeated to this many (3 for mixed folders)
    scale_range: tuple[float, float] | None = None  # resize factor ~ U(low, high), then crop/pad
    crop_padding: int = 0  # > 0: pad by this much and crop the original size back
    crop_mode: str = "zero"  # one of CROP_MODES
    flip: bool = False  # mirror left-right with probability 1/2
    max_boxes: int | None = None  # > 0: pad or truncate boxes to this many, with box_mask
    per_box_keys: tuple[str, ...] = PER_BOX_KEYS
    letterbox: bool = False  # fit image_size keeping the aspect ratio, pad with `fill`
    mosaic: float = 0.0  # probability of a 4-image mosaic (needs letterbox)
    translate: float = 0.0  # letterbox, mosaic: random shift up to this fraction of the size
    hsv: tuple[float, float, float] | None = None  # gains of HSV jitter (hue, saturation, value)
    fill: int = LETTERBOX_FILL  # value of the pixels a letterbox or a mosaic invents

    def __post_init__(self):
        def bad(field: str, allowed: str):
            value = getattr(self, field)
            return ValueError(
                f"data.augmentation.{field}={value!r} is not allowed; must be {allowed}"
            )

        if self.image_size is not None and (len(self.image_size) != 2 or min(self.image_size) < 1):
            raise bad("image_size", "None or (height, width) of positive integers")
        if self.scale_range is not None and not 0 < self.scale_range[0] <= self.scale_range[1]:
            raise bad("scale_range", "None or (low, high) with 0 < low <= high")
        if not isinstance(self.crop_padding, int) or self.crop_padding < 0:
            raise bad("crop_padding", "a non-negative integer")
        if self.crop_mode not in CROP_MODES:
            raise bad("crop_mode", f"one of {', '.join(CROP_MODES)}")
        if self.channels is not None and self.channels < 1:
            raise bad("channels", "None or a positive integer")
        if self.max_boxes is not None and self.max_boxes < 1:
            raise bad("max_boxes", "None or a positive integer")
        if self.letterbox and self.image_size is None:
            raise bad("letterbox", "False without image_size=(height, width)")
        if self.letterbox and any(side % LETTERBOX_STRIDE for side in self.image_size):
            raise bad(
                "image_size", f"(height, width) of multiples of {LETTERBOX_STRIDE} with letterbox"
            )
        if not _is_number(self.mosaic) or not 0 <= self.mosaic <= 1:
            raise bad("mosaic", "a probability in [0, 1]")
        if self.mosaic and not self.letterbox:
            raise bad("mosaic", "0 without letterbox=True")
        if not _is_number(self.translate) or not 0 <= self.translate <= 0.5:
            raise bad("translate", "a number in [0, 0.5]")
        if self.translate and not self.letterbox:
            raise bad("translate", "0 without letterbox=True")
        if self.hsv is not None and (
            len(self.hsv) != 3 or not all(_is_number(g) and 0 <= g <= 1 for g in self.hsv)
        ):
            raise bad("hsv", "None or (hue, saturation, value) gains in [0, 1]")
        if (
            isinstance(self.fill, bool)
            or not isinstance(self.fill, int)
            or not 0 <= self.fill <= 255
        ):
            raise bad("fill", "an integer in [0, 255]")

    def deterministic(self) -> Augmentation:
        """The same transforms without the random ones: what evaluation inputs go through."""
        return dataclasses.replace(
            self,
            scale_range=None,
            crop_padding=0,
            flip=False,
            mosaic=0.0,
            translate=0.0,
            hsv=None,
        )

    @property
    def is_identity(self) -> bool:
        """Whether examples pass through unchanged."""
        return not (self.is_random or self.image_size or self.channels or self.max_boxes)

    @property
    def is_random(self) -> bool:
        """Whether the transforms draw from a generator (else `rng` may be None)."""
        return bool(
            self.scale_range
            or self.crop_padding
            or self.flip
            or self.mosaic
            or self.translate
            or self.hsv is not None
        )

    def __call__(
        self,
        example: Example,
        rng: np.random.Generator | None,
        pool: Sequence[Example] | None = None,
    ) -> Example:
        """Transforms one example dict (image, and optionally mask, boxes, box_mask, ...).

        `pool`: examples a mosaic may draw its three others from (the client's own).
        """
        if self.channels is not None:
            example = {**example, "image": to_channels(example["image"], self.channels)}
        if self.letterbox:
            example = self._letterbox(example, rng, pool)
        elif self.scale_range is not None:
            size = self.image_size or example["image"].shape[:2]
            scaled, top, left = _scaled_placement(rng, size, self.scale_range)
            # Straight from the source to the scaled size: one resampling instead of two,
            # which is both sharper and half the work of resizing to image_size first.
            example = scale_example(example, scaled, top, left, size)
        elif self.image_size is not None:
            example = resize_example(example, self.image_size)
        if self.crop_padding:
            top, left = _draw_offsets(rng, np.zeros(2, np.int64), 2 * self.crop_padding)
            example = crop_example(example, top, left, self.crop_padding, self.crop_mode)
        if self.hsv is not None:
            example = {**example, "image": random_hsv(example["image"], rng, self.hsv)}
        if self.flip and rng.random() < 0.5:
            example = flip_example(example)
        if self.max_boxes is not None and "boxes" in example:
            example = pad_boxes(example, self.max_boxes, self.per_box_keys)
        return example

    def _letterbox(
        self, example: Example, rng: np.random.Generator | None, pool: Sequence[Example] | None
    ) -> Example:
        size = self.image_size
        if self.mosaic and rng.random() < self.mosaic:
            picks = rng.integers(0, len(pool), 3) if pool is not None and len(pool) else ()
            others = [pool[int(i)] for i in picks] or [example] * 3
            if self.channels is not None:
                others = [{**o, "image": to_channels(o["image"], self.channels)} for o in others]
            quadrants = [example, *others]
            order = rng.permutation(4)  # the example lands in any quadrant
            centre = tuple(rng.uniform(0.5, 1.5, 2) * size)  # YOLOv5's mosaic_border = -size/2
            scale, shift = self._random_affine(rng)
            out = mosaic_example(
                [quadrants[i] for i in order],
                size,
                centre,
                scale,
                shift,
                self.fill,
                self.per_box_keys,
            )
            out.update(
                {k: v for k, v in example.items() if k not in _MOSAIC_KEYS + self.per_box_keys}
            )
            return out
        scale, shift = self._random_affine(rng)
        cut = scale != 1.0 or shift != (0.0, 0.0)
        return letterbox_example(example, size, self.fill, scale, shift, cut_rule=cut)

    def _random_affine(self, rng: np.random.Generator | None) -> tuple[float, tuple[float, float]]:
        """Scale ~ U(scale_range) and shift ~ U(-translate, translate) * size (YOLOv5's
        random_perspective with degrees = shear = perspective = 0)."""
        scale = float(rng.uniform(*self.scale_range)) if self.scale_range else 1.0
        shift = (0.0, 0.0)
        if self.translate:
            shift = tuple(
                float(v)
                for v in rng.uniform(-1, 1, 2) * self.translate * np.asarray(self.image_size)
            )
        return scale, shift


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


AUGMENTATIONS: dict[str, Augmentation] = {
    "none": Augmentation("none"),
    # Pad 4 with zeros, crop 32, flip: the CIFAR recipe of He et al. (2016) that FL papers use.
    "cifar": Augmentation("cifar", crop_padding=4, crop_mode="zero", flip=True),
    "flip": Augmentation("flip", flip=True),
    # Scale jitter and flip: the usual geometry for detection and segmentation.
    "scale_flip": Augmentation("scale_flip", scale_range=(0.75, 1.25), flip=True),
    # DeepLab's training geometry (Chen et al. 2018), which FedCV trains segmentation with:
    # scale by U(0.5, 2.0), crop (larger) or pad (smaller; the mask with the ignore label) back
    # to image_size, flip. Set image_size for images of mixed sizes.
    "segmentation": Augmentation("segmentation", scale_range=(0.5, 2.0), flip=True),
    # YOLOv5's training inputs (hyp.scratch-low.yaml): letterbox to image_size (640 unless
    # set; multiples of 32) with grey 114, a mosaic of 4 of the client's images every time,
    # scale U(0.5, 1.5) and shift up to 10% about the centre, HSV gains (0.015, 0.7, 0.4),
    # left-right flip; boxes padded to 100. Evaluation: the letterbox alone.
    "detection": Augmentation(
        "detection",
        image_size=(640, 640),
        letterbox=True,
        mosaic=1.0,
        scale_range=(0.5, 1.5),
        translate=0.1,
        hsv=(0.015, 0.7, 0.4),
        flip=True,
        max_boxes=100,
    ),
}


def make_augmentation(name_or_config: str | Augmentation | Mapping[str, Any]) -> Augmentation:
    """An `Augmentation` from a preset name, a record, or a mapping / ConfigDict of fields
    (`name` picks the preset the other fields override)."""
    if isinstance(name_or_config, Augmentation):
        return name_or_config
    if isinstance(name_or_config, str):
        fields: dict[str, Any] = {"name": name_or_config}
    else:
        to_dict = getattr(name_or_config, "to_dict", None)
        fields = dict(to_dict() if to_dict else name_or_config)
    name = fields.pop("name", "none")
    if name not in AUGMENTATIONS:
        raise ValueError(
            f"data.augmentation={name!r} is unknown; known: {', '.join(sorted(AUGMENTATIONS))}"
        )
    known = {f.name for f in dataclasses.fields(Augmentation)} - {"name"}
    for key, value in fields.items():
        if key not in known:
            raise ValueError(
                f"data.augmentation.{key} is not a field; known: {', '.join(sorted(known))}"
            )
        if isinstance(value, list):
            fields[key] = tuple(value)
    return dataclasses.replace(AUGMENTATIONS[name], **fields)
