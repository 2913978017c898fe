"""Never lose a run: real subprocess runs of launch.py stopped with SIGTERM and SIGKILL,
bitwise exact resume, the divergence stop, checkpoints across device counts."""

import json
import os
import re
import signal
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import (
    _finish,
    _restore_arrays,
    _run,
    _start,
    _train_records,
    _wait_for_line,
    assert_trees_equal,
)

from alexnet_jax import config as config_lib
from alexnet_jax.checkpointing import checkpoint as checkpoint_lib
from alexnet_jax.reporting import metrics as metrics_lib
from alexnet_jax.step import optim, steps


def test_sigterm_stops_with_a_checkpoint_and_resume_is_bitwise_exact(image_folder, tmp_path):
    steps = ["--config.num_train_steps=5", "--config.checkpoint_every_steps=100"]
    straight = _start(tmp_path / "straight", image_folder, *steps)  # alongside: the two overlap well
    interrupted = tmp_path / "interrupted"
    process = _start(interrupted, image_folder, *steps)
    _wait_for_line(process, r"step 3/5")
    process.send_signal(signal.SIGTERM)
    output = _finish(process, timeout=120)
    assert process.returncode == 0, output[-2000:]
    match = re.search(r"stopped at step (\d+) on request", output)
    assert match, output[-2000:]
    stopped_at = int(match.group(1))
    assert 2 <= stopped_at < 5
    assert checkpoint_lib.Checkpointer(str(interrupted)).latest_step() == stopped_at

    straight_output = _finish(straight)
    assert straight.returncode == 0, straight_output[-2000:]
    resumed = _run(interrupted, image_folder, *steps)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"at step {stopped_at}" in resumed.stdout
    assert "exact resume no longer holds" not in resumed.stdout + resumed.stderr  # same settings

    a, b = _restore_arrays(tmp_path / "straight", 5), _restore_arrays(interrupted, 5)
    assert len(jax.tree_util.tree_leaves(a)) > 10  # params and momentum
    assert_trees_equal(b, a)  # bitwise
    keys = ("train/loss", "train/top1_acc", "train/top5_acc", "train/grad_norm", "train/learning_rate")
    per_step_a = [(r["step"], [r[k] for k in keys]) for r in _train_records(tmp_path / "straight")]
    per_step_b = [(r["step"], [r[k] for k in keys]) for r in _train_records(interrupted)]
    assert per_step_a == per_step_b
    assert [s for s, _ in per_step_a] == [1, 2, 3, 4, 5]


@pytest.mark.slow
def test_sigkill_mid_run_restarts_from_the_newest_complete_checkpoint_on_another_device_count(image_folder, tmp_path):
    """Killed on 2 devices while asynchronous saves run every step; resumed on 1 device."""
    workdir = tmp_path / "run"
    steps = ["--config.num_train_steps=5", "--config.checkpoint_every_steps=1"]
    process = _start(workdir, image_folder, *steps, devices=2)
    _wait_for_line(process, r"step 3/5")
    time.sleep(0.3)  # somewhere inside the next step or its save
    process.kill()
    process.wait(timeout=60)
    killed_at = max(r["step"] for r in _train_records(workdir))

    resumed = _run(workdir, image_folder, *steps, devices=1)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    match = re.search(r"resumed from .* at step (\d+)", resumed.stdout)
    assert match, resumed.stdout[-2000:]
    assert 1 <= int(match.group(1)) <= killed_at
    assert "1 local / 1 total devices" in resumed.stdout
    assert "took over" in resumed.stdout + resumed.stderr  # the killed run's lock: its process is gone
    # every step logged exactly once; the redone steps' old records were moved aside, not lost
    assert [r["step"] for r in _train_records(workdir)] == list(range(1, 6))
    listing = os.listdir(workdir / "checkpoints")
    assert "5" in listing and not [name for name in listing if "tmp" in name]


def test_divergence_stops_with_the_step_and_no_bad_checkpoint(image_folder, tmp_path):
    workdir = tmp_path / "run"
    result = _run(
        workdir,
        image_folder,
        "--config.num_train_steps=4",
        "--config.learning_rate=1e9",
        "--config.checkpoint_every_steps=1",
    )
    assert result.returncode != 0
    match = re.search(r"training diverged at step (\d+)", result.stderr)
    assert match, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    bad_step = int(match.group(1))
    saved = [int(name) for name in os.listdir(workdir / "checkpoints") if name.isdigit()]
    assert all(step < bad_step for step in saved)
    for step in saved:  # and what was saved is finite
        leaves = jax.tree_util.tree_leaves(_restore_arrays(workdir, step))
        assert all(np.all(np.isfinite(leaf)) for leaf in leaves if leaf.dtype.kind == "f")


def test_a_workdir_of_another_model_is_refused_before_compiling(image_folder, tmp_path):
    workdir = tmp_path / "run"
    state = {"w": jnp.zeros(3)}
    checkpointer = checkpoint_lib.Checkpointer(str(workdir))
    checkpointer.save(1, state, {"model": "paper", "num_classes": 3, "optimizer": "sgd"})
    checkpointer.close()
    result = _run(workdir, image_folder, "--config.model=torchvision")
    assert result.returncode == 2
    assert "different model" in result.stderr and "model='paper' (now 'torchvision')" in result.stderr


def _small_state():
    """A real TrainState with the project's optimizer over a few AlexNet-named layers: small enough
    that replicating it on 8 devices and saving it twice takes a moment, not 20 s."""
    config = config_lib.base_config()
    rng = np.random.default_rng(0)
    shapes = {"conv1": (11, 11, 3, 8), "fc6": (72, 16), "fc8": (16, 3)}
    params = {
        name: {"kernel": jnp.asarray(rng.normal(size=shape), jnp.float32), "bias": jnp.ones(shape[-1], jnp.float32)}
        for name, shape in shapes.items()
    }
    tx = optim.make_optimizer(config, optim.make_schedule(config, 10, 100))
    return steps.TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))


def test_checkpoints_restore_across_device_counts(tmp_path):
    """One device -> replicated on 8 (as the pmap'ed step leaves it) -> one device again."""
    state = _small_state().replace(step=jnp.int32(5))
    replicated = jax.sharding.NamedSharding(
        jax.sharding.Mesh(np.array(jax.devices()), ("batch",)), jax.sharding.PartitionSpec()
    )
    single = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    checkpointer = checkpoint_lib.Checkpointer(str(tmp_path))
    checkpointer.save(5, state, {"model": "paper"})
    checkpointer.wait()
    on_eight = checkpointer.restore(5, jax.tree_util.tree_map(lambda x: jax.device_put(x, replicated), state))
    assert len(on_eight.params["fc6"]["kernel"].sharding.device_set) == 8
    checkpointer.save(6, on_eight.replace(step=jnp.int32(6)), {"model": "paper"})
    checkpointer.wait()
    on_one = checkpointer.restore(6, jax.tree_util.tree_map(lambda x: jax.device_put(x, single), state))
    checkpointer.close()
    assert int(on_one.step) == 6
    assert on_one.params["fc6"]["kernel"].sharding.device_set == {jax.devices()[0]}
    for a, b in zip(jax.tree_util.tree_leaves(on_one.params), jax.tree_util.tree_leaves(state.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_keeps_the_newest_and_the_best(tmp_path):
    checkpointer = checkpoint_lib.Checkpointer(str(tmp_path), keep=2)
    for step, accuracy in [(1, 0.2), (2, 0.9), (3, 0.5), (4, None), (5, 0.4)]:
        metrics = None if accuracy is None else {"eval/top1_acc": accuracy}
        checkpointer.save(step, {"w": jnp.full(2, step)}, {"model": "paper"}, metrics=metrics)
        checkpointer.wait()
    assert sorted(checkpointer.all_steps()) == [2, 4, 5]
    checkpointer.close()


def test_roll_back_moves_records_aside(tmp_path):
    writer = metrics_lib.MetricWriter(str(tmp_path))
    for step in range(1, 6):
        writer.write(step, {"train/loss": float(step)})
    writer.close()
    with open(tmp_path / "metrics.jsonl", "a") as handle:
        handle.write('{"step": 6, "train/lo')  # cut short by a kill
    assert metrics_lib.roll_back(str(tmp_path), 3) == 3
    assert [r["step"] for r in metrics_lib.read_metrics(str(tmp_path))] == [1, 2, 3]
    with open(tmp_path / "metrics.rolled_back.jsonl") as handle:
        moved = handle.read().splitlines()
    assert [json.loads(line)["step"] for line in moved[:2]] == [4, 5] and len(moved) == 3
