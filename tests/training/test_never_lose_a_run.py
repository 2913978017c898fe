"""Never lose a run, part two, with real launch.py processes: one writer per workdir, damaged
checkpoints set aside, a full disk named in one line, changed settings on resume named."""

import json
import logging
import os
import re
import signal
import subprocess
import time

import pytest
from conftest import OutputReader, _command, _run, child_env, mounted_tmpfs

from alexnet_jax import config as config_lib
from alexnet_jax.reporting import metrics as metrics_lib
from alexnet_jax.training import loop


def _train_steps(workdir):
    return [r["step"] for r in metrics_lib.read_metrics(str(workdir)) if "train/loss" in r]


def _largest_file(directory):
    files = [os.path.join(root, name) for root, _, names in os.walk(directory) for name in names]
    return max(files, key=os.path.getsize)


@pytest.mark.slow
def test_one_writer_per_workdir_and_a_damaged_checkpoint_set_aside(image_folder, tmp_path):
    """A second launch on a held workdir stops at once and the first finishes alone; then bytes
    overwritten in the newest checkpoint make the next launch resume from the one before."""
    workdir = tmp_path / "run"
    steps = ["--config.checkpoint_every_steps=2", "--config.schedule=constant"]
    first = subprocess.Popen(
        _command(workdir, image_folder, "--config.num_train_steps=4", *steps),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=child_env(2),
    )
    reader = OutputReader(first.stdout)
    reader.wait_for(r"step 1/4")
    first.send_signal(signal.SIGSTOP)  # paused, not gone: it must still be running when the second one looks
    try:
        started = time.monotonic()
        second = _run(workdir, image_folder, "--config.num_train_steps=4", *steps, timeout=120)
    finally:
        first.send_signal(signal.SIGCONT)
    assert second.returncode == 2, second.stderr[-2000:]
    errors = [line for line in second.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "in use by another run" in errors[0] and f"pid {first.pid}" in errors[0], second.stderr
    assert "Traceback" not in second.stderr and "training paper AlexNet" not in second.stdout  # before compiling
    assert time.monotonic() - started < 60
    first.wait(timeout=300)
    output = reader.rest()
    assert first.returncode == 0, output[-2000:]
    assert _train_steps(workdir) == [1, 2, 3, 4]  # every step once: nobody else wrote
    assert not (workdir / "run.lock").exists()  # released at exit

    damaged = _largest_file(workdir / "checkpoints" / "4")
    with open(damaged, "r+b") as handle:  # 4 KB of random bytes in the middle of the largest data file
        handle.seek(os.path.getsize(damaged) // 2)
        handle.write(os.urandom(4096))
    resumed = _run(workdir, image_folder, "--config.num_train_steps=5", *steps)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    console = resumed.stdout + resumed.stderr
    assert re.search(r"resumed from .* at step 2", console), console[-3000:]
    assert re.search(r"checkpoint 4 .* is damaged: .* does not match", console), console[-3000:]
    aside = [name for name in os.listdir(workdir / "checkpoints") if name.startswith("4.corrupt")]
    assert len(aside) == 1  # moved aside, not deleted
    assert "diverged" not in console
    assert _train_steps(workdir) == [1, 2, 3, 4, 5]  # steps 3 and 4 redone once, their old records moved aside


@pytest.fixture
def tiny_disk(tmp_path):
    """A 4 MB file system: room for the lock, config.json and metrics, not for a 250 MB checkpoint."""
    with mounted_tmpfs(tmp_path / "tiny", "size=4m", without="; the Checkpointer tests cover it") as mount:
        yield mount


def test_a_full_disk_stops_the_run_with_one_line(image_folder, tiny_disk):
    workdir = tiny_disk / "run"
    result = _run(workdir, image_folder, "--config.num_train_steps=2", "--config.checkpoint_every_steps=1")
    assert result.returncode == 2, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr[-3000:]
    assert "No space left on device" in errors[0] and str(workdir / "checkpoints") in errors[0]
    assert "free" in errors[0] and "needs about" in errors[0]
    assert "Traceback" not in result.stderr
    assert "oneDNN" not in result.stderr and "InitializeLog" not in result.stderr  # TensorFlow's C++ notices
    assert not [name for name in os.listdir(workdir / "checkpoints") if "tmp" in name]  # the half-written save is gone
    assert not (workdir / "run.lock").exists()


def test_a_resume_with_changed_settings_names_each_change(caplog):
    config = config_lib.base_config()
    recorded = json.loads(config.to_json_best_effort())  # as config.json holds it
    info = {"config": {**recorded, "batch_size": 64, "seed": 3}, "process_count": 1}
    resume = loop.Resume(step=5, meta={}, info=info)
    config.log_every_steps = 7  # changes nothing the steps compute
    with caplog.at_level(logging.WARNING, logger="alexnet_jax.training.loop"):
        changed = resume.warn_changed_settings(config, process_count=2)
    assert changed == ["batch_size 64 -> 128", "process_count 1 -> 2", "seed 3 -> 0"]
    assert "exact resume no longer holds" in caplog.text and "batch_size 64 -> 128" in caplog.text
    assert len(caplog.records) == 1
    same = loop.Resume(step=5, meta={}, info={"config": json.loads(config.to_json_best_effort()), "process_count": 2})
    assert same.warn_changed_settings(config, process_count=2) == []
