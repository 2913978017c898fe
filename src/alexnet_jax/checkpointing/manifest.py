"""A checkpoint's manifest and its verification: what a finished step's files were when they were written.

Three parts of checkpoint.Checkpointer live here: the manifest file itself
(write_manifest / verify_step, read-only tools use them too), Seals (which of this
run's saves still need their manifest, and writing it), and IntactSteps (which
steps a restore may use: damaged ones are moved aside, never deleted).

checkpoints/<step>/MANIFEST.json  {"format": 1, "step": 7, "algorithm": "sha256", "written": "...",
                                   "files": {"state/ocdbt.process_0/d/<hash>": {"size": 805636, "sha256": "..."}}}
Every file under the step is listed except Orbax's commit records, which it rewrites after the manifest
(_CHECKPOINT_METADATA, commit_success.txt at the top); files that are not listed are not checked.
sha256: 1.8 GB/s on a core with SHA extensions (blake2b 0.9, md5 0.75), and `sha256sum` can check it by hand.
"""

from __future__ import annotations

import dataclasses
import datetime
import glob
import hashlib
import itertools
import json
import logging
import os
import time
from collections.abc import Callable

from alexnet_jax.errors import UserError

# The checkpoint's one logger, whichever of its parts speaks: users filter one name.
log = logging.getLogger("alexnet_jax.checkpointing.checkpoint")

MANIFEST_NAME = "MANIFEST.json"
MANIFEST_FORMAT = 1
CHECKSUM = "sha256"
CORRUPT_MARK = ".corrupt-"
ORBAX_TMP_SUFFIX = ".orbax-checkpoint-tmp"  # how Orbax names a step it is still writing
_ORBAX_COMMIT_FILES = frozenset({"_CHECKPOINT_METADATA", "commit_success.txt"})


@dataclasses.dataclass(frozen=True)
class Verdict:
    """What a step's manifest says of its files: `problem` is None when they all match."""

    manifest: bool
    problem: str | None = None


def write_manifest(step_dir: str, step: int) -> int:
    """Write `step_dir`/MANIFEST.json (atomically, via a temporary file); returns the bytes it covers."""
    files = {}
    for relative, path in _step_files(step_dir):
        size, digest = _file_checksum(path)
        files[relative] = {"size": size, CHECKSUM: digest}
    record = {
        "format": MANIFEST_FORMAT,
        "step": step,
        "algorithm": CHECKSUM,
        "written": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "files": files,
    }
    final = os.path.join(step_dir, MANIFEST_NAME)
    temporary = f"{final}.tmp-{os.getpid()}"
    with open(temporary, "w") as handle:
        json.dump(record, handle, indent=1)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, final)
    return sum(entry["size"] for entry in files.values())


def verify_step(step_dir: str) -> Verdict:
    """Check a step's files against its manifest: sizes first (cheap), then checksums.

    Read-only, so tools that only read a workdir can use it too.
    """
    if not os.path.isdir(step_dir):
        return Verdict(False, "its directory is gone")
    try:
        with open(os.path.join(step_dir, MANIFEST_NAME)) as handle:
            record = json.load(handle)
        if record.get("format") != MANIFEST_FORMAT or record.get("algorithm") != CHECKSUM:
            return Verdict(True, f"{MANIFEST_NAME} has format {record.get('format')!r} / {record.get('algorithm')!r}")
        files = {relative: (int(entry["size"]), str(entry[CHECKSUM])) for relative, entry in record["files"].items()}
    except FileNotFoundError:
        return Verdict(False)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        return Verdict(True, f"{MANIFEST_NAME} is unreadable ({type(error).__name__}: {error})")
    for relative, (expected, _) in files.items():
        try:
            size = os.stat(os.path.join(step_dir, relative)).st_size
        except FileNotFoundError:
            return Verdict(True, f"{relative} is missing")
        except OSError as error:
            return Verdict(True, f"{relative} cannot be read ({error.strerror})")
        if size != expected:
            return Verdict(True, f"{relative} has {size} bytes, the manifest says {expected}")
    for relative, (_, digest) in files.items():
        try:
            if _file_checksum(os.path.join(step_dir, relative))[1] != digest:
                return Verdict(True, f"{relative} does not match its {CHECKSUM} in the manifest")
        except OSError as error:  # an I/O error is damage too; a file gone since (another process moved it aside)
            return Verdict(True, f"{relative} cannot be read ({error.strerror})")
    return Verdict(True)


class Seals:
    """The manifests of this run's saves: written by Orbax's hook as a save finishes, else right after.

    Only the primary process writes them. checkpoint_bytes is what the newest
    manifest covers: the size of one checkpoint on disk.
    """

    def __init__(self, directory: str, *, is_primary: bool):
        self.directory, self.is_primary = directory, is_primary
        self.checkpoint_bytes: int | None = None
        self._unsealed: set[int] = set()  # saved by this run, manifest not written yet

    def expect(self, step: int) -> None:
        """A save of `step` starts: it owes a manifest."""
        if self.is_primary:
            self._unsealed.add(step)

    def seal_in_flight(self, step: int | None) -> None:
        """Orbax's hook: write the manifest into the finished save's directory, still under its temporary name."""
        if step is None or not self.is_primary:
            return
        temporary = sorted(glob.glob(os.path.join(self.directory, f"{step}{ORBAX_TMP_SUFFIX}*")))
        path = temporary[0] if temporary else os.path.join(self.directory, str(step))
        try:
            self.checkpoint_bytes = write_manifest(path, step)
        except OSError as error:  # tried again once the save is finished; a checkpoint without is still usable
            log.warning("could not write the manifest of checkpoint %d yet: %s", step, error)
        else:
            self._unsealed.discard(step)

    def seal_finished(self) -> None:
        """Manifests for finished steps the hook missed (it found no directory, or its write failed)."""
        for step in sorted(self._unsealed):
            path = os.path.join(self.directory, str(step))
            if os.path.isdir(path) and not os.path.exists(os.path.join(path, MANIFEST_NAME)):
                try:
                    self.checkpoint_bytes = write_manifest(path, step)
                except OSError as error:
                    log.warning("checkpoint %d has no manifest, it will restore unverified: %s", step, error)
            self._unsealed.discard(step)


class IntactSteps:
    """Which steps a restore may use: each verified once against its manifest, a damaged one moved aside.

    A damaged step is renamed `<step>.corrupt-<time>` (out of Orbax's sight, still on
    disk) by the primary process, which then calls `reload` so Orbax lists the steps
    again; the others only stop offering it.
    """

    def __init__(self, directory: str, *, is_primary: bool, reload: Callable[[], None]):
        self.directory, self.is_primary, self._reload = directory, is_primary, reload
        self._trusted: dict[int, bool] = {}  # step -> whether a manifest vouched for it
        self._rejected: set[int] = set()

    def usable(self, steps: list[int]) -> list[int]:
        """`steps` less the ones found damaged."""
        return [step for step in steps if step not in self._rejected]

    def latest(self, steps: list[int]) -> int | None:
        """The newest of `steps` whose files match its manifest, moving damaged steps aside on the way.

        A step without a manifest (saved before manifests existed, or by a run
        killed between Orbax's commit and the manifest) is trusted, with a note.
        None when there is no checkpoint at all; UserError when all were damaged.
        """
        for step in sorted(self.usable(steps), reverse=True):
            if step in self._trusted:
                return step
            verdict = verify_step(os.path.join(self.directory, str(step)))
            if verdict.problem is not None:
                self.set_aside(step, verdict.problem)
                continue
            if not verdict.manifest:
                log.info(
                    "checkpoint %d in %s has no manifest (saved before they existed): restoring it unverified",
                    step,
                    self.directory,
                )
            self._trusted[step] = verdict.manifest
            return step
        self._refuse_if_only_damaged()
        return None

    def vouched_for(self, step: int) -> bool:
        """Whether a manifest vouched for `step`'s files; forgets the step (it is verified again if offered)."""
        return self._trusted.pop(step)

    def set_aside(self, step: int, problem: str) -> None:
        """Move a damaged step out of Orbax's sight (`<step>.corrupt-<time>`, never deleted) and skip it."""
        self._rejected.add(step)
        if self.is_primary:
            where = f"moved it to {self._move_aside(step)}"
            self._reload()
        else:
            where = "process 0 moves it aside"
        log.warning(
            "checkpoint %d in %s is damaged: %s; %s and trying the one before", step, self.directory, problem, where
        )

    def _move_aside(self, step: int) -> str:
        source = os.path.join(self.directory, str(step))
        stamp = time.strftime("%Y%m%dT%H%M%S")
        target = f"{source}{CORRUPT_MARK}{stamp}"
        for attempt in itertools.count(1):
            if not os.path.exists(target):
                break
            target = f"{source}{CORRUPT_MARK}{stamp}-{attempt}"
        try:
            os.rename(source, target)
        except OSError as error:
            return f"nowhere (could not rename it: {error.strerror})"
        return target

    def _refuse_if_only_damaged(self) -> None:
        aside = sorted(glob.glob(os.path.join(self.directory, f"*{CORRUPT_MARK}*")))
        if aside:
            names = ", ".join(os.path.basename(path) for path in aside)
            raise UserError(
                f"no intact checkpoint left in {self.directory}; the damaged ones were moved aside ({names}): "
                f"to start over, move {self.directory} away or use another --workdir"
            )


def _step_files(step_dir: str) -> list[tuple[str, str]]:
    """(path relative to the step, full path) of the files a manifest covers, sorted."""
    found = []
    for root, _, names in os.walk(step_dir):
        for name in names:
            path = os.path.join(root, name)
            relative = os.path.relpath(path, step_dir).replace(os.sep, "/")
            if relative in _ORBAX_COMMIT_FILES or relative.startswith(MANIFEST_NAME):
                continue
            found.append((relative, path))
    return sorted(found)


def _file_checksum(path: str) -> tuple[int, str]:
    with open(path, "rb") as handle:
        size = os.fstat(handle.fileno()).st_size
        return size, hashlib.file_digest(handle, CHECKSUM).hexdigest()
