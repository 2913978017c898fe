import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import TEST_HIDDEN_UNITS, assert_trees_close

from alexnet_jax import config as config_lib
from alexnet_jax.model import build, preprocess
from alexnet_jax.parallel import distributed, schemes
from alexnet_jax.reporting import metrics as metrics_lib
from alexnet_jax.step import optim, steps

IMAGE_SIZE = 64
NUM_CLASSES = 5
HIDDEN = TEST_HIDDEN_UNITS  # fc6/fc7 units: the step's arithmetic is the same at the paper's 4096


def _config(dropout_rate=0.0, learning_rate=0.01, input_scale="standardized"):
    config = config_lib.base_config()
    config.dropout_rate = dropout_rate
    config.learning_rate = learning_rate
    config.init = "modern"  # He init with standardized inputs: the demo's recipe
    config.input_scale = input_scale
    config.hidden_units = HIDDEN
    return config


def _optimizer(config):
    schedule = optim.make_schedule(config, steps_per_epoch=10, total_steps=100)
    return optim.make_optimizer(config, schedule), schedule


def _setup(**settings):
    config = _config(**settings)
    model = build.create_model(config, NUM_CLASSES)
    tx, schedule = _optimizer(config)
    state = steps.init_state(model, tx, jax.random.key(0), IMAGE_SIZE)
    return model, tx, schedule, state


def _batch(global_batch, seed=0):
    """What the input pipeline ships: uint8 pixels, labels, and a PCA colour offset per image."""
    rng = np.random.default_rng(seed)
    return {
        "images": rng.integers(0, 256, size=(global_batch, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8),
        "labels": rng.integers(0, NUM_CLASSES, size=(global_batch,)).astype(np.int32),
        "color": rng.normal(0, 0.02, size=(global_batch, 3)).astype(np.float32),
    }


def _per_device(batch, devices):
    return {k: v.reshape((devices, -1) + v.shape[1:]) for k, v in batch.items()}


@pytest.fixture(scope="module")
def plain():
    """The demo's recipe without dropout, initialised once for the tests that only read its state."""
    return _setup()


@pytest.fixture(scope="module")
def with_dropout():
    return _setup(dropout_rate=0.5)


@pytest.fixture(scope="module")
def eight_device_step(plain):
    """One pmap'ed step over all 8 devices from the shared state, and the shapes the step function saw."""
    model, tx, schedule, state = plain
    seen = {}

    def spy(state, batch, rng):
        seen["images"] = batch["images"].shape
        seen["labels"] = batch["labels"].shape
        return steps.train_step(state, batch, rng, model=model, tx=tx, schedule=schedule)

    p_step = jax.pmap(spy, axis_name=distributed.AXIS, in_axes=(None, 0, None), out_axes=None)
    new_state, metrics = p_step(state, distributed.shard_to_devices(_per_device(_batch(16), 8)), jax.random.key(1))
    seen["state_devices"] = len(new_state.params["fc8"]["kernel"].sharding.device_set)
    # one host copy kept for the module, not 8 device copies of the parameters and their momentum
    return jax.device_get(new_state), jax.device_get(metrics), seen


def test_eight_devices_give_the_one_device_update(plain, eight_device_step):
    assert jax.local_device_count() == 8
    model, tx, schedule, state = plain
    state_8, metrics_8, _ = eight_device_step
    step = functools.partial(steps.train_step, model=model, tx=tx, schedule=schedule)
    one_device = jax.pmap(
        step, axis_name=distributed.AXIS, in_axes=(None, 0, None), out_axes=None, devices=jax.local_devices()[:1]
    )
    batch = jax.tree_util.tree_map(lambda v: v[None], _batch(16))
    state_1, metrics_1 = one_device(state, batch, jax.random.key(1))
    assert int(state_8.step) == int(state_1.step) == 1
    assert_trees_close(state_8.params, state_1.params, rtol=2e-4, atol=2e-6)
    moved = [
        float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
        for a, b in zip(jax.tree_util.tree_leaves(state_8.params), jax.tree_util.tree_leaves(state.params))
    ]
    assert max(moved) > 1e-4  # it did update
    np.testing.assert_allclose(float(metrics_8["loss"]), float(metrics_1["loss"]), rtol=1e-5)
    np.testing.assert_allclose(float(metrics_8["top1_acc"]), float(metrics_1["top1_acc"]))


@pytest.mark.parametrize("input_scale", ["raw"])  # the standardized formula: test_preprocess, test_paper_recipe
def test_pixels_and_colour_offsets_give_the_update_of_the_scaled_images(input_scale):
    """The step scales uint8 pixels and adds each image's PCA offset, as a host would have."""
    model, tx, schedule, state = _setup(input_scale=input_scale, learning_rate=1e-4)
    assert model.input_scale == input_scale
    batch = _batch(4, seed=5)
    mean, std = np.array(preprocess.MEAN_RGB), np.array(preprocess.STDDEV_RGB)
    shifted = batch["images"] / 255.0 + batch["color"][:, None, None, :] - mean  # [0, 1] units
    normalised = shifted / std if input_scale == "standardized" else 255.0 * shifted  # raw: centred 0-255 values
    reference = {"images": normalised.astype(np.float32), "labels": batch["labels"]}
    step = functools.partial(steps.train_step, model=model, tx=tx, schedule=schedule)
    one_device = jax.pmap(
        step, axis_name=distributed.AXIS, in_axes=(None, 0, None), out_axes=None, devices=jax.local_devices()[:1]
    )
    add_axis = functools.partial(jax.tree_util.tree_map, lambda v: v[None])
    from_pixels, metrics = one_device(state, add_axis(batch), jax.random.key(1))
    from_floats, expected = one_device(state, add_axis(reference), jax.random.key(1))
    np.testing.assert_allclose(float(metrics["loss"]), float(expected["loss"]), rtol=1e-5)
    assert_trees_close(from_pixels.params, from_floats.params, rtol=1e-4, atol=1e-6)
    without_colour, _ = one_device(
        state, add_axis({**batch, "color": np.zeros_like(batch["color"])}), jax.random.key(1)
    )
    assert not np.allclose(
        np.asarray(without_colour.params["conv1"]["kernel"]), np.asarray(from_pixels.params["conv1"]["kernel"])
    )


def test_step_sees_per_device_batch_and_state_is_one_copy(plain, eight_device_step):
    state = plain[3]
    new_state, _, seen = eight_device_step
    assert seen == {"images": (2, IMAGE_SIZE, IMAGE_SIZE, 3), "labels": (2,), "state_devices": 8}
    # out_axes=None: one state, replicated on all devices, same shapes as before
    assert jax.tree_util.tree_map(jnp.shape, new_state.params) == jax.tree_util.tree_map(jnp.shape, state.params)


def test_dropout_masks_differ_across_devices_and_steps(with_dropout):
    """Same images on every device: with dropout on, the per-device losses must differ."""
    model, tx, schedule, state = with_dropout

    def per_device_loss(state, batch, rng):
        dropout_rng = steps.dropout_key(rng, state.step)
        logits = model.apply({"params": state.params}, batch["images"], train=True, rngs={"dropout": dropout_rng})
        return steps.cross_entropy(logits, batch["labels"])

    p_loss = jax.pmap(per_device_loss, axis_name=distributed.AXIS, in_axes=(None, 0, None))
    same = jax.tree_util.tree_map(lambda v: np.stack([v] * 8), _batch(2))
    losses = np.asarray(p_loss(state, same, jax.random.key(0)))
    assert len(set(losses.round(6).tolist())) == 8
    later = np.asarray(p_loss(state.replace(step=state.step + 1), same, jax.random.key(0)))
    assert not np.allclose(losses, later)


def test_eval_step_counts_only_unmasked_examples_and_averages_crops(plain):
    model, tx, schedule, state = plain
    p_eval = schemes.make_eval_step((model,))
    batch = _batch(16)
    mask = np.ones(16, np.int32)
    mask[-5:] = 0
    sums, _ = p_eval((state.params,), _per_device({**batch, "mask": mask}, 8))
    assert float(sums["num_examples"]) == 11
    logits = model.apply({"params": state.params}, batch["images"][:11], train=False)
    expected = float(optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"][:11]).sum())
    np.testing.assert_allclose(float(sums["loss"]), expected, rtol=1e-4)
    # a batch of identical crops gives the single-crop result
    crops = {**batch, "images": np.repeat(batch["images"][:, None], 3, axis=1), "mask": mask}
    sums_crops, _ = p_eval((state.params,), _per_device(crops, 8))
    np.testing.assert_allclose(float(sums_crops["loss"]), float(sums["loss"]), rtol=1e-4)
    assert float(sums_crops["top1_acc"]) == float(sums["top1_acc"])


def _learnable_batch(global_batch, seed=0):
    """Each class its own colour, plus noise: a batch a working step fits in a few updates."""
    rng = np.random.default_rng(seed)
    labels = np.arange(global_batch) % NUM_CLASSES
    colours = rng.integers(0, 256, size=(NUM_CLASSES, 3))
    noise = rng.integers(-30, 30, size=(global_batch, IMAGE_SIZE, IMAGE_SIZE, 3))
    images = np.clip(colours[labels][:, None, None, :] + noise, 0, 255).astype(np.uint8)
    return {"images": images, "labels": labels.astype(np.int32), "color": np.zeros((global_batch, 3), np.float32)}


def test_a_few_steps_fit_a_batch(plain):
    model, _, _, state = plain  # its initial state, with a smaller learning rate (the same optimizer state)
    tx, schedule = _optimizer(_config(learning_rate=0.002))
    # as the loop keeps it: one compilation, not one per input placement (a copy: the step donates it)
    state = distributed.replicate(jax.tree_util.tree_map(jnp.copy, state))
    p_train, _ = schemes.make_steps(model, tx, schedule)
    batch = distributed.shard_to_devices(_per_device(_learnable_batch(16), 8))
    losses = []
    for _ in range(4):
        state, metrics = p_train(state, batch, jax.random.key(0))
        losses.append(float(metrics["loss"]))
    assert int(state.step) == 4
    assert all(later < earlier for earlier, later in zip(losses, losses[1:])), losses  # every update helps
    assert losses[-1] < losses[0] * 0.5, losses


@pytest.mark.parametrize("k", [1, 2, 3])
def test_top_k_counts_ties_for_the_label(k):
    from alexnet_jax.step.metrics import correct_top_k

    logits = jnp.array([[0.1, 0.5, 0.3, 0.2], [0.4, 0.3, 0.2, 0.1]])
    labels = jnp.array([2, 3])
    expected = {1: [0, 0], 2: [1, 0], 3: [1, 0]}[k]
    np.testing.assert_array_equal(np.asarray(correct_top_k(logits, labels, k)), expected)


def test_shard_map_path_gives_the_pmap_update_on_eight_devices(with_dropout):

    model, tx, schedule, state = with_dropout  # dropout on: the keys must match too
    host = {**_batch(16, seed=3), "mask": np.ones(16, np.int32)}
    rng = jax.random.key(7)
    results = {}
    for parallelism in ("pmap", "shard_map"):
        scheme = schemes.make_scheme(parallelism, variant=model.variant)
        p_train, p_eval = scheme.make_steps(model, tx, schedule)
        start = scheme.place_state(jax.tree_util.tree_map(jnp.copy, state))  # the step donates it
        batch = scheme.place_batch(host)
        new_state, metrics = p_train(start, batch, rng)
        sums, probs = p_eval((new_state.params,), batch)
        assert probs.reshape((-1, NUM_CLASSES)).shape == (16, NUM_CLASSES)
        results[parallelism] = (jax.device_get(new_state), jax.device_get(metrics), jax.device_get(sums))
    (state_p, metrics_p, sums_p), (state_s, metrics_s, sums_s) = results["pmap"], results["shard_map"]
    assert int(state_s.step) == 1
    assert_trees_close(state_s, state_p, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(metrics_p["loss"], metrics_s["loss"], rtol=1e-6)
    for key in sums_p:
        np.testing.assert_allclose(sums_p[key], sums_s[key], rtol=1e-5)


def test_the_meter_measures_the_share_of_time_spent_waiting_for_input(caplog):
    import logging
    import time

    from alexnet_jax.training import loop

    def slow_batches():
        while True:
            time.sleep(0.05)
            yield {}

    meter = loop.Meter(global_batch=8)
    batches = slow_batches()
    for _ in range(4):
        meter.next_batch(batches)
        time.sleep(0.01)  # the "step"
        meter.steps += 1
    waiting = meter.summary()
    assert 0.7 < waiting["train/data_wait_frac"] <= 1.0
    assert waiting["train/img_per_s"] == pytest.approx(4 * 8 / 0.24, rel=0.3)
    meter.restart()
    fast = iter([{}] * 4)
    for _ in range(4):
        meter.next_batch(fast)
        time.sleep(0.02)
    assert meter.summary()["train/data_wait_frac"] < 0.1

    watch = loop.DataWaitWatch()
    with caplog.at_level(logging.WARNING, logger="alexnet_jax.training.loop"):
        watch.check(0.5)
        assert not caplog.records  # one slow interval is not a pattern
        watch.check(0.6)
        watch.check(0.7)
    assert len(caplog.records) == 1 and "pack the data decode-free" in caplog.text  # warned once
    progress = metrics_lib.Progress(100, 8, data_wait_shown=0.1)
    assert "waiting for input 50%" in progress.line(
        5, {"train/loss": 1.0, "train/img_per_s": 10.0, "train/data_wait_frac": 0.5}
    )
    assert "waiting" not in progress.line(5, {"train/loss": 1.0, "train/img_per_s": 10.0, "train/data_wait_frac": 0.05})


def test_the_step_crops_packed_images_itself_and_passes_host_crops_through():
    from alexnet_jax.data import device_augment

    rng = np.random.default_rng(0)
    packed = {
        "images": rng.integers(0, 256, (4, 72, 72, 3), dtype=np.uint8),
        "labels": np.zeros(4, np.int32),
        "example_ids": np.array([5, 6, 7, 8], np.int32),
    }
    augment = steps.DeviceAugment(seed=3, image_size=IMAGE_SIZE, flip=True, pca_noise_std=0.1)
    images, color = jax.jit(steps.train_inputs, static_argnums=1)(packed, augment)
    expected = device_augment.train_crops(
        packed["images"], packed["example_ids"], seed=3, image_size=IMAGE_SIZE, flip=True, pca_noise_std=0.1
    )
    assert images.shape == (4, IMAGE_SIZE, IMAGE_SIZE, 3) and images.dtype == np.uint8
    np.testing.assert_array_equal(np.asarray(images), np.asarray(expected[0]))
    np.testing.assert_allclose(np.asarray(color), np.asarray(expected[1]), rtol=1e-6, atol=1e-9)  # jit may fuse
    host = _batch(4)
    same, offsets = steps.train_inputs(host, None)  # host-cropped batches pass through untouched
    assert same is host["images"] and offsets is host["color"]
    with pytest.raises(ValueError, match="DeviceAugment"):
        steps.train_inputs(packed, None)
