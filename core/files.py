"""Writing files safely: one atomic-write helper, the output lock, UTC timestamps.

Every file visbatch writes goes through :func:`atomic_path` (or
:func:`atomic_write_bytes`, :func:`atomic_copy` and :func:`atomic_link`, built on
it): the run plan admits the destination first (:func:`visbatch.core.plan.admit`:
a path the run declared, its folders resolved), then the data goes to a temp
file in the destination folder, created with ``O_CREAT | O_EXCL | O_NOFOLLOW``
and mode ``0o666`` so that the umask decides the permissions (as for any file a
shell command creates), and is renamed into place only when complete: an
existing destination (a file, a symbolic or hard link) is replaced, never
written through. On any failure (ENOSPC, a signal, a bug) the temp file is
removed and the destination is untouched. A reader never sees a half-written
file.

:class:`OutputLock` keeps two runs from writing the same output: a POSIX
record lock on ``OUTPUT.lock`` holding the owner's pid and host. The kernel
drops the lock when its process dies (SIGKILL and OOM included), so a stale
lock file never blocks a later run; the lock file is never opened through a
link, and a file there that is not a visbatch lock is refused.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import socket
import stat
import time
from collections.abc import Iterator
from pathlib import Path

from visbatch.core.errors import FatalError, UsageError
from visbatch.core.plan import admit, lock_path_for

# A new file: never an existing one, never through a symbolic link.
CREATE_NEW = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)


def utc_now() -> str:
    """The current time as ISO 8601 UTC (``2026-12-01T10:00:00Z``), the one timestamp form."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _temp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.{time.monotonic_ns()}.tmp")


def remove_quietly(path: str | os.PathLike) -> None:
    try:
        os.remove(path)
    except OSError:
        pass


def describe_os_error(exc: OSError, path: str | os.PathLike | None = None) -> str:
    """``cannot write PATH: No space left on device`` style text for an OSError."""
    where = path if path is not None else exc.filename
    reason = exc.strerror or str(exc) or type(exc).__name__
    return f"{where}: {reason}" if where else reason


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, within: str | os.PathLike | None = None) -> Iterator[str]:
    """Yield a temp path beside ``path``; on normal exit it is renamed to ``path``.

    The run plan admits ``path`` first (``within``: the planned folder it belongs to).
    The temp file exists (empty, umask-governed mode) when the block starts,
    so writers that open it by name keep that mode. Any exception removes it
    and propagates; OSErrors become :class:`FatalError` naming ``path``.
    """
    admit(path, within)
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = _temp_name(path)
        fd = os.open(tmp, CREATE_NEW, 0o666)
        os.close(fd)
    except OSError as exc:
        raise FatalError(f"cannot write {describe_os_error(exc, path)}") from exc
    try:
        yield str(tmp)
        # Some writers (safetensors) replace the temp file with one of their own, mode 0600:
        # the file that lands has the mode the umask gives, whoever created it.
        os.chmod(tmp, 0o666 & ~current_umask())
        os.replace(tmp, path)
    except OSError as exc:
        remove_quietly(tmp)
        raise FatalError(f"cannot write {describe_os_error(exc, path)}") from exc
    except BaseException as exc:
        remove_quietly(tmp)
        if _is_io_failure(exc):
            raise FatalError(
                f"cannot write {path}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
            ) from exc
        raise


def current_umask() -> int:
    """The process's umask, read without changing it (os.umask would, for an instant, for
    every thread writing files at the same time)."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _is_io_failure(exc: BaseException) -> bool:
    # pyarrow raises its own OSError subclasses, but safetensors and some pyarrow paths raise
    # plain exceptions whose text names the errno.
    text = str(exc).lower()
    return any(
        word in text
        for word in (
            "no space left",
            "disk quota",
            "read-only file system",
            "error writing bytes",
            "input/output error",
        )
    )


def atomic_write_bytes(path: str | os.PathLike, data: bytes, within: str | os.PathLike | None = None) -> None:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_path`)."""
    with atomic_path(path, within) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)


def atomic_copy(
    source: str | os.PathLike, destination: str | os.PathLike, within: str | os.PathLike | None = None
) -> None:
    """Copy a file's bytes (and its modification time) atomically; never writes through a symlink."""
    import shutil

    with atomic_path(destination, within) as tmp:
        with open(source, "rb") as src, open(tmp, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
        st = os.stat(source)
        os.utime(tmp, ns=(st.st_atime_ns, st.st_mtime_ns))


def atomic_link(
    source: str | os.PathLike, destination: str | os.PathLike, kind: str, within: str | os.PathLike | None = None
) -> None:
    """Make ``destination`` a symbolic (``kind="symlink"``) or hard link to ``source``: made under a
    temp name and renamed into place, so an existing destination is replaced, never written through."""
    admit(destination, within)
    destination = Path(destination)
    temp = _temp_name(destination)
    try:
        destination.parent.mkdir(parents=True, exist_ok=True)
        if kind == "symlink":
            os.symlink(os.path.abspath(source), temp)
        else:
            os.link(source, temp)
        os.replace(temp, destination)
    except OSError as exc:
        remove_quietly(temp)
        raise FatalError(f"cannot {kind} {describe_os_error(exc, destination)}") from exc


def remove_owned_folder(folder: str | os.PathLike) -> bool:
    """Remove ``folder`` if it is empty (never its contents: a caller removes the files it made
    first). Returns whether it is gone."""
    try:
        os.rmdir(folder)
        return True
    except FileNotFoundError:
        return True
    except OSError:
        return False


def files_identical(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Same bytes (a cheap size check first)."""
    try:
        if os.path.getsize(a) != os.path.getsize(b):
            return False
        with open(a, "rb") as fa, open(b, "rb") as fb:
            while True:
                block_a, block_b = fa.read(1 << 20), fb.read(1 << 20)
                if block_a != block_b:
                    return False
                if not block_a:
                    return True
    except OSError:
        return False


_HELD: dict[str, int] = {}  # lock path -> how many OutputLocks of this process hold it


class OutputLock:
    """An exclusive lock on one output (``OUTPUT.lock``), held for the whole run.

    A second run on the same output gets :class:`UsageError` naming the
    owner (``in use by pid N on HOST``). Within one process the lock is
    re-entrant (a job that locks its output for its whole length can hand it
    to the writer that locks it again). The lock file is removed on release.
    The lock is a POSIX record lock, which a process drops when it closes any
    descriptor of the file: only this class opens lock files, once per process.
    """

    def __init__(self, output: str | os.PathLike):
        self.path = lock_path_for(output)
        self._key = os.path.realpath(self.path)
        self._fd: int | None = None
        self._nested = False

    def acquire(self) -> OutputLock:
        import fcntl

        if _HELD.get(self._key):
            _HELD[self._key] += 1
            self._nested = True
            return self
        for _ in range(10):
            admit(self.path)
            fd = self._open()
            try:
                # A POSIX record lock, not flock(): it belongs to this process alone, so decode
                # workers forked from it do not inherit it and a SIGKILLed run's lock dies with it
                # (an flock stays held by orphaned workers until they notice and exit).
                fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                owner = _read_owner(fd)
                os.close(fd)
                if exc.errno in (errno.EAGAIN, errno.EACCES):
                    raise UsageError(
                        f"output {self.path.name[: -len('.lock')]} is in use by {owner} "
                        f"(lock file {self.path}); wait for it or choose another -o"
                    )
                raise FatalError(f"cannot lock {describe_os_error(exc, self.path)}") from exc
            # The file may have been removed (and recreated) by its previous owner between our
            # open and our flock: only a lock on the file the path names now counts.
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except OSError:
                same = False
            if not same:
                os.close(fd)
                continue
            os.ftruncate(fd, 0)
            os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": utc_now()}).encode())
            self._fd = fd
            _HELD[self._key] = 1
            return self
        raise FatalError(f"cannot lock {self.path}: it keeps being replaced")

    def _open(self) -> int:
        """The lock file's descriptor: created new (``O_EXCL``), or an existing stale visbatch lock,
        opened without following a link; anything else at that name is refused."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            return os.open(self.path, CREATE_NEW & ~os.O_WRONLY | os.O_RDWR, 0o666)
        except FileExistsError:
            pass
        except OSError as exc:
            raise FatalError(f"cannot create {describe_os_error(exc, self.path)}") from exc
        try:
            fd = os.open(self.path, os.O_RDWR | getattr(os, "O_NOFOLLOW", 0))
        except FileNotFoundError:  # its owner removed it just now: try again
            return self._open()
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise UsageError(f"lock file {self.path} is a symbolic link; visbatch never writes through one")
            raise FatalError(f"cannot open {describe_os_error(exc, self.path)}") from exc
        st = os.fstat(fd)
        problem = None
        if not stat.S_ISREG(st.st_mode):
            problem = "is not a regular file"
        elif st.st_nlink != 1:
            problem = "has other hard links"
        elif not _is_lock_content(fd):
            problem = "is not a visbatch lock file"
        if problem:
            os.close(fd)
            raise UsageError(
                f"lock file {self.path} {problem}; visbatch never writes over it: remove it or choose another -o"
            )
        return fd

    def release(self) -> None:
        if self._nested:
            _HELD[self._key] -= 1
            self._nested = False
            return
        if self._fd is None:
            return
        _HELD.pop(self._key, None)
        remove_quietly(self.path)
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> OutputLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _is_lock_content(fd: int) -> bool:
    """Empty (a run killed between creating and writing it) or the JSON a lock holds."""
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        data = os.read(fd, 4097)
    except OSError:
        return False
    if not data:
        return True
    if len(data) > 4096:
        return False
    try:
        value = json.loads(data)
    except ValueError:
        return False
    return isinstance(value, dict) and "pid" in value


def _read_owner(fd: int) -> str:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        data = json.loads(os.read(fd, 4096) or b"{}")
        return f"pid {data.get('pid')} on {data.get('host')} since {data.get('since')}"
    except (OSError, ValueError):
        return "another run"
