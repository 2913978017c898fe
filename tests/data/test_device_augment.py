"""device_augment.train_crops: the paper's crop, flip and colour noise inside the compiled step.

Coordinates are written into the pixels (channel 0 = row, channel 1 = column), so
every crop's position and mirroring can be read back from its output.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from alexnet_jax.data import device_augment
from alexnet_jax.data.choices import PCA_EIGVAL, PCA_EIGVEC

SIZE, CROP = 12, 8
POSITIONS = SIZE - CROP + 1  # 5 per axis
COUNT = 5000


def coordinate_images(count: int) -> np.ndarray:
    """uint8 [count, SIZE, SIZE, 3]: (row, column, example index mod 256) in every pixel."""
    rows, cols = np.meshgrid(np.arange(SIZE), np.arange(SIZE), indexing="ij")
    image = np.stack([rows, cols, np.zeros_like(rows)], axis=-1).astype(np.uint8)
    images = np.repeat(image[None], count, axis=0)
    images[..., 2] = (np.arange(count) % 256)[:, None, None]
    return images


def read_back(crops: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(top, left, flipped) of each crop, from the coordinates in its pixels."""
    crops = crops.astype(np.int64)
    flipped = crops[:, 0, 1, 1] < crops[:, 0, 0, 1]
    top = crops[:, 0, 0, 0]
    left = np.where(flipped, crops[:, 0, -1, 1], crops[:, 0, 0, 1])
    return top, left, flipped


@pytest.fixture(scope="module")
def augmented():
    images = coordinate_images(COUNT)
    ids = np.arange(COUNT, dtype=np.int32) * 7 + 3  # ids as the packed reader makes them: position * P + process
    run = jax.jit(lambda im, i: device_augment.train_crops(im, i, seed=42, image_size=CROP, pca_noise_std=0.1))
    crops, color = run(images, ids)
    return images, ids, np.asarray(crops), np.asarray(color)


def expected_draws(seed: int, example_id: int, stddev: float = 0.1):
    """The documented derivation, recomputed here step by step."""
    key = jax.random.fold_in(jax.random.PRNGKey(seed), example_id)
    crop_key, flip_key, color_key = jax.random.split(key, 3)
    top, left = np.asarray(jax.random.randint(crop_key, (2,), 0, SIZE - CROP + 1))
    flip = bool(jax.random.uniform(flip_key) < 0.5)
    alpha = stddev * np.asarray(jax.random.normal(color_key, (3,)), np.float64)
    color = np.asarray(PCA_EIGVEC, np.float64) @ (alpha * np.asarray(PCA_EIGVAL, np.float64))
    return int(top), int(left), flip, color


def test_crops_are_exact_windows_of_the_image(augmented):
    images, _, crops, _ = augmented
    assert crops.shape == (COUNT, CROP, CROP, 3) and crops.dtype == np.uint8
    top, left, flipped = read_back(crops)
    for index in range(0, COUNT, 97):
        window = images[index, top[index] : top[index] + CROP, left[index] : left[index] + CROP]
        np.testing.assert_array_equal(crops[index], window[:, ::-1] if flipped[index] else window)


def test_crop_positions_are_uniform_over_every_position(augmented):
    _, _, crops, _ = augmented
    top, left, _ = read_back(crops)
    assert top.min() == 0 and top.max() == POSITIONS - 1 and left.min() == 0 and left.max() == POSITIONS - 1
    counts = np.bincount(top * POSITIONS + left, minlength=POSITIONS * POSITIONS)
    assert counts.min() > 0
    _, p_joint = stats.chisquare(counts)
    _, p_top = stats.chisquare(np.bincount(top, minlength=POSITIONS))
    _, p_left = stats.chisquare(np.bincount(left, minlength=POSITIONS))
    assert min(p_joint, p_top, p_left) > 1e-3, (counts, p_joint, p_top, p_left)
    # Top and left are drawn independently: no correlation.
    assert abs(np.corrcoef(top, left)[0, 1]) < 0.05


def test_flip_rate_is_one_half(augmented):
    _, _, crops, _ = augmented
    _, _, flipped = read_back(crops)
    assert abs(flipped.mean() - 0.5) < 3 * np.sqrt(0.25 / COUNT)


def test_draws_follow_the_documented_derivation_exactly(augmented):
    _, ids, crops, color = augmented
    top, left, flipped = read_back(crops)
    for index in range(0, COUNT, 251):
        want_top, want_left, want_flip, want_color = expected_draws(42, int(ids[index]))
        assert (top[index], left[index], flipped[index]) == (want_top, want_left, want_flip)
        np.testing.assert_allclose(color[index], want_color, rtol=1e-5, atol=1e-8)
        # A std off by 10% would not pass.
        for wrong in (0.09, 0.11):
            assert not np.allclose(color[index], expected_draws(42, int(ids[index]), wrong)[3], rtol=1e-3, atol=0)


def test_colour_noise_has_the_paper_scale(augmented):
    _, _, _, color = augmented
    eigvec, eigval = np.asarray(PCA_EIGVEC), np.asarray(PCA_EIGVAL)
    alpha = np.linalg.solve(eigvec, color.T.astype(np.float64)).T / eigval  # [COUNT, 3]
    assert np.all(np.abs(alpha.mean(axis=0)) < 4 * 0.1 / np.sqrt(COUNT))
    assert np.all(np.abs(alpha.std(axis=0) - 0.1) < 0.005)  # 0.09 or 0.11 would fail


def test_pure_function_of_seed_and_id(augmented):
    images, ids, crops, color = augmented
    # The same ids in another batch, order and composition: the same draws.
    picked = np.array([17, 3, 4000, 17])
    again, again_color = device_augment.train_crops(
        jnp.asarray(images[picked]), jnp.asarray(ids[picked]), seed=42, image_size=CROP, pca_noise_std=0.1
    )
    np.testing.assert_array_equal(np.asarray(again), crops[picked])
    np.testing.assert_allclose(np.asarray(again_color), color[picked], rtol=1e-6, atol=1e-9)  # eager vs jit
    # Different ids draw differently; another seed too.
    assert len({tuple(c) for c in color[:100].round(7)}) == 100
    top, left, _ = read_back(crops)
    assert len(set(zip(top[:50], left[:50]))) > 10
    _, other_color = device_augment.train_crops(
        jnp.asarray(images[:100]), jnp.asarray(ids[:100]), seed=43, image_size=CROP, pca_noise_std=0.1
    )
    assert not np.any(np.all(np.asarray(other_color) == color[:100], axis=1))


def test_switches(augmented):
    images, ids, crops, _ = augmented
    plain, zeros = device_augment.train_crops(
        jnp.asarray(images[:200]), jnp.asarray(ids[:200]), seed=42, image_size=CROP, flip=False, pca_noise_std=0.0
    )
    assert np.asarray(zeros).shape == (200, 3) and not np.asarray(zeros).any()
    top, left, flipped = read_back(np.asarray(plain))
    want_top, want_left, _ = read_back(crops[:200])
    assert not flipped.any() and (top == want_top).all() and (left == want_left).all()  # same windows, unflipped
    full, _ = device_augment.train_crops(jnp.asarray(images[:4]), jnp.asarray(ids[:4]), seed=0, image_size=SIZE)
    np.testing.assert_array_equal(read_back(np.asarray(full))[0], 0)  # image_size = size: the one position
    with pytest.raises(ValueError, match="image_size"):
        device_augment.train_crops(jnp.asarray(images[:4]), jnp.asarray(ids[:4]), seed=0, image_size=SIZE + 1)


def test_under_pmap_over_eight_devices(augmented):
    images, ids, crops, color = augmented
    devices = jax.local_device_count()
    assert devices == 8
    count = devices * 16
    step = jax.pmap(
        lambda im, i: device_augment.train_crops(im, i, seed=42, image_size=CROP, pca_noise_std=0.1),
        axis_name="batch",
    )
    sharded_crops, sharded_color = step(
        images[:count].reshape(devices, 16, SIZE, SIZE, 3), ids[:count].reshape(devices, 16)
    )
    np.testing.assert_array_equal(np.asarray(sharded_crops).reshape(count, CROP, CROP, 3), crops[:count])
    np.testing.assert_allclose(np.asarray(sharded_color).reshape(count, 3), color[:count], rtol=1e-6, atol=1e-9)
