"""Optimizers and learning-rate schedules built from the config (pure optax, no TensorFlow)."""

from __future__ import annotations

from typing import Any

import jax
import optax

SCHEDULES = ("step", "cosine", "constant")
OPTIMIZERS = ("sgd", "lars")
LR_SCALINGS = ("none", "linear")


def base_learning_rate(config: Any) -> float:
    """The configured lr, scaled linearly with the global batch when asked (Goyal et al. 2017)."""
    if config.lr_scaling == "linear":
        return config.learning_rate * config.batch_size / config.lr_base_batch_size
    return config.learning_rate


def make_schedule(config: Any, steps_per_epoch: int, total_steps: int) -> optax.Schedule:
    """Learning rate as a function of the step.

    "step" is the paper's recipe: the lr divided by 10 (lr_drop_factor) at each
    epoch listed in lr_drop_epochs. "cosine" is linear warmup then cosine decay to
    zero at total_steps. Either may have warmup_epochs of linear warmup.
    """
    peak = base_learning_rate(config)
    warmup_steps = int(round(config.warmup_epochs * steps_per_epoch))
    if config.schedule == "step":
        boundaries = {int(round(epoch * steps_per_epoch)): config.lr_drop_factor for epoch in config.lr_drop_epochs}
        main = optax.piecewise_constant_schedule(peak, boundaries)
        if warmup_steps == 0:
            return main
        warmup = optax.linear_schedule(0.0, peak, warmup_steps)
        return lambda step: jax.numpy.where(step < warmup_steps, warmup(step), main(step))
    if config.schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(
            init_value=0.0,
            peak_value=peak,
            warmup_steps=warmup_steps,
            decay_steps=max(total_steps, warmup_steps + 1),
            end_value=0.0,
        )
    if config.schedule == "constant":
        if warmup_steps == 0:
            return optax.constant_schedule(peak)
        return optax.linear_schedule(0.0, peak, warmup_steps)
    raise ValueError(f"unknown schedule {config.schedule!r}; expected one of {SCHEDULES}")


def make_optimizer(config: Any, schedule: optax.Schedule) -> optax.GradientTransformation:
    """SGD with momentum and L2 weight decay as in the paper.

    The paper's update is v <- 0.9 v - 5e-4 lr w - lr g: weight decay enters the
    gradient (coupled), applied to every parameter, biases included.
    """
    if config.optimizer == "sgd":
        return optax.chain(
            optax.add_decayed_weights(config.weight_decay),
            optax.sgd(schedule, momentum=config.momentum, nesterov=config.nesterov),
        )
    if config.optimizer == "lars":
        # You, Gitman & Ginsburg 2017: a per-layer trust ratio ||w|| / ||g + wd w||. Biases
        # (1-D parameters) get neither weight decay nor the trust ratio.
        return optax.lars(
            schedule,
            weight_decay=config.weight_decay,
            weight_decay_mask=weights_only,
            trust_coefficient=config.lars_trust_coefficient,
            trust_ratio_mask=weights_only,
            momentum=config.momentum,
            nesterov=config.nesterov,
        )
    raise ValueError(f"unknown optimizer {config.optimizer!r}; expected one of {OPTIMIZERS}")


def weights_only(params: Any) -> Any:
    """True for kernels, False for biases: the mask LARS uses for decay and trust ratio."""
    return jax.tree_util.tree_map(lambda leaf: leaf.ndim > 1, params)
