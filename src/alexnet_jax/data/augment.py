"""The paper's data augmentation as pure TensorFlow ops on encoded images.

Every op works eagerly and inside tf.data, and all randomness is stateless: an
op's output is a pure function of its inputs and a [2] int seed, so tf.data can
run it in parallel and a resumed run draws the same numbers.

The paper resizes the shorter side to 256, takes the centre 256x256, then a
random 224x224 crop. We pick the same window in the original image's
coordinates and decode only that window (`decode_and_crop_jpeg`), which skips
most of the IDCT work, then resize the window to image_size.
"""

from __future__ import annotations

import tensorflow as tf

# ImageNet RGB statistics for pixels in [0, 1] (REFERENCE.md).
MEAN_RGB = (0.485, 0.456, 0.406)
STDDEV_RGB = (0.229, 0.224, 0.225)
PCA_EIGVAL = (0.2175, 0.0188, 0.0045)
PCA_EIGVEC = (  # columns are the eigenvectors
    (-0.5675, 0.7192, 0.4009),
    (-0.5808, -0.0045, -0.8140),
    (-0.5836, -0.6948, 0.4203),
)


def image_shape(image_bytes: tf.Tensor) -> tf.Tensor:
    """[height, width] of an encoded JPEG or PNG without a full decode for JPEG."""
    return tf.cond(
        tf.io.is_jpeg(image_bytes),
        lambda: tf.io.extract_jpeg_shape(image_bytes)[:2],
        lambda: tf.shape(tf.io.decode_image(image_bytes, channels=3, expand_animations=False))[:2],
    )


def decode_window(image_bytes: tf.Tensor, window: tf.Tensor) -> tf.Tensor:
    """Decode only `window` = [top, left, height, width] to uint8 RGB [h, w, 3].

    JPEGs decode just the window; other formats (PNG, also when named .JPEG)
    decode whole and are sliced.
    """

    def jpeg():
        return tf.io.decode_and_crop_jpeg(image_bytes, window, channels=3)

    def other():
        image = tf.io.decode_image(image_bytes, channels=3, expand_animations=False)
        return tf.image.crop_to_bounding_box(image, window[0], window[1], window[2], window[3])

    image = tf.cond(tf.io.is_jpeg(image_bytes), jpeg, other)
    return tf.ensure_shape(image, [None, None, 3])


def crop_side(shape: tf.Tensor, image_size: int, resize_size: int) -> tf.Tensor:
    """Side in original pixels of a window that becomes image_size after the resize."""
    shorter = tf.minimum(shape[0], shape[1])
    side = tf.cast(tf.round(tf.cast(shorter, tf.float32) * image_size / resize_size), tf.int32)
    return tf.clip_by_value(side, 1, shorter)


def random_crop_window(shape: tf.Tensor, seed: tf.Tensor, image_size: int, resize_size: int) -> tf.Tensor:
    """[top, left, side, side]: a random image_size crop of the centre resize_size square."""
    shorter = tf.minimum(shape[0], shape[1])
    side = crop_side(shape, image_size, resize_size)
    square_top = (shape[0] - shorter) // 2
    square_left = (shape[1] - shorter) // 2
    offsets = tf.random.stateless_uniform([2], seed=seed, minval=0, maxval=shorter - side + 1, dtype=tf.int32)
    return tf.stack([square_top + offsets[0], square_left + offsets[1], side, side])


def center_crop_window(shape: tf.Tensor, image_size: int, resize_size: int) -> tf.Tensor:
    side = crop_side(shape, image_size, resize_size)
    return tf.stack([(shape[0] - side) // 2, (shape[1] - side) // 2, side, side])


def corner_crop_windows(shape: tf.Tensor, image_size: int, resize_size: int) -> tf.Tensor:
    """The paper's five test windows [5, 4]: four corners and the centre of the centre square."""
    shorter = tf.minimum(shape[0], shape[1])
    side = crop_side(shape, image_size, resize_size)
    top = (shape[0] - shorter) // 2
    left = (shape[1] - shorter) // 2
    far = shorter - side
    tops = tf.stack([top, top, top + far, top + far, (shape[0] - side) // 2])
    lefts = tf.stack([left, left + far, left, left + far, (shape[1] - side) // 2])
    sides = tf.fill([5], side)
    return tf.stack([tops, lefts, sides, sides], axis=1)


def resize(image: tf.Tensor, image_size: int) -> tf.Tensor:
    """uint8 [h, w, 3] (square) -> float32 [image_size, image_size, 3] in [0, 255].

    Shrinking averages every source pixel's area (a box filter: antialiased, and
    about half the cost of bilinear with antialias=True, the largest single cost
    of the training pipeline after the JPEG decode); enlarging is bilinear.
    """
    size = [image_size, image_size]
    return tf.cond(
        tf.shape(image)[0] > image_size,
        lambda: tf.image.resize(image, size, method="area"),
        lambda: tf.image.resize(image, size, method="bilinear"),
    )


def random_flip(image: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
    flip = tf.random.stateless_uniform([], seed=seed) < 0.5
    return tf.cond(flip, lambda: tf.reverse(image, axis=[1]), lambda: image)


def pca_lighting(image: tf.Tensor, seed: tf.Tensor, stddev: float) -> tf.Tensor:
    """The paper's colour noise on a [0, 1] image: add P (alpha * lambda), alpha ~ N(0, stddev).

    One alpha per image (per use of the image), the same RGB offset for every pixel.
    """
    return image + pca_offset(seed, stddev)


def pca_offset(seed: tf.Tensor, stddev: float) -> tf.Tensor:
    """The RGB offset [3] of pca_lighting: P (alpha * lambda), alpha ~ N(0, stddev)."""
    alpha = tf.random.stateless_normal([3], seed=seed, stddev=stddev)
    eigvec = tf.constant(PCA_EIGVEC, tf.float32)
    return tf.linalg.matvec(eigvec, alpha * tf.constant(PCA_EIGVAL, tf.float32))


def normalize(image: tf.Tensor) -> tf.Tensor:
    """[0, 1] RGB -> zero mean, unit variance per channel with ImageNet statistics."""
    return (image - tf.constant(MEAN_RGB)) / tf.constant(STDDEV_RGB)


def train_image(
    image_bytes: tf.Tensor,
    seed: tf.Tensor,
    *,
    image_size: int,
    resize_size: int,
    flip: bool = True,
    pca_noise_std: float = 0.1,
) -> tf.Tensor:
    """Encoded image -> augmented float32 [image_size, image_size, 3] for training."""
    crop_seed, flip_seed, pca_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 3))
    window = random_crop_window(image_shape(image_bytes), crop_seed, image_size, resize_size)
    image = decode_window(image_bytes, window)  # uint8 [side, side, 3]
    if flip:  # mirroring commutes with the resize; on uint8 it moves a quarter of the bytes
        image = random_flip(image, flip_seed)
    image = resize(image, image_size)  # float32 in [0, 255]
    offset = pca_offset(pca_seed, pca_noise_std) if pca_noise_std > 0 else tf.zeros([3])
    # normalize(image / 255 + offset) as one multiply-add: each full-image op costs as much as the flip.
    stddev = tf.constant(STDDEV_RGB)
    return image * (1.0 / (255.0 * stddev)) + (offset - tf.constant(MEAN_RGB)) / stddev


def eval_image(image_bytes: tf.Tensor, *, image_size: int, resize_size: int) -> tf.Tensor:
    """Encoded image -> centre crop float32 [image_size, image_size, 3]."""
    window = center_crop_window(image_shape(image_bytes), image_size, resize_size)
    return normalize(resize(decode_window(image_bytes, window), image_size) / 255.0)


def eval_ten_crops(image_bytes: tf.Tensor, *, image_size: int, resize_size: int) -> tf.Tensor:
    """The paper's test: [10, S, S, 3] = four corners and centre, then their mirror images."""
    image = tf.io.decode_image(image_bytes, channels=3, expand_animations=False)
    windows = corner_crop_windows(tf.shape(image)[:2], image_size, resize_size)
    crops = tf.map_fn(
        lambda w: resize(tf.image.crop_to_bounding_box(image, w[0], w[1], w[2], w[3]), image_size),
        windows,
        fn_output_signature=tf.float32,
    )  # [5, S, S, 3]
    crops = tf.concat([crops, tf.reverse(crops, axis=[2])], axis=0)
    return normalize(crops / 255.0)
