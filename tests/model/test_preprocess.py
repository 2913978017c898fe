"""Pixels to model input on the device: scaling, PCA colour offsets, ImageNet normalisation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import TEST_HIDDEN_UNITS

from alexnet_jax.model import alexnet as model_lib
from alexnet_jax.model import preprocess

MEAN, STD = np.array(preprocess.MEAN_RGB, np.float32), np.array(preprocess.STDDEV_RGB, np.float32)


def _pixels(shape, seed=0):
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def test_uint8_pixels_are_normalised_with_imagenet_statistics():
    pixels = _pixels((2, 5, 5, 3))
    out = np.asarray(jax.jit(preprocess.model_input)(pixels))
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, (pixels / 255.0 - MEAN) / STD, rtol=1e-5, atol=1e-5)
    mean_pixel = np.round(MEAN * 255).astype(np.uint8).reshape(1, 1, 1, 3)
    np.testing.assert_allclose(np.asarray(preprocess.model_input(mean_pixel)), 0.0, atol=0.01)


def test_colour_offsets_shift_each_image_by_its_own_rgb_offset_before_normalising():
    pixels = _pixels((3, 4, 4, 3))
    offsets = np.array([[0.1, -0.2, 0.05], [0.0, 0.0, 0.0], [-0.03, 0.02, 0.3]], np.float32)
    out = np.asarray(preprocess.model_input(pixels, offsets))
    np.testing.assert_allclose(out, (pixels / 255.0 + offsets[:, None, None, :] - MEAN) / STD, rtol=1e-5, atol=1e-5)


def test_ten_crop_batches_and_floats():
    crops = _pixels((2, 10, 4, 4, 3))
    np.testing.assert_allclose(
        np.asarray(preprocess.model_input(crops)), (crops / 255.0 - MEAN) / STD, rtol=1e-5, atol=1e-5
    )
    floats = np.random.default_rng(1).standard_normal((2, 4, 4, 3)).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(preprocess.model_input(floats)), floats)  # already normalised
    with pytest.raises(ValueError, match="already model-ready"):
        preprocess.model_input(floats, np.zeros((2, 3), np.float32))
    with pytest.raises(ValueError, match="uint8 pixels or model-ready floats"):
        preprocess.model_input(floats.astype(np.int32))


def test_the_model_takes_pixels_or_normalised_floats_alike():
    module = model_lib.AlexNet(variant="torchvision", num_classes=7, hidden_units=TEST_HIDDEN_UNITS)
    pixels = _pixels((2, 63, 63, 3))
    params = module.init(jax.random.key(0), jnp.zeros((1, 63, 63, 3)), train=False)["params"]
    from_pixels = module.apply({"params": params}, pixels, train=False)
    from_floats = module.apply({"params": params}, ((pixels / 255.0 - MEAN) / STD).astype(np.float32), train=False)
    np.testing.assert_allclose(np.asarray(from_pixels), np.asarray(from_floats), rtol=1e-4, atol=1e-5)
