"""The run plan: every path a run may write, checked against every path it reads, before anything.

A user's data is sacred: no input file is ever modified, moved, replaced or deleted,
whatever the options. That is not a list of cases here but a property of how runs write:

1. **One plan.** Before anything is created, a run declares in a :class:`RunPlan` every
   path it may create, replace or delete (the output, its parts folder and lock, staging
   folders of URL outputs, overlay and map folders, caches, features files, reports,
   copies, links, shards) and, in its :class:`InputSet`, every path it reads (input
   folders, named files, every file a manifest, table or shard list names, caption tables,
   references, caches read, model files).
2. **One canonical form.** Both sides go through :func:`canonical`: ``file://`` URLs become
   paths; ``s3a://`` and ``s3n://`` are ``s3://``, ``gcs://`` is ``gs://``; the bucket is
   lower-cased and the key normalised (``//``, ``.``, ``..``, a trailing ``/``); local paths
   are made absolute and resolved through every symbolic link that exists (for a path that
   does not exist yet, its existing folders are resolved).
3. **One check** (:meth:`RunPlan.check`): no planned path equals, contains or lies inside an
   input, by path and, for existing local files and folders, by device and inode (hard
   links and bind mounts count); no two planned paths collide (a report over the results,
   overlays inside the parts folder). Every subcommand goes through it.
4. **Writes admitted one by one.** While a plan is active (:meth:`RunPlan.activated`), every
   file visbatch writes goes through :func:`visbatch.core.files.atomic_path`, which asks
   :func:`admit` first: the destination, with its folders resolved, must be a planned file
   or lie inside a planned folder (a symbolic link inside an output folder that leads
   elsewhere is refused), and it is replaced by a rename, never written through.
   Files are created with ``O_CREAT | O_EXCL | O_NOFOLLOW``.
5. **Only what the run created is deleted** (the writers keep their own record: the parts
   a results writer wrote or adopted, the lock it created, a staging folder it marked).

A violation is :class:`OutputOverlapsInput` (exit 2), naming both paths.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import posixpath
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from visbatch.core.errors import UsageError

_URL_PREFIX_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789+.-")
# Protocols that name the same store: Hadoop's s3a/s3n connectors and gcsfs's two spellings.
PROTOCOL_ALIASES = {"s3a": "s3", "s3n": "s3", "gcs": "gs"}
SIDECAR_SUFFIXES = (".txt", ".json")


class OutputOverlapsInput(UsageError):
    """A planned write aimed at an input, or at another planned write (exit 2)."""


class WriteRefused(UsageError):
    """A write the plan does not admit (a link inside an output folder that leads out of it)."""


def _is_url(text: str) -> bool:
    head, sep, _ = text.partition("://")
    return bool(sep) and bool(head) and head[0].isalpha() and set(head) <= _URL_PREFIX_CHARS


@dataclass(frozen=True)
class Place:
    """A location in canonical form: a resolved absolute local path, or a normalised URL."""

    text: str
    local: bool

    def ancestors(self) -> Iterator[str]:
        """The canonical texts of the folders (or prefixes) holding this place, nearest first."""
        text = self.text
        if self.local:
            while True:
                parent = os.path.dirname(text)
                if parent == text:
                    return
                yield parent
                text = parent
        head, _, key = text.partition("://")
        parts = key.split("/")
        for n in range(len(parts) - 1, 0, -1):
            yield f"{head}://{'/'.join(parts[:n])}"

    def inside(self, other: Place) -> bool:
        """This place lies strictly inside ``other``."""
        if self.local != other.local:
            return False
        base = other.text if other.text.endswith("/") else other.text + "/"
        return self.text.startswith(base) and self.text != other.text


def local_path_of(location: str | os.PathLike) -> str | None:
    """The local path a location names, None for a URL of another scheme. ``file:///abs``,
    ``file://localhost/abs`` and ``file:/abs`` (one slash, as ``Path`` prints a file URL) are the
    path ``/abs``."""
    text = os.fspath(location)
    if text[:5].lower() == "file:":
        rest = text[5:]
        if rest.startswith("//"):
            rest = rest[2:]
            if rest.startswith("localhost/"):
                rest = rest[len("localhost") :]
        return rest
    if _is_url(text):
        return None
    return text


def as_local(location: str | None) -> str | None:
    """``location`` with a file URL written as its path (other URLs and paths unchanged)."""
    if location is None:
        return None
    local = local_path_of(location)
    return local if local is not None else os.fspath(location)


def canonical(location: str | os.PathLike, resolve_last: bool = True) -> Place:
    """The one canonical form of a location (module doc). ``resolve_last=False`` keeps a
    final symbolic link as it is (the name a rename would replace), resolving its folders."""
    text = os.fspath(location)
    local = local_path_of(text)
    if local is not None:
        absolute = os.path.abspath(local)
        if resolve_last:
            return Place(os.path.realpath(absolute), True)
        parent, name = os.path.split(absolute)
        return Place(os.path.join(os.path.realpath(parent), name) if name else os.path.realpath(absolute), True)
    protocol, _, rest = text.partition("://")
    protocol = protocol.lower()
    protocol = PROTOCOL_ALIASES.get(protocol, protocol)
    host, _, key = rest.partition("/")
    key = posixpath.normpath("/" + key) if key else ""
    key = "" if key == "/" else key.rstrip("/")
    return Place(f"{protocol}://{host.lower()}{key}", False)


def _identity(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except (OSError, ValueError):
        return None
    return (st.st_dev, st.st_ino)


@dataclass(frozen=True)
class Planned:
    """One planned write. ``kind``: ``file`` (replaced whole by a rename), ``folder`` (receives one
    file per input beside whatever else is there: overlays, copies), ``private`` (a folder only
    this run writes: parts, staging; nothing else may be planned inside it). ``place`` is fully
    resolved (what the checks compare); ``name`` keeps a final symbolic link as it is (what a
    rename replaces, and so what a write is admitted by)."""

    place: Place
    name: Place
    shown: str
    what: str
    kind: str

    @property
    def is_folder(self) -> bool:
        return self.kind != "file"


@dataclass(frozen=True)
class _Input:
    place: Place
    shown: str
    folder: bool


class InputSet:
    """Every path a run reads: folders (everything under them is an input) and files.

    Items are enumerated lazily at check time (a manifest of millions of files is not held
    twice); each source says what an item reads (``SampleRef.inputs``).
    """

    def __init__(self) -> None:
        self._folders: dict[str, _Input] = {}
        self._files: dict[str, _Input] = {}
        self._item_lists: list[Iterable] = []
        self.walked: set[str] = set()  # item roots that are walked input folders (their items need no listing)

    def add_folder(self, location: str | os.PathLike | None) -> None:
        if location:
            place = canonical(location)
            self._folders.setdefault(place.text, _Input(place, os.fspath(location), True))

    def add_file(self, location: str | os.PathLike | None) -> None:
        if location:
            place = canonical(location)
            self._files.setdefault(place.text, _Input(place, os.fspath(location), False))

    def add_path(self, location: str | os.PathLike | None) -> None:
        """A path named by an option (a model, a caption table, a reference folder): a folder
        when it is one, otherwise a file (nothing is added for a spec that names no path)."""
        if not location:
            return
        local = local_path_of(location)
        if local is not None and os.path.isdir(local):
            self.add_folder(location)
        elif local is None or os.path.lexists(local):
            self.add_file(location)

    def add_items(self, items: Iterable) -> None:
        """Items a source listed (:class:`~visbatch.core.sources.ImageItem`), read at check time."""
        self._item_lists.append(items)

    def add_walked_folder(self, location: str) -> None:
        """An input folder (or URL prefix) whose items were listed by walking it."""
        self.walked.add(location)
        self.add_folder(location)

    def merge(self, other: InputSet) -> None:
        self._folders.update(other._folders)
        self._files.update(other._files)
        self._item_lists += other._item_lists
        self.walked |= other.walked

    def named(self) -> Iterator[_Input]:
        """The folders and files named directly (not through items)."""
        yield from self._folders.values()
        yield from self._files.values()

    def item_locations(self) -> Iterator[str]:
        """Every location the listed items read (consecutive repeats, e.g. a shard's samples, once)."""
        last = None
        for items in self._item_lists:
            for item in items:
                if item.root in self.walked:
                    continue
                locations = _item_inputs(item)
                for location in locations:
                    if location != last:
                        last = location
                        yield location


def _item_inputs(item) -> tuple[str, ...]:
    ref = item.ref
    if ref is None:
        return (item.path,)
    inputs = getattr(ref, "inputs", None)
    return tuple(inputs()) if inputs is not None else ()


def _sidecars(text: str) -> Iterator[str]:
    stem = os.path.splitext(text)[0]
    for suffix in SIDECAR_SUFFIXES:
        yield stem + suffix


class _ParentCache:
    """Canonical places of many files, resolving each folder once (a million files in a few
    folders cost a few realpath calls)."""

    def __init__(self) -> None:
        self._folders: dict[str, str] = {}

    def name_place(self, location: str) -> Place:
        """``location`` with its folders resolved and its own name kept (what a rename replaces)."""
        local = local_path_of(location)
        if local is None:
            return canonical(location)
        parent, name = os.path.split(os.path.abspath(local))
        real_parent = self._folders.get(parent)
        if real_parent is None:
            real_parent = self._folders[parent] = os.path.realpath(parent)
        return Place(os.path.join(real_parent, name), True)

    def place(self, location: str) -> Place:
        """``location`` fully resolved (a final symbolic link too: one lstat)."""
        named = self.name_place(location)
        if named.local and os.path.islink(named.text):
            return Place(os.path.realpath(named.text), True)
        return named


_ACTIVE: list[RunPlan] = []  # the plan of the run in progress (a stack: a sub-run uses its parent's)
_ACTIVE_LOCK = threading.Lock()


def lock_path_for(output: str | os.PathLike) -> Path:
    """The lock file beside an output (``OUTPUT.lock``): planned with it, taken by files.OutputLock."""
    output = Path(output)
    return output.with_name(output.name + ".lock")


def staging_root() -> str:
    return os.environ.get("VISBATCH_STAGING") or os.path.join(os.path.expanduser("~"), ".cache", "visbatch", "staging")


def staging_folder(url: str) -> str:
    """The local folder a URL output is written in before its upload (one per URL, so an
    interrupted run resumes from it); sinks.RemoteOutputs makes and fills it."""
    digest = hashlib.blake2b(canonical(url).text.encode(), digest_size=8).hexdigest()
    return os.path.join(staging_root(), digest)


def active_plan() -> RunPlan | None:
    with _ACTIVE_LOCK:
        return _ACTIVE[-1] if _ACTIVE else None


def admit(destination: str | os.PathLike, within: str | os.PathLike | None = None) -> None:
    """Refuse a write the active plan did not declare (no plan active: nothing to check)."""
    plan = active_plan()
    if plan is not None:
        plan.admit(destination, within)


@dataclass
class RunPlan:
    """Every path one run may write (``writes``) and every path it reads (``inputs``); see the
    module doc. Declare, :meth:`check` once, then run inside :meth:`activated`."""

    inputs: InputSet = field(default_factory=InputSet)
    writes: list[Planned] = field(default_factory=list)
    checked: bool = False
    _admitted: _ParentCache = field(default_factory=_ParentCache)
    _within: dict[str, Place] = field(default_factory=dict)

    def writes_only(self) -> RunPlan:
        """This plan's writes without its inputs (checked already): what a remote worker needs
        to admit its writes, without the run's item lists."""
        return RunPlan(InputSet(), list(self.writes), checked=True)

    # -- declarations ---------------------------------------------------------------------

    def write_file(self, path: str | os.PathLike | None, what: str) -> None:
        """A file the run creates or replaces whole (by a rename)."""
        self._declare(path, what, "file")

    def write_folder(self, path: str | os.PathLike | None, what: str) -> None:
        """A folder receiving one file per input (overlays, maps, copies, shards)."""
        self._declare(path, what, "folder")

    def write_private_folder(self, path: str | os.PathLike | None, what: str) -> None:
        """A folder only this run writes (a parts folder, a staging folder)."""
        self._declare(path, what, "private")

    def write_results(self, output: str | os.PathLike, what: str = "output") -> None:
        """A results table: the file, its parts folder and its lock (and, for a URL, the local
        folder it is staged in)."""
        output = os.fspath(output)
        self.write_file(output, what)
        local = local_path_of(output)
        if local is not None:  # a URL output is written in its staging folder (declared with it)
            self.write_private_folder(local + ".parts", f"{what} parts folder")
            self.write_file(lock_path_for(local), f"{what} lock file")

    def write_locked_file(self, path: str | os.PathLike, what: str = "output") -> None:
        """A single-file result held under its lock for the whole job (a detector, a model)."""
        self.write_file(path, what)
        local = local_path_of(os.fspath(path))
        if local is not None:
            self.write_file(lock_path_for(local), f"{what} lock file")

    def _declare(self, path: str | os.PathLike | None, what: str, kind: str) -> None:
        if path is None or path == "":
            return
        shown = os.fspath(path)
        self.writes.append(Planned(canonical(shown), canonical(shown, resolve_last=False), shown, what, kind))
        if local_path_of(shown) is None:
            # A URL output is written locally first (sinks.RemoteOutputs), then uploaded whole.
            staged = staging_folder(shown)
            self.writes.append(
                Planned(canonical(staged), canonical(staged), staged, f"staging folder of {shown}", "private")
            )

    # -- the check ------------------------------------------------------------------------

    def check(self) -> None:
        """Refuse (before anything is created) a planned write that equals, contains or lies
        inside an input, or that collides with another planned write."""
        self._check_writes_apart()
        writes = self.writes
        by_text = {w.place.text: w for w in writes}
        folders = {w.place.text: w for w in writes if w.is_folder}
        ancestors: dict[str, Planned] = {}
        for w in writes:
            for text in w.place.ancestors():
                ancestors.setdefault(text, w)
        for named in self.inputs.named():
            self._check_one(named.place, named.shown, named.folder, by_text, folders, ancestors)
        cache = _ParentCache()
        sidecar_targets = {t: w for t, w in by_text.items() if t.endswith(SIDECAR_SUFFIXES)}
        folder_hits: dict[str, Planned | None] = {}
        for location in self.inputs.item_locations():
            place = cache.place(location)
            hit = by_text.get(place.text) or ancestors.get(place.text)
            if hit is None:
                parent = os.path.dirname(place.text) if place.local else place.text.rsplit("/", 1)[0]
                if parent not in folder_hits:
                    folder_hits[parent] = _first_folder_holding(parent, folders)
                hit = folder_hits[parent]
            if hit is None and sidecar_targets:
                hit = next((sidecar_targets[s] for s in _sidecars(place.text) if s in sidecar_targets), None)
            if hit is not None:
                raise _overlap(hit, location, False, place)
        self._check_identities()
        self.checked = True

    @staticmethod
    def _check_one(place: Place, shown: str, folder: bool, by_text, folders, ancestors) -> None:
        # The same path; a planned write inside this input; this input inside a planned folder.
        hit = by_text.get(place.text) or ancestors.get(place.text) or _first_folder_holding(place.text, folders)
        if hit is not None:
            raise _overlap(hit, shown, folder, place)

    def _check_writes_apart(self) -> None:
        for i, a in enumerate(self.writes):
            for b in self.writes[i + 1 :]:
                if a.place.text == b.place.text:
                    if a.kind == b.kind == "folder":
                        continue  # overlays and maps may share a folder: their names differ
                    raise OutputOverlapsInput(
                        f"{a.what} {a.shown} is the {b.what} ({b.shown}): one would replace the other; "
                        "choose another path"
                    )
                for inner, outer in ((a, b), (b, a)):
                    if outer.kind == "private" and inner.place.inside(outer.place):
                        raise OutputOverlapsInput(
                            f"{inner.what} {inner.shown} lies inside the {outer.what} {outer.shown}, "
                            "which visbatch writes and removes on its own; choose a path outside it"
                        )
                    if outer.kind == "file" and inner.place.inside(outer.place):
                        raise OutputOverlapsInput(f"{inner.what} {inner.shown} lies inside {outer.what} {outer.shown}")

    def _check_identities(self) -> None:
        """Hard links and bind mounts: the same file or folder reached by another path."""
        planned_ids: dict[tuple[int, int], Planned] = {}
        linked_files = []
        for w in self.writes:
            if not w.place.local:
                continue
            identity = _identity(w.place.text)
            if identity is not None:
                planned_ids[identity] = w
                if w.kind == "file":
                    try:
                        if os.stat(w.place.text).st_nlink > 1:
                            linked_files.append(w)
                    except OSError:
                        pass
        if not planned_ids:
            return
        planned_ancestor_ids: dict[tuple[int, int], Planned] = {}
        for w in self.writes:
            if w.place.local:
                for text in _existing_ancestors(w.place.text):
                    identity = _identity(text)
                    if identity is not None:
                        planned_ancestor_ids.setdefault(identity, w)
        for named in self.inputs.named():
            if not named.place.local:
                continue
            identity = _identity(named.place.text)
            if identity is None:
                continue
            hit = planned_ids.get(identity) or (planned_ancestor_ids.get(identity) if named.folder else None)
            if hit is None:
                # The input lies inside a planned folder reached through another path (a bind mount).
                hit = next(
                    (
                        planned_ids[i]
                        for text in _existing_ancestors(named.place.text)
                        if (i := _identity(text)) in planned_ids and planned_ids[i].is_folder
                    ),
                    None,
                )
            if hit is not None:
                raise _overlap(hit, named.shown, named.folder, named.place)
        if not linked_files:
            return
        # A planned file with other hard links: is one of them an input? Only then are the
        # inputs' identities needed (a stat each; every file of the input folders).
        wanted = {_identity(w.place.text): w for w in linked_files}
        for location in self._every_input_file():
            hit = wanted.get(_identity(location))
            if hit is not None:
                raise OutputOverlapsInput(
                    f"{hit.what} {hit.shown} is a hard link of the input {location}; "
                    "visbatch never writes over its inputs"
                )

    def _every_input_file(self) -> Iterator[str]:
        for named in self.inputs.named():
            if not named.place.local:
                continue
            if named.folder:
                for directory, _, names in os.walk(named.place.text):
                    for name in names:
                        yield os.path.join(directory, name)
            else:
                yield named.place.text
        for location in self.inputs.item_locations():
            if local_path_of(location) is not None:
                yield local_path_of(location) or location

    # -- while the run writes -------------------------------------------------------------

    @contextlib.contextmanager
    def activated(self) -> Iterator[RunPlan]:
        """Admit only planned writes while the block runs (checking the plan first if not yet)."""
        if not self.checked:
            self.check()
        with _ACTIVE_LOCK:
            already = bool(_ACTIVE) and _ACTIVE[-1] is self
            if not already:
                _ACTIVE.append(self)
        try:
            yield self
        finally:
            if not already:
                with _ACTIVE_LOCK:
                    if self in _ACTIVE:
                        _ACTIVE.remove(self)

    @property
    def active(self) -> bool:
        return active_plan() is self

    def admit(self, destination: str | os.PathLike, within: str | os.PathLike | None = None) -> None:
        """Refuse a write to ``destination`` unless, its folders resolved, it is a planned file or
        lies inside a planned folder. ``within``: the planned folder the write belongs to (an
        overlay); it must land inside that folder and on no other planned path (the output, a
        parts folder)."""
        shown = os.fspath(destination)
        place = self._admitted.name_place(shown)
        if within is not None:
            key = os.fspath(within)
            folder = self._within.get(key)
            if folder is None:
                folder = self._within[key] = canonical(key)
            if not place.inside(folder):
                raise WriteRefused(
                    f"{shown} resolves to {place.text}, outside {os.fspath(within)}{self._into_input(place)}; "
                    "not written"
                )
            clash = next(
                (
                    w
                    for w in self.writes
                    if (w.kind == "file" and place.text in (w.name.text, w.place.text))
                    # a private folder (a parts folder) that does not hold ``within`` itself (a
                    # URL output's staging folder holds its own staged overlays)
                    or (
                        w.kind == "private"
                        and (place.inside(w.place) or place == w.place)
                        and not (folder == w.place or folder.inside(w.place))
                    )
                ),
                None,
            )
            if clash is not None:
                raise WriteRefused(f"{shown} would land on the {clash.what} {clash.shown}; not written")
            if any(w.is_folder and (folder == w.place or folder.inside(w.place)) for w in self.writes):
                return
            raise WriteRefused(f"{os.fspath(within)} is not a folder this run planned to write; {shown} not written")
        if any(place.text in (w.name.text, w.place.text) for w in self.writes):
            return
        if any(w.is_folder and place.inside(w.place) for w in self.writes):
            return
        raise WriteRefused(
            f"{shown} resolves to {place.text}, outside every path this run planned to write{self._into_input(place)}; "
            "not written"
        )

    def _into_input(self, place: Place) -> str:
        """``, inside the input folder X`` when a refused write would have landed in an input."""
        for named in self.inputs.named():
            if place == named.place or place.inside(named.place):
                return f", inside the {'input folder' if named.folder else 'input'} {named.shown}"
        return ""


def _first_folder_holding(text: str, folders: dict[str, Planned]) -> Planned | None:
    """The planned folder that ``text`` (a canonical path or URL) is or lies inside, if any."""
    if text in folders:
        return folders[text]
    place = Place(text, not _is_url(text))
    for ancestor in place.ancestors():
        if ancestor in folders:
            return folders[ancestor]
    return None


def _existing_ancestors(path: str) -> Iterator[str]:
    current = path
    while True:
        parent = os.path.dirname(current)
        if parent == current:
            return
        if os.path.exists(parent):
            yield parent
        current = parent


def _overlap(
    write: Planned, input_shown: str, input_is_folder: bool, input_place: Place | None = None
) -> OutputOverlapsInput:
    """The one-line refusal, naming how the planned path meets the input."""
    kind = "input folder" if input_is_folder else "input file"
    if input_place is None or write.place.text == input_place.text:
        relation = f"is the {kind} {input_shown}"
    elif write.place.inside(input_place):
        relation = f"is an input: it lies inside the {kind} {input_shown}"
    elif input_place.inside(write.place):
        relation = f"holds the {kind} {input_shown}"
    else:  # the same file or folder reached by another path (a hard link, a bind mount)
        relation = f"is the {kind} {input_shown} under another name"
    return OutputOverlapsInput(f"{write.what} {write.shown} {relation}; visbatch never writes over its inputs")


def plan_for(writes: Callable[[RunPlan], None], inputs: InputSet | None = None) -> RunPlan:
    """A plan with ``inputs`` and the writes ``writes(plan)`` declares, checked."""
    plan = RunPlan(inputs or InputSet())
    writes(plan)
    plan.check()
    return plan
