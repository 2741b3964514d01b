"""Decoding images and turning them into batches.

Used in this order by the pipeline, after :mod:`visbatch.core.sources` has listed the items:

1. :func:`decode_bytes` opens one image's bytes into an RGB PIL image, applying EXIF
   orientation, converting every mode to 8-bit RGB and refusing decompression
   bombs. Every failure is an :class:`ImageDecodeError` with a one-line reason.
2. :class:`ImageDataset` (a torch Dataset) reads each item through its source, decodes and
   resizes/crops on CPU workers and yields uint8 CHW tensors plus a per-item record;
   :func:`collate` groups them into batches with the failed items kept as records.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image, ImageFile, ImageOps

from visbatch.core.sources.base import (
    IMAGE_EXTENSIONS,
    FileBytes,
    ImageDecodeError,
    ImageItem,
    InputError,
    SourceOptions,
    content_hash,
    has_image_extension,
    read_file,
)
from visbatch.core.sources.reading import read_item

__all__ = [
    "IMAGE_EXTENSIONS",
    "FileBytes",
    "ImageDecodeError",
    "ImageItem",
    "InputError",
    "SourceOptions",
    "content_hash",
    "has_image_extension",
    "read_file",
]

# Alpha is composited on white: scanned documents, logos and product shots with
# transparent backgrounds are meant to be seen on white, and it is what a
# browser shows.
ALPHA_BACKGROUND = (255, 255, 255)
DEFAULT_MAX_PIXELS = 89_478_485  # PIL's own default bomb limit (about 0.25 GB RGB)

# A truncated file must become an error row, not a half-grey image.
ImageFile.LOAD_TRUNCATED_IMAGES = False


# ----------------------------------------------------------------------------
# Decoding
# ----------------------------------------------------------------------------


def _to_rgb(img: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB, compositing alpha on ALPHA_BACKGROUND."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
        return _to_rgb(img)
    if mode in ("PA", "LA", "RGBa", "La"):
        img = img.convert("RGBA")
        mode = "RGBA"
    if mode == "RGBA":
        background = Image.new("RGB", img.size, ALPHA_BACKGROUND)
        background.paste(img, mask=img.getchannel("A"))
        return background
    if mode.startswith("I;16") or mode in ("I", "F"):
        # PIL's own convert clips 16-bit values at 255, turning most of a
        # 16-bit image white; scale by the range instead.
        array = np.asarray(img).astype(np.float64)
        if mode == "F":
            scale = 255.0 if array.size and np.nanmax(array) <= 1.0 else 1.0
        elif mode.startswith("I;16") or (array.size and array.max() > 255):
            scale = 255.0 / 65535.0
        else:
            scale = 1.0
        array = np.clip(np.nan_to_num(array * scale), 0, 255).round().astype(np.uint8)
        return Image.fromarray(array, "L").convert("RGB")
    return img.convert("RGB")


def decode_image(path: str, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Open ``path`` as an 8-bit RGB image with EXIF orientation applied (see :func:`decode_bytes`)."""
    return decode_bytes(read_file(path).data, max_pixels)


def decode_bytes(data: bytes, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode an encoded image into 8-bit RGB with EXIF orientation applied.

    ``max_pixels`` (``--max-pixels``; None or 0 for no limit) is the only
    decompression-bomb limit: PIL's own limit is lifted so that the option
    governs both ways. Raises :class:`ImageDecodeError` with a one-line
    reason for empty, truncated, non-image and oversized data.
    """
    if not data:
        raise ImageDecodeError("empty file (0 bytes)")
    # visbatch checks the size itself below, naming --max-pixels; PIL's check would refuse
    # images the user allowed and word its message in its own terms.
    Image.MAX_IMAGE_PIXELS = None
    try:
        with Image.open(io.BytesIO(data)) as img:
            width, height = img.size
            if max_pixels and width * height > max_pixels:
                raise ImageDecodeError(
                    f"image too large: {width}x{height} = {width * height} pixels "
                    f"> --max-pixels {max_pixels} (raise it, or 0 for no limit)"
                )
            img.seek(0)  # first frame of animations
            img.load()
            if img.format == "PNG":
                _check_png_data(data)
            return _to_rgb(ImageOps.exif_transpose(img))
    except ImageDecodeError:
        raise
    except Image.UnidentifiedImageError:
        raise ImageDecodeError("not an image (unrecognized file format)")
    except MemoryError:
        raise ImageDecodeError("image too large to decode in memory (lower --max-pixels)")
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        text = str(exc) or type(exc).__name__
        if "truncated" in text.lower() or isinstance(exc, EOFError):
            raise ImageDecodeError(f"truncated or corrupt image: {text}")
        raise ImageDecodeError(f"cannot decode image: {text}")
    except Exception as exc:  # a decoder bug must still become an error row
        raise ImageDecodeError(f"cannot decode image: {type(exc).__name__}: {exc}")


_PNG_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}  # by colour type
_ADAM7 = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2))


def _check_png_data(data: bytes) -> None:
    """Refuse a PNG whose image data stops short of its last row. PIL fills the missing rows with
    zeros and says nothing when the compressed stream itself is complete (a writer that stopped
    early, a file cut and re-wrapped), so the data's length is counted here: an inflate pass
    without keeping the pixels."""
    import struct
    import zlib

    if len(data) < 33 or data[12:16] != b"IHDR":
        return
    width, height, depth, colour, _, _, interlace = struct.unpack(">IIBBBBB", data[16:29])
    channels = _PNG_CHANNELS.get(colour)
    if channels is None:
        return
    bits = channels * depth
    passes = [(0, 0, 1, 1)] if interlace == 0 else _ADAM7
    expected = 0
    for x0, y0, dx, dy in passes:
        columns = (width - x0 + dx - 1) // dx if width > x0 else 0
        rows = (height - y0 + dy - 1) // dy if height > y0 else 0
        if columns and rows:
            expected += rows * (1 + (columns * bits + 7) // 8)
    inflater = zlib.decompressobj()
    got, at = 0, 8
    try:
        while at + 8 <= len(data):
            length, kind = struct.unpack(">I4s", data[at : at + 8])
            if kind == b"IDAT":
                got += len(inflater.decompress(data[at + 8 : at + 8 + length], max(0, expected - got) + 1))
                while inflater.unconsumed_tail and got <= expected:
                    got += len(inflater.decompress(inflater.unconsumed_tail, max(0, expected - got) + 1))
            elif kind == b"IEND" or got > expected:
                break
            at += 12 + length
    except zlib.error:
        return  # PIL decoded it; a stream it accepts but zlib does not is not ours to judge
    if got < expected:
        if interlace == 0:
            raise ImageDecodeError(
                f"truncated or corrupt image: PNG image data covers {got // max(1, expected // height)} "
                f"of {height} rows"
            )
        raise ImageDecodeError(f"truncated or corrupt image: PNG image data holds {got} of {expected} bytes")


# ----------------------------------------------------------------------------
# Resize and crop (CPU, in the workers)
# ----------------------------------------------------------------------------

_INTERPOLATIONS = {
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "nearest": Image.Resampling.NEAREST,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
}


@dataclass(frozen=True)
class Geometry:
    """How an image becomes the model's input tensor (the CPU part of preprocessing).

    ``resize_mode`` is ``shortest`` (shortest side to ``resize``, then a
    centre crop of ``crop``: open_clip's and timm's eval transforms),
    ``squash`` (both sides to ``crop``, aspect ratio lost) or ``none`` (centre
    crop of ``crop`` without resizing, padding small images with zeros; for
    detectors whose traces a resize would destroy).
    """

    resize: int
    crop: tuple[int, int]  # (height, width)
    interpolation: str = "bicubic"
    resize_mode: str = "shortest"

    def as_dict(self) -> dict:
        return {
            "resize": self.resize,
            "crop": list(self.crop),
            "interpolation": self.interpolation,
            "resize_mode": self.resize_mode,
        }


def resize_and_crop(img: Image.Image, geometry: Geometry) -> Image.Image:
    """Apply ``geometry`` with the same arithmetic as torchvision's Resize + CenterCrop.

    Matching torchvision on PIL images exactly makes the result bit-identical
    to open_clip's and timm's own eval transforms up to the uint8 image.
    """
    crop_h, crop_w = geometry.crop
    resample = _INTERPOLATIONS[geometry.interpolation]
    if geometry.resize_mode == "squash":
        return img.resize((crop_w, crop_h), resample)
    if geometry.resize_mode == "shortest":
        w, h = img.size
        short, long = (w, h) if w <= h else (h, w)
        new_short, new_long = geometry.resize, int(geometry.resize * long / short)
        new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
        if (new_w, new_h) != (w, h):
            img = img.resize((new_w, new_h), resample)
    elif geometry.resize_mode != "none":
        raise ValueError(f"unknown resize mode {geometry.resize_mode!r}")
    w, h = img.size
    if w < crop_w or h < crop_h:
        padded = Image.new("RGB", (max(w, crop_w), max(h, crop_h)), (0, 0, 0))
        padded.paste(img, ((padded.width - w) // 2, (padded.height - h) // 2))
        img = padded
        w, h = img.size
    top = int(round((h - crop_h) / 2.0))
    left = int(round((w - crop_w) / 2.0))
    return img.crop((left, top, left + crop_w, top + crop_h))


def crop_box(width: int, height: int, geometry: Geometry) -> tuple[float, float, float, float]:
    """The part of the original image the model input shows, as (x0, y0, x1, y1) in [0, 1] units.

    Maps model-input coordinates back to the original image (for overlays,
    peaks). A box reaching outside [0, 1] means the input was padded.
    """
    crop_h, crop_w = geometry.crop
    if geometry.resize_mode == "squash":
        return (0.0, 0.0, 1.0, 1.0)
    if geometry.resize_mode == "shortest":
        short, long = (width, height) if width <= height else (height, width)
        new_short, new_long = geometry.resize, int(geometry.resize * long / short)
        new_w, new_h = (new_short, new_long) if width <= height else (new_long, new_short)
    else:
        new_w, new_h = width, height
    # Same arithmetic as resize_and_crop, padding included.
    padded_w, padded_h = max(new_w, crop_w), max(new_h, crop_h)
    pad_left, pad_top = (padded_w - new_w) // 2, (padded_h - new_h) // 2
    top = int(round((padded_h - crop_h) / 2.0)) - pad_top
    left = int(round((padded_w - crop_w) / 2.0)) - pad_left
    return (left / new_w, top / new_h, (left + crop_w) / new_w, (top + crop_h) / new_h)


def pil_to_uint8_chw(img: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.array(img, dtype=np.uint8, copy=True)).permute(2, 0, 1).contiguous()


def display_copy(img: Image.Image, max_side: int) -> np.ndarray:
    """A copy of the image whose longer side is at most ``max_side``, as HWC uint8."""
    w, h = img.size
    scale = min(1.0, max_side / max(w, h))
    if scale < 1.0:
        img = img.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.Resampling.BILINEAR)
    return np.asarray(img, dtype=np.uint8)


# ----------------------------------------------------------------------------
# Dataset and batches
# ----------------------------------------------------------------------------


@dataclass
class Record:
    """What the pipeline knows about one item besides its tensor."""

    index: int
    item: ImageItem
    status: str = "ok"
    error: str | None = None
    width: int | None = None
    height: int | None = None
    display: np.ndarray | None = None  # bounded-size copy for overlays, if asked for
    extra: dict = field(default_factory=dict)
    fingerprint: dict = field(default_factory=dict)  # file_size, file_mtime, content_hash of the bytes read


@dataclass
class Batch:
    """Decoded images of one batch (``images`` holds only the ok ones, in order)."""

    images: torch.Tensor  # uint8 [n_ok, 3, H, W]
    records: list[Record]  # all items of the batch, ok and failed, in input order

    @property
    def ok_records(self) -> list[Record]:
        return [r for r in self.records if r.status == "ok"]


class ImageDataset(torch.utils.data.Dataset):
    """Decode + resize/crop on CPU workers. Never raises for a bad file."""

    def __init__(
        self,
        items: Sequence[ImageItem],
        geometry: Geometry,
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
        display_size: int | None = None,
        annotate: Callable[[ImageItem], dict] | None = None,
    ):
        self.items = list(items)
        self.annotate = annotate
        self.geometry = geometry
        self.max_pixels = max_pixels
        self.display_size = display_size

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int):
        item = self.items[index]
        record = Record(index=index, item=item)
        if self.annotate is not None:
            record.extra.update(self.annotate(item))
        try:
            file = read_item(item)
        except ImageDecodeError as exc:
            record.status, record.error = "error", str(exc)
            return None, record
        except Exception as exc:  # a storage client's own error (a dead endpoint): still one row
            record.status, record.error = "error", f"cannot read image: {type(exc).__name__}: {exc}"
            return None, record
        try:
            record.fingerprint = file.fingerprint()
            img = decode_bytes(file.data, self.max_pixels)
            del file
            record.width, record.height = img.size
            tensor = pil_to_uint8_chw(resize_and_crop(img, self.geometry))
            if self.display_size:
                record.display = display_copy(img, self.display_size)
            return tensor, record
        except ImageDecodeError as exc:
            record.status, record.error = "error", str(exc)
        except Exception as exc:  # resize of a pathological image: still one row
            record.status, record.error = "error", f"cannot preprocess image: {type(exc).__name__}: {exc}"
        return None, record


def display_path(path: str) -> str:
    """A path as text that is valid UTF-8: bytes that are not (kept by Python as surrogate
    escapes) are written ``\\xNN``. Paths that are valid UTF-8 are returned unchanged."""
    try:
        path.encode("utf-8")
        return path
    except UnicodeEncodeError:
        return path.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def path_bytes(path: str) -> bytes | None:
    """The raw bytes of a path that is not valid UTF-8 (None for one that is): the lossless
    form stored in the ``path_bytes`` column; ``os.fsdecode(path_bytes)`` opens the file."""
    try:
        path.encode("utf-8")
        return None
    except UnicodeEncodeError:
        return path.encode("utf-8", "surrogateescape")


class Annotators:
    """Several per-item annotators run in the decode workers, their dicts merged (picklable)."""

    def __init__(self, *functions: Callable[[ImageItem], dict]):
        self.functions = [f for f in functions if f is not None]

    def __call__(self, item: ImageItem) -> dict:
        merged: dict = {}
        for function in self.functions:
            merged.update(function(item))
        return merged

    def __bool__(self) -> bool:
        return bool(self.functions)


def collate(samples: Iterable[tuple[torch.Tensor | None, Record]]) -> Batch:
    samples = list(samples)
    tensors = [t for t, _ in samples if t is not None]
    records = [r for _, r in samples]
    if tensors:
        images = torch.stack(tensors)
    else:
        images = torch.empty((0, 3, 0, 0), dtype=torch.uint8)
    return Batch(images=images, records=records)
