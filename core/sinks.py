"""Outputs on object storage: written locally first, uploaded whole once the run has finished.

Object stores have no rename, so a file written in place could be read half-written.
Instead every URL output (``-o s3://bucket/run/scores.parquet``, ``--overlays s3://...``)
is staged in a local folder (``VISBATCH_STAGING``, default ``~/.cache/visbatch/staging``,
one subfolder per URL so an interrupted run resumes from it) and uploaded by one PUT per
file when the run completes: a reader sees the old object or the whole new one. A
``--resume`` with no local staging downloads the finished output first. ``file://`` URLs
are plain local paths (the atomic local writer serves them).
"""

from __future__ import annotations

import hashlib
import os
import shutil
from dataclasses import dataclass, field

from visbatch.core.errors import UsageError
from visbatch.core.sources.remote import filesystem, is_url, storage_error, with_retries


def local_or_url(target: str | None) -> str | None:
    """``file://`` URLs as local paths; anything else unchanged."""
    if target and target.startswith("file://"):
        return target[len("file://") :]
    return target


def staging_root() -> str:
    return os.environ.get("VISBATCH_STAGING") or os.path.join(os.path.expanduser("~"), ".cache", "visbatch", "staging")


def _staging_folder(url: str) -> str:
    digest = hashlib.blake2b(url.encode(), digest_size=8).hexdigest()
    return os.path.join(staging_root(), digest)


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
        fs, path = filesystem(url)
        try:
            exists = with_retries(lambda: fs.exists(path), url)
        except Exception as exc:
            raise storage_error(exc, url)
        if exists and not (resume or overwrite):
            raise UsageError(f"output {url} exists; pass --overwrite to replace it or --resume to add to it")
        local = os.path.join(_staging_folder(url), os.path.basename(path) or "output")
        os.makedirs(os.path.dirname(local), exist_ok=True)
        if overwrite and not resume:
            shutil.rmtree(os.path.dirname(local), ignore_errors=True)
            os.makedirs(os.path.dirname(local), exist_ok=True)
        if resume and exists and not os.path.exists(local) and not os.path.exists(local + ".parts"):
            try:
                with_retries(lambda: fs.get_file(path, local + ".download"), url)
                os.replace(local + ".download", local)
            except Exception as exc:
                raise storage_error(exc, url)
        self.files.append((local, url))
        return local

    def stage_folder(self, url: str | None) -> str | None:
        url = local_or_url(url)
        if not url or not is_url(url):
            return url
        filesystem(url)  # a missing backend fails now, before any work
        local = os.path.join(_staging_folder(url), "folder")
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
            shutil.rmtree(os.path.dirname(local), ignore_errors=True)

    def __bool__(self) -> bool:
        return bool(self.files or self.folders)
