"""The compiled parts of training and evaluation: state, model, train and eval steps.

Pure JAX/Flax/optax: no TensorFlow and no ml_collections, so the benchmark runs the
very same step on GPU machines that have neither. The steps are pure functions bound
with functools.partial; how they are placed on devices (pmap, or jit with shard_map on
a mesh) is a parallelism scheme's business (schemes.py), never a copy of the step.
Under pmap the state goes in unreplicated (in_axes=None) and is kept identical on every
device by reducing the gradients, so what comes back is one state, not one per device.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from alexnet_jax.data import device_augment
from alexnet_jax.model import alexnet as model_lib
from alexnet_jax.model import preprocess
from alexnet_jax.step import metrics as metrics_lib

# config.prng_impl: the key implementation of the dropout random bits (JAX's names in
# the values). "threefry" is JAX's default and what runs before the option used;
# "rbg" and "unsafe_rbg" draw bits with XLA's RngBitGenerator, faster on accelerators.
# Each is a pure function of (seed, step, device), so exact resume holds for each, but
# the masks differ between them: a run keeps the one it started with.
PRNG_IMPLS = {"threefry": "threefry2x32", "rbg": "rbg", "unsafe_rbg": "unsafe_rbg"}
# config.parallelism: "pmap" and "shard_map" place the whole network on every local device;
# "data", "towers" and "weird_trick" place it on a mesh of all devices (schemes.py).
AXIS = "batch"  # the pmap (and data mesh) axis name the steps reduce over
PARALLELISMS = ("pmap", "shard_map", "data", "towers", "weird_trick")


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: optimizer updates applied so far
    params: Any
    opt_state: Any


def init_state(
    model: model_lib.AlexNet, tx: optax.GradientTransformation, rng: jax.Array, image_size: int
) -> TrainState:
    @jax.jit
    def init(rng):
        images = jnp.zeros((1, image_size, image_size, 3), jnp.float32)
        params = model.init({"params": rng}, images, train=False)["params"]
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))

    return init(rng)


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Mean softmax cross-entropy over the batch."""
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def dropout_root_key(seed: int, prng_impl: str = "threefry") -> jax.Array:
    """The run's dropout key, from the seed alone, of implementation PRNG_IMPLS[prng_impl].

    The second half of split(key(seed)), as it always was (the first initialises the
    parameters, with JAX's default implementation whatever prng_impl says); the step
    folds (step, device) into it (dropout_key). Explicit, so no global JAX setting is touched.
    """
    if prng_impl not in PRNG_IMPLS:
        raise ValueError(f"unknown prng_impl {prng_impl!r}; expected one of {tuple(PRNG_IMPLS)}")
    return jax.random.split(jax.random.key(seed, impl=PRNG_IMPLS[prng_impl]))[1]


@dataclasses.dataclass(frozen=True)
class Collectives:
    """Where the step's collectives go, seen from one device (inside pmap or shard_map).

    device_axes: every mapped axis (pmap's one, or the mesh's); metrics are averaged
      over them and a device's dropout key folds in its position on them.
    example_axes: the axes whose devices hold different examples (on the rest they see
      the same ones, as the paper's two GPUs did); evaluation sums run over these only.
    axis_sizes: the size of each device axis (None: read from the running pmap).
    grad_axes: per parameter, the axes it is replicated on, whose devices' gradients
      are summed (None: all device axes, every parameter whole on every device).
    """

    device_axes: tuple[str, ...] = (AXIS,)
    example_axes: tuple[str, ...] = (AXIS,)
    axis_sizes: tuple[int, ...] | None = None
    grad_axes: Any = None

    def device_count(self) -> jax.Array | int:
        if self.axis_sizes is None:
            return lax.psum(1, self.device_axes)
        return int(np.prod(self.axis_sizes))

    def device_index(self) -> jax.Array:
        """This device's position over all device axes, row-major."""
        index = lax.axis_index(self.device_axes[0])
        for axis, size in zip(self.device_axes[1:], (self.axis_sizes or ())[1:]):
            index = index * size + lax.axis_index(axis)
        return index

    def reduce_grads(self, grads: Any) -> Any:
        """The gradient of the mean loss over all devices, from this device's gradient of its own.

        A parameter replicated on some axes is summed over them; the rest of its
        gradient arrived through the transposes of the model's all-gathers already.
        """
        count = self.device_count()
        if self.grad_axes is None:
            return jax.tree_util.tree_map(lambda g: lax.psum(g, self.device_axes) / count, grads)
        return jax.tree_util.tree_map(
            lambda g, axes: (lax.psum(g, tuple(axes)) if axes else g) / count,
            grads,
            self.grad_axes,
            is_leaf=lambda leaf: isinstance(leaf, GradAxes),
        )


class GradAxes(tuple):
    """The axes one parameter's gradient is summed over (a leaf in a tree of them)."""


def dropout_key(rng: jax.Array, step: jax.Array, collectives: Collectives = Collectives()) -> jax.Array:
    """A key of its own for every device and step (call inside pmap or shard_map): (seed, step, device)."""
    return jax.random.fold_in(jax.random.fold_in(rng, step), collectives.device_index())


@flax.struct.dataclass
class DeviceAugment:
    """The training augmentation done inside the step, for batches of whole packed images.

    A batch that carries 'example_ids' holds [B, size, size, 3] images (the paper's
    256x256); the step takes each example's crop, flip and colour offset from
    (seed, example id) with device_augment.train_crops.
    """

    seed: int = flax.struct.field(pytree_node=False, default=0)
    image_size: int = flax.struct.field(pytree_node=False, default=224)
    flip: bool = flax.struct.field(pytree_node=False, default=True)
    pca_noise_std: float = flax.struct.field(pytree_node=False, default=0.1)
    random_crop: bool = flax.struct.field(pytree_node=False, default=True)


def train_inputs(batch: dict[str, jax.Array], augment: DeviceAugment | None) -> tuple[jax.Array, jax.Array | None]:
    """(images, colour offsets) of a train batch: as shipped, or cropped here from packed images."""
    if "example_ids" not in batch:
        return batch["images"], batch.get("color")
    if augment is None:
        raise ValueError("a batch of packed images needs the step's DeviceAugment settings")
    return device_augment.train_crops(
        batch["images"],
        batch["example_ids"],
        seed=augment.seed,
        image_size=augment.image_size,
        flip=augment.flip,
        pca_noise_std=augment.pca_noise_std,
        random_crop=augment.random_crop,
    )


def batch_gradients(
    params: Any,
    batch: dict[str, jax.Array],
    dropout_rng: jax.Array,
    *,
    model: model_lib.AlexNet,
    augment: DeviceAugment | None,
) -> tuple[Any, dict[str, jax.Array]]:
    """(gradients of the mean loss, mean loss/top-1/top-5) of one batch on one device."""
    pixels, color = train_inputs(batch, augment)
    images = preprocess.model_input(pixels, color, input_scale=model.input_scale)

    def loss_fn(params):
        logits = model.apply({"params": params}, images, train=True, rngs={"dropout": dropout_rng})
        return cross_entropy(logits, batch["labels"]), logits

    (loss, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    metrics = {
        "loss": loss,
        "top1_acc": metrics_lib.correct_top_k(logits, batch["labels"], 1).mean(),
        "top5_acc": metrics_lib.correct_top_k(logits, batch["labels"], 5).mean(),
    }
    return grads, metrics


def accumulated_gradients(
    params: Any,
    batch: dict[str, jax.Array],
    dropout_rng: jax.Array,
    *,
    model: model_lib.AlexNet,
    augment: DeviceAugment | None,
    micro_batches: int,
) -> tuple[Any, dict[str, jax.Array]]:
    """batch_gradients of the whole batch, computed over `micro_batches` equal slices in turn (lax.scan).

    Equal slices of a mean loss: the mean of their gradients and metrics is the whole
    batch's. Only one slice's activations are alive at a time, so memory falls with
    micro_batches. Slice i holds examples i*m .. (i+1)*m - 1 (the batch's own order) and
    draws its dropout masks from fold_in(dropout_rng, i): every slice its own.
    """
    if micro_batches == 1:
        return batch_gradients(params, batch, dropout_rng, model=model, augment=augment)
    per_device = jax.tree_util.tree_leaves(batch)[0].shape[0]
    if per_device % micro_batches:
        raise ValueError(f"a per-device batch of {per_device} does not split into {micro_batches} micro-batches")
    # [micro_batches, per_device / micro_batches, ...]
    slices = jax.tree_util.tree_map(lambda value: value.reshape((micro_batches, -1) + value.shape[1:]), batch)

    gradients = functools.partial(batch_gradients, model=model, augment=augment)

    def add_slice(totals, indexed_slice):
        index, micro_batch = indexed_slice
        found = gradients(params, micro_batch, jax.random.fold_in(dropout_rng, index))
        return jax.tree_util.tree_map(jnp.add, totals, found), None

    first = jax.tree_util.tree_map(lambda value: value[0], slices)
    shapes = jax.eval_shape(gradients, params, first, dropout_rng)
    zeros = jax.tree_util.tree_map(lambda shape: jnp.zeros(shape.shape, shape.dtype), shapes)
    totals, _ = lax.scan(add_slice, zeros, (jnp.arange(micro_batches), slices))
    return jax.tree_util.tree_map(lambda total: total / micro_batches, totals)


def train_step(
    state: TrainState,
    batch: dict[str, jax.Array],
    rng: jax.Array,
    *,
    model: model_lib.AlexNet,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
    augment: DeviceAugment | None = None,
    per_device: Callable | None = None,
    grad_accum_steps: int = 1,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One SGD update: gradients per device, then the optimizer on the (possibly sharded) state.

    per_device: how the device-level part (device_gradients) is placed: None when this
    whole step already runs per device under pmap; a scheme's shard_map otherwise, with
    the optimizer then applied under jit to arrays laid out as the scheme says (so
    LARS's per-layer norms and grad_norm see whole layers, however they are split).
    batch: {'images': [per_device_batch, S, S, 3] uint8 pixels (or model-ready floats),
    'labels': [per_device_batch], optionally 'color': [per_device_batch, 3] PCA colour
    offsets, or 'example_ids' for packed images that the step augments (DeviceAugment)}.
    grad_accum_steps > 1: the gradients come from that many micro-batches of the slice in
    turn (accumulated_gradients): the same update, less memory.
    """
    gradients = per_device or functools.partial(
        device_gradients, model=model, augment=augment, grad_accum_steps=grad_accum_steps
    )
    grads, metrics = gradients(state.params, state.step, batch, rng)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    grad_norm = optax.tree.norm(grads)
    metrics = dict(metrics)
    metrics["grad_norm"] = grad_norm
    metrics["learning_rate"] = schedule(state.step)
    metrics["finite"] = jnp.isfinite(metrics["loss"]) & jnp.isfinite(grad_norm)
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
    return new_state, metrics


def device_gradients(
    params: Any,
    step: jax.Array,
    batch: dict[str, jax.Array],
    rng: jax.Array,
    *,
    model: model_lib.AlexNet,
    augment: DeviceAugment | None = None,
    collectives: Collectives = Collectives(),
    grad_accum_steps: int = 1,
) -> tuple[Any, dict[str, jax.Array]]:
    """One device's part of a step: the gradient of the mean loss over all devices, and the metrics.

    params are this device's share (whole, or its slices under model parallelism, which
    `model`'s Layout matches); the batch is its own examples, taken in grad_accum_steps
    micro-batches (accumulated_gradients) whatever the placement.
    """
    dropout_rng = dropout_key(rng, step, collectives)
    grads, metrics = accumulated_gradients(
        params, batch, dropout_rng, model=model, augment=augment, micro_batches=grad_accum_steps
    )
    grads = collectives.reduce_grads(grads)
    return grads, lax.pmean(metrics, collectives.device_axes)


def example_probabilities(params: Any, images: jax.Array, *, model: model_lib.AlexNet) -> jax.Array:
    """Softmax per example [B, classes] of images [B, S, S, 3], or [B, crops, S, S, 3]: then
    averaged over the crops (the paper's 10-crop test)."""
    crops = images.shape[1] if images.ndim == 5 else 1
    flat = images.reshape((-1,) + images.shape[-3:])  # [B * crops, S, S, 3]
    logits = model.apply({"params": params}, flat, train=False).astype(jnp.float32)
    return jax.nn.softmax(logits).reshape((images.shape[0], crops, -1)).mean(axis=1)


def eval_step(
    params: Sequence[Any],
    batch: dict[str, jax.Array],
    *,
    models: Sequence[model_lib.AlexNet],
    collectives: Collectives = Collectives(),
) -> tuple[dict[str, jax.Array], jax.Array]:
    """Masked sums over all devices, and this device's probabilities; runs per device (pmap, shard_map).

    One model, or several (the paper's ensemble): their per-example softmax is averaged
    before the loss and the top-k. Padding (mask 0) counts nowhere, and examples that
    several devices share (the towers' model axis) count once.
    """
    probs = sum(example_probabilities(p, batch["images"], model=m) for p, m in zip(params, models)) / len(models)
    sums = metrics_lib.masked_sums(probs, batch["labels"], batch["mask"])
    return lax.psum(sums, collectives.example_axes), probs
