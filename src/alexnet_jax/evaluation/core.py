"""The one evaluation core: device batches -> masked sums -> exact metrics, for training and the evaluate tool.

The training loop's Evaluator and python -m alexnet_jax.commands.evaluate (one model or an
ensemble) both score through evaluate_batches, so the figures a run logs and the
figures the tool prints come from one code path (big_vision's one evaluator).
A library module: it reads no flags and no files.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from alexnet_jax.checkpointing import trained
from alexnet_jax.model import build
from alexnet_jax.parallel import distributed, schemes
from alexnet_jax.step import metrics as metrics_lib


def evaluate_batches(
    p_eval, params: Sequence[Any], batches: Iterable[dict[str, jax.Array]], *, keep_probabilities: bool = False
) -> tuple[dict[str, float], np.ndarray | None]:
    """Exact metrics over device batches {'images', 'labels', 'mask'}: the one evaluation code path.

    p_eval: schemes.make_eval_step of one model (training) or several (an ensemble), which
    averages the softmax over crops and models and sums the masked metrics. With
    keep_probabilities, also the probabilities [num_examples, classes] of the real
    examples, in the order read.
    """
    totals, kept = None, []
    params = tuple(params)
    for batch in batches:
        sums, probs = p_eval(params, batch)
        totals = sums if totals is None else jax.tree_util.tree_map(jnp.add, totals, sums)
        if keep_probabilities:
            host_probs, mask = jax.device_get((probs, batch["mask"]))
            kept.append(host_probs.reshape((-1, host_probs.shape[-1]))[mask.reshape(-1) == 1])
    results = metrics_lib.eval_results(totals)
    return results, (np.concatenate(kept) if keep_probabilities else None)


def evaluate_runs(
    runs: list[trained.TrainedModel], batches, *, keep_probabilities: bool = False
) -> tuple[dict[str, float], np.ndarray | None]:
    """The runs' (averaged) softmax scored over device batches."""
    # Replicated once on every local device: an unplaced tree would be copied to each device every batch.
    replicated = NamedSharding(distributed.local_mesh(), PartitionSpec())
    params = [jax.device_put(run.params, replicated) for run in runs]
    p_eval = schemes.make_eval_step([run.module(build.resolve_backward_impl("auto")) for run in runs])
    return evaluate_batches(p_eval, params, batches, keep_probabilities=keep_probabilities)
