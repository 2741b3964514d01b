"""Thumbnails for the report: small JPEG data URIs from the inputs, else from the overlays.

A row names its image by ``path`` (and ``root`` / ``shard`` where the output has them); the
run's metadata gives the roots and the overlay folder. An input that is gone, unreachable or
undecodable gives a placeholder, never a failure: a report is about the run, and the inputs
may have moved since.
"""

from __future__ import annotations

import base64
import io
import os
from functools import lru_cache

from visbatch.core.images import ImageItem, decode_bytes
from visbatch.core.sources import is_url, read_item
from visbatch.core.sources.remote import RemoteFile, join_url
from visbatch.core.sources.tables import is_table_name

THUMB_SIDE = 160
PLACEHOLDER = (
    "data:image/svg+xml;base64,"
    + base64.b64encode(
        b'<svg xmlns="http://www.w3.org/2000/svg" width="160" height="120"><rect width="160" height="120" '
        b'fill="#eee"/><text x="80" y="64" font-size="12" text-anchor="middle" fill="#777">not available</text></svg>'
    ).decode()
)


def _data_uri(data: bytes) -> str | None:
    try:
        image = decode_bytes(data, None)
    except Exception:
        return None
    image.thumbnail((THUMB_SIDE, THUMB_SIDE))
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, "JPEG", quality=80)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode()


@lru_cache(maxsize=64)
def _shard_items(root: str, shard: str) -> dict[str, ImageItem]:
    from visbatch.core.sources.shards import list_shard

    try:
        return {item.relpath: item for item in list_shard(root, shard)}
    except Exception:
        return {}


@lru_cache(maxsize=16)
def _table_items(root: str, table: str, image_column: str | None) -> dict[str, ImageItem]:
    from visbatch.core.sources.tables import list_table

    location = join_url(root, table)
    try:
        listed = list_table(location, image_column, root=None if is_url(root) else root)
    except Exception:
        return {}
    return {f"{table}/{item.relpath.rsplit('/', 1)[1]}": item for item in listed}


def _option_value(command_line, name: str) -> str | None:
    """The value a recorded command line gave ``name`` (``--image-column x`` or ``--image-column=x``)."""
    words = [w for w in command_line if isinstance(w, str)] if isinstance(command_line, list) else []
    for i, word in enumerate(words):
        if word == name and i + 1 < len(words):
            return words[i + 1]
        if word.startswith(name + "="):
            return word.split("=", 1)[1]
    return None


class Thumbnails:
    def __init__(self, metadata: dict, limit: int):
        self.image_column = _option_value(metadata.get("command_line"), "--image-column")
        self.roots = metadata.get("roots") or []
        self.overlays = metadata.get("overlays")
        self.limit = limit
        self.made = 0

    def _item(self, row: dict) -> ImageItem | None:
        root = row.get("root") or (self.roots[0] if self.roots else None)
        path = row.get("path")
        if root is None or path is None:
            return None
        if row.get("shard"):
            return _shard_items(root, row["shard"]).get(path)
        table, _, number = path.rpartition("/")
        if number.isdigit() and is_table_name(table):  # a row of a Parquet/Arrow input table
            return _table_items(root, table, self.image_column).get(path)
        if is_url(root):
            return ImageItem(root, path, RemoteFile(join_url(root, path), 0, 0.0))
        if not os.path.isfile(os.path.join(root, path)):
            return None
        return ImageItem(root, path)

    def of(self, row: dict, prefer_overlay: bool = False) -> str:
        """The row's thumbnail (at most ``limit`` per report are made; past it, placeholders)."""
        if self.made >= self.limit:
            return PLACEHOLDER
        self.made += 1
        overlay = self._overlay(row) if prefer_overlay or self.overlays else None
        if prefer_overlay and overlay:
            return overlay
        try:
            item = self._item(row)
            uri = _data_uri(read_item(item).data) if item is not None else None
        except Exception:
            uri = None
        return uri or overlay or PLACEHOLDER

    def _overlay(self, row: dict) -> str | None:
        if not self.overlays or not row.get("path"):
            return None
        names = [row["path"] + ".png"]
        if row.get("root"):
            names.insert(0, os.path.join(os.path.basename(row["root"].rstrip("/")), row["path"] + ".png"))
        for name in names:
            candidate = os.path.join(self.overlays, name)
            if os.path.isfile(candidate):
                with open(candidate, "rb") as f:
                    return _data_uri(f.read())
        return None
