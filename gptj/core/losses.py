"""Token-level losses, returned as sums so that microbatches and hosts combine exactly.

A loss function here maps (logits, batch) to a dict of sums; the trainer adds
them over microbatches and divides by the total `weight` (the number of
target tokens that count) once, so gradient accumulation and data-parallel
splits give the same result as one big batch.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Mapping

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


# -- the output head fused with the loss, chunk by chunk -----------------------------------

# (hidden [b, t, d], kernel [d, v], bias [v], first_id) -> fp32 logits [b, t, v] of vocabulary ids
# first_id .. first_id + v - 1: the model's output head applied to a slice of its vocabulary.
LogitsFn = Callable[[jax.Array, jax.Array, jax.Array, Any], jax.Array]


@dataclasses.dataclass(frozen=True)
class _FusedSpec:
    """The static half of `fused_next_token_loss` (hashable: a custom_vjp non-differentiable argument)."""

    logits_fn: LogitsFn
    positions: int      # sequence positions per token chunk (every row of the batch at once)
    vocab_chunk: int    # vocabulary entries per vocabulary chunk (a divisor of the vocabulary)
    z_loss: float
    accuracy: bool


def fused_next_token_loss(hidden: jax.Array, kernel: jax.Array, bias: jax.Array, batch: Mapping[str, jax.Array],
                          logits_fn: LogitsFn, *, chunk_tokens: int, vocab_chunk: int = 0, z_loss: float = 0.0,
                          accuracy: bool = True) -> dict[str, jax.Array]:
    """`next_token_loss` of `logits_fn(hidden, kernel, bias)` without the [tokens, vocab] logits in memory.

    The same sums as `next_token_loss` (and the same gradients, to fp32
    rounding), computed chunk by chunk: `chunk_tokens` tokens at a time (all
    rows of hidden [B, T, D], chunk_tokens // B positions each), and within
    a token chunk `vocab_chunk` vocabulary entries at a time (0: the whole
    vocabulary; otherwise the largest divisor of the vocabulary not above it).

    Per token chunk, pass 1 runs over vocabulary chunks computing the logits,
    an online logsumexp (running max and sum), the target logit and the
    argmax; pass 2 turns each chunk's logits into d(loss)/d(logits) =
    mask * (softmax * (1 + 2 z_loss lse) - one_hot(target)) and pulls it back
    through the head (`jax.vjp` of `logits_fn`) into the gradients of hidden,
    kernel and bias. The gradient is thus computed in the forward pass, when
    the logits are at hand (the loss is a sum, so its gradient only needs
    scaling by the incoming cotangent afterwards): three matmuls, as without
    fusing, and no recomputation. Only one chunk's logits ever exist. Small
    vocabulary chunks keep the element-wise work in cache on a CPU; where the
    vocabulary axis is sharded over devices, pass vocab_chunk=0 (slicing a
    sharded axis would serialise the devices).

    Gradients flow into hidden, kernel and bias through `loss_sum` only: the
    other sums (nll_sum, z_loss_sum, weight, correct) are metrics, returned
    under stop_gradient.

    hidden: [B, T, D]; kernel: [D, V] (or, for the loss without its
    gradient, a pytree of leaves ending in V: a quantized head); bias: [V];
    batch: `targets` int32 [B, T], optionally `loss_mask` [B, T]. logits_fn(h, kernel_slice,
    bias_slice, first_id) -> fp32 logits [b, t, v] for vocabulary ids
    first_id.. (it masks padded ids itself).
    """
    if chunk_tokens <= 0:
        raise ValueError(f"chunk_tokens must be positive, got {chunk_tokens}")
    if vocab_chunk < 0:
        raise ValueError(f"vocab_chunk must be >= 0 (0: the whole vocabulary), got {vocab_chunk}")
    rows, length = batch["targets"].shape
    mask = batch.get("loss_mask")
    mask = jnp.ones((rows, length), jnp.float32) if mask is None else mask.astype(jnp.float32)
    spec = _FusedSpec(logits_fn, _positions_per_chunk(rows, length, chunk_tokens),
                      _divisor_at_most(bias.shape[-1], vocab_chunk), float(z_loss), bool(accuracy))
    loss_sum, metrics = _fused_loss(hidden, kernel, bias, batch["targets"], mask, spec)
    return {"loss_sum": loss_sum, **jax.lax.stop_gradient(metrics)}


def _divisor_at_most(size: int, limit: int) -> int:
    """The largest divisor of `size` that is <= limit (the whole `size` when limit is 0 or >= size)."""
    if limit <= 0 or limit >= size:
        return size
    return next(d for d in range(limit, 0, -1) if size % d == 0)


def _split_positions(x: jax.Array, positions: int) -> jax.Array:
    """[B, T, ...] -> [chunks, B, positions, ...], zero-padding T up to a multiple of `positions`."""
    rows, length = x.shape[:2]
    chunks = -(-length // positions)
    if chunks * positions != length:
        x = jnp.pad(x, [(0, 0), (0, chunks * positions - length)] + [(0, 0)] * (x.ndim - 2))
    return jnp.moveaxis(x.reshape((rows, chunks, positions) + x.shape[2:]), 1, 0)


def _merge_positions(x: jax.Array, length: int) -> jax.Array:
    """The inverse of `_split_positions`: [chunks, B, positions, ...] -> [B, T, ...]."""
    x = jnp.moveaxis(x, 0, 1)
    return x.reshape((x.shape[0], x.shape[1] * x.shape[2]) + x.shape[3:])[:, :length]


def map_position_chunks(fn: Callable, chunk_tokens: int, *arrays: jax.Array):
    """fn applied to [B, t, ...] slices of arrays [B, T, ...] one after another (lax.map), outputs joined to [B, T, ...].

    Each slice takes every row and t = chunk_tokens // B positions (at least
    one), so at most one slice's intermediates (e.g. its logits) exist at a
    time. T is padded with zeros up to a multiple of t; the padding's outputs
    are dropped.
    """
    if chunk_tokens <= 0:
        raise ValueError(f"chunk_tokens must be positive, got {chunk_tokens}")
    rows, length = arrays[0].shape[:2]
    positions = _positions_per_chunk(rows, length, chunk_tokens)
    out = jax.lax.map(lambda xs: fn(*xs), tuple(_split_positions(x, positions) for x in arrays))
    return jax.tree_util.tree_map(lambda y: _merge_positions(y, length), out)


def _positions_per_chunk(rows: int, length: int, chunk_tokens: int) -> int:
    """Positions per chunk of about chunk_tokens tokens over `rows` rows, balanced so padding stays under a chunk."""
    positions = max(1, chunk_tokens // rows)
    chunks = -(-length // positions)
    return -(-length // chunks)


def _vocab_slice(kernel, bias, index, width: int):
    """Vocabulary chunk `index` (traced) of the head: kernel [D, width], bias [width].

    The kernel may be a pytree whose every leaf ends in the vocabulary axis
    (a quantized head's values and scales): each leaf is sliced alike.
    """
    start = index * width
    return (jax.tree_util.tree_map(lambda w: jax.lax.dynamic_slice_in_dim(w, start, width, axis=w.ndim - 1), kernel),
            jax.lax.dynamic_slice_in_dim(bias, start, width, axis=0))


def _chunk_stats(h, kernel, bias, targets, spec: _FusedSpec, keep_logits: bool):
    """Pass 1 over one token chunk: (lse, target logit, argmax) [b, t] and, if asked, the logits chunks."""
    vocab = bias.shape[-1]
    width = spec.vocab_chunk
    if width == vocab:
        logits = spec.logits_fn(h, kernel, bias, 0)
        ids = jax.lax.broadcasted_iota(jnp.int32, logits.shape, logits.ndim - 1)
        target_logit = jnp.sum(jnp.where(ids == targets[..., None], logits, 0.0), axis=-1)
        argmax = jnp.argmax(logits, axis=-1) if spec.accuracy else None
        return jax.nn.logsumexp(logits, axis=-1), target_logit, argmax, (logits if keep_logits else None)

    def body(carry, index):
        run_max, run_sum, target_logit, best_id = carry
        w, b = _vocab_slice(kernel, bias, index, width)
        logits = spec.logits_fn(h, w, b, index * width)
        ids = index * width + jax.lax.broadcasted_iota(jnp.int32, logits.shape, logits.ndim - 1)
        target_logit = target_logit + jnp.sum(jnp.where(ids == targets[..., None], logits, 0.0), axis=-1)
        chunk_max = jnp.max(logits, axis=-1)
        new_max = jnp.maximum(run_max, chunk_max)
        run_sum = run_sum * jnp.exp(run_max - new_max) + jnp.sum(jnp.exp(logits - new_max[..., None]), axis=-1)
        if spec.accuracy:  # strictly greater: an earlier chunk keeps a tie, as jnp.argmax keeps the first
            best_id = jnp.where(chunk_max > run_max, index * width + jnp.argmax(logits, axis=-1), best_id)
        return (new_max, run_sum, target_logit, best_id), (logits if keep_logits else None)

    shape = targets.shape
    init = (jnp.full(shape, -jnp.inf, jnp.float32), jnp.zeros(shape, jnp.float32), jnp.zeros(shape, jnp.float32),
            jnp.zeros(shape, jnp.int32))
    (run_max, run_sum, target_logit, best_id), stored = jax.lax.scan(body, init, jnp.arange(vocab // width))
    return run_max + jnp.log(run_sum), target_logit, (best_id if spec.accuracy else None), stored


def _chunk_sums(lse, target_logit, argmax, targets, mask, spec: _FusedSpec):
    """One token chunk's (loss_sum, metrics), as `next_token_loss` defines them."""
    nll = lse - target_logit
    z_term = spec.z_loss * jnp.square(lse)
    metrics = {"nll_sum": jnp.sum(nll * mask), "z_loss_sum": jnp.sum(z_term * mask), "weight": jnp.sum(mask)}
    if spec.accuracy:
        metrics["correct"] = jnp.sum((argmax == targets).astype(jnp.float32) * mask)
    return jnp.sum((nll + z_term) * mask), metrics


def _chunk_grads(h, kernel, bias, targets, mask, lse, stored, d_kernel, d_bias, spec: _FusedSpec):
    """Pass 2 over one token chunk: d(loss_sum) for h, and for the head added into d_kernel, d_bias (None: zero).

    d(loss)/d(logits) = mask * (softmax * (1 + 2 z_loss lse) - one_hot(target)),
    pulled back through `logits_fn` by `jax.vjp`. The logits are the stored
    ones: the product vjp would recompute is unused and compiled away.
    """
    vocab, width = bias.shape[-1], spec.vocab_chunk
    scale = (mask * (1.0 + 2.0 * spec.z_loss * lse))[..., None]

    def pull_back(logits, w, b, first_id):
        ids = first_id + jax.lax.broadcasted_iota(jnp.int32, logits.shape, logits.ndim - 1)
        d_logits = jnp.exp(logits - lse[..., None]) * scale - jnp.where(ids == targets[..., None], mask[..., None], 0.0)
        _, pull = jax.vjp(lambda hh, ww, bb: spec.logits_fn(hh, ww, bb, first_id), h, w, b)
        return pull(d_logits)

    if width == vocab:
        dh, dw, db = pull_back(stored, kernel, bias, 0)
        return dh, (dw if d_kernel is None else d_kernel + dw), (db if d_bias is None else d_bias + db)

    def body(carry, chunk):
        dh, d_kernel, d_bias = carry
        index, logits = chunk
        start = index * width
        dh_c, dw, db = pull_back(logits, *_vocab_slice(kernel, bias, index, width), start)
        # Added in place into this vocabulary chunk's columns of the running head gradient.
        d_kernel = jax.lax.dynamic_update_slice_in_dim(
            d_kernel, jax.lax.dynamic_slice_in_dim(d_kernel, start, width, axis=1) + dw, start, axis=1)
        d_bias = jax.lax.dynamic_update_slice_in_dim(
            d_bias, jax.lax.dynamic_slice_in_dim(d_bias, start, width, axis=0) + db, start, axis=0)
        return (dh + dh_c.astype(jnp.float32), d_kernel, d_bias), None

    # d h accumulates over vocabulary chunks in fp32, whatever the compute dtype.
    if d_kernel is None:
        d_kernel, d_bias = jnp.zeros_like(kernel), jnp.zeros_like(bias)
    init = (jnp.zeros(h.shape, jnp.float32), d_kernel, d_bias)
    (dh, d_kernel, d_bias), _ = jax.lax.scan(body, init, (jnp.arange(vocab // width), stored))
    return dh.astype(h.dtype), d_kernel, d_bias


def _zero_sums(spec: _FusedSpec):
    zero = jnp.zeros((), jnp.float32)
    names = ("nll_sum", "z_loss_sum", "weight") + (("correct",) if spec.accuracy else ())
    return zero, {name: zero for name in names}


def _add(a, b):
    return jax.tree_util.tree_map(jnp.add, a, b)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _fused_loss(hidden, kernel, bias, targets, mask, spec: _FusedSpec):
    """(loss_sum, metrics) when nothing is differentiated (evaluation): pass 1 only, over the token chunks."""
    def body(totals, chunk):
        h, t, m = chunk
        lse, target_logit, argmax, _ = _chunk_stats(h, kernel, bias, t, spec, keep_logits=False)
        return _add(totals, _chunk_sums(lse, target_logit, argmax, t, m, spec)), None

    xs = tuple(_split_positions(x, spec.positions) for x in (hidden, targets, mask))
    return jax.lax.scan(body, _zero_sums(spec), xs)[0]


def _fused_loss_fwd(hidden, kernel, bias, targets, mask, spec: _FusedSpec):
    """Both passes per token chunk; the residuals are the gradients of loss_sum for hidden, kernel and bias.

    The first token chunk runs before the loop over the others and starts the
    head's gradient, rather than a zero-filled one it would be added into
    (one kernel-sized buffer less at the memory peak, and one pass less).
    """
    def chunk(h, t, m, d_kernel, d_bias):
        lse, target_logit, argmax, stored = _chunk_stats(h, kernel, bias, t, spec, keep_logits=True)
        sums = _chunk_sums(lse, target_logit, argmax, t, m, spec)
        return sums, _chunk_grads(h, kernel, bias, t, m, lse, stored, d_kernel, d_bias, spec)

    def body(carry, xs):
        totals, d_kernel, d_bias = carry
        sums, (dh, d_kernel, d_bias) = chunk(*xs, d_kernel, d_bias)
        return (_add(totals, sums), d_kernel, d_bias), dh

    xs = tuple(_split_positions(x, spec.positions) for x in (hidden, targets, mask))
    totals, (dh, d_kernel, d_bias) = chunk(*(x[0] for x in xs), None, None)
    if xs[0].shape[0] > 1:
        (totals, d_kernel, d_bias), d_rest = jax.lax.scan(body, (totals, d_kernel, d_bias),
                                                          tuple(x[1:] for x in xs))
        d_hidden = jnp.concatenate([dh[None], d_rest], axis=0)
    else:
        d_hidden = dh[None]
    return totals, (_merge_positions(d_hidden, hidden.shape[1]), d_kernel, d_bias)


def _fused_loss_bwd(spec: _FusedSpec, grads, cotangents):
    """Scales the forward's gradients of loss_sum by its cotangent (the metrics' are zero: stop_gradient)."""
    d_loss = cotangents[0]
    d_hidden, d_kernel, d_bias = grads
    return (d_hidden * d_loss.astype(d_hidden.dtype), d_kernel * d_loss, d_bias * d_loss, None, None)


_fused_loss.defvjp(_fused_loss_fwd, _fused_loss_bwd)
