"""WebDataset tar shards: ``pool/{00000..00999}.tar``, a folder of ``.tar`` files, a list of shards.

WebDataset's convention (the one img2dataset and DataComp write): a sample is the
consecutive members sharing a key, the member name up to the first dot of its base
name (``a/000010005.seg.png`` -> key ``a/000010005``, extension ``seg.png``); a repeated
extension starts a new sample; the image is the first member whose last extension is an
image type; ``.txt`` and ``.json`` are its caption sidecars, and every member is kept (so
``--write-shards`` copies whole samples).

Keys with dots (``webdataset.ShardWriter`` writes key ``a.b.c000`` as ``a.b.c000.jpg``,
``a.b.c000.txt``) are where visbatch deliberately differs from the ``webdataset`` library,
which reads every such member as one sample ``a``: a run of members that the first-dot rule
would make one sample, none of them a bare ``KEY.EXT`` and two of them ending in the same
extension, is split where the name minus its last extension changes (members whose stem
extends the sample's key, ``a.b.c000.seg.png``, stay in it). Shards without dotted keys
group exactly as ``webdataset`` groups them.

Listing reads the tar headers only (each member's offset and size), so no member is
extracted to disk and the decode workers read exactly the bytes of their sample, locally
or by a ranged request on object storage. A gzipped shard (``.tar.gz``, ``.tgz``) cannot be
read by range: each process keeps one decompressing reader per shard and reads forward.

Row keys are ``SHARD/KEY`` (``00042.tar/000420017``) and the shard has its own output
column. A shard that is missing, unreadable or cut short is one error row keyed by the
shard's name (members listed before the damage keep their rows), never a hang.
"""

from __future__ import annotations

import gzip
import json
import os
import re
import threading
import zlib
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
from visbatch.core.sources.local import names_under
from visbatch.core.sources.remote import (
    describe,
    filesystem,
    is_url,
    open_input,
    read_range,
    storage_error,
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


SHARD_SUFFIXES = (".tar", ".tar.gz", ".tgz")
_GZIP_SUFFIXES = (".tar.gz", ".tgz")


def is_shard_name(name: str) -> bool:
    return name.lower().endswith(SHARD_SUFFIXES)


def is_gzipped(location: str) -> bool:
    return location.lower().endswith(_GZIP_SUFFIXES)


class GzipDamage(OSError):
    """A gzipped shard whose stream is cut or corrupt (the file itself was read)."""


class _GzipReaders:
    """One decompressing reader per gzipped shard in this process, read forward: the samples
    of a shard are read in key order, so each shard is decompressed about once per worker
    (a read behind the reader's position reopens it)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._open: dict[str, tuple[object, gzip.GzipFile]] = {}

    def read(self, location: str, offset: int, size: int) -> bytes:
        with self._lock:
            held = self._open.get(location)
            if held is None or held[1].tell() > offset:
                if held is not None:
                    held[1].close()
                    held[0].close()  # type: ignore[attr-defined]
                raw = open_input(location, sequential=True)
                held = (raw, gzip.GzipFile(fileobj=raw, mode="rb"))
                if len(self._open) >= 4:  # a few shards at a time: a worker moves on
                    oldest = next(iter(self._open))
                    old_raw, old_reader = self._open.pop(oldest)
                    old_reader.close()
                    old_raw.close()  # type: ignore[attr-defined]
                self._open[location] = held
            reader = held[1]
            try:
                reader.seek(offset)
                return reader.read(size)
            except (EOFError, zlib.error, gzip.BadGzipFile) as exc:
                self._open.pop(location, None)
                raise GzipDamage(f"damaged gzip stream: {exc}") from exc


_GZIP_READERS = _GzipReaders()


def read_member(location: str, offset: int, size: int) -> bytes:
    """``size`` bytes at ``offset`` of the (decompressed) shard."""
    if is_gzipped(location):
        return _GZIP_READERS.read(location, offset, size)
    return read_range(location, offset, offset + size)


@dataclass(frozen=True, slots=True)
class Member:
    name: str
    offset: int  # of the data, in the tar
    size: int
    mtime: float


@dataclass(frozen=True, slots=True)
class TarSample:
    """One WebDataset sample: where its members lie in the shard, and which is the image."""

    location: str  # the shard: a local path or a URL
    shard_name: str  # as shown in the ``shard`` column (relative to the input root)
    key: str  # the sample's key in the shard (``a.b.c000``, ``part/000010005``)
    image: Member | None
    members: tuple[tuple[str, Member], ...]  # (extension as written, member), in tar order
    kept: tuple[str, ...] = ()  # ``--keep-columns``: fields of the sample's ``.json``

    @property
    def shard(self) -> str:
        return self.shard_name

    @property
    def extensions(self) -> tuple[str, ...]:
        return tuple(extension for extension, _ in self.members)

    def member_bytes(self) -> list[tuple[str, bytes]]:
        """Every member's (extension, bytes), in tar order: a whole sample, for --write-shards."""
        return [(extension, self._member_bytes(member)) for extension, member in self.members]

    def inputs(self) -> tuple[str, ...]:
        return (self.location,)

    def _member_bytes(self, member: Member) -> bytes:
        try:
            data = read_member(self.location, member.offset, member.size)
        except GzipDamage as exc:
            raise ImageDecodeError(f"cannot read {member.name} from {self.shard_name}: {exc}")
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
        for extension, member in self.members:
            if "." + extension.lower() == suffix:
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
        """``key`` (the sample's key, as img2dataset's tables name it) and the ``--keep-columns``
        fields of the sample's ``.json`` as text (a JSON string as is, any other value as JSON;
        null when the sample has no such field)."""
        values: dict = {"key": self.key}
        if self.kept:
            fields = json_fields(self.sidecar_or_none(".json"))
            for name in self.kept:
                value = fields.get(name)
                values[name] = value if value is None or isinstance(value, str) else json.dumps(value)
        return values

    def sidecar_or_none(self, suffix: str) -> bytes | None:
        try:
            return self.sidecar(suffix)
        except OSError:
            return None


def json_fields(data: bytes | None) -> dict:
    """The top-level fields of a sample's ``.json`` member ({} when it has none or it is not an object)."""
    if data is None:
        return {}
    try:
        value = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        return {}
    return value if isinstance(value, dict) else {}


@dataclass(frozen=True)
class BrokenShard:
    """A shard that could not be listed (or only in part): its error row."""

    shard_name: str
    reason: str
    key: str | None = None  # a sample's key, when the row is one sample's (a name that climbs out)

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
        return {"key": self.key} if self.key is not None else {}


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


def _first_dot_groups(
    members: Iterator[Member], skipped: list[str] | None = None
) -> Iterator[tuple[str, list[tuple[str, Member]]]]:
    """Consecutive members grouped by their first-dot key, as ``webdataset`` groups them:
    (key, [(extension, member), ...]). When the tar turns out damaged, the group being read is
    still yielded (its rows say what is missing)."""
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


def _dotted_keys(key: str, group: list[tuple[str, Member]]) -> list[tuple[str, list[tuple[str, Member]]]]:
    """A first-dot group split into the samples of dotted keys (module doc), or left whole."""
    if len(group) < 2 or any("." not in extension for extension, _ in group):
        return [(key, group)]  # a bare KEY.EXT member: the sample webdataset reads
    last = [extension.rsplit(".", 1)[1].lower() for extension, _ in group]
    stems = {extension.rsplit(".", 1)[0] for extension, _ in group}
    if len(set(last)) == len(last) and len(stems) > 1:
        return [(key, group)]  # e.g. 000.seg.png + 000.depth.exr: one sample with long extensions
    samples: list[tuple[str, list[tuple[str, Member]]]] = []
    for extension, member in group:
        full = key + "." + extension
        stem, final = full.rsplit(".", 1)
        if samples:
            current, parts = samples[-1]
            taken = {e.lower() for e, _ in parts}
            if (stem == current or stem.startswith(current + ".")) and full[len(current) + 1 :].lower() not in taken:
                parts.append((full[len(current) + 1 :], member))
                continue
            if current.startswith(stem + "."):  # the shorter stem is the key: its members re-split
                names = [current + "." + e for e, _ in parts] + [full]
                members = [m for _, m in parts] + [member]
                extensions = [n[len(stem) + 1 :] for n in names]
                if len({e.lower() for e in extensions}) == len(extensions):
                    samples[-1] = (stem, list(zip(extensions, members)))
                    continue
        samples.append((stem, [(final, member)]))
    return samples


def _split_repeats(key: str, group: list[tuple[str, Member]]) -> Iterator[tuple[str, list[tuple[str, Member]]]]:
    """A repeated extension (``x.jpg``, ``x.jpg``) starts a new sample with the same key (as
    ``webdataset`` 0.2 did; the listing skips the second as a repeated key, with a warning)."""
    part: list[tuple[str, Member]] = []
    for extension, member in group:
        if any(extension.lower() == e.lower() for e, _ in part):
            yield key, part
            part = []
        part.append((extension, member))
    if part:
        yield key, part


def _samples(
    members: Iterator[Member], skipped: list[str] | None = None
) -> Iterator[tuple[str, list[tuple[str, Member]]]]:
    """The samples of a tar, in order: (key, [(extension, member), ...])."""
    for key, group in _first_dot_groups(members, skipped):
        for sample_key, sample in _dotted_keys(key, group):
            yield from _split_repeats(sample_key, sample)


def _image_member(group: list[tuple[str, Member]]) -> Member | None:
    """The sample's image: a member whose whole extension is an image type (``jpg``), else the
    first whose last one is (so ``seg.png``, a mask, is the image only of a sample without one)."""
    plain = next((m for ext, m in group if ext.lower() in _IMAGE_SUFFIXES), None)
    if plain is not None:
        return plain
    return next((m for ext, m in group if ext.rsplit(".", 1)[-1].lower() in _IMAGE_SUFFIXES), None)


def refuse_pipe(entry: str) -> None:
    """WebDataset's ``pipe:`` URLs run a shell command: visbatch never runs one named by its input."""
    if entry.startswith("pipe:"):
        raise InputError(
            f"{entry[:60]}: pipe: inputs (WebDataset's shell-command URLs) are not supported: visbatch "
            "never runs a command named by its input; give the shard's path or URL (s3://, gs://, https://)"
        )


def list_shard(
    root: str, shard_name: str, warnings: list[str] | None = None, kept: tuple[str, ...] = ()
) -> list[ImageItem]:
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
        if is_gzipped(location):
            handle = gzip.GzipFile(fileobj=handle, mode="rb")
    except FileNotFoundError:
        return [broken(f"shard not found: {location}")]
    except OSError as exc:
        return [broken(f"cannot open shard: {describe(exc, location)}")]
    except Exception as exc:  # a storage client's own error (botocore's EndpointConnectionError): no shard can be read
        raise storage_error(exc, location) from exc
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
                    items.append(ImageItem(root, f"{shard_name}/{key}", BrokenShard(shard_name, reason, key)))
                    continue
                image = _image_member(group)
                sample = TarSample(location, shard_name, key, image, tuple(group), kept)
                items.append(ImageItem(root, f"{shard_name}/{key}", sample))
    except (TarDamage, OSError, EOFError, zlib.error) as exc:
        what = f"after {len(items)} samples" if items else "before any sample"
        if isinstance(exc, TarDamage):
            message = str(exc)
        elif isinstance(exc, (EOFError, zlib.error, gzip.BadGzipFile)):
            message = f"damaged gzip stream: {exc}"
        else:
            message = describe(exc, location)
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
    return names_under(root, recursive, is_shard_name)


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
    for name in names:
        refuse_pipe(name)
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
    kept: tuple[str, ...] = (),
) -> list[ImageItem]:
    """Items of ``(root, shard name)`` pairs in key order, stopping once ``limit`` are listed
    (the shards after that point can only hold keys that sort later)."""
    items: list[ImageItem] = []
    for root, name in sorted(set(shards)):
        items += list_shard(root, name, warnings, kept)
        if limit is not None and len(items) >= limit:
            break
    return items
