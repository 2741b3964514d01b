"""No input file is ever modified, moved, replaced or deleted, whatever the options.

:class:`ProtectedInputs` knows the run's inputs: the input roots (folders,
and the folder of each named file) and the files named on the command line
(images, manifests, caption tables, label files, weights, detectors). Before
anything is created, every output is checked against it:

- an output *file* (Parquet, cache, detector, quantized model, report) may
  not be an input file (by path, symlink target or inode), nor replace an
  image or sidecar file under an input root;
- an output *folder* (overlays, maps, ``--copy-to``, ``--link-to``, shard
  output) may not be an input root, lie inside one, or contain one;
- each file written into an output folder is checked again when it is
  written (:meth:`ProtectedInputs.check_write`): a symbolic link inside the
  output folder that leads back into an input root cannot be written through,
  and every write replaces its destination by a rename (never through a link).

Violations raise :class:`~visbatch.core.outputs.OutputError` (exit 2) naming
the output and the input it would touch.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from visbatch.core.errors import UsageError
from visbatch.core.sources.local import file_identity
from visbatch.core.sources.remote import is_url

# Files under an input root that an output file may never replace: images, their sidecars, shards
# and tables.
_SIDECAR_EXTENSIONS = frozenset({".txt", ".json", ".cls", ".caption", ".tar", ".parquet", ".arrow"})


class OutputOverlapsInput(UsageError):
    """An output aimed at an input (exit 2)."""


def _real(path: str | os.PathLike) -> str:
    return os.path.realpath(os.path.abspath(os.fspath(path)))


def _inside(path: str, folder: str) -> bool:
    """``path`` is ``folder`` or lies under it (both real paths)."""
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


class ProtectedInputs:
    """The inputs of one run, and the checks that keep every output away from them."""

    def __init__(self, roots: Iterable[str] = (), files: Iterable[str | None] = ()):
        named_roots = [r for r in roots if r]
        named_files = [os.fspath(f) for f in files if f]
        # Inputs on object storage are compared as URLs (no links or inodes there).
        self.url_roots = sorted({r.rstrip("/") for r in named_roots if is_url(r)})
        self.url_files = sorted({f for f in named_files if is_url(f)})
        self.roots = sorted({_real(r) for r in named_roots if not is_url(r)})
        self.files = sorted({_real(f) for f in named_files if not is_url(f) and os.path.exists(f)})
        self._file_ids = {i for i in (file_identity(f) for f in self.files) if i is not None}
        self._checked_parents: set[str] = set()

    @classmethod
    def for_items(cls, items, files: Iterable[str | None] = ()) -> ProtectedInputs:
        """Inputs of a run over ``items`` (their roots and the shards, tables or objects behind
        them) plus the named ``files``."""
        if hasattr(items, "locations"):  # an ItemStream: its shards are named, their samples not yet listed
            listed, roots, shards = items.head, items.roots, items.locations
        else:
            listed, roots, shards = items, {item.root for item in items}, []
        behind = {
            loc for item in listed if (loc := getattr(item.ref, "location", None) or getattr(item.ref, "url", None))
        }
        return cls(roots, [*files, *behind, *shards])

    def add(self, roots: Iterable[str] = (), files: Iterable[str | None] = ()) -> ProtectedInputs:
        """A copy that also protects ``roots`` and ``files`` (a reference folder, a second input)."""
        return ProtectedInputs(
            list(self.roots) + self.url_roots + list(roots), list(self.files) + self.url_files + list(files)
        )

    # -- before anything is written -------------------------------------------------------

    def check_file(self, path: str | os.PathLike | None, what: str) -> None:
        """Refuse an output file that is, or would replace, an input."""
        if path is None:
            return
        path = os.fspath(path)
        if is_url(path):
            return self._check_url(path, what, folder=False)
        real = _real(path)
        if real in self.files or (file_identity(path) in self._file_ids if os.path.exists(path) else False):
            raise OutputOverlapsInput(f"{what} {path} is an input file; visbatch never writes over its inputs")
        for root in self.roots:
            if real == root:
                raise OutputOverlapsInput(f"{what} {path} is the input folder {root}")
            if _inside(real, root) and os.path.lexists(path) and _is_input_like(real):
                raise OutputOverlapsInput(
                    f"{what} {path} would replace {real}, a file in the input folder {root}; choose another path"
                )

    def check_folder(self, path: str | os.PathLike | None, what: str) -> None:
        """Refuse an output folder that is an input root, lies inside one, or contains one."""
        if path is None:
            return
        path = os.fspath(path)
        if is_url(path):
            return self._check_url(path, what, folder=True)
        real = _real(path)
        if os.path.exists(path) and not os.path.isdir(path):
            raise (
                OutputOverlapsInput(f"{what} {path} exists and is not a folder")
                if real in self.files
                else UsageError(f"{what} {path} exists and is not a folder")
            )
        for root in self.roots:
            if _inside(real, root):
                relation = "is" if real == root else "is inside"
                raise OutputOverlapsInput(
                    f"{what} {path} {relation} the input folder {root}; choose a folder outside the inputs"
                )
            if _inside(root, real):
                raise OutputOverlapsInput(
                    f"{what} {path} contains the input folder {root}; choose a folder outside the inputs"
                )
        for file in self.files:
            if _inside(file, real) and os.path.dirname(file) == real:
                raise OutputOverlapsInput(
                    f"{what} {path} holds the input file {file}; choose a folder outside the inputs"
                )

    def _check_url(self, url: str, what: str, folder: bool) -> None:
        url = url.rstrip("/")
        if url in self.url_files:
            raise OutputOverlapsInput(f"{what} {url} is an input; visbatch never writes over its inputs")
        for root in self.url_roots:
            inside = url == root or url.startswith(root + "/")
            if folder and (inside or root.startswith(url + "/")):
                raise OutputOverlapsInput(
                    f"{what} {url} overlaps the input prefix {root}; choose a prefix outside the inputs"
                )
            if not folder and (url == root or (inside and _is_input_like(url))):
                raise OutputOverlapsInput(f"{what} {url} would replace an input under {root}; choose another path")

    # -- while writing --------------------------------------------------------------------

    def check_write(self, destination: str | os.PathLike) -> None:
        """Refuse to write ``destination`` if its folder resolves into an input root (a symbolic
        link in an output folder that leads back into the inputs). visbatch replaces a
        destination by a rename, never writing through it, so an existing link or hard link at
        the destination itself is replaced, and the file it points at is left as it is."""
        destination = os.fspath(destination)
        parent = _real(os.path.dirname(os.path.abspath(destination)))
        if parent in self._checked_parents:
            return
        for root in self.roots:
            if _inside(parent, root):
                raise OutputOverlapsInput(f"{destination} resolves into the input folder {root}; not written")
        self._checked_parents.add(parent)


def _is_input_like(path: str) -> bool:
    ext = Path(path).suffix.lower()
    from visbatch.core.images import IMAGE_EXTENSIONS

    return ext in IMAGE_EXTENSIONS or ext in _SIDECAR_EXTENSIONS or (not is_url(path) and os.path.isdir(path))
