"""The paper's ablation switches (issue 24): each changes the network or its input as stated,
and nothing else: tanh units in every hidden layer, the window and stride of every pool with the
paper's map sizes and parameter count, LRN present or absent, training crops fixed at the centre
on both input paths (tf.data on the host, the packed path on the device)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow as tf
from conftest import PHOTOS, assert_close, assert_trees_close, photo_crops, write_photo_folder
from jax import lax

from alexnet_jax import config as config_lib
from alexnet_jax.data import augment, device_augment, pack, packed, registry
from alexnet_jax.errors import UserError
from alexnet_jax.model import alexnet as model_lib
from alexnet_jax.model import build
from alexnet_jax.parallel import schemes
from alexnet_jax.step import steps
from alexnet_jax.training import loop

SIZE = 67  # conv1 gives 16x16: an even side, where 2x2/2 windows must be cut to keep the paper's sizes
ACTIVATIONS = {"relu": lambda x: np.maximum(x, 0.0), "tanh": np.tanh}


@pytest.fixture(scope="module")
def params():
    """One paper-variant initialisation: none of the switches changes a parameter's shape."""
    module = model_lib.AlexNet(variant="paper", num_classes=10, init_scheme="modern")
    return module.init(jax.random.key(0), jnp.zeros((1, SIZE, SIZE, 3)), train=False)["params"]


def _layer_io(module, params, images):
    """{layer: (input, output)} of every convolution and dense layer in one forward pass."""
    seen = {}

    def record(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        if context.method_name == "__call__" and isinstance(context.module, nn.Conv | nn.Dense):
            seen[context.module.name] = (np.asarray(args[0]), np.asarray(out))
        return out

    with nn.intercept_methods(record):
        module.apply({"params": params}, images, train=False)
    return seen


def _pool3x3(x):
    return np.asarray(lax.reduce_window(jnp.asarray(x), -jnp.inf, lax.max, (1, 3, 3, 1), (1, 2, 2, 1), "VALID"))


@pytest.mark.parametrize("activation", ["relu", "tanh"])
@pytest.mark.parametrize("lrn", [None, False])
def test_hidden_units_and_lrn_are_as_switched(params, activation, lrn):
    """Between every pair of layers sits the chosen nonlinearity (and the LRN after conv1 and conv2
    unless switched off), recomputed here from each layer's own output."""
    module = model_lib.AlexNet(variant="paper", num_classes=10, activation=activation, lrn=lrn, backward_impl="lax")
    io = _layer_io(module, params, photo_crops(2, SIZE))
    act = ACTIVATIONS[activation]
    norm = (
        (lambda x: np.asarray(model_lib.local_response_norm(jnp.asarray(x), groups=2)))
        if lrn is None
        else (lambda x: x)
    )
    close = dict(rtol=1e-5, atol=1e-5)
    assert_close(io["conv2"][0], _pool3x3(norm(act(io["conv1"][1]))), **close)
    assert_close(io["conv3"][0], _pool3x3(norm(act(io["conv2"][1]))), **close)
    assert_close(io["conv4"][0], act(io["conv3"][1]), **close)
    assert_close(io["conv5"][0], act(io["conv4"][1]), **close)
    pooled = _pool3x3(act(io["conv5"][1]))  # [2, 1, 1, 256] at 67: adaptive pooling repeats it to 6x6
    assert_close(
        io["fc6"][0], np.repeat(pooled.transpose(0, 3, 1, 2).reshape(2, 256, 1), 36, axis=2).reshape(2, -1), **close
    )
    assert_close(io["fc7"][0], 0.5 * act(io["fc6"][1]), **close)  # the paper's dropout at test: x 0.5
    assert_close(io["fc8"][0], 0.5 * act(io["fc7"][1]), **close)
    hidden = io["conv4"][0]
    if activation == "tanh":
        assert hidden.min() < -0.01 and np.abs(hidden).max() <= 1.0
    else:
        assert hidden.min() == 0.0 and hidden.max() > 1.0


def _pools(module, size):
    """(window, stride, input side, output side) of every max-pool in the forward pass, from its jaxpr."""
    images = jnp.zeros((1, size, size, 3))
    shapes = jax.eval_shape(lambda: module.init(jax.random.key(0), images, train=False))
    jaxpr = jax.make_jaxpr(lambda p: module.apply(p, images, train=False))(shapes)
    return [
        (
            e.params["window_dimensions"][1:3],
            e.params["window_strides"][1:3],
            e.invars[0].aval.shape[1],
            e.outvars[0].aval.shape[1],
        )
        for e in jaxpr.jaxpr.eqns
        if e.primitive.name == "reduce_window_max"
    ], model_lib.count_params(shapes["params"])


@pytest.mark.parametrize(
    "pooling, size, expected",
    [
        ("overlapping", 224, [((3, 3), (2, 2), 55, 27), ((3, 3), (2, 2), 27, 13), ((3, 3), (2, 2), 13, 6)]),
        ("non_overlapping", 224, [((2, 2), (2, 2), 54, 27), ((2, 2), (2, 2), 26, 13), ((2, 2), (2, 2), 12, 6)]),
        ("overlapping", SIZE, [((3, 3), (2, 2), 16, 7), ((3, 3), (2, 2), 7, 3), ((3, 3), (2, 2), 3, 1)]),
        ("non_overlapping", SIZE, [((2, 2), (2, 2), 14, 7), ((2, 2), (2, 2), 6, 3), ((2, 2), (2, 2), 2, 1)]),
    ],
)
def test_every_pool_has_the_switched_window_and_the_paper_sizes(pooling, size, expected):
    """55 -> 27 -> 13 -> 6 either way, and the paper's 60,965,224 parameters whatever the switches."""
    module = model_lib.AlexNet(variant="paper", num_classes=1000, pooling=pooling, backward_impl="lax")
    pools, count = _pools(module, size)
    assert pools == expected
    assert count == 60_965_224
    for other in (dict(activation="tanh"), dict(lrn=False)):
        assert _pools(model_lib.AlexNet(variant="paper", pooling=pooling, **other), size)[1] == 60_965_224
    assert model_lib.min_image_size() == 63 and model_lib.train_flops_per_image("paper", 224) > 0


def test_fast_backward_agrees_with_autodiff_for_tanh_and_non_overlapping_pools(params):
    """The hand-written max-pool backward (fast_ops) on 2x2/2 windows of cut maps, through tanh units."""
    images = photo_crops(2, SIZE)
    weights = jax.random.normal(jax.random.key(1), (2, 10))

    def grads(impl):
        module = model_lib.AlexNet(
            variant="paper", num_classes=10, activation="tanh", pooling="non_overlapping", backward_impl=impl
        )
        loss = lambda p: jnp.sum(module.apply({"params": p}, images, train=False) * weights)  # noqa: E731
        return jax.jit(jax.value_and_grad(loss))(params)

    (fast_loss, fast), (lax_loss, autodiff) = grads("fast"), grads("lax")
    assert_close(fast_loss, lax_loss, rtol=1e-5, atol=1e-5)  # a sum of +- logits: absolute scale
    assert_trees_close(fast, autodiff, rtol=1e-4, atol=1e-5)


def test_lrn_and_the_other_switches_are_validated_and_resolved():
    config = config_lib.base_config()
    for key, value in (("activation", "sigmoid"), ("pooling", "average"), ("lrn", "yes")):
        bad = config_lib.base_config()
        bad[key] = value
        with pytest.raises(UserError, match=f"config.{key}={value!r} is unknown"):
            config_lib.validate(bad, device_count=1)
    config.model, config.lrn = "torchvision", "on"
    with pytest.raises(UserError, match="torchvision variant has no LRN"):
        config_lib.validate(config, device_count=1)
    config.lrn = "auto"
    config_lib.validate(config, device_count=1)
    with pytest.raises(ValueError, match="no LRN"):
        model_lib.AlexNet(variant="torchvision", lrn=True).init(
            jax.random.key(0), jnp.zeros((1, 63, 63, 3)), train=False
        )
    resolved = {
        choice: build.create_model(dict_config(lrn=choice, activation="tanh"), 10).lrn for choice in build.LRN_CHOICES
    }
    assert resolved == {"auto": None, "on": True, "off": False}
    model = build.create_model(dict_config(pooling="non_overlapping", dropout_rate=0.25), 10)
    assert (model.pooling, model.dropout_rate, model.activation) == ("non_overlapping", 0.25, "relu")


def dict_config(**changes):
    config = config_lib.base_config()
    config.update(changes)
    return config


# ---------------------------------------------------------------- crops


def _jpeg(pixels):
    return tf.io.encode_jpeg(tf.constant(pixels), quality=95)


@pytest.mark.parametrize("mode", ["eager", "tf.data"])
def test_host_training_crop_is_the_centre_when_random_crop_is_off(mode):
    photo = tf.constant(_jpeg(photo_crops(1, 120)[0][:90]))  # a 90x120 photo: not square
    sizes = dict(image_size=48, resize_size=55)
    centre = augment.eval_image(photo, **sizes).numpy()

    def crops(random_crop):
        fn = lambda b, s: augment.train_image(  # noqa: E731
            b, s, flip=False, pca_noise_std=0.0, random_crop=random_crop, **sizes
        )
        seeds = [tf.constant([3, i], tf.int64) for i in range(4)]
        if mode == "eager":
            return [fn(photo, s)[0].numpy() for s in seeds]
        dataset = tf.data.Dataset.from_tensor_slices(tf.stack(seeds)).map(lambda s: fn(photo, s)[0])
        return list(dataset.as_numpy_iterator())

    for crop in crops(random_crop=False):
        np.testing.assert_array_equal(crop, centre)
    assert sum(not np.array_equal(crop, centre) for crop in crops(random_crop=True)) >= 3


def test_device_training_crop_is_the_centre_when_random_crop_is_off():
    images = photo_crops(6, 72)
    ids = jnp.arange(6, dtype=jnp.int32)
    centre = packed.eval_crops(images, crops=1, image_size=64)
    kwargs = dict(seed=5, image_size=64, flip=False, pca_noise_std=0.0)
    fixed, _ = device_augment.train_crops(jnp.asarray(images), ids, random_crop=False, **kwargs)
    np.testing.assert_array_equal(np.asarray(fixed), centre)
    moved, _ = device_augment.train_crops(jnp.asarray(images), ids, random_crop=True, **kwargs)
    assert sum(not np.array_equal(a, b) for a, b in zip(np.asarray(moved), centre)) >= 5


@pytest.fixture(scope="module")
def small_photos(tmp_path_factory):
    return write_photo_folder(
        tmp_path_factory.mktemp("photos"), photos=PHOTOS[:2], train_per_class=8, eval_per_class=2, crop=96
    )


@pytest.mark.parametrize("path", ["tf.data", "packed"])
@pytest.mark.parametrize("random_crop", [False, True])
def test_the_training_loop_passes_random_crop_to_its_input(small_photos, tmp_path, path, random_crop):
    """loop.make_inputs, as a run builds its input: every training image is its example's centre crop
    (the evaluation crop) exactly when config.random_crop is off, on both input paths."""
    config = dict_config(image_size=64, batch_size=8, random_flip=False, pca_noise_std=0.0, random_crop=random_crop)
    if path == "packed":
        pack.write_packed(str(small_photos), str(tmp_path / "pack"), size=72, workers=1)
        config.update(dataset="packed", data_dir=str(tmp_path / "pack"))
    else:
        config.update(dataset="image_folder", data_dir=str(small_photos))
    source = registry.open_source_from_config(config)
    plan = loop.plan_run(config, source)
    inputs = loop.make_inputs(config, plan, source, 0, schemes.from_config(config))
    batch = jax.device_get(next(inputs.train))  # [devices, per_device, ...]
    if path == "packed":
        assert inputs.augment.random_crop is random_crop
        wholes = batch["images"].reshape((-1, 72, 72, 3))
        got, _ = steps.train_inputs(
            {"images": jnp.asarray(wholes), "example_ids": jnp.asarray(batch["example_ids"].reshape(-1))},
            inputs.augment,
        )
        centres = [c.tobytes() for c in packed.eval_crops(wholes, crops=1, image_size=64)]
        matches = [a.tobytes() == b for a, b in zip(np.asarray(got), centres)]
    else:
        centres = {
            augment.eval_image(tf.io.read_file(str(p)), image_size=64, resize_size=plan.resize_size).numpy().tobytes()
            for p in sorted((small_photos / "train").rglob("*.jpg"))
        }
        matches = [image.tobytes() in centres for image in batch["images"].reshape((-1, 64, 64, 3))]
    if random_crop:
        assert sum(matches) <= 2, matches
    else:
        assert all(matches) and len(matches) == 8
