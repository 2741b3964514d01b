"""Sinks: the Parquet results writer and the PNG overlay writer.

Results writer
--------------
Rows arrive one batch at a time. Each batch is written at once as an Arrow
IPC *part* file in ``OUTPUT.parts/`` (temp file, then rename), so a run killed
at any point, SIGKILL included, loses at most the batches in flight. When
the run finishes, the parts are merged in sorted path order into the final
Parquet file, streamed in row groups to a temp file that is renamed into
place: a reader never sees a half-written output. ``--resume`` reads the
keys of the parts (and of a finished output) and the pipeline skips them.

Overlay writer
--------------
Heatmaps are turned into colours with a lookup table (no matplotlib),
blended over a bounded-size copy of the image, and PNG-encoded in a thread
pool so the device never waits for zlib.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import threading
import time
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc
import pyarrow.parquet as pq
from PIL import Image

from visbatch.core.images import ImageItem

BASE_FIELDS = [
    pa.field("path", pa.string(), nullable=False),
    pa.field("status", pa.string(), nullable=False),
    pa.field("error", pa.string()),
    pa.field("width", pa.int32()),
    pa.field("height", pa.int32()),
]
BASE_COLUMNS = [f.name for f in BASE_FIELDS]
ROOT_FIELD = pa.field("root", pa.string(), nullable=False)
ROW_GROUP_SIZE = 8192
METADATA_KEY = b"visbatch"


class OutputError(Exception):
    """The output cannot be written as asked (exists, unwritable): exit 2 or 3."""


def parts_dir_for(output: str | os.PathLike) -> Path:
    output = Path(output)
    return output.with_name(output.name + ".parts")


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temp file in the same folder and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        _remove_quietly(tmp)
        raise


def _remove_quietly(path) -> None:
    try:
        os.remove(path)
    except OSError:
        pass


class ResultsWriter:
    """One Parquet file per run, one row per input, resumable (see module doc).

    ``schema`` is the task's columns (without the base ones). ``metadata`` is
    the run's key-value metadata, stored as JSON under the key ``visbatch``.
    ``multi_root`` adds a ``root`` column when inputs came from several roots.
    """

    def __init__(self, output: str | os.PathLike, task_fields: Sequence[pa.Field], metadata: dict,
                 *, multi_root: bool = False, resume: bool = False, overwrite: bool = False):
        self.output = Path(output)
        self.parts_dir = parts_dir_for(self.output)
        fields = list(BASE_FIELDS) + ([ROOT_FIELD] if multi_root else []) + list(task_fields)
        names = [f.name for f in fields]
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate column names in output schema: {names}")
        self.schema = pa.schema(fields)
        self.metadata = metadata
        self.multi_root = multi_root
        self._part_counter = 0
        self._run_id = uuid.uuid4().hex[:8]
        self._prepare(resume, overwrite)

    # -- life cycle -----------------------------------------------------------------

    def _prepare(self, resume: bool, overwrite: bool) -> None:
        if self.output.exists() and self.output.is_dir():
            raise OutputError(f"output {self.output} is a folder; give a .parquet file path")
        if overwrite:
            if self.parts_dir.exists():
                shutil.rmtree(self.parts_dir)
            # The old output stays until the new one replaces it atomically.
        elif resume:
            if self.output.exists():
                self._adopt_finished_output()
        else:
            if self.output.exists():
                raise OutputError(f"output {self.output} exists; pass --overwrite to replace it or --resume to add to it")
            if self.parts_dir.exists():
                raise OutputError(
                    f"an interrupted run left {self.parts_dir}; pass --resume to finish it or --overwrite to start over"
                )
        try:
            self.parts_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OutputError(f"cannot create {self.parts_dir}: {exc.strerror or exc}")
        run_file = self.parts_dir / "run.json"
        if resume and run_file.exists():
            previous = json.loads(run_file.read_text())
            self._check_compatible(previous)
        else:
            atomic_write_bytes(run_file, json.dumps(self._compat_keys(self.metadata)).encode())
        if not os.access(self.parts_dir, os.W_OK):
            raise OutputError(f"cannot write to {self.parts_dir}")

    @staticmethod
    def _compat_keys(metadata: dict) -> dict:
        keys = ("task", "model", "schema")
        return {k: metadata.get(k) for k in keys}

    def _check_compatible(self, previous: dict) -> None:
        current = self._compat_keys(self.metadata)
        diffs = [k for k in current if previous.get(k) != current[k]]
        if diffs:
            raise OutputError(
                f"--resume: the earlier run differs in {', '.join(diffs)}; "
                "use the same options or pass --overwrite to start over"
            )

    def _adopt_finished_output(self) -> None:
        """Make a finished output one of the parts, so a resumed run adds to it."""
        try:
            table = pq.read_table(self.output)
        except Exception as exc:
            raise OutputError(f"--resume: cannot read existing output {self.output}: {exc}")
        old_meta = read_run_metadata(self.output)
        if old_meta:
            self._check_compatible(old_meta)
        if table.schema.remove_metadata() != self.schema:
            raise OutputError(f"--resume: {self.output} has different columns; pass --overwrite to start over")
        self.parts_dir.mkdir(parents=True, exist_ok=True)
        self._write_part(table, name="part-0-finished.arrow")

    # -- parts ----------------------------------------------------------------------

    def _part_paths(self) -> list[Path]:
        return sorted(self.parts_dir.glob("part-*.arrow"))

    def _write_part(self, table: pa.Table, name: str | None = None) -> None:
        if name is None:
            self._part_counter += 1
            name = f"part-{self._run_id}-{self._part_counter:08d}.arrow"
        final = self.parts_dir / name
        tmp = self.parts_dir / f".{name}.tmp"
        with pa.OSFile(str(tmp), "wb") as sink, ipc.new_file(sink, table.schema) as writer:
            writer.write_table(table)
        os.replace(tmp, final)

    def done_keys(self) -> set[tuple[str, str]]:
        """(root, relpath) of every row already written by earlier runs."""
        keys: set[tuple[str, str]] = set()
        roots = self.metadata.get("roots", [])
        for part in self._part_paths():
            table = _read_part(part, columns=["path"] + (["root"] if self.multi_root else []))
            paths = table.column("path").to_pylist()
            if self.multi_root:
                keys.update(zip(table.column("root").to_pylist(), paths))
            else:
                root = roots[0] if roots else ""
                keys.update((root, p) for p in paths)
        return keys

    def write_rows(self, rows: list[dict]) -> None:
        """Write the rows of one batch as a part (durable once this returns)."""
        if not rows:
            return
        columns = {f.name: [row.get(f.name) for row in rows] for f in self.schema}
        table = pa.Table.from_pydict(columns, schema=self.schema)
        self._write_part(table)

    def finalize(self, reduce=None) -> int:
        """Merge the parts in sorted order into the output, atomically. Returns the row count.

        ``reduce(table) -> table`` (a task's reduce stage) sees every row of the
        run, resumed ones included, before the write; it may fill or change
        columns but must keep one row per input, in order.
        """
        parts = self._part_paths()
        tables = [_read_part(p) for p in parts]
        table = pa.concat_tables(tables) if tables else self.schema.empty_table()
        table = table.cast(self.schema)
        sort_keys = [("root", "ascending"), ("path", "ascending")] if self.multi_root else [("path", "ascending")]
        order = table.sort_by(sort_keys) if table.num_rows else table
        order = _drop_repeated_keys(order, self.multi_root)
        if reduce is not None:
            reduced = reduce(order)
            if reduced.num_rows != order.num_rows or reduced.column("path") != order.column("path"):
                raise RuntimeError("a reduce stage must keep one row per input, in order")
            order = reduced.cast(self.schema)
        meta = dict(self.metadata)
        meta["finished_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        meta["rows"] = order.num_rows
        schema = self.schema.with_metadata({METADATA_KEY: json.dumps(meta).encode()})
        self.output.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{self.output.name}.", suffix=".tmp", dir=self.output.parent)
        os.close(fd)
        try:
            with pq.ParquetWriter(tmp, schema, compression="zstd") as writer:
                for start in range(0, order.num_rows, ROW_GROUP_SIZE):
                    writer.write_table(order.slice(start, ROW_GROUP_SIZE).cast(schema))
                if order.num_rows == 0:
                    writer.write_table(schema.empty_table())
            os.replace(tmp, self.output)
        except BaseException:
            _remove_quietly(tmp)
            raise
        shutil.rmtree(self.parts_dir, ignore_errors=True)
        return order.num_rows


def _read_part(path: Path, columns: list[str] | None = None) -> pa.Table:
    # Memory-mapped: merging a million rows of parts does not copy them into RAM first.
    with pa.memory_map(str(path), "r") as source:
        table = ipc.open_file(source).read_all()
    return table.select(columns) if columns else table


def _drop_repeated_keys(table: pa.Table, multi_root: bool) -> pa.Table:
    """Keep the last row of each key (a part re-written after a crash can repeat rows)."""
    if table.num_rows < 2:
        return table
    paths = table.column("path").to_numpy(zero_copy_only=False)
    same = paths[1:] == paths[:-1]
    if multi_root:
        roots = table.column("root").to_numpy(zero_copy_only=False)
        same &= roots[1:] == roots[:-1]
    if not same.any():
        return table
    keep = np.ones(table.num_rows, dtype=bool)
    keep[:-1] = ~same
    return table.filter(pa.array(keep))


def read_run_metadata(path: str | os.PathLike) -> dict:
    """The ``visbatch`` key-value metadata of an output file, as a dict."""
    meta = pq.read_schema(path).metadata or {}
    raw = meta.get(METADATA_KEY)
    return json.loads(raw) if raw else {}


def base_row(item: ImageItem, status: str, error: str | None, width: int | None, height: int | None,
             multi_root: bool) -> dict:
    row = {"path": item.relpath, "status": status, "error": error, "width": width, "height": height}
    if multi_root:
        row["root"] = item.root
    return row


# ----------------------------------------------------------------------------
# Colormaps and overlays
# ----------------------------------------------------------------------------

# Anchor colours of perceptual colormaps (from their published definitions),
# interpolated into 256-entry lookup tables.
_COLORMAP_ANCHORS = {
    "turbo": [(48, 18, 59), (70, 107, 227), (41, 187, 236), (49, 242, 153), (164, 252, 60),
              (237, 208, 58), (251, 128, 34), (209, 48, 8), (122, 4, 3)],
    "viridis": [(68, 1, 84), (72, 40, 120), (62, 74, 137), (49, 104, 142), (38, 130, 142),
                (31, 158, 137), (53, 183, 121), (109, 205, 89), (180, 222, 44), (253, 231, 37)],
    "inferno": [(0, 0, 4), (40, 11, 84), (101, 21, 110), (159, 42, 99), (212, 72, 66),
                (245, 125, 21), (250, 193, 39), (252, 255, 164)],
    "jet": [(0, 0, 128), (0, 0, 255), (0, 128, 255), (0, 255, 255), (128, 255, 128),
            (255, 255, 0), (255, 128, 0), (255, 0, 0), (128, 0, 0)],
    "gray": [(0, 0, 0), (255, 255, 255)],
    # Diverging, for signed maps: blue for negative, white at 0, red for positive.
    "coolwarm": [(59, 76, 192), (141, 176, 254), (221, 221, 221), (244, 154, 123), (180, 4, 38)],
}
COLORMAPS = tuple(_COLORMAP_ANCHORS)


def colormap_lut(name: str) -> np.ndarray:
    """A [256, 3] uint8 lookup table for colormap ``name``."""
    if name not in _COLORMAP_ANCHORS:
        raise ValueError(f"unknown colormap {name!r} (choose from {', '.join(COLORMAPS)})")
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


def render_overlay(image: np.ndarray, heatmap: np.ndarray, colormap: str = "turbo", alpha: float = 0.5,
                   style: str = "blend", signed: bool = False,
                   box: tuple[float, float, float, float] = (0.0, 0.0, 1.0, 1.0)) -> np.ndarray:
    """Blend ``heatmap`` over the part ``box`` of ``image`` (HWC uint8) that it describes.

    ``box`` is (x0, y0, x1, y1) in units of the image size: the region the
    model saw (a centre crop leaves the borders uncoloured). ``style`` is
    ``blend`` (one picture) or ``side-by-side`` (image | blend).
    """
    h, w = image.shape[:2]
    x0, y0, x1, y1 = (round(box[0] * w), round(box[1] * h), round(box[2] * w), round(box[3] * h))
    box_w, box_h = max(1, x1 - x0), max(1, y1 - y0)
    scaled = normalize_map(heatmap, signed)
    resized = np.asarray(Image.fromarray(scaled.astype(np.float32), mode="F").resize((box_w, box_h), Image.Resampling.BILINEAR))
    colours = colormap_lut(colormap)[np.clip(np.round(resized * 255), 0, 255).astype(np.uint8)]
    # Clip the box to the image (a padded input reaches past the borders).
    cx0, cy0, cx1, cy1 = max(x0, 0), max(y0, 0), min(x1, w), min(y1, h)
    blended = image.copy()
    if cx1 > cx0 and cy1 > cy0:
        region = image[cy0:cy1, cx0:cx1].astype(np.float32)
        tint = colours[cy0 - y0:cy1 - y0, cx0 - x0:cx1 - x0].astype(np.float32)
        blended[cy0:cy1, cx0:cx1] = (region * (1 - alpha) + tint * alpha).round().astype(np.uint8)
    if style == "blend":
        return blended
    if style == "side-by-side":
        gap = np.full((h, max(2, w // 100), 3), 255, dtype=np.uint8)
        return np.concatenate([image, gap, blended], axis=1)
    raise ValueError(f"unknown overlay style {style!r} (blend or side-by-side)")


class OverlayWriter:
    """Writes PNGs (or other per-image files) under ``folder``, mirroring the inputs' relative paths,
    in background threads.

    At most ``max_pending`` encodes are queued, so a slow disk slows the run
    rather than filling memory. Errors are collected and reported by
    :meth:`close`.
    """

    def __init__(self, folder: str | os.PathLike, threads: int = 2, max_pending: int = 64,
                 suffix: str = ".png", encode=None):
        self.suffix = suffix
        self.encode = encode or _png_bytes
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="overlay")
        self._slots = threading.BoundedSemaphore(max_pending)
        self._futures: list[Future] = []
        self.errors: list[str] = []
        self.written = 0
        self._lock = threading.Lock()

    def path_for(self, item: ImageItem) -> Path:
        return self.folder / (os.path.splitext(item.relpath)[0] + self.suffix)

    def submit(self, item: ImageItem, picture: np.ndarray) -> Path:
        target = self.path_for(item)
        self._slots.acquire()
        future = self._pool.submit(self._encode, target, picture)
        future.add_done_callback(lambda _: self._slots.release())
        self._futures.append(future)
        self._futures = [f for f in self._futures if not f.done()]
        return target

    def _encode(self, target: Path, picture: np.ndarray) -> None:
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            buffer = self.encode(picture)
            atomic_write_bytes(target, buffer)
            with self._lock:
                self.written += 1
        except Exception as exc:
            with self._lock:
                self.errors.append(f"{target}: {exc}")

    def close(self) -> None:
        self._pool.shutdown(wait=True)


def _png_bytes(picture: np.ndarray) -> bytes:
    import io

    out = io.BytesIO()
    # compress_level 1: several times faster than the default for ~10% larger files.
    Image.fromarray(picture).save(out, format="PNG", compress_level=1)
    return out.getvalue()


def npy_bytes(array: np.ndarray) -> bytes:
    import io

    out = io.BytesIO()
    np.save(out, array)
    return out.getvalue()


def iter_rows(path: str | os.PathLike, columns: Iterable[str] | None = None) -> list[dict]:
    """All rows of an output file as dicts (for tests and small outputs)."""
    return pq.read_table(path, columns=list(columns) if columns else None).to_pylist()


def merge_outputs(parts: list[str], output: str, overwrite: bool = False) -> int:
    """Merge the Parquet outputs of ``--shard I/N`` runs into one, in sorted path order.

    The parts must come from the same task, model and columns (their
    ``visbatch`` metadata says so); a path present in two parts is an error
    (shards never overlap). Written atomically; returns the row count.
    """
    if not parts:
        raise OutputError("merge needs at least one part")
    if os.path.exists(output) and not overwrite:
        raise OutputError(f"output {output} exists; pass --overwrite to replace it")
    metas, tables = [], []
    for part in parts:
        if not os.path.isfile(part):
            raise OutputError(f"part not found: {part}")
        try:
            tables.append(pq.read_table(part))
        except Exception as exc:
            raise OutputError(f"cannot read {part}: {str(exc).splitlines()[0]}")
        metas.append(read_run_metadata(part))
    first = metas[0]
    for part, meta in zip(parts[1:], metas[1:]):
        for key in ("task", "schema"):
            if meta.get(key) != first.get(key):
                raise OutputError(f"{part} differs from {parts[0]} in {key}; only parts of one job can be merged")
        if (meta.get("model") or {}).get("checksum") != (first.get("model") or {}).get("checksum"):
            raise OutputError(f"{part} was made with other weights than {parts[0]}")
    schemas = {t.schema.remove_metadata() for t in tables}
    if len(schemas) > 1:
        raise OutputError("the parts have different columns")
    roots = sorted({r for meta in metas for r in meta.get("roots", [])})
    table = pa.concat_tables([t.replace_schema_metadata(None) for t in tables])
    if "root" not in table.column_names:
        part_roots = [(meta.get("roots") or [""])[0] for meta in metas]
        if len(set(part_roots)) > 1:
            root_column = pa.array([r for r, t in zip(part_roots, tables) for _ in range(t.num_rows)])
            table = table.add_column(table.schema.get_field_index("path") + 1, ROOT_FIELD, root_column)
    keys = ["root", "path"] if "root" in table.column_names else ["path"]
    table = table.sort_by([(k, "ascending") for k in keys])
    key_columns = [table.column(k).to_numpy(zero_copy_only=False) for k in keys]
    same = np.ones(max(table.num_rows - 1, 0), dtype=bool)
    for column in key_columns:
        same &= column[1:] == column[:-1]
    if same.any():
        at = int(np.flatnonzero(same)[0])
        raise OutputError(f"{key_columns[-1][at]} appears in two parts (were the shards of different jobs?)")
    meta = {**first, "roots": roots, "rows": table.num_rows, "merged_from": [os.path.abspath(p) for p in parts],
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    if any(m.get("task_options") != first.get("task_options") for m in metas):
        meta.pop("task_options", None)  # they differ: no single set describes the merged rows
    schema = table.schema.with_metadata({METADATA_KEY: json.dumps(meta).encode()})
    out = Path(output)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    os.close(fd)
    try:
        with pq.ParquetWriter(tmp, schema, compression="zstd") as writer:
            for start in range(0, max(table.num_rows, 1), ROW_GROUP_SIZE):
                writer.write_table(table.slice(start, ROW_GROUP_SIZE).cast(schema))
        os.replace(tmp, out)
    except BaseException:
        _remove_quietly(tmp)
        raise
    return table.num_rows
