"""GPT-J's attention kernels: causal self-attention over a whole sequence, and over a KV cache.

Every kernel takes queries, keys and values [B, T, H, D] (RoPE already
applied) and returns [B, T, H, D]; scores and the softmax are fp32 whatever
the compute dtype. `causal_attention` picks one by name (`GPTJConfig.attention_impl`):

- `einsum`: the explicit reference: all T x T scores, causal and padding
  masks, one softmax. Simple and exact; memory grows with T^2 (the backward
  keeps the probabilities of every layer).
- `dot_product`: `jax.nn.dot_product_attention` with the implementation JAX
  picks (XLA's composite). Unpadded calls only.
- `cudnn`: the same with cuDNN's fused flash attention (NVIDIA GPUs, bf16 or
  fp16 compute). Unpadded calls only.
- `blockwise`: flash-style attention in JAX (`blockwise_attention`): queries
  and keys in blocks, an online softmax over key blocks, blocks above the
  diagonal skipped, and a custom backward that recomputes each block's
  probabilities from the saved log-normaliser instead of storing them. Memory
  grows with T, work with T^2 / 2; padding masks supported.
- `auto`: the measured fastest exact kernel for the devices the program is
  built for (`DEFAULT_ATTENTION`; a Trainer resolves it for its mesh's
  platform, so a plan for a GPU or TPU target compiled on a CPU host gets
  the target's kernel).

A call with a padding mask uses `blockwise` if chosen (or picked by `auto`),
else `einsum`. Decoding with a KV cache always uses `cached_attention` (one
einsum over the cache: T new queries are too few for blocks to pay).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

# A large negative score for masked slots: finite, so that a fully masked row
# gives a uniform softmax instead of NaN.
NEG_INF = -1e30

ATTENTION_IMPLS = ("auto", "einsum", "dot_product", "cudnn", "blockwise")

# What `auto` resolves to on each backend (jax.default_backend()); see the
# README's attention table for the measurements behind each choice.
DEFAULT_ATTENTION = {"cpu": "blockwise", "gpu": "einsum", "tpu": "einsum"}

# Query/key block of the blockwise kernel: big enough that each block's
# matmuls run near the matmul peak, small enough that a block's scores
# [B, H, block, block] stay in cache.
BLOCK_SIZE = 128


def resolve_attention_impl(impl: str, backend: str | None = None) -> str:
    """The kernel `impl` names on `backend` (default: JAX's default backend); `auto` becomes that backend's default."""
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"attention_impl {impl!r} is not one of {ATTENTION_IMPLS}")
    if impl != "auto":
        return impl
    return DEFAULT_ATTENTION.get(backend or jax.default_backend(), "einsum")


def causal_attention(q, k, v, token_mask=None, *, impl: str, scale: float, dtype) -> jax.Array:
    """Causal self-attention of q, k, v [B, T, H, D] with the kernel `impl` names; returns [B, T, H, D] in `dtype`.

    `token_mask` [B, T] (False for padding) masks padded keys; None means no
    padding. Query rows that see no real key (padding before any real token)
    get an arbitrary finite value: they are padding, and no real position reads them.
    """
    impl = resolve_attention_impl(impl)
    if impl == "blockwise":
        return blockwise_attention(q, k, v, token_mask, scale=scale).astype(dtype)
    if token_mask is None and impl in ("dot_product", "cudnn"):
        implementation = "cudnn" if impl == "cudnn" else None
        return jax.nn.dot_product_attention(q, k, v, scale=scale, is_causal=True, implementation=implementation)
    return einsum_attention(q, k, v, token_mask, scale=scale, dtype=dtype)


def einsum_attention(q, k, v, token_mask=None, *, scale: float, dtype) -> jax.Array:
    """The reference kernel: every score of [B, H, T, T] in fp32, causal and padding masks, one softmax."""
    length = q.shape[1]
    allowed = jnp.tril(jnp.ones((length, length), dtype=bool))[None]
    if token_mask is not None:
        allowed = allowed & token_mask[:, None, :]
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * scale
    scores = jnp.where(allowed[:, None], scores, NEG_INF)
    probs = jax.nn.softmax(scores, axis=-1).astype(dtype)
    return jnp.einsum("bhqk,bkhd->bqhd", probs, v)


def blockwise_attention(q, k, v, token_mask=None, *, scale: float, block_size: int = BLOCK_SIZE) -> jax.Array:
    """Flash-style causal attention: exact, with memory linear in T; q, k, v [B, T, H, D] -> [B, T, H, D].

    The sequence is padded up to a multiple of `block_size` (padded keys are
    masked, padded queries dropped). For query block i, key blocks 0..i are
    visited with an online softmax (running max, normaliser and weighted sum,
    rescaled as the max grows); key blocks after i are never computed. The
    backward (custom VJP) keeps only the output and each row's
    log-normaliser and recomputes the probabilities block by block. Scores,
    the softmax and the accumulation are fp32; the result has q's dtype.
    """
    if block_size <= 0:
        raise ValueError(f"block_size must be positive, got {block_size}")
    batch, length = q.shape[:2]
    block = min(block_size, length)
    padded = -(-length // block) * block
    if token_mask is None and padded != length:
        token_mask = jnp.ones((batch, length), bool)
    if padded != length:
        pad = [(0, 0), (0, padded - length), (0, 0), (0, 0)]
        q, k, v = (jnp.pad(x, pad) for x in (q, k, v))
        token_mask = jnp.pad(token_mask, [(0, 0), (0, padded - length)])  # padded keys: False
    # [B, H, T, D]: the layout the per-block matmuls read without transposing each block.
    q, k, v = (x.transpose(0, 2, 1, 3) for x in (q, k, v))
    out = _blockwise(q, k, v, token_mask, float(scale), block)
    return out.transpose(0, 2, 1, 3)[:, :length]


def _block_scores(qi, kj, mask_j, i: int, j: int, block: int, scale: float):
    """fp32 scores of query block i against key block j [B, H, bq, bk], causal and padding masks applied."""
    s = jnp.einsum("bhqd,bhkd->bhqk", qi, kj, preferred_element_type=jnp.float32) * scale
    allowed = None
    if i == j:  # only the diagonal block straddles the causal boundary
        allowed = jnp.tril(jnp.ones((block, block), bool))[None, None]
    if mask_j is not None:
        key_ok = mask_j[:, None, None, :]
        allowed = key_ok if allowed is None else allowed & key_ok
    return s if allowed is None else jnp.where(allowed, s, NEG_INF)


def _blocks(x, block: int):
    """[B, H, T, ...] (or a mask [B, T]) -> a list of its blocks along T."""
    axis = 1 if x.ndim == 2 else 2
    return [jax.lax.slice_in_dim(x, s, s + block, axis=axis) for s in range(0, x.shape[axis], block)]


def _blockwise_forward(q, k, v, token_mask, scale: float, block: int):
    """(output [B, H, T, D] in q's dtype, log-normaliser [B, H, T] fp32) by online softmax over key blocks."""
    qs, ks, vs = _blocks(q, block), _blocks(k, block), _blocks(v, block)
    masks = [None] * len(ks) if token_mask is None else _blocks(token_mask, block)
    outs, lses = [], []
    for i, qi in enumerate(qs):
        m = l = acc = None
        for j in range(i + 1):
            s = _block_scores(qi, ks[j], masks[j], i, j, block, scale)
            m_new = s.max(-1) if m is None else jnp.maximum(m, s.max(-1))
            p = jnp.exp(s - m_new[..., None])
            pv = jnp.einsum("bhqk,bhkd->bhqd", p.astype(v.dtype), vs[j], preferred_element_type=jnp.float32)
            if m is None:
                l, acc = p.sum(-1), pv
            else:
                correction = jnp.exp(m - m_new)
                l = l * correction + p.sum(-1)
                acc = acc * correction[..., None] + pv
            m = m_new
        outs.append((acc / l[..., None]).astype(q.dtype))
        lses.append(m + jnp.log(l))
    return jnp.concatenate(outs, axis=2), jnp.concatenate(lses, axis=2)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _blockwise(q, k, v, token_mask, scale: float, block: int):
    return _blockwise_forward(q, k, v, token_mask, scale, block)[0]


def _blockwise_fwd(q, k, v, token_mask, scale, block):
    out, lse = _blockwise_forward(q, k, v, token_mask, scale, block)
    return out, (q, k, v, token_mask, out, lse)


def _blockwise_bwd(scale, block, residuals, d_out):
    """FlashAttention-2's backward: per (query block, key block) pair, recompute p = exp(s - lse), then
    dv += p^T dO, ds = p (dO v^T - rowsum(dO * O)), dq += ds k, dk += ds^T q (both scaled)."""
    q, k, v, token_mask, out, lse = residuals
    delta = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)  # [B, H, T]
    qs, ks, vs, dos = _blocks(q, block), _blocks(k, block), _blocks(v, block), _blocks(d_out, block)
    lses, deltas = _blocks(lse, block), _blocks(delta, block)
    masks = [None] * len(ks) if token_mask is None else _blocks(token_mask, block)
    dqs, dks, dvs = [], [None] * len(ks), [None] * len(ks)
    for i, (qi, doi) in enumerate(zip(qs, dos)):
        dq = None
        for j in range(i + 1):
            s = _block_scores(qi, ks[j], masks[j], i, j, block, scale)
            p = jnp.exp(s - lses[i][..., None])
            dv = jnp.einsum("bhqk,bhqd->bhkd", p.astype(doi.dtype), doi, preferred_element_type=jnp.float32)
            dp = jnp.einsum("bhqd,bhkd->bhqk", doi, vs[j], preferred_element_type=jnp.float32)
            ds = (p * (dp - deltas[i][..., None]) * scale).astype(q.dtype)
            dq_ij = jnp.einsum("bhqk,bhkd->bhqd", ds, ks[j], preferred_element_type=jnp.float32)
            dk = jnp.einsum("bhqk,bhqd->bhkd", ds, qi, preferred_element_type=jnp.float32)
            dq = dq_ij if dq is None else dq + dq_ij
            dks[j] = dk if dks[j] is None else dks[j] + dk
            dvs[j] = dv if dvs[j] is None else dvs[j] + dv
        dqs.append(dq)
    grads = [jnp.concatenate(g, axis=2).astype(x.dtype) for g, x in ((dqs, q), (dks, k), (dvs, v))]
    return (*grads, None)


_blockwise.defvjp(_blockwise_fwd, _blockwise_bwd)


def cached_attention(q, k, v, token_mask, cached_key, cached_value, key_mask, index, *, scale, dtype):
    """Attention of T new queries over a read-only cache plus the T new keys, with one softmax over both.

    q, k, v: [B, T, H, D] (the new tokens); token_mask: [B, T]; cached_key,
    cached_value: [B, H, S, D]; key_mask: [B, S]; index: () the first slot the
    new tokens will occupy. Cached slots at or after `index` are stale (or
    empty) and masked; the new tokens see each other causally. Returns [B, T, H, D].
    """
    length, slots = q.shape[1], cached_key.shape[2]
    cached_ok = (jnp.arange(slots)[None, :] < index) & key_mask  # [B, S]
    new_ok = jnp.tril(jnp.ones((length, length), dtype=bool))[None] & token_mask[:, None, :]  # [B, T, T]
    cached_scores = jnp.einsum("bqhd,bhkd->bhqk", q, cached_key.astype(dtype), preferred_element_type=jnp.float32)
    new_scores = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)
    scores = jnp.concatenate([jnp.where(cached_ok[:, None, None, :], cached_scores * scale, NEG_INF),
                              jnp.where(new_ok[:, None], new_scores * scale, NEG_INF)], axis=-1)
    probs = jax.nn.softmax(scores, axis=-1).astype(dtype)
    # fp32 accumulation of the two halves, so a bf16 model rounds once, as a single product would.
    out = jnp.einsum("bhqk,bhkd->bqhd", probs[..., :slots], cached_value.astype(dtype),
                     preferred_element_type=jnp.float32)
    out = out + jnp.einsum("bhqk,bkhd->bqhd", probs[..., slots:], v, preferred_element_type=jnp.float32)
    return out.astype(dtype)
