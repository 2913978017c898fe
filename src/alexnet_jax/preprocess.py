"""Pixels to model input, on the device: the last step of preprocessing.

The input pipeline ships uint8 pixels (a quarter of the bytes of float32 to
batch, copy and transfer) and, for training, one PCA colour offset per image.
The scaling, the colour noise and the ImageNet normalisation happen here, in
the compiled step, where they fuse into conv1's input for free. Pure JAX, no
TensorFlow, so the benchmark runs on machines without it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# ImageNet RGB statistics for pixels in [0, 1] (REFERENCE.md).
MEAN_RGB = (0.485, 0.456, 0.406)
STDDEV_RGB = (0.229, 0.224, 0.225)
PCA_EIGVAL = (0.2175, 0.0188, 0.0045)
PCA_EIGVEC = (  # columns are the eigenvectors
    (-0.5675, 0.7192, 0.4009),
    (-0.5808, -0.0045, -0.8140),
    (-0.5836, -0.6948, 0.4203),
)


def model_input(images: jax.Array, color_offsets: jax.Array | None = None) -> jax.Array:
    """uint8 RGB pixels [..., S, S, 3] -> normalised float32; float input passes through.

    uint8 images become (pixels / 255 + offset - mean) / stddev per channel, one
    multiply-add. color_offsets: [B, 3], the paper's PCA colour noise of each
    image in [0, 1] units (pipeline.Augmentation.pca_noise_std), or None. Float
    images are taken as already normalised (torchvision's convention), so tests,
    converted weights and callers that normalise themselves keep working.
    """
    if jnp.issubdtype(images.dtype, jnp.floating):
        if color_offsets is not None:
            raise ValueError("colour offsets apply to uint8 pixels; float images are already normalised")
        return images
    if images.dtype != jnp.uint8:
        raise ValueError(f"images must be uint8 pixels or normalised floats, got {images.dtype}")
    stddev = jnp.asarray(STDDEV_RGB, jnp.float32)
    shift = -jnp.asarray(MEAN_RGB, jnp.float32) / stddev
    if color_offsets is not None:
        # [B, 3] -> [B, 1, ..., 1, 3] against images [B, ..., 3]
        offsets = color_offsets.astype(jnp.float32).reshape((color_offsets.shape[0],) + (1,) * (images.ndim - 2) + (3,))
        shift = shift + offsets / stddev
    return images.astype(jnp.float32) * (1.0 / (255.0 * stddev)) + shift
