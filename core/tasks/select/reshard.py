"""``--write-shards DIR --shard-size N``: the selection written as new WebDataset tar shards.

The DataComp resharder's job: selected samples, in manifest (key) order, go into
``DIR/000000.tar``, ``DIR/000001.tar``, ... numbered without gaps. A sample read from a
shard is copied whole (every member: ``.jpg``, ``.txt``, ``.json``, ``.cls``, ``.seg.png``,
``.npy``, ...) under its key unchanged; a loose image gets its path without the extension,
with characters other than letters, digits, ``_``, ``-`` and ``/`` made ``_`` (so WebDataset
readers split it back as written), plus its ``.txt`` / ``.json`` sidecars. Two samples with
one key (from two shards) keep the first; the later ones get ``_1``, ``_2``, ... Shards are
PAX tars, as WebDataset's TarWriter writes them, so a key of any length fits. Every
destination is checked before anything is written; each shard is written to a temp file
and renamed, so a reader never sees half a shard. No input is touched.
"""

from __future__ import annotations

import io
import os
import re
import tarfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from visbatch.core.errors import FatalError, UsageError
from visbatch.core.files import atomic_path
from visbatch.core.images import ImageItem
from visbatch.core.sources import SIDECAR_SUFFIXES, ImageDecodeError, read_item, read_sidecar
from visbatch.core.sources.shards import TarSample

SHARD_DIGITS = 6
_UNSAFE = re.compile(r"[^A-Za-z0-9_/-]+")
_MAGIC = (
    (b"\xff\xd8\xff", "jpg"),
    (b"\x89PNG", "png"),
    (b"GIF8", "gif"),
    (b"BM", "bmp"),
    (b"II*\x00", "tif"),
    (b"MM\x00*", "tif"),
)


def image_extension(data: bytes, name: str = "") -> str:
    """The extension an image member gets: the input's own when it is an image type, else one
    read from the bytes' signature."""
    suffix = os.path.splitext(name)[1].lower().lstrip(".")
    if suffix in ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff"):
        return suffix
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    return next((ext for magic, ext in _MAGIC if data.startswith(magic)), "img")


def output_key(item: ImageItem) -> str:
    """A WebDataset key for the item: a shard sample keeps its key as written; another item
    gets its relative path without the image extension, every run of characters other than
    letters, digits, ``_``, ``-`` and ``/`` made one ``_`` (a dot would split the key)."""
    if isinstance(item.ref, TarSample):
        return item.ref.key
    relpath = item.relpath
    if item.ref is None or getattr(item.ref, "url", None):
        relpath = os.path.splitext(relpath)[0]
    parts = [_UNSAFE.sub("_", part) for part in relpath.split("/")]
    return "/".join(p for p in parts if p) or "sample"


@dataclass
class ShardPlan:
    target: str
    shard_size: int
    samples: list[tuple[ImageItem, str]]  # (item, output key) in write order

    @property
    def shard_count(self) -> int:
        return (len(self.samples) + self.shard_size - 1) // self.shard_size

    def shard_name(self, index: int) -> str:
        return f"{index:0{SHARD_DIGITS}d}.tar"


def plan_shards(
    items: Sequence[ImageItem],
    selected: np.ndarray,
    target: str,
    shard_size: int,
    overwrite: bool = False,
) -> ShardPlan:
    """Check the target and name every sample before anything is written."""
    check_shard_folder(target, shard_size, overwrite)
    chosen = [item for item, keep in zip(items, selected) if keep]
    used: set[str] = set()
    samples = []
    for item in chosen:
        key = base = output_key(item)
        counter = 0
        while key in used:  # two inputs with one key: the later gets the first free counter
            counter += 1
            key = f"{base}_{counter}"
        used.add(key)
        samples.append((item, key))
    return ShardPlan(target, shard_size, samples)


def check_shard_folder(target: str, shard_size: int, overwrite: bool) -> None:
    """Refuse, before anything is created, a bad --shard-size or a --write-shards folder that
    already holds shards (without --overwrite)."""
    if shard_size < 1:
        raise UsageError("--shard-size must be at least 1")
    if os.path.exists(target) and not os.path.isdir(target):
        raise UsageError(f"--write-shards {target} exists and is not a folder")
    existing = sorted(p.name for p in Path(target).glob("*.tar")) if os.path.isdir(target) else []
    if existing and not overwrite:
        raise UsageError(
            f"--write-shards {target} already holds {len(existing)} .tar files (e.g. {existing[0]}); "
            "pass --overwrite to replace them, or choose an empty folder"
        )


def _sample_members(item: ImageItem) -> tuple[float | None, list[tuple[str, bytes]]]:
    """(the image's mtime, every member's (extension, bytes)) of one selected sample."""
    image = read_item(item)  # the image first: a sample without one is unreadable
    if isinstance(item.ref, TarSample):
        return image.mtime, item.ref.member_bytes()
    member = getattr(getattr(item.ref, "image", None), "name", item.relpath)
    members = [(image_extension(image.data, member), image.data)]
    for suffix in SIDECAR_SUFFIXES:
        data = read_sidecar(item, suffix)
        if data is not None:
            members.append((suffix.lstrip("."), data))
    return image.mtime, members


def _add(tar: tarfile.TarFile, name: str, data: bytes, mtime: float) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = int(mtime)
    info.mode = 0o644
    tar.addfile(info, io.BytesIO(data))


def write_shards(plan: ShardPlan) -> dict:
    """Write the planned shards; returns what was written (and the samples that could not be read).
    A sample whose bytes can no longer be read is left out and counted, never a half sample."""
    written, unreadable, now = 0, [], time.time()
    placed: dict[str, tuple[str, str]] = {}
    for index in range(plan.shard_count):
        name = plan.shard_name(index)
        part = plan.samples[index * plan.shard_size : (index + 1) * plan.shard_size]
        destination = os.path.join(plan.target, name)
        with atomic_path(destination, within=plan.target) as tmp:
            try:
                with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tar:
                    for item, key in part:
                        try:
                            mtime, members = _sample_members(item)
                        except (ImageDecodeError, OSError) as exc:
                            unreadable.append(f"{item.relpath}: {exc}")
                            continue
                        for extension, data in members:
                            _add(tar, f"{key}.{extension}", data, mtime or now)
                        placed[item.relpath] = (name, key)
                        written += 1
            except (OSError, tarfile.TarError) as exc:
                raise FatalError(f"cannot write shard {destination}: {exc}") from exc
    leftover = sorted(
        p.name
        for p in Path(plan.target).glob("*.tar")
        if p.name not in {plan.shard_name(i) for i in range(plan.shard_count)}
    )
    return {
        "shards": plan.shard_count,
        "samples": written,
        "unreadable": unreadable[:5],
        "unreadable_count": len(unreadable),
        "other_tar_files_in_folder": leftover[:5],
        "placed": placed,
    }
