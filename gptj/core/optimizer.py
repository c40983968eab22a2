"""The reference's optimizer (mesh-transformer-jax) as an optax chain, and its learning-rate schedule.

The reference trains with, in order:

    clip_by_global_norm(clip_norm)  ->  scale_by_adam(b1, b2, eps)
    ->  + weight_decay * param  (matrices only: biases and LayerNorm are not decayed)
    ->  * -lr(step)

i.e. AdamW with decoupled weight decay that the learning rate also scales,
and the GPT-3 schedule: linear warmup from 0 to `lr` over `warmup_steps`,
a half cosine from `lr` down to `end_lr` over the next `anneal_steps`, then
`end_lr` for ever. As in the reference, the schedule is evaluated at the
number of updates already applied, so the very first update uses lr(0) = 0
when there is a warmup.

Parameters here are stacked over layers (a leading `layers` axis), so "a
matrix" means more than one dimension besides that axis: `decay_mask` takes
the names of the stacked subtrees.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax


def gpt3_schedule(lr: float, end_lr: float, warmup_steps: int, anneal_steps: int) -> optax.Schedule:
    """lr(step): linear warmup 0 -> lr, cosine lr -> end_lr over `anneal_steps`, then constant end_lr.

    `warmup_steps=0` starts at the peak. `anneal_steps` must be positive (use
    `end_lr == lr` for a constant rate after warmup).
    """
    if anneal_steps <= 0:
        raise ValueError(f"anneal_steps must be positive, got {anneal_steps}")
    if warmup_steps < 0:
        raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")

    def schedule(step):
        step = jnp.asarray(step, jnp.float32)
        warmup = jnp.clip(step / warmup_steps, 0.0, 1.0) if warmup_steps else jnp.float32(1.0)
        anneal = jnp.clip((step - warmup_steps) / anneal_steps, 0.0, 1.0)
        # The reference's form: the warmup ramp minus the cosine's descent.
        return warmup * lr - (lr - end_lr) * (1.0 - jnp.cos(jnp.pi * anneal)) / 2.0

    return schedule


def decay_mask(stacked: Sequence[str] = ("blocks",)) -> Callable[[Any], Any]:
    """A weight-decay mask function: True for matrices, False for vectors (biases, LayerNorm).

    Leaves under a dict key named in `stacked` carry a leading layer axis that
    does not count as a dimension. The function accepts plain or flax-boxed
    parameter trees (the optimizer is initialised on boxed ones to carry their
    logical axes over to its state).
    """
    stacked = frozenset(stacked)

    def mask(params):
        def one(path, leaf):
            keys = {getattr(k, "key", None) for k in path}
            own_dims = np.ndim(leaf) - (1 if keys & stacked else 0)
            return own_dims > 1

        return jax.tree_util.tree_map_with_path(one, params)

    return mask


def make_optimizer(opt: Mapping[str, Any], mask: Callable[[Any], Any] | None = None
                   ) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """The optax chain and schedule for an `optimizer` config section.

    `opt` has lr, end_lr, warmup_steps, anneal_steps, weight_decay, b1, b2,
    eps and clip_norm (0 disables clipping). `mask` picks the decayed
    parameters (default: `decay_mask()`).
    """
    if opt["lr"] <= 0:
        raise ValueError(f"optimizer.lr must be positive, got {opt['lr']}")
    schedule = gpt3_schedule(opt["lr"], opt["end_lr"], opt["warmup_steps"], opt["anneal_steps"])
    chain = []
    if opt["clip_norm"] > 0:
        chain.append(optax.clip_by_global_norm(opt["clip_norm"]))
    chain.append(optax.scale_by_adam(b1=opt["b1"], b2=opt["b2"], eps=opt["eps"]))
    if opt["weight_decay"] > 0:
        chain.append(optax.add_decayed_weights(opt["weight_decay"], mask=mask or decay_mask()))
    chain.append(optax.scale_by_learning_rate(schedule))
    return optax.chain(*chain), schedule
