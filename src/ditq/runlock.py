"""One process per run folder: a lock file that a second process reads and names its holder from.

``RunLock(folder, what)`` holds ``folder/.ditq.lock`` with an exclusive
``fcntl.flock`` for as long as the run lasts, and writes into it who holds it
(pid, host, start time, command). A second process on the same folder gets one
:class:`~ditq.errors.RunLockedError` line naming that holder and exits 2. The
kernel drops a flock when its process dies, however it dies (SIGKILL, OOM), so
a lock left by a dead process is never in the way: the next run takes it and
says whose it was. On file systems without working ``flock`` (some network
mounts) the lock falls back to the recorded pid, checked on this host.

:meth:`RunLock.for_file` locks one file instead of a folder (``.NAME.lock`` beside it): a search
state is one file, and two searches may keep theirs in one folder as long as they do not share one.

Why a lock file and not just the atomic writes: two processes training the
same run would each write valid checkpoints and interleave the log, so every
file stays well-formed while the run is wrong.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import sys
import time
from pathlib import Path

from ditq.errors import OutputError, RunLockedError

try:
    import fcntl
except ImportError:  # Windows: no flock; the pid record still guards the folder
    fcntl = None

LOCK_FILE = ".ditq.lock"
"""Name of the lock file in a locked folder."""


class RunLock:
    """An exclusive lock on ``folder`` for one process (see the module doc); a context manager.

    ``what`` names the folder in messages (``"training run"``, ``"shard folder"``, ``"search
    state"``); ``log`` gets the one-line notice when a dead process's lock is taken over.
    """

    def __init__(self, folder: str | os.PathLike, what: str = "run folder", *, log=None):
        self.folder = Path(folder)
        self.what = what
        self.log = log
        self.path = self.folder / LOCK_FILE
        self.subject = self.folder  # what messages name: the folder, or the file of for_file
        self.previous: dict | None = None  # the record of a dead holder this lock took over
        self._fd: int | None = None
        self._made_folder = False

    @classmethod
    def for_file(cls, path: str | os.PathLike, what: str = "file", *, log=None) -> RunLock:
        """A lock on one file rather than its folder: ``.NAME.lock`` beside ``path``, messages naming
        ``path`` (``RunLock.for_file("search.json", "search state")``)."""
        path = Path(path)
        lock = cls(path.parent, what, log=log)
        lock.path = path.parent / f".{path.name}.lock"
        lock.subject = path
        return lock

    def acquire(self) -> RunLock:
        """Take the lock, or raise :class:`RunLockedError` naming the live process that holds it."""
        self._made_folder = not self.folder.exists()
        for _ in range(10):  # a holder may remove the file between our open and our flock: open again
            fd = self._open()
            try:
                if fcntl is not None and not _flock(fd):
                    raise RunLockedError(self._held_message(_read(fd)))
                record = _read(fd)
                if fcntl is None and record and _alive(record):
                    raise RunLockedError(self._held_message(record))
            except BaseException:
                os.close(fd)
                raise
            if _same_file(fd, self.path):
                break
            os.close(fd)
        else:
            raise RunLockedError(
                f"the {self.what} {self.subject} is being locked and unlocked by other processes"
            )
        if record and record.get("pid") != os.getpid():
            self.previous = record
            if self.log is not None:
                self.log(
                    f"took over the lock of {self.what} {self.subject} from pid {record.get('pid')} on "
                    f"{record.get('host')} (started {record.get('started')}), which is no longer running"
                )
        _write(fd, _record())
        self._fd = fd
        return self

    def release(self) -> None:
        """Drop the lock and remove its file (and the folder, if this lock made it and it is empty)."""
        if self._fd is None:
            return
        try:
            os.unlink(self.path)  # before unlocking: a waiting process then sees the file gone and retries
        except OSError:
            pass
        if fcntl is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None
        if self._made_folder:
            try:
                self.folder.rmdir()  # only if empty: a run that wrote nothing leaves nothing
            except OSError:
                pass

    def _open(self) -> int:
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            return os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            reason = e.strerror or str(e)
            raise OutputError(
                f"cannot lock the {self.what} {self.subject}: {reason}; make {self.folder} writable or use "
                "another folder"
            ) from None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

    def _held_message(self, record: dict | None) -> str:
        if not record:
            return f"the {self.what} {self.subject} is in use by another process; wait for it to finish"
        return (
            f"the {self.what} {self.subject} is in use by pid {record.get('pid')} on {record.get('host')} "
            f"since {record.get('started')} ({record.get('command', '?')}); wait for it to finish or stop it "
            "(a stopped run resumes with the same command)"
        )


def _same_file(fd: int, path: Path) -> bool:
    try:
        a, b = os.fstat(fd), os.stat(path)
    except OSError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def _flock(fd: int) -> bool:
    """Try the exclusive flock; False if another process holds it. File systems without flock count as
    unlocked (the pid record decides then)."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError as e:
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            return False
        return True  # ENOLCK, EINVAL...: no flock here


def _record() -> dict:
    return {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        "command": _command(),
    }


def _command() -> str:
    argv = list(sys.argv)
    if argv and Path(argv[0]).name in ("ditq", "__main__.py", "main.py"):
        argv[0] = "ditq"
    return " ".join(argv)


def _read(fd: int) -> dict | None:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        data = os.read(fd, 65536)
        return json.loads(data) if data.strip() else None
    except (OSError, ValueError):
        return None


def _write(fd: int, record: dict) -> None:
    os.ftruncate(fd, 0)
    os.lseek(fd, 0, os.SEEK_SET)
    os.write(fd, json.dumps(record).encode())


def _alive(record: dict) -> bool:
    """Whether the recorded holder still runs (checked on this host only; elsewhere assumed alive)."""
    if record.get("host") != socket.gethostname():
        return True
    try:
        os.kill(int(record["pid"]), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, KeyError, ValueError, TypeError):
        return True
    return True
