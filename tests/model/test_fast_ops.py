"""fast_ops against the plain lax ops: same outputs, same gradients (to float tolerance)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import TEST_HIDDEN_UNITS
from jax import lax

from alexnet_jax.model import alexnet as model_lib
from alexnet_jax.model import fast_ops

# (image side, in channels, out channels, kernel, stride, padding, groups): AlexNet's shapes, shrunk.
CONV_CASES = [
    (31, 3, 8, 11, 4, 2, 1),  # conv1: strided, input gradient through lax's transpose
    (13, 8, 12, 5, 1, 2, 1),  # conv2
    (7, 12, 16, 3, 1, 1, 1),  # conv3
    (7, 16, 8, 3, 1, 1, 2),  # the paper's two towers
    (9, 4, 6, 3, 2, 0, 1),  # strided and unpadded
]


def _loss_and_grads(conv_fn, images, kernel, cotangent):
    def loss(images, kernel):
        return jnp.sum(conv_fn(images, kernel) * cotangent)

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(images, kernel)


@pytest.mark.parametrize("side,cin,cout,size,stride,padding,groups", CONV_CASES)
def test_conv_matches_lax_forward_and_gradients(side, cin, cout, size, stride, padding, groups):
    rng = np.random.default_rng(side * cin + size)
    images = jnp.asarray(rng.standard_normal((2, side, side, cin), dtype=np.float32))
    kernel = jnp.asarray(rng.standard_normal((size, size, cin // groups, cout), dtype=np.float32))
    expected_out = fast_ops.lax_conv(images, kernel, stride, padding, groups)
    got_out = fast_ops.conv(images, kernel, stride, padding, groups)
    assert got_out.shape == expected_out.shape
    np.testing.assert_allclose(got_out, expected_out, rtol=1e-5, atol=1e-4)

    cotangent = jnp.asarray(rng.standard_normal(expected_out.shape, dtype=np.float32))
    want = _loss_and_grads(lambda x, w: fast_ops.lax_conv(x, w, stride, padding, groups), images, kernel, cotangent)
    got = _loss_and_grads(lambda x, w: fast_ops.conv(x, w, stride, padding, groups), images, kernel, cotangent)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-5)
    for got_grad, want_grad in zip(got[1], want[1]):
        assert got_grad.shape == want_grad.shape and got_grad.dtype == want_grad.dtype
        np.testing.assert_allclose(got_grad, want_grad, rtol=1e-4, atol=1e-3)


def test_conv_gradients_in_bfloat16_keep_dtypes():
    rng = np.random.default_rng(0)
    images = jnp.asarray(rng.standard_normal((2, 9, 9, 4)), jnp.bfloat16)
    kernel = jnp.asarray(rng.standard_normal((3, 3, 4, 5)), jnp.bfloat16)
    grads = jax.grad(lambda x, w: jnp.sum(fast_ops.conv(x, w, 1, 1).astype(jnp.float32)), argnums=(0, 1))(
        images, kernel
    )
    want = jax.grad(lambda x, w: jnp.sum(fast_ops.lax_conv(x, w, 1, 1).astype(jnp.float32)), argnums=(0, 1))(
        images, kernel
    )
    for got_grad, want_grad in zip(grads, want):
        assert got_grad.dtype == jnp.bfloat16
        np.testing.assert_allclose(
            np.asarray(got_grad, np.float32), np.asarray(want_grad, np.float32), rtol=5e-2, atol=0.25
        )


def test_conv_general_dilated_falls_back_outside_its_case():
    rng = np.random.default_rng(1)
    images = jnp.asarray(rng.standard_normal((1, 8, 8, 3), dtype=np.float32))
    kernel = jnp.asarray(rng.standard_normal((3, 3, 3, 4), dtype=np.float32))
    dims = ("NHWC", "HWIO", "NHWC")
    for kwargs in (
        {"window_strides": (1, 1), "padding": "SAME"},
        {"window_strides": (1, 2), "padding": ((1, 1), (1, 1))},
        {"window_strides": (1, 1), "padding": ((0, 1), (1, 1))},
        {"window_strides": (1, 1), "padding": ((1, 1), (1, 1)), "rhs_dilation": (2, 2)},
    ):
        want = lax.conv_general_dilated(images, kernel, dimension_numbers=dims, **kwargs)
        got = fast_ops.conv_general_dilated(images, kernel, dimension_numbers=dims, **kwargs)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("side", [13, 12, 27])
def test_max_pool_matches_flax_including_ties(side):
    rng = np.random.default_rng(side)
    # After a ReLU many inputs are exactly 0: windows full of ties. Rounding adds ties above 0 too.
    images = jnp.asarray(np.maximum(np.round(rng.standard_normal((2, side, side, 5)), 1), 0).astype(np.float32))
    want_out = nn.max_pool(images, (3, 3), strides=(2, 2), padding="VALID")
    np.testing.assert_array_equal(fast_ops.max_pool(images, 3, 2), want_out)
    cotangent = jnp.asarray(rng.standard_normal(want_out.shape, dtype=np.float32))
    want = jax.grad(lambda x: jnp.sum(nn.max_pool(x, (3, 3), strides=(2, 2), padding="VALID") * cotangent))(images)
    got = jax.grad(lambda x: jnp.sum(fast_ops.max_pool(x, 3, 2) * cotangent))(images)
    # The same inputs get gradient (the same tie-break); overlapping windows may add in another order.
    np.testing.assert_array_equal(got != 0, want != 0)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def test_model_backward_impls_agree():
    """The whole network: same parameters, logits and gradients whichever backward is used.

    The paper variant covers every op the torchvision one has, plus groups and LRN.
    """
    variant = "paper"
    rng = np.random.default_rng(2)
    images = jnp.asarray(rng.standard_normal((2, 67, 67, 3), dtype=np.float32))
    labels = jnp.asarray([1, 3])
    fast = model_lib.AlexNet(  # the subject is the convolutions, LRN and pools
        variant=variant, num_classes=5, init_scheme="modern", backward_impl="fast", hidden_units=TEST_HIDDEN_UNITS
    )
    plain = fast.clone(backward_impl="lax")
    params = fast.init(jax.random.key(0), images, train=False)["params"]
    plain_params = plain.init(jax.random.key(0), images, train=False)["params"]
    jax.tree_util.tree_map(np.testing.assert_array_equal, params, plain_params)

    def loss(model):
        def fn(params):
            logits = model.apply({"params": params}, images, train=True, rngs={"dropout": jax.random.key(1)})
            return jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(2), labels]), logits

        return jax.jit(jax.value_and_grad(fn, has_aux=True))(params)

    (fast_loss, fast_logits), fast_grads = loss(fast)
    (plain_loss, plain_logits), plain_grads = loss(plain)
    np.testing.assert_allclose(fast_logits, plain_logits, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(fast_loss, plain_loss, rtol=1e-5)
    flat_fast = jax.tree_util.tree_leaves_with_path(fast_grads)
    flat_plain = jax.tree_util.tree_leaves(plain_grads)
    for (path, got), want in zip(flat_fast, flat_plain):
        scale = float(jnp.max(jnp.abs(want))) + 1e-12
        np.testing.assert_allclose(got / scale, want / scale, atol=1e-4, err_msg=jax.tree_util.keystr(path))


def test_auto_backward_impl_is_fast_on_cpu():
    assert jax.default_backend() == "cpu"
    from alexnet_jax.model import build

    assert build.resolve_backward_impl("auto") == "fast"
    assert build.resolve_backward_impl("auto", backend="gpu") == "lax"
    assert build.resolve_backward_impl("lax") == "lax"
    with pytest.raises(ValueError, match="backward_impl"):
        model_lib.AlexNet(backward_impl="nope").init(jax.random.key(0), jnp.zeros((1, 67, 67, 3)), train=False)
