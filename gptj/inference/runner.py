"""One model's compiled programs over a slot KV cache: prefill a chunk into chosen slots, decode steps, score.

The decode engine (`gptj.inference.engine`) decides what runs; this module only runs it.
The cache is the model's own tree (`gptj.model.transformer`): `cached_key`/`cached_value`
[layers, slots, heads, columns, head_dim], `key_mask` [slots, columns] and one
`index`. Every slot holds one sequence at columns 0, 1, 2, ... (its positions),
so a row computes exactly what it would alone, whatever the other slots hold.

Because the model's `index` is one scalar for the whole batch, the two kinds of
call use it differently:
- Prefill gathers the chosen slots' rows (all at the same cursor `start`),
  runs the model with `index = start` (so stale columns at or past the cursor
  are masked, and the chunk is written at start .. start + T), then scatters
  the rows back.
- Decode gives every slot a different write column. The cache has one scratch
  column past the end (`cache_len`); the model runs with `index = cache_len`,
  attending to each row's own `key_mask` and writing the step's keys and values
  into the scratch column, and the step then moves each row's new column to
  that row's own position. (A per-row `index` in the model would save the
  scratch column and one [layers, slots, heads, head_dim] scatter per step.)

Prefill and decode attend over the cache (`gptj.model.attention.cached_attention`,
one exact einsum); scoring runs the whole sequence with the model's configured
kernel (`attention_impl`) and applies the head chunk by chunk of tokens
(`model.score_targets`). Quantized weights run as stored (the integers are
converted inside each matmul); the LoRA adapters of a model served alone
arrive merged (`weights.load_for_inference`).

Many adapters over one base: `reserve_adapters` adds an adapter pool
(`gptj.model.lora.pool_shapes`: slots x every target at one padded rank,
replicated on the mesh) and `write_adapter` fills a slot. Every program
takes each row's slot (-1: the plain base: prefill and score an id per row,
decode the ADAPTER column of the rows array), so one call runs rows of
different adapters together (`gptj.model.transformer.pooled_lora_delta`).

Prefix blocks: a block store [layers, blocks, heads, block_size, head_dim]
(`new_prefix_store`) keeps keys and values of prompt blocks after their row
is gone; `save_prefix` copies a slot's leading blocks into chosen store
blocks and `restore_prefix` copies store blocks back into a slot's leading
columns. Columns are positions, so a block's keys (rotated at their
positions) serve any row with the same tokens before them. Which blocks hold
what is the engine's bookkeeping (`gptj.inference.prefix_cache`).

Shapes are bucketed by the caller (prefill rows and chunk length, decode steps)
so a server compiles a fixed set of programs; a new shape met while
`serving` is set is logged as a warning.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec

from gptj.core.partitioning import Partitioner, make_mesh, place
from gptj.inference.sampling_ops import bucket, pick_tokens, row_keys
from gptj.model.lora import pool_shapes, pool_tree
from gptj.model.transformer import (ADAPTER_POOL, GPTJ, GPTJConfig, cache_logical_axes, init_cache, output_logits,
                                    resolve_dtype, score_targets)
from gptj.weights.source import fingerprint, param_shardings

# Smallest prompt / generation / chunk buckets: shorter requests share one program.
MIN_LENGTH_BUCKET = 16
# Tokens kept per position when top log-probabilities are requested (OpenAI allows up to 5).
MAX_TOP_LOGPROBS = 5
GPT2_EOS_ID = 50256
GPT2_VOCAB_SIZE = 50257

# Columns of the per-row int32 settings array the programs take ([rows, ROW_FIELDS]).
# EOS is the id that ends the row (-1: none); before MIN_TOKENS tokens it is never drawn. ADAPTER is the
# row's adapter pool slot (NO_ADAPTER: the plain base).
TOKEN, POS, STEP, REMAINING, TOP_K, SEED, EOS, MIN_TOKENS, ADAPTER = range(9)
ROW_FIELDS = 9
# The adapter id of a row without an adapter.
NO_ADAPTER = -1
# Columns of the per-row float32 settings array ([rows, 2]).
TEMPERATURE, TOP_P = range(2)


@dataclasses.dataclass
class Generation:
    """One row's output. `tokens` excludes the EOS token that ended the row (`ended_on_eos`) and
    anything after a stop string; under `ignore_eos`, EOS tokens drawn along the way stay in it.

    `logprobs[i]` is log p(tokens[i] | prefix) under the model's unfiltered
    temperature-1 distribution over the tokenizer's vocabulary (ids the model
    pads its vocabulary with have no mass). `top_logprobs[i]` lists the (token
    id, log-prob) pairs of the most likely tokens at that step when requested.
    `finish_reason` is "stop" (EOS or a stop string), "length", or None while
    the row is still running. `text` is the decoded completion, cut before the
    stop string, when there is a tokenizer.
    """

    tokens: list[int]
    logprobs: list[float]
    finish_reason: str | None
    text: str | None = None
    top_logprobs: list[list[tuple[int, float]]] | None = None
    ended_on_eos: bool = False

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def completion_tokens(self) -> int:
        """Tokens the row generated: `tokens` and the EOS that ended it (what vLLM's usage counts)."""
        return len(self.tokens) + int(self.ended_on_eos)


@dataclasses.dataclass
class Score:
    """Log-probabilities of a token sequence's own tokens under the model.

    `token_logprobs[0]` is None (the first token has no context); entry i is
    log p(tokens[i] | tokens[:i]). `top_logprobs[i]` (None at 0) holds the
    most likely (token id, log-prob) pairs at position i when requested, and
    `greedy[i]` says whether tokens[i] was the argmax there.
    """

    tokens: list[int]
    token_logprobs: list[float | None]
    greedy: list[bool | None]
    top_logprobs: list[list[tuple[int, float]] | None] | None = None


def to_host(x) -> np.ndarray:
    """A numpy copy of a (possibly multi-host sharded) array."""
    if getattr(x, "is_fully_addressable", True):
        return np.asarray(jax.device_get(x))
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def default_vocab_limit(config: GPTJConfig, tokenizer: Any = None) -> int:
    """How many ids generation may produce: the tokenizer's vocabulary when the model's is larger.

    Without a tokenizer that says its size, a model padded past GPT-2's 50257
    ids (GPT-J-6B has 50400) is taken to use the GPT-2 BPE, the project's tokenizer.
    """
    size = getattr(tokenizer, "vocab_size", None)
    if isinstance(size, int) and size > 0:
        return min(config.vocab_size, size)
    return GPT2_VOCAB_SIZE if config.vocab_size > GPT2_VOCAB_SIZE else config.vocab_size


class ModelRunner:
    """Params on the mesh and the compiled prefill / decode / score programs of one model.

    Args:
      model_config: the model's GPTJConfig. When its compute dtype differs from
        `param_dtype`, params are cast to the compute dtype once (inference
        keeps no fp32 master copy).
      params: the parameter tree (numpy, or jax arrays laid out any way).
      partitioner: mesh + rule set; default a 1x1 mesh on the first device.
        Slots are split over the batch axis, heads over `model`.
      vocab_limit: ids at or past it are never generated (`default_vocab_limit`).

    The adapter pool is empty until `reserve_adapters`.
    """

    def __init__(self, model_config: GPTJConfig, params: Any, partitioner: Partitioner | None = None, *,
                 vocab_limit: int | None = None):
        if model_config.dtype != model_config.param_dtype:
            model_config = model_config.replace(param_dtype=model_config.dtype)
        self.config = model_config
        self.partitioner = partitioner or Partitioner(make_mesh(1, 1, devices=jax.devices()[:1]), "megatron")
        self.vocab_limit = int(vocab_limit or model_config.vocab_size)
        if not 0 < self.vocab_limit <= model_config.vocab_size:
            raise ValueError(f"vocab_limit must lie in [1, {model_config.vocab_size}], got {vocab_limit}")
        self.param_shardings = param_shardings(model_config, self.partitioner)
        self.params = place(nn.meta.unbox(params), self.param_shardings, jnp.dtype(model_config.param_dtype))
        self._decoder = GPTJ(model_config, decode=True)
        # The head masks ids at or past its config's vocab_size (as -1e30: no mass, never a top id). Scoring
        # gives it a config whose vocab_size is the limit, so the tokenizer's padding ids are masked too; the
        # pad multiple of the head's full width keeps that width (its padded_vocab_size).
        self._score_config = model_config.replace(vocab_size=self.vocab_limit,
                                                  vocab_pad_multiple=model_config.padded_vocab_size)
        self._model = GPTJ(model_config)
        self.stats = {"prefill_calls": 0, "decode_calls": 0, "score_calls": 0, "programs": 0,
                      "compiled_while_serving": 0}
        self.adapter_pool: dict = {}
        self.adapter_slots = self.adapter_rank = 0
        self._fingerprint: str | None = None
        self.serving = False  # set by a serving engine: a new shape from now on is logged as a warning
        self._shapes: set[tuple] = set()
        self._build_programs()

    # -- shardings and programs ---------------------------------------------------------

    def rows_sharding(self, ndim: int):
        """Sharding of a per-row array [rows, ...]: rows split as the rule set splits the batch."""
        return self.partitioner.sharding(("act_batch",) + (None,) * (ndim - 1))

    @property
    def row_multiple(self) -> int:
        """Slot and prefill row counts are multiples of this (the batch axis' mesh size)."""
        return self.partitioner.data_parallel_size

    def _cache_shardings(self):
        abstract = jax.eval_shape(lambda: init_cache(self.config, 1, 1))
        logical = jax.tree_util.tree_map(lambda axes: PartitionSpec(*axes), cache_logical_axes(abstract),
                                         is_leaf=lambda x: isinstance(x, tuple))
        return self.partitioner.shardings_for(logical, optimizer_subtree=None)

    def _store_sharding(self):
        """The prefix block store's sharding: heads split like the cache's, blocks on every data shard."""
        return self.partitioner.sharding(("layers", None, "act_heads", None, "head_dim"))

    def _build_programs(self):
        p, cache = self.partitioner, self._cache_shardings()
        r1, r2, r3 = (self.rows_sharding(n) for n in (1, 2, 3))
        # The adapter pool is replicated (it is small: a prefix of the pool's tree, whatever slots it has).
        pool, store = p.sharding(()), self._store_sharding()
        self._cache_sh, self._pool_sh, self._store_sh = cache, pool, store
        self._prefill = p.jit(self._prefill_fn, in_shardings=(self.param_shardings, pool, cache, r1, r2, r1, None, r1),
                              out_shardings=(cache, r2), static_argnums=(8,), donate_argnums=(2,))
        self._pick = p.jit(self._pick_fn, in_shardings=(r2, r2, r2), out_shardings=(r1, r1, r2, r2),
                           static_argnums=(3,))
        self._decode = p.jit(self._decode_fn, in_shardings=(self.param_shardings, pool, cache, r2, r2, None, None),
                             out_shardings=(cache, r2, r2, r3, r3, r1), static_argnums=(7, 8), donate_argnums=(2,))
        self._score = p.jit(self._score_fn, in_shardings=(self.param_shardings, pool, r2, r2, r1),
                            out_shardings=(r2, r2, r3, r3), static_argnums=(5,))
        self._write_slot = p.jit(_write_slot, in_shardings=(pool, None, pool), out_shardings=pool,
                                 donate_argnums=(0,))
        self._restore = p.jit(_restore_blocks, in_shardings=(cache, store, None, None, None), out_shardings=cache,
                              donate_argnums=(0,))
        self._save = p.jit(_save_blocks, in_shardings=(store, cache, None, None), out_shardings=store,
                           donate_argnums=(0,))
        self._zeros = {}

    def _note_shape(self, key: tuple) -> None:
        if key in self._shapes:
            return
        self._shapes.add(key)
        self.stats["programs"] += 1
        if self.serving:
            self.stats["compiled_while_serving"] += 1
            logging.warning("compiling a new %s program %s while serving; warm the engine up to avoid this stall",
                            key[0], key[1:])

    def new_cache(self, slots: int, cache_len: int):
        """A zero cache for `slots` rows of `cache_len` columns plus the decode scratch column, laid out on the mesh."""
        key = (slots, cache_len)
        if key not in self._zeros:
            def zeros():
                tree = init_cache(self.config, slots, cache_len + 1)
                return {**tree, "index": jnp.asarray(cache_len, jnp.int32)}

            self._zeros[key] = self.partitioner.jit(zeros, out_shardings=self._cache_sh)
        return self._zeros[key]()

    # -- the adapter pool -----------------------------------------------------------------

    def reserve_adapters(self, slots: int, rank: int) -> None:
        """Adds an adapter pool of `slots` adapters of rank <= `rank` (every target, zeros: no slot adapts
        anything until `write_adapter`), in the compute dtype, replicated on the mesh. Once per runner."""
        if self.adapter_slots:
            raise ValueError("this runner already has an adapter pool")
        if slots < 1 or rank < 1:
            raise ValueError(f"an adapter pool needs slots >= 1 and rank >= 1, got {slots} and {rank}")
        dtype = resolve_dtype(self.config.dtype)
        shapes = {t: tuple(jax.ShapeDtypeStruct(s, dtype) for s in pair)
                  for t, pair in pool_shapes(self.config, slots, rank).items()}
        abstract = pool_tree(shapes)
        self.adapter_pool = self.partitioner.jit(
            lambda: jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), abstract),
            out_shardings=self._pool_sh)()
        self.adapter_slots, self.adapter_rank = int(slots), int(rank)

    def write_adapter(self, slot: int, entry) -> None:
        """Fills pool slot `slot` with one adapter (`gptj.model.lora.pool_entry`: host arrays, every target).
        Its one program is not counted with the serving programs: it delays only the load that needs it."""
        if not 0 <= slot < self.adapter_slots:
            raise ValueError(f"adapter slot {slot} outside the pool's {self.adapter_slots} slots")
        dtype = resolve_dtype(self.config.dtype)
        entry = jax.tree_util.tree_map(lambda x: np.asarray(x, np.float32), entry)
        entry = place(entry, jax.tree_util.tree_map(lambda _: self._pool_sh, entry), dtype)
        self.adapter_pool = self._write_slot(self.adapter_pool, jnp.asarray(slot, jnp.int32), entry)

    def fingerprint(self) -> str:
        """The `gptj.weights.source.fingerprint` of the base weights held ("" for quantized weights, whose
        values are not those an adapter was trained over); computed once."""
        if self._fingerprint is None:
            self._fingerprint = "" if self.config.quant_bits else fingerprint(self.params)
        return self._fingerprint

    def _variables(self, params, pool) -> dict:
        """The model's variables: its params, and the adapter pool when there is one."""
        return {"params": params, ADAPTER_POOL: pool} if pool else {"params": params}

    # -- prefix blocks ---------------------------------------------------------------------

    def new_prefix_store(self, blocks: int, block_size: int):
        """A zero block store for `blocks` blocks of `block_size` positions: {"key", "value"} each
        [layers, blocks, heads, block_size, head_dim] in the compute dtype, laid out on the mesh."""
        cfg = self.config
        shape = (cfg.num_layers, int(blocks), cfg.num_heads, int(block_size), cfg.head_dim)
        dtype = resolve_dtype(cfg.dtype)
        return self.partitioner.jit(lambda: {"key": jnp.zeros(shape, dtype), "value": jnp.zeros(shape, dtype)},
                                    out_shardings=self._store_sh)()

    def restore_prefix(self, cache, store, slot: int, blocks: np.ndarray, count: int):
        """Copies store block `blocks[i]` into slot `slot`'s i-th block of columns (one entry per block of a row:
        cache columns // block size; an id past the store's blocks keeps the slot's own); the slot's columns
        below `count` blocks become its only attended ones. Returns the cache."""
        self._note_shape(("restore_prefix", cache["key_mask"].shape, store["key"].shape))
        return self._restore(cache, store, jnp.asarray(slot, jnp.int32), jnp.asarray(blocks, jnp.int32),
                             jnp.asarray(count, jnp.int32))

    def save_prefix(self, store, cache, slot: int, blocks: np.ndarray):
        """Copies slot `slot`'s i-th block of columns into store block `blocks[i]` (an id past the store's
        blocks skips it); returns the store."""
        self._note_shape(("save_prefix", cache["key_mask"].shape, store["key"].shape))
        return self._save(store, cache, jnp.asarray(slot, jnp.int32), jnp.asarray(blocks, jnp.int32))

    # -- traced bodies ------------------------------------------------------------------

    def _pick_fn(self, logits, rows, rows_f, num_top: int):
        """Each row's next token and log-probabilities from its logits [rows, V] and settings."""
        seeds = jax.lax.bitcast_convert_type(rows[:, SEED], jnp.uint32)
        keys = row_keys(seeds, rows[:, STEP])
        banned = jnp.where(rows[:, STEP] < rows[:, MIN_TOKENS], rows[:, EOS], -1)
        return pick_tokens(logits, keys, rows_f[:, TEMPERATURE], rows[:, TOP_K], rows_f[:, TOP_P], self.vocab_limit,
                           num_top, banned)

    def _prefill_fn(self, params, pool, cache, slot_ids, tokens, lengths, start, adapter_ids, logit_rows: int):
        """Writes tokens [k, T] (the first `lengths[i]` real) at columns start.. of slots `slot_ids`, row i
        through adapter slot `adapter_ids[i]` (-1: none).

        Slot ids past the cache's rows are padding: read as the last row, never
        written back. Returns the cache and the logits [logit_rows, V] at each
        row's last real position (zero rows below k): the next-token
        distribution of the rows whose prompt this chunk ends. Sampling is a
        separate program (`_pick_fn`), so the many prefill shapes compile
        without it.
        """
        k, length = tokens.shape
        gather = lambda x: jnp.take(x, slot_ids, axis=1, mode="clip")
        columns = jnp.arange(cache["key_mask"].shape[1])
        sub = {"cached_key": gather(cache["cached_key"]), "cached_value": gather(cache["cached_value"]),
               # Columns at or past the cursor belong to nothing yet (or to the slot's last occupant).
               "key_mask": jnp.take(cache["key_mask"], slot_ids, axis=0, mode="clip") & (columns < start),
               "index": start}
        sub = jax.lax.with_sharding_constraint(sub, self._cache_sh)
        positions = start + jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (k, length))
        mask = jnp.arange(length)[None, :] < lengths[:, None]
        hidden, variables = self._decoder.apply({**self._variables(params, pool), "cache": sub}, tokens, positions,
                                                mask, mutable=["cache"], return_hidden=True, adapter_ids=adapter_ids)
        written = variables["cache"]
        last = jnp.take_along_axis(hidden, jnp.maximum(lengths - 1, 0)[:, None, None], axis=1)[:, 0]
        logits = output_logits(last, params["lm_head_kernel"], params["lm_head_bias"], self.config)
        scatter = lambda full, part: full.at[:, slot_ids].set(part, mode="drop")
        cache = {"cached_key": scatter(cache["cached_key"], written["cached_key"]),
                 "cached_value": scatter(cache["cached_value"], written["cached_value"]),
                 "key_mask": cache["key_mask"].at[slot_ids].set(written["key_mask"], mode="drop"),
                 "index": cache["index"]}
        return cache, jnp.pad(logits, ((0, logit_rows - k), (0, 0)))

    def _decode_fn(self, params, pool, cache, rows, rows_f, num_steps, stop_early, max_steps: int, num_top: int):
        """Up to `num_steps` (<= max_steps) tokens for every slot with tokens remaining.

        rows [S, ROW_FIELDS] int32 (TOKEN is the token to feed at POS, STEP its
        index in the row's output, REMAINING the tokens still wanted: 0 for an
        idle slot; ADAPTER its adapter slot), rows_f [S, 2]. The loop ends early when every row is done,
        or, with `stop_early`, as soon as any row finishes (a waiting request
        can then take its slot). Returns the cache, tokens / log-probs / top
        [S, max_steps(, num_top)] and how many of them each row produced.
        """
        slots = rows.shape[0]
        cache_len = cache["key_mask"].shape[1] - 1
        arange = jnp.arange(slots)
        outputs = (jnp.zeros((slots, max_steps), jnp.int32), jnp.zeros((slots, max_steps), jnp.float32),
                   jnp.zeros((slots, max_steps, num_top), jnp.int32),
                   jnp.zeros((slots, max_steps, num_top), jnp.float32))

        def cond(carry):
            step, _, rows, _, _, finished_any = carry
            going = (step < jnp.minimum(num_steps, max_steps)) & jnp.any(rows[:, REMAINING] > 0)
            return going & ~(stop_early & finished_any)

        def body(carry):
            step, cache, rows, outputs, produced, _ = carry
            live = rows[:, REMAINING] > 0
            logits, variables = self._decoder.apply(
                {**self._variables(params, pool), "cache": {**cache, "index": jnp.asarray(cache_len, jnp.int32)}},
                rows[:, TOKEN, None], rows[:, POS, None], jnp.ones((slots, 1), bool), mutable=["cache"],
                adapter_ids=rows[:, ADAPTER])
            written = variables["cache"]
            # The model wrote every row's new key/value into the scratch column; move each live
            # row's to its own column (idle and prefilling slots are left alone: index out of range).
            target = jnp.where(live, rows[:, POS], cache_len + 1)
            move = lambda full: full.at[:, arange, :, target, :].set(jnp.moveaxis(full[:, :, :, cache_len, :], 1, 0),
                                                                     mode="drop")
            cache = {"cached_key": move(written["cached_key"]), "cached_value": move(written["cached_value"]),
                     "key_mask": cache["key_mask"].at[arange, target].set(True, mode="drop"), "index": cache["index"]}
            token, token_lp, top_ids, top_lps = self._pick_fn(logits[:, 0], rows, rows_f, num_top)
            put = lambda buf, value: jax.lax.dynamic_update_index_in_dim(buf, value, step, axis=1)
            outputs = (put(outputs[0], jnp.where(live, token, 0)), put(outputs[1], jnp.where(live, token_lp, 0.0)),
                       put(outputs[2], top_ids), put(outputs[3], top_lps))
            remaining = jnp.where(live & (token != rows[:, EOS]), rows[:, REMAINING] - 1, 0)
            finished = live & (remaining == 0)
            advance = live.astype(jnp.int32)
            rows = rows.at[:, TOKEN].set(jnp.where(live, token, rows[:, TOKEN]))
            rows = rows.at[:, POS].add(advance).at[:, STEP].add(advance).at[:, REMAINING].set(remaining)
            return step + 1, cache, rows, outputs, produced + advance, jnp.any(finished)

        carry = (jnp.zeros((), jnp.int32), cache, rows, outputs, jnp.zeros((slots,), jnp.int32),
                 jnp.zeros((), bool))
        _, cache, _, outputs, produced, _ = jax.lax.while_loop(cond, body, carry)
        return (cache,) + outputs + (produced,)

    def _score_fn(self, params, pool, tokens, mask, adapter_ids, num_top: int):
        """Each position's next-token log-prob, greedy flag and top `num_top`, from the head applied chunk by
        chunk of tokens (`model.score_targets`): the [rows, length, vocab] logits never exist at once."""
        hidden = self._model.apply(self._variables(params, pool), tokens, None, mask, return_hidden=True,
                                   adapter_ids=adapter_ids)
        scores = score_targets(hidden[:, :-1], params["lm_head_kernel"], params["lm_head_bias"], tokens[:, 1:],
                               self._score_config, top_k=num_top)
        return tuple(scores)

    # -- host entry points --------------------------------------------------------------

    def prefill(self, cache, slot_ids: np.ndarray, tokens: np.ndarray, lengths: np.ndarray, start: int,
                logit_rows: int, adapter_ids: np.ndarray | None = None):
        """Runs one prefill chunk (host arrays as `_prefill_fn` takes them; `adapter_ids` default none);
        returns the new cache and the last positions' logits [logit_rows, V], left on the device for `pick`."""
        self._note_shape(("prefill", cache["key_mask"].shape, tokens.shape, logit_rows))
        r1, r2 = self.rows_sharding(1), self.rows_sharding(2)
        if adapter_ids is None:
            adapter_ids = np.full(len(slot_ids), NO_ADAPTER, np.int32)
        self.stats["prefill_calls"] += 1
        return self._prefill(self.params, self.adapter_pool, cache, place(slot_ids, r1), place(tokens, r2),
                             place(lengths, r1), jnp.asarray(start, jnp.int32),
                             place(np.asarray(adapter_ids, np.int32), r1), logit_rows)

    def pick(self, logits, rows: np.ndarray, rows_f: np.ndarray, num_top: int) -> list[np.ndarray]:
        """Draws each row's next token from its logits (on the device) and settings; returns numpy
        (token, log-prob, top ids, top log-probs)."""
        self._note_shape(("pick", logits.shape, num_top))
        r2 = self.rows_sharding(2)
        return [to_host(x) for x in self._pick(logits, place(rows, r2), place(rows_f, r2), num_top)]

    def decode(self, cache, rows: np.ndarray, rows_f: np.ndarray, num_steps: int, stop_early: bool,
               max_steps: int, num_top: int):
        """Runs up to `num_steps` decode steps for every slot; returns the new cache and numpy
        (tokens, log-probs, top ids, top log-probs, produced)."""
        self._note_shape(("decode", cache["key_mask"].shape, max_steps, num_top))
        r2 = self.rows_sharding(2)
        self.stats["decode_calls"] += 1
        cache, *outs = self._decode(self.params, self.adapter_pool, cache, place(rows, r2), place(rows_f, r2),
                                    jnp.asarray(num_steps, jnp.int32), jnp.asarray(stop_early, bool), max_steps,
                                    num_top)
        return cache, [to_host(x) for x in outs]

    def check_tokens(self, sequences: Sequence[Sequence[int]]) -> list[list[int]]:
        """The sequences as int lists; raises ValueError for an empty one or an id outside the vocabulary."""
        if isinstance(sequences, (str, bytes)) or not len(sequences):
            raise ValueError("prompts must be a non-empty list of token-id lists")
        out = []
        for i, sequence in enumerate(sequences):
            ids = [int(t) for t in sequence]
            if not ids:
                raise ValueError(f"prompt {i} is empty; every prompt needs at least one token")
            if min(ids) < 0 or max(ids) >= self.vocab_limit:
                raise ValueError(f"prompt {i} has token ids outside [0, {self.vocab_limit})")
            out.append(ids)
        return out

    def row_bucket(self, n: int) -> int:
        """`n` rows rounded up to a power of two and to a multiple of the batch axis' mesh size."""
        size, multiple = bucket(n), self.row_multiple
        return -(-size // multiple) * multiple

    def score(self, sequences: Sequence[Sequence[int]], *, top_logprobs: int = 0,
              adapter_ids: Sequence[int] | None = None) -> list[Score]:
        """Log-probability of each sequence's tokens given the tokens before them (one forward pass);
        sequence i through adapter slot `adapter_ids[i]` (default none)."""
        sequences = self.check_tokens(sequences)
        if not 0 <= top_logprobs <= MAX_TOP_LOGPROBS:
            raise ValueError(f"top_logprobs must be in [0, {MAX_TOP_LOGPROBS}], got {top_logprobs}")
        longest = max(len(s) for s in sequences)
        if longest > self.config.max_len:
            raise ValueError(f"a sequence of {longest} tokens exceeds the model's context of {self.config.max_len}")
        n, batch = len(sequences), self.row_bucket(len(sequences))
        length = bucket(longest, MIN_LENGTH_BUCKET, self.config.max_len)
        tokens = np.zeros((batch, length), np.int32)
        mask = np.zeros((batch, length), bool)
        for i, seq in enumerate(sequences):
            tokens[i, :len(seq)] = seq
            mask[i, :len(seq)] = True
        mask[n:, 0] = True
        ids = np.full(batch, NO_ADAPTER, np.int32)
        if adapter_ids is not None:
            ids[:n] = adapter_ids
        num_top = MAX_TOP_LOGPROBS if top_logprobs else 0
        self._note_shape(("score", tokens.shape, num_top))
        self.stats["score_calls"] += 1
        r2 = self.rows_sharding(2)
        outs = self._score(self.params, self.adapter_pool, place(tokens, r2), place(mask, r2),
                           place(ids, self.rows_sharding(1)), num_top)
        target_lp, greedy, top_ids, top_lps = (to_host(x) for x in outs)
        scores = []
        for i, seq in enumerate(sequences):
            count = len(seq) - 1
            top = None
            if top_logprobs:
                top = [None] + [list(zip(top_ids[i, j, :top_logprobs].tolist(), top_lps[i, j, :top_logprobs].tolist()))
                                for j in range(count)]
            scores.append(Score(list(seq), [None] + target_lp[i, :count].tolist(),
                                [None] + greedy[i, :count].tolist(), top))
        return scores


# -- traced bodies of the pool and prefix-store programs (no model in them) -----------------------------


def _write_slot(pool, slot, entry):
    """The pool with slot `slot` (of axis 1, after the layers) replaced by `entry` (one adapter, every target)."""
    return jax.tree_util.tree_map(
        lambda full, one: jax.lax.dynamic_update_index_in_dim(full, one.astype(full.dtype), slot, axis=1), pool, entry)


def _slot_blocks(full, slot, blocks: int, block_size: int):
    """Slot `slot`'s first blocks x block_size columns of a cache tensor [layers, slots, heads, columns, head_dim],
    as blocks [layers, blocks, heads, block_size, head_dim]."""
    row = jax.lax.dynamic_index_in_dim(full, slot, axis=1, keepdims=False)[:, :, :blocks * block_size]
    layers, heads, _, head_dim = row.shape
    return jnp.moveaxis(row.reshape(layers, heads, blocks, block_size, head_dim), 2, 1)


def _restore_blocks(cache, store, slot, block_ids, count):
    """The cache with store block `block_ids[i]` in slot `slot`'s i-th block of columns (an id past the store's
    blocks keeps the slot's own), and its columns below `count` blocks attended, no others (its key_mask);
    a slot past the cache's rows changes nothing. See ModelRunner.restore_prefix."""
    blocks, block_size = block_ids.shape[0], store["key"].shape[3]
    width = blocks * block_size
    copy = jnp.repeat(block_ids < store["key"].shape[1], block_size)  # per column: from the store

    def one(full, stored):
        got = jnp.take(stored, block_ids, axis=1, mode="clip")  # [layers, blocks, heads, block_size, head_dim]
        layers, _, heads, _, head_dim = got.shape
        got = jnp.moveaxis(got, 1, 2).reshape(layers, heads, width, head_dim)
        row = jax.lax.dynamic_index_in_dim(full, slot, axis=1, keepdims=False)
        row = row.at[:, :, :width].set(jnp.where(copy[None, None, :, None], got.astype(row.dtype), row[:, :, :width]))
        return full.at[:, slot].set(row, mode="drop")

    columns = jnp.arange(cache["key_mask"].shape[1])
    mask = cache["key_mask"].at[slot].set(columns < count * block_size, mode="drop")
    return {"cached_key": one(cache["cached_key"], store["key"]),
            "cached_value": one(cache["cached_value"], store["value"]), "key_mask": mask, "index": cache["index"]}


def _save_blocks(store, cache, slot, block_ids):
    """The store with slot `slot`'s i-th block of columns at block `block_ids[i]` (out of range: skipped)."""
    blocks, block_size = block_ids.shape[0], store["key"].shape[3]
    return {name: store[name].at[:, block_ids].set(
                _slot_blocks(cache[key], slot, blocks, block_size).astype(store[name].dtype), mode="drop")
            for name, key in (("key", "cached_key"), ("value", "cached_value"))}
