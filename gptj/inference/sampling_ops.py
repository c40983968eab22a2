"""The pure pieces of sampling: shape buckets, the tokenizer-vocabulary mask, and drawing tokens from logits.

`sample_tokens` applies per-row temperature, top-k and top-p (nucleus)
filtering, in HF's order, and is greedy where the temperature is 0; the
statistics tests check it against an independently computed distribution.
`pick_tokens` is the one step every generation path runs on a row's logits:
mask the ids the tokenizer cannot decode, draw, and report log-probabilities.
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


def mask_vocab(logits: jax.Array, limit: int) -> jax.Array:
    """Logits with every id >= `limit` set to -inf: never drawn, no probability mass, never in a top list.

    Models pad their vocabulary past the tokenizer's for TPU-friendly shapes
    (GPT-J-6B: 50400 ids for GPT-2's 50257); the padded ids were never trained
    to mean anything and cannot be decoded to text.
    """
    if limit >= logits.shape[-1]:
        return logits
    return jnp.where(jnp.arange(logits.shape[-1]) < limit, logits, -jnp.inf)


def top_logprobs(log_probs: jax.Array, num_top: int) -> tuple[jax.Array, jax.Array]:
    """(ids, log-probs) of the `num_top` likeliest tokens per position; empty arrays when 0."""
    if not num_top:
        empty = log_probs.shape[:-1] + (0,)
        return jnp.zeros(empty, jnp.int32), jnp.zeros(empty, jnp.float32)
    lps, ids = jax.lax.top_k(log_probs, num_top)
    return ids.astype(jnp.int32), lps


def _order_keys(x: jax.Array) -> jax.Array:
    """uint32 keys ordered as the float32 values are (negative floats reversed, the sign bit on top)."""
    bits = jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.uint32)
    return jnp.where(bits >> 31 == 1, ~bits, bits | jnp.uint32(0x80000000))


def _upper_threshold(keys: jax.Array, weights: jax.Array, target: jax.Array) -> jax.Array:
    """Per row, the largest key t whose upper set {keys >= t} weighs at least `target` [B].

    A bisection over the 32 bits of the keys: 32 passes over [B, V] of
    compare-and-sum, where a sort of a 50k vocabulary costs XLA:CPU tens of
    milliseconds per step. Needs the whole row to weigh at least `target`.
    """
    def narrow(_, bounds):
        lo, hi = bounds  # the answer lies in [lo, hi]
        span = hi - lo
        mid = lo + (span >> 1) + (span & 1)
        heavy = jnp.sum(jnp.where(keys >= mid[:, None], weights, 0), axis=-1) >= target
        return jnp.where(heavy, mid, lo), jnp.where(heavy, hi, mid - 1)

    rows = keys.shape[0]
    start = (jnp.zeros((rows,), jnp.uint32), jnp.full((rows,), 0xFFFFFFFF, jnp.uint32))
    return jax.lax.fori_loop(0, 32, narrow, start)[0]


def filter_logits(logits: jax.Array, temperature: jax.Array, top_k: jax.Array, top_p: jax.Array) -> jax.Array:
    """Temperature-scaled logits with everything outside top-k and the top-p nucleus set to -inf.

    logits [B, V]; temperature, top_k, top_p [B] (top_k 0 and top_p 1 disable
    their filter; temperature must be > 0 here). Order as in HF: temperature,
    then top-k, then top-p over what top-k kept. The nucleus is the smallest
    set of most likely tokens whose mass reaches top_p (the most likely token
    is always in it); tokens tied with the least likely member of either set
    are kept too. Both cut-offs are found by bisection, without sorting.
    """
    vocab = logits.shape[-1]
    scaled = logits / temperature[:, None]
    keys = _order_keys(scaled)
    k = jnp.where(top_k > 0, jnp.minimum(top_k, vocab), vocab)
    in_top_k = keys >= _upper_threshold(keys, jnp.ones((), jnp.int32), k)[:, None]
    probs = jax.nn.softmax(jnp.where(in_top_k, scaled, -jnp.inf), axis=-1)
    prob_keys = _order_keys(probs)
    nucleus = prob_keys >= _upper_threshold(prob_keys, probs, top_p)[:, None]
    keep = in_top_k & (nucleus | (top_p >= 1.0)[:, None])
    return jnp.where(keep, scaled, -jnp.inf)


# Columns per block of the two-level inverse-CDF draw: a cumulative sum over a whole 50k vocabulary is
# slow on a CPU (XLA's cumsum is a windowed reduction), over ~200 block sums and one 256-wide block it is not.
_DRAW_BLOCK = 256


def draw_from(probs: jax.Array, keys: jax.Array) -> jax.Array:
    """One index per row [B] from probabilities probs [B, V] (rows need not sum to 1), one uniform per row.

    Inverse CDF in two levels: the block whose cumulative mass first exceeds
    u x total, then the entry inside it. A zero-probability entry is never
    returned, whatever the rounding (the draw is clipped to the last entry,
    or block, with mass).
    """
    batch, vocab = probs.shape
    width = min(_DRAW_BLOCK, vocab)
    blocks = jnp.pad(probs, ((0, 0), (0, -vocab % width))).reshape(batch, -1, width)
    block_cdf = jnp.cumsum(blocks.sum(-1), axis=-1)  # [B, R]
    target = jax.vmap(jax.random.uniform)(keys) * block_cdf[:, -1]
    block = jnp.minimum(jnp.sum(block_cdf <= target[:, None], axis=-1), jnp.argmax(block_cdf, axis=-1))
    before = jnp.take_along_axis(block_cdf, jnp.maximum(block - 1, 0)[:, None], axis=-1)[:, 0]
    before = jnp.where(block > 0, before, 0.0)
    inner_cdf = jnp.cumsum(jnp.take_along_axis(blocks, block[:, None, None], axis=1)[:, 0], axis=-1)  # [B, width]
    rest = jnp.maximum(target - before, 0.0)
    inner = jnp.minimum(jnp.sum(inner_cdf <= rest[:, None], axis=-1), jnp.argmax(inner_cdf, axis=-1))
    return (block * width + inner).astype(jnp.int32)


def sample_tokens(logits: jax.Array, keys: jax.Array, temperature: jax.Array, top_k: jax.Array,
                  top_p: jax.Array) -> jax.Array:
    """One token per row: argmax where temperature is 0, else a draw from the filtered distribution.

    keys: one raw PRNG key per row [B, 2] (each row's draw uses one uniform
    from it). The sort behind top-k / top-p is skipped when no row asks for
    either, and all sampling when every row is greedy.
    """
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)

    def draw():
        safe_t = jnp.where(temperature > 0, temperature, 1.0)
        needs_filter = jnp.any((top_k > 0) | (top_p < 1.0))
        filtered = jax.lax.cond(needs_filter, lambda: filter_logits(logits, safe_t, top_k, top_p),
                                lambda: logits / safe_t[:, None])
        return jnp.where(temperature > 0, draw_from(jax.nn.softmax(filtered, axis=-1), keys), greedy)

    return jax.lax.cond(jnp.any(temperature > 0), draw, lambda: greedy)


def row_keys(seeds: jax.Array, steps: jax.Array) -> jax.Array:
    """Per-row PRNG keys [B, 2]: row i's token number `steps[i]` draws from fold_in(PRNGKey(seeds[i]), steps[i]).

    A row's randomness depends only on its own seed and position in its
    output, so a request samples the same tokens whatever shares its batch.
    """
    return jax.vmap(lambda seed, step: jax.random.fold_in(jax.random.PRNGKey(seed), step))(seeds, steps)


def ban_tokens(logits: jax.Array, banned: jax.Array) -> jax.Array:
    """Logits with each row's `banned` id [B] set to -inf (a negative id bans nothing)."""
    return jnp.where(jnp.arange(logits.shape[-1])[None, :] == banned[:, None], -jnp.inf, logits)


def pick_tokens(logits: jax.Array, keys: jax.Array, temperature: jax.Array, top_k: jax.Array, top_p: jax.Array,
                vocab_limit: int, num_top: int, banned: jax.Array | None = None):
    """The next token of each row and its log-probabilities, over the first `vocab_limit` ids only.

    logits [B, V] (fp32). `banned` [B]: an id each row may not draw this step (-1: none), e.g. the
    end-of-text token before a request's `min_tokens`. Returns (token [B], its log-prob [B], top ids
    [B, num_top], top log-probs [B, num_top]); log-probabilities are of the unfiltered temperature-1
    distribution over the tokenizer's vocabulary (a banned id keeps its probability there, as vLLM
    reports the model's own distribution).
    """
    logits = mask_vocab(logits, vocab_limit)
    drawable = logits if banned is None else ban_tokens(logits, banned)
    token = sample_tokens(drawable, keys, temperature, top_k, top_p)
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    token_lp = jnp.take_along_axis(log_probs, token[:, None], axis=-1)[:, 0]
    return (token, token_lp) + top_logprobs(log_probs, num_top)
