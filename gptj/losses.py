"""Token-level losses, returned as sums so that microbatches and hosts combine exactly.

A loss function here maps (logits, batch) to a dict of sums; the trainer adds
them over microbatches and divides by the total `weight` (the number of
target tokens that count) once, so gradient accumulation and data-parallel
splits give the same result as one big batch.
"""

from __future__ import annotations

from typing import Mapping

import jax
import jax.numpy as jnp


def next_token_loss(logits: jax.Array, batch: Mapping[str, jax.Array], z_loss: float = 0.0,
                    accuracy: bool = True) -> dict[str, jax.Array]:
    """Cross-entropy of `batch['targets']` under `logits`, summed over tokens where `loss_mask` is set.

    logits: [B, T, V] (any dtype; computed in fp32). batch: `targets` int32
    [B, T] and optionally `loss_mask` [B, T] (1 = count this token).
    `z_loss` adds z_loss * logsumexp(logits)^2 per token (PaLM's auxiliary
    loss that keeps the softmax normaliser near 1).

    Returns sums: `loss_sum` (what is minimised: cross-entropy plus z-loss),
    `nll_sum` (cross-entropy only), `z_loss_sum`, `weight` (counted tokens)
    and, with `accuracy`, `correct` (argmax hits; an extra pass over the
    logits that the train step can skip).
    """
    logits = logits.astype(jnp.float32)
    targets = batch["targets"]
    mask = batch.get("loss_mask")
    mask = jnp.ones(targets.shape, jnp.float32) if mask is None else mask.astype(jnp.float32)
    log_z = jax.nn.logsumexp(logits, axis=-1)
    # A one-hot contraction rather than a gather: it stays sharded when the
    # vocabulary axis is split over devices (a gather would all-gather logits).
    target_logit = jnp.sum(logits * jax.nn.one_hot(targets, logits.shape[-1], dtype=logits.dtype), axis=-1)
    nll = log_z - target_logit
    z_term = z_loss * jnp.square(log_z)
    sums = {
        "loss_sum": jnp.sum((nll + z_term) * mask),
        "nll_sum": jnp.sum(nll * mask),
        "z_loss_sum": jnp.sum(z_term * mask),
        "weight": jnp.sum(mask),
    }
    if accuracy:
        sums["correct"] = jnp.sum((jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32) * mask)
    return sums


def summarize(sums: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
    """Means from the sums of `next_token_loss`: loss, nll, z_loss, perplexity (and accuracy if counted)."""
    weight = jnp.maximum(sums["weight"], 1.0)
    nll = sums["nll_sum"] / weight
    out = {"loss": sums["loss_sum"] / weight, "nll": nll, "z_loss": sums["z_loss_sum"] / weight,
           "perplexity": jnp.exp(nll)}
    if "correct" in sums:
        out["accuracy"] = sums["correct"] / weight
    return out
