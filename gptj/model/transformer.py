"""GPT-J as Flax Linen modules, with every parameter and activation named logically.

The model never mentions a mesh axis. Parameters carry logical axis names
(`vocab`, `embed`, `heads`, `head_dim`, `mlp`, `layers`) and activations carry
`act_*` names; `gptj.core.partitioning` maps both onto the `stage` x `data` x
`model` mesh. Activation names are distinct from parameter names so that a rule
set can shard a weight's `embed` dimension (ZeRO-3) without also sharding the
residual stream. The residual stream (between the blocks' attention and MLP,
with its LayerNorms) names its sequence axis `act_residual_length`, apart from
the `act_length` of the attention and MLP inside a block, so that a rule set
can split it over the model axis by sequence (`megatron_sp`).

With `pipeline` (a `gptj.core.pipeline.Schedule`), training and evaluation
run the layer stack as a pipeline over the mesh's stages (each stage the
`nn.scan` of its L/S layers, the same scan as without); the parameters and
their initialisation are the same.

Parameter layout (the same whether or not `scan_layers` is set, so checkpoints
move freely between the two):

    wte                                  [vocab, embed]
    blocks/ln/{scale,bias}               [layers, embed]
    blocks/attn/{q,k,v}_proj             [layers, embed, heads, head_dim]
    blocks/attn/out_proj                 [layers, heads, head_dim, embed]
    blocks/mlp/fc_in_kernel, fc_in_bias  [layers, embed, mlp], [layers, mlp]
    blocks/mlp/fc_out_kernel, fc_out_bias [layers, mlp, embed], [layers, embed]
    ln_f/{scale,bias}                    [embed]
    lm_head_kernel, lm_head_bias         [embed, vocab], [vocab]

A quantized model (`quant_bits` 8 or 4; `gptj.model.quantized`) has the same tree,
except that each matrix `quant_targets` names is a pair in place of its array:
{"values": int8/int4 of the same shape and axes, "scale": its scales}.

With LoRA (`LoraConfig`), each adapted projection gains two parameters beside
its kernel, e.g. blocks/attn/q_proj_lora_a [layers, embed, lora_rank] and
blocks/attn/q_proj_lora_b [layers, lora_rank, heads, head_dim];
blocks/mlp/fc_in_lora_a [layers, embed, lora_rank], ...

Serving many adapters over one base (`gptj.inference`), the adapters are not
parameters but a separate variable collection, `adapter_pool` (ADAPTER_POOL):
per target, `<target>_pool_a` [layers, slots, in..., rank] and
`<target>_pool_b` [layers, slots, rank, out...] (B already multiplied by its
adapter's alpha / rank; ranks and targets a slot lacks are zeros), beside the
kernel in the same module. A call given `adapter_ids` [B] adds to each row the
delta of its own slot (a negative id: none; `pooled_lora_delta`), so rows of
different adapters and of the plain base run in one batch.

Decoding (`decode=True`) keeps a KV cache in the `cache` collection, at the
model's top level: `cached_key`/`cached_value` [layers, batch, heads,
cache_len, head_dim] (heads before slots: the layout the attention
contractions read without transposing the whole cache every step), `key_mask`
[batch, cache_len] (which slots hold real tokens) and `index` (the next slot).
A call writes its T tokens at `index`, so the same code serves a prompt prefill
(T = prompt length) and one decode step (T = 1). The layer scan only reads the
cache; the layers' new keys/values are written after it with one
dynamic_update_slice, in place when the caller donates the cache, so a step
costs T slots of writes rather than a rewrite of the whole cache.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Mapping, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from gptj.core import pipeline as pipeline_lib
from gptj.core.losses import map_position_chunks
from gptj.model import quantized as quantize
from gptj.model.attention import ATTENTION_IMPLS, NEG_INF, cached_attention, causal_attention

REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
    "save_all": jax.checkpoint_policies.everything_saveable,
}

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def resolve_dtype(name: str | Any) -> Any:
    """Maps a dtype name ('float32', 'bfloat16', 'float16') to a jnp dtype."""
    if not isinstance(name, str):
        return name
    if name not in _DTYPES:
        raise ValueError(f"unknown dtype {name!r}; expected one of {sorted(_DTYPES)}")
    return _DTYPES[name]


@dataclasses.dataclass(frozen=True)
class GPTJConfig:
    """Shape and numerics of a GPT-J model.

    `vocab_size` is the number of token ids the model answers for (HF's
    `vocab_size`); the embedding and head are padded up to a multiple of
    `vocab_pad_multiple` so the vocabulary axis can be split over the model
    axis. Padded logits are masked to -1e30, so they never win a softmax.
    """

    vocab_size: int = 50400
    num_layers: int = 28
    d_model: int = 4096
    num_heads: int = 16
    rotary_dim: int = 64
    max_len: int = 2048
    d_ff: int = 0  # 0 means 4 * d_model
    layer_norm_eps: float = 1e-5
    vocab_pad_multiple: int = 1
    rope_base: float = 10000.0
    init_std: float = 0.02
    dtype: str = "float32"
    param_dtype: str = "float32"
    scan_layers: bool = True
    remat_policy: str = "none"
    # The full-sequence attention kernel (gptj.model.attention): "auto" (the measured
    # fastest exact kernel for the backend), "einsum" (explicit fp32 scores),
    # "dot_product" (jax.nn.dot_product_attention, XLA), "cudnn" (cuDNN flash
    # attention: NVIDIA GPUs, bf16/fp16) or "blockwise" (flash-style in JAX:
    # memory linear in length, causal blocks skipped). Decoding uses einsum.
    attention_impl: str = "auto"
    # Weight-only quantization, for inference (`python -m gptj.convert quantize` writes it; training refuses
    # it): quant_bits 0 (none), 8 or 4; quant_group_size 0 (one scale per output channel) or inputs per
    # scale; quant_targets the matrices stored quantized (gptj.model.quantized.TARGETS). See gptj/quantize.py.
    quant_bits: int = 0
    quant_group_size: int = 0
    quant_targets: tuple[str, ...] = ()

    def __post_init__(self):
        object.__setattr__(self, "quant_targets", tuple(self.quant_targets))  # a list when read from JSON
        problems = []
        for name in ("vocab_size", "num_layers", "d_model", "num_heads", "max_len", "vocab_pad_multiple"):
            if getattr(self, name) <= 0:
                problems.append(f"{name} must be positive, got {getattr(self, name)}")
        if self.num_heads > 0 and self.d_model % self.num_heads:
            problems.append(f"d_model {self.d_model} is not divisible by num_heads {self.num_heads}")
        elif self.num_heads > 0 and not 0 <= self.rotary_dim <= self.head_dim:
            problems.append(f"rotary_dim {self.rotary_dim} must lie in [0, head_dim={self.head_dim}]")
        if self.rotary_dim % 2:
            problems.append(f"rotary_dim {self.rotary_dim} must be even (RoPE rotates pairs)")
        if self.d_ff < 0:
            problems.append(f"d_ff must be >= 0 (0 means 4 * d_model), got {self.d_ff}")
        if self.attention_impl not in ATTENTION_IMPLS:
            problems.append(f"attention_impl {self.attention_impl!r} is not one of {ATTENTION_IMPLS}")
        if self.remat_policy not in REMAT_POLICIES:
            problems.append(f"remat_policy {self.remat_policy!r} is not one of {sorted(REMAT_POLICIES)}")
        for name in ("dtype", "param_dtype"):
            if getattr(self, name) not in _DTYPES:
                problems.append(f"{name} {getattr(self, name)!r} is not one of {sorted(_DTYPES)}")
        if not problems:
            problems += quantize.config_problems(self)
        if problems:
            raise ValueError("invalid GPT-J config: " + "; ".join(problems))

    @property
    def head_dim(self) -> int:
        return self.d_model // self.num_heads

    @property
    def mlp_dim(self) -> int:
        return self.d_ff or 4 * self.d_model

    @property
    def padded_vocab_size(self) -> int:
        m = self.vocab_pad_multiple
        return -(-self.vocab_size // m) * m

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "GPTJConfig":
        """Builds a config from a mapping, rejecting unknown keys by name."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown GPT-J model config keys {unknown}; known keys: {sorted(known)}")
        return cls(**dict(values))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **changes) -> "GPTJConfig":
        return dataclasses.replace(self, **changes)

    def quantizes(self, target: str) -> bool:
        """Whether the matrix `target` (a name in gptj.model.quantized.TARGETS) is stored quantized."""
        return self.quant_bits > 0 and target in self.quant_targets


def matrix_param(module: nn.Module, name: str, target: str, init, shape: tuple[int, ...], axes: tuple[str, ...]):
    """A weight matrix of `module`: an array, or {"values", "scale"} when the config quantizes `target`."""
    cfg = module.config
    pdt = resolve_dtype(cfg.param_dtype)
    if not cfg.quantizes(target):
        return module.param(name, nn.with_logical_partitioning(init, axes), shape, pdt)
    spans = quantize.MATRICES[target].spans
    return module.param(name, quantize.param_init(shape, axes, spans, cfg.quant_bits, cfg.quant_group_size, pdt))


# The residual stream's logical axes: [batch, sequence, d_model], the sequence split by sequence-parallel rules;
# and [batch, sequence, d_model] as the tensor-parallel regions (attention, MLP, embedding, head) read it: whole.
RESIDUAL_AXES = ("act_batch", "act_residual_length", "act_embed")
TENSOR_PARALLEL_AXES = ("act_batch", "act_length", "act_embed")


class HeadInputs(NamedTuple):
    """What GPT-J's output head reads: for a loss or scorer that applies it (`output_logits`) chunk by chunk."""

    hidden: jax.Array  # [B, T, d_model]: the final LayerNorm's output, in the compute dtype
    kernel: jax.Array  # [d_model, padded_vocab_size]: lm_head_kernel as stored (param dtype)
    bias: jax.Array    # [padded_vocab_size]: lm_head_bias


def _init(std: float):
    return nn.initializers.normal(stddev=std)


# The projections LoRA can adapt, by their HuggingFace module names.
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc_in", "fc_out")


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """Low-rank adapters on some projections: y = x·W + (alpha / rank) · dropout(x)·A·B.

    A [in, rank] and B [rank, out] sit beside the kernel W they adapt (named
    `<target>_lora_a` / `<target>_lora_b`, see `lora_param_names`), stacked
    over layers like every block parameter. B starts at zero and A uniform in
    ±1/sqrt(in), as HF PEFT initialises them, so an untrained adapter changes
    nothing. `rank` 0 means no adapters.
    """

    rank: int = 0
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] = ("q_proj", "v_proj")

    def __post_init__(self):
        object.__setattr__(self, "targets", tuple(self.targets))
        problems = []
        if not isinstance(self.rank, int) or self.rank < 0:
            problems.append(f"rank must be an integer >= 0 (0 turns LoRA off), got {self.rank!r}")
        if not self.alpha > 0:
            problems.append(f"alpha must be positive, got {self.alpha}")
        if not 0 <= self.dropout < 1:
            problems.append(f"dropout must lie in [0, 1), got {self.dropout}")
        unknown = [t for t in self.targets if t not in LORA_TARGETS]
        if unknown:
            problems.append(f"unknown target(s) {unknown}; choose from {list(LORA_TARGETS)}")
        elif not self.targets or len(set(self.targets)) != len(self.targets):
            problems.append(f"targets must name each projection once and at least one, got {list(self.targets)}")
        if problems:
            raise ValueError("invalid LoRA config: " + "; ".join(problems))

    @property
    def scale(self) -> float:
        """alpha / rank: what the adapters' product is multiplied by."""
        return self.alpha / self.rank

    def adapts(self, target: str) -> bool:
        """Whether the projection `target` (e.g. "q_proj") carries adapters."""
        return self.rank > 0 and target in self.targets

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "LoraConfig":
        """From a mapping with (some of) rank, alpha, dropout, targets; other keys are ignored."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: values[k] for k in names if k in values})


def lora_param_names(target: str) -> tuple[str, str]:
    """The names of a target's adapters A and B, beside its kernel in the same module."""
    return f"{target}_lora_a", f"{target}_lora_b"


# The variable collection of the adapters a server holds beside one base (see the module docstring).
ADAPTER_POOL = "adapter_pool"


def pool_names(target: str) -> tuple[str, str]:
    """The names of a target's pooled adapters A and B in the `adapter_pool` collection."""
    return f"{target}_pool_a", f"{target}_pool_b"


def pooled_lora_delta(x: jax.Array, pool_a: jax.Array, pool_b: jax.Array, adapter_ids: jax.Array,
                      letters: tuple[str, str, str, str, str]) -> jax.Array:
    """Each row's own adapter delta (x·A[id])·B[id] for one layer's pool A [slots, in..., r], B [slots, r, out...].

    A negative or out-of-range id adds nothing (the plain base); B carries its
    adapter's scale. Two ways, chosen by shape at trace time (measured by
    benchmarks/multi_lora.py):
    - several tokens per row (prefill, scoring): each row's A and B are
      gathered, then two batched contractions over its tokens (the per-row
      gather of Punica's BGMV and S-LoRA): work follows the rows' tokens,
      while multiplying every token by every adapter would take `slots` times
      the arithmetic;
    - one token per row (a decode step) and at least as many rows as slots:
      every row through every adapter in one contraction, the others'
      results masked out, which reads each adapter once where the gather
      would copy one per row.
    """
    x_sub, w_in, w_out, batch, y_sub = letters
    rows, slots = x.shape[0], pool_a.shape[0]
    if math.prod(x.shape[1:len(batch)]) == 1 and rows >= slots:
        keep = jax.nn.one_hot(adapter_ids, slots, dtype=x.dtype)  # a negative id: no adapter
        keep = keep.reshape((rows,) + (1,) * (len(batch) - 1) + (slots, 1))
        xa = jnp.einsum(f"{x_sub},n{w_in}r->{batch}nr", x, pool_a) * keep
        return jnp.einsum(f"{batch}nr,nr{w_out}->{y_sub}", xa, pool_b)
    row = x_sub[0]
    ids = jnp.where(adapter_ids < 0, slots, adapter_ids)
    a = jnp.take(pool_a, ids, axis=0, mode="fill", fill_value=0)
    b = jnp.take(pool_b, ids, axis=0, mode="fill", fill_value=0)
    xa = jnp.einsum(f"{x_sub},{row}{w_in}r->{batch}r", x, a)
    return jnp.einsum(f"{batch}r,{row}r{w_out}->{y_sub}", xa, b)


def _split_einsum(spec: str) -> tuple[str, str, str, str, str]:
    """'btd,dhk->bthk' -> (x 'btd', kernel inputs 'd', kernel outputs 'hk', batch 'bt', y 'bthk')."""
    operands, y = spec.split("->")
    x, w = operands.split(",")
    return x, "".join(c for c in w if c in x), "".join(c for c in w if c not in x), \
        "".join(c for c in x if c not in w), y


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _lora_delta(x, a, b, letters: tuple[str, str, str, str, str], scale: float):
    """scale · (x·A)·B for `project`, whose einsum letters (x, W inputs, W outputs, batch, y) are `letters`.

    The backward pass is written out so that every contraction over the
    tokens puts the narrow rank-r operand first: left to autodiff, XLA:CPU
    transposes the wide activations (or their gradient) for dA and dB, which
    took longer than all the adapters' arithmetic.
    """
    return _lora_delta_fwd(x, a, b, letters, scale)[0]


def _lora_delta_fwd(x, a, b, letters, scale):
    x_sub, w_in, w_out, batch, y_sub = letters
    xa = jnp.einsum(f"{x_sub},{w_in}r->{batch}r", x, a)
    return jnp.einsum(f"{batch}r,r{w_out}->{y_sub}", xa * jnp.asarray(scale, xa.dtype), b), (x, a, b, xa)


def _lora_delta_bwd(letters, scale, residuals, grad):
    x_sub, w_in, w_out, batch, y_sub = letters
    x, a, b, xa = residuals
    scale = jnp.asarray(scale, grad.dtype)
    grad_xa = jnp.einsum(f"{y_sub},r{w_out}->{batch}r", grad, b) * scale
    grad_b = jnp.einsum(f"{batch}r,{y_sub}->r{w_out}", xa * scale, grad)
    # dA^T = dxa^T·x, then the small transpose; the barrier stops XLA from folding that transpose
    # into the contraction, which would transpose the wide x instead.
    grad_a = jnp.moveaxis(jax.lax.optimization_barrier(jnp.einsum(f"{batch}r,{x_sub}->r{w_in}", grad_xa, x)), 0, -1)
    grad_x = jnp.einsum(f"{batch}r,{w_in}r->{x_sub}", grad_xa, a)
    return grad_x, grad_a, grad_b


_lora_delta.defvjp(_lora_delta_fwd, _lora_delta_bwd)


def project(module: nn.Module, x: jax.Array, target: str, kernel_name: str, spec: str, shape: tuple[int, ...],
            axes: tuple[str, ...], lora: LoraConfig | None, deterministic: bool,
            adapter_ids: jax.Array | None = None) -> jax.Array:
    """One projection of the model (no bias): y = einsum(spec, x, W), plus its LoRA adapters if any.

    Every projection (q, k, v, out, fc_in, fc_out) goes through here, so a
    change to how a kernel is stored or applied is made once (a quantized
    kernel is multiplied by `gptj.model.quantized.einsum`). `shape`/`axes`
    are the kernel's own (without the layer axis); the einsum letters of W
    that also index x are its inputs, the rest its outputs, which fixes the
    adapters' shapes: A [inputs..., rank], B [rank, outputs...]. The matmuls
    run in the compute dtype; dropout (training only) is applied to the
    adapters' input, as PEFT does. With `adapter_ids` and an `adapter_pool`
    holding this target, each row also gets its pooled adapter's delta.
    """
    cfg = module.config
    dtype, pdt = resolve_dtype(cfg.dtype), resolve_dtype(cfg.param_dtype)
    kernel = matrix_param(module, kernel_name, target, _init(cfg.init_std), shape, axes)
    y = quantize.einsum(spec, x, kernel, dtype)
    letters = _split_einsum(spec)
    pool_a, pool_b = pool_names(target)
    if adapter_ids is not None and module.has_variable(ADAPTER_POOL, pool_a):
        y = y + pooled_lora_delta(x, module.get_variable(ADAPTER_POOL, pool_a).astype(dtype),
                                  module.get_variable(ADAPTER_POOL, pool_b).astype(dtype), adapter_ids, letters)
    if lora is None or not lora.adapts(target):
        return y
    n_in = len(letters[1])
    fan_in = int(np.prod(shape[:n_in]))
    bound = 1.0 / np.sqrt(fan_in)
    a_name, b_name = lora_param_names(target)

    def uniform(key, a_shape, a_dtype):
        return jax.random.uniform(key, a_shape, a_dtype, -bound, bound)

    a = module.param(a_name, nn.with_logical_partitioning(uniform, axes[:n_in] + ("lora_rank",)),
                     shape[:n_in] + (lora.rank,), pdt)
    b = module.param(b_name, nn.with_logical_partitioning(nn.initializers.zeros, ("lora_rank",) + axes[n_in:]),
                     (lora.rank,) + shape[n_in:], pdt)
    if lora.dropout > 0 and not deterministic:
        keep = jax.random.bernoulli(module.make_rng("dropout"), 1.0 - lora.dropout, x.shape)
        x = jnp.where(keep, x / (1.0 - lora.dropout), 0).astype(x.dtype)
    return y + _lora_delta(x, a.astype(dtype), b.astype(dtype), letters, lora.scale)


class LayerNorm(nn.Module):
    """LayerNorm computed in fp32 whatever the compute dtype."""

    config: GPTJConfig

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        pdt = resolve_dtype(cfg.param_dtype)
        scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("embed",)), (cfg.d_model,), pdt)
        bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)), (cfg.d_model,), pdt)
        x32 = x.astype(jnp.float32)
        mean = x32.mean(-1, keepdims=True)
        var = jnp.square(x32 - mean).mean(-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + cfg.layer_norm_eps)
        y = y * scale.astype(jnp.float32) + bias.astype(jnp.float32)
        return y.astype(resolve_dtype(cfg.dtype))


def rotary_sin_cos(positions: jax.Array, rotary_dim: int, base: float):
    """sin and cos of RoPE angles for integer positions [..., T] -> [..., T, rotary_dim/2] (fp32)."""
    inv_freq = 1.0 / (base ** (np.arange(0, rotary_dim, 2, dtype=np.float32) / np.float32(rotary_dim)))
    angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)
    return jnp.sin(angles), jnp.cos(angles)


def apply_rotary(x: jax.Array, sin: jax.Array, cos: jax.Array, rotary_dim: int) -> jax.Array:
    """GPT-J RoPE: rotates interleaved pairs (x0, x1), (x2, x3), ... of the first rotary_dim dims.

    x: [B, T, H, D]; sin, cos: [B, T, rotary_dim/2].
    """
    if rotary_dim == 0:
        return x
    rot, rest = x[..., :rotary_dim], x[..., rotary_dim:]
    pairs = rot.astype(jnp.float32).reshape(*rot.shape[:-1], rotary_dim // 2, 2)
    even, odd = pairs[..., 0], pairs[..., 1]
    sin, cos = sin[:, :, None, :], cos[:, :, None, :]
    rotated = jnp.stack([even * cos - odd * sin, odd * cos + even * sin], axis=-1)
    rotated = rotated.reshape(rot.shape).astype(x.dtype)
    return jnp.concatenate([rotated, rest], axis=-1)


class Attention(nn.Module):
    """Causal multi-head self-attention with GPT-J's partial RoPE and an optional KV cache.

    Without `cache` it attends causally within `x`. With `cache` (decoding) it
    is given this layer's cached keys and values [B, H, S, D] and the cache's
    shared (key_mask [B, S], index) read-only, attends to the cached slots
    before `index` plus the T new tokens, and returns the new tokens' keys and
    values [B, H, T, D] for the caller to write into the cache: the cache is
    written once for all layers, after the layer scan, instead of being
    carried (and so rewritten whole) through it.
    """

    config: GPTJConfig
    lora: LoraConfig | None = None
    deterministic: bool = True

    @nn.compact
    def __call__(self, x, positions, token_mask, cache=None, adapter_ids=None):
        cfg = self.config
        dtype = resolve_dtype(cfg.dtype)
        qkv_shape = (cfg.d_model, cfg.num_heads, cfg.head_dim)
        qkv_axes = ("embed", "heads", "head_dim")

        def qkv(name):
            y = project(self, x, name, name, "btd,dhk->bthk", qkv_shape, qkv_axes, self.lora, self.deterministic,
                        adapter_ids)
            return nn.with_logical_constraint(y, ("act_batch", "act_length", "act_heads", "head_dim"))

        q, k, v = qkv("q_proj"), qkv("k_proj"), qkv("v_proj")
        sin, cos = rotary_sin_cos(positions, cfg.rotary_dim, cfg.rope_base)
        q = apply_rotary(q, sin, cos, cfg.rotary_dim)
        k = apply_rotary(k, sin, cos, cfg.rotary_dim)

        scale = 1.0 / np.sqrt(cfg.head_dim)
        new_kv = None
        if cache is not None:
            out = cached_attention(q, k, v, token_mask, *cache, scale=scale, dtype=dtype)
            kv_axes = ("act_batch", "act_heads", "act_length", "head_dim")
            new_kv = tuple(nn.with_logical_constraint(t.transpose(0, 2, 1, 3), kv_axes) for t in (k, v))
        else:
            out = causal_attention(q, k, v, token_mask, impl=cfg.attention_impl, scale=scale, dtype=dtype)
        out = nn.with_logical_constraint(out, ("act_batch", "act_length", "act_heads", "head_dim"))
        out = project(self, out, "out_proj", "out_proj", "bthk,hkd->btd", (cfg.num_heads, cfg.head_dim, cfg.d_model),
                      ("heads", "head_dim", "embed"), self.lora, self.deterministic, adapter_ids)
        return out, new_kv


class MLP(nn.Module):
    """fc_out(gelu_tanh(fc_in(x))), both projections with a bias."""

    config: GPTJConfig
    lora: LoraConfig | None = None
    deterministic: bool = True

    @nn.compact
    def __call__(self, x, adapter_ids=None):
        cfg = self.config
        dtype, pdt = resolve_dtype(cfg.dtype), resolve_dtype(cfg.param_dtype)
        zeros = nn.initializers.zeros
        # Each bias is created right after its kernel (and adapters): the order of
        # creation fixes which random numbers each parameter is initialised from.
        h = project(self, x, "fc_in", "fc_in_kernel", "btd,df->btf", (cfg.d_model, cfg.mlp_dim), ("embed", "mlp"),
                    self.lora, self.deterministic, adapter_ids)
        b_in = self.param("fc_in_bias", nn.with_logical_partitioning(zeros, ("mlp",)), (cfg.mlp_dim,), pdt)
        h = nn.with_logical_constraint(h + b_in.astype(dtype), ("act_batch", "act_length", "act_mlp"))
        h = jax.nn.gelu(h, approximate=True)
        out = project(self, h, "fc_out", "fc_out_kernel", "btf,fd->btd", (cfg.mlp_dim, cfg.d_model), ("mlp", "embed"),
                      self.lora, self.deterministic, adapter_ids)
        b_out = self.param("fc_out_bias", nn.with_logical_partitioning(zeros, ("embed",)), (cfg.d_model,), pdt)
        return out + b_out.astype(dtype)


class Block(nn.Module):
    """GPT-J's parallel block: x + attn(ln(x)) + mlp(ln(x)), one LayerNorm.

    Returns (output, new_kv): new_kv is the attention's new keys and values
    when decoding (`layer_cache` given), else None.
    """

    config: GPTJConfig
    lora: LoraConfig | None = None
    deterministic: bool = True

    @nn.compact
    def __call__(self, x, positions, token_mask, layer_cache=None, cache_state=None, adapter_ids=None):
        # The LayerNorm's output stays in the residual stream's layout (what is saved of it for the backward
        # pass too); attention and MLP gather it whole where a rule set splits it by sequence.
        h = nn.with_logical_constraint(LayerNorm(self.config, name="ln")(x), RESIDUAL_AXES)
        cache = None if layer_cache is None else (*layer_cache, *cache_state)
        attention = Attention(self.config, self.lora, self.deterministic, name="attn")
        attn, new_kv = attention(h, positions, token_mask, cache, adapter_ids)
        out = x + attn + MLP(self.config, self.lora, self.deterministic, name="mlp")(h, adapter_ids)
        out = nn.with_logical_constraint(out, RESIDUAL_AXES)
        return out, new_kv


class GPTJ(nn.Module):
    """The GPT-J causal language model.

    Call with `tokens` [B, T] int32; optional `positions` [B, T] (default
    0..T-1; left-padded batches pass per-row positions) and `token_mask`
    [B, T] bool (False for padding; padded keys are never attended to;
    None means no padding).
    Returns logits [B, T, padded_vocab_size] in fp32, or with `return_hidden`
    the final LayerNorm's output [B, T, d_model] (compute dtype), for callers
    that apply the head themselves (`output_logits`) to fewer positions, or
    that put a head of their own on the trunk. A model built with
    `head_inputs=True` returns `HeadInputs` (that output plus the head's
    kernel and bias) instead of logits, for a loss that applies the head
    chunk by chunk (`gptj.core.losses.fused_next_token_loss`); the parameters are
    the same.

    With `lora`, the projections it targets carry low-rank adapters (see
    `LoraConfig`); `deterministic=False` (training, with a `dropout` RNG)
    applies the adapters' dropout. `adapter_ids` [B] picks each row's adapter
    from an `adapter_pool` collection passed with the params (a negative id:
    the plain base); without that collection it is ignored.

    With `pipeline`, the layers run as a pipeline of `pipeline.stages` stages
    on `pipeline.microbatches` microbatches of the batch (`gptj.core.pipeline`;
    the mesh's stage axis must have that size); initialisation and decoding
    do not pipeline.
    """

    config: GPTJConfig
    decode: bool = False
    lora: LoraConfig | None = None
    head_inputs: bool = False
    pipeline: pipeline_lib.Schedule | None = None

    @nn.compact
    def __call__(self, tokens, positions=None, token_mask=None, return_hidden: bool = False,
                 deterministic: bool = True, adapter_ids=None):
        cfg = self.config
        dtype, pdt = resolve_dtype(cfg.dtype), resolve_dtype(cfg.param_dtype)
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
        if token_mask is None and self.decode:
            token_mask = jnp.ones(tokens.shape, dtype=bool)  # the cache records which slots are real

        embedding = matrix_param(self, "wte", "wte", _init(cfg.init_std), (cfg.padded_vocab_size, cfg.d_model),
                                 ("vocab", "embed"))
        x = quantize.take_rows(embedding, tokens, dtype)
        # The lookup of a vocabulary-split embedding is summed over model whole, then enters the residual
        # stream's layout (a reduce-scatter where that is split by sequence, not a gather of the table).
        x = nn.with_logical_constraint(x, TENSOR_PARALLEL_AXES)
        x = nn.with_logical_constraint(x, RESIDUAL_AXES)

        blocks = layer_stack(cfg, cfg.num_layers)
        if self.decode and self.pipeline is not None:
            raise ValueError("a pipelined GPT-J does not decode: build the decoder without `pipeline`")
        if self.decode:
            cache = self._cache_variables(tokens.shape)
            layer_cache = (cache["cached_key"].value, cache["cached_value"].value)
            cache_state = (cache["key_mask"].value, cache["index"].value)
            x, new_kv = blocks(cfg, self.lora, deterministic, name="blocks")(x, positions, token_mask, layer_cache,
                                                                             cache_state, adapter_ids)
            self._write_cache(cache, new_kv, token_mask)
        elif self.pipeline is not None and not self.is_initializing():
            x = self._pipelined_layers(x, positions, token_mask, deterministic)
        else:
            x, _ = blocks(cfg, self.lora, deterministic, name="blocks")(x, positions, token_mask, None, None,
                                                                        adapter_ids)

        # The head, like attention and MLP, reads the whole sequence.
        x = nn.with_logical_constraint(LayerNorm(cfg, name="ln_f")(x), TENSOR_PARALLEL_AXES)
        if return_hidden:  # before the head's params: a trunk initialised this way has no LM head
            return x
        head = matrix_param(self, "lm_head_kernel", "lm_head", _init(cfg.init_std),
                            (cfg.d_model, cfg.padded_vocab_size), ("embed", "vocab"))
        head_bias = self.param("lm_head_bias", nn.with_logical_partitioning(nn.initializers.zeros, ("vocab",)), (cfg.padded_vocab_size,), pdt)
        if self.head_inputs:
            return HeadInputs(x, head, head_bias)
        return output_logits(x, head, head_bias, cfg)

    def _pipelined_layers(self, x, positions, token_mask, deterministic: bool):
        """The blocks run as a pipeline: each stage applies the layer scan to its slice of the stacked params."""
        cfg = self.config
        stage_layers = layer_stack(cfg, cfg.num_layers // self.pipeline.stages)(cfg, self.lora, deterministic,
                                                                               parent=None)

        def stage_fn(params, h, per_microbatch, rng):
            rngs = {} if rng is None else {"dropout": rng}
            return stage_layers.apply({"params": params}, h, *per_microbatch, None, None, None, rngs=rngs)[0]

        dropout = not deterministic and self.lora is not None and self.lora.dropout > 0
        x = pipeline_lib.run(stage_fn, self.variables["params"]["blocks"], x, (positions, token_mask),
                             schedule=self.pipeline, x_axes=RESIDUAL_AXES,
                             rng=self.make_rng("dropout") if dropout else None)
        return nn.with_logical_constraint(x, RESIDUAL_AXES)

    def _cache_variables(self, shape) -> dict[str, Any]:
        """The `cache` collection's variables; created (zero, with `shape[1]` slots) when the model is initialised."""
        cfg = self.config
        batch, cache_len = shape
        kv_shape = (cfg.num_layers, batch, cfg.num_heads, cache_len, cfg.head_dim)
        dtype = resolve_dtype(cfg.dtype)
        return {
            "cached_key": self.variable("cache", "cached_key", jnp.zeros, kv_shape, dtype),
            "cached_value": self.variable("cache", "cached_value", jnp.zeros, kv_shape, dtype),
            "key_mask": self.variable("cache", "key_mask", jnp.zeros, (batch, cache_len), bool),
            "index": self.variable("cache", "index", lambda: jnp.zeros((), jnp.int32)),
        }

    @staticmethod
    def _write_cache(cache, new_kv, token_mask) -> None:
        """Writes the layers' new keys/values [layers, B, H, T, D] at the cache index, then advances it.

        One dynamic_update_slice per tensor for all layers: in place when the
        caller donates the cache, so a decode step writes T slots, not the cache.
        """
        start = cache["index"].value
        for name, new in zip(("cached_key", "cached_value"), new_kv):
            old = cache[name].value
            cache[name].value = jax.lax.dynamic_update_slice(old, new.astype(old.dtype), (0, 0, 0, start, 0))
        cache["key_mask"].value = jax.lax.dynamic_update_slice(cache["key_mask"].value, token_mask, (0, start))
        cache["index"].value = start + token_mask.shape[1]


def layer_stack(config: GPTJConfig, length: int):
    """The scanned stack of `length` blocks (remat as the config says), parameters stacked on `layers`.

    One stacked parameter layout for every setting: scan_layers=False unrolls
    the same scan at trace time (longer compile, no loop overhead), and a
    pipeline stage applies this scan to its slice of the layers. When
    decoding, each layer's cache slice is a scanned input (read, never
    carried) and the layers' new keys/values come back as scan outputs.
    """
    block = Block
    if config.remat_policy != "none":
        block = nn.remat(Block, policy=REMAT_POLICIES[config.remat_policy], prevent_cse=False)
    return nn.scan(
        block,
        variable_axes={"params": 0, ADAPTER_POOL: 0},
        split_rngs={"params": True, "dropout": True},
        in_axes=(nn.broadcast, nn.broadcast, 0, nn.broadcast, nn.broadcast),
        length=length,
        unroll=1 if config.scan_layers else length,
        metadata_params={nn.PARTITION_NAME: "layers"},
    )


def output_logits(hidden: jax.Array, kernel: jax.Array, bias: jax.Array, config: GPTJConfig,
                  first_id: Any = 0) -> jax.Array:
    """GPT-J's output head: hidden [..., d_model] -> fp32 logits [..., V] for V = bias.shape[-1].

    The matmul runs in the compute dtype with fp32 accumulation (`kernel`
    may be quantized: `gptj.model.quantized.einsum`); padded vocabulary entries get
    a large negative logit, so they never win a softmax. `kernel` and `bias`
    may be a slice of the vocabulary: the columns of ids `first_id`,
    first_id + 1, ... (the chunked loss passes one at a time). The model's own
    forward pass, the chunked loss and every caller that applies the head to
    selected positions only (scoring) use this one function.
    """
    logits = quantize.einsum("...d,dv->...v", hidden, kernel, resolve_dtype(config.dtype),
                             preferred_element_type=jnp.float32)
    logits = logits + bias.astype(jnp.float32)
    if config.padded_vocab_size != config.vocab_size:
        real = first_id + jnp.arange(bias.shape[-1]) < config.vocab_size
        logits = jnp.where(real, logits, NEG_INF)
    logical = ("act_batch",) + ("act_length",) * (logits.ndim - 2) + ("act_vocab",)
    return nn.with_logical_constraint(logits, logical)


# Tokens per chunk when scoring (`score_targets`): a chunk's fp32 logits are
# chunk x vocabulary (200 MB for GPT-J's 50400), whatever the batch and length.
SCORE_CHUNK_TOKENS = 1024


class TargetScores(NamedTuple):
    """Per-position scores of given targets under the model (what lm-eval's loglikelihood and echo+logprobs need)."""

    logprobs: jax.Array      # [B, T] fp32: log p(targets[b, t] | the prefix)
    greedy: jax.Array        # [B, T] bool: the target is the argmax (first one on ties)
    top_ids: jax.Array       # [B, T, top_k] int32: the top_k likeliest ids, likeliest first
    top_logprobs: jax.Array  # [B, T, top_k] fp32: their log-probabilities


def score_targets(hidden: jax.Array, kernel: jax.Array, bias: jax.Array, targets: jax.Array, config: GPTJConfig,
                  top_k: int = 0, chunk_tokens: int = SCORE_CHUNK_TOKENS) -> TargetScores:
    """Target log-probs, greedy flags and top-k from hidden states [B, T, D], chunk by chunk of tokens.

    `output_logits` is applied to about `chunk_tokens` tokens at a time, so
    the [B, T, vocab] logits never exist at once; log-probs are the logits
    minus their logsumexp (fp32). The vocabulary may be sharded over devices.
    """
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0, got {top_k}")

    def chunk(h, t):
        logits = output_logits(h, kernel, bias, config)
        log_norm = jax.nn.logsumexp(logits, axis=-1)
        ids = jax.lax.broadcasted_iota(jnp.int32, logits.shape, logits.ndim - 1)
        # A masked sum rather than a gather keeps a sharded vocabulary axis sharded.
        target_logit = jnp.sum(jnp.where(ids == t[..., None], logits, 0.0), axis=-1)
        greedy = jnp.argmax(logits, axis=-1) == t
        if top_k:
            top_logits, top_ids = jax.lax.top_k(logits, top_k)
            top = (top_ids.astype(jnp.int32), top_logits - log_norm[..., None])
        else:
            top = (jnp.zeros(t.shape + (0,), jnp.int32), jnp.zeros(t.shape + (0,), jnp.float32))
        return (target_logit - log_norm, greedy) + top

    return TargetScores(*map_position_chunks(chunk, chunk_tokens, hidden, targets))


def matmul_params(config: GPTJConfig) -> int:
    """Parameters that take part in a matmul per token: q, k, v, out, fc_in, fc_out per layer, and the head.

    The embedding is a lookup (no FLOPs); biases and LayerNorms are negligible.
    """
    per_layer = 4 * config.d_model * config.d_model + 2 * config.d_model * config.mlp_dim
    return config.num_layers * per_layer + config.d_model * config.padded_vocab_size


def train_flops_per_token(config: GPTJConfig, seq_len: int) -> float:
    """Model FLOPs to train on one token at sequence length `seq_len` (PaLM's 6N + 12 L H Q T).

    The one formula behind MFU in training logs, benchmarks and the scaling model.
    """
    from gptj.core.metrics import flops_per_token

    return flops_per_token(matmul_params(config), config.num_layers, config.num_heads, config.head_dim, seq_len)


def recompute_flops_per_token(config: GPTJConfig, seq_len: int, remat_policy: str | None = None) -> float:
    """FLOPs the backward pass recomputes per token under a remat policy (default: the config's).

    full: the whole forward pass again (a third of `train_flops_per_token`); dots_no_batch:
    the attention einsums (weight matmuls are saved); none, save_all, dots: nothing.
    """
    policy = config.remat_policy if remat_policy is None else remat_policy
    if policy == "full":
        return train_flops_per_token(config, seq_len) / 3.0
    if policy == "dots_no_batch":
        return 4.0 * config.num_layers * seq_len * config.d_model
    return 0.0


def count_params(tree) -> int:
    """Number of scalars in a (possibly abstract) parameter tree."""
    return int(sum(np.prod(leaf.shape, dtype=np.int64) for leaf in jax.tree_util.tree_leaves(tree)))


def abstract_params(config: GPTJConfig, lora: LoraConfig | None = None):
    """Parameter shapes, dtypes and logical axes (as nn.Partitioned boxes), with nothing allocated.

    With `lora`, the tree also holds its adapters. Each (config, lora) is traced
    once per process (a trace of the whole model: loading, checking and
    serving adapters ask for the same shapes many times); every call gets a
    tree of its own.
    """
    try:
        traced = _traced_params(config, lora)
    except TypeError:  # a config holding an unhashable value (a list from a hand-made dict): trace it here
        traced = _traced_params.__wrapped__(config, lora)
    return jax.tree_util.tree_map(lambda leaf: leaf, traced)


@functools.lru_cache(maxsize=32)
def _traced_params(config: GPTJConfig, lora: LoraConfig | None):
    model = GPTJ(config, lora=lora)
    tokens = jax.ShapeDtypeStruct((1, 1), jnp.int32)
    return jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros(tokens.shape, tokens.dtype)))["params"]


def init_cache(config: GPTJConfig, batch_size: int, cache_len: int):
    """A zero KV cache for `batch_size` rows of `cache_len` slots (the `cache` collection)."""
    model = GPTJ(config, decode=True)
    shapes = jax.eval_shape(
        lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((batch_size, cache_len), jnp.int32))["cache"]
    )
    return jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)


CACHE_LOGICAL_AXES = {
    "cached_key": ("layers", "act_batch", "act_heads", "act_kv_length", "head_dim"),
    "cached_value": ("layers", "act_batch", "act_heads", "act_kv_length", "head_dim"),
    "key_mask": ("act_batch", "act_kv_length"),
    "index": (),
}


def cache_logical_axes(cache) -> Any:
    """Logical axis names for each leaf of a KV cache tree (for sharding it like the activations)."""
    return jax.tree_util.tree_map_with_path(lambda path, _: CACHE_LOGICAL_AXES[path[-1].key], cache)
