"""What a step measures: top-k accuracy and the masked sums an exact evaluation adds up, then their means.

Pure JAX, run inside the compiled steps; the writers that record the results live in reporting/metrics.py.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp


def correct_top_k(logits: jax.Array, labels: jax.Array, k: int) -> jax.Array:
    """1.0 where the label is among the k highest scores, per example. [N]"""
    k = min(k, logits.shape[-1])
    label_scores = jnp.take_along_axis(logits, labels[:, None], axis=-1)  # [N, 1]
    # Rank = how many classes score strictly higher; ties count in the label's favour.
    rank = jnp.sum(logits > label_scores, axis=-1)
    return (rank < k).astype(jnp.float32)


def masked_sums(probs: jax.Array, labels: jax.Array, mask: jax.Array) -> dict[str, jax.Array]:
    """Sums over the real (mask 1) examples of probs [..., classes], labels [...], mask [...].

    The loss is the negative log of the (crop- and model-averaged) probability of the
    true label. Padding rows (mask 0) count nowhere, whatever they score.
    """
    probs = probs.reshape((-1, probs.shape[-1])).astype(jnp.float32)
    labels, mask = labels.reshape(-1), mask.reshape(-1).astype(jnp.float32)
    log_probs = jnp.log(jnp.maximum(probs, jnp.finfo(jnp.float32).tiny))
    nll = -jnp.take_along_axis(log_probs, labels[:, None], axis=-1)[:, 0]
    return {
        "loss": jnp.sum(nll * mask),
        "top1_acc": jnp.sum(correct_top_k(probs, labels, 1) * mask),
        "top5_acc": jnp.sum(correct_top_k(probs, labels, 5) * mask),
        "num_examples": jnp.sum(mask),
    }


def eval_results(totals: dict[str, Any]) -> dict[str, float]:
    """Summed masked_sums over a split -> the eval/ metrics (exact means over real examples)."""
    totals = jax.device_get(totals)
    count = float(totals["num_examples"])
    return {
        "eval/loss": float(totals["loss"]) / count,
        "eval/top1_acc": float(totals["top1_acc"]) / count,
        "eval/top5_acc": float(totals["top5_acc"]) / count,
        "eval/num_examples": int(count),
    }
