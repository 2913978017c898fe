"""What the storage under the checkpoints refuses, said in one line: StorageError and the StorageGuard that raises it.

A save on a full disk used to end in an Orbax traceback per writer thread with a
half-written step left behind. checkpoint.Checkpointer runs every storage call under
StorageGuard.errors: the partial step is removed and the run stops with the
directory, the free space there and what one checkpoint needs.
"""

from __future__ import annotations

import contextlib
import glob
import logging
import os
import re
import shutil
import socket
from collections.abc import Callable, Iterator
from typing import Any

import jax

from alexnet_jax.checkpointing.manifest import ORBAX_TMP_SUFFIX
from alexnet_jax.errors import UserError

log = logging.getLogger("alexnet_jax.checkpointing.checkpoint")  # the checkpoint's one logger (manifest.py)

_OS_ERROR_CODE = re.compile(r"os_error_code='?(\d+)")  # how TensorStore's errors carry the OS's


class StorageError(UserError):
    """A checkpoint could not be written (no space, no permission): the run stops, earlier checkpoints stay.

    Its one line names the directory, the free space there and what one checkpoint
    needs, instead of an Orbax traceback and a half-written directory.
    """


class StorageGuard:
    """Turns the storage's failures under a save into StorageError, once; `failed` remembers that it did.

    room(step): the finished steps other than `step`, and the bytes one checkpoint
    needs, for the message (the manager knows both).
    """

    def __init__(
        self, directory: str, *, is_primary: bool, room: Callable[[int | None], tuple[list[int], int]]
    ) -> None:
        self.directory, self.is_primary, self._room = directory, is_primary, room
        self.failed = False
        # Orbax logs a traceback per writer thread for one full disk; StorageError says it in one line.
        logging.getLogger("absl").addFilter(_drop_orbax_storage_tracebacks)

    def probe_writable(self, step: int) -> None:
        """Create and remove a file: a directory Orbax cannot create leaves its writer threads waiting at exit."""
        probe = os.path.join(self.directory, f".write-probe-{socket.gethostname()}-{os.getpid()}")
        with self.errors(step):
            os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644))
            os.unlink(probe)

    @contextlib.contextmanager
    def errors(self, step: int | None) -> Iterator[None]:
        """Turn a failure of the storage under a save into StorageError, removing the half-written step."""
        try:
            yield
        except Exception as error:
            reason = storage_failure(error)
            if reason is None:
                raise
            self.failed = True
            log.debug("the storage failed under checkpoint %s", step, exc_info=error)
            if step is not None and self.is_primary:
                for partial in glob.glob(os.path.join(self.directory, f"{step}{ORBAX_TMP_SUFFIX}*")):
                    shutil.rmtree(partial, ignore_errors=True)
            raise StorageError(self._message(step, reason)) from error

    def _message(self, step: int | None, reason: str) -> str:
        try:
            free = format_bytes(shutil.disk_usage(self.directory).free)
        except OSError:
            free = "unknown space"
        steps, needed = self._room(step)
        resume = f"to resume from step {max(steps)}" if steps else "to start again"
        return (
            f"could not write checkpoint {step} to {self.directory}: {reason}; {free} free there, one checkpoint "
            f"needs about {format_bytes(needed)}: free some space or fix the permissions (or use another "
            f"--workdir), then run again {resume}"
        )


def check_free_space(directory: str, checkpoint_bytes: int, checkpoints: int) -> bool:
    """Warn (and return False) when `directory` has no room for `checkpoints` more checkpoints.

    Called at start-up, so a disk that will fill up is news before hours of
    training, not at the save that fails.
    """
    free = shutil.disk_usage(directory).free
    needed = checkpoint_bytes * checkpoints
    if free >= needed:
        return True
    log.warning(
        "%s has %s free, less than the %s that %d more checkpoints of %s need: a save may fail; "
        "free some space, lower config.keep_checkpoints or use another --workdir",
        directory,
        format_bytes(free),
        format_bytes(needed),
        checkpoints,
        format_bytes(checkpoint_bytes),
    )
    return False


def directory_bytes(path: str) -> int:
    """The bytes of every file under `path` (a checkpoint's size on disk)."""
    return sum(os.path.getsize(os.path.join(root, name)) for root, _, names in os.walk(path) for name in names)


def tree_bytes(tree: Any) -> int:
    """The bytes of a tree's arrays (a checkpoint's size before the first is written)."""
    return sum(getattr(leaf, "nbytes", 0) for leaf in jax.tree_util.tree_leaves(tree))


def storage_failure(error: BaseException) -> str | None:
    """The storage's complaint behind `error` (an OSError, or TensorStore's os_error_code), or None."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and not isinstance(error, TimeoutError):
            return error.strerror or str(error)
        if code := _OS_ERROR_CODE.search(str(error)):
            return os.strerror(int(code.group(1)))
        error = error.__cause__ or error.__context__
    return None


def _drop_orbax_storage_tracebacks(record: logging.LogRecord) -> bool:
    """A logging filter: False for Orbax's records of a storage failure, which StorageError reports."""
    if f"{os.sep}orbax{os.sep}" not in record.pathname:
        return True
    error = record.exc_info[1] if record.exc_info else None
    if error is not None and storage_failure(error):
        return False
    return _OS_ERROR_CODE.search(record.getMessage()) is None


def format_bytes(count: float) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if count >= size:
            return f"{count / size:.1f} {unit}"
    return f"{int(count)} bytes"
