"""Finding image files and decoding them.

Three stages, used in this order by the pipeline:

1. :func:`find_images` turns the user's INPUT arguments (folders, files, ``-``
   for paths on stdin, a manifest) into a sorted list of :class:`ImageItem`,
   after ``--glob`` filters, ``--shard`` and ``--limit``.
2. :func:`decode_image` opens one file into an RGB PIL image, applying EXIF
   orientation, converting every mode to 8-bit RGB and refusing decompression
   bombs. Every failure is an :class:`ImageDecodeError` with a one-line reason.
3. :class:`ImageDataset` (a torch Dataset) decodes and resizes/crops on CPU
   workers and yields uint8 CHW tensors plus a per-item record; :func:`collate`
   groups them into batches with the failed items kept as records.

Over 400 lines: input discovery (folders, globs, manifests, stdin) and decoding; the discovery half
becomes core/sources/ when more input sources land.
"""

from __future__ import annotations

import csv
import fnmatch
import hashlib
import io
import json
import os
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFile, ImageOps

from visbatch.core.errors import UsageError

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
# Alpha is composited on white: scanned documents, logos and product shots with
# transparent backgrounds are meant to be seen on white, and it is what a
# browser shows.
ALPHA_BACKGROUND = (255, 255, 255)
DEFAULT_MAX_PIXELS = 89_478_485  # PIL's own default bomb limit (about 0.25 GB RGB)
MANIFEST_SUFFIXES = (".csv", ".tsv", ".jsonl", ".ndjson", ".parquet")

# A truncated file must become an error row, not a half-grey image.
ImageFile.LOAD_TRUNCATED_IMAGES = False


class InputError(UsageError):
    """A problem with the inputs the user named (exit code 2)."""


class ImageDecodeError(Exception):
    """One file could not be turned into an RGB image; the message is the reason."""


@dataclass(frozen=True, order=True)
class ImageItem:
    """One input image. ``relpath`` is POSIX-style, relative to ``root``."""

    root: str
    relpath: str

    @property
    def path(self) -> str:
        return os.path.join(self.root, self.relpath)


@dataclass
class SourceOptions:
    recursive: bool = True
    globs: Sequence[str] = ()
    limit: int | None = None
    shard: tuple[int, int] | None = None  # (index, count), index 0-based


# ----------------------------------------------------------------------------
# Finding files
# ----------------------------------------------------------------------------


def has_image_extension(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def _is_hidden(name: str) -> bool:
    return name.startswith(".")


def walk_folder(root: str, recursive: bool = True) -> list[str]:
    """Relative POSIX paths of the image files under ``root``, the same on every machine.

    Hidden files and folders are skipped. Symbolic links are followed, but a
    file reachable by several paths is listed once, under its real path
    relative to the root when it has one (the tree without links, walked
    first), else under its first alias in sorted order; each real folder is
    entered once, so a link loop cannot hang the walk. The result does not
    depend on the order in which the file system lists a folder.
    """
    found: list[str] = []
    seen_dirs: set[tuple[int, int]] = set()
    linked_dirs: list[str] = []  # symlinked folders met, walked after the real tree
    linked_files: list[str] = []  # symlinked image files, kept unless their target is listed
    from_links: list[str] = []  # files found inside symlinked folders

    def scan(start: str, into: list[str]) -> None:
        stack = [start]
        while stack:
            rel_dir = stack.pop()
            abs_dir = os.path.join(root, rel_dir) if rel_dir else root
            try:
                st = os.stat(abs_dir)
            except OSError:
                continue
            key = (st.st_dev, st.st_ino)
            if key in seen_dirs:
                continue
            seen_dirs.add(key)
            try:
                entries = sorted(os.scandir(abs_dir), key=lambda e: e.name)
            except OSError:
                continue
            subdirs: list[str] = []
            for entry in entries:
                if _is_hidden(entry.name):
                    continue
                rel = f"{rel_dir}/{entry.name}" if rel_dir else entry.name
                try:
                    is_link = entry.is_symlink()
                    is_dir = entry.is_dir(follow_symlinks=True)
                except OSError:
                    continue
                if is_dir:
                    if recursive:
                        (linked_dirs if is_link else subdirs).append(rel)
                elif has_image_extension(entry.name):
                    (linked_files if is_link else into).append(rel)
            stack.extend(reversed(subdirs))

    scan("", found)
    while linked_dirs:  # breadth first, in sorted order: deterministic
        batch = sorted(linked_dirs, key=lambda r: (r.count("/"), r))
        linked_dirs.clear()
        for rel in batch:
            scan(rel, from_links)
    if not (linked_files or from_links):
        return found
    listed = {_identity(os.path.join(root, rel)) for rel in found}
    for rel in sorted(from_links, key=lambda r: (r.count("/"), r)) + sorted(linked_files):
        identity = _identity(os.path.join(root, rel))
        if identity is None or identity in listed:
            continue
        listed.add(identity)
        found.append(rel)
    return found


def _identity(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino)


def check_glob(pattern: str) -> None:
    """Refuse a ``--glob`` pattern that cannot mean what was typed (empty, unbalanced ``[``)."""
    body = pattern[1:] if pattern.startswith("!") else pattern
    if not body:
        raise InputError(f"--glob {pattern!r}: empty pattern")
    i = 0
    while i < len(body):
        if body[i] == "[":
            j = i + 1
            if j < len(body) and body[j] == "!":
                j += 1
            if j < len(body) and body[j] == "]":
                j += 1
            close = body.find("]", j)
            if close < 0:
                raise InputError(f"--glob {pattern!r}: '[' without a closing ']' (write [[] for a literal '[')")
            i = close
        i += 1


def glob_matches(relpath: str, globs: Sequence[str]) -> bool:
    """Include/exclude filter. ``!pattern`` excludes; any other pattern includes.

    A pattern without ``/`` is matched against the file name, one with ``/``
    against the whole relative path (``*`` also crosses ``/``). With include
    patterns, a path must match at least one; any matching exclude drops it.
    """
    includes = [g for g in globs if not g.startswith("!")]
    excludes = [g[1:] for g in globs if g.startswith("!")]
    name = relpath.rsplit("/", 1)[-1]

    def match(pattern: str) -> bool:
        target = relpath if "/" in pattern else name
        return fnmatch.fnmatchcase(target.lower(), pattern.lower())

    if includes and not any(match(p) for p in includes):
        return False
    return not any(match(p) for p in excludes)


def shard_of(relpath: str, count: int) -> int:
    """Stable shard index of a relative path: the same on every machine and run."""
    digest = hashlib.blake2b(relpath.encode("utf-8", "surrogateescape"), digest_size=8).digest()
    return int.from_bytes(digest, "big") % count


def parse_shard(text: str) -> tuple[int, int]:
    """``"I/N"`` with 0 <= I < N, as given to ``--shard``."""
    try:
        index_text, count_text = text.split("/")
        index, count = int(index_text), int(count_text)
    except ValueError:
        raise InputError(f"--shard must look like I/N (for example 0/4), got {text!r}")
    if count < 1 or not 0 <= index < count:
        raise InputError(f"--shard {text}: need 0 <= I < N")
    return index, count


def _item_for_file(path: str, base: str | None = None) -> ImageItem:
    """An item for a single named file: relative to ``base`` when it lies under it."""
    absolute = os.path.abspath(path)
    if base is not None:
        base_abs = os.path.abspath(base)
        rel = os.path.relpath(absolute, base_abs)
        if not rel.startswith(".." + os.sep) and rel != ".." and not os.path.isabs(rel):
            return ImageItem(base_abs, Path(rel).as_posix())
    return ImageItem(os.path.dirname(absolute), os.path.basename(absolute))


def read_path_list(stream) -> list[str]:
    """Newline-separated paths (blank lines and surrounding white space ignored).

    A binary stream is decoded as the file system does (``os.fsdecode``), so
    a name that is not valid UTF-8 still names its file.
    """
    paths = []
    for line in stream:
        text = os.fsdecode(line) if isinstance(line, bytes) else line
        text = text.strip()
        if text:
            paths.append(text)
    return paths


def read_table_file(path: str) -> list[dict]:
    """Rows of a CSV, TSV, JSONL or Parquet file as dicts of strings."""
    suffix = os.path.splitext(path)[1].lower()
    if not os.path.isfile(path):
        raise InputError(f"file not found: {path}")
    try:
        if suffix == ".parquet":
            import pyarrow.parquet as pq

            return pq.read_table(path).to_pylist()
        if suffix in (".jsonl", ".ndjson"):
            rows = []
            with open(path, encoding="utf-8") as f:
                for line_no, line in enumerate(f, 1):
                    if line.strip():
                        try:
                            rows.append(json.loads(line))
                        except json.JSONDecodeError as exc:
                            raise InputError(f"{path}:{line_no}: not valid JSON ({exc.msg})")
            return rows
        if suffix in (".csv", ".tsv"):
            with open(path, encoding="utf-8", newline="") as f:
                return list(csv.DictReader(f, delimiter="\t" if suffix == ".tsv" else ","))
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"cannot read {path}: {exc}")
    except InputError:
        raise
    except Exception as exc:  # pyarrow errors carry no common base worth naming
        raise InputError(f"cannot read {path}: {exc}")
    raise InputError(f"{path}: unsupported table format (use {', '.join(MANIFEST_SUFFIXES)})")


def read_manifest(path: str, path_column: str = "path", warnings: list[str] | None = None) -> list[ImageItem]:
    """Items listed in a manifest's ``path`` column, relative to the manifest's folder.

    Rows without a path are not images: they are counted in ``warnings``
    (with their row numbers), never dropped silently.
    """
    rows = read_table_file(path)
    base = os.path.dirname(os.path.abspath(path))
    if rows and path_column not in rows[0]:
        raise InputError(f"{path}: no {path_column!r} column (columns: {', '.join(map(str, rows[0]))})")
    items = []
    empty_rows = []
    for number, row in enumerate(rows, 1):
        value = row.get(path_column)
        if value is None or str(value).strip() == "":
            empty_rows.append(number)
            continue
        value = str(value).strip()
        full = value if os.path.isabs(value) else os.path.join(base, value)
        items.append(_item_for_file(full, base))
    if empty_rows and warnings is not None:
        shown = ", ".join(map(str, empty_rows[:5])) + (", ..." if len(empty_rows) > 5 else "")
        warnings.append(
            f"{len(empty_rows)} rows of --manifest {path} have no {path_column!r} value and were "
            f"not used (rows {shown})"
        )
    return items


def find_images(
    inputs: Sequence[str],
    options: SourceOptions | None = None,
    manifest: str | None = None,
    stdin=None,
    warnings: list[str] | None = None,
) -> list[ImageItem]:
    """Resolve INPUT arguments into sorted, filtered, sharded, limited items.

    Folders are walked (recursively unless ``options.recursive`` is false);
    files are taken as named, even with an unusual extension, so a user who
    names a file always gets a row for it; ``-`` reads paths from ``stdin``.
    Raises :class:`InputError` for inputs that do not exist and for bad
    ``--glob`` patterns; what was skipped is appended to ``warnings``.
    """
    options = options or SourceOptions()
    for pattern in options.globs:
        check_glob(pattern)
    items: set[ImageItem] = set()
    if manifest:
        items.update(read_manifest(manifest, warnings=warnings))
    for entry in inputs:
        if entry == "-":
            stream = stdin if stdin is not None else getattr(sys.stdin, "buffer", sys.stdin)
            for line in read_path_list(stream):
                items.add(_item_for_file(line, os.getcwd()))
        elif os.path.isdir(entry):
            root = os.path.abspath(entry)
            items.update(ImageItem(root, rel) for rel in walk_folder(root, options.recursive))
        elif os.path.exists(entry):
            items.add(_item_for_file(entry))
        else:
            raise InputError(f"input not found: {entry}")

    selected = [it for it in items if not options.globs or glob_matches(it.relpath, options.globs)]
    if options.shard is not None:
        index, count = options.shard
        selected = [it for it in selected if shard_of(it.relpath, count) == index]
    selected.sort(key=lambda it: (it.root, it.relpath))
    if options.limit is not None:
        selected = selected[: options.limit]
    return selected


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


@dataclass(frozen=True)
class FileBytes:
    """A file's bytes with its fingerprint: what a result row records of the file it came from."""

    data: bytes
    size: int
    mtime: float
    content_hash: str

    def fingerprint(self) -> dict:
        return {"file_size": self.size, "file_mtime": self.mtime, "content_hash": self.content_hash}


def content_hash(data: bytes) -> str:
    """The content hash visbatch records (BLAKE2b, 128 bits; several GB/s, so cheap beside decoding)."""
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def read_file(path: str) -> FileBytes:
    """Read a whole file once, with its size, modification time and content hash."""
    try:
        with open(path, "rb") as f:
            st = os.fstat(f.fileno())
            data = f.read()
    except OSError as exc:
        raise ImageDecodeError(f"cannot read file: {exc.strerror or exc}")
    return FileBytes(data, st.st_size, st.st_mtime, content_hash(data))


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
            file = read_file(item.path)
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


def file_fingerprint(path: str) -> dict:
    """Size, modification time and content hash of a file, read in chunks ({} when unreadable).
    The same values as :meth:`FileBytes.fingerprint` for the same bytes."""
    digest = hashlib.blake2b(digest_size=16)
    try:
        with open(path, "rb") as f:
            st = os.fstat(f.fileno())
            while block := f.read(1 << 20):
                digest.update(block)
    except OSError:
        return {}
    return {"file_size": st.st_size, "file_mtime": st.st_mtime, "content_hash": digest.hexdigest()}


def file_unchanged(path: str, row: dict) -> bool:
    """Whether ``path`` still holds the bytes a row recorded (``file_size``, ``file_mtime`` and
    ``content_hash``); the size and time are compared first, so a changed file is not read."""
    if not row.get("content_hash"):
        return False
    try:
        st = os.stat(path)
    except OSError:
        return False
    if st.st_size != row.get("file_size") or st.st_mtime != row.get("file_mtime"):
        return False
    return file_fingerprint(path).get("content_hash") == row["content_hash"]


def files_unchanged(rows: dict[str, dict], threads: int = 8) -> dict[str, bool]:
    """:func:`file_unchanged` for each path -> row, the files read in threads (I/O bound)."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=threads) as pool:
        return dict(zip(rows, pool.map(lambda kv: file_unchanged(*kv), rows.items())))


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
