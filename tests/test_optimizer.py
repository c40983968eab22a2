"""The optimizer against a numpy transcription of the reference's (mesh-transformer-jax) chain and schedule."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from gptj.core.optimizer import decay_mask, gpt3_schedule, make_optimizer

OPT = dict(lr=1e-2, end_lr=1e-3, warmup_steps=3, anneal_steps=10, weight_decay=0.1, b1=0.9, b2=0.999, eps=1e-8,
           clip_norm=1.0)


def reference_lr(step, lr, end_lr, warmup, anneal):
    """mesh_transformer/util.py gpt3_schedule, in plain Python."""
    warmup_pct = min(max(step, 0), warmup) / warmup
    anneal_pct = min(max(step - warmup, 0), anneal) / anneal
    return warmup_pct * lr - (lr - end_lr) * (1 - math.cos(math.pi * anneal_pct)) / 2


def test_schedule_matches_reference_and_its_landmarks():
    schedule = gpt3_schedule(1e-2, 1e-3, 3, 10)
    for step in range(0, 20):
        assert float(schedule(step)) == pytest.approx(reference_lr(step, 1e-2, 1e-3, 3, 10), rel=1e-6, abs=1e-9)
    assert float(schedule(0)) == 0.0  # the reference's first update has lr 0
    assert float(schedule(3)) == pytest.approx(1e-2)  # peak at the end of warmup
    assert float(schedule(13)) == pytest.approx(1e-3)  # end_lr after anneal_steps more
    assert float(schedule(10_000)) == pytest.approx(1e-3)  # then constant
    assert float(gpt3_schedule(1e-2, 1e-3, 0, 10)(0)) == pytest.approx(1e-2)  # no warmup: start at the peak


def test_decay_mask_skips_vectors_and_the_stacked_layer_axis():
    params = {"wte": jnp.zeros((8, 4)), "lm_head_bias": jnp.zeros(8), "ln_f": {"scale": jnp.zeros(4)},
              "blocks": {"ln": {"scale": jnp.zeros((2, 4))}, "mlp": {"fc_in_kernel": jnp.zeros((2, 4, 16)),
                                                                  "fc_in_bias": jnp.zeros((2, 16))}}}
    mask = decay_mask()(params)
    assert mask == {"wte": True, "lm_head_bias": False, "ln_f": {"scale": False},
                    "blocks": {"ln": {"scale": False}, "mlp": {"fc_in_kernel": True, "fc_in_bias": False}}}


def reference_updates(params, grads_per_step, opt):
    """The reference chain in numpy: clip by global norm, Adam, + wd * p on matrices, * -lr(step)."""
    mu = {k: np.zeros_like(v) for k, v in params.items()}
    nu = {k: np.zeros_like(v) for k, v in params.items()}
    params = {k: v.astype(np.float64) for k, v in params.items()}
    for count, grads in enumerate(grads_per_step):
        norm = math.sqrt(sum(float(np.sum(np.square(g))) for g in grads.values()))
        if norm >= opt["clip_norm"]:
            grads = {k: g / norm * opt["clip_norm"] for k, g in grads.items()}
        t = count + 1
        lr = reference_lr(count, opt["lr"], opt["end_lr"], opt["warmup_steps"], opt["anneal_steps"])
        for k in params:
            mu[k] = opt["b1"] * mu[k] + (1 - opt["b1"]) * grads[k]
            nu[k] = opt["b2"] * nu[k] + (1 - opt["b2"]) * np.square(grads[k])
            update = (mu[k] / (1 - opt["b1"] ** t)) / (np.sqrt(nu[k] / (1 - opt["b2"] ** t)) + opt["eps"])
            if params[k].ndim > 1:
                update = update + opt["weight_decay"] * params[k]
            params[k] = params[k] - lr * update
    return params


def test_updates_match_the_reference_chain():
    rng = np.random.default_rng(0)
    params = {"w": rng.normal(size=(4, 3)).astype(np.float32), "b": rng.normal(size=(3,)).astype(np.float32)}
    # Large gradients on some steps so that clipping is exercised, small on others.
    grads = [{k: (rng.normal(size=v.shape) * scale).astype(np.float32) for k, v in params.items()}
             for scale in (5.0, 0.01, 3.0, 0.1, 0.2, 2.0)]
    optimizer, _ = make_optimizer(OPT, mask=lambda p: jax.tree_util.tree_map(lambda x: x.ndim > 1, p))
    state = optimizer.init(params)
    current = jax.tree_util.tree_map(jnp.asarray, params)
    for g in grads:
        updates, state = optimizer.update(g, state, current)
        current = optax.apply_updates(current, updates)
    expected = reference_updates(params, grads, OPT)
    for k in params:
        np.testing.assert_allclose(np.asarray(current[k]), expected[k], rtol=1e-5, atol=1e-7)


def test_bad_learning_rate_is_refused():
    with pytest.raises(ValueError, match="lr must be positive"):
        make_optimizer(dict(OPT, lr=-1.0))
    with pytest.raises(ValueError, match="anneal_steps must be positive"):
        gpt3_schedule(1.0, 0.1, 0, 0)
