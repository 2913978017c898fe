"""Real multi-process runs: two launch.py processes on 127.0.0.1, gloo collectives.

With 2 CPU devices each (pmap) they train the demo, stop together on a SIGTERM sent to
one of them, checkpoint, and resume from the saved step. With 4 each, one 8-device mesh
spans both under the model-parallel schemes, each process feeding its own slice."""

import os
import re
import signal
import socket
import subprocess
import time

import numpy as np
import pytest
from conftest import child_env, launch_command

from alexnet_jax import metrics as metrics_lib

pytestmark = pytest.mark.slow  # the slow lane: pytest tests/ -m slow (README, Set up)


def _free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _start_pair(workdir, digits_dir, total_steps, devices=2, *overrides, batch_size=8, name="process"):
    """Two launch.py processes on 127.0.0.1 (gloo), `devices` CPU devices each, one coordinator."""
    port = _free_port()
    env = child_env(devices)
    processes = []
    for process_id in range(2):
        command = launch_command(
            workdir,
            f"--config.data_dir={digits_dir}",
            *overrides,
            "--config.image_size=64",
            f"--config.batch_size={batch_size}",
            "--config.eval_batch_size=128",
            "--config.log_every_steps=1",
            "--config.eval_every_steps=1000",
            "--config.checkpoint_every_steps=1000",
            f"--config.num_train_steps={total_steps}",
            f"--coordinator_address=127.0.0.1:{port}",
            "--num_processes=2",
            f"--process_id={process_id}",
        )
        log = open(workdir.parent / f"{name}_{process_id}_{time.monotonic_ns()}.log", "w+")  # noqa: SIM115 (outlives this call)
        processes.append((subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env), log))
    return processes


def _output(log):
    log.flush()
    log.seek(0)
    return log.read()


def _wait_all(processes, timeout=400):
    outputs = []
    for process, log in processes:
        process.wait(timeout=timeout)
        outputs.append(_output(log))
        assert process.returncode == 0, outputs[-1][-3000:]
    return outputs


def test_two_processes_train_stop_together_and_resume(tmp_path):
    workdir, digits = tmp_path / "run", tmp_path / "digits"
    processes = _start_pair(workdir, digits, total_steps=5)
    deadline = time.monotonic() + 400
    while "step 2/5" not in _output(processes[0][1]):
        assert time.monotonic() < deadline and processes[0][0].poll() is None, _output(processes[0][1])[-3000:]
        time.sleep(0.5)
    processes[1][0].send_signal(signal.SIGTERM)  # only process 1 is told; both must stop at one step
    first = _wait_all(processes)
    assert "process 0 of 2; 2 local / 4 total devices" in first[0]
    stops = [re.search(r"stopped at step (\d+) on request", output) for output in first]
    assert all(stops), first[0][-3000:]
    stopped_at = int(stops[0].group(1))
    assert int(stops[1].group(1)) == stopped_at < 5

    second = _wait_all(_start_pair(workdir, digits, total_steps=5))
    assert f"at step {stopped_at}" in second[0] and "step 5/5" in second[0]
    assert "resumed from" not in second[1] and "step 5/5" not in second[1]  # process 1: warnings and errors only
    records = metrics_lib.read_metrics(str(workdir))  # written by process 0 alone
    assert [r["step"] for r in records if "train/loss" in r] == list(range(1, 6))
    evals = [r for r in records if "eval/num_examples" in r]
    assert evals and evals[-1]["eval/num_examples"] == 364  # every held-out digit once, over 2 processes
    assert sorted(os.listdir(workdir / "checkpoints")) == sorted({str(stopped_at), "5"})


def _start_mesh_pair(workdir, digits_dir, total_steps, parallelism):
    """Two launch.py processes x 4 CPU devices: one 8-device mesh across them (gloo)."""
    overrides = (f"--config.parallelism={parallelism}", "--config.model_axis=2")
    return _start_pair(workdir, digits_dir, total_steps, 4, *overrides, batch_size=16, name=parallelism)


@pytest.mark.parametrize("parallelism", ["towers", "weird_trick"])
def test_two_hosts_train_a_model_parallel_mesh_checkpoint_resume_and_evaluate(tmp_path, parallelism):
    """towers: each host holds two tower pairs; weird_trick 4x2: the FC layers split within a host."""
    workdir, digits = tmp_path / "run", tmp_path / "digits"
    first = _wait_all(_start_mesh_pair(workdir, digits, 2, parallelism))
    assert "process 0 of 2; 4 local / 8 total devices" in first[0]
    assert sorted(os.listdir(workdir / "checkpoints")) == ["2"]
    second = _wait_all(_start_mesh_pair(workdir, digits, 3, parallelism))
    assert "resumed from" in second[0] and "at step 2" in second[0], second[0][-3000:]
    records = metrics_lib.read_metrics(str(workdir))
    assert [r["step"] for r in records if "train/loss" in r] == [1, 2, 3]
    evals = [r for r in records if "eval/num_examples" in r]
    assert [r["eval/num_examples"] for r in evals] == [364, 364]  # every held-out digit once, over two hosts
    assert all(np.isfinite(r["train/loss"]) for r in records if "train/loss" in r)
