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
def test_train_image_is_uint8_pixels_and_one_colour_offset(mode, fmt):
    data = tf.constant(encode(coordinate_image(75, 100), fmt))
    fn = lambda b, s: augment.train_image(b, s, image_size=32, resize_size=37)  # noqa: E731
    image, offset = run(mode, fn, data, seed(0))
    assert image.shape == (32, 32, 3) and image.dtype == np.uint8
    assert offset.shape == (3,) and offset.dtype == np.float32 and np.any(offset != 0)
    assert np.abs(image[..., 2].astype(int) - 128).max() <= 6  # the constant blue survives (JPEG noise aside)
    _, no_noise = run(
        mode, lambda b, s: augment.train_image(b, s, image_size=32, resize_size=37, pca_noise_std=0), data, seed(0)
    )
    np.testing.assert_array_equal(no_noise, 0.0)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("method", augment.RESIZE_METHODS)
def test_resize_methods_agree_on_smooth_images_and_skip_same_size(mode, method):
    pixels = coordinate_image(90, 90)
    image = tf.constant(pixels)
    out = run(mode, lambda im: augment.resize(im, 60, method), image)
    assert out.shape == (60, 60, 3) and out.dtype == np.uint8
    expected = coordinate_image(60, 60).astype(np.float32)  # the same ramps, sampled at 60 points
    assert np.abs(out.astype(np.float32) - expected).max() <= 4.0
    same = run(mode, lambda im: augment.resize(im, 90, method), image)
    np.testing.assert_array_equal(same, pixels)  # a pre-resized window passes untouched
    bigger = run(mode, lambda im: augment.resize(im, 120, method), image)
    assert bigger.shape == (120, 120, 3)


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


def expected_pca_offset(pca_seed, stddev):
    """The paper's colour noise computed independently: P (alpha * lambda), alpha = stddev * N(0, 1) from the seed."""
    alpha = stddev * tf.random.stateless_normal([3], seed=pca_seed).numpy().astype(np.float64)
    return np.array(augment.PCA_EIGVEC) @ (alpha * np.array(augment.PCA_EIGVAL))


@pytest.mark.parametrize("mode", MODES)
def test_pca_noise_is_exactly_the_papers_offset_from_its_seed(mode):
    seeds = [seed(i) for i in range(20)]
    offsets = np.array([run(mode, lambda s: augment.pca_offset(s, 0.1), s) for s in seeds])
    expected = np.array([expected_pca_offset(s, 0.1) for s in seeds])
    np.testing.assert_allclose(offsets, expected, rtol=1e-5, atol=1e-8)
    assert len({tuple(o) for o in offsets.round(8)}) == 20  # every seed its own offset


@pytest.mark.parametrize("mode", MODES)
def test_train_image_takes_its_colour_offset_from_the_third_part_of_its_seed(mode):
    data = tf.constant(encode(coordinate_image(40, 50)))
    _, offset = run(mode, lambda b, s: augment.train_image(b, s, image_size=32, resize_size=37), data, seed(4))
    pca_seed = tf.random.experimental.stateless_split(seed(4), 3)[2]
    np.testing.assert_allclose(offset, expected_pca_offset(pca_seed, 0.1), rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("mode", MODES)
def test_eval_centre_crop_is_deterministic_and_centred(mode):
    pixels = coordinate_image(100, 200)
    data = tf.constant(encode(pixels, "PNG"))
    fn = lambda b: augment.eval_image(b, image_size=50, resize_size=100)  # noqa: E731
    out = run(mode, fn, data)
    np.testing.assert_array_equal(out, run(mode, fn, data))
    assert out.dtype == np.uint8
    # the centre crop's middle pixel sits in the image's middle
    rgb = out / 255.0
    assert abs(rgb[25, 25, 1] - 0.5) < 0.02 and abs(rgb[25, 25, 0] - 0.5) < 0.02


@pytest.mark.parametrize("mode", MODES)
def test_ten_crops_are_corners_centre_and_mirrors(mode):
    pixels = coordinate_image(64, 64)
    data = tf.constant(encode(pixels, "PNG"))
    fn = lambda b: augment.eval_ten_crops(b, image_size=32, resize_size=64)  # noqa: E731
    crops = run(mode, fn, data)
    assert crops.shape == (10, 32, 32, 3) and crops.dtype == np.uint8
    np.testing.assert_array_equal(crops[5:], crops[:5, :, ::-1])
    rgb = crops / 255.0
    top_left, bottom_right = rgb[0, 0, 0], rgb[3, -1, -1]
    assert top_left[0] < 0.05 and top_left[1] < 0.05  # row 0, column 0
    assert bottom_right[0] > 0.95 and bottom_right[1] > 0.95
