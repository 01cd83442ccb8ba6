"""The workdir a run writes into: its paths checked before anything is built, and one writer.

It imports nothing heavy (no JAX), so that launch/train.py can refuse a bad workdir within a
second. Every failure is a `WorkdirError`: one line naming the path and the cause.

One writer: a run holds an advisory lock (`fcntl.flock`) on `<workdir>/.lock` from before it
writes anything until it ends; a second run on the same workdir is refused, naming the
process that holds the lock. The kernel drops the lock when its process dies, however it dies,
so a killed run never blocks the next one.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import pathlib

LOCK_NAME = ".lock"

# What a run writes inside its workdir, and of which kind: one of them existing as the other
# kind (a file named `checkpoints`), or not writable, stops the run before it builds anything.
FOLDERS = ("checkpoints", "checkpoints_set_aside", "predictions")
FILES = (
    LOCK_NAME,
    "metrics.jsonl",
    "config.json",
    "partition.json",
    "eval_details.json",
    "learning_curves.png",
    "weights_report.txt",
)


class WorkdirError(Exception):
    """A workdir the run cannot use (one line naming the path and the cause)."""


def _unwritable(path: pathlib.Path) -> str | None:
    """Why this process cannot write in `path` (a folder or file that exists), or None."""
    if os.access(path, os.W_OK | (os.X_OK if path.is_dir() else 0)):
        return None
    try:
        read_only = bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except OSError:
        read_only = False
    if read_only:
        return "is on a read-only file system"
    return f"is not writable by this user (uid {os.getuid()})"


def check_workdir(workdir: str | os.PathLike) -> None:
    """Raises WorkdirError when `workdir` cannot hold a run; writes nothing."""
    path = pathlib.Path(workdir)
    if str(workdir).strip() == "":
        raise WorkdirError("--workdir is empty; give a folder for the run")
    if path.exists() and not path.is_dir():
        raise WorkdirError(f"workdir {path} is a file, not a folder")
    existing = path
    while not existing.exists() and existing != existing.parent:
        if existing.is_symlink():  # a dangling link: mkdir would fail on it
            raise WorkdirError(f"workdir {path}: {existing} is a broken symbolic link")
        existing = existing.parent
    if not existing.is_dir():
        raise WorkdirError(f"workdir {path} lies under {existing}, which is a file")
    why = _unwritable(existing)
    if why and existing == path:
        raise WorkdirError(f"workdir {path} {why}")
    if why:
        raise WorkdirError(f"workdir {path} cannot be made: {existing} {why}")
    if existing != path:
        return
    for name in FOLDERS + FILES:
        inner = path / name
        if not inner.exists():
            continue
        if name in FOLDERS and not inner.is_dir():
            raise WorkdirError(
                f"workdir {path}: {inner} is a file, but the run needs a folder there"
            )
        if name in FILES and inner.is_dir():
            raise WorkdirError(
                f"workdir {path}: {inner} is a folder, but the run writes a file there"
            )
        why = _unwritable(inner)
        if why:
            raise WorkdirError(f"workdir {path}: {inner} {why}")


def _holder(lock_path: pathlib.Path) -> int | None:
    """The PID holding a flock on `lock_path`, from /proc/locks (Linux), else None."""
    try:
        stat = lock_path.stat()
        lines = pathlib.Path("/proc/locks").read_text().splitlines()
    except OSError:
        return None
    wanted = (os.major(stat.st_dev), os.minor(stat.st_dev), stat.st_ino)
    for line in lines:
        fields = line.split()
        if "->" in fields or len(fields) < 6 or fields[1] != "FLOCK":
            continue
        try:
            major, minor, inode = fields[5].split(":")
            if (int(major, 16), int(minor, 16), int(inode)) == wanted:
                return int(fields[4])
        except ValueError:
            continue
    return None


class WorkdirLock:
    """The advisory lock that makes a run the workdir's one writer.

    `acquire()` creates the workdir when it does not exist yet; it may be called again (it then
    does nothing). `release()` (or the end of the process) lets the next run in;
    `release(discard=True)` also removes a workdir that `acquire()` made and nothing else was
    written into (a run that failed on its input leaves no trace).
    """

    def __init__(self, workdir: str | os.PathLike):
        self.workdir = pathlib.Path(workdir)
        self._fd: int | None = None
        self._made: list[pathlib.Path] = []  # the folders acquire() created, innermost first

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> None:
        if self._fd is not None:
            return
        lock_path = self.workdir / LOCK_NAME
        while True:
            fd, made = self._open(lock_path)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as error:
                os.close(fd)
                if error.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise WorkdirError(
                        f"workdir {self.workdir}: cannot lock {lock_path}: {_cause(error)}"
                    ) from None
                pid = _holder(lock_path)
                who = f"process {pid}" if pid else "another process"
                raise WorkdirError(
                    f"workdir {self.workdir} is in use by another run ({who} holds "
                    f"{lock_path}); wait for it to end or stop it, or use another workdir"
                ) from None
            if _same_file(fd, lock_path):
                break
            os.close(fd)  # a run that gave up on a workdir it made removed this lock file
        self._fd, self._made = fd, made

    def _open(self, lock_path: pathlib.Path) -> tuple[int, list[pathlib.Path]]:
        """The lock file's descriptor, and the folders made for it (innermost first)."""
        missing, folder = [], self.workdir
        while not folder.exists() and folder != folder.parent:
            missing.append(folder)
            folder = folder.parent
        made = []
        try:
            for folder in reversed(missing):
                try:
                    folder.mkdir()
                    made.insert(0, folder)
                except FileExistsError:  # another run made it meanwhile
                    pass
            return os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644), made
        except OSError as error:
            raise WorkdirError(
                f"workdir {self.workdir}: cannot write {lock_path}: {_cause(error)}"
            ) from None

    def release(self, *, discard: bool = False) -> None:
        if self._fd is None:
            return
        if discard and self._made:
            with contextlib.suppress(OSError):
                if [p.name for p in self.workdir.iterdir()] == [LOCK_NAME]:
                    (self.workdir / LOCK_NAME).unlink()
                    for folder in self._made:
                        folder.rmdir()
        os.close(self._fd)  # closing the descriptor drops the flock
        self._fd = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()


def _same_file(fd: int, path: pathlib.Path) -> bool:
    try:
        on_disk, held = os.stat(path), os.fstat(fd)
    except OSError:
        return False
    return (on_disk.st_dev, on_disk.st_ino) == (held.st_dev, held.st_ino)


def _cause(error: OSError) -> str:
    return error.strerror or str(error)
