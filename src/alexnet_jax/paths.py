"""Checks of the paths a user names (workdirs, weights, record files), each failing as one line.

A run or a tool that meets a read-only file system, a file where a directory should be, a
directory it may not read, or a record file (config.json, model.json) that is missing, empty
or not JSON stops here with a UserError that names the path, what is wrong and what to do,
before any data is read or anything is compiled.
"""

from __future__ import annotations

import errno
import json
import os
import socket
from typing import Any

from alexnet_jax.errors import UserError

_REASONS = {
    errno.EROFS: "it is on a read-only file system",
    errno.EACCES: "permission denied",
    errno.EPERM: "permission denied",
    errno.ENOSPC: "the disk is full",
    errno.EDQUOT: "the disk quota is exhausted",
    errno.ENOTDIR: "a part of it is a file, not a directory",
    errno.ENAMETOOLONG: "the name is too long",
}


def reason(error: OSError) -> str:
    """A few words for an OSError: 'permission denied' rather than '[Errno 13] ...'."""
    return _REASONS.get(error.errno, error.strerror or type(error).__name__)


def writable_directory(path: str, *, flag: str) -> str:
    """`path` as an absolute directory that this process can create files in (made if missing).

    A probe file is created and removed: permission bits, a read-only mount and a full
    quota all show up only when something is written.
    """
    path = os.path.abspath(os.path.expanduser(path))
    if os.path.exists(path) and not os.path.isdir(path):
        raise UserError(f"{flag}={path} is a file, not a directory; name a directory (it is made if missing)")
    probe = os.path.join(path, f".write-probe-{socket.gethostname()}-{os.getpid()}")
    try:
        os.makedirs(path, exist_ok=True)
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644))
        os.remove(probe)
    except OSError as error:
        raise UserError(
            f"{flag}={path} cannot be written ({reason(error)}); name a directory you can write to"
        ) from None
    return path


def readable_directory(path: str, *, flag: str) -> str:
    """`path` as an absolute directory that exists and can be listed."""
    path = os.path.abspath(os.path.expanduser(path))
    if not os.path.exists(path):
        raise UserError(f"{flag}={path} does not exist; check the path")
    if not os.path.isdir(path):
        raise UserError(f"{flag}={path} is a file, not a directory; name the run's workdir or a converted checkpoint")
    try:
        os.listdir(path)
    except OSError as error:
        raise UserError(f"{flag}={path} cannot be read ({reason(error)}); check its permissions") from None
    return path


def readable_file(path: str, *, flag: str) -> str:
    """`path` as an absolute file that exists and can be opened."""
    path = os.path.abspath(os.path.expanduser(path))
    if not os.path.exists(path):
        raise UserError(f"{flag}={path} does not exist; check the path")
    if os.path.isdir(path):
        raise UserError(f"{flag}={path} is a directory; name a file")
    try:
        with open(path, "rb"):
            pass
    except OSError as error:
        raise UserError(f"{flag}={path} cannot be read ({reason(error)}); check its permissions") from None
    return path


def read_json(path: str, *, fix: str) -> dict[str, Any]:
    """The JSON object in `path`; a missing, unreadable, empty or malformed file is a UserError ending in `fix`."""
    try:
        with open(path, "rb") as handle:
            text = handle.read()
    except FileNotFoundError:
        raise UserError(f"{path} is missing; {fix}") from None
    except OSError as error:
        raise UserError(f"{path} cannot be read ({reason(error)}); {fix}") from None
    if not text.strip():
        raise UserError(f"{path} is empty; {fix}")
    try:
        record = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        where = f" at line {error.lineno}" if isinstance(error, json.JSONDecodeError) else ""
        raise UserError(f"{path} is not JSON ({type(error).__name__}{where}); {fix}") from None
    if not isinstance(record, dict):
        raise UserError(f"{path} holds a JSON {type(record).__name__}, not an object; {fix}")
    return record
