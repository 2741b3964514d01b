"""The results writer: one Parquet file per run, one row per input, resumable.

Rows arrive one batch at a time. Each batch is written at once as an Arrow
IPC *part* file in ``OUTPUT.parts/`` (temp file, then rename), so a run killed
at any point, SIGKILL included, loses at most the batches in flight. When
the run finishes, the parts are merged in sorted key order into the final
Parquet file, streamed in row groups to a temp file that is renamed into
place: a reader never sees a half-written output.

Every row records the file it came from (``file_size``, ``file_mtime``,
``content_hash``), so ``--resume`` can tell a done row from a stale one;
the run's options are in the parts folder's ``run.json`` and the output's
metadata, so a resume with other options is refused, naming them. The
output is locked (``OUTPUT.lock``) for the whole run.
"""

from __future__ import annotations

import fnmatch
import json
import os
import stat
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc
import pyarrow.parquet as pq

from visbatch.core.errors import FatalError, UsageError
from visbatch.core.files import (
    OutputLock,
    atomic_path,
    atomic_write_bytes,
    describe_os_error,
    remove_owned_folder,
    remove_quietly,
    utc_now,
)
from visbatch.core.images import ImageItem, display_path, path_bytes
from visbatch.core.sources import item_columns

BASE_FIELDS = [
    pa.field("path", pa.string(), nullable=False),
    pa.field("status", pa.string(), nullable=False),
    pa.field("error", pa.string()),
    pa.field("width", pa.int32()),
    pa.field("height", pa.int32()),
    # The file the row was computed from: what --resume and the embedding cache check.
    pa.field("file_size", pa.int64()),
    pa.field("file_mtime", pa.float64()),
    pa.field("content_hash", pa.string()),
    # The raw bytes of a path that is not valid UTF-8 (``path`` then shows them as \xNN).
    pa.field("path_bytes", pa.binary()),
]
BASE_COLUMNS = [f.name for f in BASE_FIELDS]
FINGERPRINT_COLUMNS = ("file_size", "file_mtime", "content_hash")
ROOT_FIELD = pa.field("root", pa.string(), nullable=False)
ROW_GROUP_SIZE = 8192
METADATA_KEY = b"visbatch"
# What a resumed run must share with the run it continues; task_options are compared key by key.
RESUME_KEYS = (
    "task",
    "model",
    "roots",
    "shard",
    "hash",
    "schema",
    "task_options",
    "preprocessing",
    "precision",
    "max_pixels",
)


class OutputError(UsageError):
    """The output cannot be written as asked (exists, aimed at an input, in use): exit 2.
    I/O failures while writing are :class:`~visbatch.core.errors.FatalError` (exit 3)."""


class ResumeMismatch(OutputError):
    """``--resume`` of a run made with other options (exit 2)."""


def parts_dir_for(output: str | os.PathLike) -> Path:
    output = Path(output)
    return output.with_name(output.name + ".parts")


# What a results writer puts in its parts folder (and so what it may remove there): parts,
# the run's options, and the temp files of both while they are written.
_PARTS_FOLDER_NAMES = ("part-*.arrow", "run.json", ".part-*.tmp", ".run.json.*.tmp")


def foreign_entries(parts_dir: str | os.PathLike) -> list[str]:
    """Entries of a parts folder that no results writer made (sorted); [] when it does not exist.
    Ours are plain files with no other hard link, under a writer's names, holding what a writer
    writes (an Arrow file; run.json's options)."""
    try:
        names = os.listdir(parts_dir)
    except (FileNotFoundError, NotADirectoryError):
        return []
    except OSError as exc:
        raise FatalError(f"cannot read {describe_os_error(exc, parts_dir)}") from exc
    return sorted(name for name in names if not _made_by_a_writer(os.path.join(parts_dir, name), name))


def _made_by_a_writer(path: str, name: str) -> bool:
    if not any(fnmatch.fnmatchcase(name, p) for p in _PARTS_FOLDER_NAMES):
        return False
    try:
        st = os.lstat(path)
        if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
            return False
        with open(path, "rb") as f:
            head = f.read(1 << 16)
    except OSError:
        return False
    if name.startswith("."):  # a temp file a killed writer left (empty, or a part begun)
        return not head or head.startswith(b"ARROW1") or head.startswith(b"{")
    if name.endswith(".arrow"):
        return head.startswith(b"ARROW1")
    try:
        options = json.loads(head)
    except ValueError:
        return False
    return isinstance(options, dict) and "task" in options


def check_parts_folder(parts_dir: str | os.PathLike) -> None:
    """Refuse a parts folder holding anything a results writer did not make: visbatch removes the
    parts folder's own files when the run ends and would never remove those."""
    if os.path.lexists(parts_dir) and (os.path.islink(parts_dir) or not os.path.isdir(parts_dir)):
        raise OutputError(f"{parts_dir} exists and is not a folder visbatch made; move it or choose another -o")
    foreign = foreign_entries(parts_dir)
    if foreign:
        raise OutputError(
            f"{parts_dir} holds {len(foreign)} entries visbatch did not write (e.g. {foreign[0]}); "
            "move them or choose another -o"
        )


def row_key(row: dict, default_root: str) -> tuple[str, str]:
    """(root, relative path) of an output row, the raw path when ``path_bytes`` holds it."""
    raw = row.get("path_bytes")
    return row.get("root") or default_root, os.fsdecode(raw) if raw is not None else row["path"]


def base_row(
    item: ImageItem,
    status: str,
    error: str | None,
    width: int | None,
    height: int | None,
    multi_root: bool,
    fingerprint: dict | None = None,
) -> dict:
    row = {
        "path": display_path(item.relpath),
        "status": status,
        "error": error,
        "width": width,
        "height": height,
        "path_bytes": path_bytes(item.relpath),
    }
    row.update(fingerprint or {})
    row.update(item_columns(item))
    if multi_root:
        row["root"] = display_path(item.root)
    return row


def output_schema(task_fields: Sequence[pa.Field], multi_root: bool, source_fields: Sequence[pa.Field]) -> pa.Schema:
    """The output's columns: the base ones, ``root`` with several roots, the sources' (``shard``,
    ``--keep-columns``), then the task's. A column passed through with ``--keep-columns`` that
    visbatch writes itself is refused, naming the clash."""
    fixed = list(BASE_FIELDS) + ([ROOT_FIELD] if multi_root else []) + [pa.field("shard", pa.string())]
    own = {f.name for f in fixed} | {f.name for f in task_fields}
    for f in source_fields:
        if f.name in own and f.name != "shard":
            raise OutputError(
                f"--keep-columns {f.name!r}: visbatch writes a column of that name; "
                "rename it in the input or leave it out"
            )
    fields = list(BASE_FIELDS) + ([ROOT_FIELD] if multi_root else []) + list(source_fields) + list(task_fields)
    names = [f.name for f in fields]
    if len(set(names)) != len(names):
        raise ValueError(f"duplicate column names in output schema: {names}")
    return pa.schema(fields)


def describe_differences(previous: dict, current: dict) -> list[str]:
    """``name: old -> new`` for each resume key (and each task option) that differs."""
    diffs = []
    for key in RESUME_KEYS:
        old, new = previous.get(key), current.get(key)
        if key == "task_options" and isinstance(old, dict) and isinstance(new, dict):
            for option in sorted(set(old) | set(new)):
                if old.get(option) != new.get(option):
                    diffs.append(f"{option}: {_short(old.get(option))} -> {_short(new.get(option))}")
        elif key == "model" and isinstance(old, dict) and isinstance(new, dict):
            if (old.get("spec"), old.get("checksum")) != (new.get("spec"), new.get("checksum")):
                diffs.append(f"model: {old.get('spec')} -> {new.get('spec')}")
        elif key == "roots" and old != new and isinstance(old, list) and isinstance(new, list):
            added, gone = [r for r in new if r not in old], [r for r in old if r not in new]
            diffs.append(
                "input roots: "
                + ", ".join([*(f"added {r}" for r in added[:2]), *(f"without {r}" for r in gone[:2])] or ["reordered"])
            )
        elif key == "shard" and old != new:
            shown = lambda s: f"{s[0]}/{s[1]}" if isinstance(s, list) and len(s) == 2 else "none"  # noqa: E731
            diffs.append(f"--shard: {shown(old)} -> {shown(new)}")
        elif key == "schema" and any(d.startswith("input roots") for d in diffs):
            continue  # the root column comes and goes with the roots: said above
        elif key == "schema" and old != new and isinstance(old, list) and isinstance(new, list):
            # Name the columns that differ, not the first 60 characters of two long lists.
            gone, added = [c for c in old if c not in new], [c for c in new if c not in old]
            diffs.append(
                "columns: " + ", ".join([*(f"-{c}" for c in gone[:4]), *(f"+{c}" for c in added[:4])] or ["reordered"])
            )
        elif old != new:
            diffs.append(f"{key}: {_short(old)} -> {_short(new)}")
    return diffs


def _short(value) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= 60 else text[:57] + "..."


class ResultsWriter:
    """One Parquet file per run, one row per input, resumable (see module doc).

    ``task_fields`` are the task's columns (without the base ones). ``metadata`` is
    the run's key-value metadata, stored as JSON under the key ``visbatch``.
    ``multi_root`` adds a ``root`` column when inputs came from several roots; ``source_fields``
    are the columns the input sources add (``shard``, ``--keep-columns``).
    The output is locked from construction until :meth:`finalize` or :meth:`close`.
    """

    def __init__(
        self,
        output: str | os.PathLike,
        task_fields: Sequence[pa.Field],
        metadata: dict,
        *,
        multi_root: bool = False,
        source_fields: Sequence[pa.Field] = (),
        resume: bool = False,
        overwrite: bool = False,
    ):
        self.output = Path(output)
        self.parts_dir = parts_dir_for(self.output)
        self.schema = output_schema(task_fields, multi_root, source_fields)
        self.metadata = metadata
        self.multi_root = multi_root
        self._part_counter = 0
        self._created_parts_dir = False
        self._lock = OutputLock(self.output)
        self._lock.acquire()
        try:
            self._prepare(resume, overwrite)
        except BaseException:
            self._lock.release()
            raise

    # -- life cycle -----------------------------------------------------------------

    def _prepare(self, resume: bool, overwrite: bool) -> None:
        if self.output.is_dir():
            raise OutputError(f"output {self.output} is a folder; give a .parquet file path")
        check_parts_folder(self.parts_dir)
        try:
            if overwrite:
                # An earlier run's parts go (only the files a writer makes; check_parts_folder
                # refused anything else). The old output stays until the new one replaces it.
                self._remove_parts_files()
            elif resume:
                if self.output.exists():
                    self._adopt_finished_output()
            else:
                if self.output.exists():
                    raise OutputError(
                        f"output {self.output} exists; pass --overwrite to replace it or --resume to add to it"
                    )
                if self.parts_dir.exists():
                    raise OutputError(
                        f"an interrupted run left {self.parts_dir}; pass --resume to finish it "
                        "or --overwrite to start over"
                    )
            self._created_parts_dir = not self.parts_dir.exists()
            self.parts_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise FatalError(f"cannot create {describe_os_error(exc, self.parts_dir)}") from exc
        run_file = self.parts_dir / "run.json"
        if resume and run_file.exists():
            try:
                previous = json.loads(run_file.read_text())
            except (OSError, ValueError) as exc:
                raise FatalError(f"--resume: cannot read {run_file}: {exc}") from exc
            self._check_compatible(previous)
        else:
            atomic_write_bytes(run_file, json.dumps(self._compat_keys(self.metadata)).encode())

    @staticmethod
    def _compat_keys(metadata: dict) -> dict:
        return {k: metadata.get(k) for k in RESUME_KEYS}

    def _check_compatible(self, previous: dict) -> None:
        diffs = describe_differences(previous, self._compat_keys(self.metadata))
        if diffs:
            raise ResumeMismatch(
                "--resume: the earlier run differs ("
                + "; ".join(diffs[:4])
                + (f"; and {len(diffs) - 4} more" if len(diffs) > 4 else "")
                + "); rerun with the same options, or pass --overwrite to start over"
            )

    def _adopt_finished_output(self) -> None:
        """Make a finished output one of the parts, so a resumed run adds to it."""
        try:
            table = pq.read_table(self.output)
        except Exception as exc:
            raise OutputError(f"--resume: cannot read existing output {self.output}: {str(exc).splitlines()[0]}")
        old_meta = read_run_metadata(self.output)
        if not old_meta:
            raise OutputError(f"--resume: {self.output} was not written by visbatch; choose another -o")
        self._check_compatible(old_meta)
        if table.schema.remove_metadata() != self.schema:
            raise OutputError(f"--resume: {self.output} has different columns; pass --overwrite to start over")
        self.parts_dir.mkdir(parents=True, exist_ok=True)
        self._write_part(table.replace_schema_metadata(None), name=f"part-{0:020d}-finished.arrow")

    def close(self) -> None:
        """Release the output without finalizing: an interrupted or failed run keeps its parts for
        ``--resume``; a parts folder this run created and wrote no part into is removed, so a run
        that failed before its first batch leaves nothing behind."""
        if self._created_parts_dir and self.parts_dir.exists() and not self._part_paths():
            self._remove_parts_files()
            remove_owned_folder(self.parts_dir)
        self._lock.release()

    def _remove_parts_files(self) -> None:
        """Remove the files a results writer makes in the parts folder (parts, run.json, their temp
        files), never anything else, never through a link."""
        if not self.parts_dir.is_dir() or self.parts_dir.is_symlink():
            return
        for name in os.listdir(self.parts_dir):
            path = self.parts_dir / name
            if _made_by_a_writer(str(path), name):
                remove_quietly(path)

    def _remove_parts_folder(self) -> None:
        """After the merge: the parts folder's own files, then the folder if nothing else is there."""
        self._remove_parts_files()
        remove_owned_folder(self.parts_dir)

    # -- parts ----------------------------------------------------------------------

    def _part_paths(self) -> list[Path]:
        return sorted(self.parts_dir.glob("part-*.arrow"))

    def _write_part(self, table: pa.Table, name: str | None = None) -> None:
        if name is None:
            self._part_counter += 1
            # Names sort in writing order across runs, so a redone row's part comes after the old one.
            name = f"part-{time.time_ns():020d}-{self._part_counter:08d}.arrow"
        write_part(self.parts_dir, table, name)

    def done_rows(self) -> dict[tuple[str, str], dict]:
        """Key (root, relpath) -> {status, file_size, file_mtime, content_hash} of every row that
        earlier runs wrote (the last one for a key written twice)."""
        done: dict[tuple[str, str], dict] = {}
        roots = self.metadata.get("roots", [])
        default_root = roots[0] if roots else ""
        columns = ["path", "path_bytes", "status", *FINGERPRINT_COLUMNS] + (["root"] if self.multi_root else [])
        for part in self._part_paths():
            for row in _read_part(part, columns).to_pylist():
                done[row_key(row, default_root)] = row
        return done

    def write_rows(self, rows: list[dict]) -> None:
        """Write the rows of one batch as a part (durable once this returns)."""
        if not rows:
            return
        self._write_part(rows_table(self.schema, rows))

    def finalize(
        self, reduce: Callable[[pa.Table], pa.Table] | None = None, drop: set[tuple[str, str]] | None = None
    ) -> int:
        """Merge the parts in sorted order into the output, atomically. Returns the row count.

        ``drop`` are keys whose rows must not survive (inputs deleted since they were
        written, stale rows). ``reduce(table) -> table`` (a task's reduce stage) sees every
        row of the run, resumed ones included, before the write; it may fill or change
        columns but must keep one row per input, in order.
        """
        try:
            parts = self._part_paths()
            if reduce is None and not drop and _parts_in_key_order(parts, self.multi_root):
                # A fresh run over a stream writes its parts in key order: copied part by part,
                # the merge holds one row group, not the whole table (10M rows stay cheap).
                return self._write_in_order(parts)
            tables = [_read_part(p) for p in parts]
            table = pa.concat_tables(tables) if tables else self.schema.empty_table()
            table = table.cast(self.schema)
            if drop:
                roots = self.metadata.get("roots", [])
                default_root = roots[0] if roots else ""
                keys = [
                    row_key(r, default_root)
                    for r in table.select(["path", "path_bytes"] + (["root"] if self.multi_root else [])).to_pylist()
                ]
                table = table.filter(pa.array([k not in drop for k in keys], type=pa.bool_()))
            sort_keys = [("root", "ascending"), ("path", "ascending")] if self.multi_root else [("path", "ascending")]
            # A stable sort keeps parts in writing order within a key: the last row is the newest.
            order = table.sort_by(sort_keys) if table.num_rows else table
            order = _drop_repeated_keys(order, self.multi_root)
            if reduce is not None:
                reduced = reduce(order)
                if reduced.num_rows != order.num_rows or reduced.column("path") != order.column("path"):
                    raise RuntimeError("a reduce stage must keep one row per input, in order")
                order = reduced.cast(self.schema)
            meta = dict(self.metadata)
            meta["finished_at"] = utc_now()
            meta["rows"] = order.num_rows
            write_parquet(self.output, order, meta)
            self._remove_parts_folder()
        finally:
            self._lock.release()
        return order.num_rows

    def _write_in_order(self, parts: list[Path]) -> int:
        rows = sum(_part_rows(p) for p in parts)
        meta = {**self.metadata, "finished_at": utc_now(), "rows": rows}
        schema = self.schema.remove_metadata().with_metadata({METADATA_KEY: json.dumps(meta).encode()})
        with atomic_path(self.output) as tmp:
            # A file object, not the path: pyarrow would read a path with a colon as a URI.
            with pa.OSFile(tmp, "wb") as sink, pq.ParquetWriter(sink, schema, compression="zstd") as writer:
                pending: list[pa.Table] = []
                held = 0
                for part in parts:
                    table = _read_part(part, mapped=False).cast(self.schema).replace_schema_metadata(schema.metadata)
                    pending.append(table)
                    held += table.num_rows
                    if held >= ROW_GROUP_SIZE:  # full row groups out, the remainder held for the next
                        joined = pa.concat_tables(pending)
                        full = held // ROW_GROUP_SIZE * ROW_GROUP_SIZE
                        writer.write_table(joined.slice(0, full), row_group_size=ROW_GROUP_SIZE)
                        pending, held = [joined.slice(full)], held - full
                if held:
                    writer.write_table(pa.concat_tables(pending))
                elif rows == 0:
                    writer.write_table(schema.empty_table())
        self._remove_parts_folder()
        return rows


def rows_table(schema: pa.Schema, rows: list[dict]) -> pa.Table:
    return pa.Table.from_pydict({f.name: [row.get(f.name) for row in rows] for f in schema}, schema=schema)


def write_part(parts_dir: Path, table: pa.Table, name: str) -> None:
    """One part of a run's output, atomically (a worker of another engine writes its own)."""
    with atomic_path(parts_dir / name) as tmp:
        with pa.OSFile(tmp, "wb") as sink, ipc.new_file(sink, table.schema) as writer:
            writer.write_table(table)


def _part_rows(path: Path) -> int:
    try:
        with pa.memory_map(str(path), "r") as source:
            reader = ipc.open_file(source)
            return sum(reader.get_batch(i).num_rows for i in range(reader.num_record_batches))
    except (OSError, pa.ArrowInvalid) as exc:
        raise FatalError(f"cannot read part {path}: {str(exc).splitlines()[0]}; pass --overwrite to start over")


def _parts_in_key_order(parts: list[Path], multi_root: bool) -> bool:
    """Whether the parts, in writing order, hold strictly rising keys (so no key repeats and
    concatenating them is the sorted output). Reads only the key columns."""
    import pyarrow.compute as pc

    columns = ["root", "path"] if multi_root else ["path"]
    previous: tuple | None = None
    first: tuple
    last: tuple
    for part in parts:
        table = _read_part(part, columns=columns)
        n = table.num_rows
        if n == 0:
            continue
        path = table.column("path")
        if multi_root:
            root = table.column("root")
            r0, r1, p0, p1 = root.slice(0, n - 1), root.slice(1), path.slice(0, n - 1), path.slice(1)
            rising = pc.or_(pc.less(r0, r1), pc.and_(pc.equal(r0, r1), pc.less(p0, p1)))
            first, last = (root[0].as_py(), path[0].as_py()), (root[n - 1].as_py(), path[n - 1].as_py())
        else:
            rising = pc.less(path.slice(0, n - 1), path.slice(1))
            first, last = (path[0].as_py(),), (path[n - 1].as_py(),)
        if None in first or None in last or (n > 1 and not pc.all(rising).as_py()):
            return False
        if previous is not None and not previous < first:
            return False
        previous = last
    return True


def write_parquet(path: str | os.PathLike, table: pa.Table, metadata: dict | None) -> None:
    """Write ``table`` (with the ``visbatch`` metadata) atomically, in row groups."""
    schema = table.schema.remove_metadata()
    if metadata is not None:
        schema = schema.with_metadata({METADATA_KEY: json.dumps(metadata).encode()})
    with atomic_path(path) as tmp:
        # A file object, not the path: pyarrow would read a path with a colon as a URI.
        with pa.OSFile(tmp, "wb") as sink, pq.ParquetWriter(sink, schema, compression="zstd") as writer:
            for start in range(0, table.num_rows, ROW_GROUP_SIZE):
                writer.write_table(table.slice(start, ROW_GROUP_SIZE).cast(schema))
            if table.num_rows == 0:
                writer.write_table(schema.empty_table())


def _read_part(path: Path, columns: list[str] | None = None, mapped: bool = True) -> pa.Table:
    # Memory-mapped: merging a million rows of parts does not copy them into RAM first.
    # Unmapped for a part-by-part copy, whose memory is freed once the part is written.
    try:
        with pa.memory_map(str(path), "r") if mapped else pa.OSFile(str(path), "rb") as source:
            table = ipc.open_file(source).read_all()
    except (OSError, pa.ArrowInvalid) as exc:
        raise FatalError(f"cannot read part {path}: {str(exc).splitlines()[0]}; pass --overwrite to start over")
    return table.select(columns) if columns else table


def _drop_repeated_keys(table: pa.Table, multi_root: bool) -> pa.Table:
    """Keep the last row of each key (a redone or re-written row repeats its key)."""
    if table.num_rows < 2:
        return table
    paths = table.column("path").to_numpy(zero_copy_only=False)
    same = paths[1:] == paths[:-1]
    raw = table.column("path_bytes").to_numpy(zero_copy_only=False)
    same &= raw[1:] == raw[:-1]
    if multi_root:
        roots = table.column("root").to_numpy(zero_copy_only=False)
        same &= roots[1:] == roots[:-1]
    if not same.any():
        return table
    keep = np.ones(table.num_rows, dtype=bool)
    keep[:-1] = ~same
    return table.filter(pa.array(keep))


def output_task(path: str | os.PathLike) -> str | None:
    """The ``task`` a visbatch output records, None for any other file (or none)."""
    try:
        task = read_run_metadata(path).get("task")
    except Exception:
        return None
    return task if isinstance(task, str) else None


def read_run_metadata(path: str | os.PathLike) -> dict:
    """The ``visbatch`` key-value metadata of an output file, as a dict ({} when there is none)."""
    meta = pq.read_schema(path).metadata or {}
    raw = meta.get(METADATA_KEY)
    try:
        return json.loads(raw) if raw else {}
    except ValueError:
        return {}
