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
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import numpy as np

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
    centres = (np.arange(size) + 0.5) * (length / size)
    if nearest:
        return np.take(array, np.minimum(centres.astype(np.int64), length - 1), axis=axis)
    source = np.clip(centres - 0.5, 0.0, length - 1)
    lower = source.astype(np.int64)
    upper = np.minimum(lower + 1, length - 1)
    shape = [1] * array.ndim
    shape[axis] = size
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


# --------------------------------------------------------------------------- configuration


@dataclasses.dataclass(frozen=True)
class Augmentation:
    """Which transforms an example goes through, in this order: grayscale to `channels`,
    resize to `image_size`, random scale, random crop with padding, random flip, boxes padded
    to `max_boxes`. The default does nothing."""

    name: str = "custom"
    image_size: tuple[int, int] | None = None  # (height, width); needed for images of mixed size
    channels: int | None = None  # grayscale images repeated to this many (3 for mixed folders)
    scale_range: tuple[float, float] | None = None  # resize factor ~ U(low, high), then crop/pad
    crop_padding: int = 0  # > 0: pad by this much and crop the original size back
    crop_mode: str = "zero"  # one of CROP_MODES
    flip: bool = False  # mirror left-right with probability 1/2
    max_boxes: int | None = None  # > 0: pad or truncate boxes to this many, with box_mask
    per_box_keys: tuple[str, ...] = PER_BOX_KEYS

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

    def deterministic(self) -> Augmentation:
        """The same transforms without the random ones: what evaluation inputs go through."""
        return dataclasses.replace(self, scale_range=None, crop_padding=0, flip=False)

    @property
    def is_identity(self) -> bool:
        """Whether examples pass through unchanged."""
        return not (self.is_random or self.image_size or self.channels or self.max_boxes)

    @property
    def is_random(self) -> bool:
        """Whether the transforms draw from a generator (else `rng` may be None)."""
        return bool(self.scale_range or self.crop_padding or self.flip)

    def __call__(self, example: Example, rng: np.random.Generator | None) -> Example:
        """Transforms one example dict (image, and optionally mask, boxes, box_mask, ...)."""
        if self.channels is not None:
            example = {**example, "image": to_channels(example["image"], self.channels)}
        if self.scale_range is not None:
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
        if self.flip and rng.random() < 0.5:
            example = flip_example(example)
        if self.max_boxes is not None and "boxes" in example:
            example = pad_boxes(example, self.max_boxes, self.per_box_keys)
        return example


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
