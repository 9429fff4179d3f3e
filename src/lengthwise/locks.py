"""Advisory locks on the files and folders a command writes: one writer at a time, the others wait or stop.

A lock on `PATH` (a results file, or an output folder) is the file `PATH.lock` beside it, locked with
`fcntl.flock` and holding one JSON line that names its holder (pid, host, command, start time). The kernel drops a
flock when its process ends, SIGKILL included, so a killed run never leaves a lock that blocks the next one: its
`.lock` file stays on disk, unlocked, and the next run takes it over. A run that ends normally removes the file (while it still holds
the lock; a waiter that then gets the lock on the removed file sees the file gone and locks the path again).

Within one process, locks are shared and counted: a command that locks its results file before loading the model
and then opens a `ResultsFile` on it takes the lock once. Locks are released when the last holder lets go, or at
exit.

Why not the `filelock` package (installed with transformers): whether it removes its lock file on release differs
between its releases (3.x keeps it, 4.x removes it), and lengthwise does not pin it; a lock file left beside every
results file would also break the kill-and-resume guarantee (a rerun leaves the files an uninterrupted run leaves).
"""

from __future__ import annotations

import atexit
import datetime as _dt
import fcntl
import itertools
import json
import os
import socket
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path


class OutputLocked(BlockingIOError):
    """The output is being written by another live run (raised with `wait=False`)."""


_HELD: dict = {}  # lock path -> _Held
_GUARD = threading.Lock()


def lock_path(target: str | Path) -> Path:
    """Where the lock of `target` (a file, or a folder) lives: `target` + ".lock", beside it."""
    target = Path(target)
    return target.with_name(target.name + ".lock")


def holder_info(path: str | Path) -> dict:
    """What a lock file says about its holder ({} when it says nothing yet)."""
    try:
        info = json.loads(Path(path).read_text(encoding="utf-8") or "{}")
    except (OSError, ValueError):
        return {}
    return info if isinstance(info, dict) else {}


def describe_holder(info: dict) -> str:
    if not info:
        return "a run that is starting"
    command = info.get("command", "")
    command = command if len(command) <= 100 else command[:97] + "..."
    return (f"pid {info.get('pid', '?')} on host {info.get('host', '?')}, started {info.get('started', '?')}"
            + (f": {command}" if command else ""))


def _my_info() -> bytes:
    info = {"pid": os.getpid(), "host": socket.gethostname(),
            "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]) if sys.argv and sys.argv[0] else "",
            "started": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
    return (json.dumps(info, sort_keys=True) + "\n").encode()


def _same_file(fd: int, path: Path) -> bool:
    try:
        now = os.stat(path)
    except FileNotFoundError:
        return False
    mine = os.fstat(fd)
    return (now.st_dev, now.st_ino) == (mine.st_dev, mine.st_ino)


def _acquire(path: Path, target: Path, wait: bool, log) -> int:
    waited = False
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                who = describe_holder(holder_info(path))
                if not wait:
                    raise OutputLocked(
                        f"{target} is being written by another run ({who}); --no-wait given, so this run stops "
                        "(without --no-wait it waits, then skips what that run finished)") from None
                if not waited and log is not None:
                    log(f"waiting for another run writing {target} ({who}); this run then skips what it finished "
                        "(--no-wait stops instead)")
                waited = True
                fcntl.flock(fd, fcntl.LOCK_EX)
            if not _same_file(fd, path):  # the previous holder removed the file before this process got its lock
                os.close(fd)
                continue
            os.ftruncate(fd, 0)
            os.pwrite(fd, _my_info(), 0)
            return fd
        except BaseException:
            try:
                os.close(fd)
            except OSError:
                pass
            raise


def _stderr(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


@dataclass
class _Held:
    fd: int
    pid: int
    tokens: set = field(default_factory=set)


_TOKENS = itertools.count(1)


def acquire(target: str | Path, *, wait: bool = True, log=_stderr) -> int:
    """Lock `target` for this process and return a token for `release`. Acquisitions are counted: the lock is let
    go when every token is released (or `release_all`). With `wait`, block until another run lets go (saying so
    once through `log`); without, raise `OutputLocked` naming the other run."""
    target = Path(target)
    path = lock_path(target)
    key = str(path.resolve())
    token = next(_TOKENS)
    with _GUARD:
        held = _HELD.get(key)
        if held is not None:
            held.tokens.add(token)
            return token
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = _acquire(path, target, wait, log)
    with _GUARD:
        if key in _HELD:  # another thread of this process got it meanwhile: keep one
            _HELD[key].tokens.add(token)
            os.close(fd)
        else:
            _HELD[key] = _Held(fd, os.getpid(), {token})
    return token


def release(target: str | Path, token: int) -> None:
    """Undo the `acquire(target)` that returned `token` (a token already released, or of a lock already let go,
    does nothing); the last one removes the lock file and unlocks it."""
    key = str(lock_path(target).resolve())
    with _GUARD:
        held = _HELD.get(key)
        if held is None or token not in held.tokens:
            return
        held.tokens.discard(token)
        if held.tokens:
            return
        del _HELD[key]
        _unlock(held.fd, Path(key))


def release_all(target: str | Path) -> None:
    """Let go of `target`'s lock whatever still holds a token (a command that ends: its output is free again)."""
    key = str(lock_path(target).resolve())
    with _GUARD:
        held = _HELD.pop(key, None)
        if held is not None:
            _unlock(held.fd, Path(key))


def _unlock(fd: int, path: Path) -> None:
    try:
        if _same_file(fd, path):
            path.unlink(missing_ok=True)  # still holding it: a waiter sees the file gone and locks the path anew
    finally:
        os.close(fd)  # closing drops the flock


def holds(target: str | Path, token: int | None = None) -> bool:
    """Whether this process holds the lock of `target` (given `token`: through that acquisition)."""
    held = _HELD.get(str(lock_path(target).resolve()))
    return held is not None and (token is None or token in held.tokens)


class OutputLock:
    """`with OutputLock(path, wait=...)`: acquire on entry, release on exit."""

    def __init__(self, target: str | Path, *, wait: bool = True, log=_stderr) -> None:
        self.target, self.wait, self.log = Path(target), wait, log
        self.token: int | None = None

    def __enter__(self) -> OutputLock:
        self.token = acquire(self.target, wait=self.wait, log=self.log)
        return self

    def __exit__(self, *exc) -> None:
        release(self.target, self.token)


@atexit.register
def _release_all() -> None:
    with _GUARD:
        items = list(_HELD.items())
        _HELD.clear()
    for key, held in items:
        if held.pid != os.getpid():  # a forked child: the lock is its parent's
            continue
        try:
            _unlock(held.fd, Path(key))
        except OSError:
            pass
