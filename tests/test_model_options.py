"""Model options change speed and memory, never the maths: scan/unroll, remat policies, attention kernels."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gptj.model.transformer import GPTJ, REMAT_POLICIES, GPTJConfig

BASE = GPTJConfig(vocab_size=64, num_layers=3, d_model=32, num_heads=4, rotary_dim=4, max_len=32,
                  attention_impl="einsum")


@pytest.fixture(scope="module")
def setup():
    params = nn.meta.unbox(GPTJ(BASE).init(jax.random.PRNGKey(0), jnp.zeros((1, 1), jnp.int32))["params"])
    tokens = jax.random.randint(jax.random.PRNGKey(1), (2, 10), 0, BASE.vocab_size)
    return params, tokens


def _loss_and_grads(config, params, tokens):
    def loss(p):
        logits = GPTJ(config).apply({"params": p}, tokens[:, :-1])
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), tokens[:, 1:, None], -1))

    return jax.jit(jax.value_and_grad(loss))(params)


@pytest.fixture(scope="module")
def reference_grads(setup):
    params, tokens = setup
    return _loss_and_grads(BASE, params, tokens)


@pytest.mark.parametrize("changes", [
    dict(scan_layers=False),
    *[dict(remat_policy=name) for name in sorted(REMAT_POLICIES) if name != "none"],
    dict(attention_impl="dot_product"),
    dict(attention_impl="blockwise"),
], ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
def test_option_keeps_loss_and_gradients(setup, reference_grads, changes):
    params, tokens = setup
    loss, grads = _loss_and_grads(BASE.replace(**changes), params, tokens)
    ref_loss, ref_grads = reference_grads
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
    for a, b in zip(jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(ref_grads)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_bfloat16_compute_keeps_fp32_params_and_logits(setup):
    params, tokens = setup
    config = BASE.replace(dtype="bfloat16")
    variables = GPTJ(config).init(jax.random.PRNGKey(0), tokens)
    assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(nn.meta.unbox(variables)))
    logits = GPTJ(config).apply({"params": params}, tokens)
    reference = GPTJ(BASE).apply({"params": params}, tokens)
    assert logits.dtype == jnp.float32
    # bf16 has 8 bits of mantissa: close to fp32, but not equal.
    assert 0 < np.abs(logits - reference).max() < 0.1 * np.abs(reference).max()


def test_invalid_config_lists_every_problem_on_one_line():
    with pytest.raises(ValueError) as e:
        GPTJConfig(d_model=30, num_heads=4, rotary_dim=3, remat_policy="some", dtype="float64")
    message = str(e.value)
    assert "\n" not in message
    for expected in ("d_model 30 is not divisible by num_heads 4", "rotary_dim 3 must be even",
                     "remat_policy 'some'", "dtype 'float64'"):
        assert expected in message
    with pytest.raises(ValueError, match=r"unknown GPT-J model config keys \['n_layer'\]"):
        GPTJConfig.from_dict({"n_layer": 2})
