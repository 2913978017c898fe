"""Every augmentation op checked eagerly and inside tf.data: the two can differ."""

import io

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from alexnet_jax.data import augment

MODES = ["eager", "tf.data"]


def run(mode, fn, *args):
    """Call fn(*args) eagerly, or as a map over a one-element tf.data dataset."""
    if mode == "eager":
        return tf.nest.map_structure(lambda t: t.numpy(), fn(*args))
    dataset = tf.data.Dataset.from_tensors(tuple(args)).map(lambda *a: fn(*a))
    return next(iter(dataset.as_numpy_iterator()))


def encode(pixels, fmt="JPEG"):
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt, quality=100)
    return buffer.getvalue()


def coordinate_image(height, width):
    """Red encodes the row, green the column: a crop's pixels tell where it came from."""
    rows = np.repeat(np.linspace(0, 255, height)[:, None], width, axis=1)
    cols = np.repeat(np.linspace(0, 255, width)[None, :], height, axis=0)
    return np.stack([rows, cols, np.full_like(rows, 128)], axis=-1).round().astype(np.uint8)


def seed(i):
    return tf.constant([7, i], tf.int64)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_train_image_shape_dtype_and_range(mode, fmt):
    data = tf.constant(encode(coordinate_image(75, 100), fmt))
    fn = lambda b, s: augment.train_image(b, s, image_size=32, resize_size=37)  # noqa: E731
    out = run(mode, fn, data, seed(0))
    assert out.shape == (32, 32, 3) and out.dtype == np.float32
    # normalised ImageNet-style: roughly within a few standard deviations
    assert out.min() > -3.5 and out.max() < 3.5


@pytest.mark.parametrize("mode", MODES)
def test_random_crop_windows_stay_inside_the_centre_square(mode):
    shape = tf.constant([300, 400])
    windows = [run(mode, lambda s: augment.random_crop_window(shape, s, 224, 256), seed(i)) for i in range(40)]
    windows = np.array(windows)
    side = round(300 * 224 / 256)
    assert np.all(windows[:, 2:] == side)
    assert np.all(windows[:, 0] >= 0) and np.all(windows[:, 0] + side <= 300)
    assert np.all(windows[:, 1] >= 50) and np.all(windows[:, 1] + side <= 350)  # centre 300x300 square
    assert len({tuple(w) for w in windows}) > 10  # it is random
    again = run(mode, lambda s: augment.random_crop_window(shape, s, 224, 256), seed(3))
    np.testing.assert_array_equal(again, windows[3])  # and a pure function of the seed


@pytest.mark.parametrize("mode", MODES)
def test_decoded_window_is_the_requested_region(mode):
    pixels = coordinate_image(120, 160)
    data = tf.constant(encode(pixels, "PNG"))
    window = tf.constant([10, 30, 50, 50])
    crop = run(mode, augment.decode_window, data, window)
    np.testing.assert_array_equal(crop, pixels[10:60, 30:80])


@pytest.mark.parametrize("mode", MODES)
def test_flip_mirrors_or_keeps(mode):
    image = tf.constant(coordinate_image(8, 10).astype(np.float32))
    outcomes = set()
    for i in range(20):
        out = run(mode, augment.random_flip, image, seed(i))
        if np.array_equal(out, image.numpy()):
            outcomes.add("kept")
        else:
            np.testing.assert_array_equal(out, image.numpy()[:, ::-1])
            outcomes.add("flipped")
    assert outcomes == {"kept", "flipped"}


@pytest.mark.parametrize("mode", MODES)
def test_pca_noise_is_one_rgb_offset_with_the_papers_scale(mode):
    image = tf.zeros([4, 4, 3])
    offsets = np.array([run(mode, lambda im, s: augment.pca_lighting(im, s, 0.1), image, seed(i)) for i in range(400)])
    # the same offset at every pixel of one image
    assert np.allclose(offsets, offsets[:, :1, :1, :])
    offsets = offsets[:, 0, 0, :]
    eigvec, eigval = np.array(augment.PCA_EIGVEC), np.array(augment.PCA_EIGVAL)
    expected_std = np.sqrt(((eigvec * eigval * 0.1) ** 2).sum(axis=1))  # per RGB channel
    np.testing.assert_allclose(offsets.std(axis=0), expected_std, rtol=0.15)
    assert np.all(np.abs(offsets.mean(axis=0)) < 3 * expected_std / np.sqrt(400) + 1e-4)


@pytest.mark.parametrize("mode", MODES)
def test_eval_centre_crop_is_deterministic_and_centred(mode):
    pixels = coordinate_image(100, 200)
    data = tf.constant(encode(pixels, "PNG"))
    fn = lambda b: augment.eval_image(b, image_size=50, resize_size=100)  # noqa: E731
    out = run(mode, fn, data)
    np.testing.assert_array_equal(out, run(mode, fn, data))
    # undo the normalisation: the centre crop's middle column sits in the image's middle
    rgb = out * np.array(augment.STDDEV_RGB) + np.array(augment.MEAN_RGB)
    assert abs(rgb[25, 25, 1] - 0.5) < 0.02 and abs(rgb[25, 25, 0] - 0.5) < 0.02


@pytest.mark.parametrize("mode", MODES)
def test_ten_crops_are_corners_centre_and_mirrors(mode):
    pixels = coordinate_image(64, 64)
    data = tf.constant(encode(pixels, "PNG"))
    fn = lambda b: augment.eval_ten_crops(b, image_size=32, resize_size=64)  # noqa: E731
    crops = run(mode, fn, data)
    assert crops.shape == (10, 32, 32, 3)
    np.testing.assert_allclose(crops[5:], crops[:5, :, ::-1], atol=1e-6)
    rgb = crops * np.array(augment.STDDEV_RGB) + np.array(augment.MEAN_RGB)
    top_left, bottom_right = rgb[0, 0, 0], rgb[3, -1, -1]
    assert top_left[0] < 0.05 and top_left[1] < 0.05  # row 0, column 0
    assert bottom_right[0] > 0.95 and bottom_right[1] > 0.95


def test_normalize_uses_imagenet_statistics():
    out = augment.normalize(tf.constant(np.array(augment.MEAN_RGB, np.float32).reshape(1, 1, 3)))
    np.testing.assert_allclose(out.numpy(), 0.0, atol=1e-6)
