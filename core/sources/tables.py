"""Parquet / Arrow tables of images: one row per image, as Hugging Face ``datasets`` exports them.

``--image-column`` (default ``image``) holds the image as bytes, as a ``{bytes, path}``
struct (HF's Image feature), or as a path/URL string (relative paths are relative to the
table's folder). The ``--caption-column`` (default ``caption``, when the table has one) is
what ``--sidecar`` reads; ``--keep-columns`` pass through to the output. Listing reads
every column but the images; the decode workers read the image column one row group at a
time and keep the last one (rows are read in order, so each group is read once per worker).

Row keys are ``TABLE/ROW`` with the row number zero-padded (``train.parquet/000000042``),
so key order is table order.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from visbatch.core.plan import local_path_of
from visbatch.core.sources.base import FileBytes, ImageDecodeError, ImageItem, InputError, content_hash
from visbatch.core.sources.local import names_under
from visbatch.core.sources.remote import (
    filesystem,
    is_url,
    join_url,
    modification_time,
    open_input,
    read_range,
    storage_error,
    with_retries,
)

TABLE_SUFFIXES = (".parquet", ".arrow", ".feather")
DEFAULT_IMAGE_COLUMN = "image"
DEFAULT_CAPTION_COLUMN = "caption"
ROW_DIGITS = 9


def is_table_name(name: str) -> bool:
    return name.lower().endswith(TABLE_SUFFIXES)


def tables_in_folder(root: str, recursive: bool = True) -> list[str]:
    """Table names (relative, sorted) under a local folder: a folder of Parquet files as
    img2dataset writes it, or the ``.arrow`` files of ``datasets``' ``save_to_disk``."""
    return names_under(root, recursive, is_table_name)


# The column an image table without an `image` column holds its images in: img2dataset names it
# after the encoding (`jpg`, `png`, `webp`).
_IMAGE_COLUMN_FALLBACKS = ("jpg", "jpeg", "png", "webp")


def _parquet(handle, location: str):
    import pyarrow.parquet as pq

    if location.lower().endswith(".parquet"):
        return pq.ParquetFile(handle)
    return None


def _read_arrow(handle):
    import pyarrow as pa
    import pyarrow.feather as feather

    try:
        return feather.read_table(handle)
    except pa.ArrowInvalid:
        handle.seek(0)
        return pa.ipc.open_stream(handle).read_all()


# The decode worker's last row group: (location, group) -> list of cell values.
_GROUP_CACHE: dict[tuple[str, int], list] = {}


def _image_cells(location: str, column: str, group: int) -> list:
    key = (location, group)
    cells = _GROUP_CACHE.get(key)
    if cells is None:
        with open_input(location) as handle:
            parquet = _parquet(handle, location)
            if parquet is not None:
                cells = parquet.read_row_group(group, columns=[column]).column(0).to_pylist()
            else:
                cells = _read_arrow(handle).column(column).to_pylist()
        _GROUP_CACHE.clear()
        _GROUP_CACHE[key] = cells
    return cells


@dataclass(frozen=True)
class TableCell:
    """One row of an image table."""

    location: str  # the table: a local path or a URL
    table_name: str
    column: str
    group: int  # row group (0 for Arrow files)
    row_in_group: int
    mtime: float
    caption: str | None
    kept: tuple[tuple[str, object], ...]
    kept_fields: tuple = ()  # pa.Field of each kept column, shared by every cell of the table
    named: str | None = None  # the file or URL a path cell names (read, so an input of the run)

    @property
    def shard(self) -> str | None:
        return None

    def inputs(self) -> tuple[str, ...]:
        """What reading this cell reads: the table, and the file its path names."""
        return (self.location, self.named) if self.named else (self.location,)

    def _cell_bytes(self) -> bytes:
        try:
            cell = _image_cells(self.location, self.column, self.group)[self.row_in_group]
        except (OSError, IndexError) as exc:
            raise ImageDecodeError(f"cannot read row from {self.table_name}: {exc}")
        if isinstance(cell, dict):
            data, path = cell.get("bytes"), cell.get("path")
            if data is None and path:
                cell = path
            else:
                cell = data
        if cell is None:
            raise ImageDecodeError(f"empty {self.column!r} cell")
        if isinstance(cell, str):
            target = resolve_cell_path(self.location, cell)
            try:
                return read_range(target)
            except OSError as exc:
                raise ImageDecodeError(f"cannot read {cell}: {exc.strerror or exc}")
        if isinstance(cell, (bytes, bytearray, memoryview)):
            return bytes(cell)
        raise ImageDecodeError(f"{self.column!r} cell holds {type(cell).__name__}, not image bytes or a path")

    def read(self) -> FileBytes:
        data = self._cell_bytes()
        return FileBytes(data, len(data), self.mtime, content_hash(data))

    def sidecar(self, suffix: str) -> bytes | None:
        if suffix == ".txt" and self.caption is not None:
            return self.caption.encode("utf-8")
        return None

    def unchanged(self, row: dict) -> bool:
        try:
            return self.read().content_hash == row.get("content_hash")
        except ImageDecodeError:
            return False

    def columns(self) -> dict:
        return dict(self.kept)


def resolve_cell_path(location: str, cell: str) -> str:
    """The file or URL a path cell names: absolute as written (a file URL as its path), else
    relative to the table's folder."""
    local = local_path_of(cell)
    if local is None:
        return cell
    if os.path.isabs(local):
        return local
    base = location.rsplit("/", 1)[0] if is_url(location) else os.path.dirname(location)
    return join_url(base, local)


def _named_paths(parquet, table, column: str, group: int, field) -> list | None:
    """The paths the image column names in one row group (a string column, or the ``path`` of a
    ``{bytes, path}`` struct, read without the bytes); None when it names none."""
    import pyarrow as pa

    if pa.types.is_string(field.type) or pa.types.is_large_string(field.type):
        name = column
    elif pa.types.is_struct(field.type) and field.type.get_field_index("path") >= 0:
        name = f"{column}.path"
    else:
        return None
    if parquet is not None:
        values = parquet.read_row_group(group, columns=[name]).column(0)
    else:
        values = table.column(column)
    if name != column:
        values = values.combine_chunks().field("path") if hasattr(values, "combine_chunks") else values.field("path")
    return values.to_pylist()


def list_table(
    location: str,
    image_column: str | None = None,
    caption_column: str | None = None,
    keep_columns=(),
    limit: int | None = None,
    root: str | None = None,
) -> list[ImageItem]:
    """Items of one table, without reading its images. Keys are ``NAME/ROW`` with ``NAME`` the
    table's path relative to ``root`` (its folder when no root is given)."""
    import pyarrow as pa

    if is_url(location):
        root, _, name = location.rstrip("/").rpartition("/")
        try:
            fs, path = filesystem(location)
            mtime = modification_time(with_retries(lambda: fs.info(path), location))
        except OSError as exc:
            raise storage_error(exc, location)
    else:
        if not os.path.isfile(location):
            raise InputError(f"input not found: {location}")
        location = os.path.abspath(location)
        if root is None:
            root, name = os.path.dirname(location), os.path.basename(location)
        else:
            root = os.path.abspath(root)
            name = os.path.relpath(location, root).replace(os.sep, "/")
        mtime = os.stat(location).st_mtime
    try:
        with open_input(location) as handle:
            parquet = _parquet(handle, location)
            schema = parquet.schema_arrow if parquet is not None else None
            table = None
            if parquet is None:
                table = _read_arrow(handle)
                schema = table.schema
            names = schema.names
            column = image_column or DEFAULT_IMAGE_COLUMN
            if not image_column and column not in names:
                column = next((c for c in _IMAGE_COLUMN_FALLBACKS if c in names), column)
            if caption_column == DEFAULT_CAPTION_COLUMN and caption_column not in names:
                caption_column = None  # the default names no column here: the table has no captions
            if column not in names:
                raise InputError(
                    f"{location}: no image column {column!r}"
                    + (
                        ""
                        if image_column
                        else f" nor {', '.join(_IMAGE_COLUMN_FALLBACKS)} (name it with --image-column)"
                    )
                    + f"; columns: {', '.join(names)}"
                )
            missing = [c for c in [caption_column, *keep_columns] if c and c not in names]
            if missing:
                option = "--caption-column" if missing[0] == caption_column else "--keep-columns"
                raise InputError(f"{location}: {option} {missing[0]!r} names no column; columns: {', '.join(names)}")
            if column in keep_columns:
                raise InputError(f"--keep-columns cannot pass through the image column {column!r}")
            reserved = {"path", "status", "error", "width", "height", "shard", "root", "file_size", "file_mtime"}
            reserved |= {"content_hash", "path_bytes"}
            clash = [c for c in keep_columns if c in reserved]
            if clash:
                raise InputError(f"--keep-columns {clash[0]!r}: visbatch writes a column of that name")
            kept_fields = tuple(schema.field(c) for c in keep_columns)
            wanted = [c for c in [caption_column, *keep_columns] if c]
            groups = range(parquet.num_row_groups) if parquet is not None else range(1)
            items: list[ImageItem] = []
            row_number = 0
            for group in groups:
                if parquet is not None:
                    rows = parquet.metadata.row_group(group).num_rows
                    values = parquet.read_row_group(group, columns=wanted).to_pydict() if wanted else {}
                else:
                    rows = table.num_rows
                    values = table.select(wanted).to_pydict() if wanted else {}
                named = _named_paths(parquet, table, column, group, schema.field(column))
                for i in range(rows):
                    caption = values[caption_column][i] if caption_column else None
                    kept = tuple((c, values[c][i]) for c in keep_columns)
                    cell = TableCell(
                        location,
                        name,
                        column,
                        group,
                        i,
                        mtime,
                        None if caption is None else str(caption),
                        kept,
                        kept_fields,
                        resolve_cell_path(location, named[i]) if named and named[i] else None,
                    )
                    items.append(ImageItem(root, f"{name}/{row_number:0{ROW_DIGITS}d}", cell))
                    row_number += 1
                if limit is not None and len(items) >= limit:
                    break
    except InputError:
        raise
    except OSError as exc:
        raise storage_error(exc, location)
    except (pa.ArrowException, ValueError) as exc:
        raise InputError(f"cannot read table {location}: {exc}")
    return items
