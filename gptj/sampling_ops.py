"""The pure pieces of sampling: shape buckets, and drawing tokens from logits.

`sample_tokens` applies per-row temperature, top-k and top-p (nucleus)
filtering, in HF's order, and is greedy where the temperature is 0; the
statistics tests check it against an independently computed distribution.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def bucket(n: int, minimum: int = 1, cap: int | None = None) -> int:
    """`n` rounded up to a power of two (at least `minimum`); never above `cap` unless `n` is."""
    size = max(minimum, 1 << max(0, int(n) - 1).bit_length())
    if cap is not None:
        size = min(size, max(cap, n))
    return size


def filter_logits(logits: jax.Array, temperature: jax.Array, top_k: jax.Array, top_p: jax.Array) -> jax.Array:
    """Temperature-scaled logits with everything outside top-k and the top-p nucleus set to -inf.

    logits [B, V]; temperature, top_k, top_p [B] (top_k 0 and top_p 1 disable
    their filter; temperature must be > 0 here). Order as in HF: temperature,
    then top-k, then top-p over what top-k kept. The nucleus is the smallest
    set of most likely tokens whose mass reaches top_p (the most likely token
    is always in it); tokens tied with its least likely member are kept too.
    """
    vocab = logits.shape[-1]
    scaled = logits / temperature[:, None]
    ordered = -jnp.sort(-scaled, axis=-1)
    k = jnp.where(top_k > 0, jnp.minimum(top_k, vocab), vocab)
    in_top_k = jnp.arange(vocab)[None, :] < k[:, None]
    probs = jax.nn.softmax(jnp.where(in_top_k, ordered, -jnp.inf), axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    keep = in_top_k & (mass_before < top_p[:, None])
    keep = keep.at[:, 0].set(True)
    kept = keep.sum(-1)
    threshold = jnp.take_along_axis(ordered, (kept - 1)[:, None], axis=-1)
    return jnp.where(scaled >= threshold, scaled, -jnp.inf)


def sample_tokens(logits: jax.Array, keys: jax.Array, temperature: jax.Array, top_k: jax.Array,
                  top_p: jax.Array) -> jax.Array:
    """One token per row: argmax where temperature is 0, else a draw from the filtered distribution.

    keys: one raw PRNG key per row [B, 2]. The sort behind top-k / top-p is
    skipped when no row asks for either, and all sampling when every row is greedy.
    """
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)

    def draw():
        safe_t = jnp.where(temperature > 0, temperature, 1.0)
        needs_filter = jnp.any((top_k > 0) | (top_p < 1.0))
        filtered = jax.lax.cond(needs_filter, lambda: filter_logits(logits, safe_t, top_k, top_p),
                                lambda: logits / safe_t[:, None])
        drawn = jax.vmap(jax.random.categorical)(keys, filtered).astype(jnp.int32)
        return jnp.where(temperature > 0, drawn, greedy)

    return jax.lax.cond(jnp.any(temperature > 0), draw, lambda: greedy)
