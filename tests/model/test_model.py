import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import TEST_HIDDEN_UNITS

from alexnet_jax.model import alexnet as model_lib
from alexnet_jax.model.alexnet import AlexNet


def _params(variant, num_classes=1000, image_size=224, **kwargs):
    net = AlexNet(variant=variant, num_classes=num_classes, **kwargs)
    images = jnp.zeros((1, image_size, image_size, 3))
    return jax.eval_shape(lambda: net.init(jax.random.key(0), images, train=False))["params"]


@pytest.mark.parametrize("variant, expected", [("paper", 60_965_224), ("torchvision", 61_100_840)])
def test_parameter_counts_match_the_references(variant, expected):
    assert model_lib.count_params(_params(variant)) == expected


def test_paper_variant_has_two_towers_in_conv2_conv4_conv5():
    params = _params("paper")
    # Grouped convolutions see half the input channels: the paper's two GPUs.
    assert params["conv2"]["kernel"].shape == (5, 5, 48, 256)
    assert params["conv3"]["kernel"].shape == (3, 3, 256, 384)
    assert params["conv4"]["kernel"].shape == (3, 3, 192, 384)
    assert params["conv5"]["kernel"].shape == (3, 3, 192, 256)
    assert params["fc6"]["kernel"].shape == (9216, 4096)


def test_torchvision_layer_names_map_one_to_one():
    params = _params("torchvision")
    assert set(params) == set(model_lib.TORCHVISION_NAMES)
    assert len(set(model_lib.TORCHVISION_NAMES.values())) == len(model_lib.TORCHVISION_NAMES)
    assert params["conv1"]["kernel"].shape == (11, 11, 3, 64)
    assert params["fc8"]["kernel"].shape == (4096, 1000)


def _lrn_by_formula(a, k=2.0, n=5, alpha=1e-4, beta=0.75):
    """The paper's equation, one channel at a time."""
    channels = a.shape[-1]
    out = np.empty_like(a)
    for i in range(channels):
        lo, hi = max(0, i - n // 2), min(channels - 1, i + n // 2)
        total = np.sum(a[..., lo : hi + 1] ** 2, axis=-1)
        out[..., i] = a[..., i] / (k + alpha * total) ** beta
    return out


def test_lrn_matches_the_papers_formula():
    rng = np.random.default_rng(0)
    a = rng.uniform(0, 60, size=(2, 5, 4, 11)).astype(np.float32)  # large values make alpha matter
    got = np.asarray(model_lib.local_response_norm(jnp.asarray(a)))
    np.testing.assert_allclose(got, _lrn_by_formula(a.astype(np.float64)), rtol=1e-5)
    # and it is not the identity up to scale: the window matters
    assert not np.allclose(got / a, (got / a)[..., :1])


def test_adaptive_pool_matches_torch_bins():
    x = jnp.arange(2 * 13 * 13 * 2, dtype=jnp.float32).reshape(2, 13, 13, 2)
    pooled = np.asarray(model_lib.adaptive_avg_pool(x, 6))
    # torch: bin i covers [floor(13 i / 6), ceil(13 (i + 1) / 6))
    start, end = (13 * 4) // 6, -((-13 * 5) // 6)
    np.testing.assert_allclose(pooled[1, 4, 4, 1], np.asarray(x)[1, start:end, start:end, 1].mean())


@pytest.mark.parametrize("variant", ["paper", "torchvision"])
@pytest.mark.parametrize("image_size", [63, 227])  # the smallest input, and the paper's
def test_logits_shape_and_dtype(variant, image_size):
    """Shapes and dtypes are what tracing gives (jax.eval_shape): exactly those of the compiled run."""
    net = AlexNet(variant=variant, num_classes=7, dtype=jnp.bfloat16)
    images = jax.ShapeDtypeStruct((2, image_size, image_size, 3), jnp.float32)
    variables = jax.eval_shape(lambda x: net.init(jax.random.key(0), x, train=False), images)
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree_util.tree_leaves(variables))
    logits = jax.eval_shape(lambda v, x: net.apply(v, x, train=False), variables, images)
    assert logits.shape == (2, 7) and logits.dtype == jnp.float32
    assert model_lib.count_params(variables["params"]) == model_lib.count_params(_params(variant, 7))


def test_min_image_size_is_the_real_limit():
    size = model_lib.min_image_size()
    net = AlexNet(num_classes=3, hidden_units=64)  # the limit is the convolutions' and pools'

    def init(side):  # traced layer by layer, as a run's init is, without compiling it
        return jax.eval_shape(lambda: net.init(jax.random.key(0), jnp.ones((1, side, side, 3)), train=False))

    assert init(size)["params"]["fc8"]["kernel"].shape == (64, 3)  # every layer was built
    with pytest.raises(ValueError, match=f"at least {size}x{size}"):
        init(size - 1)


def test_paper_init():
    net = AlexNet(num_classes=10, init_scheme="paper", hidden_units=TEST_HIDDEN_UNITS)  # the rule, at any width
    params = jax.jit(lambda: net.init(jax.random.key(0), jnp.ones((1, 64, 64, 3)), train=False))()["params"]
    for name in ("conv2", "conv4", "conv5", "fc6", "fc7"):
        assert np.all(np.asarray(params[name]["bias"]) == 1.0), name
    for name in ("conv1", "conv3", "fc8"):
        assert np.all(np.asarray(params[name]["bias"]) == 0.0), name
    assert abs(float(np.std(params["fc6"]["kernel"])) - 0.01) < 5e-4
    modern = AlexNet(num_classes=10, init_scheme="modern", hidden_units=TEST_HIDDEN_UNITS)
    params = jax.jit(lambda: modern.init(jax.random.key(0), jnp.ones((1, 64, 64, 3)), train=False))()["params"]
    assert np.all(np.asarray(params["conv2"]["bias"]) == 0.0)
    assert float(np.std(params["fc6"]["kernel"])) > 0.012  # He: sqrt(2 / 9216) ~ 0.0147


def test_dropout_only_in_training_and_from_the_dropout_stream():
    net = AlexNet(num_classes=10, init_scheme="modern", hidden_units=TEST_HIDDEN_UNITS)
    images = jax.random.normal(jax.random.key(1), (4, 64, 64, 3))
    variables = net.init(jax.random.key(0), images, train=False)
    eval_a = net.apply(variables, images, train=False)
    eval_b = net.apply(variables, images, train=False)
    np.testing.assert_array_equal(eval_a, eval_b)
    train_a = net.apply(variables, images, train=True, rngs={"dropout": jax.random.key(2)})
    train_b = net.apply(variables, images, train=True, rngs={"dropout": jax.random.key(3)})
    assert not np.allclose(train_a, train_b)
    assert not np.allclose(train_a, eval_a)


def test_flops_match_torchvision_reference():
    # 0.714 GFLOPs (multiply-adds) forward at 224: x2 for FLOPs, x3 for training.
    assert model_lib.train_flops_per_image("torchvision", 224) / 6 == pytest.approx(0.714e9, rel=0.01)


@pytest.mark.parametrize("variant", ["paper", "torchvision"])
def test_hidden_units_set_fc6_and_fc7_alone(variant):
    wide, narrow = _params(variant, num_classes=10), _params(variant, num_classes=10, hidden_units=256)
    assert narrow["fc6"]["kernel"].shape == (9216, 256) and narrow["fc7"]["kernel"].shape == (256, 256)
    assert narrow["fc8"]["kernel"].shape == (256, 10) and narrow["fc7"]["bias"].shape == (256,)
    for layer in ("conv1", "conv2", "conv3", "conv4", "conv5"):
        assert narrow[layer]["kernel"].shape == wide[layer]["kernel"].shape
    # The FLOP count follows the width: the dense layers' multiply-adds, x6 for training.
    dense = lambda units: 9216 * units + units * units + units * 10  # noqa: E731
    difference = model_lib.train_flops_per_image(variant, 224, 10) - model_lib.train_flops_per_image(
        variant, 224, 10, hidden_units=256
    )
    assert difference == 6 * (dense(4096) - dense(256))


def test_lrn_stays_within_each_tower():
    """The paper's GPUs normalised their own maps: with groups=2 each half is normalised alone."""
    a = np.random.default_rng(3).uniform(0, 30, size=(2, 3, 3, 12)).astype(np.float32)
    got = np.asarray(model_lib.local_response_norm(jnp.asarray(a), groups=2))
    halves = [_lrn_by_formula(h.astype(np.float64)) for h in np.split(a, 2, axis=-1)]
    np.testing.assert_allclose(got, np.concatenate(halves, axis=-1), rtol=1e-5)
    assert not np.allclose(got, np.asarray(model_lib.local_response_norm(jnp.asarray(a))), rtol=1e-5)
