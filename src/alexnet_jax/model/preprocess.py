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

# ImageNet RGB statistics for pixels in [0, 1], as torchvision and fb.resnet.torch publish them. The PCA
# colour noise's eigenvalues and eigenvectors live with the augmentation (data/choices.py).
MEAN_RGB = (0.485, 0.456, 0.406)
STDDEV_RGB = (0.229, 0.224, 0.225)


# How uint8 pixels become model input.
#   "raw": the paper's "(centered) raw RGB values of the pixels": pixel - 255 * mean, no
#     division; the paper's N(0, 0.01) init, bias-1 init and LRN constants (k=2,
#     alpha=1e-4) assume this 0-255 scale. The paper variant's default.
#   "standardized": (pixel / 255 - mean) / std per channel (torchvision; its published
#     weights expect it). The torchvision variant's default, and what runs recorded
#     before the choice existed used.
INPUT_SCALES = ("raw", "standardized")
LEGACY_INPUT_SCALE = "standardized"


def default_input_scale(variant: str) -> str:
    """The input scale a variant's own recipe and weights assume."""
    return "raw" if variant == "paper" else "standardized"


def model_input(
    images: jax.Array, color_offsets: jax.Array | None = None, *, input_scale: str = "standardized"
) -> jax.Array:
    """uint8 RGB pixels [..., S, S, 3] -> float32 model input; float input passes through.

    color_offsets: [B, 3], the paper's PCA colour noise of each image in [0, 1] units
    (augment.pca_offset), or None. It is added to the pixels before the scaling, so in
    "raw" input it is 255 x offset in 0-255 pixel units: the same noise relative to the
    pixel range either way. One multiply-add per pixel. Float images are taken as
    already model-ready (tests, converted weights, callers that scale themselves).
    """
    if input_scale not in INPUT_SCALES:
        raise ValueError(f"unknown input_scale {input_scale!r}; expected one of {INPUT_SCALES}")
    if jnp.issubdtype(images.dtype, jnp.floating):
        if color_offsets is not None:
            raise ValueError("colour offsets apply to uint8 pixels; float images are already model-ready")
        return images
    if images.dtype != jnp.uint8:
        raise ValueError(f"images must be uint8 pixels or model-ready floats, got {images.dtype}")
    mean = jnp.asarray(MEAN_RGB, jnp.float32)
    # input = pixels * scale + shift (+ offset * 255 * scale), per channel.
    if input_scale == "raw":
        scale = jnp.ones(3, jnp.float32)
        shift = -255.0 * mean
    else:
        stddev = jnp.asarray(STDDEV_RGB, jnp.float32)
        scale = 1.0 / (255.0 * stddev)
        shift = -mean / stddev
    if color_offsets is not None:
        # [B, 3] -> [B, 1, ..., 1, 3] against images [B, ..., 3]
        offsets = color_offsets.astype(jnp.float32).reshape((color_offsets.shape[0],) + (1,) * (images.ndim - 2) + (3,))
        shift = shift + offsets * 255.0 * scale
    return images.astype(jnp.float32) * scale + shift
