"""Orbax checkpoints of the train state, with a small JSON record of what was trained.

Saves are asynchronous: Orbax writes to a temporary directory and renames it
when done, so only finished checkpoints are ever listed and a run killed
mid-save restarts from the newest complete one.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
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


class Checkpointer:
    def __init__(self, workdir: str, *, keep: int = 3):
        self.directory = os.path.join(os.path.abspath(workdir), "checkpoints")
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
        )
        self._manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def save(self, step: int, state: Any, meta: dict[str, Any], metrics: dict[str, float] | None = None) -> None:
        """Start an asynchronous save; `metrics` (eval results) rank it for keeping the best."""
        state = parallel.to_global(state)  # several processes: Orbax wants global arrays
        # Orbax would wait for the previous save here anyway; once it is done, hand the
        # host copies it freed back to the OS, or RSS creeps up by a state size per save.
        self._manager.wait_until_finished()
        release_free_heap()
        self._manager.save(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
            metrics=metrics if metrics and BEST_METRIC in metrics else None,
        )

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def read_meta(self, step: int) -> dict[str, Any]:
        restored = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        return dict(restored["meta"])

    def restore(self, step: int, target: Any) -> Any:
        """Restore onto the shapes, dtypes and shardings of `target` (any device count)."""
        abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, target)
        restored = self._manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))
        return restored["state"]

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()


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


def load_converted(directory: str) -> tuple[Any, dict[str, Any]]:
    """(params as host arrays, model.json) of a converted checkpoint."""
    import json

    with open(os.path.join(directory, MODEL_FILE)) as handle:
        record = json.load(handle)
    if record.get("format") != CONVERTED_FORMAT:
        raise UserError(
            f"{directory}/{MODEL_FILE} has format {record.get('format')!r}; this version reads {CONVERTED_FORMAT}"
        )
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
        step = manager.latest_step()
        if step is None:
            raise UserError(f"{directory} holds no finished checkpoint yet")
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
    finally:
        manager.close()
    return restored["state"]["params"], dict(restored["meta"]), int(step)
