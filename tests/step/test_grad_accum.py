"""Gradient accumulation (config.grad_accum_steps) on 8 fake devices: one update from N micro-batches.

Without dropout, N = 4 micro-batches of 2 give the update of the whole per-device batch of 8,
to float32 tolerance: parameters, momentum and loss, over two steps. With dropout, every
micro-batch draws its own masks: the step equals an unrolled loop that folds the micro-batch
index into the dropout key, and differs from one that shares a key.
"""

import functools
import json
import runpy

import jax
import numpy as np
import optax
import pytest
from conftest import REPO, TEST_HIDDEN_UNITS, assert_trees_close, assert_trees_equal

from alexnet_jax import config as config_lib
from alexnet_jax.errors import UserError
from alexnet_jax.model import build
from alexnet_jax.parallel import distributed
from alexnet_jax.step import optim, steps

IMAGE_SIZE, CLASSES, DEVICES, PER_DEVICE, ACCUM = 64, 5, 8, 8, 4
HIDDEN = TEST_HIDDEN_UNITS  # fc6/fc7 units: accumulation's arithmetic is the same at the paper's 4096


def _setup(dropout_rate):
    config = config_lib.base_config()
    config.dropout_rate = dropout_rate
    config.init = "modern"
    config.input_scale = "standardized"
    config.hidden_units = HIDDEN
    config.learning_rate = 2e-4  # the loss falls over both steps; larger rates leave the model in a chaotic regime
    model = build.create_model(config, CLASSES)
    schedule = optim.make_schedule(config, steps_per_epoch=10, total_steps=100)
    tx = optim.make_optimizer(config, schedule)
    return model, tx, schedule, steps.init_state(model, tx, jax.random.key(0), IMAGE_SIZE)


def _batch(seed):
    """[devices, per_device, ...] as the input pipeline ships it: uint8 pixels, labels, colour offsets."""
    rng = np.random.default_rng(seed)
    batch = {
        "images": rng.integers(0, 256, (DEVICES * PER_DEVICE, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8),
        "labels": rng.integers(0, CLASSES, (DEVICES * PER_DEVICE,)).astype(np.int32),
        "color": rng.normal(0, 0.02, (DEVICES * PER_DEVICE, 3)).astype(np.float32),
    }
    return distributed.shard_to_devices({k: v.reshape((DEVICES, PER_DEVICE) + v.shape[1:]) for k, v in batch.items()})


def _pmapped(fn):
    return jax.pmap(fn, axis_name=distributed.AXIS, in_axes=(None, 0, None), out_axes=None)


def _two_steps(p_step, state):
    rng = jax.random.key(7)
    state, first = p_step(state, _batch(1), rng)
    state, second = p_step(state, _batch(2), rng)
    return jax.device_get((state, first, second))


def _max_diffs(actual, desired):
    """(max |a - d|, max |a - d| / max |d|) over the leaves of two trees."""
    leaves = zip(jax.tree_util.tree_leaves(actual), jax.tree_util.tree_leaves(desired))
    pairs = [(np.asarray(a), np.asarray(d)) for a, d in leaves]
    absolute = max(float(np.max(np.abs(a - d))) for a, d in pairs)
    relative = max(float(np.max(np.abs(a - d)) / max(float(np.max(np.abs(d))), 1e-30)) for a, d in pairs)
    return absolute, relative


@pytest.fixture(scope="module")
def no_dropout():
    return _setup(dropout_rate=0.0)


def test_four_micro_batches_give_the_full_batch_update(no_dropout):
    assert jax.local_device_count() == DEVICES
    model, tx, schedule, state = no_dropout
    step = functools.partial(steps.train_step, model=model, tx=tx, schedule=schedule)
    full, full_first, full_second = _two_steps(_pmapped(step), state)
    accum, accum_first, accum_second = _two_steps(_pmapped(functools.partial(step, grad_accum_steps=ACCUM)), state)
    assert int(accum.step) == int(full.step) == 2  # two updates, not eight
    params = _max_diffs(accum.params, full.params)
    moved = _max_diffs(full.params, state.params)[0]
    momentum = _max_diffs(accum.opt_state, full.opt_state)
    losses = [(float(a["loss"]), float(f["loss"])) for a, f in ((accum_first, full_first), (accum_second, full_second))]
    figures = {
        "params_max_abs_diff": params[0],
        "params_max_rel_diff": params[1],
        "params_moved_max_abs": moved,
        "momentum_max_abs_diff": momentum[0],
        "momentum_max_rel_diff": momentum[1],
        "loss_max_abs_diff": max(abs(a - f) for a, f in losses),
        "loss_max_rel_diff": max(abs(a - f) / abs(f) for a, f in losses),
    }
    print("grad_accum equivalence:", json.dumps(figures))  # the closing note's figures (pytest -s)
    assert moved > 1e-4  # the steps did update
    assert_trees_close(accum.params, full.params, rtol=2e-4, atol=2e-6)
    assert_trees_close(accum.opt_state, full.opt_state, rtol=2e-4, atol=2e-6)
    for a, f in losses:
        np.testing.assert_allclose(a, f, rtol=1e-5)
    for a, f in ((accum_first, full_first), (accum_second, full_second)):
        np.testing.assert_allclose(float(a["grad_norm"]), float(f["grad_norm"]), rtol=1e-4)
        # Accuracy over the whole batch of 64 (of 8 x 8), not over one micro-batch: steps of 1/64.
        assert abs(float(a["top1_acc"]) - float(f["top1_acc"])) <= 1 / 64 + 1e-6
        assert float(a["learning_rate"]) == float(f["learning_rate"])


def _micro_gradients(state, batch, rng, index, key_index, *, model):
    """Micro-batch `index` of every device's slice, its gradients averaged over the devices (under pmap).

    The accumulation written out by hand, one micro-batch per call: its dropout key is
    fold_in(the step's key, key_index).
    """
    size = PER_DEVICE // ACCUM
    micro = jax.tree_util.tree_map(lambda value: jax.lax.dynamic_slice_in_dim(value, index * size, size), batch)
    key = jax.random.fold_in(steps.dropout_key(rng, state.step), key_index)
    grads, _ = steps.batch_gradients(state.params, micro, key, model=model, augment=None)
    return jax.lax.pmean(grads, distributed.AXIS)


def test_with_dropout_each_micro_batch_draws_its_own_masks():
    model, tx, schedule, state = _setup(dropout_rate=0.5)
    batch, rng = _batch(3), jax.random.key(11)
    step = functools.partial(steps.train_step, model=model, tx=tx, schedule=schedule, grad_accum_steps=ACCUM)
    accum, _ = jax.device_get(_pmapped(step)(state, batch, rng))
    p_micro = jax.pmap(
        functools.partial(_micro_gradients, model=model),
        axis_name=distributed.AXIS,
        in_axes=(None, 0, None, None, None),
        out_axes=None,
    )

    def apply(grads, params, opt_state):
        return optax.apply_updates(params, tx.update(grads, opt_state, params)[0])

    apply = jax.jit(apply)
    updated = {}
    for keys in ("own", "shared"):  # each micro-batch's key folds in its index, or all fold in 0
        total = None
        for index in range(ACCUM):  # one micro-batch at a time: one gradient tree per device in memory
            grads = jax.device_get(p_micro(state, batch, rng, index, index if keys == "own" else 0))
            total = grads if total is None else jax.tree_util.tree_map(np.add, total, grads)
        mean = jax.tree_util.tree_map(lambda g: g / ACCUM, total)
        updated[keys] = jax.device_get(apply(mean, state.params, state.opt_state))
    assert_trees_close(accum.params, updated["own"], rtol=2e-4, atol=2e-6)
    # One key shared by the micro-batches is another update, far outside that tolerance.
    own, shared = _max_diffs(accum.params, updated["own"]), _max_diffs(accum.params, updated["shared"])
    assert shared[0] > 100 * max(own[0], 1e-9)


def test_the_per_device_batch_must_divide_into_micro_batches():
    config = config_lib.base_config()
    config.batch_size = 64  # 8 per device on 8 devices
    config.grad_accum_steps = 4
    config_lib.validate(config, device_count=8)
    config.grad_accum_steps = 3
    with pytest.raises(UserError, match=r"config.grad_accum_steps=3 .* 8 examples per device"):
        config_lib.validate(config, device_count=8)
    config.grad_accum_steps = 0
    with pytest.raises(UserError, match=r"config.grad_accum_steps=0 must be at least 1"):
        config_lib.validate(config, device_count=8)


@pytest.mark.slow
def test_a_run_counts_updates_and_resumes_bitwise_exactly(image_folder, tmp_path):
    """launch.py with grad_accum_steps=2 on 2 devices: log, learning rate and checkpoints count updates, and a
    run resumed at update 2 ends bitwise where the straight run does."""
    from conftest import _finish, _restore_arrays, _run, _start, _train_records

    from alexnet_jax.checkpointing import checkpoint

    # 18 training images, batch 8: 2 updates an epoch; the warmup moves the learning rate every update.
    settings = ["--config.grad_accum_steps=2", "--config.checkpoint_every_steps=2", "--config.schedule=step"]
    settings += ["--config.warmup_epochs=1.0"]
    straight = _start(tmp_path / "straight", image_folder, *settings, "--config.num_train_steps=4")
    # The same first update without accumulation: the demo's dropout draws other masks, so another loss.
    unaccumulated = ["--config.grad_accum_steps=1", "--config.num_train_steps=1"]
    single = _start(tmp_path / "single", image_folder, *settings, *unaccumulated)
    first = _run(tmp_path / "resumed", image_folder, *settings, "--config.num_train_steps=2")
    assert first.returncode == 0, first.stderr[-2000:]
    output, single_output = _finish(straight), _finish(single)
    assert straight.returncode == 0, output[-2000:]
    assert single.returncode == 0, single_output[-2000:]
    second = _run(tmp_path / "resumed", image_folder, *settings, "--config.num_train_steps=4")
    assert second.returncode == 0, second.stderr[-2000:]
    assert "at step 2" in second.stdout and "exact resume no longer holds" not in second.stdout + second.stderr

    assert checkpoint.Checkpointer(str(tmp_path / "straight")).all_steps() == [2, 4]
    assert_trees_equal(_restore_arrays(tmp_path / "resumed", 4), _restore_arrays(tmp_path / "straight", 4))
    keys = ("train/loss", "train/top1_acc", "train/grad_norm", "train/learning_rate")
    records = {
        name: [[r["step"], *(r[k] for k in keys)] for r in _train_records(tmp_path / name)]
        for name in ("straight", "resumed")
    }
    assert records["straight"] == records["resumed"]
    assert [record[0] for record in records["straight"]] == [1, 2, 3, 4]
    [single_record] = _train_records(tmp_path / "single")
    assert single_record["train/loss"] != records["straight"][0][1]  # the run did accumulate
    np.testing.assert_allclose(single_record["train/loss"], records["straight"][0][1], rtol=0.2)
    config = runpy.run_path(f"{REPO}/configs/demo.py")["get_config"]()
    config.update(schedule="step", warmup_epochs=1.0, batch_size=8)
    schedule = optim.make_schedule(config, steps_per_epoch=2, total_steps=4)
    np.testing.assert_allclose([r[-1] for r in records["straight"]], [float(schedule(s)) for s in range(4)], rtol=1e-6)
