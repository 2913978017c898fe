"""The compiled parts of training and evaluation: state, model, train and eval steps.

Pure JAX/Flax/optax: no TensorFlow and no ml_collections, so the benchmark runs the
very same step on GPU machines that have neither. The steps are pure functions bound
with functools.partial and pmap'ed (or shard_map'ed) over the local devices with axis
name "batch". The state goes in unreplicated (in_axes=None) and is kept identical on
every device with lax.pmean, so what comes back is one state, not one per device.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from alexnet_jax import device_augment, preprocess
from alexnet_jax import metrics as metrics_lib
from alexnet_jax import model as model_lib
from alexnet_jax.parallel import AXIS

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
# config.backward_impl: "auto" picks the hand-written backward passes on the CPU
# backend, where they are measured faster, and XLA's autodiff elsewhere (cuDNN has
# fast backward convolutions of its own).
BACKWARD_IMPL_CHOICES = ("auto", *model_lib.BACKWARD_IMPLS)
INPUT_SCALE_CHOICES = ("auto", *preprocess.INPUT_SCALES)
PARALLELISMS = ("pmap", "shard_map")
# config.prng_impl: the key implementation of the dropout random bits (JAX's names in
# the values). "threefry" is JAX's default and what runs before the option used;
# "rbg" and "unsafe_rbg" draw bits with XLA's RngBitGenerator, faster on accelerators.
# Each is a pure function of (seed, step, device), so exact resume holds for each, but
# the masks differ between them: a run keeps the one it started with.
PRNG_IMPLS = {"threefry": "threefry2x32", "rbg": "rbg", "unsafe_rbg": "unsafe_rbg"}
# The paper's ablations (issue 24): config keys that shape the network without changing a
# parameter's shape, with the values runs recorded before the keys existed were trained with.
# config.lrn: "auto" = the variant's own (after conv1 and conv2 for the paper, none for torchvision).
LRN_CHOICES = {"auto": None, "on": True, "off": False}
ARCHITECTURE_DEFAULTS = {"activation": "relu", "pooling": "overlapping", "lrn": "auto", "dropout_rate": 0.5}


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: optimizer updates applied so far
    params: Any
    opt_state: Any


def resolve_backward_impl(choice: str, backend: str | None = None) -> str:
    """config.backward_impl -> model.BACKWARD_IMPLS: "auto" is "fast" on the CPU backend, else "lax"."""
    if choice != "auto":
        return choice
    return "fast" if (backend or jax.default_backend()) == "cpu" else "lax"


def resolve_input_scale(choice: str, variant: str) -> str:
    """config.input_scale -> preprocess.INPUT_SCALES: "auto" is the variant's own (raw for the paper)."""
    return preprocess.default_input_scale(variant) if choice == "auto" else choice


def architecture(settings: Any) -> dict[str, Any]:
    """AlexNet's keyword arguments for the ablation switches (and dropout) of a config.

    settings: a ConfigDict, a run's recorded config (config.json's "config" dict) or a
    plain namespace; a key it lacks takes ARCHITECTURE_DEFAULTS' value, so a run recorded
    before the switches existed is rebuilt as it was trained. Training (create_model) and
    every loader of trained weights (trained.load) rebuild the network through here.
    """
    get = settings.get if hasattr(settings, "get") else lambda key, default: getattr(settings, key, default)
    values = {key: get(key, default) for key, default in ARCHITECTURE_DEFAULTS.items()}
    return {
        "activation": str(values["activation"]),
        "pooling": str(values["pooling"]),
        "lrn": LRN_CHOICES[values["lrn"]],
        "dropout_rate": float(values["dropout_rate"]),
    }


def create_model(config: Any, num_classes: int, *, input_scale: str | None = None) -> model_lib.AlexNet:
    """The model a config describes, with every implementation choice resolved here.

    input_scale: the run's resolved input scale (train.plan_run also looks at a resumed
    run and init_from weights); None resolves config.input_scale by the variant alone.
    """
    return model_lib.AlexNet(
        variant=config.model,
        num_classes=num_classes,
        dtype=DTYPES[config.dtype],
        init_scheme=config.init,
        input_scale=input_scale or resolve_input_scale(config.input_scale, config.model),
        backward_impl=resolve_backward_impl(config.backward_impl),
        group_conv=config.group_conv,
        lrn_precision=config.lrn_precision,
        **architecture(config),
    )


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


def dropout_key(rng: jax.Array, step: jax.Array) -> jax.Array:
    """A key of its own for every device and step (call inside pmap): (seed, step, device)."""
    return jax.random.fold_in(jax.random.fold_in(rng, step), lax.axis_index(AXIS))


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
    grad_accum_steps: int = 1,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One SGD update from one device's slice of the batch; runs under pmap.

    batch: {'images': [per_device_batch, S, S, 3] uint8 pixels (or model-ready floats),
    'labels': [per_device_batch], optionally 'color': [per_device_batch, 3] PCA colour
    offsets, or 'example_ids' for packed images that the step augments (DeviceAugment)}.
    grad_accum_steps > 1: the gradients come from that many micro-batches of the slice in
    turn (accumulated_gradients): the same update, less memory.
    """
    dropout_rng = dropout_key(rng, state.step)
    grads, metrics = accumulated_gradients(
        state.params, batch, dropout_rng, model=model, augment=augment, micro_batches=grad_accum_steps
    )
    grads = lax.pmean(grads, AXIS)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    grad_norm = optax.tree.norm(grads)
    metrics = lax.pmean(metrics, AXIS)
    metrics["grad_norm"] = grad_norm
    metrics["learning_rate"] = schedule(state.step)
    metrics["finite"] = jnp.isfinite(metrics["loss"]) & jnp.isfinite(grad_norm)
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
    return new_state, metrics


def example_probabilities(params: Any, images: jax.Array, *, model: model_lib.AlexNet) -> jax.Array:
    """Softmax per example [B, classes] of images [B, S, S, 3], or [B, crops, S, S, 3]: then
    averaged over the crops (the paper's 10-crop test)."""
    crops = images.shape[1] if images.ndim == 5 else 1
    flat = images.reshape((-1,) + images.shape[-3:])  # [B * crops, S, S, 3]
    logits = model.apply({"params": params}, flat, train=False).astype(jnp.float32)
    return jax.nn.softmax(logits).reshape((images.shape[0], crops, -1)).mean(axis=1)


def eval_step(
    params: Sequence[Any], batch: dict[str, jax.Array], *, models: Sequence[model_lib.AlexNet]
) -> tuple[dict[str, jax.Array], jax.Array]:
    """Masked sums over all devices, and this device's probabilities; runs under pmap.

    One model, or several (the paper's ensemble): their per-example softmax is averaged
    before the loss and the top-k. Padding (mask 0) counts nowhere.
    """
    probs = sum(example_probabilities(p, batch["images"], model=m) for p, m in zip(params, models)) / len(models)
    sums = metrics_lib.masked_sums(probs, batch["labels"], batch["mask"])
    return lax.psum(sums, AXIS), probs


def make_steps(
    model: model_lib.AlexNet,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
    parallelism: str = "pmap",
    augment: DeviceAugment | None = None,
    grad_accum_steps: int = 1,
):
    """The train and eval steps over the local devices; the train step donates the old state.

    train: (state, batch, rng) -> (state, metrics); eval: ((params,), batch) -> (sums, probs),
    batches as [local_devices, per_device, ...].
    """
    train_fn = functools.partial(
        train_step, model=model, tx=tx, schedule=schedule, augment=augment, grad_accum_steps=grad_accum_steps
    )
    return _parallel_train(train_fn, parallelism), make_eval_step((model,), parallelism)


def make_eval_step(models: Sequence[model_lib.AlexNet], parallelism: str = "pmap"):
    """The eval step of one model or an ensemble: (params tuple, batch) -> (sums, probs [devices, B, classes])."""
    eval_fn = functools.partial(eval_step, models=tuple(models))
    if parallelism == "pmap":
        return jax.pmap(eval_fn, axis_name=AXIS, in_axes=(None, 0), out_axes=(None, 0))
    if parallelism == "shard_map":
        return _shard_mapped(eval_fn, (_P(), _P(AXIS)), (_P(), _P(AXIS)), donate=False)
    raise ValueError(f"unknown parallelism {parallelism!r}; expected one of {PARALLELISMS}")


def _parallel_train(train_fn, parallelism: str):
    if parallelism == "pmap":
        return jax.pmap(train_fn, axis_name=AXIS, in_axes=(None, 0, None), out_axes=None, donate_argnums=(0,))
    if parallelism == "shard_map":
        return _shard_mapped(train_fn, (_P(), _P(AXIS), _P()), (_P(), _P()), donate=True)
    raise ValueError(f"unknown parallelism {parallelism!r}; expected one of {PARALLELISMS}")


def _P(*axes):  # noqa: N802  (PartitionSpec's conventional short name)
    return jax.sharding.PartitionSpec(*axes)


def _shard_mapped(fn, in_specs, out_specs, *, donate: bool):
    """fn as jax.jit(jax.shard_map(...)) over a one-axis mesh of the local devices.

    The path JAX recommends now that pmap is in maintenance mode (single process only,
    for now). Each device's block of a sharded input is [1, per_device, ...]; pmap
    drops that axis, so it is dropped here too, and added back to sharded outputs.
    check_vma=False: the hand-written conv VJPs (fast_ops) return plain gradients that
    the varying-axes checker cannot type; the steps' pmean/psum make outputs replicated.
    """
    mesh = jax.sharding.Mesh(np.array(jax.local_devices()), (AXIS,))
    squeeze = functools.partial(jax.tree_util.tree_map, lambda x: x[0])
    expand = functools.partial(jax.tree_util.tree_map, lambda x: x[None])

    def per_device(*args):
        args = [squeeze(a) if spec == _P(AXIS) else a for a, spec in zip(args, in_specs)]
        outputs = fn(*args)
        return tuple(expand(o) if spec == _P(AXIS) else o for o, spec in zip(outputs, out_specs))

    mapped = jax.shard_map(per_device, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)
    return jax.jit(mapped, donate_argnums=(0,) if donate else ())
