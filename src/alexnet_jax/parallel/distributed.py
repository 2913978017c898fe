"""Devices and processes: distributed start-up and host -> device placement of batches."""

from __future__ import annotations

import collections
import functools
import itertools
import logging
import re
from collections.abc import Callable, Iterable, Iterator, Mapping

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from alexnet_jax.step.steps import AXIS  # the axis name the steps reduce over

log = logging.getLogger(__name__)


def local_mesh() -> Mesh:
    return Mesh(np.array(jax.local_devices()), (AXIS,))


def shard_to_devices(batch: dict[str, np.ndarray], mesh: Mesh | None = None) -> dict[str, jax.Array]:
    """Put [local_devices, per_device, ...] host arrays one slice per local device.

    The placement matches what the pmap'ed step expects, so no copy happens at call time.
    """
    sharding = NamedSharding(mesh or local_mesh(), PartitionSpec(AXIS))
    return {key: jax.device_put(value, sharding) for key, value in batch.items()}


def prefetch_to_device(
    batches: Iterable[dict[str, np.ndarray]], size: int = 2, place: Callable | None = None
) -> Iterator[dict[str, jax.Array]]:
    """Keep `size` batches in flight to the devices while the step runs (transfers are async).

    place: host batch -> device batch (a scheme's place_batch); default: shard_to_devices
    of [local_devices, per_device, ...] batches, as pmap takes them.
    """
    if place is None:
        place = functools.partial(shard_to_devices, mesh=local_mesh())
    queue: collections.deque = collections.deque()
    iterator = iter(batches)
    for batch in itertools.islice(iterator, size):
        queue.append(place(batch))
    while queue:
        yield queue.popleft()
        for batch in itertools.islice(iterator, 1):
            queue.append(place(batch))


def describe() -> str:
    return (
        f"process {jax.process_index()} of {jax.process_count()}; "
        f"{jax.local_device_count()} local / {jax.device_count()} total devices "
        f"({jax.devices()[0].platform})"
    )


# Environment variables that say a run spans several processes and that
# jax.distributed.initialize() can read its cluster from without arguments.
_CLUSTER_HINTS = {
    "SLURM": ("SLURM_NTASKS",),
    "Open MPI": ("OMPI_COMM_WORLD_SIZE",),
}


def _detected_cluster() -> str | None:
    import os

    for name, variables in _CLUSTER_HINTS.items():
        for variable in variables:
            try:
                if int(os.environ.get(variable, "1")) > 1:
                    return name
            except ValueError:
                continue
    # A Cloud TPU pod slice: each host sees the worker list of the whole slice.
    hostnames = os.environ.get("TPU_WORKER_HOSTNAMES", "")
    if len([h for h in hostnames.split(",") if h]) > 1:
        return "Cloud TPU pod"
    return None


def initialize_distributed(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    heartbeat_timeout_s: int = 100,
) -> bool:
    """Start jax.distributed when the run spans several processes; call before any computation.

    Explicit flags win; otherwise a TPU pod slice, SLURM or Open MPI job is
    detected and JAX reads the cluster from its environment. Returns whether
    the distributed runtime was started. heartbeat_timeout_s: after this long
    without a heartbeat JAX declares a process dead and aborts the others (with a
    C++ dump); the watchdog's peer timeout is shorter, so its one line comes first.
    """
    explicit = coordinator_address or (num_processes or 1) > 1
    cluster = None if explicit else _detected_cluster()
    if not explicit and cluster is None:
        return False
    # CPU processes need a collectives implementation to reduce across processes;
    # accelerator backends ignore this setting.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if explicit:
        if not coordinator_address or not num_processes or process_id is None:
            from alexnet_jax.errors import UserError

            raise UserError(
                "a multi-process run by hand needs all of --coordinator_address=HOST:PORT, "
                "--num_processes=N and --process_id=I (0 <= I < N)"
            )
        jax.distributed.initialize(
            coordinator_address,
            num_processes=num_processes,
            process_id=process_id,
            heartbeat_timeout_seconds=heartbeat_timeout_s,
        )
    else:
        import os

        log.info("detected a %s job: starting jax.distributed from its environment", cluster)
        jax.distributed.initialize(
            local_device_ids=launcher_local_device_ids(os.environ), heartbeat_timeout_seconds=heartbeat_timeout_s
        )
        log.info("GPUs of this process, if it has any: %s", jax.config.values["jax_cuda_visible_devices"])
    return True


def coordination_client():
    """The key-value client of jax.distributed's coordination service; None in a single process.

    JAX exports no public handle to the store; Orbax reaches it the same way.
    """
    from jax._src import distributed

    return distributed.global_state.client if jax.process_count() > 1 else None


def prepare_on_process_0(what: str, prepare: Callable[[], None], is_prepared: Callable[[], bool], *, timeout_s: float):
    """Run `prepare` (unless is_prepared()) on process 0 alone; the others wait for it, then read.

    Several processes preparing one dataset into one shared directory collide (TFDS's
    final rename fails in all but one) and would do the work N times. Process 0 posts
    the outcome in the coordination service's store; the others wait for it at most
    timeout_s, then check that they see the prepared data too (a directory that is not
    shared fails here, in one line, rather than in the input pipeline).
    """
    from alexnet_jax.errors import UserError

    client = coordination_client()
    if client is None:
        if not is_prepared():
            prepare()
        return
    key = f"alexnet_jax/prepared/{what}"
    if jax.process_index() == 0:
        try:
            if not is_prepared():
                prepare()
        except BaseException as error:
            reason = str(error).splitlines()[0] if str(error) else type(error).__name__
            client.key_value_set(key, f"failed: {reason}", allow_overwrite=True)
            raise
        client.key_value_set(key, "ok", allow_overwrite=True)
        return
    if not is_prepared():
        log.warning("process %d waits for process 0 to prepare %s (at most %d s)", jax.process_index(), what, timeout_s)
    try:
        outcome = client.blocking_key_value_get(key, int(timeout_s * 1000))
    except Exception:  # XlaRuntimeError: DEADLINE_EXCEEDED
        raise UserError(
            f"process {jax.process_index()} waited {timeout_s:.0f} s for process 0 to prepare {what}; "
            "raise config.prepare_timeout_s, or prepare the data once before the job (launch.py on one host)"
        ) from None
    if outcome != "ok":
        raise UserError(f"process 0 could not prepare {what} ({outcome}); its log says more")
    if not is_prepared():
        raise UserError(
            f"process 0 prepared {what}, but process {jax.process_index()} does not see it: config.data_dir "
            "must be a directory that every host shares (or prepare it on each host first)"
        )


# SLURM's per-task GPU bindings (srun --gpu-bind=..., implied by --gpus-per-task), as slurmd passes them on
# to the task in SLURMD_TRES_BIND, e.g. "gpu:per_task:1" or "gpu:single:1".
_OWN_GPUS_BINDINGS = ("per_task", "single", "map_gpu", "mask_gpu")


def launcher_local_device_ids(environ: Mapping[str, str]) -> list[int] | None:
    """Which GPUs this SLURM or Open MPI task takes: every one its launcher gave it, in either layout.

    Left to itself, jax.distributed.initialize() restricts each SLURM or Open MPI process to the one
    GPU numbered like its local rank (jax/_src/clusters/cluster.py), so one task per node on an 8-GPU
    node trains on one GPU, and a task that SLURM bound to its own GPU asks for one it cannot see.
    Here, from the environment alone (no GPU is touched before JAX starts):

    - a task that SLURM bound to its own GPUs (--gpus-per-task, --gpu-bind=single/per_task/map_gpu),
      a task alone on its node, or one that sees fewer GPUs than there are tasks on its node (a
      wrapper set CUDA_VISIBLE_DEVICES per rank) takes every GPU it sees;
    - tasks that see the same GPUs (--ntasks-per-node=8 --gpus-per-node=8, or mpirun -np 8 on a node
      whose CUDA_VISIBLE_DEVICES lists 8) split them evenly by local rank;
    - where nothing says how many GPUs there are (mpirun without CUDA_VISIBLE_DEVICES), one task per
      node takes them all and several take one each, by local rank, as JAX does.

    Returns the ids for jax.distributed.initialize(local_device_ids=...), numbered as this process
    sees its GPUs (after CUDA_VISIBLE_DEVICES): [] for no restriction (JAX restricts only for a
    non-empty list), None where JAX should decide (not a launcher's task, or the user set
    JAX_LOCAL_DEVICE_IDS). The CPU backend ignores it, and JAX itself never restricts TPUs.
    """
    if environ.get("JAX_LOCAL_DEVICE_IDS"):
        return None
    task = _launcher_task(environ)
    if task is None:
        return None
    local_rank, tasks_on_node = task
    visible = _visible_gpus(environ)
    if visible is None:  # nothing says how many: all of them for a lone task, else one each (mpirun -np GPUS)
        return [] if tasks_on_node == 1 else [local_rank]
    if tasks_on_node == 1 or len(visible) < tasks_on_node or _bound_to_own_gpus(environ, visible, tasks_on_node):
        return visible
    if len(visible) % tasks_on_node:
        from alexnet_jax.errors import UserError

        raise UserError(
            f"the {len(visible)} GPUs of this node do not split evenly among its {tasks_on_node} tasks: "
            "start one task per node (all its GPUs) or one task per GPU"
        )
    share = len(visible) // tasks_on_node
    return visible[local_rank * share : (local_rank + 1) * share]


def _launcher_task(environ: Mapping[str, str]) -> tuple[int, int] | None:
    """(local rank, tasks on this node) of an Open MPI or SLURM task, checked in JAX's order; else None."""
    if "OMPI_MCA_orte_hnp_uri" in environ or "OMPI_COMM_WORLD_LOCAL_RANK" in environ:
        return int(environ.get("OMPI_COMM_WORLD_LOCAL_RANK", 0)), int(environ.get("OMPI_COMM_WORLD_LOCAL_SIZE", 1))
    slurm = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID")
    if not all(name in environ for name in slurm):  # what JAX's SlurmCluster needs
        return None
    return int(environ["SLURM_LOCALID"]), _slurm_tasks_on_node(environ)


def _slurm_tasks_on_node(environ: Mapping[str, str]) -> int:
    """SLURM_STEP_TASKS_PER_NODE, e.g. "8(x4)" or "2(x3),1" (one count per node), for this node."""
    for name in ("SLURM_STEP_TASKS_PER_NODE", "SLURM_NTASKS_PER_NODE", "SLURM_TASKS_PER_NODE"):
        counts = []
        for part in environ.get(name, "").split(","):
            if match := re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip()):
                counts += [int(match.group(1))] * int(match.group(2) or 1)
        if len(set(counts)) == 1:
            return counts[0]
        node = int(environ.get("SLURM_NODEID", -1))
        if 0 <= node < len(counts):
            return counts[node]
    return 1


def _visible_gpus(environ: Mapping[str, str]) -> list[int] | None:
    """The GPU ordinals this process sees; None where the environment does not say."""
    if (listed := environ.get("CUDA_VISIBLE_DEVICES")) is not None:
        return list(range(len([entry for entry in listed.split(",") if entry.strip()])))
    for name in ("SLURM_STEP_GPUS", "SLURM_JOB_GPUS"):  # physical indices: nothing renumbered them
        if listed := environ.get(name):
            return [int(entry) for entry in listed.split(",") if entry.strip().isdigit()]
    return None


def _bound_to_own_gpus(environ: Mapping[str, str], visible: list[int], tasks_on_node: int) -> bool:
    """Whether SLURM gave this task GPUs of its own (its CUDA_VISIBLE_DEVICES lists just those)."""
    binding = environ.get("SLURMD_TRES_BIND", "").partition("gpu:")[2]
    if binding.startswith(_OWN_GPUS_BINDINGS):
        return True
    # --gpu-bind=closest gives each task the GPUs near its CPUs: its own where they add up to the node's.
    node_gpus = environ.get("SLURM_GPUS_ON_NODE", "")
    return binding.startswith("closest") and node_gpus.isdigit() and len(visible) * tasks_on_node <= int(node_gpus)


def _replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def to_global(tree):
    """Process-local replicated arrays (what the pmap'ed step returns) -> global arrays for Orbax.

    With one process this is the identity. With several, every process holds
    the same values on its local devices; the global array is replicated over
    all devices of all processes.
    """
    if jax.process_count() == 1:
        return tree
    local = _replicated(local_mesh())
    global_sharding = _replicated(Mesh(np.array(jax.devices()), (AXIS,)))

    def convert(leaf):
        if isinstance(leaf, jax.Array) and len(leaf.sharding.device_set) == jax.device_count():
            return leaf  # global already (a mesh scheme's state)
        leaf = jax.device_put(leaf, local)  # a no-op for the step's outputs
        shards = [shard.data for shard in leaf.addressable_shards]
        return jax.make_array_from_single_device_arrays(leaf.shape, global_sharding, shards)

    return jax.tree_util.tree_map(convert, tree)


def replicate(tree):
    """Copy a state onto every local device, as the pmap'ed step keeps it.

    Doing it once up front means the step never reshards its input; with several
    processes it is also required for the step to donate the old state's buffers.
    """
    return jax.device_put(tree, _replicated(local_mesh()))


def host_copy(tree):
    """numpy copies of a tree of device arrays, also of global arrays that span other processes.

    A replicated array is read from a local shard. One split across processes is
    gathered, which is a collective: then every process must make the same call.
    """

    def fetch(leaf):
        if not isinstance(leaf, jax.Array) or leaf.is_fully_addressable:
            return np.asarray(jax.device_get(leaf))
        if leaf.is_fully_replicated:
            return np.asarray(leaf.addressable_data(0))
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(leaf, tiled=True))

    return jax.tree_util.tree_map(fetch, tree)
