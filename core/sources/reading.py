"""Reading an item's bytes, its sidecars and checking it is unchanged, whatever its source.

A local file is read by its key; any other item by its :class:`SampleRef`. These three
functions are the only way the rest of visbatch touches input bytes.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

from visbatch.core.sources.base import FileBytes, ImageItem, read_file
from visbatch.core.sources.local import file_unchanged


def read_item(item: ImageItem) -> FileBytes:
    """The item's image bytes and fingerprint (:class:`ImageDecodeError` with the reason)."""
    if item.ref is not None:
        return item.ref.read()
    return read_file(item.path)


def read_sidecar(item: ImageItem, suffix: str) -> bytes | None:
    """The item's ``.txt`` / ``.json`` companion: the file beside a local image (``a.jpg`` ->
    ``a.txt``), the member of the same sample in a tar shard, a table's caption column. None
    when there is none; :class:`OSError` when it exists but cannot be read."""
    if item.ref is not None:
        return item.ref.sidecar(suffix)
    try:
        with open(os.path.splitext(item.path)[0] + suffix, "rb") as f:
            return f.read()
    except FileNotFoundError:
        return None


def item_unchanged(item: ImageItem, row: dict) -> bool:
    """Whether the item still holds the bytes a result row recorded (size, time, content hash)."""
    if item.ref is not None:
        return item.ref.unchanged(row)
    return file_unchanged(item.path, row)


def items_unchanged(pairs: Sequence[tuple[ImageItem, dict]], threads: int = 8) -> list[bool]:
    """:func:`item_unchanged` for each pair, read in threads (the checks are I/O bound)."""
    with ThreadPoolExecutor(max_workers=threads) as pool:
        return list(pool.map(lambda pair: item_unchanged(*pair), pairs))


def item_columns(item: ImageItem) -> dict:
    """What the source adds to the item's output row: its shard and pass-through columns."""
    if item.ref is None:
        return {}
    values = dict(item.ref.columns())
    if item.ref.shard is not None:
        values["shard"] = item.ref.shard
    return values
