"""Local inputs: folders walked deterministically, named files, ``-`` (paths on stdin),
manifests, ``--glob`` filters and ``--shard`` partitioning, and the fingerprint checks
``--resume`` makes on local files."""

from __future__ import annotations

import csv
import fnmatch
import hashlib
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path

from visbatch.core.sources.base import ImageItem, InputError, has_image_extension

MANIFEST_SUFFIXES = (".csv", ".tsv", ".jsonl", ".ndjson", ".parquet")


def _is_hidden(name: str) -> bool:
    return name.startswith(".")


def walk_folder(
    root: str, recursive: bool = True, tars: list[str] | None = None, links: list[str] | None = None
) -> list[str]:
    """Relative POSIX paths of the image files under ``root``, the same on every machine.

    Hidden files and folders are skipped. Symbolic links are followed, but a
    file reachable by several paths is listed once, under its real path
    relative to the root when it has one (the tree without links, walked
    first), else under its first alias in sorted order; each real folder is
    entered once, so a link loop cannot hang the walk. The result does not
    depend on the order in which the file system lists a folder. The ``.tar`` files the
    walk passes are appended to ``tars`` (so a caller need not walk again to find shards), and
    the symbolic links it follows (relative paths) to ``links``: their targets, which may lie
    outside the root, are inputs too. A broken link with an image name is listed (its row
    says it is broken), never skipped in silence.
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
                if is_link and links is not None and (is_dir or has_image_extension(entry.name)):
                    links.append(rel)
                if is_dir:
                    if recursive:
                        (linked_dirs if is_link else subdirs).append(rel)
                elif has_image_extension(entry.name):
                    (linked_files if is_link else into).append(rel)
                elif tars is not None and entry.name.lower().endswith(".tar"):
                    tars.append(rel)
            stack.extend(reversed(subdirs))

    scan("", found)
    while linked_dirs:  # breadth first, in sorted order: deterministic
        batch = sorted(linked_dirs, key=lambda r: (r.count("/"), r))
        linked_dirs.clear()
        for rel in batch:
            scan(rel, from_links)
    if not (linked_files or from_links):
        return found
    listed = {file_identity(os.path.join(root, rel)) for rel in found}
    for rel in sorted(from_links, key=lambda r: (r.count("/"), r)) + sorted(linked_files):
        identity = file_identity(os.path.join(root, rel))
        if identity is None:  # a broken link: its row says so
            found.append(rel)
            continue
        if identity in listed:
            continue
        listed.add(identity)
        found.append(rel)
    return found


def file_identity(path: str) -> tuple[int, int] | None:
    """(device, inode) of the file a path reaches, None when it cannot be reached."""
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


def names_under(root: str, recursive: bool, wanted: Callable[[str], bool]) -> list[str]:
    """File names (relative, POSIX, sorted) under a local folder that ``wanted`` accepts; hidden
    folders skipped (the shards and tables of a folder)."""
    found = []
    for directory, subdirs, files in os.walk(root):
        subdirs[:] = sorted(d for d in subdirs if not d.startswith(".")) if recursive else []
        rel = os.path.relpath(directory, root)
        found += [f if rel == "." else f"{rel}/{f}".replace(os.sep, "/") for f in files if wanted(f)]
    return sorted(found)


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
    for number, line in enumerate(stream, 1):
        text = os.fsdecode(line) if isinstance(line, bytes) else line
        text = text.strip()
        if "\0" in text:
            raise InputError(
                f"line {number} of the path list holds a NUL byte: give one path per line "
                "(find -print0 lists need tr '\\0' '\\n')"
            )
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
            with open(path, encoding="utf-8-sig") as f:
                for line_no, line in enumerate(f, 1):
                    if line.strip():
                        try:
                            row = json.loads(line)
                        except json.JSONDecodeError as exc:
                            raise InputError(f"{path}:{line_no}: not valid JSON ({exc.msg})")
                        if not isinstance(row, dict):
                            raise InputError(
                                f"{path}:{line_no}: a JSON {type(row).__name__} where every line must be an "
                                'object such as {"path": "a.jpg"}'
                            )
                        rows.append(row)
            return rows
        if suffix in (".csv", ".tsv"):
            # utf-8-sig: a byte-order mark (Excel writes one) is not part of the first column's name.
            with open(path, encoding="utf-8-sig", newline="") as f:
                reader = csv.DictReader(f, delimiter="\t" if suffix == ".tsv" else ",")
                header = reader.fieldnames or []
                repeated = sorted({name for name in header if header.count(name) > 1})
                if repeated:
                    raise InputError(f"{path}: the column {repeated[0]!r} appears {header.count(repeated[0])} times")
                return list(reader)
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
        if "\0" in value:
            raise InputError(f"{path}: row {number}'s path holds a NUL byte")
        full = value if os.path.isabs(value) else os.path.join(base, value)
        items.append(_item_for_file(full, base))
    if empty_rows and warnings is not None:
        shown = ", ".join(map(str, empty_rows[:5])) + (", ..." if len(empty_rows) > 5 else "")
        warnings.append(
            f"{len(empty_rows)} rows of --manifest {path} have no {path_column!r} value and were "
            f"not used (rows {shown})"
        )
    return items


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
