"""The paper's training augmentation on the device, for batches of whole packed images.

A packed dataset (data/pack.py) holds every image as its central 256x256 patch
(the paper's "resize the shorter side to 256, take the centre"), so the host
only copies records and the random 224x224 crop, the horizontal flip and the
PCA colour noise happen here, inside the compiled train step, where they are a
gather and a select on pixels already in device memory. Pure JAX, no
TensorFlow: it runs on machines that have none.

Every draw is a pure function of (seed, example id), so a resumed run, any
device count and any process count see the same augmentation of an example:

    key = jax.random.fold_in(jax.random.PRNGKey(seed), example_id)
    crop_key, flip_key, color_key = jax.random.split(key, 3)
    top, left = jax.random.randint(crop_key, [2], 0, size - image_size + 1)   # uniform over positions
    flip = jax.random.uniform(flip_key) < 0.5
    alpha = pca_noise_std * jax.random.normal(color_key, [3])
    color = PCA_EIGVEC @ (alpha * PCA_EIGVAL)                                # [3], pixels in [0, 1] units

The colour offset is the same [0, 1]-unit RGB offset augment.pca_offset makes on
the host path; preprocess.model_input adds it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from alexnet_jax.data.choices import PCA_EIGVAL, PCA_EIGVEC


def example_keys(seed: int | jax.Array, example_ids: jax.Array) -> jax.Array:
    """[B] example ids -> [B, 3, 2] uint32 keys (crop, flip, colour) of each example."""

    def keys(example_id):
        key = jax.random.fold_in(jax.random.PRNGKey(seed), example_id)
        return jax.random.split(key, 3)

    return jax.vmap(keys)(example_ids)


def crop_offsets(crop_keys: jax.Array, *, size: int, image_size: int) -> jax.Array:
    """[B, 2] int32 (top, left), each uniform over 0..size - image_size inclusive."""
    return jax.vmap(lambda key: jax.random.randint(key, (2,), 0, size - image_size + 1, dtype=jnp.int32))(crop_keys)


def pca_offsets(color_keys: jax.Array, stddev: float) -> jax.Array:
    """[B, 3] float32: the paper's colour noise P (alpha * lambda), alpha ~ N(0, stddev), per example."""
    alpha = stddev * jax.vmap(lambda key: jax.random.normal(key, (3,), jnp.float32))(color_keys)  # [B, 3]
    eigvec = jnp.asarray(PCA_EIGVEC, jnp.float32)  # [3 (RGB), 3 (components)]
    eigval = jnp.asarray(PCA_EIGVAL, jnp.float32)
    # eigvec @ (alpha_b * eigval) per row b, as a sum of products: a matmul would run at TF32 on GPUs.
    return jnp.sum(eigvec[None] * (alpha * eigval)[:, None, :], axis=-1)


def train_crops(
    images: jax.Array,
    example_ids: jax.Array,
    *,
    seed: int | jax.Array,
    image_size: int,
    flip: bool = True,
    pca_noise_std: float = 0.1,
    random_crop: bool = True,
) -> tuple[jax.Array, jax.Array]:
    """uint8 [B, size, size, 3] packed images -> (uint8 [B, image_size, image_size, 3], float32 [B, 3] offsets).

    Call inside the jit/pmap-compiled step on each device's slice of the batch;
    example_ids: int32 [B] from packed.train_batches. pca_noise_std=0 gives zero
    offsets; flip=False leaves the other draws unchanged; random_crop=False takes every
    example's centre crop (packed.eval_crops' window), the other draws unchanged.
    """
    batch, height, width, channels = images.shape
    if height != width or channels != 3:
        raise ValueError(f"packed images must be [B, size, size, 3], got {images.shape}")
    if not 0 < image_size <= height:
        raise ValueError(f"image_size={image_size} must lie in 1..{height}, the packed images' side")
    if example_ids.shape != (batch,):
        raise ValueError(f"example_ids must be [{batch}], got {example_ids.shape}")
    keys = example_keys(seed, example_ids)  # [B, 3, 2]
    if random_crop:
        offsets = crop_offsets(keys[:, 0], size=height, image_size=image_size)  # [B, 2]
    else:
        offsets = jnp.full((batch, 2), (height - image_size) // 2, jnp.int32)

    def crop(image, offset):
        return lax.dynamic_slice(image, (offset[0], offset[1], 0), (image_size, image_size, 3))

    crops = jax.vmap(crop)(images, offsets)  # [B, S, S, 3]
    if flip:
        mirror = jax.vmap(lambda key: jax.random.uniform(key) < 0.5)(keys[:, 1])  # [B]
        crops = jnp.where(mirror[:, None, None, None], crops[:, :, ::-1], crops)
    if pca_noise_std <= 0:
        return crops, jnp.zeros((batch, 3), jnp.float32)
    return crops, pca_offsets(keys[:, 2], pca_noise_std)
