"""A 2-D convolution whose gradients are computed as plain matmuls and forward convolutions.

XLA:CPU runs forward NHWC convolutions through Eigen's fast spatial kernels, but
the convolutions that JAX's autodiff emits for the backward pass (batch and
feature dimensions swapped, dilated) fall to much slower paths; on a 2-core CPU
they were most of the gap to PyTorch (docs/performance.md). This module keeps the
forward convolution and rewrites the backward pass by hand:

- the filter gradient as one matmul of the input patches (gathered with strided
  slices, no convolution) with the output gradient. For a strided convolution
  (AlexNet's conv1) the patches are gathered channels-first, so the matmul's
  operands are already [K, M] and [M, N]: XLA:CPU ran the transposed-operand
  form about 2x slower;
- the input gradient of a stride-1 convolution as a forward convolution of the
  output gradient with the flipped, transposed filter. A strided convolution
  keeps lax's transpose (conv1's input gradient is never asked for, and XLA
  drops it).

The math is the convolution's: same parameters and outputs, gradients equal to
lax's up to float summation order (tests/model/test_fast_ops.py checks both).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

_DIMENSIONS = ("NHWC", "HWIO", "NHWC")


def lax_conv(images: jax.Array, kernel: jax.Array, stride: int, padding: int, groups: int = 1) -> jax.Array:
    """The reference: lax.conv_general_dilated on NHWC images and an HWIO kernel."""
    return lax.conv_general_dilated(
        images,
        kernel,
        (stride, stride),
        ((padding, padding), (padding, padding)),
        dimension_numbers=_DIMENSIONS,
        feature_group_count=groups,
    )


def conv(images: jax.Array, kernel: jax.Array, stride: int, padding: int, groups: int = 1) -> jax.Array:
    """Same result as `lax_conv`, with the hand-written backward pass described above.

    images: [N, H, W, C]; kernel: [kh, kw, C / groups, O]; returns [N, H', W', O].
    """
    if groups == 1:
        return _conv(images, kernel, stride, padding)
    in_per_group, out_per_group = images.shape[-1] // groups, kernel.shape[-1] // groups
    outputs = [
        _conv(
            images[..., g * in_per_group : (g + 1) * in_per_group],
            kernel[..., g * out_per_group : (g + 1) * out_per_group],
            stride,
            padding,
        )
        for g in range(groups)
    ]
    return jnp.concatenate(outputs, axis=-1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _conv(images, kernel, stride, padding):
    return lax_conv(images, kernel, stride, padding)


def _conv_fwd(images, kernel, stride, padding):
    return lax_conv(images, kernel, stride, padding), (images, kernel)


def _conv_bwd(stride, padding, residuals, out_grad):
    images, kernel = residuals
    if stride == 1:
        images_grad = _input_grad(out_grad, kernel, padding).astype(images.dtype)
        return images_grad, _kernel_grad(out_grad, images, kernel, padding)
    _, vjp = jax.vjp(lambda x: lax_conv(x, kernel, stride, padding), images)
    return vjp(out_grad)[0], _strided_kernel_grad(out_grad, images, kernel, stride, padding)


_conv.defvjp(_conv_fwd, _conv_bwd)


def patches(images: jax.Array, size: tuple[int, int], stride: int, padding: int, out_hw: tuple[int, int]) -> jax.Array:
    """[N, H', W', kh * kw, C]: the input window under every output position, by strided slices."""
    kh, kw = size
    out_h, out_w = out_hw
    padded = jnp.pad(images, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
    n, _, _, c = padded.shape
    windows = [
        lax.slice(
            padded,
            (0, i, j, 0),
            (n, i + stride * (out_h - 1) + 1, j + stride * (out_w - 1) + 1, c),
            (1, stride, stride, 1),
        )
        for i in range(kh)
        for j in range(kw)
    ]
    return jnp.stack(windows, axis=3)


def _kernel_grad(out_grad, images, kernel, padding):
    kh, kw, c, o = kernel.shape
    n, out_h, out_w, _ = out_grad.shape
    cols = patches(images, (kh, kw), 1, padding, (out_h, out_w)).reshape((n * out_h * out_w, kh * kw * c))
    grad = lax.dot_general(
        cols,
        out_grad.reshape((n * out_h * out_w, o)).astype(cols.dtype),
        (((0,), (0,)), ((), ())),
        preferred_element_type=jnp.float32,
    )  # [kh * kw * C, O]
    return grad.reshape(kernel.shape).astype(kernel.dtype)


def _strided_kernel_grad(out_grad, images, kernel, stride, padding):
    kh, kw, c, o = kernel.shape
    n, out_h, out_w, _ = out_grad.shape
    padded = jnp.pad(images, ((0, 0), (padding, padding), (padding, padding), (0, 0))).transpose((3, 0, 1, 2))
    windows = [
        lax.slice(
            padded,
            (0, 0, i, j),
            (c, n, i + stride * (out_h - 1) + 1, j + stride * (out_w - 1) + 1),
            (1, 1, stride, stride),
        )
        for i in range(kh)
        for j in range(kw)
    ]
    cols = jnp.stack(windows).reshape((kh * kw * c, n * out_h * out_w))  # [kh * kw * C, N * H' * W']
    grad = jnp.dot(
        cols, out_grad.reshape((n * out_h * out_w, o)).astype(cols.dtype), preferred_element_type=jnp.float32
    )
    return grad.reshape(kernel.shape).astype(kernel.dtype)


def _input_grad(out_grad, kernel, padding):
    kh, kw = kernel.shape[:2]
    flipped = jnp.flip(kernel, (0, 1)).transpose((0, 1, 3, 2)).astype(out_grad.dtype)  # [kh, kw, O, C]
    pads = ((kh - 1 - padding, kh - 1 - padding), (kw - 1 - padding, kw - 1 - padding))
    return lax.conv_general_dilated(out_grad, flipped, (1, 1), pads, dimension_numbers=_DIMENSIONS)


def conv_general_dilated(
    lhs,
    rhs,
    window_strides,
    padding,
    lhs_dilation=None,
    rhs_dilation=None,
    dimension_numbers=None,
    feature_group_count=1,
    precision=None,
    **kwargs,
):
    """A drop-in for lax.conv_general_dilated (flax's nn.Conv takes one) that routes to `conv`.

    Only the case `conv` covers goes there: NHWC/HWIO, equal strides, symmetric equal
    padding, no dilation, default precision. Anything else is lax's own.
    """
    fallback = functools.partial(
        lax.conv_general_dilated,
        lhs,
        rhs,
        window_strides,
        padding,
        lhs_dilation=lhs_dilation,
        rhs_dilation=rhs_dilation,
        dimension_numbers=dimension_numbers,
        feature_group_count=feature_group_count,
        precision=precision,
        **kwargs,
    )
    if lhs.ndim != 4 or kwargs or precision is not None or isinstance(padding, str):
        return fallback()
    expected = lax.conv_dimension_numbers(lhs.shape, rhs.shape, _DIMENSIONS)
    given = lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
    strides, pads = tuple(window_strides), [tuple(p) for p in padding]
    plain = all(d in (None, 1) or tuple(d) == (1, 1) for d in (lhs_dilation, rhs_dilation))
    if given != expected or not plain or strides[0] != strides[1] or len({*pads[0], *pads[1]}) != 1:
        return fallback()
    return conv(lhs, rhs, strides[0], pads[0][0], feature_group_count)


def max_pool(images: jax.Array, window: int, stride: int) -> jax.Array:
    """VALID max-pooling of NHWC images, the same as flax's nn.max_pool, with a hand-written backward.

    XLA lowers the autodiff of a max-pool to select-and-scatter, which is slow on
    the CPU. The backward here walks the window's taps in row-major order and
    sends each output's gradient to the first tap that equals the maximum: the
    same choice select-and-scatter makes, so the gradients are identical, ties included.
    """
    return _max_pool(images, window, stride)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def _max_pool(images, window, stride):
    return lax.reduce_window(images, -jnp.inf, lax.max, (1, window, window, 1), (1, stride, stride, 1), "VALID").astype(
        images.dtype
    )


def _max_pool_fwd(images, window, stride):
    pooled = _max_pool(images, window, stride)
    return pooled, (images, pooled)


def _max_pool_bwd(window, stride, residuals, out_grad):
    images, pooled = residuals
    n, height, width, channels = images.shape
    out_h, out_w = pooled.shape[1:3]
    taken = jnp.zeros(pooled.shape, bool)
    grad = jnp.zeros(images.shape, out_grad.dtype)
    zero = jnp.zeros((), out_grad.dtype)
    for i in range(window):
        for j in range(window):
            last_i, last_j = i + stride * (out_h - 1), j + stride * (out_w - 1)
            tap = lax.slice(images, (0, i, j, 0), (n, last_i + 1, last_j + 1, channels), (1, stride, stride, 1))
            hit = (tap == pooled) & ~taken  # [N, H', W', C]
            taken = taken | hit
            # Put each tap's share back where the tap came from: rows i, i + stride, ...
            pads = ((0, 0, 0), (i, height - 1 - last_i, stride - 1), (j, width - 1 - last_j, stride - 1), (0, 0, 0))
            grad = grad + lax.pad(jnp.where(hit, out_grad, zero), zero, pads)
    return (grad,)


_max_pool.defvjp(_max_pool_fwd, _max_pool_bwd)
