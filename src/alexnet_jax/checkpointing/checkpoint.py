"""Orbax checkpoints of the train state, with a small JSON record of what was trained.

Saves are asynchronous: Orbax writes to a temporary directory and renames it
when done, so only finished checkpoints are ever listed and a run killed
mid-save restarts from the newest complete one.

A finished checkpoint carries a manifest of its files' sizes and checksums, and a
restore checks it first: 4 KB of damage in the newest checkpoint used to restore
silently and surface much later as "diverged"; now that step is moved aside and
the one before it restores. A save that the storage refuses (full disk, no
permission) stops the run with one line saying how much space is free and needed.

The Checkpointer here is the manager that saves and restores; its named parts are
manifest.py (the manifest, its verification: Seals, IntactSteps) and
storage.py (the storage's errors: StorageGuard, StorageError).
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import logging
import os
from typing import Any

import jax
import orbax.checkpoint as ocp

from alexnet_jax.checkpointing.manifest import IntactSteps, Seals, verify_step
from alexnet_jax.checkpointing.storage import StorageGuard, check_free_space, directory_bytes, tree_bytes
from alexnet_jax.errors import UserError
from alexnet_jax.parallel import distributed

log = logging.getLogger(__name__)

# Config keys that change the shapes of the state: a checkpoint made with other
# values cannot be continued.
MODEL_KEYS = ("model", "num_classes", "optimizer")
BEST_METRIC = "eval/top1_acc"


class Checkpointer:
    """Orbax checkpoints of a run, each sealed with a manifest of its files' sizes and checksums.

    A restore through latest_intact_step()/restore_verified() never uses a step
    whose files differ from its manifest: such a step is moved aside (out of
    Orbax's sight, still on disk) and the next newest is tried (IntactSteps). A save
    that fails on the storage (no space, no permission) raises StorageError
    (StorageGuard).

    Only the primary process (process 0) writes manifests and moves steps aside;
    every process writes its part of the checkpoints through Orbax.
    """

    def __init__(self, workdir: str, *, keep: int = 3, is_primary: bool | None = None):
        self.directory = os.path.join(os.path.abspath(workdir), CHECKPOINTS_DIR)
        self.keep = keep
        self.is_primary = jax.process_index() == 0 if is_primary is None else is_primary
        self._in_flight: int | None = None  # the step of the save Orbax may still be writing
        self._state_bytes = 0
        self._seals = Seals(self.directory, is_primary=self.is_primary)
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
        self._intact = IntactSteps(self.directory, is_primary=self.is_primary, reload=self._manager.reload)
        self._storage = StorageGuard(self.directory, is_primary=self.is_primary, room=self._room)

    def latest_step(self) -> int | None:
        """The newest finished step, unverified (latest_intact_step() checks its files)."""
        return self._manager.latest_step()

    def save(self, step: int, state: Any, meta: dict[str, Any], metrics: dict[str, float] | None = None) -> None:
        """Start an asynchronous save; `metrics` (eval results) rank it for keeping the best.

        Raises StorageError when this save or the previous one (whose failure
        surfaces here) cannot be written.
        """
        state = distributed.to_global(state)  # several processes: Orbax wants global arrays
        # Orbax would wait for the previous save here anyway; once it is done, hand the
        # host copies it freed back to the OS, or RSS creeps up by a state size per save.
        self._finish_previous()
        release_free_heap()
        self._state_bytes = tree_bytes(state)
        # A directory Orbax cannot create leaves its writer threads waiting minutes at exit: fail first.
        self._storage.probe_writable(step)
        self._in_flight = step
        self._seals.expect(step)
        with self._storage.errors(step):
            self._manager.save(
                step,
                args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
                metrics=metrics if metrics and BEST_METRIC in metrics else None,
            )

    def all_steps(self) -> list[int]:
        return self._intact.usable(self._manager.all_steps())

    def read_meta(self, step: int) -> dict[str, Any]:
        restored = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        return dict(restored["meta"])

    def restore(self, step: int, target: Any) -> Any:
        """Restore onto the shapes, dtypes and shardings of `target` (any device count), unverified."""
        abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, target)
        restored = self._manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))
        return restored["state"]

    def latest_intact_step(self) -> int | None:
        """The newest step whose files match its manifest, moving damaged steps aside on the way (IntactSteps)."""
        return self._intact.latest(self._manager.all_steps())

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
                if self._intact.vouched_for(step):
                    raise
                self._intact.set_aside(step, f"Orbax could not read it ({_first_line(error)})")
        return None

    def check_free_space(self, state: Any) -> bool:
        """Warn at start-up when the disk cannot hold the checkpoints this run will keep.

        Room is needed for `keep` newest + the best + the one being written, less
        those already there; one checkpoint is the newest one's size on disk, or
        the state's bytes before the first.
        """
        steps = self.all_steps()
        size = directory_bytes(os.path.join(self.directory, str(max(steps)))) if steps else tree_bytes(state)
        return check_free_space(self.directory, size, max(1, self.keep + 2 - len(steps)))

    def wait(self) -> None:
        """Block until the save in flight is on disk with its manifest; StorageError if it failed."""
        self._finish_previous()

    def close(self) -> None:
        try:
            if not self._storage.failed:
                self._finish_previous()
        finally:
            if self._storage.failed:  # reported already; Orbax raises the stored error again on close
                with contextlib.suppress(Exception):
                    self._manager.close()
            else:
                self._manager.close()

    def _finish_previous(self) -> None:
        with self._storage.errors(self._in_flight):
            self._manager.wait_until_finished()
        self._in_flight = None
        self._seals.seal_finished()

    def _seal_in_flight(self) -> None:
        """Orbax's hook, in its thread: the manifest of the save that is finishing (Seals)."""
        self._seals.seal_in_flight(self._in_flight)

    def _room(self, step: int | None) -> tuple[list[int], int]:
        """For a storage error's message: the finished steps besides `step`, and what one checkpoint needs."""
        steps = [s for s in self.all_steps() if s != step]
        # The newest finished checkpoint's size on disk, or this state's bytes if more (a first save, a larger state).
        written = self._seals.checkpoint_bytes or (
            directory_bytes(os.path.join(self.directory, str(max(steps)))) if steps else 0
        )
        return steps, max(written, self._state_bytes)


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


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"[:300]


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
# A converted checkpoint (python -m alexnet_jax.commands.convert):
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
        os.path.join(directory, MODEL_FILE), fix="convert the weights again (python -m alexnet_jax.commands.convert)"
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
