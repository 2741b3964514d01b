"""Overlays and per-image side files: colormaps, blending, and the folder sink that writes them.

Heatmaps are turned into colours with a lookup table (no matplotlib),
blended over a bounded-size copy of the image, and PNG-encoded in a thread
pool so the device never waits for zlib. :class:`FolderSink` writes one file
per input under a folder that mirrors the inputs' relative paths, keeping
the source extension in the name (``photos/x.jpg`` -> ``OVERLAYS/x.jpg.png``)
so that ``x.jpg`` and ``x.png`` never write the same file. With several
input roots, each root gets its own subfolder (its name, made unique).
"""

from __future__ import annotations

import errno
import io
import os
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from visbatch.core.errors import FatalError, UsageError
from visbatch.core.files import atomic_write_bytes
from visbatch.core.images import ImageItem
from visbatch.core.plan import admit

# Anchor colours of perceptual colormaps (from their published definitions),
# interpolated into 256-entry lookup tables.
_COLORMAP_ANCHORS = {
    "turbo": [
        (48, 18, 59),
        (70, 107, 227),
        (41, 187, 236),
        (49, 242, 153),
        (164, 252, 60),
        (237, 208, 58),
        (251, 128, 34),
        (209, 48, 8),
        (122, 4, 3),
    ],
    "viridis": [
        (68, 1, 84),
        (72, 40, 120),
        (62, 74, 137),
        (49, 104, 142),
        (38, 130, 142),
        (31, 158, 137),
        (53, 183, 121),
        (109, 205, 89),
        (180, 222, 44),
        (253, 231, 37),
    ],
    "inferno": [
        (0, 0, 4),
        (40, 11, 84),
        (101, 21, 110),
        (159, 42, 99),
        (212, 72, 66),
        (245, 125, 21),
        (250, 193, 39),
        (252, 255, 164),
    ],
    "jet": [
        (0, 0, 128),
        (0, 0, 255),
        (0, 128, 255),
        (0, 255, 255),
        (128, 255, 128),
        (255, 255, 0),
        (255, 128, 0),
        (255, 0, 0),
        (128, 0, 0),
    ],
    "gray": [(0, 0, 0), (255, 255, 255)],
    # Diverging, for signed maps: blue for negative, white at 0, red for positive.
    "coolwarm": [(59, 76, 192), (141, 176, 254), (221, 221, 221), (244, 154, 123), (180, 4, 38)],
}
COLORMAPS = tuple(_COLORMAP_ANCHORS)


def colormap_lut(name: str) -> np.ndarray:
    """A [256, 3] uint8 lookup table for colormap ``name``."""
    if name not in _COLORMAP_ANCHORS:
        raise UsageError(f"unknown colormap {name!r} (choose from {', '.join(COLORMAPS)})")
    anchors = np.asarray(_COLORMAP_ANCHORS[name], dtype=np.float64)
    positions = np.linspace(0, 1, len(anchors))
    grid = np.linspace(0, 1, 256)
    lut = np.stack([np.interp(grid, positions, anchors[:, c]) for c in range(3)], axis=1)
    return np.round(lut).astype(np.uint8)


def normalize_map(heatmap: np.ndarray, signed: bool = False, clip_percentile: float = 99.5) -> np.ndarray:
    """Scale a map to [0, 1] for display.

    Unsigned: from the minimum to the ``clip_percentile`` percentile; signed:
    symmetric around 0 (0.5) with the bound at that percentile of ``|map|``.
    Clipping the few extreme pixels keeps pixel-level maps (gradients, IG)
    from looking blank.
    """
    heatmap = np.nan_to_num(np.asarray(heatmap, dtype=np.float32))
    if signed:
        bound = float(np.percentile(np.abs(heatmap), clip_percentile))
        return np.full_like(heatmap, 0.5) if bound == 0 else np.clip(0.5 + 0.5 * heatmap / bound, 0, 1)
    lo, hi = float(heatmap.min()), float(np.percentile(heatmap, clip_percentile))
    return np.zeros_like(heatmap) if hi <= lo else np.clip((heatmap - lo) / (hi - lo), 0, 1)


def render_overlay(
    image: np.ndarray,
    heatmap: np.ndarray,
    colormap: str = "turbo",
    alpha: float = 0.5,
    style: str = "blend",
    signed: bool = False,
    box: tuple[float, float, float, float] = (0.0, 0.0, 1.0, 1.0),
) -> np.ndarray:
    """Blend ``heatmap`` over the part ``box`` of ``image`` (HWC uint8) that it describes.

    ``box`` is (x0, y0, x1, y1) in units of the image size: the region the
    model saw (a centre crop leaves the borders uncoloured). ``style`` is
    ``blend`` (one picture) or ``side-by-side`` (image | blend).
    """
    h, w = image.shape[:2]
    x0, y0, x1, y1 = (round(box[0] * w), round(box[1] * h), round(box[2] * w), round(box[3] * h))
    box_w, box_h = max(1, x1 - x0), max(1, y1 - y0)
    scaled = normalize_map(heatmap, signed)
    resized = np.asarray(
        Image.fromarray(scaled.astype(np.float32), mode="F").resize((box_w, box_h), Image.Resampling.BILINEAR)
    )
    colours = colormap_lut(colormap)[np.clip(np.round(resized * 255), 0, 255).astype(np.uint8)]
    # Clip the box to the image (a padded input reaches past the borders).
    cx0, cy0, cx1, cy1 = max(x0, 0), max(y0, 0), min(x1, w), min(y1, h)
    blended = image.copy()
    if cx1 > cx0 and cy1 > cy0:
        region = image[cy0:cy1, cx0:cx1].astype(np.float32)
        tint = colours[cy0 - y0 : cy1 - y0, cx0 - x0 : cx1 - x0].astype(np.float32)
        blended[cy0:cy1, cx0:cx1] = (region * (1 - alpha) + tint * alpha).round().astype(np.uint8)
    if style == "blend":
        return blended
    if style == "side-by-side":
        gap = np.full((h, max(2, w // 100), 3), 255, dtype=np.uint8)
        return np.concatenate([image, gap, blended], axis=1)
    raise UsageError(f"unknown overlay style {style!r} (blend or side-by-side)")


# Errors that stop the whole run (every later write would fail too), not one row.
DEVICE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO})


class SinkWriteError(Exception):
    """One file of a sink could not be written; the message says which and why."""


def root_folder_names(roots: Sequence[str]) -> dict[str, str]:
    """A unique subfolder name per input root (its base name; ``-2``, ``-3`` for repeats)."""
    names: dict[str, str] = {}
    used: set[str] = set()
    for root in roots:
        base = os.path.basename(os.path.normpath(root)) or "root"
        name, n = base, 1
        while name in used:
            n += 1
            name = f"{base}-{n}"
        used.add(name)
        names[root] = name
    return names


class FolderSink:
    """Writes one file per input under ``folder`` in background threads (see module doc).

    At most ``max_pending`` encodes are queued, so a slow disk slows the run
    rather than filling memory. :meth:`submit` returns a future; its
    exception (a :class:`SinkWriteError`) is the failure of that input's row.
    Device-level failures (no space, quota, read-only, I/O error) raise
    :class:`~visbatch.core.errors.FatalError` from the future instead.
    Every file is admitted by the run plan as a write inside ``folder`` (a link in the folder
    that leads out of it, or a name landing on another planned output, is that row's error).
    """

    def __init__(
        self,
        folder: str | os.PathLike,
        kind: str,
        roots: Sequence[str] = (),
        threads: int = 2,
        max_pending: int = 64,
        suffix: str = ".png",
        encode: Callable[[np.ndarray], bytes] | None = None,
    ):
        self.kind, self.suffix = kind, suffix
        self.encode = encode or png_bytes
        self.folder = Path(folder)
        self._root_names = root_folder_names(sorted(set(roots))) if len(set(roots)) > 1 else {}
        try:
            admit(self.folder)
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise FatalError(f"cannot create {kind} folder {folder}: {exc.strerror or exc}") from exc
        if not os.access(self.folder, os.W_OK | os.X_OK):
            raise FatalError(f"cannot write to {kind} folder {folder}")
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix=kind)
        self._slots = threading.BoundedSemaphore(max_pending)
        self.written = 0
        self._lock = threading.Lock()

    def path_for(self, item: ImageItem) -> Path:
        relative = item.relpath + self.suffix
        # A key is a name from the inputs (a tar member, a manifest line): one that climbs out
        # ("../x", "/etc/x") would write outside this folder or into another root's part of it.
        parts = relative.replace("\\", "/").split("/")
        if relative.startswith("/") or ".." in parts or os.path.isabs(relative):
            raise SinkWriteError(f"{self.kind} not written: the key {item.relpath!r} leaves the output folder")
        if self._root_names:
            return self.folder / self._root_names[item.root] / relative
        return self.folder / relative

    def submit(self, item: ImageItem, picture: np.ndarray) -> Future:
        try:
            target = self.path_for(item)
        except SinkWriteError as exc:  # the row becomes an error row, as for a failed write
            refused: Future = Future()
            refused.set_exception(exc)
            return refused
        self._slots.acquire()
        future = self._pool.submit(self._write, target, picture)
        future.add_done_callback(lambda _: self._slots.release())
        return future

    def _write(self, target: Path, picture: np.ndarray) -> Path:
        try:
            atomic_write_bytes(target, self.encode(picture), within=self.folder)
        except UsageError as exc:  # the plan refused this one file (a link leading out of the folder)
            raise SinkWriteError(f"{self.kind} not written: {exc}") from exc
        except FatalError as exc:
            cause = exc.__cause__
            if isinstance(cause, OSError) and cause.errno in DEVICE_ERRNOS:
                raise
            raise SinkWriteError(f"{self.kind} not written: {exc}") from exc
        except OSError as exc:
            if exc.errno in DEVICE_ERRNOS:
                raise FatalError(f"cannot write {self.kind} {target}: {exc.strerror}") from exc
            raise SinkWriteError(f"{self.kind} not written: {target}: {exc.strerror or exc}") from exc
        except Exception as exc:
            raise SinkWriteError(f"{self.kind} not written: {target}: {exc}") from exc
        with self._lock:
            self.written += 1
        return target

    def close(self) -> None:
        self._pool.shutdown(wait=True)


def png_bytes(picture: np.ndarray) -> bytes:
    out = io.BytesIO()
    # compress_level 1: several times faster than the default for ~10% larger files.
    Image.fromarray(picture).save(out, format="PNG", compress_level=1)
    return out.getvalue()


def npy_bytes(array: np.ndarray) -> bytes:
    out = io.BytesIO()
    np.save(out, array)
    return out.getvalue()
