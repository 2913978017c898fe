"""The GPU speed levers compute what the defaults compute (bench/gpu.sh times them on a GPU).

- group_conv: the paper's grouped convolutions as one feature_group_count=2 convolution
  or as two plain ones over the channel halves: same parameters, outputs and gradients.
- lrn_precision: the LRN band matmul's precision, with the tolerance each setting meets.
- prng_impl: the dropout keys' implementation: exact resume for each, different bits.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import TEST_HIDDEN_UNITS, assert_close

from alexnet_jax import config as config_lib
from alexnet_jax.checkpointing import runinfo
from alexnet_jax.errors import UserError
from alexnet_jax.model import alexnet as model_lib
from alexnet_jax.model import build
from alexnet_jax.parallel import distributed
from alexnet_jax.step import optim, steps

IMAGE_SIZE = 67  # AlexNet's smallest input (model.min_image_size)
NUM_CLASSES = 7


def _images(batch=2, seed=0):
    rng = np.random.default_rng(seed)
    return jnp.asarray(rng.integers(0, 256, (batch, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8))


# --- group_conv ---------------------------------------------------------------------------------


def test_split_grouped_conv_is_the_grouped_convolution_in_any_layout():
    rng = np.random.default_rng(1)
    images = jnp.asarray(rng.normal(size=(2, 9, 8, 6)), jnp.float32)  # [N, H, W, C]
    kernel = jnp.asarray(rng.normal(size=(3, 3, 3, 10)), jnp.float32)  # [kh, kw, C / 2, O]
    args = ((2, 1), ((1, 1), (2, 0)))
    grouped = jax.lax.conv_general_dilated(
        images, kernel, *args, dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=2
    )
    split = model_lib.split_grouped_conv(
        images, kernel, *args, dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=2
    )
    assert_close(split, grouped, rtol=1e-6, atol=1e-6)
    # channels-first operands: the channel axes come from the dimension numbers
    nchw, oihw = images.transpose((0, 3, 1, 2)), kernel.transpose((3, 2, 0, 1))
    split_nchw = model_lib.split_grouped_conv(
        nchw, oihw, *args, dimension_numbers=("NCHW", "OIHW", "NCHW"), feature_group_count=2
    )
    assert_close(split_nchw.transpose((0, 2, 3, 1)), grouped, rtol=1e-6, atol=1e-6)
    # tower 1 is exactly input channels 3..5 with output channels 5..9 of the kernel
    tower = jax.lax.conv_general_dilated(
        images[..., 3:], kernel[..., 5:], *args, dimension_numbers=("NHWC", "HWIO", "NHWC")
    )
    np.testing.assert_array_equal(np.asarray(split[..., 5:]), np.asarray(tower))


def _paper(group_conv, backward_impl, **kwargs):
    return model_lib.AlexNet(
        variant="paper",
        num_classes=NUM_CLASSES,
        dropout_rate=0.0,
        init_scheme="modern",
        input_scale="raw",
        backward_impl=backward_impl,
        group_conv=group_conv,
        hidden_units=TEST_HIDDEN_UNITS,
        **kwargs,
    )


def _conv_group_counts(net, params, images):
    """feature_group_count of every convolution in the forward and backward pass."""

    def loss(params):
        return net.apply({"params": params}, images, train=True).sum()

    jaxpr = jax.make_jaxpr(jax.grad(loss))(params)
    counts = []

    def walk(jaxpr):
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "conv_general_dilated":
                counts.append(eqn.params["feature_group_count"])
            for value in eqn.params.values():
                for sub in value if isinstance(value, (tuple, list)) else (value,):
                    if hasattr(sub, "jaxpr"):
                        walk(sub.jaxpr if hasattr(sub.jaxpr, "eqns") else sub.jaxpr.jaxpr)
                    elif hasattr(sub, "eqns"):
                        walk(sub)

    walk(jaxpr.jaxpr)
    return counts


@pytest.mark.parametrize("backward_impl", ["lax", "fast"])
def test_split_towers_give_the_grouped_parameters_outputs_and_gradients(backward_impl):
    images = _images()
    labels = jnp.array([1, 4])
    grouped, split = _paper("grouped", backward_impl), _paper("split", backward_impl)
    params = grouped.init({"params": jax.random.key(0)}, images, train=False)["params"]
    split_params = split.init({"params": jax.random.key(0)}, images, train=False)["params"]
    # the same checkpoint layout: same names, shapes and (from the same key) values
    assert jax.tree_util.tree_structure(split_params) == jax.tree_util.tree_structure(params)
    for got, want in zip(jax.tree_util.tree_leaves(split_params), jax.tree_util.tree_leaves(params)):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    assert params["conv2"]["kernel"].shape == (5, 5, 48, 256)

    def loss_and_grads(net):
        def loss(params):
            logits = net.apply({"params": params}, images, train=True)
            return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean(), logits

        return jax.jit(jax.value_and_grad(loss, has_aux=True))(params)

    (loss_g, logits_g), grads_g = loss_and_grads(grouped)
    (loss_s, logits_s), grads_s = loss_and_grads(split)
    assert_close(logits_s, logits_g, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(float(loss_s), float(loss_g), rtol=1e-6)
    for name in params:
        for leaf in ("kernel", "bias"):
            scale = float(jnp.max(jnp.abs(grads_g[name][leaf])))
            assert scale > 0, (name, leaf)
            assert_close(grads_s[name][leaf], grads_g[name][leaf], rtol=1e-4, atol=1e-5 * scale, err_msg=name)
    # and the split way really runs no grouped convolution (the grouped way does, with lax)
    assert set(_conv_group_counts(split, params, images)) == {1}
    if backward_impl == "lax":
        assert 2 in _conv_group_counts(grouped, params, images)


# --- lrn_precision ------------------------------------------------------------------------------


def _lrn64(a, squares=None, k=2.0, n=5, alpha=1e-4, beta=0.75):
    """The paper's LRN in float64; `squares` replaces a**2 in the window sum (rounded inputs)."""
    a = a.astype(np.float64)
    squares = a**2 if squares is None else squares.astype(np.float64)
    channels = a.shape[-1]
    out = np.empty_like(a)
    for i in range(channels):
        lo, hi = max(0, i - n // 2), min(channels - 1, i + n // 2)
        out[..., i] = a[..., i] / (k + alpha * np.sum(squares[..., lo : hi + 1], axis=-1)) ** beta
    return out


def _round_mantissa(x, bits):
    """float32 rounded to `bits` explicit mantissa bits (TF32: 10, bfloat16: 7), to nearest even."""
    raw = np.asarray(x, np.float32).view(np.uint32).astype(np.uint64)
    drop = 23 - bits
    if drop == 0:
        return np.asarray(x, np.float32)
    half = np.uint64(1 << (drop - 1))
    odd = (raw >> np.uint64(drop)) & np.uint64(1)
    rounded = ((raw + half - np.uint64(1) + odd) >> np.uint64(drop)) << np.uint64(drop)
    return rounded.astype(np.uint32).view(np.float32)


# The narrowest format each setting may round the band matmul's float32 inputs to:
# HIGHEST keeps float32; HIGH is TF32 on GPUs (bfloat16 x3 on TPUs, finer); DEFAULT is
# TF32 on GPUs and bfloat16 on TPUs.
_WORST_MANTISSA_BITS = {"highest": 23, "high": 10, "default": 7}


@pytest.mark.parametrize("precision", model_lib.LRN_PRECISIONS)
def test_lrn_precision_meets_its_tolerance_against_float64(precision):
    rng = np.random.default_rng(0)
    # post-ReLU activations on the paper's raw 0-255 input scale: large enough that alpha matters
    a = rng.gamma(2.0, 40.0, size=(3, 7, 5, 16)).astype(np.float32)
    reference = _lrn64(a)
    tolerance = model_lib.LRN_PRECISION_RTOL[precision]
    got = np.asarray(model_lib.local_response_norm(jnp.asarray(a), precision=precision), np.float64)
    error = np.max(np.abs(got - reference) / np.abs(reference))
    assert error <= tolerance, (precision, error)
    if jax.default_backend() == "cpu":
        # XLA:CPU computes every precision in float32: all three meet the float32 bound here
        assert error <= model_lib.LRN_PRECISION_RTOL["highest"], (precision, error)
    # the bound holds where a backend does round: the window sum's inputs (a**2) rounded to the
    # setting's narrowest format, the rest exact
    squares = (a.astype(np.float32)) ** 2
    emulated = _lrn64(a, _round_mantissa(squares, _WORST_MANTISSA_BITS[precision]))
    emulated_error = np.max(np.abs(emulated - reference) / np.abs(reference))
    assert emulated_error <= tolerance, (precision, emulated_error)
    if precision != "highest":  # and the bound is not slack by orders of magnitude
        assert emulated_error > tolerance / 20, (precision, emulated_error)


@pytest.mark.parametrize("precision", ["high", "default"])
def test_the_model_passes_its_lrn_precision_to_the_band_matmul(precision):
    net = model_lib.AlexNet(variant="paper", num_classes=NUM_CLASSES, lrn_precision=precision)
    images = _images(1)
    params = jax.eval_shape(lambda: net.init(jax.random.key(0), images, train=False))["params"]
    text = str(jax.make_jaxpr(lambda p: net.apply({"params": p}, images, train=False))(params))
    wanted = {"high": "HIGH", "default": "DEFAULT"}[precision]
    assert f"Precision.{wanted}" in text
    assert "Precision.HIGHEST" not in text


# --- prng_impl ----------------------------------------------------------------------------------


def test_threefry_dropout_keys_are_the_ones_runs_always_drew():
    for seed in (0, 17):
        old = jax.random.split(jax.random.key(seed))[1]  # train.py's derivation before the option
        np.testing.assert_array_equal(
            np.asarray(jax.random.key_data(steps.dropout_root_key(seed, "threefry"))),
            np.asarray(jax.random.key_data(old)),
        )


def _masks(seed, prng_impl, step, devices=2):
    """The dropout mask each device draws at `step`, from a key built afresh from the seed (a restart)."""
    draw = jax.pmap(
        lambda rng, step, _: jax.random.bernoulli(steps.dropout_key(rng, step), 0.5, (256,)),
        axis_name=distributed.AXIS,
        in_axes=(None, None, 0),
        devices=jax.local_devices()[:devices],
    )
    return np.asarray(draw(steps.dropout_root_key(seed, prng_impl), jnp.int32(step), jnp.arange(devices)))


def test_each_prng_impl_draws_masks_from_seed_step_and_device_alone_and_the_impls_differ():
    drawn = {}
    for impl in steps.PRNG_IMPLS:
        first = _masks(3, impl, 5)
        np.testing.assert_array_equal(_masks(3, impl, 5), first)  # rebuilt from (seed, step): the same bits
        assert not np.array_equal(first[0], first[1])  # each device its own
        assert not np.array_equal(_masks(3, impl, 6), first)  # each step its own
        drawn[impl] = first
    # the implementations draw different bits for the same (seed, step, device)
    impls = list(drawn)
    for i, a in enumerate(impls):
        for b in impls[i + 1 :]:
            assert not np.array_equal(drawn[a], drawn[b]), (a, b)


def _step_setup(prng_impl):
    config = config_lib.base_config()
    config.model, config.init, config.input_scale = "paper", "modern", "raw"
    config.prng_impl = prng_impl
    config.hidden_units = TEST_HIDDEN_UNITS
    model = build.create_model(config, NUM_CLASSES)
    schedule = optim.make_schedule(config, steps_per_epoch=10, total_steps=100)
    tx = optim.make_optimizer(config, schedule)
    return config, model, tx, schedule


@pytest.mark.parametrize("prng_impl", ["rbg"])
def test_two_steps_straight_equal_one_step_then_a_restart_from_seed_and_step(prng_impl):
    config, model, tx, schedule = _step_setup(prng_impl)
    rng = np.random.default_rng(0)
    batch = {
        "images": rng.integers(0, 256, (1, 2, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8),
        "labels": rng.integers(0, NUM_CLASSES, (1, 2)).astype(np.int32),
    }
    one_device = jax.local_devices()[:1]

    def p_train():  # what a (re)started run builds
        fn = functools.partial(steps.train_step, model=model, tx=tx, schedule=schedule)
        return jax.pmap(fn, axis_name=distributed.AXIS, in_axes=(None, 0, None), out_axes=None, devices=one_device)

    state0 = jax.device_get(steps.init_state(model, tx, jax.random.key(0), IMAGE_SIZE))
    train, root = p_train(), steps.dropout_root_key(config.seed, config.prng_impl)
    straight, _ = train(state0, batch, root)
    straight, _ = train(straight, batch, root)
    first, _ = train(state0, batch, root)
    saved = jax.device_get(first)  # what a checkpoint holds
    restarted, _ = p_train()(saved, batch, steps.dropout_root_key(config.seed, config.prng_impl))
    assert int(restarted.step) == int(straight.step) == 2
    for got, want in zip(jax.tree_util.tree_leaves(restarted.params), jax.tree_util.tree_leaves(straight.params)):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    # dropout is on: another step's masks give another update
    other, _ = train(saved.replace(step=saved.step + 1), batch, root)
    assert not np.array_equal(np.asarray(other.params["fc8"]["kernel"]), np.asarray(straight.params["fc8"]["kernel"]))


# --- config -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "key, value, expected",
    [
        ("group_conv", "towers", "config.group_conv='towers' is unknown; use 'grouped' or 'split'"),
        ("lrn_precision", "low", "config.lrn_precision='low' is unknown; use 'highest' or 'high' or 'default'"),
        ("prng_impl", "philox", "config.prng_impl='philox' is unknown; use 'threefry' or 'rbg' or 'unsafe_rbg'"),
    ],
)
def test_bad_lever_settings_name_the_key_and_the_choices(key, value, expected):
    config = config_lib.base_config()
    config[key] = value
    with pytest.raises(UserError) as error:
        config_lib.validate(config, device_count=1)
    assert str(error.value) == expected


def test_the_levers_reach_the_model_and_the_run_record(tmp_path):
    config = config_lib.base_config()
    config.group_conv, config.lrn_precision, config.prng_impl = "split", "high", "rbg"
    config_lib.validate(config, device_count=1)
    model = build.create_model(config, NUM_CLASSES)
    assert (model.group_conv, model.lrn_precision) == ("split", "high")
    runinfo.write_run_info(str(tmp_path), config, ["a"], num_classes=NUM_CLASSES, resize_size=256, input_scale="raw")
    recorded = runinfo.read_run_info(str(tmp_path))["config"]
    assert (recorded["group_conv"], recorded["lrn_precision"], recorded["prng_impl"]) == ("split", "high", "rbg")
