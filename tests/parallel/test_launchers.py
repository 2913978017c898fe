"""The cluster launchers users have, for real: Open MPI's mpirun and a one-node SLURM cluster.

No coordinator flags: JAX finds the job from the launcher's environment. Each task has 2 CPU devices;
the SLURM node offers 4 GPUs as generic resources (slurm_cluster.FAKE_GPUS), so SLURM hands the tasks a
GPU cluster's environment while JAX computes on the CPU. The job script is the one the README shows.
"""

import json
import os
import re
import shutil
import subprocess
import sys
import time

import pytest
from conftest import NARROW_FC, REPO, child_env, launch_command
from slurm_cluster import OneNodeSlurm, missing_programs

from alexnet_jax.parallel import distributed
from alexnet_jax.reporting import metrics as metrics_lib

SBATCH_SCRIPT = os.path.join(REPO, "examples", "slurm", "train.sbatch")
LEAN = (  # the demo digits, small and quick: 2 processes x 2 CPU devices, 8 images a step
    "--config.image_size=64",
    NARROW_FC,
    "--config.batch_size=8",
    "--config.eval_batch_size=128",
    "--config.log_every_steps=1",
    "--config.eval_every_steps=1000",
    "--config.checkpoint_every_steps=1000",
)
DEVICE_LINE = "process 0 of 2; 2 local / 4 total devices"


def _lean_run(digits, total_steps):
    return [f"--config.data_dir={digits}", *LEAN, f"--config.num_train_steps={total_steps}"]


def _step_lines(output, total_steps):
    return re.findall(rf"\bstep (\d+)/{total_steps}\b", output)


# ---------------------------------------------------------------- Open MPI


def _mpirun(workdir, digits, total_steps):
    """mpirun -np 2 python launch.py ...: loopback only, as root, 2 processes on 2 cores; lines tagged by rank."""
    if shutil.which("mpirun") is None:
        pytest.skip("needs Open MPI's mpirun: apt-get install openmpi-bin")
    env = child_env(2, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    exported = [name for name in env if name.startswith(("PYTHON", "XLA_", "JAX_", "TF_CPP"))]
    command = [
        "mpirun", "-np", "2", "--oversubscribe", "--tag-output",
        "--mca", "oob_tcp_if_include", "lo", "--mca", "btl_tcp_if_include", "lo",
        *(flag for name in exported for flag in ("-x", name)),
        *launch_command(workdir, *_lean_run(digits, total_steps)),
    ]  # fmt: skip
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    return done.stdout + done.stderr


def _of_rank(output, rank):
    return "".join(re.findall(rf"^\[1,{rank}\]<std(?:out|err)>:(.*\n)", output, flags=re.MULTILINE))


@pytest.mark.slow
def test_mpirun_trains_checkpoints_and_resumes(tmp_path):
    workdir, digits = tmp_path / "run", tmp_path / "digits"
    first = _mpirun(workdir, digits, total_steps=3)
    assert DEVICE_LINE in _of_rank(first, 0)
    assert _step_lines(first, 3) == ["1", "2", "3"]  # each step once in the job's output: process 0 alone
    assert sorted(os.listdir(workdir / "checkpoints")) == ["3"]

    second = _mpirun(workdir, digits, total_steps=5)
    assert re.search(r"resumed from \S+ at step 3", _of_rank(second, 0)), second[-3000:]
    assert _step_lines(second, 5) == ["4", "5"]
    assert not re.search(r"step \d|resumed", _of_rank(second, 1))  # process 1: warnings and errors only
    records = metrics_lib.read_metrics(str(workdir))
    assert [r["step"] for r in records if "train/loss" in r] == [1, 2, 3, 4, 5]


# ---------------------------------------------------------------- SLURM


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    """A one-node SLURM cluster for this module's tests, stopped after them."""
    if missing := missing_programs():
        pytest.skip(f"needs Debian's slurm-wlm and munge (apt-get install slurm-wlm munge): no {', '.join(missing)}")
    if os.getuid() != 0:
        pytest.skip("slurmd runs jobs as their users, so this one-node cluster needs root")
    cluster = OneNodeSlurm(tmp_path_factory.mktemp("slurm")).start()
    try:
        yield cluster
    finally:
        cluster.stop()


_TASK_ENV = "import json, os; print(json.dumps(dict(os.environ)))"


def _task_environments(slurm, folder, *srun_options):
    """Each task's environment, in task order (one file per task: their lines would interleave on one stream)."""
    slurm.run("srun", f"--output={folder}/env-%t.json", *srun_options, sys.executable, "-c", _TASK_ENV, timeout=120)
    return [json.loads(path.read_text()) for path in sorted(folder.glob("env-*.json"))]


@pytest.mark.parametrize(
    "srun_options, expected",
    [
        (["--ntasks=1", "--gpus-per-node=4"], [[0, 1, 2, 3]]),  # one task per node: all its GPUs
        (["--ntasks=2", "--gpus-per-node=4"], [[0, 1], [2, 3]]),  # tasks sharing the node's GPUs
        (["--ntasks=2", "--gpus-per-task=1"], [[0], [0]]),  # bound by SLURM: the one each sees
        (["--ntasks=2", "--gpus-per-node=4", "--gpu-bind=single:1"], [[0], [0]]),
        (["--ntasks=2", "--gpus-per-task=2"], [[0, 1], [0, 1]]),  # 2 of its own each
    ],
)
def test_slurm_hands_tasks_the_gpus_the_decision_expects(slurm, tmp_path, srun_options, expected):
    """The environments real srun tasks get on a node with GPUs, through launcher_local_device_ids."""
    environments = _task_environments(slurm, tmp_path, *srun_options)
    assert [distributed.launcher_local_device_ids(env) for env in environments] == expected


_START_AND_SAY_GPUS = (
    "import jax; from alexnet_jax.parallel import distributed; distributed.initialize_distributed(); "
    "print(jax.process_index(), jax.config.values['jax_cuda_visible_devices']); jax.distributed.shutdown()"
)


def test_srun_tasks_start_jax_distributed_each_restricted_to_its_share_of_the_gpus(slurm):
    """distributed.initialize_distributed() in 2 real srun tasks of a 4-GPU node: JAX detects the job and
    restricts each process to its 2 GPUs (JAX's own choice would be GPU 0 and GPU 1)."""
    env = dict(child_env(1), SLURM_CONF=slurm.env["SLURM_CONF"])
    done = slurm.run(
        "srun", "--ntasks=2", "--gpus-per-node=4", sys.executable, "-c", _START_AND_SAY_GPUS, env=env, timeout=300
    )
    assert sorted(done.stdout.splitlines()) == ["0 0,1", "1 2,3"], done.stdout + done.stderr


def _sbatch(slurm, tmp_path, workdir, digits, total_steps):
    """Submit the shipped script, its #SBATCH lines overridden for one node of 2 CPUs and 4 GPUs."""
    env = dict(slurm.env, **child_env(2), SLURM_CONF=slurm.env["SLURM_CONF"], PYTHON=sys.executable)
    env["SLURM_LABELIO"] = "1"  # srun prefixes each line with its task: "0: ...", "1: ..."
    output = tmp_path / f"job-{time.monotonic_ns()}.out"
    options = ["--nodes=1", "--ntasks-per-node=2", "--gpus-per-node=4", "--cpus-per-task=1", "--time=15"]
    submitted = slurm.run(
        "sbatch", "--parsable", *options, f"--output={output}", f"--chdir={REPO}",
        SBATCH_SCRIPT, f"--config={os.path.join(REPO, 'configs', 'demo.py')}",
        f"--workdir={workdir}", *_lean_run(digits, total_steps), env=env,
    )  # fmt: skip
    return submitted.stdout.strip().split(";")[0], output


def _wait_for(slurm, job_id, output, pattern, timeout=600):
    deadline = time.monotonic() + timeout
    while True:
        text = output.read_text() if output.exists() else ""
        if re.search(pattern, text):
            return text
        state = slurm.job_state(job_id)
        assert state in ("PENDING", "CONFIGURING", "RUNNING"), f"job {job_id} {state} before {pattern!r}:\n{text}"
        assert time.monotonic() < deadline, f"no {pattern!r} within {timeout} s:\n{text[-3000:]}"
        time.sleep(0.5)


def _wait_until_done(slurm, job_id, output, timeout=600):
    deadline = time.monotonic() + timeout
    while slurm.job_state(job_id) is not None:
        assert time.monotonic() < deadline, f"job {job_id} still there after {timeout} s"
        time.sleep(0.5)
    return output.read_text()


def _of_task(output, task):
    return "".join(re.findall(rf"^ *{task}: (.*\n)", output, flags=re.MULTILINE))


@pytest.mark.slow
def test_slurm_job_trains_stops_on_slurms_signal_with_a_checkpoint_and_resumes(slurm, tmp_path):
    workdir, digits = tmp_path / "run", tmp_path / "digits"
    job_id, output = _sbatch(slurm, tmp_path, workdir, digits, total_steps=20)
    _wait_for(slurm, job_id, output, r"step 2/20")
    # What --signal=TERM@120 does before the time limit: SIGTERM to the job's tasks (not to the batch shell,
    # which --full would signal too: it exits, and SLURM then kills the tasks before they save).
    slurm.run("scancel", "--signal=TERM", job_id)
    first = _wait_until_done(slurm, job_id, output)
    process_0, process_1 = _of_task(first, 0), _of_task(first, 1)
    assert "detected a SLURM job" in process_0 and DEVICE_LINE in process_0, first[-3000:]
    # Each takes its half of the node's 4 GPUs (what JAX restricts it to; left alone it would say 0 and 1).
    assert "GPUs of this process, if it has any: 0,1" in process_0
    assert "GPUs of this process, if it has any: 2,3" in process_1  # said before it knows it is not process 0
    stops = [re.search(r"stopped at step (\d+) on request", text) for text in (process_0, process_1)]
    assert all(stops), first[-3000:]  # a warning: process 1 says it too
    stopped_at = int(stops[0].group(1))
    assert int(stops[1].group(1)) == stopped_at < 20
    assert not re.search(r"step \d+/20|devices:", process_1)  # process 1: warnings and errors only
    assert sorted(os.listdir(workdir / "checkpoints")) == [str(stopped_at)]

    job_id, output = _sbatch(slurm, tmp_path, workdir, digits, total_steps=20)
    second = _wait_until_done(slurm, job_id, output)
    assert re.search(rf"resumed from \S+ at step {stopped_at}\b", _of_task(second, 0)), second[-3000:]
    assert _step_lines(second, 20) == [str(step) for step in range(stopped_at + 1, 21)]
    records = metrics_lib.read_metrics(str(workdir))
    assert [r["step"] for r in records if "train/loss" in r] == list(range(1, 21))
    assert sorted(os.listdir(workdir / "checkpoints")) == sorted({str(stopped_at), "20"})
