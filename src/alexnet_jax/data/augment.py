"""The paper's data augmentation as pure TensorFlow ops on encoded images.

Every op works eagerly and inside tf.data, and all randomness is stateless: an
op's output is a pure function of its inputs and a [2] int seed, so tf.data can
run it in parallel and a resumed run draws the same numbers.

The paper resizes the shorter side to 256, takes the centre 256x256, then a
random 224x224 crop. We pick the same window in the original image's
coordinates and decode only that window (`decode_and_crop_jpeg`), which skips
most of the IDCT work, then resize the window to image_size.

Images leave as uint8 pixels: a quarter of the bytes of float32 to batch, copy
and send to the device. The PCA colour noise leaves as one RGB offset per image
([3] float32); adding it and the ImageNet normalisation happen on the device
(preprocess.model_input), where they cost nothing measurable.
"""

from __future__ import annotations

import tensorflow as tf

from alexnet_jax.data.choices import EVAL_CROPS, PCA_EIGVAL, PCA_EIGVEC, RESIZE_METHODS


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


def resize(image: tf.Tensor, image_size: int, method: str = "bilinear") -> tf.Tensor:
    """uint8 [h, w, 3] (square) -> uint8 [image_size, image_size, 3], rounded.

    "bilinear" (half-pixel centres, no antialiasing, as TensorFlow's ResNet and
    tf_cnn_benchmarks pipelines do): about 0.3 ms for a 328-pixel window here.
    "area" averages every source pixel when shrinking (antialiased, about 1.5x
    the cost; bilinear when enlarging). See bench/input_pipeline.py.
    """
    if method not in RESIZE_METHODS:
        raise ValueError(f"unknown resize method {method!r}; expected one of {RESIZE_METHODS}")
    size = tf.constant([image_size, image_size])

    def shrink_or_enlarge():
        batch = image[None]
        if method == "area":
            resized = tf.cond(
                tf.shape(image)[0] > image_size,
                lambda: tf.raw_ops.ResizeArea(images=batch, size=size),
                lambda: tf.raw_ops.ResizeBilinear(images=batch, size=size, half_pixel_centers=True),
            )
        else:
            resized = tf.raw_ops.ResizeBilinear(images=batch, size=size, half_pixel_centers=True)
        # Convex combinations of uint8 pixels stay in [0, 255]: +0.5 then truncation rounds.
        return tf.cast(resized[0] + 0.5, tf.uint8)

    # A pre-resized dataset (shorter side = resize_size) gives windows of exactly image_size: no resize.
    same = tf.reduce_all(tf.shape(image)[:2] == size)
    image = tf.cond(same, lambda: image, shrink_or_enlarge)
    return tf.ensure_shape(image, [image_size, image_size, 3])


def random_flip(image: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
    flip = tf.random.stateless_uniform([], seed=seed) < 0.5
    return tf.cond(flip, lambda: tf.reverse(image, axis=[1]), lambda: image)


def pca_offset(seed: tf.Tensor, stddev: float) -> tf.Tensor:
    """The paper's colour noise of one image: the RGB offset [3] P (alpha * lambda), alpha ~ N(0, stddev).

    One alpha per image (per use of the image); the same offset is added to every
    pixel in [0, 1] units, on the device (preprocess.model_input).
    """
    alpha = tf.random.stateless_normal([3], seed=seed, stddev=stddev)
    eigvec = tf.constant(PCA_EIGVEC, tf.float32)
    return tf.reduce_sum(eigvec * (alpha * tf.constant(PCA_EIGVAL, tf.float32)), axis=1)


def train_image(
    image_bytes: tf.Tensor,
    seed: tf.Tensor,
    *,
    image_size: int,
    resize_size: int,
    flip: bool = True,
    pca_noise_std: float = 0.1,
    resize_method: str = "bilinear",
    random_crop: bool = True,
) -> tuple[tf.Tensor, tf.Tensor]:
    """Encoded image -> (uint8 [image_size, image_size, 3] random crop, float32 [3] colour offset).

    random_crop=False takes evaluation's centre window instead (the ablation of section 4.1);
    the flip and colour draws stay as they were.
    """
    crop_seed, flip_seed, pca_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 3))
    shape = image_shape(image_bytes)
    if random_crop:
        window = random_crop_window(shape, crop_seed, image_size, resize_size)
    else:
        window = center_crop_window(shape, image_size, resize_size)
    image = decode_window(image_bytes, window)  # uint8 [side, side, 3]
    if flip:  # mirroring commutes with the resize; on uint8 it moves a quarter of the bytes
        image = random_flip(image, flip_seed)
    image = resize(image, image_size, resize_method)
    offset = pca_offset(pca_seed, pca_noise_std) if pca_noise_std > 0 else tf.zeros([3])
    return image, offset


def eval_image(
    image_bytes: tf.Tensor, *, image_size: int, resize_size: int, resize_method: str = "bilinear"
) -> tf.Tensor:
    """Encoded image -> uint8 [image_size, image_size, 3] centre crop."""
    window = center_crop_window(image_shape(image_bytes), image_size, resize_size)
    return resize(decode_window(image_bytes, window), image_size, resize_method)


def eval_ten_crops(
    image_bytes: tf.Tensor, *, image_size: int, resize_size: int, resize_method: str = "bilinear"
) -> tf.Tensor:
    """The paper's test: uint8 [10, S, S, 3] = four corners and centre, then their mirror images."""
    image = tf.io.decode_image(image_bytes, channels=3, expand_animations=False)
    windows = corner_crop_windows(tf.shape(image)[:2], image_size, resize_size)
    crops = tf.map_fn(
        lambda w: resize(tf.image.crop_to_bounding_box(image, w[0], w[1], w[2], w[3]), image_size, resize_method),
        windows,
        fn_output_signature=tf.uint8,
    )  # [5, S, S, 3]
    return tf.concat([crops, tf.reverse(crops, axis=[2])], axis=0)


def eval_images(
    image_bytes: tf.Tensor, *, crops: int, image_size: int, resize_size: int, resize_method: str = "bilinear"
) -> tf.Tensor:
    """What evaluation feeds the model: uint8 [S, S, 3] (crops=1, the centre) or [10, S, S, 3] (crops=10)."""
    sizes = dict(image_size=image_size, resize_size=resize_size, resize_method=resize_method)
    if crops == 10:
        return eval_ten_crops(image_bytes, **sizes)
    if crops == 1:
        return eval_image(image_bytes, **sizes)
    raise ValueError(f"crops={crops} is unsupported; use one of {EVAL_CROPS}")
