"""Train state, the pmap'ed train and eval steps, and the training loop.

The steps are pure functions bound with functools.partial and pmap'ed over the
local devices with axis name "batch". The state is passed unreplicated
(in_axes=None) and kept identical on every device with lax.pmean, so what comes
back is one state, not one per device.
"""

from __future__ import annotations

import functools
import logging
import os
import time
from typing import TYPE_CHECKING, Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from alexnet_jax import metrics as metrics_lib
from alexnet_jax import model as model_lib
from alexnet_jax import optim, parallel, preprocess
from alexnet_jax.errors import UserError
from alexnet_jax.parallel import AXIS

if TYPE_CHECKING:  # annotations only: the step and the bench run where ml_collections is absent
    import ml_collections

log = logging.getLogger(__name__)

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


class DivergenceError(UserError):
    """The loss or the gradients stopped being finite."""


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: optimizer updates applied so far
    params: Any
    opt_state: Any


def create_model(config: ml_collections.ConfigDict, num_classes: int) -> model_lib.AlexNet:
    return model_lib.AlexNet(
        variant=config.model,
        num_classes=num_classes,
        dropout_rate=config.dropout_rate,
        dtype=DTYPES[config.dtype],
        init_scheme=config.init,
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


def dropout_key(rng: jax.Array, step: jax.Array) -> jax.Array:
    """A key of its own for every device and step (call inside pmap): (seed, step, device)."""
    return jax.random.fold_in(jax.random.fold_in(rng, step), lax.axis_index(AXIS))


def train_step(
    state: TrainState,
    batch: dict[str, jax.Array],
    rng: jax.Array,
    *,
    model: model_lib.AlexNet,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One SGD update from one device's slice of the batch; runs under pmap.

    batch: {'images': [per_device_batch, S, S, 3] uint8 pixels (or normalised floats),
    'labels': [per_device_batch], optionally 'color': [per_device_batch, 3] PCA colour offsets}.
    """
    dropout_rng = dropout_key(rng, state.step)
    images = preprocess.model_input(batch["images"], batch.get("color"))

    def loss_fn(params):
        logits = model.apply({"params": params}, images, train=True, rngs={"dropout": dropout_rng})
        return cross_entropy(logits, batch["labels"]), logits

    (loss, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    grads = lax.pmean(grads, AXIS)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    grad_norm = optax.tree.norm(grads)
    metrics = {
        "loss": loss,
        "top1_acc": metrics_lib.correct_top_k(logits, batch["labels"], 1).mean(),
        "top5_acc": metrics_lib.correct_top_k(logits, batch["labels"], 5).mean(),
    }
    metrics = lax.pmean(metrics, AXIS)
    metrics["grad_norm"] = grad_norm
    metrics["learning_rate"] = schedule(state.step)
    metrics["finite"] = jnp.isfinite(metrics["loss"]) & jnp.isfinite(grad_norm)
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
    return new_state, metrics


def eval_step(state: TrainState, batch: dict[str, jax.Array], *, model: model_lib.AlexNet) -> dict[str, jax.Array]:
    """Sums over one device's slice of an eval batch, summed over devices; runs under pmap.

    images are [B, S, S, 3], or [B, crops, S, S, 3]: then the softmax is averaged
    over the crops (the paper's 10-crop test). Padding (mask 0) counts nowhere.
    """
    images, labels = batch["images"], batch["labels"]
    mask = batch["mask"].astype(jnp.float32)  # [B]
    crops = images.shape[1] if images.ndim == 5 else 1
    flat = images.reshape((-1,) + images.shape[-3:])  # [B * crops, S, S, 3]
    logits = model.apply({"params": state.params}, flat, train=False)
    probs = jax.nn.softmax(logits).reshape((labels.shape[0], crops, -1)).mean(axis=1)  # [B, classes]
    log_probs = jnp.log(jnp.maximum(probs, jnp.finfo(jnp.float32).tiny))
    nll = -jnp.take_along_axis(log_probs, labels[:, None], axis=-1)[:, 0]
    sums = {
        "loss": jnp.sum(nll * mask),
        "top1_acc": jnp.sum(metrics_lib.correct_top_k(probs, labels, 1) * mask),
        "top5_acc": jnp.sum(metrics_lib.correct_top_k(probs, labels, 5) * mask),
        "num_examples": jnp.sum(mask),
    }
    return lax.psum(sums, AXIS)


def make_steps(model, tx, schedule, parallelism: str = "pmap"):
    """The train and eval steps over the local devices; the train step donates the old state.

    Both take (state, batch[, rng]) with the batch as [local_devices, per_device, ...].
    "pmap": jax.pmap with a named axis. "shard_map": the same per-device functions as
    jax.jit(jax.shard_map(...)) over a one-axis mesh, the path JAX recommends now that
    pmap is in maintenance mode (single process only, for now).
    """
    train_fn = functools.partial(train_step, model=model, tx=tx, schedule=schedule)
    eval_fn = functools.partial(eval_step, model=model)
    if parallelism == "pmap":
        p_train = jax.pmap(train_fn, axis_name=AXIS, in_axes=(None, 0, None), out_axes=None, donate_argnums=(0,))
        p_eval = jax.pmap(eval_fn, axis_name=AXIS, in_axes=(None, 0), out_axes=None)
        return p_train, p_eval
    if parallelism == "shard_map":
        return _shard_map_steps(train_fn, eval_fn)
    raise ValueError(f"unknown parallelism {parallelism!r}; expected 'pmap' or 'shard_map'")


def _shard_map_steps(train_fn, eval_fn):
    from jax.sharding import Mesh
    from jax.sharding import PartitionSpec as P

    mesh = Mesh(np.array(jax.local_devices()), (AXIS,))
    # check_vma=False: the hand-written conv VJPs (fast_ops) return plain gradients that
    # the varying-axes checker cannot type; the step's pmean makes the outputs replicated.

    def squeeze(batch):  # each device's block is [1, per_device, ...]; pmap drops that axis
        return jax.tree_util.tree_map(lambda x: x[0], batch)

    sharded_train = jax.shard_map(
        lambda state, batch, rng: train_fn(state, squeeze(batch), rng),
        mesh=mesh,
        in_specs=(P(), P(AXIS), P()),
        out_specs=(P(), P()),
        check_vma=False,
    )
    sharded_eval = jax.shard_map(
        lambda state, batch: eval_fn(state, squeeze(batch)),
        mesh=mesh,
        in_specs=(P(), P(AXIS)),
        out_specs=P(),
        check_vma=False,
    )
    return jax.jit(sharded_train, donate_argnums=(0,)), jax.jit(sharded_eval)


def evaluate(p_eval, state: TrainState, batches) -> dict[str, float]:
    """Run the eval step over every batch; returns exact means over the real examples."""
    totals = None
    for batch in batches:
        sums = p_eval(state, batch)
        totals = sums if totals is None else jax.tree_util.tree_map(jnp.add, totals, sums)
    totals = jax.device_get(totals)
    count = float(totals["num_examples"])
    return {
        "eval/loss": float(totals["loss"]) / count,
        "eval/top1_acc": float(totals["top1_acc"]) / count,
        "eval/top5_acc": float(totals["top5_acc"]) / count,
        "eval/num_examples": int(count),
    }


def summarize_train(
    pending: list[tuple[int, dict]], interval_start: float, timed_steps: int, global_batch: int
) -> dict[str, float]:
    """Means of the per-step train metrics since the last log; stops on a non-finite step.

    This is the loop's only host sync between logs: it waits for the steps to finish.
    """
    host = jax.device_get([m for _, m in pending])
    elapsed = time.perf_counter() - interval_start
    for (step, _), values in zip(pending, host):
        if not bool(values["finite"]):
            raise DivergenceError(
                f"training diverged at step {step}: loss={float(values['loss'])}, "
                f"grad_norm={float(values['grad_norm'])}. No checkpoint of this state was written; "
                "lower config.learning_rate or add config.warmup_epochs, then restart"
            )
    summary = {
        f"train/{key}": float(np.mean([v[key] for v in host])) for key in ("loss", "top1_acc", "top5_acc", "grad_norm")
    }
    summary["train/learning_rate"] = float(host[-1]["learning_rate"])
    summary["train/img_per_s"] = timed_steps * global_batch / max(elapsed, 1e-9) if timed_steps else 0.0
    return summary


def model_meta(config: ml_collections.ConfigDict, num_classes: int) -> dict[str, Any]:
    return {"model": config.model, "num_classes": num_classes, "optimizer": config.optimizer}


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> TrainState:
    """Train (resuming from WORKDIR/checkpoints if there are any), evaluating as configured.

    Returns the final state. SIGTERM/SIGINT stop it early with a checkpoint (and a normal return).
    """
    # Imported here so the model and steps above stay importable without TensorFlow.
    from alexnet_jax import checkpoint as checkpoint_lib
    from alexnet_jax import config as config_lib
    from alexnet_jax import convert, figures, plot, preemption, runinfo
    from alexnet_jax.data import pipeline, sources

    config_lib.validate(config, device_count=jax.device_count(), process_count=jax.process_count())
    log.info("devices: %s", parallel.describe())
    process_count, process_index = jax.process_count(), jax.process_index()
    local_devices = jax.local_device_count()

    source = sources.open_source(
        config.dataset,
        data_dir=config.data_dir,
        manual_dir=config.manual_dir,
        train_split=config.train_split,
        eval_split=config.eval_split,
        download=config.download,
        skip_bad_images=config.skip_bad_images,
    )
    num_classes = config.num_classes if config.num_classes > 0 else source.num_classes
    if num_classes < source.num_classes:
        raise UserError(
            f"config.num_classes={num_classes} but {source.name} has {source.num_classes} classes; "
            "use -1 to take the count from the dataset"
        )
    steps_per_epoch = source.train.num_examples // config.batch_size
    if steps_per_epoch == 0:
        raise UserError(
            f"the training split has {source.train.num_examples} examples, fewer than one batch of "
            f"{config.batch_size}; lower config.batch_size"
        )
    total_steps = (
        config.num_train_steps
        if config.num_train_steps > 0
        else max(1, int(round(config.num_epochs * steps_per_epoch)))
    )
    eval_every = config.eval_every_steps if config.eval_every_steps > 0 else steps_per_epoch
    checkpoint_every = config.checkpoint_every_steps if config.checkpoint_every_steps > 0 else steps_per_epoch
    eval_batch = config.eval_batch_size if config.eval_batch_size > 0 else config.batch_size

    # A checkpoint of another model in this workdir is refused before anything compiles.
    checkpointer = checkpoint_lib.Checkpointer(workdir, keep=config.keep_checkpoints)
    meta = model_meta(config, num_classes)
    latest = checkpointer.latest_step()
    if latest is not None:
        checkpoint_lib.check_compatible(checkpointer.read_meta(latest), meta, checkpointer.directory)

    model = create_model(config, num_classes)
    schedule = optim.make_schedule(config, steps_per_epoch, total_steps)
    tx = optim.make_optimizer(config, schedule)
    init_rng, dropout_rng = jax.random.split(jax.random.key(config.seed))
    state = init_state(model, tx, init_rng, config.image_size)
    if config.init_from and latest is None:  # a resumed run keeps its own weights
        params = convert.init_params_from(config.init_from, state.params, config.model)
        state = state.replace(params=params, opt_state=tx.init(params))
        log.info("initialised from %s", config.init_from)
    if latest is not None:
        state = checkpointer.restore(latest, state)
        log.info("resumed from %s at step %d", checkpointer.directory, latest)
        if process_index == 0 and (moved := metrics_lib.roll_back(workdir, latest)):
            log.info("moved %d metrics.jsonl records past step %d to metrics.rolled_back.jsonl", moved, latest)
    state = parallel.replicate(state)
    start_step = int(jax.device_get(state.step))
    runinfo.write_run_info(workdir, config, source.class_names, num_classes=num_classes)

    aug = pipeline.Augmentation(
        image_size=config.image_size,
        resize_size=config_lib.resize_size(config),
        flip=config.random_flip,
        pca_noise_std=config.pca_noise_std,
        eval_crops=config.eval_crops,
        resize_method=config.resize_method,
    )
    train_ds = pipeline.train_dataset(
        source.train,
        aug,
        per_process_batch=config.batch_size // process_count,
        seed=config.seed,
        start_step=start_step,
        process_index=process_index,
        process_count=process_count,
    )
    eval_ds = pipeline.eval_dataset(
        source.eval,
        aug,
        per_process_batch=eval_batch // process_count,
        process_index=process_index,
        process_count=process_count,
    )
    train_batches = parallel.prefetch_to_device(
        pipeline.device_batches(train_ds, local_devices), config.prefetch_to_device
    )
    p_train, p_eval = make_steps(model, tx, schedule, config.parallelism)
    writer = metrics_lib.MetricWriter(workdir, enabled=process_index == 0)
    progress = metrics_lib.Progress(total_steps, config.batch_size)
    log.info(
        "training %s AlexNet on %s (%d classes): steps %d..%d, %d steps/epoch, global batch %d",
        config.model,
        source.name,
        num_classes,
        start_step,
        total_steps,
        steps_per_epoch,
        config.batch_size,
    )

    def run_eval(step: int) -> dict[str, float]:
        batches = parallel.prefetch_to_device(pipeline.device_batches(eval_ds, local_devices))
        results = evaluate(p_eval, state, batches)
        writer.write(step, results)
        if process_index == 0:  # Figure 3 of the paper, as training goes
            conv1 = {"conv1": jax.device_get(state.params["conv1"])}
            figures.write_conv1_filters(workdir, conv1, config.model, step, summary_writer=writer.summary_writer)
        log.info(
            "step %d  eval loss %.4f  top-1 %.2f%%  top-5 %.2f%%  (%d examples)",
            step,
            results["eval/loss"],
            100 * results["eval/top1_acc"],
            100 * results["eval/top5_acc"],
            results["eval/num_examples"],
        )
        return results

    stop_request = preemption.StopRequest().install()
    pending: list[tuple[int, dict]] = []
    timed_steps = 0  # steps in `pending` that the interval's clock covers
    interval_start = time.perf_counter()
    try:
        for step in range(start_step + 1, total_steps + 1):
            state, step_metrics = p_train(state, next(train_batches), dropout_rng)
            pending.append((step, step_metrics))
            if step == start_step + 1:  # leave compilation out of the first interval's speed
                jax.block_until_ready(state.step)
                interval_start = time.perf_counter()
            else:
                timed_steps += 1
            log_step = step % config.log_every_steps == 0
            stop = stop_request.requested(at_sync_point=log_step)
            last = step == total_steps
            do_eval = (step % eval_every == 0 or last) and not stop
            do_checkpoint = step % checkpoint_every == 0 or last or stop
            if pending and (log_step or do_eval or do_checkpoint):
                # Also the divergence check: raises before a bad state can be saved.
                summary = summarize_train(pending, interval_start, timed_steps, config.batch_size)
                writer.write(step, summary)
                log.info(progress.line(step, summary["train/loss"], summary["train/img_per_s"]))
                pending.clear()
                timed_steps = 0
                interval_start = time.perf_counter()
            results = run_eval(step) if do_eval else None
            if do_checkpoint:
                checkpointer.save(step, state, meta, metrics=results)
            if stop:
                checkpointer.wait()
                log.warning("stopped at step %d on request; checkpoint saved in %s", step, checkpointer.directory)
                break
            if do_eval or do_checkpoint:
                interval_start = time.perf_counter()
    finally:
        stop_request.restore()
        checkpointer.close()
        writer.close()
    if process_index == 0:
        try:
            plot.plot_curves([workdir], os.path.join(workdir, "curves.png"))
        except Exception as error:  # a figure must never fail a finished run
            log.warning("could not draw %s/curves.png: %s", workdir, error)
    return state
