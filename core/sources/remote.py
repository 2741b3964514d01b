"""Object storage and URLs through fsspec: ``s3://``, ``gs://``, ``file://``, ``memory://``, ``http(s)://``.

Credentials and endpoints come from where each backend normally reads them
(``AWS_*`` variables, ``~/.aws``, fsspec's config files, e.g. ``endpoint_url`` for an
S3-compatible store in ``~/.config/fsspec/s3.json`` or ``FSSPEC_S3_ENDPOINT_URL``).
Every call is retried with backoff on transient errors, a bounded number of times, and
fails with one line: not found (exit 2), access denied or unreachable (exit 3).
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from visbatch.core.errors import FatalError
from visbatch.core.sources.base import FileBytes, ImageDecodeError, InputError, content_hash

_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
# The backend package of each protocol and the visbatch extra that installs it.
EXTRAS = {"s3": ("s3fs", "s3"), "s3a": ("s3fs", "s3"), "gs": ("gcsfs", "gcs"), "gcs": ("gcsfs", "gcs")}
RETRY_DELAYS = (0.25, 1.0, 3.0)  # seconds before the 2nd, 3rd and 4th attempt

T = TypeVar("T")


class StorageError(FatalError):
    """Object storage refused or could not be reached after the retries (exit 3)."""


def is_url(text: str) -> bool:
    return bool(_URL.match(text))


def protocol_of(url: str) -> str:
    return url.split("://", 1)[0].lower()


def filesystem(url: str):
    """``(fs, path)`` for a URL; a missing backend is one line naming the extra to install."""
    try:
        import fsspec
    except ImportError:
        raise InputError(f"{url}: reading URLs needs fsspec: pip install 'visbatch[s3]'")
    protocol = protocol_of(url)
    try:
        return fsspec.core.url_to_fs(url)
    except ImportError:
        package, extra = EXTRAS.get(protocol, (f"the fsspec backend for {protocol}://", None))
        hint = f"pip install 'visbatch[{extra}]'" if extra else f"install {package}"
        raise InputError(f"{protocol}:// needs {package}, which is not installed: {hint}")
    except ValueError as exc:
        raise InputError(f"{url}: {exc}")


def _transient(exc: BaseException) -> bool:
    return not isinstance(exc, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError))


def describe(exc: BaseException, url: str) -> str:
    if isinstance(exc, FileNotFoundError):
        return f"not found: {url}"
    if isinstance(exc, PermissionError):
        return f"access denied to {url} (check the credentials): {_first_line(exc)}"
    return f"cannot reach {url}: {type(exc).__name__}: {_first_line(exc)}"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else type(exc).__name__


def with_retries(call: Callable[[], T], url: str, delays=RETRY_DELAYS) -> T:
    """``call()``, retried after each delay on errors that may pass (timeouts, resets, 5xx)."""
    for attempt in range(len(delays) + 1):
        try:
            return call()
        except Exception as exc:
            if not _transient(exc) or attempt == len(delays):
                raise
            time.sleep(delays[attempt])
    raise AssertionError("unreachable")


def storage_error(exc: BaseException, url: str) -> Exception:
    """The one-line error for a failed listing or open: InputError for a missing object, else StorageError."""
    if isinstance(exc, FileNotFoundError):
        return InputError(f"input not found: {url}")
    return StorageError(describe(exc, url))


def modification_time(info: dict) -> float:
    """A listing entry's modification time in seconds (backends name it differently)."""
    for key in ("mtime", "LastModified", "last_modified", "updated", "created", "modified"):
        value = info.get(key)
        if value is None:
            continue
        if hasattr(value, "timestamp"):
            return float(value.timestamp())
        try:
            return float(value)
        except (TypeError, ValueError):
            continue
    return 0.0


def read_range(url: str, start: int | None = None, end: int | None = None) -> bytes:
    """Bytes ``[start, end)`` of a local path or URL (the whole file without a range)."""
    if not is_url(url):
        with open(url, "rb") as f:
            if start:
                f.seek(start)
            return f.read() if end is None else f.read(end - (start or 0))
    fs, path = filesystem(url)
    return with_retries(lambda: fs.cat_file(path, start=start, end=end), url)


def open_input(location: str, sequential: bool = False):
    """A binary file object on a local path or a URL (opened with retries).

    ``sequential`` is for a reader that walks the file front to back (tar headers, an
    Arrow stream): a large read-ahead block turns that into a few sequential requests
    instead of one per small read.
    """
    if not is_url(location):
        return open(location, "rb")
    fs, path = filesystem(location)
    options = {"block_size": 8 << 20, "cache_type": "readahead"} if sequential else {}
    return with_retries(lambda: fs.open(path, "rb", **options), location)


def join_url(root: str, relpath: str) -> str:
    return root.rstrip("/") + "/" + relpath if is_url(root) else os.path.join(root, relpath)


@dataclass(frozen=True)
class RemoteFile:
    """An image object behind a URL (listed from a prefix or named directly)."""

    url: str
    size: int
    mtime: float

    @property
    def shard(self) -> str | None:
        return None

    def inputs(self) -> tuple[str, ...]:
        return (self.url,)

    def read(self) -> FileBytes:
        try:
            data = read_range(self.url)
        except Exception as exc:  # every backend error is this row's reason, not the run's end
            raise ImageDecodeError(f"cannot read object: {describe(exc, self.url)}")
        return FileBytes(data, len(data), self.mtime, content_hash(data))

    def sidecar(self, suffix: str) -> bytes | None:
        stem = self.url.rsplit(".", 1)[0] if "." in self.url.rsplit("/", 1)[-1] else self.url
        try:
            return read_range(stem + suffix)
        except FileNotFoundError:
            return None

    def unchanged(self, row: dict) -> bool:
        # Objects are replaced whole, never edited in place, and a replacement has a new
        # modification time: size and time decide without downloading the object again.
        return bool(row.get("content_hash")) and (row.get("file_size"), row.get("file_mtime")) == (
            self.size,
            self.mtime,
        )

    def columns(self) -> dict:
        return {}


def list_prefix(url: str) -> tuple[str, list[tuple[str, dict]]]:
    """(root, [(relative name, info), ...]) of every object under a URL prefix, or of the one
    object it names; hidden names (a part starting with '.') are skipped as locally."""
    fs, path = filesystem(url)
    try:
        info = with_retries(lambda: fs.info(path), url)
    except Exception as exc:
        raise storage_error(exc, url)
    if info.get("type") != "directory":
        root, _, name = url.rstrip("/").rpartition("/")
        return root, [(name, info)]
    base = path.rstrip("/")
    try:
        found = with_retries(lambda: fs.find(base, detail=True), url)
    except Exception as exc:
        raise storage_error(exc, url)
    entries = []
    for name, entry in sorted(found.items()):
        relative = name[len(base) + 1 :] if name.startswith(base + "/") else name
        if relative and not any(part.startswith(".") for part in relative.split("/")):
            entries.append((relative, entry))
    return url.rstrip("/"), entries
