"""Parallelism schemes: ways of placing the one train step and the one eval step on devices.

A scheme is a mesh, the PartitionSpecs of the state and the batch, and where the
collectives go; never a copy of the step. training/loop.py asks it for make_steps,
place_state and place_batch, whatever it is:

    pmap         jax.pmap over the local devices; every device holds the whole network.
    shard_map    jit(shard_map) over a one-axis mesh of the local devices; the same placement.
    data         jit over a global mesh of every device of every process ('data'), the batch
                 split on it, parameters replicated: pmap's modern replacement, multi-host too.
    towers       the paper's two GPUs, on a data x model mesh with model = 2: each model-axis
                 device holds one tower of every layer; they talk only at conv3's input and
                 the inputs of fc6, fc7 and fc8 (fc8 is whole on both, as cuda-convnet2 kept
                 fc1000 unsplit: no all-gather of logits, and the towers' memory goal holds).
    weird_trick  Krizhevsky 2014: convolutions data-parallel over every device, fc6/fc7 split
                 by units and fc8 by classes over the model axis; fc6 gathers the model axis's
                 examples (the batch), fc7 and fc8 their features, and the logits their classes.

The device-level part of every scheme runs under jax.shard_map (or pmap): XLA's automatic
sharding cannot split a grouped convolution by channels, and all-gathers a batch-split one
(openxla/xla#47945), so the towers and the data-parallel paper convolutions are written per
device. The model states its layout in logical terms (model.logical_axes, model.Layout);
a scheme maps them onto its mesh axes. Checkpoints hold the logical (whole) arrays.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
import optax
from jax import lax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from alexnet_jax.model import alexnet as model_lib
from alexnet_jax.parallel import distributed
from alexnet_jax.step import steps

P = PartitionSpec
DATA, MODEL = "data", "model"  # the mesh axes of the mesh schemes


def make_scheme(parallelism: str, *, variant: str, model_axis: int = 1, devices: Sequence[Any] | None = None):
    """The scheme config.parallelism names, over `devices` (default: every device of every process).

    model_axis: the size of the mesh's model axis (towers, weird_trick); the data axis takes the rest.
    """
    if parallelism == "pmap":
        return PmapScheme()
    if parallelism == "shard_map":
        mesh = Mesh(np.array(devices or jax.local_devices()), (distributed.AXIS,))
        return MeshScheme("shard_map", mesh, variant, example_axes=(distributed.AXIS,))
    devices = list(devices or jax.devices())
    if parallelism == "data":
        return MeshScheme("data", _mesh((len(devices),), (DATA,), devices), variant, example_axes=(DATA,))
    shape = (len(devices) // model_axis, model_axis)
    if parallelism == "towers":
        rules = {"towers": MODEL, "units": MODEL}
        return MeshScheme("towers", _mesh(shape, (DATA, MODEL), devices), variant, (DATA,), rules)
    if parallelism == "weird_trick":
        rules = {"units": MODEL, "classes": MODEL}
        return MeshScheme("weird_trick", _mesh(shape, (DATA, MODEL), devices), variant, (DATA, MODEL), rules)
    raise ValueError(f"unknown parallelism {parallelism!r}; expected one of {steps.PARALLELISMS}")


def from_config(config: Any) -> PmapScheme | MeshScheme:
    return make_scheme(config.parallelism, variant=config.model, model_axis=config.model_axis)


def make_steps(
    model: model_lib.AlexNet,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
    parallelism: str = "pmap",
    augment: steps.DeviceAugment | None = None,
    grad_accum_steps: int = 1,
):
    """The train and eval steps of a one-axis scheme ("pmap" or "shard_map") over the local devices.

    train: (state, batch, rng) -> (state, metrics); eval: ((params,), batch) -> (sums, probs).
    A shortcut for make_scheme(...).make_steps, for schemes without a model axis.
    """
    scheme = make_scheme(parallelism, variant=model.variant)
    return scheme.make_steps(model, tx, schedule, augment=augment, grad_accum_steps=grad_accum_steps)


def make_eval_step(models: Sequence[model_lib.AlexNet], parallelism: str = "pmap"):
    """The eval step of one model or an ensemble: (params tuple, batch) -> (sums, probs)."""
    return make_scheme(parallelism, variant=models[0].variant).make_eval_step(models)


def _mesh(shape: tuple[int, ...], names: tuple[str, ...], devices: Sequence[Any]) -> Mesh:
    # Auto axes: the shardings are stated explicitly here, and the step's device-level part is shard_map'ed.
    auto = (jax.sharding.AxisType.Auto,) * len(names)
    return jax.make_mesh(shape, names, axis_types=auto, devices=devices)


class PmapScheme:
    """jax.pmap over the local devices, batches as [local_devices, per_device, ...] (the default)."""

    name = "pmap"

    def make_steps(self, model, tx, schedule, augment=None, grad_accum_steps=1):
        train = functools.partial(
            steps.train_step,
            model=model,
            tx=tx,
            schedule=schedule,
            augment=augment,
            grad_accum_steps=grad_accum_steps,
        )
        p_train = jax.pmap(
            train, axis_name=distributed.AXIS, in_axes=(None, 0, None), out_axes=None, donate_argnums=(0,)
        )
        return p_train, self.make_eval_step((model,))

    def make_eval_step(self, models):
        eval_fn = functools.partial(steps.eval_step, models=tuple(models))
        return jax.pmap(eval_fn, axis_name=distributed.AXIS, in_axes=(None, 0), out_axes=(None, 0))

    def restore_target(self, state):
        return state  # restored per process onto one device, then replicated

    def place_state(self, state):
        return distributed.replicate(state)

    def place_batch(self, batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        local = jax.local_device_count()
        return distributed.shard_to_devices({k: v.reshape((local, -1) + v.shape[1:]) for k, v in batch.items()})


@dataclasses.dataclass(frozen=True)
class MeshScheme:
    """jit over a mesh, the device-level part of the step under jax.shard_map.

    example_axes: the mesh axes the batch is split over (the others see the same examples).
    rules: model.logical_axes names -> the mesh axis that dimension is split over.
    """

    name: str
    mesh: Mesh
    variant: str
    example_axes: tuple[str, ...] = (DATA,)
    rules: dict[str, str] = dataclasses.field(default_factory=dict)

    @property
    def model_size(self) -> int:
        return self.mesh.shape.get(MODEL, 1)

    @property
    def batch_sharding(self) -> NamedSharding:
        return NamedSharding(self.mesh, P(self.example_axes))

    def layout(self) -> model_lib.Layout:
        """What one device holds, in the model's terms, with the joins bound to the model axis."""
        shards = self.model_size
        if shards == 1 or not self.rules:
            return model_lib.Layout()
        towers = shards if self.rules.get("towers") == MODEL else 1
        return model_lib.Layout(
            towers=towers,
            fc_shards=shards,
            fc_input="batch" if MODEL in self.example_axes else "features",
            split_classes=self.rules.get("classes") == MODEL,
            join=functools.partial(_join, axis=MODEL),
            own=functools.partial(_own, axis=MODEL, pieces=shards),
        )

    def param_specs(self, params: Any, variant: str | None = None) -> Any:
        """A PartitionSpec per parameter: the model's logical axes mapped onto this mesh."""
        logical = model_lib.logical_axes(variant or self.variant, params)
        return jax.tree_util.tree_map(
            lambda axes: P(*(self.rules.get(a) for a in axes)), logical, is_leaf=lambda x: isinstance(x, tuple)
        )

    def state_shardings(self, state: steps.TrainState) -> steps.TrainState:
        """NamedShardings of a TrainState: parameters as param_specs, optimizer slots like their parameter."""
        specs = self.param_specs(state.params)
        by_path = {_keys(path): (spec, np.shape(leaf)) for (path, leaf), spec in _zip_paths(state.params, specs)}

        def like_param(path, leaf):
            keys = _keys(path)
            for start in range(len(keys)):
                spec, shape = by_path.get(keys[start:], (None, None))
                if spec is not None and shape == np.shape(leaf):
                    return spec
            return P()

        opt_specs = jax.tree_util.tree_map_with_path(like_param, state.opt_state)
        tree = state.replace(step=P(), params=specs, opt_state=opt_specs)
        return jax.tree_util.tree_map(
            lambda spec: NamedSharding(self.mesh, spec), tree, is_leaf=lambda x: isinstance(x, PartitionSpec)
        )

    def collectives(self, specs: Any) -> steps.Collectives:
        names = tuple(self.mesh.axis_names)

        def replicated_on(spec):
            used = {axis for entry in spec for axis in (entry if isinstance(entry, tuple) else (entry,))}
            return steps.GradAxes(axis for axis in names if axis not in used)

        grad_axes = jax.tree_util.tree_map(replicated_on, specs, is_leaf=lambda x: isinstance(x, PartitionSpec))
        sizes = tuple(self.mesh.shape[axis] for axis in names)
        return steps.Collectives(names, self.example_axes, sizes, grad_axes)

    def make_steps(self, model, tx: optax.GradientTransformation, schedule, augment=None, grad_accum_steps=1):
        local = model.clone(layout=self.layout())

        def train(state, batch, rng):
            specs = self.param_specs(state.params)
            gradients = functools.partial(
                steps.device_gradients,
                model=local,
                augment=augment,
                collectives=self.collectives(specs),
                grad_accum_steps=grad_accum_steps,
            )
            per_device = jax.shard_map(
                gradients,
                mesh=self.mesh,
                in_specs=(specs, P(), P(self.example_axes), P()),
                out_specs=(specs, P()),
                check_vma=False,  # fast_ops' hand-written VJPs are not typed for it; reduce_grads replicates
            )
            new_state, metrics = steps.train_step(
                state, batch, rng, model=model, tx=tx, schedule=schedule, per_device=per_device
            )
            return lax.with_sharding_constraint(new_state, self.state_shardings(new_state)), metrics

        return jax.jit(train, donate_argnums=(0,)), self.make_eval_step((model,))

    def make_eval_step(self, models):
        locals_ = tuple(m.clone(layout=self.layout()) for m in models)

        def evaluate(params, batch):
            specs = tuple(self.param_specs(p, m.variant) for p, m in zip(params, models))
            per_device = jax.shard_map(
                functools.partial(steps.eval_step, models=locals_, collectives=self.collectives(specs)),
                mesh=self.mesh,
                in_specs=(specs, P(self.example_axes)),
                out_specs=(P(), P(self.example_axes)),
                check_vma=False,
            )
            return per_device(tuple(params), batch)

        return jax.jit(evaluate)

    def restore_target(self, state):
        return self.place_state(state)  # Orbax restores each shard onto its device

    def place_state(self, state):
        """The state laid out as this scheme keeps it (a no-op for a state placed already)."""
        return jax.tree_util.tree_map(_place, state, self.state_shardings(state))

    def place_batch(self, batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        """This process's slice of the global batch -> global arrays split as the step expects."""
        processes = jax.process_count()
        return {
            key: jax.make_array_from_process_local_data(
                self.batch_sharding, value, (value.shape[0] * processes,) + value.shape[1:]
            )
            for key, value in batch.items()
        }


def _place(leaf, sharding: NamedSharding):
    if isinstance(leaf, jax.Array) and (leaf.sharding == sharding or not leaf.is_fully_addressable):
        return leaf if leaf.sharding == sharding else jax.device_put(leaf, sharding)
    host = np.asarray(jax.device_get(leaf))
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def _join(x: jax.Array, dim: int, *, axis: str) -> jax.Array:
    """The model-axis devices' pieces of x, concatenated along dim (its transpose: a reduce-scatter)."""
    return lax.all_gather(x, axis, axis=dim, tiled=True)


def _own(x: jax.Array, dim: int, *, axis: str, pieces: int) -> jax.Array:
    """This model-axis device's piece of x along dim."""
    size = x.shape[dim] // pieces
    return lax.dynamic_slice_in_dim(x, lax.axis_index(axis) * size, size, axis=dim)


def _keys(path) -> tuple:
    return tuple(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))) for k in path)


def _zip_paths(tree, specs):
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    spec_leaves = jax.tree_util.tree_leaves(specs, is_leaf=lambda x: isinstance(x, PartitionSpec))
    return zip(flat, spec_leaves)


Scheme = PmapScheme | MeshScheme
