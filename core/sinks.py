"""Outputs on object storage: written locally first, uploaded whole once the run has finished.

Object stores have no rename, so a file written in place could be read half-written.
Instead every URL output (``-o s3://bucket/run/scores.parquet``, ``--overlays s3://...``)
is staged in a local folder (``VISBATCH_STAGING``, default ``~/.cache/visbatch/staging``,
one subfolder per URL so an interrupted run resumes from it) and uploaded by one PUT per
file when the run completes: a reader sees the old object or the whole new one. A
``--resume`` with no local staging downloads the finished output first. ``file://`` URLs
are plain local paths (the atomic local writer serves them). A staging folder carries a
marker file (``.visbatch-staging``): visbatch removes only folders it marked, and refuses
to stage into a folder it did not make.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from visbatch.core.errors import FatalError, UsageError
from visbatch.core.files import atomic_path, atomic_write_bytes, remove_owned_folder, remove_quietly
from visbatch.core.plan import as_local, staging_folder
from visbatch.core.sources.remote import filesystem, is_url, storage_error, with_retries

STAGING_MARKER = ".visbatch-staging"  # written in every staging folder visbatch makes: its record of it


def local_or_url(target: str | None) -> str | None:
    """``file://`` URLs as local paths; anything else unchanged."""
    return as_local(target)


def _make_staging(folder: str) -> None:
    """Create ``folder`` with its marker, or accept one visbatch made earlier (it has the marker)."""
    if os.path.isdir(folder) and not os.path.islink(folder):
        if not os.path.isfile(os.path.join(folder, STAGING_MARKER)):
            raise UsageError(
                f"staging folder {folder} exists and was not made by visbatch; "
                "set VISBATCH_STAGING to a folder of visbatch's own"
            )
        return
    if os.path.lexists(folder):
        raise UsageError(f"staging folder {folder} exists and is not a folder; set VISBATCH_STAGING elsewhere")
    atomic_write_bytes(os.path.join(folder, STAGING_MARKER), b"visbatch staging folder\n")


def _remove_staging(folder: str) -> None:
    """Remove a staging folder visbatch made (its marker says so), files and all; no other folder."""
    if not os.path.isfile(os.path.join(folder, STAGING_MARKER)) or os.path.islink(folder):
        return
    for directory, subdirs, names in os.walk(folder, topdown=False):
        for name in names:
            remove_quietly(os.path.join(directory, name))
        for name in subdirs:
            path = os.path.join(directory, name)
            if os.path.islink(path):
                remove_quietly(path)
            else:
                remove_owned_folder(path)
    remove_owned_folder(folder)


def check_url_output(url: str, what: str = "-o") -> None:
    """A URL output names an object, not a prefix (``s3://bkt/newprefix/`` would write an object
    named ``newprefix``)."""
    if url.endswith("/"):
        raise UsageError(f"{what} {url} ends with '/': name a file (for example {url}results.parquet)")


@dataclass
class RemoteOutputs:
    """The URL outputs of one run and their local stand-ins."""

    files: list[tuple[str, str]] = field(default_factory=list)  # (local path, URL)
    folders: list[tuple[str, str]] = field(default_factory=list)

    def stage_file(self, url: str | None, resume: bool = False, overwrite: bool = False) -> str | None:
        """The local path to write for ``url`` (``url`` itself when it is local); refuses an
        existing object unless ``resume``/``overwrite``, and fetches it for a resume."""
        url = local_or_url(url)
        if not url or not is_url(url):
            return url
        check_url_output(url)
        fs, path = filesystem(url)
        try:
            exists = with_retries(lambda: fs.exists(path), url)
        except Exception as exc:
            raise storage_error(exc, url)
        if exists and not (resume or overwrite):
            raise UsageError(f"output {url} exists; pass --overwrite to replace it or --resume to add to it")
        folder = staging_folder(url)
        _make_staging(folder)
        local = os.path.join(folder, os.path.basename(path) or "output")
        if resume and exists and not os.path.exists(local) and not os.path.exists(local + ".parts"):
            try:
                with atomic_path(local) as tmp:
                    with_retries(lambda: fs.get_file(path, tmp), url)
            except FatalError:
                raise
            except Exception as exc:
                raise storage_error(exc, url)
        self.files.append((local, url))
        return local

    def stage_folder(self, url: str | None) -> str | None:
        url = local_or_url(url)
        if not url or not is_url(url):
            return url
        filesystem(url)  # a missing backend fails now, before any work
        folder = staging_folder(url)
        _make_staging(folder)
        local = os.path.join(folder, "folder")
        os.makedirs(local, exist_ok=True)
        self.folders.append((local, url))
        return local

    def url_of(self, local: str | None) -> str | None:
        for staged, url in self.files + self.folders:
            if local == staged:
                return url
        return local

    def publish(self) -> None:
        """Upload every staged output (files whole, folders file by file), then drop the staging."""
        for local, url in self.folders:
            fs, path = filesystem(url)
            for directory, _, names in os.walk(local):
                for name in sorted(names):
                    source = os.path.join(directory, name)
                    relative = os.path.relpath(source, local).replace(os.sep, "/")
                    target = path.rstrip("/") + "/" + relative
                    try:
                        with_retries(lambda: fs.put_file(source, target), url)
                    except Exception as exc:
                        raise storage_error(exc, f"{url.rstrip('/')}/{relative}")
        for local, url in self.files:
            if not os.path.exists(local):
                continue
            fs, path = filesystem(url)
            try:
                with_retries(lambda: fs.put_file(local, path), url)
            except Exception as exc:
                raise storage_error(exc, url)
        for local, _ in self.files + self.folders:
            _remove_staging(os.path.dirname(local))

    def __bool__(self) -> bool:
        return bool(self.files or self.folders)
