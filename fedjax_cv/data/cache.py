"""Decode-once cache: encoded images in, one random-access uint8 store on disk out.

PIL spends 0.1-0.3 ms on even a 32x32 JPEG (mostly Python overhead), and a federated run reads
each example again in every round that samples its client, so every local source decodes its
files once into a cache entry and memory-maps it afterwards. An entry is a
folder named by a hash of everything that determines its bytes (source paths, sizes and
modification times, decode parameters, the format version): a changed file or parameter gives a
new entry instead of stale pixels. Entries are built in a temporary folder and renamed into place,
so a crash or a concurrent builder never leaves a half-written entry behind; inside
`all_or_nothing()`, a load that fails after some entries were built removes them again.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import contextvars
import dataclasses
import hashlib
import io
import itertools
import json
import multiprocessing
import os
import shutil
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

# Bump when the on-disk layout or the decoding rules change, so old entries are not reused.
FORMAT_VERSION = 1
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm")
_FORMAT_HINTS = {".jpg": ("JPEG",), ".jpeg": ("JPEG",), ".png": ("PNG",)}
_CHUNK = 512
# Below this many files a thread pool wins: a spawned process costs more than it saves, and
# large JPEGs decode in C with the GIL released.
_PROCESS_POOL_MIN_FILES = 2048


def default_cache_dir() -> Path:
    """`$FEDJAX_CV_CACHE`, else ~/.cache/fedjax_cv."""
    return Path(os.environ.get("FEDJAX_CV_CACHE", Path.home() / ".cache" / "fedjax_cv"))


def fingerprint(path: str | os.PathLike) -> dict[str, Any]:
    """What identifies a file's content cheaply: resolved path, size and mtime."""
    path = Path(path).resolve()
    stat = path.stat()
    return {"path": str(path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def files_digest(root: Path, relative_paths: Sequence[str]) -> str:
    """One hash over (name, size, mtime) of many files under `root`."""
    digest = hashlib.sha256()
    for name in relative_paths:
        stat = (root / name).stat()
        digest.update(f"{name}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def entry_dir(cache_dir: str | os.PathLike, kind: str, key: Mapping[str, Any]) -> Path:
    """The folder of the cache entry for `key`."""
    text = json.dumps({"format_version": FORMAT_VERSION, "kind": kind, **key}, sort_keys=True)
    return Path(cache_dir) / f"{kind}-{hashlib.sha256(text.encode()).hexdigest()[:24]}"


# What the innermost `all_or_nothing` block built: (path, is an entry; else a cache folder
# it made, removed only when left empty).
_BUILT: contextvars.ContextVar[list[tuple[Path, bool]] | None] = contextvars.ContextVar(
    "fedjax_cv_cache_built", default=None
)


@contextlib.contextmanager
def all_or_nothing() -> Iterator[None]:
    """Entries built inside the block are removed again when it raises: a dataset that fails
    to load (a damaged file in its test split, an image of another shape) writes nothing to
    the cache. Entries that already existed are kept; a nested block joins the outer one."""
    if _BUILT.get() is not None:
        yield
        return
    built: list[tuple[Path, bool]] = []
    token = _BUILT.set(built)
    try:
        yield
    except BaseException:
        for path, is_entry in reversed(built):
            if is_entry:
                shutil.rmtree(path, ignore_errors=True)
            else:
                with contextlib.suppress(OSError):
                    path.rmdir()
        raise
    finally:
        _BUILT.reset(token)


def get_or_build(
    cache_dir: str | os.PathLike | None,
    kind: str,
    key: Mapping[str, Any],
    build: Callable[[Path], None],
) -> Path:
    """Returns the entry folder for `key`, calling `build(folder)` to fill it if it is missing."""
    final = entry_dir(default_cache_dir() if cache_dir is None else cache_dir, kind, key)
    if final.is_dir():
        return final
    built = _BUILT.get()
    if built is not None:  # the cache folders about to be made, outermost first
        made = [p for p in (final.parent, *final.parent.parents) if not p.exists()]
        built.extend((p, False) for p in reversed(made))
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = final.with_name(f"{final.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    staging.mkdir()
    try:
        build(staging)
        (staging / "key.json").write_text(json.dumps({"kind": kind, **key}, sort_keys=True))
        try:
            staging.rename(final)
            if built is not None:
                built.append((final, True))
        except OSError:
            if not final.is_dir():  # not a lost race with another builder: a real failure
                raise
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return final


@dataclasses.dataclass(frozen=True, eq=False)
class ImageStore:
    """Random access to N uint8 HWC arrays of any shapes, kept in one flat buffer.

    `pixels` is usually a read-only memory map, so opening a store costs nothing and many
    processes share the page cache.
    """

    pixels: np.ndarray  # flat uint8
    offsets: np.ndarray  # int64 [N]
    shapes: np.ndarray  # int64 [N, 3] (height, width, channels)
    location: tuple[str, str] | None = None  # (folder, name) of the files it maps

    def __reduce__(self):
        # Pickle the location, not the pixels: grain's worker processes then map the same
        # files instead of each receiving a copy of the whole dataset.
        if self.location is not None:
            return ImageStore.open, (Path(self.location[0]), self.location[1])
        return ImageStore, (self.pixels, self.offsets, self.shapes)

    def __len__(self) -> int:
        return len(self.offsets)

    def __getitem__(self, index: int) -> np.ndarray:
        height, width, channels = (int(v) for v in self.shapes[index])
        start = int(self.offsets[index])
        size = height * width * channels
        view = self.pixels[start : start + size].reshape(height, width, channels)
        return view.view(np.ndarray)  # a plain read-only array, not an np.memmap

    @property
    def uniform_shape(self) -> tuple[int, int, int] | None:
        """The common (H, W, C) when every image has it, else None."""
        if len(self) == 0 or np.any(self.shapes != self.shapes[0]):
            return None
        return tuple(int(v) for v in self.shapes[0])

    def stacked(self) -> np.ndarray:
        """All images as one [N, H, W, C] view; needs a uniform shape and images in order."""
        shape = self.uniform_shape
        size = int(np.prod(shape)) if shape else 0
        if shape is None or np.any(self.offsets != np.arange(len(self)) * size):
            raise ValueError("images differ in shape; only a store of one shape can be stacked")
        return self.pixels[: len(self) * size].reshape(len(self), *shape).view(np.ndarray)

    @classmethod
    def open(cls, folder: Path, name: str = "images") -> ImageStore:
        index = np.load(folder / f"{name}.index.npz")
        offsets, shapes = index["offsets"], index["shapes"]
        if len(offsets) and (folder / f"{name}.bin").stat().st_size:
            pixels = np.memmap(folder / f"{name}.bin", dtype=np.uint8, mode="r")
        else:  # mmap refuses empty files
            pixels = np.zeros(0, np.uint8)
        return cls(pixels=pixels, offsets=offsets, shapes=shapes, location=(str(folder), name))


def write_store(folder: Path, arrays: Iterable[np.ndarray], name: str = "images") -> int:
    """Streams uint8 HWC arrays into `folder/<name>.bin` and its index; returns the count."""
    offsets, shapes, position = [], [], 0
    with open(folder / f"{name}.bin", "wb") as out:
        for array in arrays:
            out.write(np.ascontiguousarray(array, dtype=np.uint8).tobytes())
            offsets.append(position)
            shapes.append(array.shape)
            position += array.size
    np.savez(
        folder / f"{name}.index.npz",
        offsets=np.asarray(offsets, np.int64),
        shapes=np.asarray(shapes, np.int64).reshape(-1, 3),
    )
    return len(offsets)


@dataclasses.dataclass(frozen=True)
class DecodeSpec:
    """How to turn one encoded file into an array.

    mode: "image" gives HxWx1 for grayscale files and HxWx3 for all others (alpha dropped);
      "mask" keeps the raw 8-bit values of an L or P (palette index) PNG as HxWx1.
    size: optional (height, width) to resize to, bilinear for images and nearest for masks.
    """

    mode: str = "image"
    size: tuple[int, int] | None = None

    def as_key(self) -> dict[str, Any]:
        return {"mode": self.mode, "size": list(self.size) if self.size else None}


def decode(payload: bytes | None, name: str, spec: DecodeSpec) -> np.ndarray:
    """Decodes one file (`payload`, or the file at `name` when None) to uint8 HxWxC."""
    try:
        image = _open(payload, name)
        image.load()  # PIL decodes lazily; force it so a corrupt file fails here
    except FileNotFoundError:
        raise
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        raise ValueError(
            f"{name}: cannot decode image ({error}); must be a readable image file"
        ) from None
    with image:
        return _to_array(image, name, spec)


def _open(payload: bytes | None, name: str) -> Image.Image:
    source = io.BytesIO(payload) if payload is not None else name
    hint = _FORMAT_HINTS.get(os.path.splitext(name)[1].lower())
    if hint:
        # Naming the format skips PIL's trial of every plugin, which halves the cost of a
        # small image; a misnamed file falls through to full detection.
        try:
            return Image.open(source, formats=hint)
        except Image.UnidentifiedImageError:
            if payload is not None:
                source = io.BytesIO(payload)
    return Image.open(source)


def _to_array(image: Image.Image, name: str, spec: DecodeSpec) -> np.ndarray:
    if spec.mode == "mask":
        if image.mode not in ("L", "P"):
            raise ValueError(
                f"{name}: mask has PIL mode {image.mode!r}; must be an 8-bit single-channel "
                "PNG (mode 'L' or 'P')"
            )
        resample = Image.Resampling.NEAREST
    else:
        if image.mode in ("1", "L", "LA", "I;16", "I"):
            image = image.convert("L")
        elif image.mode != "RGB":
            image = image.convert("RGB")
        resample = Image.Resampling.BILINEAR
    if spec.size is not None and image.size != (spec.size[1], spec.size[0]):
        image = image.resize((spec.size[1], spec.size[0]), resample)
    array = np.asarray(image, dtype=np.uint8)
    return array[..., None] if array.ndim == 2 else array


def _decode_chunk(items: list[tuple[str, bytes | None]], spec: DecodeSpec) -> list[np.ndarray]:
    return [decode(payload, name, spec) for name, payload in items]


def _decode_chunk_packed(
    items: list[tuple[str, bytes | None]], spec: DecodeSpec
) -> tuple[np.ndarray, np.ndarray]:
    """`_decode_chunk` as (shapes, one flat buffer): pickling 512 small arrays one by one costs
    as much as decoding them."""
    arrays = _decode_chunk(items, spec)
    shapes = np.asarray([a.shape for a in arrays], np.int64).reshape(-1, 3)
    return shapes, np.concatenate([a.ravel() for a in arrays]) if arrays else np.zeros(0, np.uint8)


def _unpack(packed: tuple[np.ndarray, np.ndarray]) -> Iterator[np.ndarray]:
    shapes, flat = packed
    start = 0
    for shape in shapes:
        size = int(np.prod(shape))
        yield flat[start : start + size].reshape(shape)
        start += size


def decode_many(
    items: Iterable[tuple[str, bytes | None]],
    spec: DecodeSpec,
    num_files: int | None = None,
    num_workers: int | None = None,
) -> Iterator[np.ndarray]:
    """Decodes (name, payload) pairs in order, in a pool of `num_workers` (default: all cores).

    A payload of None means "read the file at `name`", so workers read files themselves, and
    `items` may be a stream (a tar being read) that the pool overlaps with. Many small files
    (`num_files` at least 2048, or unknown) go to processes, because decoding a 32x32 PNG is
    mostly Python overhead under the GIL; fewer, larger files go to threads, since libjpeg
    releases the GIL. At most two chunks per worker are in flight, so memory stays bounded.

    Processes are spawned, not forked (the parent may hold JAX's threads, which fork would
    deadlock on), so a script that decodes at import time needs the usual
    `if __name__ == "__main__":` guard; `num_workers=1` decodes in the calling thread.
    """
    num_workers = num_workers or os.cpu_count() or 1
    chunks = _chunked(items, _CHUNK)
    first = next(chunks, [])
    second = next(chunks, None)
    if num_workers == 1 or second is None:
        for chunk in itertools.chain([first], [] if second is None else [second], chunks):
            yield from _decode_chunk(chunk, spec)
        return
    if num_files is None or num_files >= _PROCESS_POOL_MIN_FILES:
        pool = concurrent.futures.ProcessPoolExecutor(
            num_workers, mp_context=multiprocessing.get_context("spawn")
        )
        work, unpack = _decode_chunk_packed, _unpack
    else:
        pool = concurrent.futures.ThreadPoolExecutor(num_workers)
        work, unpack = _decode_chunk, iter
    with pool:
        pending: list[concurrent.futures.Future] = []
        try:
            for chunk in itertools.chain([first, second], chunks):
                pending.append(pool.submit(work, chunk, spec))
                if len(pending) >= 2 * num_workers:
                    yield from unpack(pending.pop(0).result())
            while pending:
                yield from unpack(pending.pop(0).result())
        finally:
            for future in pending:
                future.cancel()


def _chunked(items: Iterable, size: int) -> Iterator[list]:
    iterator = iter(items)
    while chunk := list(itertools.islice(iterator, size)):
        yield chunk
