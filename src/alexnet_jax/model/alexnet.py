"""AlexNet in Flax linen: the paper's two-tower network and torchvision's variant.

This module is pure JAX/Flax. It knows nothing of data, configs or TensorFlow,
so the benchmark and the train step run on machines without TensorFlow.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from alexnet_jax.model import fast_ops, preprocess

VARIANTS = ("paper", "torchvision")
INITS = ("paper", "modern")
# How the convolutions and max-pools are differentiated. "fast": hand-written
# backward passes (fast_ops.py: matmuls, forward convolutions, masks), measured
# faster on XLA:CPU; "lax": JAX's autodiff of the lax ops. The math is the same
# either way. The caller picks (build.create_model resolves config "auto" by backend).
BACKWARD_IMPLS = ("fast", "lax")
# How the paper variant's grouped convolutions (conv2, conv4, conv5) run, a GPU speed
# lever (XLA's grouped-convolution backward pass is reported as slow as an ungrouped
# one, jax-ml/jax#13800): "grouped" is one convolution with feature_group_count=2,
# "split" two ungrouped convolutions over the channel halves, concatenated
# (split_grouped_conv). Same parameters (names, shapes, layout), same outputs.
GROUP_CONVS = ("grouped", "split")
# The precision of the LRN's band matmul (lax.Precision). On CPU all three compute in
# float32; on GPUs "high" and "default" may round its float32 inputs to TF32 (10
# mantissa bits), on TPUs "default" to bfloat16. LRN_PRECISION_RTOL bounds the
# relative error each gives on the LRN's output (tests/training/test_levers.py).
LRN_PRECISIONS = ("highest", "high", "default")
_LAX_PRECISION = {
    "highest": jax.lax.Precision.HIGHEST,
    "high": jax.lax.Precision.HIGH,
    "default": jax.lax.Precision.DEFAULT,
}
LRN_PRECISION_RTOL = {"highest": 1e-5, "high": 4e-4, "default": 3e-3}
# The paper's ablations (issue 24), each a switch with the paper's choice first: the
# hidden units' nonlinearity (section 3.1) and the max-pool window (section 3.4).
ACTIVATIONS = ("relu", "tanh")
POOLINGS = ("overlapping", "non_overlapping")  # 3x3 windows, stride 2 | 2x2 windows, stride 2

# Layer widths: conv1..conv5 then the two hidden fully connected layers (AlexNet.hidden_units
# overrides the last two; the paper's and torchvision's are HIDDEN_UNITS).
_WIDTHS = {
    "paper": (96, 256, 384, 384, 256, 4096, 4096),
    "torchvision": (64, 192, 384, 256, 256, 4096, 4096),
}
HIDDEN_UNITS = 4096
# The paper splits conv2, conv4 and conv5 across its two GPUs ("towers"); a
# feature group count of 2 reproduces that connectivity exactly.
_GROUPS = {
    "paper": (1, 2, 1, 2, 2),
    "torchvision": (1, 1, 1, 1, 1),
}
# The paper's towers: conv1..conv5 each hold this many halves ("GPUs"), and the LRN runs
# within a tower's maps, as on the paper's two GPUs (cuda-convnet normalised per GPU).
TOWERS = {"paper": 2, "torchvision": 1}
# Layers whose bias the paper initialises to 1 (to give ReLUs positive inputs early on).
_PAPER_BIAS_ONE = ("conv2", "conv4", "conv5", "fc6", "fc7")

# Our layer names and the torchvision state-dict prefixes they map onto, one to one.
TORCHVISION_NAMES = {
    "conv1": "features.0",
    "conv2": "features.3",
    "conv3": "features.6",
    "conv4": "features.8",
    "conv5": "features.10",
    "fc6": "classifier.1",
    "fc7": "classifier.4",
    "fc8": "classifier.6",
}

# The feature map the classifier sees: 6x6 for a 224 input, as in both peers.
POOLED_SIZE = 6


def min_image_size() -> int:
    """Smallest input side for which every pooling stage still has a 3x3 window."""
    size = 1
    while _final_map_size(size) < 1:
        size += 1
    return size


def _final_map_size(image_size: int) -> int:
    side = (image_size + 2 * 2 - 11) // 4 + 1  # conv1 11x11/4, padding 2
    for _ in range(3):  # pool1, pool2 and pool5; the convs between keep the size
        side = pooled_side(side)
    return side


def pooled_side(side: int) -> int:
    """A map's side after one pooling stage: the paper's 3x3/2 (55 -> 27 -> 13 -> 6), whichever the pooling."""
    return (side - 3) // 2 + 1


def max_pool(x: jax.Array, pooling: str, *, fast: bool) -> jax.Array:
    """One pooling stage [N, H, W, C] -> [N, pooled_side(H), pooled_side(W), C].

    "overlapping": the paper's 3x3 windows at stride 2. "non_overlapping": 2x2 windows
    at stride 2, the paper's comparison (s = z = 2), over the first 2 * pooled_side rows
    and columns, so the maps keep the paper's sizes and the parameters their count.
    At 224 that drops only the last row and column, as 2x2/2 VALID pooling does anyway
    on odd sides (55, 27, 13); on an even side it drops two.
    fast: fast_ops.max_pool's hand-written backward, else JAX's autodiff.
    """
    if pooling not in POOLINGS:
        raise ValueError(f"unknown pooling {pooling!r}; expected one of {POOLINGS}")
    window = 3 if pooling == "overlapping" else 2
    if pooling == "non_overlapping":
        height, width = (2 * pooled_side(side) for side in x.shape[1:3])
        x = x[:, :height, :width]
    if fast:
        return fast_ops.max_pool(x, window, 2)
    # By keyword: the ONNX exporter (jax2onnx) swaps in a keyword-only nn.max_pool while it traces.
    return nn.max_pool(x, window_shape=(window, window), strides=(2, 2), padding="VALID")


def local_response_norm(
    x: jax.Array,
    *,
    k: float = 2.0,
    n: int = 5,
    alpha: float = 1e-4,
    beta: float = 0.75,
    groups: int = 1,
    precision: str = "highest",
) -> jax.Array:
    """The paper's LRN across channels: b_i = a_i / (k + alpha * sum_j a_j^2) ** beta.

    The sum runs over the n channels centred on i (clipped at the edges, and at the
    edges of each of `groups` equal channel groups: the paper's towers, whose GPUs
    normalised only their own maps, so a tower on a device of its own needs nothing
    from the other). Note the
    paper's alpha is not divided by n (Caffe and PyTorch divide it). The windowed
    sum is a single matmul with a banded 0/1 matrix, which XLA fuses well on every
    backend and which differentiates cheaply. Computed in float32 for stability;
    precision: one of LRN_PRECISIONS, the band matmul's.
    """
    channels = x.shape[-1]
    idx = np.arange(channels)
    same_group = (idx[:, None] * groups // channels) == (idx[None, :] * groups // channels)
    band = ((np.abs(idx[:, None] - idx[None, :]) <= n // 2) & same_group).astype(np.float32)  # [C, C]
    x32 = x.astype(jnp.float32)
    window_sum = jnp.einsum("...c,cd->...d", x32 * x32, band, precision=_LAX_PRECISION[precision])
    return (x32 * (k + alpha * window_sum) ** -beta).astype(x.dtype)


def split_grouped_conv(lhs: jax.Array, rhs: jax.Array, *args: Any, conv=jax.lax.conv_general_dilated, **kwargs: Any):
    """A grouped convolution as one ungrouped `conv` per group, concatenated: the paper's towers.

    A drop-in for lax.conv_general_dilated (flax's nn.Conv takes one), with the same
    arguments and the same grouped kernel [kh, kw, C / G, O] (for NHWC/HWIO; other
    layouts by their dimension numbers): group g convolves input channels
    g*C/G..(g+1)*C/G with kernel[..., g*O/G:(g+1)*O/G] and gives output channels
    g*O/G..(g+1)*O/G, exactly what feature_group_count=G computes. Parameters (and so
    checkpoints) do not change; XLA sees G plain convolutions instead of one grouped one,
    whose backward pass it is reported to run as slowly as an ungrouped convolution's.
    One tower is split_grouped_conv's body for one g: a per-device tower needs no more.
    """
    groups = kwargs.pop("feature_group_count", 1)
    if groups == 1:
        return conv(lhs, rhs, *args, **kwargs)
    numbers = jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, kwargs.get("dimension_numbers"))
    lhs_channels, rhs_out, out_channels = numbers.lhs_spec[1], numbers.rhs_spec[0], numbers.out_spec[1]
    in_per_group, out_per_group = lhs.shape[lhs_channels] // groups, rhs.shape[rhs_out] // groups
    towers = [
        conv(
            jax.lax.slice_in_dim(lhs, g * in_per_group, (g + 1) * in_per_group, axis=lhs_channels),
            jax.lax.slice_in_dim(rhs, g * out_per_group, (g + 1) * out_per_group, axis=rhs_out),
            *args,
            **kwargs,
        )
        for g in range(groups)
    ]
    return jnp.concatenate(towers, axis=out_channels)


def adaptive_avg_pool(x: jax.Array, output_size: int) -> jax.Array:
    """torchvision's AdaptiveAvgPool2d for NHWC input, as two small matmuls.

    Bin i covers [floor(i*H/out), ceil((i+1)*H/out)). The identity at 6x6 (224 input).
    """
    _, height, width, _ = x.shape
    if height == output_size and width == output_size:
        return x
    rows = _pool_matrix(height, output_size)
    cols = _pool_matrix(width, output_size)
    return jnp.einsum("nhwc,ih,jw->nijc", x, rows.astype(x.dtype), cols.astype(x.dtype))


def _pool_matrix(size: int, output_size: int) -> np.ndarray:
    matrix = np.zeros((output_size, size), np.float32)
    for i in range(output_size):
        start = (i * size) // output_size
        end = -((-(i + 1) * size) // output_size)
        matrix[i, start:end] = 1.0 / (end - start)
    return matrix


def _initializers(init: str, name: str) -> dict[str, Any]:
    if init == "paper":
        bias = 1.0 if name in _PAPER_BIAS_ONE else 0.0
        return {
            "kernel_init": nn.initializers.normal(stddev=0.01),
            "bias_init": nn.initializers.constant(bias),
        }
    # He-normal fan-in, zero bias: trains from scratch without the paper's
    # careful learning-rate babysitting.
    return {
        "kernel_init": nn.initializers.variance_scaling(2.0, "fan_in", "truncated_normal"),
        "bias_init": nn.initializers.zeros,
    }


class PaperDropout(nn.Module):
    """Dropout as the paper had it: zero each unit with probability `rate` while training,
    and multiply every output by (1 - rate) at test time.

    Flax's nn.Dropout is "inverted" (divides by 1 - rate while training, identity at
    test). For the layer that follows, the two are not the same parameters: with
    inverted dropout fc7 and fc8 see inputs twice as large in training, so their
    weights, gradients, weight decay and effective learning rate all differ from the
    paper's by that factor. This module keeps the paper's exactly.
    """

    rate: float

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        if self.rate == 0.0:
            return x
        keep = 1.0 - self.rate
        if not train:
            return x * jnp.asarray(keep, x.dtype)
        mask = jax.random.bernoulli(self.make_rng("dropout"), keep, x.shape)
        return jnp.where(mask, x, jnp.zeros((), x.dtype))


FC_INPUTS = ("features", "batch")


@dataclasses.dataclass(frozen=True)
class Layout:
    """What share of each layer one device holds, in the model's own terms: injected by the caller.

    The model knows no mesh. Whoever places it (schemes.py) says how many devices share
    the paper's towers and the FC layers, and hands in `join` (the pieces of an
    activation that the devices sharing a layer hold, concatenated along `dim` in device
    order: an all-gather over its model axis) and `own` (this device's piece of an
    activation along `dim`). The default holds the whole network on every device.
    Parameters of a shared layer are slices of the whole layer's (logical_axes says which
    dimension), so every layout trains the same logical network.

    towers: devices sharing each conv layer, one of the paper's towers each (1 or 2).
    fc_shards: devices sharing fc6 and fc7 by units (and fc8 by classes, if split_classes).
    fc_input: how fc6's input arrives on those devices: "features" (each holds its towers'
      maps) or "batch" (each its own examples: the convs ran data-parallel, the weird trick).
    """

    towers: int = 1
    fc_shards: int = 1
    fc_input: str = "features"
    split_classes: bool = False
    join: Callable[[jax.Array, int], jax.Array] | None = None
    own: Callable[[jax.Array, int], jax.Array] | None = None


def logical_axes(variant: str, params: Any) -> Any:
    """Per parameter, a tuple naming each dimension that may split across devices, or None.

    "towers": a conv layer's output maps (kernel [kh, kw, in, out], bias [out]); a tower's
    kernel is a slice of the grouped kernel (conv2's [5, 5, 48, 256]: tower t holds
    [..., 128t:128(t+1)], which sees input maps 48t:48(t+1)). Only the paper has towers.
    "units": fc6's and fc7's output units. "classes": fc8's outputs.
    """

    def axes(path, leaf):
        layer = path[0].key
        if layer.startswith("conv"):
            last = "towers" if TOWERS[variant] > 1 else None
        else:
            last = "classes" if layer == "fc8" else "units"
        return (None,) * (np.ndim(leaf) - 1) + (last,)

    return jax.tree_util.tree_map_with_path(axes, params)


class AlexNet(nn.Module):
    """AlexNet returning logits for NHWC images: uint8 RGB pixels, or model-ready floats.

    variant: "paper" (96-256-384-384-256, two towers as feature groups, LRN, dropout
      on the outputs of fc6 and fc7 with the paper's test-time scaling) or
      "torchvision" (the "one weird trick" widths 64-192-384-256-256, no LRN,
      inverted dropout on the inputs of fc6 and fc7, so torchvision's weights load).
    dtype: the compute dtype; parameters stay float32.
    init_scheme: "paper" (N(0, 0.01) weights, bias 1 in conv2/4/5 and fc6/7) or "modern" (He).
    input_scale: how uint8 pixels become model input (preprocess.INPUT_SCALES): "raw" is
      the paper's centred 0-255 values, "standardized" torchvision's mean/std scaling.
    backward_impl: one of BACKWARD_IMPLS, chosen by the caller; the same math and
      parameters either way, only the speed differs.
    group_conv: one of GROUP_CONVS, how the paper's two-tower convolutions run; the same
      math and parameters either way.
    lrn_precision: one of LRN_PRECISIONS, the LRN band matmul's precision.
    activation, pooling, lrn: the paper's ablations (ACTIVATIONS, POOLINGS; lrn None =
      the variant's own: after conv1 and conv2 for the paper, none for torchvision).
      None of them changes a parameter's shape.
    hidden_units: fc6's and fc7's width (HIDDEN_UNITS, 4096, in the paper and torchvision);
      narrower networks for small data and for tests whose subject is not the width.
    layout: the share of each layer this device holds (Layout); the default is all of it.
    """

    variant: str = "paper"
    num_classes: int = 1000
    dropout_rate: float = 0.5
    dtype: Any = jnp.float32
    init_scheme: str = "paper"
    input_scale: str = "standardized"
    backward_impl: str = "lax"
    group_conv: str = "grouped"
    lrn_precision: str = "highest"
    activation: str = "relu"
    pooling: str = "overlapping"
    lrn: bool | None = None
    hidden_units: int = HIDDEN_UNITS
    layout: Layout = Layout()

    def _check(self, images: jax.Array) -> None:
        for name, value, allowed in (
            ("variant", self.variant, VARIANTS),
            ("init_scheme", self.init_scheme, INITS),
            ("backward_impl", self.backward_impl, BACKWARD_IMPLS),
            ("input_scale", self.input_scale, preprocess.INPUT_SCALES),
            ("group_conv", self.group_conv, GROUP_CONVS),
            ("lrn_precision", self.lrn_precision, LRN_PRECISIONS),
            ("activation", self.activation, ACTIVATIONS),
            ("pooling", self.pooling, POOLINGS),
        ):
            if value not in allowed:
                raise ValueError(f"unknown {name} {value!r}; expected one of {allowed}")
        if self.hidden_units < 1 or self.hidden_units % self.layout.fc_shards:
            raise ValueError(f"hidden_units={self.hidden_units} must be a positive multiple of {self.layout.fc_shards}")
        if self.lrn and self.variant != "paper":
            raise ValueError(f"the {self.variant} variant has no LRN; use lrn=None or False")
        if self.layout.towers not in {1, TOWERS[self.variant]} or self.layout.fc_input not in FC_INPUTS:
            raise ValueError(f"layout {self.layout} does not fit the {self.variant} variant")
        if _final_map_size(min(images.shape[1:3])) < 1:
            raise ValueError(
                f"images of {images.shape[1]}x{images.shape[2]} are too small for AlexNet: "
                f"use at least {min_image_size()}x{min_image_size()}"
            )

    @nn.compact
    def __call__(self, images: jax.Array, *, train: bool) -> jax.Array:
        self._check(images)
        paper = self.variant == "paper"
        # uint8 pixels are scaled here (preprocess.py); floats are taken as model-ready.
        x = preprocess.model_input(images, input_scale=self.input_scale).astype(self.dtype)  # [N, S, S, 3]
        x = self._features(x, lrn=paper if self.lrn is None else self.lrn)  # [N, 6, 6, C5]
        # Flatten in torchvision's C,H,W order so converted weights line up (and the towers'
        # maps, channels-major, join along the flat features in the same order).
        x = jnp.transpose(x, (0, 3, 1, 2)).reshape((x.shape[0], -1))  # [N, C5*36]
        layout = self.layout
        join_dim = 0 if layout.fc_input == "batch" else 1  # what fc6's input is split by
        for name, width in (("fc6", self.hidden_units), ("fc7", self.hidden_units)):
            if paper:  # fc -> ReLU -> dropout (the paper; Caffe's fc6, relu6, drop6)
                x = self._join_fc(x, join_dim)
                x = self._act(self._dense(width // layout.fc_shards, name)(x))
                x = PaperDropout(self.dropout_rate, name=f"drop_{name}")(x, train=train)
            else:  # dropout -> fc -> ReLU (torchvision's classifier); dropped where the input is split
                x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
                x = self._join_fc(x, join_dim)
                x = self._act(self._dense(width // layout.fc_shards, name)(x))
            join_dim = 1  # fc7's and fc8's inputs are split by units
        x = self._join_fc(x, 1)  # [N', hidden_units]
        split = layout.fc_shards if layout.split_classes else 1
        logits = self._dense(self.num_classes // split, "fc8")(x)
        if split > 1:
            logits = layout.join(logits, 1)
        if layout.fc_shards > 1 and layout.fc_input == "batch":
            logits = layout.own(logits, 0)  # this device's own examples again
        return logits.astype(jnp.float32)  # [N, num_classes]

    def _features(self, x: jax.Array, *, lrn: bool) -> jax.Array:
        """conv1..pool5 and the adaptive pooling: [N, S, S, 3] -> [N, 6, 6, C5]."""
        widths, groups = _WIDTHS[self.variant], _GROUPS[self.variant]
        fast = self.backward_impl == "fast"
        conv_op = fast_ops.conv_general_dilated if fast else jax.lax.conv_general_dilated
        if self.group_conv == "split":
            conv_op = functools.partial(split_grouped_conv, conv=conv_op)
        norm = functools.partial(local_response_norm, precision=self.lrn_precision)
        split = self.layout.towers  # devices sharing each conv layer, a tower each
        towers_here = TOWERS[self.variant] // split

        def conv(x, index, kernel, stride, padding):
            name = f"conv{index + 1}"
            if split > 1 and index > 0 and groups[index] == 1:
                x = self.layout.join(x, 3)  # conv3 sees every tower's maps: where the paper's GPUs talked
            return nn.Conv(
                widths[index] // split,
                (kernel, kernel),
                strides=(stride, stride),
                padding=((padding, padding), (padding, padding)),
                feature_group_count=max(1, groups[index] // split),
                conv_general_dilated=conv_op,
                dtype=self.dtype,
                param_dtype=jnp.float32,
                name=name,
                **_initializers(self.init_scheme, name),
            )(x)

        def pool(x):
            return max_pool(x, self.pooling, fast=fast)

        act = self._act
        x = act(conv(x, 0, 11, 4, 2))  # [N, 55, 55, C1] at S=224
        if lrn:
            x = norm(x, groups=towers_here)
        x = pool(x)  # [N, 27, 27, C1]
        x = act(conv(x, 1, 5, 1, 2))
        if lrn:
            x = norm(x, groups=towers_here)
        x = pool(x)  # [N, 13, 13, C2]
        x = act(conv(x, 2, 3, 1, 1))
        x = act(conv(x, 3, 3, 1, 1))
        x = act(conv(x, 4, 3, 1, 1))
        x = pool(x)  # [N, 6, 6, C5]
        return adaptive_avg_pool(x, POOLED_SIZE)

    def _act(self, x: jax.Array) -> jax.Array:
        """The hidden units' nonlinearity (every conv and hidden FC layer)."""
        return nn.relu(x) if self.activation == "relu" else jnp.tanh(x)

    def _join_fc(self, x: jax.Array, dim: int) -> jax.Array:
        return x if self.layout.fc_shards == 1 else self.layout.join(x, dim)

    def _dense(self, features: int, name: str) -> nn.Dense:
        return nn.Dense(
            features,
            dtype=self.dtype,
            param_dtype=jnp.float32,
            name=name,
            **_initializers(self.init_scheme, name),
        )


def count_params(params: Any) -> int:
    return sum(int(np.prod(leaf.shape)) for leaf in jax.tree_util.tree_leaves(params))


def train_flops_per_image(
    variant: str, image_size: int, num_classes: int = 1000, hidden_units: int = HIDDEN_UNITS
) -> float:
    """Analytic training FLOPs per image: 3x the forward multiply-adds, times 2.

    Counts convolutions and dense layers (the LRN, pooling and ReLUs are noise).
    """
    widths, groups = _WIDTHS[variant], _GROUPS[variant]
    specs = ((11, 4, 2), (5, 1, 2), (3, 1, 1), (3, 1, 1), (3, 1, 1))
    side, channels, macs = image_size, 3, 0
    for index, (kernel, stride, padding) in enumerate(specs):
        side = (side + 2 * padding - kernel) // stride + 1
        macs += side * side * widths[index] * kernel * kernel * channels // groups[index]
        channels = widths[index]
        if index in (0, 1, 4):
            side = pooled_side(side)
    features = channels * POOLED_SIZE * POOLED_SIZE
    for width in (hidden_units, hidden_units, num_classes):
        macs += features * width
        features = width
    return 2.0 * 3.0 * macs
