"""The items of a run as a stream of chunks: tar shards listed as the run reaches them.

Listing a shard means reading its tar headers, which are spread through the
whole file: listing 10,000 shards up front would read the pool once before the
first image is decoded and hold every key in memory. An :class:`ItemStream`
instead hands the pipeline chunks of at least ``chunk_size`` items, shard after
shard in key order, and lists the next chunk in a background thread while the
current one runs. Memory holds one chunk (plus the one being listed), whatever
the pool's size.

Items listed up front (loose files, tables, manifests, URLs of images) form the
first chunk. Within each chunk items are sorted; across chunks keys rise too
(shards are taken in name order), though nothing depends on it: the writer
sorts the output.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator, Sequence
from concurrent.futures import Future

import pyarrow as pa

from visbatch.core.sources.base import ImageItem
from visbatch.core.sources.local import glob_matches
from visbatch.core.sources.remote import is_url
from visbatch.core.sources.shards import list_shard


def source_fields(items: Sequence[ImageItem], from_shards: bool, kept: Sequence[str] = ()) -> list[pa.Field]:
    """The output columns the sources add: ``shard`` and ``key`` for shard samples, then the
    ``--keep-columns`` (a table's with their types; a shard sample's ``.json`` fields as text)."""
    fields = [pa.field("shard", pa.string()), pa.field("key", pa.string())] if from_shards else []
    table_fields = next((it.ref.kept_fields for it in items if getattr(it.ref, "kept_fields", ())), ())
    if table_fields:
        return fields + list(table_fields)
    return fields + ([pa.field(name, pa.string()) for name in kept] if from_shards else [])


CHUNK_SIZE = 8192  # items per chunk: large enough that a fresh decode loader per chunk costs nothing


class ItemStream:
    """Items listed up front (``head``) then the samples of ``shards``, chunk by chunk.

    ``roots``, ``locations`` (the shards) and :meth:`fields` are known before any shard is
    read, so outputs can be checked against every input and the schema fixed first.
    """

    def __init__(
        self,
        head: Sequence[ImageItem],
        shards: Sequence[tuple[str, str]] = (),
        globs: Sequence[str] = (),
        limit: int | None = None,
        warnings: list[str] | None = None,
        chunk_size: int | None = None,
        kept: Sequence[str] = (),
    ):
        self.head = sorted(head, key=lambda it: (it.root, it.relpath))
        self.shards = sorted(set(shards))
        self.globs, self.limit, self.warnings = tuple(globs), limit, warnings
        self.chunk_size = max(1, chunk_size or CHUNK_SIZE)
        self.kept = tuple(kept)  # --keep-columns: fields of each shard sample's .json
        self.listed = 0  # items handed out so far
        self._primed: list[list[ImageItem]] = []
        self._source: Iterator[list[ImageItem]] | None = None
        self._stopped = False  # the consumer is gone: the listing thread stops between shards
        self.reads = None  # the InputSet of what the inputs read (find_image_stream sets it)
        self.all_roots: list[str] = []  # every root the inputs name, before --glob/--shard/--limit

    @property
    def roots(self) -> list[str]:
        return sorted({it.root for it in self.head} | {root for root, _ in self.shards})

    @property
    def locations(self) -> list[str]:
        """The shard files (paths or URLs) behind the stream's samples."""
        return [
            root.rstrip("/") + "/" + name if is_url(root) else os.path.join(root, name) for root, name in self.shards
        ]

    def fields(self) -> list[pa.Field]:
        """The columns the sources add (:func:`source_fields`)."""
        from_shards = bool(self.shards) or any(it.shard for it in self.head)
        return source_fields(self.head, from_shards, self.kept)

    def is_empty(self) -> bool:
        """Lists until the first item (or the end): a run over nothing is refused before it starts."""
        while not any(self._primed):
            chunk = next(self._chunks(), None)
            if chunk is None:
                return True
            self._primed.append(chunk)
        return False

    def chunks(self) -> Iterator[list[ImageItem]]:
        """The items, a sorted chunk at a time, until the end or ``limit`` items."""
        while self._primed:
            yield self._primed.pop(0)
        yield from self._chunks()

    def __iter__(self) -> Iterator[ImageItem]:
        for chunk in self.chunks():
            yield from chunk

    # -- the listing ------------------------------------------------------------------------

    def _chunks(self) -> Iterator[list[ImageItem]]:
        if self._source is None:
            self._source = self._generate()
        return self._source

    def _take(self, items: list[ImageItem]) -> list[ImageItem]:
        if self.limit is not None:
            items = items[: max(0, self.limit - self.listed)]
        self.listed += len(items)
        return items

    def _full(self) -> bool:
        return self.limit is not None and self.listed >= self.limit

    def _list(self, start: int) -> tuple[list[ImageItem], int]:
        """Items of the shards from ``start`` until a chunk is full: (sorted items, next start)."""
        items: list[ImageItem] = []
        index = start
        while index < len(self.shards) and len(items) < self.chunk_size and not self._stopped:
            root, name = self.shards[index]
            listed = list_shard(root, name, self.warnings, self.kept)
            items += [it for it in listed if not self.globs or glob_matches(it.relpath, self.globs)]
            index += 1
            if self.limit is not None and self.listed + len(items) >= self.limit:
                break  # later shards hold only keys that sort after these
        items.sort(key=lambda it: (it.root, it.relpath))
        return items, index

    def _generate(self) -> Iterator[list[ImageItem]]:
        if self.head:
            chunk = self._take(self.head)
            if chunk:
                yield chunk
        if not self.shards or self._full():
            return
        # One listing ahead in a thread: the next shards' headers are read while this chunk runs.
        ahead: Future | None = _in_background(self._list, 0)
        try:
            while ahead is not None:
                items, following = ahead.result()
                ahead = _in_background(self._list, following) if following < len(self.shards) else None
                chunk = self._take(items)
                if chunk:
                    yield chunk
                if self._full():
                    return
        finally:
            self._stopped = True


def _in_background(function, *args) -> Future:
    """``function(*args)`` in a daemon thread: a listing the run no longer waits for (a signal
    stopped it) can never keep the process from exiting."""
    future: Future = Future()

    def work() -> None:
        try:
            future.set_result(function(*args))
        except BaseException as exc:  # the consumer re-raises it
            future.set_exception(exc)

    threading.Thread(target=work, name="visbatch-listing", daemon=True).start()
    return future
