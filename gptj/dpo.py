"""Preference tuning: Direct Preference Optimization (Rafailov et al. 2023), IPO and hinge, on the Trainer.

`train.objective=dpo` (gptj.recipe.build_trainer) trains on a preference task
(`gptj_dpo`: JSON lines {"prompt", "chosen", "rejected"}), whose batches are
pairs, tokens [B, 2, L] (chosen, rejected; gptj.data.pipeline). Per pair, with
log p the log-probability of a completion and its EOS given the prompt (summed
over the tokens the loss mask marks) under the trained policy and under a
frozen reference:

    chosen reward   r_c = beta * (log p_policy(chosen) - log p_ref(chosen))
    rejected reward r_r = beta * (log p_policy(rejected) - log p_ref(rejected))
    delta = (r_c - r_r) / beta

    sigmoid (DPO): -(1 - eps) log sigmoid(beta delta) - eps log sigmoid(-beta delta)   (eps: label_smoothing)
    ipo:           (delta_avg - 1 / (2 beta))^2,  delta_avg of log-ratios averaged per completion token
    hinge:         max(0, 1 - beta delta)

as TRL's DPOTrainer computes them (its `sigmoid`, `ipo` and `hinge` loss
types; label smoothing is the conservative DPO of noisy labels, which TRL's
older `sigmoid` applied), averaged over the pairs of a batch. The metrics
carry TRL's names: loss, rewards/chosen, rewards/rejected, rewards/accuracies
(the share of pairs with r_c > r_r), rewards/margins (r_c - r_r),
logps/chosen, logps/rejected (the policy's), means over the pairs; validation
reports the same on the validation pairs.

The reference is the generic Trainer's reference model (gptj.core.trainer),
the starting policy: the same GPT-J without LoRA adapters. Under LoRA it runs
on the frozen base alone, which is the base with the adapters off, as TRL
does with a PEFT model: no second copy of the weights (a run that starts from
a PEFT adapter, `lora.init_from`, keeps a frozen copy of that adapter too, as
TRL does). Without LoRA it runs on a frozen copy of the starting weights
(init_from), kept in `dpo.reference_dtype`: one more set of weights per
device, in that dtype, sharded as the parameters are. The other
way, reference log-probabilities computed once before training and stored
with the data (TRL's precompute_ref_log_probs), would take no device memory
(8 bytes per pair on the host) but a forward pass over the whole data set
before step 1, again whenever data, seq_len or shuffling change, and tie the
data position to a table of log-probs; the frozen copy is exact on any data,
validation included, at the cost `--mode=plan` shows beside it.

The two sequences of a pair run through the model as one batch of 2B rows
(`PairModel`: row 2i chosen, 2i + 1 rejected), as TRL concatenates them. With
train.loss_chunk_tokens > 0 the model returns its head's inputs and the
per-sequence log-probabilities are taken chunk by chunk of tokens, each
chunk's logits recomputed in the backward pass rather than kept, so the
[tokens, vocabulary] logits never exist whole.
"""

from __future__ import annotations

from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from gptj.core.losses import map_position_chunks
from gptj.core.trainer import WithReference
from gptj.model.transformer import GPTJConfig, HeadInputs, output_logits
from gptj.settings import DPOSettings

# The metrics a DPO run reports, as TRL names them, from the sums the loss returns: {metric: sum}.
METRIC_SUMS = {
    "rewards/chosen": "rewards_chosen_sum",
    "rewards/rejected": "rewards_rejected_sum",
    "rewards/accuracies": "rewards_correct",
    "rewards/margins": "rewards_margin_sum",
    "logps/chosen": "logps_chosen_sum",
    "logps/rejected": "logps_rejected_sum",
}


class PairModel(nn.Module):
    """A language model over preference pairs: tokens [B, 2, L] -> `model`'s outputs on [2B, L].

    Pair i's chosen sequence is row 2i, its rejected one row 2i + 1 (a
    reshape: the rows stay on the device that holds the pair). The
    parameters are `model`'s own, under the same names (no scope of its own).
    """

    model: nn.Module

    def setup(self):
        nn.share_scope(self, self.model)

    @property
    def config(self):
        """The wrapped model's config (what code reads off a recipe's Trainer: `trainer.model.config`)."""
        return self.model.config

    @property
    def lora(self):
        """The wrapped model's LoRA adapters (None: none)."""
        return self.model.lora

    @property
    def pipeline(self):
        """The wrapped model's pipeline schedule over the mesh's stages (None: none)."""
        return self.model.pipeline

    def __call__(self, tokens, **kwargs):
        return self.model(tokens.reshape((-1,) + tokens.shape[2:]), **kwargs)


def _target_logps(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """log p(target) per position from fp32 logits [..., V]: a masked sum, so a sharded vocabulary stays sharded."""
    ids = jax.lax.broadcasted_iota(jnp.int32, logits.shape, logits.ndim - 1)
    target_logit = jnp.sum(jnp.where(ids == targets[..., None], logits, 0.0), axis=-1)
    return target_logit - jax.nn.logsumexp(logits, axis=-1)


def sequence_logps(outputs: Any, targets: jax.Array, mask: jax.Array, config: GPTJConfig,
                   chunk_tokens: int) -> jax.Array:
    """Per sequence, the summed log-probabilities of `targets` [R, L] where `mask` is set: fp32 [R].

    `outputs`: the model's logits [R, L, V], or its `HeadInputs` (the head is
    then applied chunk_tokens tokens at a time, and in the backward pass each
    chunk's logits are recomputed rather than kept).
    """
    if isinstance(outputs, HeadInputs):
        @jax.checkpoint
        def chunk(hidden, chunk_targets, kernel, bias):
            return _target_logps(output_logits(hidden, kernel, bias, config), chunk_targets)

        token_logps = map_position_chunks(lambda h, t: chunk(h, t, outputs.kernel, outputs.bias), chunk_tokens,
                                          outputs.hidden, targets)
    else:
        token_logps = _target_logps(outputs.astype(jnp.float32), targets)
    return jnp.sum(token_logps * mask, axis=-1)


def pair_sums(policy: jax.Array, reference: jax.Array, lengths: jax.Array, settings: DPOSettings) -> dict:
    """The loss and metrics of a batch of pairs, as sums over its pairs (the Trainer divides by `weight`).

    policy, reference: log-probabilities [B, 2] (chosen, rejected); lengths
    [B, 2]: the tokens each was summed over. A pair whose chosen sequence
    counts no token (a padding row of a validation batch) weighs nothing.
    """
    valid = (lengths[:, 0] > 0).astype(jnp.float32)
    logratios = policy - reference
    delta = logratios[:, 0] - logratios[:, 1]
    beta = settings.beta
    if settings.loss_type == "sigmoid":
        smoothing = settings.label_smoothing
        losses = -(1.0 - smoothing) * jax.nn.log_sigmoid(beta * delta) - smoothing * jax.nn.log_sigmoid(-beta * delta)
    elif settings.loss_type == "ipo":
        average = logratios / jnp.maximum(lengths, 1.0)
        losses = jnp.square(average[:, 0] - average[:, 1] - 1.0 / (2.0 * beta))
    elif settings.loss_type == "hinge":
        losses = jax.nn.relu(1.0 - beta * delta)
    else:
        raise ValueError(f"unknown dpo.loss_type {settings.loss_type!r}")
    rewards = jax.lax.stop_gradient(beta * logratios)
    logps = jax.lax.stop_gradient(policy)
    metrics = {
        "rewards_chosen_sum": rewards[:, 0], "rewards_rejected_sum": rewards[:, 1],
        "rewards_correct": (rewards[:, 0] > rewards[:, 1]).astype(jnp.float32),
        "rewards_margin_sum": rewards[:, 0] - rewards[:, 1],
        "logps_chosen_sum": logps[:, 0], "logps_rejected_sum": logps[:, 1],
    }
    return {"loss_sum": jnp.sum(losses * valid), "weight": jnp.sum(valid),
            **{name: jnp.sum(value * valid) for name, value in metrics.items()}}


def loss_fn(settings: DPOSettings, config: GPTJConfig, chunk_tokens: int):
    """The Trainer's loss for pair batches: `(WithReference(policy outputs, reference outputs), batch) -> sums`."""
    def loss(outputs: WithReference, batch: Mapping[str, jax.Array]) -> dict:
        pairs, _, length = batch["targets"].shape
        targets = batch["targets"].reshape(2 * pairs, length)
        mask = batch["loss_mask"].reshape(2 * pairs, length).astype(jnp.float32)

        def logps(model_outputs):
            return sequence_logps(model_outputs, targets, mask, config, chunk_tokens).reshape(pairs, 2)

        return pair_sums(logps(outputs.outputs), logps(outputs.reference), jnp.sum(mask, -1).reshape(pairs, 2),
                         settings)

    return loss


def summarize(sums: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
    """Means over the pairs from the sums of `pair_sums`: loss and TRL's reward and log-prob metrics."""
    pairs = jnp.maximum(sums["weight"], 1.0)
    return {"loss": sums["loss_sum"] / pairs, **{name: sums[key] / pairs for name, key in METRIC_SUMS.items()}}
