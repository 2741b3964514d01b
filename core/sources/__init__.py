"""Input sources: what the INPUT arguments name, turned into sorted :class:`ImageItem` keys.

One entry point, :func:`find_images`, chooses the source of each INPUT argument:

| INPUT | source | row key |
|---|---|---|
| a folder of images, a file, ``-`` (paths on stdin), ``--manifest`` | :mod:`.local` | path relative to the folder |
| ``x.tar``, ``pool/{00000..00999}.tar``, a folder of ``.tar``, a ``.txt`` of shards | :mod:`.shards` | ``SHARD/KEY`` |
| ``x.parquet`` / ``.arrow`` with an image column | :mod:`.tables` | ``TABLE/ROW`` |
| any of these behind a URL (``s3://``, ``gs://``, ``file://``, ``memory://``) | :mod:`.remote` (fsspec) | as above |

To add a source: a module here with a listing function returning items whose ``ref``
implements :class:`~visbatch.core.sources.base.SampleRef`, and its branch in
:func:`find_images`.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

import pyarrow as pa

from visbatch.core.plan import InputSet
from visbatch.core.sources.base import (
    IMAGE_EXTENSIONS,
    SIDECAR_SUFFIXES,
    FileBytes,
    ImageDecodeError,
    ImageItem,
    InputError,
    SampleRef,
    SourceOptions,
    content_hash,
    has_image_extension,
    read_file,
)
from visbatch.core.sources.local import (
    MANIFEST_SUFFIXES,
    _item_for_file,
    check_glob,
    file_fingerprint,
    file_unchanged,
    files_unchanged,
    glob_matches,
    parse_shard,
    read_manifest,
    read_path_list,
    read_table_file,
    shard_of,
    walk_folder,
)
from visbatch.core.sources.reading import item_columns, item_unchanged, items_unchanged, read_item, read_sidecar
from visbatch.core.sources.remote import RemoteFile, is_url, list_prefix, modification_time
from visbatch.core.sources.shards import (
    TarSample,
    expand_braces,
    is_shard_name,
    list_shards,
    read_shard_list,
    refuse_pipe,
    shards_in_folder,
    split_location,
)
from visbatch.core.sources.stream import ItemStream, source_fields
from visbatch.core.sources.tables import is_table_name, list_table, tables_in_folder

__all__ = [
    "IMAGE_EXTENSIONS",
    "MANIFEST_SUFFIXES",
    "SIDECAR_SUFFIXES",
    "FileBytes",
    "ImageDecodeError",
    "ImageItem",
    "ItemStream",
    "InputError",
    "SampleRef",
    "SourceOptions",
    "content_hash",
    "file_fingerprint",
    "file_unchanged",
    "files_unchanged",
    "find_image_stream",
    "find_images",
    "has_image_extension",
    "item_columns",
    "item_fields",
    "item_unchanged",
    "items_unchanged",
    "parse_shard",
    "read_file",
    "read_item",
    "read_path_list",
    "read_sidecar",
    "read_table_file",
    "walk_folder",
]


class _Found:
    """What the INPUT arguments resolve to before filtering: plain items and shards, and in
    ``reads`` every folder and file the listing found (the run plan's inputs)."""

    def __init__(self, options: SourceOptions, warnings: list[str] | None, reads: InputSet):
        self.options = options
        self.warnings = warnings
        self.items: set[ImageItem] = set()
        self.shards: list[tuple[str, str]] = []  # (root, shard name)
        self.reads = reads
        self.roots: set[str] = set()  # every root the inputs name, before --glob/--shard/--limit
        self._walked: dict[str, str] = {}  # real path of each walked folder -> the INPUT that named it

    def add_table(self, location: str, root: str | None = None) -> None:
        self.reads.add_file(location)
        o = self.options
        # A table's rows sort in row order, so rows past the first --limit can never be among
        # the first --limit overall: the listing stops there (not with --glob or --shard, which filter later).
        limit = o.limit if not o.globs and o.shard is None else None
        listed = list_table(location, o.image_column, o.caption_column, tuple(o.keep_columns), limit, root=root)
        self.roots.update(item.root for item in listed[:1])
        self.items.update(listed)

    def add_remote(self, url: str) -> None:
        root, entries = list_prefix(url)
        self.roots.add(root)
        images = [(rel, info) for rel, info in entries if has_image_extension(rel)]
        single = len(entries) == 1 and root.rstrip("/") + "/" + entries[0][0] == url.rstrip("/")
        if single and is_shard_name(url):
            self.shards.append((root, entries[0][0]))
        elif single and is_table_name(url):
            self.add_table(url)
        elif single:  # a named object is taken as named, like a named local file
            rel, info = entries[0]
            self.items.add(ImageItem(root, rel, RemoteFile(url, int(info.get("size") or 0), modification_time(info))))
        elif images:
            self.reads.add_walked_folder(root)
            for rel, info in images:
                ref = RemoteFile(f"{root}/{rel}", int(info.get("size") or 0), modification_time(info))
                self.items.add(ImageItem(root, rel, ref))
        else:
            self.reads.add_folder(root)
            self.shards += [(root, rel) for rel, _ in entries if is_shard_name(rel)]

    def add_local(self, entry: str, stdin) -> None:
        if entry == "-":
            stream = stdin if stdin is not None else getattr(sys.stdin, "buffer", sys.stdin)
            for line in read_path_list(stream):
                item = _item_for_file(line, os.getcwd())
                self.roots.add(item.root)
                self.items.add(item)
        elif os.path.isdir(entry):
            root = os.path.abspath(entry)
            real = os.path.realpath(root)
            if real in self._walked:
                # `visbatch classify in inlink` (inlink -> in): one folder named twice is read once.
                if self.warnings is not None:
                    self.warnings.append(f"{entry} is the folder {self._walked[real]} again; its images are read once")
                return
            self._walked[real] = entry
            self.roots.add(root)
            passed: list[str] = []
            links: list[str] = []
            found = walk_folder(root, self.options.recursive, tars=passed, links=links)
            self.reads.add_walked_folder(root)
            for rel in links:  # what the folder's links lead to is read too
                self.reads.add_path(os.path.join(root, rel))
            shards = [] if found else shards_in_folder(root, self.options.recursive)
            if not found and not shards:
                # img2dataset's parquet output, a `datasets` save_to_disk folder: its tables are the input.
                for name in tables_in_folder(root, self.options.recursive):
                    self.add_table(os.path.join(root, name), root)
            if found and passed:
                if self.warnings is not None:
                    self.warnings.append(
                        f"{entry} holds images and {len(passed)} .tar files: the .tar files were not read "
                        f"(name them, e.g. '{os.path.join(entry, sorted(passed)[0])}', to read their samples)"
                    )
            self.items.update(ImageItem(root, rel) for rel in found)
            self.shards += [(root, name) for name in shards]
        elif os.path.isfile(entry) and is_shard_name(entry):
            self.add_shard(entry)
        elif os.path.isfile(entry) and is_table_name(entry):
            self.add_table(entry)
        elif os.path.isfile(entry) and entry.lower().endswith(".txt") and (listed := read_shard_list(entry)):
            self.reads.add_file(entry)
            for location in listed:
                self.add(location, None, from_list=True)
        elif os.path.exists(entry):
            item = _item_for_file(entry)
            self.roots.add(item.root)
            self.items.add(item)
        elif os.path.islink(entry):
            raise InputError(f"input not found: {entry} is a broken symbolic link (to {os.readlink(entry)})")
        else:
            raise InputError(f"input not found: {entry}")

    def add_shard(self, location: str) -> None:
        root, name = split_location(location)
        self.roots.add(root)
        self.shards.append((root, name))

    def add(self, entry: str, stdin, from_list: bool = False) -> None:
        refuse_pipe(entry)
        if "{" in entry and not os.path.exists(entry):
            expanded_all = expand_braces(entry)
            local = [e for e in expanded_all if not is_url(e)]
            if local and len(local) == len(expanded_all) and not any(os.path.exists(e) for e in local):
                # A gap is an error row; a range of which nothing exists is a mistyped path.
                raise InputError(f"input not found: none of the {len(local)} names {entry} expands to exists")
            for expanded in expanded_all:
                self.add(expanded, stdin, from_list=True)
            return
        if from_list and is_shard_name(entry):
            # A shard named by a range or a list may be missing: its error row says so and
            # the others run (img2dataset leaves such gaps when a shard's download failed).
            self.add_shard(entry)
        elif is_url(entry):
            self.add_remote(entry)
        else:
            self.add_local(entry, stdin)


def _resolve(
    inputs: Sequence[str],
    options: SourceOptions,
    manifest: str | None,
    stdin,
    warnings: list[str] | None,
    reads: InputSet,
) -> tuple[list[ImageItem], list[tuple[str, str]], list[str]]:
    """(the listed items, filtered by --glob and --shard, sorted; the shards still to list,
    filtered by --shard, sorted; every root the inputs name, before any filter)."""
    for pattern in options.globs:
        check_glob(pattern)
    found = _Found(options, warnings, reads)
    if manifest:
        reads.add_file(manifest)
        listed = read_manifest(manifest, warnings=warnings)
        found.roots.update(item.root for item in listed)
        found.items.update(listed)
    for entry in inputs:
        found.add(entry, stdin)
    shards = sorted(set(found.shards))
    for root, name in shards:  # every shard, before --shard: the plan protects them all
        reads.add_file(root.rstrip("/") + "/" + name if is_url(root) else os.path.join(root, name))
    selected = [it for it in found.items if not options.globs or glob_matches(it.relpath, options.globs)]
    if options.shard is not None:
        index, count = options.shard
        shards = [(root, name) for root, name in shards if shard_of(name, count) == index]
        selected = [it for it in selected if shard_of(it.relpath, count) == index]
    selected.sort(key=lambda it: (it.root, it.relpath))
    reads.add_items(selected)
    return selected, shards, sorted(found.roots)


def find_images(
    inputs: Sequence[str],
    options: SourceOptions | None = None,
    manifest: str | None = None,
    stdin=None,
    warnings: list[str] | None = None,
    reads: InputSet | None = None,
) -> list[ImageItem]:
    """Resolve INPUT arguments into sorted, filtered, sharded, limited items, all listed.

    Folders are walked (recursively unless ``options.recursive`` is false);
    files are taken as named, even with an unusual extension, so a user who
    names a file always gets a row for it; ``-`` reads paths from ``stdin``;
    tar shards, image tables and URLs are read by their sources (module doc).
    ``--shard I/N`` partitions by shard (a whole tar is the unit) for shards, by key
    otherwise. Raises :class:`InputError` for inputs that do not exist and for bad
    ``--glob`` patterns; what was skipped is appended to ``warnings``; every folder and file
    the inputs read is added to ``reads`` (the run plan's inputs).

    The pool jobs (select-data, quantize, detect-aigi train) need every item at once;
    the per-image subcommands take :func:`find_image_stream`, which lists shards as
    the run reaches them.
    """
    options = options or SourceOptions()
    selected, shards, _ = _resolve(
        inputs, options, manifest, stdin, warnings, reads if reads is not None else InputSet()
    )
    # --limit can stop listing shards early only when nothing else could sort before them.
    early_limit = options.limit if not selected and not options.globs else None
    from_shards = list_shards(shards, early_limit, warnings, tuple(options.keep_columns))
    selected += [it for it in from_shards if not options.globs or glob_matches(it.relpath, options.globs)]
    selected.sort(key=lambda it: (it.root, it.relpath))
    if options.limit is not None:
        selected = selected[: options.limit]
    return selected


def find_image_stream(
    inputs: Sequence[str],
    options: SourceOptions | None = None,
    manifest: str | None = None,
    stdin=None,
    warnings: list[str] | None = None,
) -> ItemStream:
    """The same items as :func:`find_images`, but tar shards are listed a chunk at a time as
    the run consumes them (a pool of 10,000 shards starts at once and never holds all
    its items). Loose files, tables and manifests are listed up front, as before. The stream's
    ``reads`` holds every folder and file the inputs read, and ``all_roots`` every root the
    inputs name before any filter (so every ``--shard`` of one job has the same columns)."""
    options = options or SourceOptions()
    reads = InputSet()
    selected, shards, roots = _resolve(inputs, options, manifest, stdin, warnings, reads)
    if shards and selected and options.limit is not None:
        # The first --limit keys may mix loose files and shard samples: list it all, as before.
        stream = ItemStream(find_images(inputs, options, manifest, stdin, warnings), kept=options.keep_columns)
    else:
        stream = ItemStream(selected, shards, options.globs, options.limit, warnings, kept=options.keep_columns)
    stream.reads, stream.all_roots = reads, roots
    return stream


def item_fields(items: Sequence[ImageItem]) -> list[pa.Field]:
    """The output columns the items' sources add (:func:`source_fields`)."""
    kept = next((item.ref.kept for item in items if isinstance(item.ref, TarSample) and item.ref.kept), ())
    return source_fields(items, any(item.shard is not None for item in items), kept)
