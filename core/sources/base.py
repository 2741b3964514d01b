"""What every input source produces: :class:`ImageItem` keys and the bytes behind them.

An item is a key, ``(root, relpath)``, plus an optional :class:`SampleRef`
saying where its bytes live when they are not a plain local file (a member of
a tar shard, a cell of a Parquet table, an object behind a URL). The key alone
decides order, identity and the output row; the reference only knows how to
read. Everything here is picklable: items travel to the decode workers.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from visbatch.core.errors import UsageError

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
SIDECAR_SUFFIXES = (".txt", ".json")


class InputError(UsageError):
    """A problem with the inputs the user named (exit code 2)."""


class ImageDecodeError(Exception):
    """One file could not be turned into an RGB image; the message is the reason."""


def has_image_extension(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


@dataclass(frozen=True)
class FileBytes:
    """A file's bytes with its fingerprint: what a result row records of the file it came from."""

    data: bytes
    size: int
    mtime: float
    content_hash: str

    def fingerprint(self) -> dict:
        return {"file_size": self.size, "file_mtime": self.mtime, "content_hash": self.content_hash}


HASH_ALGORITHMS = ("blake2b", "sha256")
HASH_ENV = "VISBATCH_HASH"  # set by --hash for the whole run, decode and Ray workers included


def hash_algorithm() -> str:
    """The run's content-hash algorithm (``--hash``; BLAKE2b unless sha256 was asked for)."""
    return "sha256" if os.environ.get(HASH_ENV) == "sha256" else "blake2b"


def content_hash(data: bytes) -> str:
    """The content hash visbatch records: BLAKE2b, 128 bits (several GB/s, so cheap beside
    decoding), or with ``--hash sha256`` SHA-256, as img2dataset records it."""
    if hash_algorithm() == "sha256":
        return hashlib.sha256(data).hexdigest()
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def read_file(path: str) -> FileBytes:
    """Read a whole local file once, with its size, modification time and content hash."""
    try:
        with open(path, "rb") as f:
            st = os.fstat(f.fileno())
            data = f.read()
    except OSError as exc:
        if os.path.islink(path) and not os.path.exists(path):
            raise ImageDecodeError(
                f"cannot read file: a broken symbolic link (its target {os.readlink(path)} does not exist)"
            )
        raise ImageDecodeError(f"cannot read file: {exc.strerror or exc}")
    return FileBytes(data, st.st_size, st.st_mtime, content_hash(data))


class SampleRef(Protocol):
    """Where one item's bytes live when they are not a local file named by its key."""

    @property
    def shard(self) -> str | None:
        """The shard the sample came from (its own output column), None when not from a shard."""

    def read(self) -> FileBytes:
        """The image's bytes with their fingerprint; :class:`ImageDecodeError` with the reason."""

    def sidecar(self, suffix: str) -> bytes | None:
        """The sample's ``.txt`` / ``.json`` companion, None when it has none."""

    def unchanged(self, row: dict) -> bool:
        """Whether the bytes behind the item are still those a result row recorded."""

    def columns(self) -> dict:
        """Columns the source passes through to the output row (``--keep-columns``)."""

    def inputs(self) -> tuple[str, ...]:
        """Every file or URL reading this sample reads (the run plan protects them all)."""


@dataclass(frozen=True, order=True, slots=True)
class ImageItem:
    """One input image. ``relpath`` is POSIX-style, relative to ``root``; ``ref`` (not part of
    the key) reads the bytes when they are not the local file ``root/relpath``."""

    root: str
    relpath: str
    ref: SampleRef | None = field(default=None, compare=False, hash=False, repr=False)

    @property
    def path(self) -> str:
        return os.path.join(self.root, self.relpath)

    @property
    def shard(self) -> str | None:
        return self.ref.shard if self.ref is not None else None


@dataclass
class SourceOptions:
    recursive: bool = True
    globs: Sequence[str] = ()
    limit: int | None = None
    shard: tuple[int, int] | None = None  # (index, count), index 0-based
    # Parquet tables of images (INPUT ending .parquet/.arrow)
    image_column: str | None = None
    caption_column: str | None = None
    keep_columns: Sequence[str] = ()
