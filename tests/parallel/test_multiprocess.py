"""Real multi-process runs: two launch.py processes on 127.0.0.1, gloo collectives.

With 2 CPU devices each (pmap) they train the demo, stop together on a SIGTERM sent to
one of them, checkpoint, and resume from the saved step. With 4 each, one 8-device mesh
spans both under the model-parallel schemes, each process feeding its own slice."""

import contextlib
import os
import re
import signal
import socket
import subprocess
import textwrap
import time

import numpy as np
import pytest
from conftest import NARROW_FC, child_env, launch_command

from alexnet_jax.reporting import metrics as metrics_lib

pytestmark = pytest.mark.slow  # the slow lane: pytest tests/ -m slow (README, Set up)


def _free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _start_pair(workdir, digits_dir, total_steps, devices=2, *overrides, batch_size=8, name="process", wrap=None):
    """Two launch.py processes on 127.0.0.1 (gloo), `devices` CPU devices each, one coordinator.

    wrap: {process_id: script} runs that process's launch.py through `script` (which runs it in turn)."""
    port = _free_port()
    env = child_env(devices)
    processes = []
    for process_id in range(2):
        command = launch_command(
            workdir,
            f"--config.data_dir={digits_dir}",
            "--config.image_size=64",
            NARROW_FC,
            f"--config.batch_size={batch_size}",
            "--config.eval_batch_size=128",
            "--config.log_every_steps=1",
            "--config.eval_every_steps=1000",
            "--config.checkpoint_every_steps=1000",
            f"--config.num_train_steps={total_steps}",
            f"--coordinator_address=127.0.0.1:{port}",
            "--num_processes=2",
            f"--process_id={process_id}",
            *overrides,  # last, so that they win
        )
        if wrap and process_id in wrap:
            command[2:2] = [str(wrap[process_id])]  # python -u SCRIPT launch.py ...
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


# At 128 fc units a step is short enough that a 5-step run could end before the request arrived.
STOP_RUN_STEPS = 12


def test_two_processes_train_stop_together_and_resume(tmp_path):
    """Process 1 alone gets SIGTERM after step 2; both stop at one step before the last; the pair resumes there."""
    workdir, digits = tmp_path / "run", tmp_path / "digits"
    processes = _start_pair(workdir, digits, total_steps=STOP_RUN_STEPS)
    deadline = time.monotonic() + 400
    while f"step 2/{STOP_RUN_STEPS}" not in _output(processes[0][1]):
        assert time.monotonic() < deadline and processes[0][0].poll() is None, _output(processes[0][1])[-3000:]
        time.sleep(0.1)
    processes[1][0].send_signal(signal.SIGTERM)  # only process 1 is told; both must stop at one step
    first = _wait_all(processes)
    assert "process 0 of 2; 2 local / 4 total devices" in first[0]
    stops = [re.search(r"stopped at step (\d+) on request", output) for output in first]
    assert all(stops), first[0][-3000:]
    stopped_at = int(stops[0].group(1))
    assert int(stops[1].group(1)) == stopped_at < STOP_RUN_STEPS

    second = _wait_all(_start_pair(workdir, digits, total_steps=STOP_RUN_STEPS))
    assert f"at step {stopped_at}" in second[0] and f"step {STOP_RUN_STEPS}/{STOP_RUN_STEPS}" in second[0]
    # process 1 logs warnings and errors only
    assert "resumed from" not in second[1] and f"step {STOP_RUN_STEPS}/{STOP_RUN_STEPS}" not in second[1]
    records = metrics_lib.read_metrics(str(workdir))  # written by process 0 alone
    assert [r["step"] for r in records if "train/loss" in r] == list(range(1, STOP_RUN_STEPS + 1))
    evals = [r for r in records if "eval/num_examples" in r]
    assert evals and evals[-1]["eval/num_examples"] == 364  # every held-out digit once, over 2 processes
    assert sorted(os.listdir(workdir / "checkpoints")) == sorted({str(stopped_at), str(STOP_RUN_STEPS)})


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


def _wrapper(path, patch):
    """A script that applies `patch` (Python source) in the process, then runs launch.py (its first argument)."""
    runner = "\nimport runpy, sys\nsys.argv = sys.argv[1:]\nrunpy.run_path(sys.argv[0], run_name='__main__')\n"
    path.write_text(textwrap.dedent(patch) + runner)
    return path


# A process that hangs alive: its main thread waits for ever before the 5th step's batch, while its
# threads (JAX's heartbeat, the watchdog's pulse) go on.
_HANG = """
    import threading
    from alexnet_jax.training import loop

    original, calls = loop.Meter.next_batch, [0]

    def next_batch(self, batches):
        calls[0] += 1
        if calls[0] == 5:
            print("hanging now", flush=True)
            threading.Event().wait()
        return original(self, batches)

    loop.Meter.next_batch = next_batch
"""

# Short bounds for the test (the defaults are 60, 120 and 100 s); the heartbeat stays above the peer timeout.
_BOUNDS = ("--config.peer_timeout_s=10", "--config.step_timeout_s=20", "--config.heartbeat_timeout_s=40")


def _last_line(output):
    return [line for line in output.splitlines() if line.strip()][-1]


@pytest.mark.parametrize("fault", ["SIGKILL", "SIGSTOP", "hang"])
def test_a_lost_or_hung_process_ends_the_job_in_one_line_and_a_relaunch_resumes(tmp_path, fault):
    """Process 1 is killed, stopped, or hangs alive after step 4: process 0 (and a living process 1) exit
    within the configured bound, the last line saying what happened, what to do and the step to resume from;
    no traceback, no C++ dump of JAX's heartbeat abort. The relaunched pair resumes from that checkpoint."""
    workdir, digits = tmp_path / "run", tmp_path / "digits"
    common = ("--config.checkpoint_every_steps=2", *_BOUNDS)
    wrap = None
    if fault == "hang":
        wrap = {1: _wrapper(tmp_path / "hang.py", _HANG)}
    processes = _start_pair(workdir, digits, 12, 2, *common, name=fault, wrap=wrap)
    (first, log0), (second, log1) = processes
    deadline = time.monotonic() + 400
    while not re.search(r"step [4-9]/12|step 1\d/12", _output(log0)):
        assert time.monotonic() < deadline and first.poll() is None, _output(log0)[-3000:]
        time.sleep(0.2)
    started = time.monotonic()
    if fault != "hang":
        second.send_signal(getattr(signal, fault))
    try:
        first.wait(timeout=120)
        took = time.monotonic() - started
    finally:
        if fault == "hang":  # alive: it must stop by itself
            with contextlib.suppress(subprocess.TimeoutExpired):
                second.wait(timeout=60)
        if fault != "SIGKILL":
            second.kill()
            second.wait()
    output = _output(log0)
    assert first.returncode == 75, output[-3000:]  # watchdog.EXIT_LOST
    assert took < 40, took  # within the heartbeat timeout: the watchdog, not JAX's abort, ended it
    line = _last_line(output)
    print(f"{fault}: process 0 exited {first.returncode} {took:.1f} s after the fault; its last line: {line}")
    why = "no training progress" if fault == "hang" else "process 1 of 2 has not answered"
    assert line.startswith("error: ") and why in line, output[-3000:]
    resumed_from = int(re.search(r"resumes from step (\d+), the newest complete checkpoint", line).group(1))
    assert resumed_from >= 2 and str(resumed_from) in os.listdir(workdir / "checkpoints")
    assert "Traceback" not in output and "Terminating process" not in output and "client.h" not in output
    if fault == "hang":  # the living process 1 stopped too, in one line (its own step clock, or process 0's news)
        assert second.returncode == 75 and _last_line(_output(log1)).startswith("error: "), _output(log1)[-3000:]

    again = _wait_all(_start_pair(workdir, digits, 12, 2, *common, name=f"{fault}_again"))
    assert f"at step {resumed_from}" in again[0] and "step 12/12" in again[0]
    records = metrics_lib.read_metrics(str(workdir))
    assert {r["step"] for r in records if "train/loss" in r} == set(range(1, 13))


_SLOW_PREPARATION = """
    import time
    from alexnet_jax.data import sources

    original = sources._prepare

    def slow_prepare(*args, **kwargs):
        time.sleep(15)
        return original(*args, **kwargs)

    sources._prepare = slow_prepare
"""


def test_two_processes_prepare_imagenet_once_and_both_train(tmp_path):
    """One shared data_dir, the miniature ILSVRC tars: process 0 prepares, process 1 says why it waits,
    then both read the records, train, and count every validation image once."""
    from conftest import NUM_VAL, write_ilsvrc_tars

    manual, data_dir = write_ilsvrc_tars(tmp_path / "manual"), tmp_path / "tfds"
    overrides = ("--config.dataset=imagenet2012", f"--config.data_dir={data_dir}", f"--config.manual_dir={manual}")
    # Process 0 takes its time before it prepares, so that process 1 surely finds nothing prepared yet.
    slow = _wrapper(tmp_path / "slow.py", _SLOW_PREPARATION)
    pair = _start_pair(tmp_path / "run", tmp_path / "unused", 2, 2, *overrides, name="imagenet", wrap={0: slow})
    outputs = _wait_all(pair)
    preparing = [output.count("preparing TFDS dataset imagenet2012") for output in outputs]
    assert preparing == [1, 0], outputs[1][-3000:]
    assert "Downloading and preparing dataset" not in outputs[1]  # TFDS's own words: it prepared nothing there
    assert "process 1 waits for process 0 to prepare imagenet2012" in outputs[1]
    assert "step 2/2" in outputs[0]
    evals = [r for r in metrics_lib.read_metrics(str(tmp_path / "run")) if "eval/num_examples" in r]
    assert [r["eval/num_examples"] for r in evals] == [NUM_VAL]  # every validation image once, over 2 processes
