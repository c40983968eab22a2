"""Blockwise (flash-style) attention equals the einsum reference: causal, padded, any length; and its wiring.

The reference is `einsum_attention` (all T x T scores, one softmax), itself
checked against HF PyTorch through the model in test_model_parity.py.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gptj.model.attention import (ATTENTION_IMPLS, DEFAULT_ATTENTION, blockwise_attention, einsum_attention,
                                  resolve_attention_impl)
from gptj.model.transformer import GPTJ, GPTJConfig

BATCH, HEADS, HEAD_DIM, SCALE = 2, 3, 8, 0.35


def _inputs(length: int, seed: int = 0):
    keys = jax.random.split(jax.random.PRNGKey(seed), 4)
    return [jax.random.normal(k, (BATCH, length, HEADS, HEAD_DIM), jnp.float32) for k in keys]


def _padding_mask(length: int) -> np.ndarray:
    """Row 0 right-padded (the last third is padding); row 1 left-padded by 3 and right-padded by 2."""
    mask = np.ones((BATCH, length), bool)
    mask[0, length - length // 3:] = False
    mask[1, :3] = False
    mask[1, length - 2:] = False
    return mask


def _live_rows(mask: np.ndarray | None, length: int) -> np.ndarray:
    """[B, T]: query rows that see at least one real key (the others are padding no real position reads)."""
    if mask is None:
        return np.ones((BATCH, length), bool)
    return np.cumsum(mask, axis=1) > 0


@pytest.mark.parametrize("length,block", [(32, 8), (37, 8), (5, 8)],
                         ids=["4-blocks", "ragged-last-block", "shorter-than-a-block"])
def test_blockwise_equals_einsum_forward_and_backward(length, block):
    """Outputs and q/k/v gradients, causal only and with left and right padding, in one compiled program."""
    q, k, v, d_out = _inputs(length)
    mask = _padding_mask(length)

    def both(q, k, v, d_out, mask):
        def vjp(kernel):
            out, pull = jax.vjp(kernel, q, k, v)
            return out, pull(d_out)

        return (vjp(lambda q, k, v: blockwise_attention(q, k, v, mask, scale=SCALE, block_size=block)),
                vjp(lambda q, k, v: einsum_attention(q, k, v, mask, scale=SCALE, dtype=jnp.float32)))

    run = jax.jit(both)
    for padding in (None, mask):
        live = _live_rows(padding, length)
        # Padding rows get no gradient from a loss that masks them.
        (out, grads), (ref_out, ref_grads) = run(q, k, v, d_out * live[:, :, None, None], padding)
        rows = live[:, :, None, None]
        np.testing.assert_allclose(np.where(rows, out, 0), np.where(rows, ref_out, 0), rtol=1e-5, atol=1e-6)
        for name, got, want in zip("qkv", grads, ref_grads):
            scale = float(np.max(np.abs(want)))
            np.testing.assert_allclose(got / scale, want / scale, rtol=1e-5, atol=1e-6,
                                       err_msg=f"d{name}, padded={padding is not None}")


def test_blockwise_keeps_the_compute_dtype():
    q, k, v, _ = (x.astype(jnp.bfloat16) for x in _inputs(20))
    out = jax.jit(lambda q, k, v: blockwise_attention(q, k, v, scale=SCALE, block_size=8))(q, k, v)
    ref = einsum_attention(q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32), scale=SCALE,
                           dtype=jnp.float32)
    assert out.dtype == jnp.bfloat16
    assert float(jnp.max(jnp.abs(out.astype(jnp.float32) - ref))) < 0.05  # bf16 inputs: 8 bits of mantissa


def test_model_attention_impls_agree_with_padding():
    """The padded, full-sequence model call (scoring) gives the same logits with every exact kernel."""
    config = GPTJConfig(vocab_size=64, num_layers=2, d_model=32, num_heads=4, rotary_dim=4, max_len=32,
                        attention_impl="einsum")
    tokens = jax.random.randint(jax.random.PRNGKey(1), (2, 12), 0, config.vocab_size)
    mask = jnp.asarray(np.arange(12)[None, :] < np.array([[12], [7]]))
    params = nn.meta.unbox(GPTJ(config).init(jax.random.PRNGKey(0), tokens)["params"])

    @jax.jit
    def logits(params):
        return [GPTJ(config.replace(attention_impl=impl)).apply({"params": params}, tokens, None, mask)
                for impl in ("einsum", "blockwise", "auto", "dot_product")]

    reference, *others = logits(params)
    real = np.asarray(mask)[..., None]
    for impl, got in zip(("blockwise", "auto", "dot_product"), others):
        np.testing.assert_allclose(np.where(real, got, 0), np.where(real, reference, 0), rtol=1e-5, atol=1e-5,
                                   err_msg=impl)


def test_auto_resolves_per_backend_and_unknown_names_fail_on_one_line():
    assert set(DEFAULT_ATTENTION.values()) <= set(ATTENTION_IMPLS) - {"auto"}
    assert resolve_attention_impl("auto", "cpu") == DEFAULT_ATTENTION["cpu"]
    assert resolve_attention_impl("einsum", "cpu") == "einsum"
    with pytest.raises(ValueError) as error:
        GPTJConfig(attention_impl="flash")
    assert "attention_impl 'flash' is not one of" in str(error.value) and "\n" not in str(error.value)
