"""``--copy-to`` / ``--link-to``: the selection materialized, every destination checked before
anything is written (never clobbering, never touching an input)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from visbatch.core.errors import FatalError, UsageError
from visbatch.core.files import atomic_copy, atomic_link, atomic_write_bytes, files_identical
from visbatch.core.images import ImageItem, display_path
from visbatch.core.overlays import root_folder_names
from visbatch.core.sources import ImageDecodeError, read_item


@dataclass
class Materialization:
    """What ``--copy-to`` / ``--link-to`` will do: (source, destination) pairs to write and the
    destinations that already hold the same file (skipped)."""

    mode: str  # copy | symlink | hardlink
    target: str
    writes: list[tuple[ImageItem, Path]]
    same: int


def plan_materialize(
    items: Sequence[ImageItem],
    selected: np.ndarray,
    target: str,
    mode: str,
    overwrite: bool = False,
) -> Materialization:
    """Check every destination before anything is written (see :func:`materialize`).

    Keeps the inputs' relative paths (each input root in its own subfolder when there are
    several). A destination that already holds the same file (same bytes for a copy, a link
    to the same file for links) is skipped; any other existing destination is refused unless
    ``overwrite``. (The run plan keeps the folder away from every input, and admits each
    destination as it is written: one that resolves out of the folder is refused.) Called with
    every pool image selected, it is the check made before anything is embedded.
    """
    if mode not in ("copy", "symlink", "hardlink"):
        raise UsageError(f"unknown link mode {mode!r} (symlink or hardlink)")
    packed = next((it for it, keep in zip(items, selected) if keep and it.ref is not None), None)
    if packed is not None and (mode != "copy" or not getattr(packed.ref, "url", None)):
        option = "--copy-to" if mode == "copy" else "--link-to"
        what = (
            "objects on storage can be copied, not linked"
            if getattr(packed.ref, "url", None)
            else ("samples of tar shards and tables are not files")
        )
        raise UsageError(f"{option}: {what} ({packed.relpath}); use --write-shards DIR for them")
    roots = sorted({item.root for item in items})
    subfolders = root_folder_names(roots) if len(roots) > 1 else {}
    writes, same, conflicts = [], 0, []
    real_target = os.path.realpath(target)
    real_folders: dict[str, str] = {}
    for item, keep in zip(items, selected):
        if not keep:
            continue
        if item.relpath.startswith("/") or ".." in item.relpath.replace("\\", "/").split("/"):
            option = "--copy-to" if mode == "copy" else "--link-to"
            raise UsageError(f"{option}: {item.relpath!r} (a manifest path) would land outside {target}")
        destination = Path(target, subfolders.get(item.root, ""), item.relpath)
        folder = str(destination.parent)
        if folder not in real_folders:
            real_folders[folder] = os.path.realpath(folder)
        if not (real_folders[folder] + os.sep).startswith(real_target.rstrip(os.sep) + os.sep):
            option = "--copy-to" if mode == "copy" else "--link-to"
            raise UsageError(
                f"{option} {target}: {display_path(str(destination))} resolves to "
                f"{os.path.join(real_folders[folder], destination.name)}, outside {target} (a link in the folder); "
                "remove the link or choose another folder"
            )
        if os.path.lexists(destination):
            if item.ref is None and _holds_same_file(destination, item.path, mode):
                same += 1
                continue
            conflicts.append(destination)
        writes.append((item, destination))
    if conflicts and not overwrite:
        option = "--copy-to" if mode == "copy" else "--link-to"
        raise UsageError(
            f"{option} {target}: {len(conflicts)} destination files exist and differ from the "
            f"selection (e.g. {display_path(str(conflicts[0]))}); pass --overwrite to replace them"
        )
    return Materialization(mode, target, writes, same)


def _holds_same_file(destination: Path, source: str, mode: str) -> bool:
    if mode == "symlink":
        return destination.is_symlink() and os.path.realpath(destination) == os.path.realpath(source)
    if mode == "hardlink":
        return not destination.is_symlink() and os.path.exists(destination) and os.path.samefile(destination, source)
    return not destination.is_symlink() and destination.is_file() and files_identical(destination, source)


def materialize(plan: Materialization) -> int:
    """Write the planned copies or links; returns how many destinations hold the selection.

    Each destination is replaced by a rename (a copy through a temp file, a link made under a
    temp name), so nothing is ever written through an existing file or link, and an input
    can never be truncated, unlinked or replaced.
    """
    for item, destination in plan.writes:
        source = item.path
        if plan.mode == "copy" and item.ref is not None:  # an object on storage: its bytes
            try:
                atomic_write_bytes(destination, read_item(item).data, within=plan.target)
            except ImageDecodeError as exc:
                raise FatalError(f"cannot copy {item.path}: {exc}") from exc
        elif plan.mode == "copy":
            atomic_copy(source, destination, within=plan.target)
        else:
            atomic_link(source, destination, plan.mode, within=plan.target)
    return len(plan.writes) + plan.same
