"""One writer per workdir: a lock file in the workdir that names the run holding it.

Two launches on one workdir both ran before this existed, each writing every step
into metrics.jsonl and racing each other's checkpoints. A run now takes
WORKDIR/run.lock before it writes anything and removes it when it ends. The lock
is a small JSON record (host, pid, start time, a random token) made visible with
os.link, which is atomic on local and NFS-like shared POSIX file systems; its
mtime is the heartbeat, refreshed by a daemon thread, so a training step costs
nothing.

A lock left by a run that is gone is taken over with a warning: on the same
machine when its process no longer exists (or its pid now names a newer process),
from another machine when its heartbeat has been silent for `stale_after_s`.

Only process 0 of a multi-process job holds the lock (the others pass their
process_index and get a no-op). Read-only tools (evaluate, predict, figures)
never take it.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import datetime
import errno
import json
import logging
import os
import secrets
import socket
import threading
import time

from alexnet_jax.errors import UserError

log = logging.getLogger(__name__)

LOCK_NAME = "run.lock"
HEARTBEAT_S = 30.0
STALE_AFTER_S = 600.0
_ATTEMPTS = 5  # create / take over rounds before giving up on a lock that keeps changing hands


@dataclasses.dataclass(frozen=True)
class Holder:
    """Who holds a lock, as recorded in the lock file."""

    host: str
    pid: int
    started: str  # ISO 8601, local time with its offset
    started_epoch: float
    token: str
    boot_id: str | None = None  # tells a restarted machine from the one that wrote the lock
    pid_namespace: str | None = None  # containers on one host share its name but not its pids
    proc_start_ticks: int | None = None  # tells a reused pid from the holder

    @classmethod
    def here(cls, token: str) -> Holder:
        """This process, starting now."""
        now = time.time()
        return cls(
            host=socket.gethostname(),
            pid=os.getpid(),
            started=datetime.datetime.fromtimestamp(now).astimezone().isoformat(timespec="seconds"),
            started_epoch=now,
            token=token,
            boot_id=_boot_id(),
            pid_namespace=_pid_namespace(),
            proc_start_ticks=_proc_start_ticks(os.getpid()),
        )

    @classmethod
    def from_json(cls, data: bytes) -> Holder:
        record = json.loads(data)
        names = {field.name for field in dataclasses.fields(cls)}
        return cls(**{key: value for key, value in record.items() if key in names})

    def describe(self) -> str:
        return f"host {self.host}, pid {self.pid}, started {self.started}"


@dataclasses.dataclass(frozen=True)
class _Seen:
    """A lock file as read once: its holder (None if unreadable), heartbeat age and identity."""

    holder: Holder | None
    age_s: float
    inode: tuple[int, int]


class WorkdirLock:
    """The lock on one workdir; `with WorkdirLock(workdir, process_index=...):` around everything a run writes.

    Process 0 takes it; other processes of the same job get a no-op (they share
    process 0's lock and must not compete for it). acquire() raises UserError when
    another live run holds the lock. release() is idempotent and also runs at
    interpreter exit.
    """

    def __init__(
        self,
        workdir: str,
        *,
        process_index: int = 0,
        heartbeat_s: float = HEARTBEAT_S,
        stale_after_s: float = STALE_AFTER_S,
    ):
        self.workdir = os.path.abspath(workdir)
        self.path = os.path.join(self.workdir, LOCK_NAME)
        self.enabled = process_index == 0
        self.heartbeat_s = heartbeat_s
        self.stale_after_s = stale_after_s
        self._token: str | None = None
        self._owner_pid: int | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lost: str | None = None

    @property
    def held(self) -> bool:
        return self._token is not None

    def __enter__(self) -> WorkdirLock:
        return self.acquire()

    def __exit__(self, *exc_info) -> None:
        self.release()

    def acquire(self) -> WorkdirLock:
        """Take the lock, taking over a stale one; UserError (one line) if a live run holds it."""
        if not self.enabled:
            return self
        if self._token is not None:
            raise RuntimeError(f"{self.path} is already held by this object")
        os.makedirs(self.workdir, exist_ok=True)
        token = secrets.token_hex(16)
        record = dataclasses.asdict(Holder.here(token))
        record["heartbeat"] = f"this file's mtime, refreshed every {self.heartbeat_s:g} s"
        for _ in range(_ATTEMPTS):
            if _create(self.path, record, token):
                self._start(token)
                return self
            seen = _read(self.path)
            if seen is None:  # released between our try and our look: try again
                continue
            reason = self._stale_reason(seen)
            if reason is None:
                raise UserError(self._busy_message(seen))
            _take_over(self.path, seen, token, reason)
        raise UserError(
            f"{self.path} kept changing hands while this run tried to take it; "
            "another run is starting on this workdir: stop it, or use another --workdir"
        )

    def release(self) -> None:
        """Stop the heartbeat and remove the lock, unless another run has taken it over since."""
        if self._token is None or os.getpid() != self._owner_pid:  # a forked child never releases
            return
        token, self._token = self._token, None
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)
        atexit.unregister(self.release)
        seen = _read(self.path)
        if seen is not None and seen.holder is not None and seen.holder.token == token:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
        elif seen is not None:
            log.warning("left %s in place: it now belongs to %s", self.path, _describe(seen.holder))

    def check(self) -> None:
        """UserError if another run has taken the lock over since (its heartbeat thread noticed).

        Cheap enough for every checkpoint: it reads a flag.
        """
        if self._lost is not None:
            raise UserError(
                f"{self.path} was taken over by another run ({self._lost}) while this one ran; stopping so "
                "that only one run writes this workdir: stop the other run, or use another --workdir"
            )

    def _start(self, token: str) -> None:
        self._token, self._owner_pid, self._lost = token, os.getpid(), None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, args=(token,), name="workdir-lock-heartbeat", daemon=True)
        self._thread.start()
        atexit.register(self.release)

    def _beat(self, token: str) -> None:
        while not self._stop.wait(self.heartbeat_s):
            if not self._touch(token):
                return

    def _touch(self, token: str) -> bool:
        """Refresh the heartbeat; False (and `check()` fails from then on) once the lock is no longer ours."""
        try:
            with open(self.path, "rb") as handle:  # touch through this descriptor: never a lock made after our read
                holder = _parse(handle.read())
                if holder is not None and holder.token == token:
                    os.utime(handle.fileno())
                    return True
        except FileNotFoundError:
            holder = None
        except OSError as error:  # a passing hiccup of a shared file system: try again next time
            log.warning("could not refresh the heartbeat of %s: %s", self.path, error)
            return True
        self._lost = _describe(holder)
        log.error("%s was taken over by another run (%s); this run no longer holds it", self.path, self._lost)
        return False

    def _stale_reason(self, seen: _Seen) -> str | None:
        """Why the lock seen belongs to a run that is gone, or None if it may be alive."""
        holder = seen.holder
        if holder is None:
            return self._silent_for(seen)
        here_boot = _boot_id()
        if holder.host == socket.gethostname():
            if holder.boot_id and here_boot and holder.boot_id != here_boot:
                return "its machine has restarted since"
            if holder.pid_namespace == _pid_namespace():
                return _process_gone(holder)
        return self._silent_for(seen)

    def _silent_for(self, seen: _Seen) -> str | None:
        if seen.age_s > self.stale_after_s:
            return f"no heartbeat for {seen.age_s:.0f} s (limit {self.stale_after_s:.0f} s)"
        return None

    def _busy_message(self, seen: _Seen) -> str:
        holder = _describe(seen.holder)
        return (
            f"{self.workdir} is in use by another run ({holder}, heartbeat {seen.age_s:.0f} s ago; lock {self.path}): "
            "wait for it to finish, stop it, or use another --workdir"
        )


def read_holder(workdir: str) -> Holder | None:
    """Who holds the lock on `workdir` now, for tools that only report (None if nobody or unreadable)."""
    seen = _read(os.path.join(os.path.abspath(workdir), LOCK_NAME))
    return None if seen is None else seen.holder


def _create(path: str, record: dict, token: str) -> bool:
    """Make the lock file with `record` in it, atomically and only if there is none; True if we did.

    The record is written in full to a private file first and then linked to the
    lock's name, so nobody ever reads a half-written lock. On NFS a link whose
    reply was lost reports an error though it was made: the link count says.
    """
    temporary = os.path.join(os.path.dirname(path), f".{LOCK_NAME}.{token}")
    with open(temporary, "w") as handle:
        json.dump(record, handle, indent=1)
        handle.flush()
        os.fsync(handle.fileno())
    try:
        try:
            os.link(temporary, path)
        except FileExistsError:
            pass
        except OSError as error:
            if error.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK):
                raise
            return _create_exclusive(path, record)  # a file system without hard links
        return os.stat(temporary).st_nlink == 2
    finally:
        os.unlink(temporary)


def _create_exclusive(path: str, record: dict) -> bool:
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as handle:
        json.dump(record, handle, indent=1)
    return True


def _take_over(path: str, seen: _Seen, token: str, reason: str) -> None:
    """Remove the stale lock `seen`, and only it, so the caller can create its own.

    Renaming it aside first means two runs taking over at once cannot both win:
    if what we moved is not the lock we judged (another run replaced it in
    between), it goes back.
    """
    aside = f"{path}.stale-{token}"
    try:
        os.rename(path, aside)
    except FileNotFoundError:
        return
    moved = _read(aside)
    if moved is None or moved.inode != seen.inode:
        try:
            os.link(aside, path)
        except FileExistsError:
            log.error("%s changed hands twice while this run took it over; one of those runs lost its lock", path)
        os.unlink(aside)
        return
    os.unlink(aside)
    log.warning("took over %s from a run that is gone (%s): %s", path, _describe(seen.holder), reason)


def _read(path: str) -> _Seen | None:
    try:
        with open(path, "rb") as handle:
            data = handle.read()
            stat = os.fstat(handle.fileno())
    except FileNotFoundError:
        return None
    return _Seen(_parse(data), max(0.0, time.time() - stat.st_mtime), (stat.st_dev, stat.st_ino))


def _parse(data: bytes) -> Holder | None:
    try:
        return Holder.from_json(data)
    except (ValueError, TypeError):
        return None


def _describe(holder: Holder | None) -> str:
    return "an unknown run (unreadable lock file)" if holder is None else holder.describe()


def _process_gone(holder: Holder) -> str | None:
    """Why the holder's process (on this machine) is gone, or None if it still runs."""
    try:
        os.kill(holder.pid, 0)
    except ProcessLookupError:
        return f"process {holder.pid} no longer exists"
    except PermissionError:  # exists, belongs to another user
        pass
    stat = _proc_stat(holder.pid)
    if stat is None:
        return None
    state, start_ticks = stat
    if state == "Z":
        return f"process {holder.pid} has exited"
    if holder.proc_start_ticks is not None and start_ticks != holder.proc_start_ticks:
        return f"pid {holder.pid} now belongs to another process"
    return None


def _proc_stat(pid: int) -> tuple[str, int] | None:
    """(state, start time in clock ticks since boot) from /proc; None where there is no /proc."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            fields = handle.read().rsplit(")", 1)[1].split()  # the command name may hold spaces and ')'
    except (OSError, IndexError):
        return None
    return fields[0], int(fields[19])


def _proc_start_ticks(pid: int) -> int | None:
    stat = _proc_stat(pid)
    return None if stat is None else stat[1]


def _boot_id() -> str | None:
    try:
        with open("/proc/sys/kernel/random/boot_id") as handle:
            return handle.read().strip()
    except OSError:
        return None


def _pid_namespace() -> str | None:
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return None
