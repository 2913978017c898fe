"""Orbax checkpoints of the train state, with a small JSON record of what was trained.

Saves are asynchronous: Orbax writes to a temporary directory and renames it
when done, so only finished checkpoints are ever listed and a run killed
mid-save restarts from the newest complete one.

A finished checkpoint carries a manifest of its files' sizes and checksums, and a
restore checks it first: 4 KB of damage in the newest checkpoint used to restore
silently and surface much later as "diverged"; now that step is moved aside and
the one before it restores. A save that the storage refuses (full disk, no
permission) stops the run with one line saying how much space is free and needed.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import datetime
import functools
import glob
import hashlib
import itertools
import json
import logging
import os
import re
import shutil
import socket
import time
from typing import Any

import jax
import orbax.checkpoint as ocp

from alexnet_jax import parallel
from alexnet_jax.errors import UserError

log = logging.getLogger(__name__)

# Config keys that change the shapes of the state: a checkpoint made with other
# values cannot be continued.
MODEL_KEYS = ("model", "num_classes", "optimizer")
BEST_METRIC = "eval/top1_acc"


class StorageError(UserError):
    """A checkpoint could not be written (no space, no permission): the run stops, earlier checkpoints stay.

    Its one line names the directory, the free space there and what one checkpoint
    needs, instead of an Orbax traceback and a half-written directory.
    """


@dataclasses.dataclass(frozen=True)
class Verdict:
    """What a step's manifest says of its files: `problem` is None when they all match."""

    manifest: bool
    problem: str | None = None


class Checkpointer:
    """Orbax checkpoints of a run, each sealed with a manifest of its files' sizes and checksums.

    A restore through latest_intact_step()/restore_verified() never uses a step
    whose files differ from its manifest: such a step is moved aside (out of
    Orbax's sight, still on disk) and the next newest is tried. A save that fails
    on the storage (no space, no permission) raises StorageError.

    Only the primary process (process 0) writes manifests and moves steps aside;
    every process writes its part of the checkpoints through Orbax.
    """

    def __init__(self, workdir: str, *, keep: int = 3, is_primary: bool | None = None):
        self.directory = os.path.join(os.path.abspath(workdir), CHECKPOINTS_DIR)
        self.keep = keep
        self.is_primary = jax.process_index() == 0 if is_primary is None else is_primary
        self._in_flight: int | None = None  # the step of the save Orbax may still be writing
        self._unsealed: set[int] = set()  # saved by this run, manifest not written yet
        self._trusted: dict[int, bool] = {}  # step -> whether a manifest vouched for it
        self._rejected: set[int] = set()
        self._checkpoint_bytes: int | None = None
        self._state_bytes = 0
        self._failed = False
        policies = ocp.checkpoint_managers
        # The newest `keep`, plus the best by eval/top1_acc among those saved with eval metrics.
        preservation = policies.AnyPreservationPolicy(
            [
                policies.LatestN(n=keep),
                policies.BestN(
                    get_metric_fn=lambda metrics: metrics[BEST_METRIC],
                    reverse=False,
                    n=1,
                    keep_checkpoints_without_metrics=False,
                ),
            ]
        )
        options = ocp.CheckpointManagerOptions(
            preservation_policy=preservation,
            create=True,
            enable_async_checkpointing=True,
            cleanup_tmp_directories=True,  # leftovers of a save that was killed
            # Runs in Orbax's background thread once every process has written its part, before the
            # temporary directory is renamed: the manifest appears together with the checkpoint.
            async_options=ocp.AsyncOptions(post_finalization_callback=self._seal_in_flight),
        )
        self._manager = ocp.CheckpointManager(self.directory, options=options)
        # Orbax logs a traceback per writer thread for one full disk; StorageError says it in one line.
        logging.getLogger("absl").addFilter(_drop_orbax_storage_tracebacks)

    def latest_step(self) -> int | None:
        """The newest finished step, unverified (latest_intact_step() checks its files)."""
        return self._manager.latest_step()

    def save(self, step: int, state: Any, meta: dict[str, Any], metrics: dict[str, float] | None = None) -> None:
        """Start an asynchronous save; `metrics` (eval results) rank it for keeping the best.

        Raises StorageError when this save or the previous one (whose failure
        surfaces here) cannot be written.
        """
        state = parallel.to_global(state)  # several processes: Orbax wants global arrays
        # Orbax would wait for the previous save here anyway; once it is done, hand the
        # host copies it freed back to the OS, or RSS creeps up by a state size per save.
        self._finish_previous()
        release_free_heap()
        self._state_bytes = _tree_bytes(state)
        # A directory Orbax cannot create leaves its writer threads waiting minutes at exit: fail first.
        self._probe_writable(step)
        self._in_flight = step
        if self.is_primary:
            self._unsealed.add(step)
        with self._storage_errors(step):
            self._manager.save(
                step,
                args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
                metrics=metrics if metrics and BEST_METRIC in metrics else None,
            )

    def all_steps(self) -> list[int]:
        return [step for step in self._manager.all_steps() if step not in self._rejected]

    def read_meta(self, step: int) -> dict[str, Any]:
        restored = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        return dict(restored["meta"])

    def restore(self, step: int, target: Any) -> Any:
        """Restore onto the shapes, dtypes and shardings of `target` (any device count), unverified."""
        abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, target)
        restored = self._manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))
        return restored["state"]

    def latest_intact_step(self) -> int | None:
        """The newest step whose files match its manifest, moving damaged steps aside on the way.

        A step without a manifest (saved before manifests existed, or by a run
        killed between Orbax's commit and the manifest) is trusted, with a note.
        None when there is no checkpoint at all; UserError when all were damaged.
        """
        for step in sorted(self.all_steps(), reverse=True):
            if step in self._trusted:
                return step
            verdict = verify_step(os.path.join(self.directory, str(step)))
            if verdict.problem is not None:
                self._set_aside(step, verdict.problem)
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

    def restore_verified(self, target: Any) -> tuple[int, Any] | None:
        """(step, state) of the newest intact checkpoint, restored onto `target`; None if there is none.

        A step Orbax cannot read is damaged too, unless its manifest vouched for
        its files: then the files are as written and the error (a target that
        does not match, say) is raised as it is.
        """
        while (step := self.latest_intact_step()) is not None:
            try:
                return step, self.restore(step, target)
            except Exception as error:
                if self._trusted.pop(step):
                    raise
                self._set_aside(step, f"Orbax could not read it ({_first_line(error)})")
        return None

    def check_free_space(self, state: Any) -> bool:
        """Warn at start-up when the disk cannot hold the checkpoints this run will keep.

        Room is needed for `keep` newest + the best + the one being written, less
        those already there; one checkpoint is the newest one's size on disk, or
        the state's bytes before the first.
        """
        steps = self.all_steps()
        size = _directory_bytes(os.path.join(self.directory, str(max(steps)))) if steps else _tree_bytes(state)
        return check_free_space(self.directory, size, max(1, self.keep + 2 - len(steps)))

    def wait(self) -> None:
        """Block until the save in flight is on disk with its manifest; StorageError if it failed."""
        self._finish_previous()

    def close(self) -> None:
        try:
            if not self._failed:
                self._finish_previous()
        finally:
            if self._failed:  # reported already; Orbax raises the stored error again on close
                with contextlib.suppress(Exception):
                    self._manager.close()
            else:
                self._manager.close()

    def _finish_previous(self) -> None:
        with self._storage_errors(self._in_flight):
            self._manager.wait_until_finished()
        self._in_flight = None
        self._seal_finished()

    def _seal_in_flight(self) -> None:
        """Orbax's hook: write the manifest into the finished save's directory, still under its temporary name."""
        step = self._in_flight
        if step is None or not self.is_primary:
            return
        temporary = sorted(glob.glob(os.path.join(self.directory, f"{step}{_TMP_SUFFIX}*")))
        path = temporary[0] if temporary else os.path.join(self.directory, str(step))
        try:
            self._checkpoint_bytes = write_manifest(path, step)
        except OSError as error:  # tried again once the save is finished; a checkpoint without is still usable
            log.warning("could not write the manifest of checkpoint %d yet: %s", step, error)
        else:
            self._unsealed.discard(step)

    def _seal_finished(self) -> None:
        """Manifests for finished steps the hook missed (it found no directory, or its write failed)."""
        for step in sorted(self._unsealed):
            path = os.path.join(self.directory, str(step))
            if os.path.isdir(path) and not os.path.exists(os.path.join(path, MANIFEST_NAME)):
                try:
                    self._checkpoint_bytes = write_manifest(path, step)
                except OSError as error:
                    log.warning("checkpoint %d has no manifest, it will restore unverified: %s", step, error)
            self._unsealed.discard(step)

    def _probe_writable(self, step: int) -> None:
        probe = os.path.join(self.directory, f".write-probe-{socket.gethostname()}-{os.getpid()}")
        with self._storage_errors(step):
            os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644))
            os.unlink(probe)

    @contextlib.contextmanager
    def _storage_errors(self, step: int | None):
        """Turn a failure of the storage under a save into StorageError, removing the half-written step."""
        try:
            yield
        except Exception as error:
            reason = _storage_failure(error)
            if reason is None:
                raise
            self._failed = True
            log.debug("the storage failed under checkpoint %s", step, exc_info=error)
            if step is not None and self.is_primary:
                for partial in glob.glob(os.path.join(self.directory, f"{step}{_TMP_SUFFIX}*")):
                    shutil.rmtree(partial, ignore_errors=True)
            raise StorageError(self._storage_message(step, reason)) from error

    def _storage_message(self, step: int | None, reason: str) -> str:
        try:
            free = _format_bytes(shutil.disk_usage(self.directory).free)
        except OSError:
            free = "unknown space"
        steps = [s for s in self.all_steps() if s != step]
        # The newest finished checkpoint's size on disk, or this state's bytes if more (a first save, a larger state).
        written = self._checkpoint_bytes or (
            _directory_bytes(os.path.join(self.directory, str(max(steps)))) if steps else 0
        )
        needed = max(written, self._state_bytes)
        resume = f"to resume from step {max(steps)}" if steps else "to start again"
        return (
            f"could not write checkpoint {step} to {self.directory}: {reason}; {free} free there, one checkpoint "
            f"needs about {_format_bytes(needed)}: free some space or fix the permissions (or use another "
            f"--workdir), then run again {resume}"
        )

    def _set_aside(self, step: int, problem: str) -> None:
        """Move a damaged step out of Orbax's sight (`<step>.corrupt-<time>`, never deleted) and skip it."""
        self._rejected.add(step)
        if self.is_primary:
            where = f"moved it to {self._move_aside(step)}"
            self._manager.reload()
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


def check_compatible(meta: dict[str, Any], expected: dict[str, Any], directory: str) -> None:
    """Refuse to continue a checkpoint of a different model in the same workdir."""
    differences = [
        f"{key}={meta.get(key)!r} (now {expected[key]!r})"
        for key in MODEL_KEYS
        if key in meta and meta.get(key) != expected.get(key)
    ]
    if differences:
        raise UserError(
            f"{directory} holds a checkpoint of a different model: {', '.join(differences)}; "
            "use a new --workdir, or set the config back to match"
        )


# --- Manifests: what a finished checkpoint's files were when they were written -----
#
# checkpoints/<step>/MANIFEST.json  {"format": 1, "step": 7, "algorithm": "sha256", "written": "...",
#                                    "files": {"state/ocdbt.process_0/d/<hash>": {"size": 805636, "sha256": "..."}}}
# Every file under the step is listed except Orbax's commit records, which it rewrites after the manifest
# (_CHECKPOINT_METADATA, commit_success.txt at the top); files that are not listed are not checked.
# sha256: 1.8 GB/s on a core with SHA extensions (blake2b 0.9, md5 0.75), and `sha256sum` can check it by hand.

MANIFEST_NAME = "MANIFEST.json"
MANIFEST_FORMAT = 1
CHECKSUM = "sha256"
CORRUPT_MARK = ".corrupt-"
_ORBAX_COMMIT_FILES = frozenset({"_CHECKPOINT_METADATA", "commit_success.txt"})
_TMP_SUFFIX = ".orbax-checkpoint-tmp"
_OS_ERROR_CODE = re.compile(r"os_error_code='?(\d+)")  # how TensorStore's errors carry the OS's


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
        _format_bytes(free),
        _format_bytes(needed),
        checkpoints,
        _format_bytes(checkpoint_bytes),
    )
    return False


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


def _directory_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(root, name)) for root, _, names in os.walk(path) for name in names)


def _tree_bytes(tree: Any) -> int:
    return sum(getattr(leaf, "nbytes", 0) for leaf in jax.tree_util.tree_leaves(tree))


def _storage_failure(error: BaseException) -> str | None:
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
    if error is not None and _storage_failure(error):
        return False
    return _OS_ERROR_CODE.search(record.getMessage()) is None


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"[:300]


def _format_bytes(count: float) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if count >= size:
            return f"{count / size:.1f} {unit}"
    return f"{int(count)} bytes"


def release_free_heap() -> None:
    """glibc keeps freed blocks for reuse; malloc_trim returns them to the OS (no-op elsewhere)."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@functools.cache
def _malloc_trim():
    try:
        return ctypes.CDLL(None).malloc_trim  # the C library this process already has loaded
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to do
        return None


# --- The on-disk layouts that trained weights are read from (trained.load) ----------
#
# A run's workdir:    WORKDIR/checkpoints/<step>/{state,meta}   (Checkpointer above)
#                     WORKDIR/config.json                       (runinfo.py)
# A converted checkpoint (python -m alexnet_jax.convert):
#                     DIR/params/      Orbax StandardSave of {"params": <Flax params>}
#                     DIR/model.json   {"format": 1, "model": "torchvision", "num_classes": 1000,
#                                       "image_size": 224, "resize_size": 256, "input_scale": "standardized",
#                                       "class_names": [...] or null, "source": {...}}

MODEL_FILE = "model.json"
PARAMS_DIR = "params"
CONVERTED_FORMAT = 1
CHECKPOINTS_DIR = "checkpoints"


def is_converted(path: str) -> bool:
    return os.path.isfile(os.path.join(path, MODEL_FILE))


def is_workdir(path: str) -> bool:
    return os.path.isdir(os.path.join(path, CHECKPOINTS_DIR))


def save_converted(directory: str, params: Any, record: dict[str, Any]) -> str:
    """Write a converted checkpoint (params + model.json). Returns its absolute path."""
    import json

    import numpy as np

    directory = os.path.abspath(directory)
    params_dir = os.path.join(directory, PARAMS_DIR)
    if os.path.exists(params_dir):
        raise UserError(f"{params_dir} already exists; choose another --out or delete it")
    os.makedirs(directory, exist_ok=True)
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(params_dir, {"params": jax.tree_util.tree_map(np.asarray, params)})
    checkpointer.wait_until_finished()
    checkpointer.close()
    with open(os.path.join(directory, MODEL_FILE), "w") as handle:
        json.dump({"format": CONVERTED_FORMAT, **record}, handle, indent=1)
    return directory


def _host_target(metadata_tree: Any) -> Any:
    # ShapeDtypeStructs without a sharding restore as host numpy arrays, on any device count.
    return jax.tree_util.tree_map(lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype), metadata_tree)


def read_converted_record(directory: str) -> dict[str, Any]:
    """A converted checkpoint's model.json, checked: UserError when it is unreadable or of another format."""
    from alexnet_jax import paths

    record = paths.read_json(
        os.path.join(directory, MODEL_FILE), fix="convert the weights again (python -m alexnet_jax.convert)"
    )
    if record.get("format") != CONVERTED_FORMAT:
        raise UserError(
            f"{directory}/{MODEL_FILE} has format {record.get('format')!r}; this version reads {CONVERTED_FORMAT}"
        )
    return record


def load_converted(directory: str) -> tuple[Any, dict[str, Any]]:
    """(params as host arrays, model.json) of a converted checkpoint."""
    record = read_converted_record(directory)
    checkpointer = ocp.StandardCheckpointer()
    params_dir = os.path.join(directory, PARAMS_DIR)
    target = _host_target(checkpointer.metadata(params_dir).item_metadata.tree)
    restored = checkpointer.restore(params_dir, target)
    checkpointer.close()
    return restored["params"], record


def load_run_params(workdir: str) -> tuple[Any, dict[str, Any], int]:
    """(params as host arrays, the checkpoint's meta, step) of a run's newest checkpoint.

    Read-only: the optimizer state is not read, nothing in the workdir is written.
    """
    import numpy as np

    directory = os.path.join(os.path.abspath(workdir), CHECKPOINTS_DIR)
    manager = ocp.CheckpointManager(
        directory,
        options=ocp.CheckpointManagerOptions(read_only=True),
        item_handlers={"state": ocp.PyTreeCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()},
    )
    try:
        step = _newest_intact_step(directory, manager.all_steps())
        state_tree = manager.item_metadata(step)["state"]
        state_tree = getattr(state_tree, "tree", state_tree)
        target = {"params": _host_target(state_tree["params"])}
        restore_args = jax.tree_util.tree_map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), target)
        restored = manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.PyTreeRestore(item=target, restore_args=restore_args, partial_restore=True),
                meta=ocp.args.JsonRestore(),
            ),
        )
    except OSError as error:
        from alexnet_jax import paths

        raise UserError(f"{directory} cannot be read ({paths.reason(error)}); check its permissions") from None
    finally:
        manager.close()
    return restored["state"]["params"], dict(restored["meta"]), int(step)


def _newest_intact_step(directory: str, steps: list[int]) -> int:
    """The newest finished step whose files match its manifest, for tools that only read a workdir.

    Damaged steps are skipped with a warning (training sets them aside when the run resumes); a
    step without a manifest is trusted, as training trusts it (saved before manifests existed).
    """
    if not steps:
        raise UserError(f"{directory} holds no finished checkpoint yet; train first, or name another workdir")
    problems = []
    for step in sorted(steps, reverse=True):
        verdict = verify_step(os.path.join(directory, str(step)))
        if verdict.problem is None:
            return step
        log.warning("checkpoint %d in %s is damaged (%s): reading an older one", step, directory, verdict.problem)
        problems.append(f"{step}: {verdict.problem}")
    raise UserError(
        f"every checkpoint in {directory} is damaged ({'; '.join(problems)}); restore the workdir from a copy"
    )
