"""Which GPUs each SLURM or Open MPI task takes: every one its launcher gave it, in both layouts.

The environments are those srun and mpirun give their tasks (SLURM's as slurmd 22.05 wrote them for
a node with GPUs, see test_launchers.test_slurm_hands_tasks_the_gpus_the_decision_expects). No GPU is
at hand, so the decision is tested here, and JAX's use of it through the config it sets.
"""

import subprocess
import sys
import textwrap

import pytest
from conftest import child_env

from alexnet_jax.errors import UserError
from alexnet_jax.parallel import distributed


def slurm_task(local_id, tasks_per_node, nodes=1, **extra):
    """The environment srun gives one task (the variables JAX's SlurmCluster and the decision read)."""
    return {
        "SLURM_JOB_ID": "77",
        "SLURM_STEP_NODELIST": "gpu[001-004]" if nodes > 1 else "gpu001",
        "SLURM_NTASKS": str(tasks_per_node * nodes),
        "SLURM_PROCID": str(local_id),
        "SLURM_LOCALID": str(local_id),
        "SLURM_NODEID": "0",
        "SLURM_STEP_TASKS_PER_NODE": f"{tasks_per_node}(x{nodes})" if nodes > 1 else str(tasks_per_node),
        **extra,
    }


def mpirun_rank(local_rank, local_size, **extra):
    return {
        "OMPI_MCA_orte_hnp_uri": "1531576320.0;tcp://127.0.0.1:34911",
        "OMPI_COMM_WORLD_SIZE": str(2 * local_size),
        "OMPI_COMM_WORLD_RANK": str(local_rank),
        "OMPI_COMM_WORLD_LOCAL_RANK": str(local_rank),
        "OMPI_COMM_WORLD_LOCAL_SIZE": str(local_size),
        **extra,
    }


EIGHT_GPUS = {
    "CUDA_VISIBLE_DEVICES": "0,1,2,3,4,5,6,7",
    "SLURM_STEP_GPUS": "0,1,2,3,4,5,6,7",
    "SLURM_GPUS_ON_NODE": "8",
}


def test_one_task_per_node_takes_all_eight_gpus():
    """The README's `srun --nodes=4 --ntasks-per-node=1 --gpus-per-node=8`: JAX alone would take GPU 0."""
    assert distributed.launcher_local_device_ids(slurm_task(0, 1, nodes=4, **EIGHT_GPUS)) == list(range(8))


def test_one_task_per_gpu_splits_the_nodes_gpus_by_local_rank():
    """`--ntasks-per-node=8 --gpus-per-node=8`: every task sees all 8 and takes its own."""
    ids = [distributed.launcher_local_device_ids(slurm_task(rank, 8, nodes=4, **EIGHT_GPUS)) for rank in range(8)]
    assert ids == [[rank] for rank in range(8)]


def test_two_tasks_per_node_take_four_gpus_each():
    ids = [distributed.launcher_local_device_ids(slurm_task(rank, 2, **EIGHT_GPUS)) for rank in range(2)]
    assert ids == [[0, 1, 2, 3], [4, 5, 6, 7]]


@pytest.mark.parametrize("binding", ["gpu:per_task:1", "gpu:single:1", "gpu:map_gpu:0,1,2,3,4,5,6,7"])
def test_a_task_that_slurm_bound_to_its_own_gpu_takes_the_one_it_sees(binding):
    """--gpus-per-task=1 (or --gpu-bind): CUDA_VISIBLE_DEVICES lists one GPU, numbered 0 in the process.
    JAX's default, [SLURM_LOCALID], would ask task 5 for a GPU 5 that it cannot see."""
    env = slurm_task(5, 8, CUDA_VISIBLE_DEVICES="5", SLURM_STEP_GPUS="5", SLURM_GPUS_ON_NODE="8")
    assert distributed.launcher_local_device_ids(dict(env, SLURMD_TRES_BIND=binding)) == [0]


def test_gpus_per_task_two_takes_both_of_its_own():
    env = slurm_task(1, 2, CUDA_VISIBLE_DEVICES="2,3", SLURMD_TRES_BIND="gpu:per_task:2", SLURM_GPUS_ON_NODE="4")
    assert distributed.launcher_local_device_ids(env) == [0, 1]  # not [1], the second half of what it sees


def test_closest_binding_counts_whether_the_tasks_gpus_are_their_own():
    two_sockets = slurm_task(
        1, 2, CUDA_VISIBLE_DEVICES="4,5,6,7", SLURMD_TRES_BIND="gpu:closest", SLURM_GPUS_ON_NODE="8"
    )
    assert distributed.launcher_local_device_ids(two_sockets) == [0, 1, 2, 3]
    one_socket = dict(EIGHT_GPUS, SLURMD_TRES_BIND="gpu:closest")
    assert distributed.launcher_local_device_ids(slurm_task(1, 2, **one_socket)) == [4, 5, 6, 7]


def test_without_cuda_visible_devices_slurm_step_gpus_are_the_indices():
    assert distributed.launcher_local_device_ids(slurm_task(1, 2, SLURM_STEP_GPUS="4,5,6,7")) == [6, 7]


def test_mpirun_one_rank_per_node_takes_every_gpu_and_one_per_gpu_takes_its_own():
    assert distributed.launcher_local_device_ids(mpirun_rank(0, 1)) == []  # no restriction: all it sees
    assert distributed.launcher_local_device_ids(mpirun_rank(3, 8)) == [3]  # mpirun -np GPUS: one each
    assert distributed.launcher_local_device_ids(mpirun_rank(1, 2, CUDA_VISIBLE_DEVICES="0,1,2,3")) == [2, 3]
    rank_wrapper = mpirun_rank(5, 8, CUDA_VISIBLE_DEVICES="5")  # a wrapper exported one GPU per rank
    assert distributed.launcher_local_device_ids(rank_wrapper) == [0]


def test_jax_decides_by_hand_on_tpus_and_where_the_user_said():
    assert distributed.launcher_local_device_ids({}) is None
    assert distributed.launcher_local_device_ids({"TPU_WORKER_HOSTNAMES": "t0,t1"}) is None
    assert distributed.launcher_local_device_ids(slurm_task(0, 1, JAX_LOCAL_DEVICE_IDS="0,1", **EIGHT_GPUS)) is None


def test_uneven_shares_are_one_line_saying_what_to_start():
    with pytest.raises(UserError, match="8 GPUs of this node do not split evenly among its 3 tasks"):
        distributed.launcher_local_device_ids(slurm_task(0, 3, **EIGHT_GPUS))


def test_tasks_per_node_of_uneven_nodes_are_read_for_this_node():
    env = slurm_task(0, 2, SLURM_STEP_TASKS_PER_NODE="2(x3),1", SLURM_NODEID="3", **EIGHT_GPUS)
    assert distributed.launcher_local_device_ids(env) == list(range(8))  # the last node runs one task


_JAX_VISIBLE_GPUS = textwrap.dedent(
    """
    import sys
    import jax
    from alexnet_jax.parallel import distributed
    ids = distributed.launcher_local_device_ids(dict(__import__("os").environ)) if sys.argv[1] == "ours" else None
    jax.distributed.initialize(local_device_ids=ids, initialization_timeout=60)
    print("visible:", jax.config.values["jax_cuda_visible_devices"])
    jax.distributed.shutdown()
    """
)


def test_jax_restricts_a_lone_slurm_task_to_gpu_0_unless_given_our_ids(tmp_path):
    """What the ids do in JAX: the restriction it sets (jax_cuda_visible_devices) for a one-task SLURM
    step on a node of 8 GPUs. The CPU backend ignores it, so it is read from JAX's config."""
    env = child_env(1, **slurm_task(0, 1, JAX_COORDINATOR_PORT=str(_free_port()), **EIGHT_GPUS))
    env["SLURM_STEP_NODELIST"] = "127.0.0.1"
    outputs = {}
    for choice in ("jax", "ours"):
        done = subprocess.run(
            [sys.executable, "-c", _JAX_VISIBLE_GPUS, choice], env=env, capture_output=True, text=True, timeout=300
        )
        assert done.returncode == 0, done.stderr[-3000:]
        outputs[choice] = done.stdout.strip()
    assert outputs == {"jax": "visible: 0", "ours": "visible: 0,1,2,3,4,5,6,7"}


def _free_port():
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]
