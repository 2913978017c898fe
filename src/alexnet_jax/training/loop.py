"""The training loop, read top to bottom as a short sequence of named parts.

    train_and_evaluate:  plan_run -> restore_or_init -> make_inputs -> Evaluator -> run_loop

The compiled steps live in steps.py (no TensorFlow); this module wires them to the
data, the checkpoints and the metrics. Every `-1`/"auto" of the config is resolved
once, in plan_run, and nowhere else.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import jax
import numpy as np

from alexnet_jax import cli, paths
from alexnet_jax import config as config_lib
from alexnet_jax.checkpointing import checkpoint as checkpoint_lib
from alexnet_jax.checkpointing import runinfo, trained, workdir_lock
from alexnet_jax.errors import UserError
from alexnet_jax.evaluation.core import evaluate_batches
from alexnet_jax.model import build, preprocess
from alexnet_jax.parallel import distributed, schemes
from alexnet_jax.reporting import curves, figures
from alexnet_jax.reporting import metrics as metrics_lib
from alexnet_jax.step import optim, steps
from alexnet_jax.step.steps import TrainState
from alexnet_jax.training import preemption, profiling, watchdog

if TYPE_CHECKING:
    import ml_collections

    from alexnet_jax.data.sources import Source

log = logging.getLogger(__name__)

# When a log interval spent more than this share waiting for input, the console says so;
# when two in a row spent more than DATA_WAIT_WARN, the run warns once with the remedies.
DATA_WAIT_SHOWN = 0.1
DATA_WAIT_WARN = 0.2
# Config keys that do not change what the next training step computes: changing them
# on resume keeps the run exact. (model, num_classes and optimizer make a checkpoint
# unusable and are refused by checkpoint.check_compatible.)
RESUME_NEUTRAL_KEYS = frozenset(
    {
        "log_every_steps",
        "eval_every_steps",
        "checkpoint_every_steps",
        "keep_checkpoints",
        "prefetch_to_device",
        "eval_batch_size",
        "eval_crops",
        "eval_split",
        "data_dir",
        "manual_dir",
        "download",
        "init_from",
        "backward_impl",
        "group_conv",  # the same convolution, run as one grouped or two plain ones
        "parallelism",
        "platform",  # where the same step runs ("auto" on a CPU machine is "cpu"), as parallelism
        "profile_steps",
        # how long a multi-process job waits for a lost process or for data preparation
        "peer_timeout_s",
        "step_timeout_s",
        "heartbeat_timeout_s",
        "prepare_timeout_s",
    }
)


class DivergenceError(UserError):
    """The loss or the gradients stopped being finite."""


@dataclasses.dataclass(frozen=True)
class RunPlan:
    """Everything the config leaves to the dataset or the machine, resolved once."""

    num_classes: int
    steps_per_epoch: int
    total_steps: int
    eval_every: int
    checkpoint_every: int
    global_batch: int
    eval_batch: int
    resize_size: int
    input_scale: str
    process_index: int
    process_count: int
    local_devices: int

    @property
    def is_primary(self) -> bool:
        """The one process that writes files other than checkpoints (metrics, events, figures, config.json)."""
        return self.process_index == 0

    def model_meta(self, config: ml_collections.ConfigDict) -> dict[str, Any]:
        """What a checkpoint records of the model, to refuse continuing another one."""
        return {"model": config.model, "num_classes": self.num_classes, "optimizer": config.optimizer}


def plan_run(
    config: ml_collections.ConfigDict,
    source: Source,
    *,
    previous_info: dict[str, Any] | None = None,
    pretrained: trained.TrainedModel | None = None,
) -> RunPlan:
    """Resolve the config against the dataset, the devices, a resumed run and init_from weights."""
    num_classes = config.num_classes if config.num_classes > 0 else source.num_classes
    if num_classes < source.num_classes:
        raise UserError(
            f"config.num_classes={num_classes} but {source.name} has {source.num_classes} classes; "
            "use -1 to take the count from the dataset"
        )
    config_lib.validate_num_classes(config, num_classes, source.name)
    steps_per_epoch = source.train.num_examples // config.batch_size
    if steps_per_epoch == 0:
        raise UserError(
            f"the training split has {source.train.num_examples} examples, fewer than one batch of "
            f"{config.batch_size}; lower config.batch_size"
        )
    total_steps = config.num_train_steps
    if total_steps <= 0:
        total_steps = max(1, int(round(config.num_epochs * steps_per_epoch)))
    return RunPlan(
        num_classes=num_classes,
        steps_per_epoch=steps_per_epoch,
        total_steps=total_steps,
        eval_every=config.eval_every_steps if config.eval_every_steps > 0 else steps_per_epoch,
        checkpoint_every=config.checkpoint_every_steps if config.checkpoint_every_steps > 0 else steps_per_epoch,
        global_batch=config.batch_size,
        eval_batch=config.eval_batch_size if config.eval_batch_size > 0 else config.batch_size,
        resize_size=_resize_size(config, source),
        input_scale=_input_scale(config, previous_info, pretrained),
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        local_devices=jax.local_device_count(),
    )


def _resize_size(config: ml_collections.ConfigDict, source: Source) -> int:
    """config.resize_size, or the paper's 256/224 ratio; a packed source fixes it to its image side."""
    fixed = getattr(source, "image_side", None)
    if fixed is None:
        return config_lib.resize_size(config)
    if config.resize_size not in (-1, fixed):
        raise UserError(
            f"config.resize_size={config.resize_size} but {source.name} holds {fixed}x{fixed} images; "
            f"use -1 (or {fixed})"
        )
    if config.image_size > fixed:
        raise UserError(f"config.image_size={config.image_size} is larger than the packed {fixed}x{fixed} images")
    return fixed


def _input_scale(
    config: ml_collections.ConfigDict, previous_info: dict[str, Any] | None, pretrained: trained.TrainedModel | None
) -> str:
    """Explicit config > what the resumed run used > what init_from's weights expect > the variant's own."""
    inherited = None
    if previous_info is not None:
        inherited, origin = runinfo.input_scale(previous_info), "the run being resumed"
    elif pretrained is not None:
        inherited, origin = pretrained.input_scale, f"config.init_from={pretrained.path}"
    if config.input_scale == "auto":
        return inherited or preprocess.default_input_scale(config.model)
    if inherited is not None and inherited != config.input_scale:
        raise UserError(
            f"config.input_scale={config.input_scale!r} but {origin} was trained with {inherited!r} inputs; "
            f"use --config.input_scale={inherited} (or auto)"
        )
    return config.input_scale


@dataclasses.dataclass
class Resume:
    """What the workdir holds from an earlier run of this job, read before anything is built."""

    step: int | None
    meta: dict[str, Any] | None
    info: dict[str, Any] | None

    @classmethod
    def find(cls, checkpointer: checkpoint_lib.Checkpointer, workdir: str) -> Resume:
        """The newest checkpoint whose files match its manifest (damaged ones are moved aside)."""
        step = checkpointer.latest_intact_step()
        if step is None:
            return cls(None, None, None)
        return cls(step, checkpointer.read_meta(step), runinfo.read_run_info(workdir))

    def warn_changed_settings(self, config: ml_collections.ConfigDict, process_count: int) -> list[str]:
        """One warning naming every setting changed since the run was recorded that changes the next steps."""
        if self.info is None:
            return []
        old = dict(self.info.get("config") or {}, process_count=self.info.get("process_count", process_count))
        new = dict(json.loads(config.to_json_best_effort()), process_count=process_count)
        neutral = RESUME_NEUTRAL_KEYS
        if config.schedule != "cosine":  # only the cosine schedule depends on the run's length
            neutral = neutral | {"num_train_steps", "num_epochs"}
        changed = [
            f"{key} {old.get(key)!r} -> {new.get(key)!r}"
            for key in sorted(set(old) | set(new))
            if key not in neutral and key in old and old.get(key) != new.get(key)
        ]
        if changed:
            log.warning(
                "resuming with settings changed since the checkpoint: %s; exact resume no longer holds "
                "(the next steps differ from an uninterrupted run)",
                ", ".join(changed),
            )
        return changed


def restore_or_init(
    config: ml_collections.ConfigDict,
    plan: RunPlan,
    model,
    tx,
    *,
    checkpointer: checkpoint_lib.Checkpointer,
    resume: Resume,
    pretrained: trained.TrainedModel | None,
    workdir: str,
    scheme: schemes.Scheme,
) -> TrainState:
    """A fresh state (from config.init_from's weights where given), or the newest checkpoint's.

    Resuming moves metrics logged after the checkpoint aside (they will be redone).
    The state comes back laid out as the scheme keeps it (a checkpoint of any scheme
    restores onto any other's shardings: checkpoints hold the whole arrays).
    """
    init_rng = jax.random.split(jax.random.key(config.seed))[0]
    state = steps.init_state(model, tx, init_rng, config.image_size)
    if pretrained is not None:
        params = init_params_from(pretrained, state.params, config.model)
        state = state.replace(params=params, opt_state=tx.init(params))
        log.info("initialised from %s", pretrained.path)
        warn_other_architecture(pretrained, config)
    if resume.step is None and plan.is_primary and (moved := metrics_lib.roll_back(workdir, 0)):
        # A run killed before its first checkpoint starts again from step 0: its records go aside.
        log.info("moved %d metrics.jsonl records of a run with no checkpoint to metrics.rolled_back.jsonl", moved)
    if resume.step is not None:
        # Verified against its manifest; a step Orbax cannot read is moved aside for the one before.
        resume.step, state = checkpointer.restore_verified(scheme.restore_target(state))
        log.info("resumed from %s at step %d", checkpointer.directory, resume.step)
        if plan.is_primary and (moved := metrics_lib.roll_back(workdir, resume.step)):
            log.info("moved %d metrics.jsonl records past step %d to metrics.rolled_back.jsonl", moved, resume.step)
    if plan.is_primary:
        checkpointer.check_free_space(state)
    return scheme.place_state(state)


def warn_other_architecture(pretrained: trained.TrainedModel, config: ml_collections.ConfigDict) -> list[str]:
    """init_from weights trained with other ablation switches (activation, pooling, LRN) fit the
    same shapes, so they load; say so, since the features they learned were for another network."""
    mine = build.architecture(config)
    changed = [
        f"{key} {pretrained.architecture[key]!r} -> {mine[key]!r}"
        for key in ("activation", "pooling", "lrn")
        if pretrained.architecture[key] != mine[key]
    ]
    if changed:
        log.warning("config.init_from=%s was trained with another network: %s", pretrained.path, ", ".join(changed))
    return changed


def init_params_from(pretrained: trained.TrainedModel, params: Any, variant: str) -> Any:
    """`params` (a fresh init) with every layer of the pretrained weights copied in.

    fc8 keeps its fresh initialisation when the class counts differ (fine-tuning on
    another dataset); any other mismatch is an error.
    """
    if pretrained.variant != variant:
        raise UserError(
            f"{pretrained.path} holds a {pretrained.variant!r} AlexNet, but config.model={variant!r}; "
            f"set --config.model={pretrained.variant}"
        )
    merged = {}
    for layer, leaves in params.items():
        source = pretrained.params.get(layer)
        if source is not None and all(np.shape(source[name]) == np.shape(leaves[name]) for name in leaves):
            merged[layer] = {name: jax.numpy.asarray(source[name], leaves[name].dtype) for name in leaves}
        elif layer == "fc8":
            log.info("init_from %s: fc8 has other classes, so it keeps its fresh initialisation", pretrained.path)
            merged[layer] = leaves
        else:
            raise UserError(
                f"{pretrained.path}: layer {layer} does not fit this model ({variant}); use a matching config"
            )
    return merged


@dataclasses.dataclass
class Inputs:
    """The training batches (endless, from the resume step on) and a maker of eval passes."""

    train: Iterator[dict[str, jax.Array]]
    eval: Callable[[], Iterator[dict[str, jax.Array]]]
    augment: steps.DeviceAugment | None  # set when the step crops packed images itself


def make_inputs(
    config: ml_collections.ConfigDict, plan: RunPlan, source: Source, start_step: int, scheme: schemes.Scheme
) -> Inputs:
    """This process's host batches -> on the devices as the scheme places them, prefetched."""
    from alexnet_jax.data import pipeline, registry

    aug = pipeline.Augmentation(
        image_size=config.image_size,
        resize_size=plan.resize_size,
        flip=config.random_flip,
        pca_noise_std=config.pca_noise_std,
        eval_crops=config.eval_crops,
        resize_method=config.resize_method,
        random_crop=config.random_crop,
    )
    shard = dict(process_index=plan.process_index, process_count=plan.process_count)
    train_batches = registry.train_batches(
        source.train,
        aug,
        per_process_batch=plan.global_batch // plan.process_count,
        seed=config.seed,
        start_step=start_step,
        **shard,
    )
    train = distributed.prefetch_to_device(train_batches, config.prefetch_to_device, place=scheme.place_batch)

    def eval_batches():
        per_process_batch = plan.eval_batch // plan.process_count
        batches = registry.eval_batches(source.eval, aug, per_process_batch=per_process_batch, **shard)
        return distributed.prefetch_to_device(batches, place=scheme.place_batch)

    augment = None
    if source.train.augments_on_device:
        augment = steps.DeviceAugment(
            seed=config.seed,
            image_size=config.image_size,
            flip=config.random_flip,
            pca_noise_std=config.pca_noise_std,
            random_crop=config.random_crop,
        )
    return Inputs(train=train, eval=eval_batches, augment=augment)


class Evaluator:
    """One evaluation pass at a step: metrics written, logged, and the paper's Figure 3 drawn."""

    def __init__(self, p_eval, inputs: Inputs, writer: metrics_lib.MetricWriter, *, workdir: str, variant: str):
        self.p_eval, self.inputs, self.writer = p_eval, inputs, writer
        self.workdir, self.variant = workdir, variant

    def __call__(self, step: int, state: TrainState) -> dict[str, float]:
        results, _ = evaluate_batches(self.p_eval, (state.params,), self.inputs.eval())
        self.writer.write(step, results)
        conv1 = {"conv1": distributed.host_copy(state.params["conv1"])}  # every process: split across hosts maybe
        if self.writer.enabled:  # Figure 3 of the paper, as training goes
            figures.write_conv1_filters(
                self.workdir, conv1, self.variant, step, summary_writer=self.writer.summary_writer
            )
        log.info(
            "step %d  eval loss %.4f  top-1 %.2f%%  top-5 %.2f%%  (%d examples)",
            step,
            results["eval/loss"],
            100 * results["eval/top1_acc"],
            100 * results["eval/top5_acc"],
            results["eval/num_examples"],
        )
        return results


class Meter:
    """The clock of a log interval: images/s of the steps it covers, and the share spent waiting for input.

    The first step of a run (or resumed run) compiles; the clock restarts after it,
    so compilation never counts as training speed.
    """

    def __init__(self, global_batch: int):
        self.global_batch = global_batch
        self.restart()

    def restart(self) -> None:
        self.start = time.perf_counter()
        self.steps = 0
        self.waited = 0.0

    def next_batch(self, batches: Iterator[Any]) -> Any:
        """next(batches), timing how long the loop waited for it."""
        start = time.perf_counter()
        batch = next(batches)
        self.waited += time.perf_counter() - start
        return batch

    def summary(self) -> dict[str, float]:
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        return {
            "train/img_per_s": self.steps * self.global_batch / elapsed if self.steps else 0.0,
            "train/data_wait_frac": min(1.0, self.waited / elapsed),
        }


def summarize_train(pending: list[tuple[int, dict]], *, restored_step: int | None = None) -> dict[str, float]:
    """Means of the per-step train metrics since the last log; stops on a non-finite step.

    This is the loop's only host sync between logs: it waits for the steps to finish.
    """
    host = distributed.host_copy([m for _, m in pending])
    for (step, _), values in zip(pending, host):
        if not bool(values["finite"]):
            raise DivergenceError(_divergence_message(step, values, restored_step))
    summary = {
        f"train/{key}": float(np.mean([v[key] for v in host])) for key in ("loss", "top1_acc", "top5_acc", "grad_norm")
    }
    summary["train/learning_rate"] = float(host[-1]["learning_rate"])
    return summary


def _divergence_message(step: int, values: dict[str, Any], restored_step: int | None) -> str:
    where = f"training diverged at step {step}: loss={float(values['loss'])}, grad_norm={float(values['grad_norm'])}."
    if restored_step is not None and step == restored_step + 1:
        return (
            f"{where} It was the first step after restoring the checkpoint of step {restored_step}, so that "
            "checkpoint is the suspect, not the learning rate: move checkpoints/"
            f"{restored_step} aside and restart to resume from the one before it"
        )
    return (
        f"{where} No checkpoint of this state was written; lower config.learning_rate or add "
        "config.warmup_epochs, then restart"
    )


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> TrainState:
    """Train (resuming from WORKDIR/checkpoints if there are any), evaluating as configured.

    Returns the final state. SIGTERM/SIGINT stop it early with a checkpoint (and a normal return).
    """
    config_lib.validate(config, device_count=jax.device_count(), process_count=jax.process_count())
    log.info("devices: %s", distributed.describe())
    if config.init_from:  # a bad weights path is one line now, not after TensorFlow and the data have loaded
        trained.check_path(config.init_from, flag="config.init_from")
    guard = start_watchdog(config, workdir)  # several processes: a lost or hung one ends the job in one line
    try:
        lock = lock_workdir(workdir)  # before anything is written there
        try:
            # TensorFlow (seconds to load on a small machine) only once the settings and the workdir are known good.
            cli.quiet_tensorflow()
            state = _train_and_evaluate(config, workdir, guard)
        finally:
            lock.release()
    except Exception as error:
        guard.abandon(error)  # several processes: the others are told, and this one leaves at once
        raise
    guard.stop()
    return state


def start_watchdog(config: ml_collections.ConfigDict, workdir: str) -> watchdog.Watchdog:
    """The watchdog of this process (threads only when there are peers to watch)."""
    checkpoints = os.path.join(os.path.abspath(workdir), checkpoint_lib.CHECKPOINTS_DIR)
    return watchdog.Watchdog(
        client=distributed.coordination_client(),
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        peer_timeout_s=config.peer_timeout_s,
        step_timeout_s=config.step_timeout_s,
        resume_step=lambda: watchdog.newest_checkpoint(checkpoints),
    ).start()


def lock_workdir(workdir: str) -> workdir_lock.WorkdirLock:
    """One writer per workdir: process 0 takes the lock for the job; every process learns if it could not."""
    workdir = paths.writable_directory(workdir, flag="--workdir")
    lock = workdir_lock.WorkdirLock(workdir, process_index=jax.process_index())
    error = None
    try:
        lock.acquire()
    except UserError as refused:
        error = refused
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        held = multihost_utils.process_allgather(np.int32(error is None))
        if error is None and not np.all(held):
            raise UserError(f"process 0 could not take the lock of {workdir} (its message says why)")
    if error is not None:
        raise error
    return lock


def _train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, guard: watchdog.Watchdog) -> TrainState:
    from alexnet_jax.data import registry

    prepare = functools.partial(distributed.prepare_on_process_0, timeout_s=config.prepare_timeout_s)
    source = registry.open_source_from_config(config, prepare=prepare)
    checkpointer = checkpoint_lib.Checkpointer(workdir, keep=config.keep_checkpoints)
    resume = Resume.find(checkpointer, workdir)
    pretrained = None
    if config.init_from and resume.step is None:
        pretrained = trained.load(config.init_from, flag="config.init_from")
    plan = plan_run(config, source, previous_info=resume.info, pretrained=pretrained)
    if resume.meta is not None:  # another model in this workdir is refused before anything compiles
        checkpoint_lib.check_compatible(resume.meta, plan.model_meta(config), checkpointer.directory)
        resume.warn_changed_settings(config, plan.process_count)

    model = build.create_model(config, plan.num_classes, input_scale=plan.input_scale)
    schedule = optim.make_schedule(config, plan.steps_per_epoch, plan.total_steps)
    tx = optim.make_optimizer(config, schedule)
    scheme = schemes.from_config(config)  # how the step is placed on the devices (docs/distributed.md)
    state = restore_or_init(
        config,
        plan,
        model,
        tx,
        checkpointer=checkpointer,
        resume=resume,
        pretrained=pretrained,
        workdir=workdir,
        scheme=scheme,
    )
    start_step = int(distributed.host_copy(state.step))
    if plan.is_primary:
        _record_run(workdir, config, plan, source)
    inputs = make_inputs(config, plan, source, start_step, scheme)
    p_train, p_eval = scheme.make_steps(
        model, tx, schedule, augment=inputs.augment, grad_accum_steps=config.grad_accum_steps
    )
    writer = metrics_lib.MetricWriter(workdir, enabled=plan.is_primary)
    evaluator = Evaluator(p_eval, inputs, writer, workdir=workdir, variant=config.model)
    log.info(
        "training %s AlexNet on %s (%d classes, %s input): steps %d..%d, %d steps/epoch, global batch %d",
        *(config.model, source.name, plan.num_classes, plan.input_scale),
        *(start_step, plan.total_steps, plan.steps_per_epoch, plan.global_batch),
    )
    try:
        loop = dict(inputs=inputs, evaluator=evaluator, checkpointer=checkpointer, writer=writer)
        loop.update(profiler=profiling.StepProfiler(config.profile_steps, workdir, enabled=plan.is_primary))
        loop.update(guard=guard)
        state = run_loop(state, config, plan, p_train=p_train, restored_step=resume.step, **loop)
    finally:
        checkpointer.close()
        writer.close()
    if plan.is_primary:
        _draw_curves(workdir)
    return state


def _record_run(workdir: str, config: ml_collections.ConfigDict, plan: RunPlan, source: Source) -> None:
    """WORKDIR/config.json: what the checkpoints need to be used (and resumed) as trained."""
    runinfo.write_run_info(
        workdir,
        config,
        source.class_names,
        num_classes=plan.num_classes,
        resize_size=plan.resize_size,
        input_scale=plan.input_scale,
        process_count=plan.process_count,
    )


@dataclasses.dataclass
class _Due:
    """What a step must do besides training."""

    log: bool
    eval: bool
    checkpoint: bool
    stop: bool


def _due(step: int, config: ml_collections.ConfigDict, plan: RunPlan, stop_request) -> _Due:
    log_step = step % config.log_every_steps == 0
    stop = stop_request.requested(at_sync_point=log_step)
    last = step == plan.total_steps
    return _Due(
        log=log_step,
        eval=(step % plan.eval_every == 0 or last) and not stop,
        checkpoint=step % plan.checkpoint_every == 0 or last or stop,
        stop=stop,
    )


def run_loop(
    state: TrainState,
    config: ml_collections.ConfigDict,
    plan: RunPlan,
    *,
    p_train,
    inputs: Inputs,
    evaluator: Evaluator,
    checkpointer: checkpoint_lib.Checkpointer,
    writer: metrics_lib.MetricWriter,
    restored_step: int | None,
    profiler: profiling.StepProfiler,
    guard: watchdog.Watchdog,
) -> TrainState:
    """Steps from the state's step to plan.total_steps, logging, evaluating and checkpointing as due."""
    dropout_rng = steps.dropout_root_key(config.seed, config.prng_impl)
    start_step = int(distributed.host_copy(state.step))
    progress = metrics_lib.Progress(plan.total_steps, plan.global_batch, data_wait_shown=DATA_WAIT_SHOWN)
    watch = DataWaitWatch()
    meter = Meter(plan.global_batch)
    pending: list[tuple[int, dict]] = []
    stop_request = preemption.StopRequest().install()
    try:
        for step in range(start_step + 1, plan.total_steps + 1):
            profiler.before_step(step)
            state, step_metrics = p_train(state, meter.next_batch(inputs.train), dropout_rng)
            profiler.after_step(step, state)
            pending.append((step, step_metrics))
            if step == start_step + 1:  # leave compilation out of the first interval's speed
                jax.block_until_ready(state.step)
                meter.restart()
            else:
                meter.steps += 1
            guard.beat(step)  # the step clock starts after the first step: compiling it is no hang
            due = _due(step, config, plan, stop_request)
            if pending and (due.log or due.eval or due.checkpoint):
                # Also the divergence check: raises before a bad state can be saved.
                summary = summarize_train(pending, restored_step=restored_step) | meter.summary()
                writer.write(step, summary)
                log.info(progress.line(step, summary))
                watch.check(summary["train/data_wait_frac"])
                pending.clear()
                meter.restart()
            with guard.paused():  # evaluation and checkpoint writes take longer than a step
                results = evaluator(step, state) if due.eval else None
                if due.checkpoint:
                    checkpointer.save(step, state, plan.model_meta(config), metrics=results)
                if due.stop:
                    checkpointer.wait()
            if due.stop:
                log.warning("stopped at step %d on request; checkpoint saved in %s", step, checkpointer.directory)
                break
            if due.eval or due.checkpoint:
                meter.restart()
    finally:
        guard.idle()
        profiler.stop()  # a run that ends or stops inside the window still writes its trace
        stop_request.restore()
    return state


class DataWaitWatch:
    """Warns once when the loop keeps waiting for input: the host, not the accelerator, sets the pace."""

    def __init__(self):
        self.high_intervals = 0
        self.warned = False

    def check(self, data_wait_frac: float) -> None:
        self.high_intervals = self.high_intervals + 1 if data_wait_frac > DATA_WAIT_WARN else 0
        if self.high_intervals >= 2 and not self.warned:
            self.warned = True
            log.warning(
                "the input pipeline is the bottleneck: the loop waited for data %.0f%% of the time. Remedies: "
                "pack the data decode-free (python -m alexnet_jax.commands.pack, then --config.dataset=packed), "
                "give the host more CPU cores, or train on a pre-resized copy (python -m alexnet_jax.commands.resize)",
                100 * data_wait_frac,
            )


def _draw_curves(workdir: str) -> None:
    try:
        curves.plot_curves([workdir], os.path.join(workdir, curves.CURVES_FILE))
    except Exception as error:  # a figure must never fail a finished run
        log.warning("could not draw %s/curves.png: %s", workdir, error)
