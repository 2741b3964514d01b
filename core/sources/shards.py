"""WebDataset tar shards: ``pool/{00000..00999}.tar``, a folder of ``.tar`` files, a list of shards.

WebDataset's convention (the one img2dataset and DataComp write): a sample is the
consecutive members sharing a key, the member name up to the first dot of its base
name (``a/000010005.seg.png`` -> key ``a/000010005``, extension ``seg.png``); the image is
the first member whose last extension is an image type; ``.txt`` and ``.json`` are its
caption sidecars. Listing reads the tar headers only (each member's offset and size), so
no member is extracted to disk and the decode workers read exactly the bytes of their
sample, locally or by a ranged request on object storage.

Row keys are ``SHARD/KEY`` (``00042.tar/000420017``) and the shard has its own output
column. A shard that is missing, unreadable or cut short is one error row keyed by the
shard's name (members listed before the damage keep their rows), never a hang.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from visbatch.core.sources.base import (
    IMAGE_EXTENSIONS,
    FileBytes,
    ImageDecodeError,
    ImageItem,
    InputError,
    content_hash,
)
from visbatch.core.sources.remote import (
    describe,
    filesystem,
    is_url,
    open_input,
    read_range,
    with_retries,
)

_KEY_AND_EXTENSION = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")
_BRACE_RANGE = re.compile(r"\{(-?\d+)\.\.(-?\d+)\}")
_IMAGE_SUFFIXES = frozenset(e.lstrip(".") for e in IMAGE_EXTENSIONS)


def expand_braces(pattern: str) -> list[str]:
    """``{00000..00003}`` ranges (zero padding kept) and ``{a,b}`` lists, as WebDataset and
    bash expand them; several groups multiply. Text without braces is returned as is."""
    start = pattern.find("{")
    if start < 0:
        return [pattern]
    depth, end = 0, -1
    for i in range(start, len(pattern)):
        if pattern[i] == "{":
            depth += 1
        elif pattern[i] == "}":
            depth -= 1
            if depth == 0:
                end = i
                break
    if end < 0:
        raise InputError(f"{pattern}: '{{' without a closing '}}'")
    body, head, tail = pattern[start + 1 : end], pattern[:start], pattern[end + 1 :]
    match = _BRACE_RANGE.fullmatch("{" + body + "}")
    if match:
        first, last = match.group(1), match.group(2)
        width = len(first) if first.lstrip("-").startswith("0") and len(first) > 1 else 0
        a, b = int(first), int(last)
        if abs(b - a) > 10_000_000:
            raise InputError(f"{pattern}: brace range of more than 10,000,000 names")
        step = 1 if b >= a else -1
        choices = [str(n).zfill(width) for n in range(a, b + step, step)]
    elif "," in body:
        choices = _split_top_level(body)
    else:
        raise InputError(f"{pattern}: '{{{body}}}' is neither a range {{A..B}} nor a list {{a,b}}")
    return [expanded for choice in choices for expanded in expand_braces(head + choice + tail)]


def _split_top_level(body: str) -> list[str]:
    parts, depth, current = [], 0, ""
    for char in body:
        if char == "," and depth == 0:
            parts.append(current)
            current = ""
            continue
        depth += char == "{"
        depth -= char == "}"
        current += char
    return parts + [current]


def is_shard_name(name: str) -> bool:
    return name.lower().endswith(".tar")


@dataclass(frozen=True, slots=True)
class Member:
    name: str
    offset: int  # of the data, in the tar
    size: int
    mtime: float


@dataclass(frozen=True, slots=True)
class TarSample:
    """One WebDataset sample: where its image and sidecar members lie in the shard."""

    location: str  # the shard: a local path or a URL
    shard_name: str  # as shown in the ``shard`` column (relative to the input root)
    image: Member | None
    sidecars: tuple[tuple[str, Member], ...]
    extensions: tuple[str, ...]  # every member's extension, for the no-image message

    @property
    def shard(self) -> str:
        return self.shard_name

    def inputs(self) -> tuple[str, ...]:
        return (self.location,)

    def _member_bytes(self, member: Member) -> bytes:
        try:
            data = read_range(self.location, member.offset, member.offset + member.size)
        except OSError as exc:
            raise ImageDecodeError(f"cannot read {member.name} from {self.shard_name}: {describe(exc, self.location)}")
        if len(data) != member.size:
            raise ImageDecodeError(
                f"truncated tar: member {member.name} of {self.shard_name} has {len(data)} of {member.size} bytes"
            )
        return data

    def read(self) -> FileBytes:
        if self.image is None:
            found = ", ".join("." + e for e in self.extensions) or "none"
            raise ImageDecodeError(f"sample has no image member (members: {found})")
        data = self._member_bytes(self.image)
        return FileBytes(data, self.image.size, self.image.mtime, content_hash(data))

    def sidecar(self, suffix: str) -> bytes | None:
        for extension, member in self.sidecars:
            if "." + extension == suffix:
                try:
                    return self._member_bytes(member)
                except ImageDecodeError as exc:
                    raise OSError(str(exc))
        return None

    def unchanged(self, row: dict) -> bool:
        if self.image is None:  # still no image: its error row stands
            return row.get("status") == "error" and not row.get("content_hash")
        if row.get("file_size") != self.image.size:
            return False
        try:
            return self.read().content_hash == row.get("content_hash")
        except ImageDecodeError:
            return False

    def columns(self) -> dict:
        return {}


@dataclass(frozen=True)
class BrokenShard:
    """A shard that could not be listed (or only in part): its error row."""

    shard_name: str
    reason: str

    @property
    def shard(self) -> str:
        return self.shard_name

    def inputs(self) -> tuple[str, ...]:
        return ()  # the shard itself is among the run's named inputs

    def read(self) -> FileBytes:
        raise ImageDecodeError(self.reason)

    def sidecar(self, suffix: str) -> bytes | None:
        return None

    def unchanged(self, row: dict) -> bool:
        return False

    def columns(self) -> dict:
        return {}


class TarDamage(Exception):
    """The tar is cut short or its header is not a tar header; the message says where."""


_BLOCK = 512
_ZERO_BLOCK = bytes(_BLOCK)
_FILE_TYPES = (b"0", b"\0", b"7")  # regular file, old-style regular file, contiguous file


def _number(field: bytes) -> int:
    if field and field[0] & 0x80:  # GNU base-256 for sizes over 8 GB
        return int.from_bytes(field[1:], "big")
    text = field.rstrip(b"\0 ").strip()
    return int(text, 8) if text else 0


def _pax(data: bytes, offset: int) -> dict[str, str]:
    """The records of a pax extended header (``LENGTH KEY=VALUE\n`` each). Every record must
    advance: a length that is not a positive number, that runs past the header, or a record
    without its space, ``=`` or closing newline is :class:`TarDamage`, never a loop."""
    records, i = {}, 0
    while i < len(data):
        if data[i:].strip(b"\0") == b"":
            break  # padding after the last record
        space = data.find(b" ", i)
        try:
            length = int(data[i:space]) if space > i else 0
        except ValueError:
            length = 0
        end = i + length
        if length <= 0 or end > len(data) or data[end - 1 : end] != b"\n" or b"=" not in data[space + 1 : end]:
            raise TarDamage(f"malformed pax record in the extended header at byte {offset}")
        key, _, value = data[space + 1 : end - 1].partition(b"=")
        records[key.decode("utf-8", "surrogateescape")] = value.decode("utf-8", "surrogateescape")
        i = end
    return records


def _pax_number(pax: dict[str, str], key: str, offset: int, kind=int):
    try:
        value = kind(pax[key])
    except (ValueError, OverflowError):
        raise TarDamage(f"pax record {key}={pax[key][:40]!r} is not a number (header at byte {offset})")
    if kind is int and value < 0:
        raise TarDamage(f"pax record {key}={value} is negative (header at byte {offset})")
    return value


def iter_members(handle, skipped: list[str] | None = None) -> Iterator[Member]:
    """The regular-file members of a tar, read header by header (ustar, GNU long names and pax
    ``path``/``size`` records), a few times faster than :mod:`tarfile` on shards of many small
    members. Raises :class:`TarDamage` for a truncated or corrupt tar. The names of members
    that are neither files nor folders (links, devices) go to ``skipped``."""
    offset = 0
    long_name: str | None = None
    pax: dict[str, str] = {}
    while True:
        header = handle.read(_BLOCK)
        if header == _ZERO_BLOCK:
            return  # the end-of-archive marker
        if not header:
            # Every tar writer ends with zero blocks; a file that stops without them was cut.
            raise TarDamage(f"ends at byte {offset} without the end-of-archive marker (truncated)")
        if len(header) < _BLOCK:
            raise TarDamage(f"truncated header at byte {offset}")
        stored = header[148:156]
        try:
            expected = _number(stored)
            size = _number(header[124:136])
        except ValueError:
            raise TarDamage(f"not a tar header at byte {offset}")
        if expected != sum(header[:148]) + 256 + sum(header[156:]):
            raise TarDamage(f"bad header checksum at byte {offset}")
        kind = header[156:157]
        data_offset = offset + _BLOCK
        padded = (size + _BLOCK - 1) // _BLOCK * _BLOCK
        if kind in (b"L", b"x", b"g"):
            data = handle.read(padded)
            if len(data) < size:
                raise TarDamage(f"truncated extended header at byte {offset}")
            if kind == b"L":
                long_name = data[:size].rstrip(b"\0").decode("utf-8", "surrogateescape")
            elif kind == b"x":
                pax = _pax(data[:size], offset)
            offset = data_offset + padded
            continue
        if long_name is not None or "path" in pax:
            name = pax.get("path") or long_name or ""
        else:
            name = header[:100].split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
            prefix = header[345:500].split(b"\0", 1)[0] if header[257:262] == b"ustar" else b""
            if prefix:
                name = prefix.decode("utf-8", "surrogateescape") + "/" + name
        if "size" in pax:
            size = _pax_number(pax, "size", offset)
            padded = (size + _BLOCK - 1) // _BLOCK * _BLOCK
        try:
            mtime = _pax_number(pax, "mtime", offset, float) if "mtime" in pax else float(_number(header[136:148]))
        except ValueError:
            raise TarDamage(f"not a tar header at byte {offset}")
        if mtime != mtime or mtime in (float("inf"), float("-inf")):
            raise TarDamage(f"pax record mtime is not finite (header at byte {offset})")
        long_name, pax = None, {}
        if kind in _FILE_TYPES:
            yield Member(name, data_offset, size, mtime)
        elif kind != b"5" and skipped is not None:  # 5: a folder, nothing to say
            skipped.append(name)
        offset = data_offset + padded
        handle.seek(offset)


def _samples(
    members: Iterator[Member], skipped: list[str] | None = None
) -> Iterator[tuple[str, list[tuple[str, Member]]]]:
    """Group consecutive members by key: (key, [(extension, member), ...]). When the tar turns
    out damaged, the sample being read is still yielded (its rows say what is missing)."""
    key = ""
    group: list[tuple[str, Member]] = []
    try:
        for member in members:
            match = _KEY_AND_EXTENSION.match(member.name)
            if not match:
                if skipped is not None:  # no extension, or a hidden name: WebDataset skips these too
                    skipped.append(member.name)
                continue
            member_key, extension = match.group(1), match.group(2)
            if member_key != key and group:
                yield key, group
                group = []
            key = member_key
            group.append((extension, member))
    finally:
        if group:
            yield key, group


def list_shard(root: str, shard_name: str, warnings: list[str] | None = None) -> list[ImageItem]:
    """Items of one shard ``root/shard_name``; damage becomes an error item keyed by the shard."""
    location = os.path.join(root, shard_name) if not is_url(root) else root.rstrip("/") + "/" + shard_name
    items: list[ImageItem] = []
    seen: set[str] = set()
    duplicates = 0
    skipped: list[str] = []

    def broken(reason: str) -> ImageItem:
        return ImageItem(root, shard_name, BrokenShard(shard_name, reason))

    try:
        handle = open_input(location, sequential=True)
    except FileNotFoundError:
        return [broken(f"shard not found: {location}")]
    except OSError as exc:
        return [broken(f"cannot open shard: {describe(exc, location)}")]
    try:
        with handle:
            for key, group in _samples(iter_members(handle, skipped), skipped):
                if key in seen:
                    duplicates += 1
                    continue
                seen.add(key)
                if key.startswith("/") or ".." in key.split("/"):
                    # A name that climbs out of the shard ("../x", "/etc/x"): never a path visbatch writes to.
                    reason = f"member name {key!r} leaves the shard (absolute or '..'); not read"
                    items.append(ImageItem(root, f"{shard_name}/{key}", BrokenShard(shard_name, reason)))
                    continue
                image = next((m for ext, m in group if ext.rsplit(".", 1)[-1].lower() in _IMAGE_SUFFIXES), None)
                sidecars = tuple((ext, m) for ext, m in group if ext in ("txt", "json"))
                sample = TarSample(location, shard_name, image, sidecars, tuple(ext for ext, _ in group))
                items.append(ImageItem(root, f"{shard_name}/{key}", sample))
    except (TarDamage, OSError) as exc:
        what = f"after {len(items)} samples" if items else "before any sample"
        message = str(exc) if isinstance(exc, TarDamage) else describe(exc, location)
        items.append(broken(f"truncated or corrupt tar {what}: {message}"))
    if skipped and warnings is not None:
        warnings.append(
            f"{shard_name}: {len(skipped)} members belong to no sample and were not read "
            f"(no extension, a hidden name, or a link), e.g. {skipped[0]!r}"
        )
    if duplicates and warnings is not None:
        warnings.append(f"{shard_name}: {duplicates} samples repeat a key already seen in the shard and were skipped")
    if not items:
        items.append(broken("shard holds no samples"))
    return items


def shards_in_folder(root: str, recursive: bool = True) -> list[str]:
    """Shard names (relative, sorted) under a local folder or a URL prefix."""
    if is_url(root):
        fs, path = filesystem(root)
        base = path.rstrip("/")
        names = with_retries(lambda: fs.find(base) if recursive else fs.ls(base, detail=False), root)
        relative = [n[len(base) + 1 :] if n.startswith(base + "/") else n for n in names]
        return sorted(r for r in relative if is_shard_name(r))
    found = []
    for directory, subdirs, files in os.walk(root):
        subdirs[:] = sorted(d for d in subdirs if not d.startswith(".")) if recursive else []
        rel = os.path.relpath(directory, root)
        found += [f if rel == "." else f"{rel}/{f}".replace(os.sep, "/") for f in files if is_shard_name(f)]
    return sorted(found)


def read_shard_list(path: str) -> list[str] | None:
    """The shards a text file lists (one per line, ``#`` comments), or None when its lines are not
    all shard names (so a user's .txt that names something else is not taken for a list)."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = [line.strip() for line in f]
    except (OSError, UnicodeDecodeError):
        return None
    names = [line for line in lines if line and not line.startswith("#")]
    if not names or not all(is_shard_name(n) or "{" in n for n in names):
        return None
    base = os.path.dirname(os.path.abspath(path))
    return [n if is_url(n) or os.path.isabs(n) else os.path.join(base, n) for n in names]


def split_location(location: str) -> tuple[str, str]:
    """(root, shard name) of one shard path or URL: the folder holding it, and its file name."""
    if is_url(location):
        head, _, name = location.rstrip("/").rpartition("/")
        return head, name
    absolute = os.path.abspath(location)
    return os.path.dirname(absolute), os.path.basename(absolute)


def list_shards(
    shards: Sequence[tuple[str, str]],
    limit: int | None = None,
    warnings: list[str] | None = None,
) -> list[ImageItem]:
    """Items of ``(root, shard name)`` pairs in key order, stopping once ``limit`` are listed
    (the shards after that point can only hold keys that sort later)."""
    items: list[ImageItem] = []
    for root, name in sorted(set(shards)):
        items += list_shard(root, name, warnings)
        if limit is not None and len(items) >= limit:
            break
    return items
