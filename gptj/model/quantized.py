"""Weight-only quantization of GPT-J's matrices: the arithmetic, the parameter layout and the quantized matmul.

A quantized matrix takes the place of its array in the parameter tree as a
pair with the array's own path and shape:

    {"values": int8 or int4 [the matrix's shape], "scale": [see below], in the scale dtype (bf16 on disk)}

Symmetric, round to nearest: `values = round(w / scale)`, |values| <= qmax
(127 for int8, 7 for int4), and w is read back as values * scale. Each scale
spans either

- one output channel (`group_size` 0): every input of that output, so the
  scale has the matrix's output dims only: q_proj [embed, heads, head_dim] ->
  scale [heads, head_dim]; or
- a group of `group_size` consecutive inputs along the matrix's last input
  dim, per output: the scale has the matrix's dims with that one divided by
  the group size: q_proj -> [embed / G, heads, head_dim].

The embedding `wte` [vocab, embed] is read by rows, so its scales span a row
(per row: [vocab]) or groups along it ([vocab, embed / G]). Stacked block
matrices keep their leading layer axis in both arrays. A scale carries the
logical axis names of the dims it keeps (a grouped dim keeps its name), so
every rule set shards a quantized model like the full-precision one, each
scale beside the values it scales.

The values are rounded against the scale as stored (bf16), so every element
is reconstructed within scale / 2 of its original.

int4 values are JAX's `int4` dtype: XLA keeps them packed two to a byte in
device memory and Orbax on disk, so nothing unpacks nibbles by hand.

`einsum` multiplies by a quantized matrix inside the computation: per
channel, the integer matrix is converted to the compute dtype inside the
matmul and the product's output channels are scaled (one multiply per output,
fused by XLA into the matmul's epilogue); in groups, each group of the matrix
is scaled as it is converted (the multiply fuses into the matmul's operand on
accelerators). Neither keeps a full-precision copy of the weights.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

BITS = (8, 4)
# One scale per output channel for int8 (its error is already small); groups of 128 inputs for int4
# (`default_group_size`: fewer where a small model's dimensions need it).
DEFAULT_GROUP_SIZE = {8: 0, 4: 128}
VALUES, SCALE = "values", "scale"


@dataclasses.dataclass(frozen=True)
class Matrix:
    """A quantizable matrix of GPT-J: where it is in the parameter tree and which of its dims a scale spans.

    `spans` is [start, stop) over the dims of one layer's matrix: the inputs
    of a projection (its leading dims), or the embedding's row. Groups run
    along the last of them, whose size `group_dim(config)` gives.
    """

    path: tuple[str, ...]
    spans: tuple[int, int]
    stacked: bool
    group_dim: Callable[[Any], int]


MATRICES: dict[str, Matrix] = {
    "wte": Matrix(("wte",), (1, 2), False, lambda c: c.d_model),
    "q_proj": Matrix(("blocks", "attn", "q_proj"), (0, 1), True, lambda c: c.d_model),
    "k_proj": Matrix(("blocks", "attn", "k_proj"), (0, 1), True, lambda c: c.d_model),
    "v_proj": Matrix(("blocks", "attn", "v_proj"), (0, 1), True, lambda c: c.d_model),
    "out_proj": Matrix(("blocks", "attn", "out_proj"), (0, 2), True, lambda c: c.head_dim),
    "fc_in": Matrix(("blocks", "mlp", "fc_in_kernel"), (0, 1), True, lambda c: c.d_model),
    "fc_out": Matrix(("blocks", "mlp", "fc_out_kernel"), (0, 1), True, lambda c: c.mlp_dim),
    "lm_head": Matrix(("lm_head_kernel",), (0, 1), False, lambda c: c.d_model),
}
TARGETS = tuple(MATRICES)


def int_dtype(bits: int):
    """The storage dtype of `bits`-bit values: int8 or int4."""
    return {8: jnp.int8, 4: jnp.int4}[bits]


def qmax(bits: int) -> int:
    """The largest magnitude a symmetric `bits`-bit value takes (127, 7)."""
    return 2 ** (bits - 1) - 1


def config_problems(config) -> list[str]:
    """What is wrong with a GPTJConfig's quantization fields (quant_bits, quant_group_size, quant_targets)."""
    bits, group, targets = config.quant_bits, config.quant_group_size, config.quant_targets
    if bits == 0:
        if group or targets:
            return [f"quant_group_size={group} and quant_targets={list(targets)} need quant_bits 8 or 4"]
        return []
    problems = []
    if bits not in BITS:
        problems.append(f"quant_bits must be 0 (not quantized), 8 or 4, got {bits}")
    unknown = [t for t in targets if t not in MATRICES]
    if unknown:
        problems.append(f"unknown quant_targets {unknown}; choose from {list(TARGETS)}")
    elif not targets or len(set(targets)) != len(targets):
        problems.append(f"quant_targets must name each matrix once and at least one, got {list(targets)}")
    if group < 0:
        problems.append(f"quant_group_size must be >= 0 (0: one scale per output channel), got {group}")
    elif group and not unknown:
        bad = [f"{t} ({MATRICES[t].group_dim(config)})" for t in targets if MATRICES[t].group_dim(config) % group]
        if bad:
            problems.append(f"quant_group_size {group} does not divide the input dimension of {', '.join(bad)}")
    return problems


def default_group_size(config, bits: int) -> int:
    """DEFAULT_GROUP_SIZE[bits], or its largest divisor that divides every input dimension of `config`'s matrices.

    GPT-J-6B takes 128 as it is; the tiny config (head_dim 32) takes 32.
    """
    group = DEFAULT_GROUP_SIZE[bits]
    return math.gcd(group, *(m.group_dim(config) for m in MATRICES.values())) if group else 0


def describe(config) -> str:
    """'int8 per channel' / 'int4 in groups of 128' for a quantized config ('' if not quantized)."""
    if not config.quant_bits:
        return ""
    how = f"in groups of {config.quant_group_size}" if config.quant_group_size else "per channel"
    return f"int{config.quant_bits} {how}"


# -- layout --------------------------------------------------------------------------------------

def scale_shape(shape: tuple[int, ...], spans: tuple[int, int], group_size: int) -> tuple[int, ...]:
    """The scale's shape for a matrix of `shape` whose dims [spans) one scale spans (absolute dims)."""
    lo, hi = spans
    if group_size:
        return tuple(shape[:hi - 1]) + (shape[hi - 1] // group_size,) + tuple(shape[hi:])
    return tuple(shape[:lo]) + tuple(shape[hi:])


def scale_axes(axes: tuple[str, ...], spans: tuple[int, int], group_size: int) -> tuple[str, ...]:
    """The scale's logical axis names: those of the dims it keeps (a grouped dim keeps its name)."""
    lo, hi = spans
    return tuple(axes) if group_size else tuple(axes[:lo]) + tuple(axes[hi:])


def param_init(shape: tuple[int, ...], axes: tuple[str, ...], spans: tuple[int, int], bits: int, group_size: int,
               scale_dtype) -> Callable[[jax.Array], dict]:
    """A Flax parameter initialiser for a quantized matrix: {"values": zeros, "scale": ones}, logically named.

    Quantized models are only ever read from a quantized params directory;
    the initial values matter for their shapes, dtypes and axes alone.
    """
    def init(_):
        return {VALUES: nn.LogicallyPartitioned(jnp.zeros(shape, int_dtype(bits)), tuple(axes)),
                SCALE: nn.LogicallyPartitioned(jnp.ones(scale_shape(shape, spans, group_size), scale_dtype),
                                               scale_axes(axes, spans, group_size))}

    return init


def is_quantized(w: Any) -> bool:
    """Whether a parameter is a quantized matrix ({"values", "scale"}) rather than an array."""
    return isinstance(w, Mapping) and set(w) == {VALUES, SCALE}


def group_size_of(values_shape: tuple[int, ...], scale_shape_: tuple[int, ...], spans: tuple[int, int]) -> int:
    """The group size a (values, scale) pair was stored with: 0 for per channel (the scale lacks the spanned dims)."""
    if len(scale_shape_) == len(values_shape):
        return values_shape[spans[1] - 1] // scale_shape_[spans[1] - 1]
    return 0


# -- the arithmetic --------------------------------------------------------------------------------

def quantize_matrix(w: np.ndarray, bits: int, group_size: int, spans: tuple[int, int],
                    scale_dtype=ml_dtypes.bfloat16) -> tuple[np.ndarray, np.ndarray]:
    """(values, scale) of the host array `w`, whose dims [spans) one scale spans (in groups along the last).

    Computed in fp32; values as numpy int8 / int4, scales in `scale_dtype`.
    The values are rounded against the stored (bf16) scale, so every element
    is read back within scale / 2: bf16 moves a scale by at most 2**-8 of
    itself, so |w / scale| <= qmax / (1 - 2**-8) < qmax + 1/2 (127.498 for
    int8), which still rounds to at most qmax. An all-zero channel or group
    gets scale 1 and values 0.
    """
    lo, hi = spans
    w = np.asarray(w, np.float32)
    if group_size:
        grouped = w.reshape(w.shape[:hi - 1] + (w.shape[hi - 1] // group_size, group_size) + w.shape[hi:])
        reduce = (hi,)
    else:
        grouped, reduce = w, tuple(range(lo, hi))
    scale = scale_from_amax(np.max(np.abs(grouped), axis=reduce, keepdims=True), bits, scale_dtype)
    values = round_to_scale(grouped, scale, bits).reshape(w.shape)
    return values, np.squeeze(scale, axis=reduce)


def scale_from_amax(amax: np.ndarray, bits: int, scale_dtype=ml_dtypes.bfloat16) -> np.ndarray:
    """The scales of channels or groups whose largest magnitude is `amax` (1 for an all-zero one)."""
    return np.where(amax > 0, amax / qmax(bits), 1.0).astype(scale_dtype)


def round_to_scale(w: np.ndarray, scale: np.ndarray, bits: int) -> np.ndarray:
    """The `bits`-bit values of fp32 `w` against `scale` (as stored; broadcast to `w`), as numpy int8 / int4."""
    values = np.clip(np.rint(w / scale.astype(np.float32)), -qmax(bits), qmax(bits))  # clip: a guard only
    return values.astype(np.dtype(int_dtype(bits)))


def dequantize(w: Mapping[str, Any], spans: tuple[int, int], dtype) -> jax.Array:
    """values * scale as a `dtype` array of the matrix's shape (jnp; `spans` as in `quantize_matrix`)."""
    values, scale = w[VALUES], w[SCALE]
    lo, hi = spans
    group_size = group_size_of(values.shape, scale.shape, spans)
    if not group_size:
        return values.astype(dtype) * jnp.expand_dims(scale.astype(dtype), tuple(range(lo, hi)))
    grouped = values.reshape(values.shape[:hi - 1] + (scale.shape[hi - 1], group_size) + values.shape[hi:])
    return (grouped.astype(dtype) * jnp.expand_dims(scale.astype(dtype), hi)).reshape(values.shape)


def _letters(subscript: str) -> str:
    return subscript.replace("...", "")


def einsum(spec: str, x: jax.Array, w: Any, dtype, preferred_element_type=None) -> jax.Array:
    """jnp.einsum(spec, x, w) in the compute `dtype`, for `w` a plain array or a quantized matrix.

    The letters of `w` that also index `x` are its inputs; they lead its
    subscript, as in every GPT-J projection ("btd,dhk->bthk", "bthk,hkd->btd",
    "...d,dv->...v"). Per channel, the scales multiply the product's output
    channels, which trail the result's subscript in the same order; the
    product is accumulated in fp32 and rounded to its dtype once, after the
    scale. In groups, each group of the matrix is scaled as it is converted.
    """
    if not is_quantized(w):
        return jnp.einsum(spec, x, w.astype(dtype), preferred_element_type=preferred_element_type)
    operands, y_sub = spec.split("->")
    x_sub, w_sub = (_letters(s) for s in operands.split(","))
    n_in = sum(c in x_sub for c in w_sub)
    if any(c not in x_sub for c in w_sub[:n_in]) or not _letters(y_sub).endswith(w_sub[n_in:]):
        raise ValueError(f"einsum {spec!r}: a quantized matrix needs its inputs first and its outputs last in the "
                         "result")
    values, scale = w[VALUES], w[SCALE]
    if group_size_of(values.shape, scale.shape, (0, n_in)):
        return jnp.einsum(spec, x, dequantize(w, (0, n_in), dtype), preferred_element_type=preferred_element_type)
    out_dtype = preferred_element_type or dtype
    y = jnp.einsum(spec, x, values.astype(dtype), preferred_element_type=jnp.float32)
    return (y * scale.astype(jnp.float32)).astype(out_dtype)


def take_rows(table: Any, ids: jax.Array, dtype) -> jax.Array:
    """table[ids] in `dtype` for an embedding [vocab, embed], plain or quantized (only the rows read are scaled)."""
    if not is_quantized(table):
        return jnp.take(table, ids, axis=0).astype(dtype)
    rows = {VALUES: jnp.take(table[VALUES], ids, axis=0), SCALE: jnp.take(table[SCALE], ids, axis=0)}
    return dequantize(rows, (ids.ndim, ids.ndim + 1), dtype)
