"""Generation with a sharded KV cache: prefill once, then one compiled decode loop.

Entry points:

    sampler = Sampler(model_config, params, partitioner, tokenizer=tok)
    outs = sampler.generate([[15496, 995], [464]], max_new_tokens=32, temperature=0.8, top_p=0.9,
                            seed=0, stop=["\\n\\n"])          # -> list[Generation]
    outs = sampler.complete(["Hello world"], max_new_tokens=32)  # text in, Generation out
    scores = sampler.score([[15496, 995, 11]], top_logprobs=1)   # -> list[Score]

A batch of prompts of different lengths is left-padded to a common length;
each row carries its own positions (0 at its first real token) and a token
mask, so every row decodes exactly as it would alone. Temperature, top-k,
top-p, `max_new_tokens`, seed and stop strings are per row (a scalar applies
to every row), which is what lets the server batch unrelated requests.

Shapes are bucketed (batch, prompt length and generation length rounded up to
powers of two) so a server compiles a handful of programs, not one per
request. The cache is laid out by the partitioner's rule set (batch over
`data`, heads over `model`), its dtype is the model's compute dtype (bf16
when the config says so), and the decode loop donates it.

Randomness is per row: row i draws step s from `fold_in(PRNGKey(seed_i), s)`,
so a request's sample does not depend on what it was batched with.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import flax.linen as nn
from flax import struct
from jax.sharding import PartitionSpec

from gptj.model import GPTJ, GPTJConfig, cache_logical_axes, init_cache
from gptj.partitioning import Partitioner, make_mesh, place
from gptj.weights import load_for_inference, param_shardings
from gptj.sampling_ops import bucket, sample_tokens

# Smallest prompt / generation buckets: shorter requests share one program.
MIN_LENGTH_BUCKET = 16
# Tokens kept per position when top log-probabilities are requested (OpenAI allows up to 5).
MAX_TOP_LOGPROBS = 5
GPT2_EOS_ID = 50256


# --------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------


@dataclasses.dataclass
class Generation:
    """One row's output. `tokens` excludes the EOS token and anything after a stop string.

    `logprobs[i]` is log p(tokens[i] | prefix) under the model's unmodified
    distribution (temperature 1, no filtering). `top_logprobs[i]` lists the
    (token id, log-prob) pairs of the most likely tokens at that step when
    requested. `finish_reason` is "stop" (EOS or a stop string) or "length".
    `text` is the decoded completion, cut before the stop string, when the
    sampler has a tokenizer.
    """

    tokens: list[int]
    logprobs: list[float]
    finish_reason: str | None
    text: str | None = None
    top_logprobs: list[list[tuple[int, float]]] | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


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


@struct.dataclass
class DecodeState:
    """Everything the decode loop carries between compiled calls (all on device)."""

    cache: Any
    tokens: jax.Array        # [B, G] generated token ids
    logprobs: jax.Array      # [B, G] their log-probs
    top_ids: jax.Array       # [B, G, K]
    top_lps: jax.Array       # [B, G, K]
    lengths: jax.Array       # [B] generated tokens per row (an EOS included)
    prompt_lengths: jax.Array  # [B]
    done: jax.Array          # [B]
    step: jax.Array          # () tokens generated so far (rows move in lockstep)
    keys: jax.Array          # [B, 2] per-row PRNG keys
    temperature: jax.Array   # [B]
    top_k: jax.Array         # [B]
    top_p: jax.Array         # [B]
    max_new: jax.Array       # [B]
    eos_id: jax.Array        # () -1 for none


def _per_row(value, n: int, name: str, kind=float) -> list:
    """A scalar broadcast to n rows, or a per-row sequence checked for length."""
    if isinstance(value, (list, tuple, np.ndarray)):
        if len(value) != n:
            raise ValueError(f"{name}: {len(value)} values for {n} prompts")
        return [kind(v) for v in value]
    return [kind(value)] * n


def _to_host(x) -> np.ndarray:
    """A numpy copy of a (possibly multi-host sharded) array."""
    if getattr(x, "is_fully_addressable", True):
        return np.asarray(jax.device_get(x))
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def _top_logprobs(log_probs, num_top: int):
    """(ids, log-probs) of the `num_top` likeliest tokens per position; empty arrays when 0."""
    if not num_top:
        empty = log_probs.shape[:-1] + (0,)
        return jnp.zeros(empty, jnp.int32), jnp.zeros(empty, jnp.float32)
    top_lps, top_ids = jax.lax.top_k(log_probs, num_top)
    return top_ids.astype(jnp.int32), top_lps


class Sampler:
    """Batched generation and scoring for one GPT-J model on a (possibly sharded) mesh.

    Args:
      model_config: the model's GPTJConfig. When its compute dtype differs
        from `param_dtype`, params are cast to the compute dtype once (inference
        keeps no fp32 master copy), which halves their memory in bf16.
      params: the parameter tree (numpy, or jax arrays laid out any way).
      partitioner: mesh + rule set; default a 1x1 mesh on the first device.
      tokenizer: optional, with `encode(str) -> list[int]` and `decode(ids) -> str`;
        needed for stop strings, `Generation.text` and `complete`.
      eos_id: token that ends a row (default 50256 for GPT-2-vocabulary
        models, else none); `generate(eos_id=...)` overrides it per call.
      chunk_steps: decode steps per compiled call when the host must look in
        between (stop strings, streaming); otherwise the loop runs to the end
        in one call.
    """

    def __init__(self, model_config: GPTJConfig, params: Any, partitioner: Partitioner | None = None, *,
                 tokenizer: Any = None, eos_id: int | None = -1, chunk_steps: int = 16):
        if model_config.dtype != model_config.param_dtype:
            model_config = model_config.replace(param_dtype=model_config.dtype)
        self.config = model_config
        self.partitioner = partitioner or Partitioner(make_mesh(1, 1, devices=jax.devices()[:1]), "megatron")
        self.tokenizer = tokenizer
        if eos_id == -1:
            eos_id = GPT2_EOS_ID if model_config.vocab_size > GPT2_EOS_ID else None
        self.eos_id = eos_id
        self.chunk_steps = max(1, int(chunk_steps))
        self.stats = {"generate_calls": 0, "decode_calls": 0, "score_calls": 0}

        self.param_shardings = param_shardings(model_config, self.partitioner)
        self.params = place(nn.meta.unbox(params), self.param_shardings, jnp.dtype(model_config.param_dtype))
        self._model = GPTJ(model_config)
        self._decoder = GPTJ(model_config, decode=True)
        self._build_programs()

    # -- shardings and compiled programs ------------------------------------------------

    def _batch_sharding(self, ndim: int):
        return self.partitioner.sharding(("act_batch",) + (None,) * (ndim - 1))

    def _state_shardings(self):
        cache_abstract = jax.eval_shape(lambda: init_cache(self.config, 1, 1))
        logical = jax.tree_util.tree_map(lambda axes: PartitionSpec(*axes), cache_logical_axes(cache_abstract),
                                         is_leaf=lambda x: isinstance(x, tuple))
        cache = self.partitioner.shardings_for(logical, optimizer_subtree=None)
        b1, b2, b3 = (self._batch_sharding(n) for n in (1, 2, 3))
        replicated = self.partitioner.sharding(())
        return DecodeState(cache=cache, tokens=b2, logprobs=b2, top_ids=b3, top_lps=b3, lengths=b1,
                           prompt_lengths=b1, done=b1, step=replicated, keys=b2, temperature=b1, top_k=b1,
                           top_p=b1, max_new=b1, eos_id=replicated)

    def _build_programs(self):
        p = self.partitioner
        state_sh = self._state_shardings()
        b1, b2 = self._batch_sharding(1), self._batch_sharding(2)
        self._state_sh = state_sh
        self._prefill = p.jit(self._prefill_fn, in_shardings=(self.param_shardings, b2, b2, b2, b1, b1, b1, b1, b1, b1, None),
                              out_shardings=state_sh, static_argnums=(11, 12))
        self._decode = p.jit(self._decode_fn, in_shardings=(self.param_shardings, state_sh, None),
                             out_shardings=state_sh, donate_argnums=(1,))
        self._score = p.jit(self._score_fn, in_shardings=(self.param_shardings, b2, b2),
                            out_shardings=(b2, b2, self._batch_sharding(3), self._batch_sharding(3)),
                            static_argnums=(3,))

    def _pick(self, logits, state: DecodeState, step, num_top: int):
        """Samples the step's token per row and computes its log-prob (and the top log-probs)."""
        keys = jax.vmap(lambda k: jax.random.fold_in(k, step))(state.keys)
        token = sample_tokens(logits, keys, state.temperature, state.top_k, state.top_p)
        log_probs = jax.nn.log_softmax(logits, axis=-1)
        token_lp = jnp.take_along_axis(log_probs, token[:, None], axis=-1)[:, 0]
        return (token, token_lp) + _top_logprobs(log_probs, num_top)

    def _record(self, state: DecodeState, step, token, token_lp, top_ids, top_lps) -> DecodeState:
        """Writes step `step`'s tokens for rows still running and advances `done`/`lengths`."""
        live = ~state.done
        token = jnp.where(live, token, 0)
        put = lambda buf, val: jax.lax.dynamic_update_index_in_dim(buf, val, step, axis=1)
        finished = (token == state.eos_id) | (step + 1 >= state.max_new)
        return state.replace(
            tokens=put(state.tokens, token), logprobs=put(state.logprobs, jnp.where(live, token_lp, 0.0)),
            top_ids=put(state.top_ids, top_ids), top_lps=put(state.top_lps, top_lps),
            lengths=jnp.where(live, step + 1, state.lengths), done=state.done | (live & finished),
            step=step + 1)

    def _prefill_fn(self, params, tokens, positions, mask, prompt_lengths, seeds, temperature, top_k, top_p,
                    max_new, eos_id, gen_len: int, num_top: int) -> DecodeState:
        batch, prompt_len = tokens.shape
        cache = jax.lax.with_sharding_constraint(init_cache(self.config, batch, prompt_len + gen_len),
                                                 self._state_sh.cache)
        # All but the last prompt token only fill the cache: their logits are never
        # used, so XLA drops the [B, P, vocab] head (most of a short prefill's work and
        # memory). The last token (real in every row, as rows are left-padded) then
        # gives the first next-token distribution.
        if prompt_len > 1:
            _, variables = self._decoder.apply({"params": params, "cache": cache}, tokens[:, :-1],
                                               positions[:, :-1], mask[:, :-1], mutable=["cache"])
            cache = variables["cache"]
        logits, variables = self._decoder.apply({"params": params, "cache": cache}, tokens[:, -1:], positions[:, -1:],
                                                mask[:, -1:], mutable=["cache"])
        keys = jax.vmap(lambda s: jax.random.PRNGKey(s))(seeds)
        f32 = lambda *shape: jnp.zeros(shape, jnp.float32)
        i32 = lambda *shape: jnp.zeros(shape, jnp.int32)
        state = DecodeState(
            cache=variables["cache"], tokens=i32(batch, gen_len), logprobs=f32(batch, gen_len),
            top_ids=i32(batch, gen_len, num_top), top_lps=f32(batch, gen_len, num_top), lengths=i32(batch),
            prompt_lengths=prompt_lengths, done=max_new <= 0, step=jnp.zeros((), jnp.int32), keys=keys,
            temperature=temperature, top_k=top_k, top_p=top_p, max_new=max_new, eos_id=eos_id)
        picked = self._pick(logits[:, -1], state, 0, num_top)
        return self._record(state, jnp.zeros((), jnp.int32), *picked)

    def _decode_fn(self, params, state: DecodeState, num_steps) -> DecodeState:
        gen_len, num_top = state.tokens.shape[1], state.top_ids.shape[2]
        limit = jnp.minimum(state.step + num_steps, gen_len)

        def cond(s: DecodeState):
            return (s.step < limit) & ~jnp.all(s.done)

        def body(s: DecodeState):
            step = s.step
            last = jax.lax.dynamic_index_in_dim(s.tokens, step - 1, axis=1, keepdims=True)
            positions = (s.prompt_lengths + step - 1)[:, None]
            mask = jnp.ones_like(last, dtype=bool)
            logits, variables = self._decoder.apply({"params": params, "cache": s.cache}, last, positions, mask,
                                                    mutable=["cache"])
            s = s.replace(cache=variables["cache"])
            return self._record(s, step, *self._pick(logits[:, 0], s, step, num_top))

        return jax.lax.while_loop(cond, body, state)

    def _score_fn(self, params, tokens, mask, num_top: int):
        logits = self._model.apply({"params": params}, tokens, None, mask)
        log_probs = jax.nn.log_softmax(logits[:, :-1], axis=-1)
        targets = tokens[:, 1:]
        target_lp = jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]
        greedy = jnp.argmax(log_probs, axis=-1) == targets
        return (target_lp, greedy) + _top_logprobs(log_probs, num_top)

    # -- public API -------------------------------------------------------------------

    def _batch_bucket(self, n: int) -> int:
        dp = self.partitioner.data_parallel_size
        size = bucket(n)
        return -(-size // dp) * dp

    def _check_prompts(self, prompts: Sequence[Sequence[int]]) -> list[list[int]]:
        if isinstance(prompts, (str, bytes)) or not len(prompts):
            raise ValueError("prompts must be a non-empty list of token-id lists")
        out = []
        for i, prompt in enumerate(prompts):
            ids = [int(t) for t in prompt]
            if not ids:
                raise ValueError(f"prompt {i} is empty; every prompt needs at least one token")
            if min(ids) < 0 or max(ids) >= self.config.vocab_size:
                raise ValueError(f"prompt {i} has token ids outside [0, {self.config.vocab_size})")
            out.append(ids)
        return out

    def generate(self, prompts: Sequence[Sequence[int]], *, max_new_tokens: int | Sequence[int] = 64,
                 temperature: float | Sequence[float] = 0.0, top_k: int | Sequence[int] = 0,
                 top_p: float | Sequence[float] = 1.0, seed: int | Sequence[int] = 0,
                 stop: Sequence[str] | Sequence[Sequence[str]] | None = None, eos_id: int | None = -1,
                 top_logprobs: int = 0,
                 callback: Callable[[int, Generation], None] | None = None) -> list[Generation]:
        """Completes each prompt (a list of token ids); returns one Generation per prompt, in order.

        Every sampling argument is a scalar for all rows or a sequence with one
        value per prompt; `stop` is a list of strings for all rows or one list
        per row (needs a tokenizer). temperature 0 is greedy. `eos_id` -1 keeps
        the sampler's default, None disables EOS. `top_logprobs` (<= 5) adds
        that many most likely tokens per step. `callback(row, generation)` is
        called with each row's partial result as decoding proceeds (and once
        with the finished one), which is how the server streams.
        """
        prompts = self._check_prompts(prompts)
        n = len(prompts)
        max_new = _per_row(max_new_tokens, n, "max_new_tokens", int)
        temps = _per_row(temperature, n, "temperature")
        ks = _per_row(top_k, n, "top_k", int)
        ps = _per_row(top_p, n, "top_p")
        seeds = _per_row(seed, n, "seed", int)
        if stop and isinstance(stop[0], str):
            stops = [list(stop)] * n
        else:
            stops = [list(s or []) for s in (stop or [[]] * n)]
            if len(stops) != n:
                raise ValueError(f"stop: {len(stops)} lists for {n} prompts")
        if any(stops) and self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer; build the Sampler with tokenizer=")
        if not 0 <= top_logprobs <= MAX_TOP_LOGPROBS:
            raise ValueError(f"top_logprobs must be in [0, {MAX_TOP_LOGPROBS}], got {top_logprobs}")
        for i in range(n):
            if max_new[i] < 0:
                raise ValueError(f"max_new_tokens must be >= 0, got {max_new[i]}")
            if temps[i] < 0 or not np.isfinite(temps[i]):
                raise ValueError(f"temperature must be a finite number >= 0, got {temps[i]}")
            if not 0.0 < ps[i] <= 1.0:
                raise ValueError(f"top_p must be in (0, 1], got {ps[i]}")
            if ks[i] < 0:
                raise ValueError(f"top_k must be >= 0 (0 disables it), got {ks[i]}")
            if len(prompts[i]) + max_new[i] > self.config.max_len:
                raise ValueError(f"prompt {i} has {len(prompts[i])} tokens; with max_new_tokens={max_new[i]} that "
                                 f"exceeds the model's context of {self.config.max_len} tokens")
        eos = self.eos_id if eos_id == -1 else eos_id
        if all(m == 0 for m in max_new):
            return [Generation([], [], "length", "" if self.tokenizer else None, [] if top_logprobs else None)
                    for _ in prompts]

        batch = self._batch_bucket(n)
        prompt_len = bucket(max(len(p) for p in prompts), MIN_LENGTH_BUCKET, self.config.max_len)
        gen_len = bucket(max(max_new), MIN_LENGTH_BUCKET, self.config.max_len)
        tokens = np.zeros((batch, prompt_len), np.int32)
        mask = np.zeros((batch, prompt_len), bool)
        lengths = np.ones((batch,), np.int32)
        for i, prompt in enumerate(prompts):
            tokens[i, prompt_len - len(prompt):] = prompt
            mask[i, prompt_len - len(prompt):] = True
            lengths[i] = len(prompt)
        mask[n:, -1] = True  # padding rows: one real token so nothing is fully masked
        positions = np.maximum(np.arange(prompt_len)[None, :] - (prompt_len - lengths)[:, None], 0).astype(np.int32)
        pad = lambda values, fill, dtype: np.asarray(list(values) + [fill] * (batch - n), dtype)
        b1, b2 = self._batch_sharding(1), self._batch_sharding(2)
        num_top = MAX_TOP_LOGPROBS if top_logprobs else 0
        args = (
            place(tokens, b2), place(positions, b2), place(mask, b2), place(lengths, b1),
            place(pad([s & 0xFFFFFFFF for s in seeds], 0, np.uint32), b1), place(pad(temps, 0.0, np.float32), b1),
            place(pad(ks, 0, np.int32), b1), place(pad(ps, 1.0, np.float32), b1), place(pad(max_new, 0, np.int32), b1),
            jnp.asarray(-1 if eos is None else eos, jnp.int32))
        self.stats["generate_calls"] += 1
        state = self._prefill(self.params, *args, gen_len, num_top)

        # Without stop strings or a listener the whole loop is one call; otherwise
        # the host looks in every chunk_steps steps to stop rows and report progress.
        watching = callback is not None or any(stops)
        results: list[Generation | None] = [None] * n
        while True:
            if watching:
                self._inspect(state, results, stops, eos, top_logprobs, callback)
                finished = [r.finished for r in results]
                if all(finished):
                    break
                state = state.replace(done=place(np.array(finished + [True] * (batch - n)), b1))
            elif bool(_to_host(state.done).all()):
                break
            self.stats["decode_calls"] += 1
            state = self._decode(self.params, state, jnp.asarray(self.chunk_steps if watching else gen_len, jnp.int32))
        if not watching:
            self._inspect(state, results, stops, eos, top_logprobs, None)
        return results  # type: ignore[return-value]

    def _inspect(self, state: DecodeState, results: list, stops: list[list[str]], eos: int | None,
                 top_logprobs: int, callback) -> None:
        """Turns the device state into per-row Generations, applying EOS and stop strings."""
        tokens, logprobs, lengths, done = (_to_host(x) for x in (state.tokens, state.logprobs, state.lengths,
                                                                 state.done))
        top_ids = top_lps = None
        if top_logprobs:
            top_ids, top_lps = _to_host(state.top_ids), _to_host(state.top_lps)
        for row in range(len(results)):
            if results[row] is not None and results[row].finished:
                continue
            count = int(lengths[row])
            ids = tokens[row, :count].tolist()
            reason = "length" if done[row] else None
            if ids and eos is not None and ids[-1] == eos and done[row]:
                ids, reason = ids[:-1], "stop"
            text = None
            if self.tokenizer is not None:
                text = self.tokenizer.decode(ids)
                cut = _find_stop(text, stops[row])
                if cut is not None:
                    ids = _tokens_covering(self.tokenizer, ids, cut)
                    text, reason = text[:cut], "stop"
            top = None
            if top_logprobs:
                top = [list(zip(top_ids[row, i, :top_logprobs].tolist(), top_lps[row, i, :top_logprobs].tolist()))
                       for i in range(len(ids))]
            results[row] = Generation(ids, logprobs[row, :len(ids)].tolist(), reason, text, top)
            if callback is not None:
                callback(row, results[row])

    def complete(self, texts: Sequence[str], **kwargs) -> list[Generation]:
        """`generate` for text prompts (needs a tokenizer); keyword arguments as for `generate`."""
        if self.tokenizer is None:
            raise ValueError("complete() needs a tokenizer; build the Sampler with tokenizer=")
        return self.generate([self.tokenizer.encode(t) for t in texts], **kwargs)

    def score(self, sequences: Sequence[Sequence[int]], *, top_logprobs: int = 0) -> list[Score]:
        """Log-probability of each sequence's tokens given the tokens before them (one forward pass).

        This is OpenAI's `echo` + `logprobs` with `max_tokens=0`, which
        lm-evaluation-harness uses for loglikelihood.
        """
        sequences = self._check_prompts(sequences)
        if not 0 <= top_logprobs <= MAX_TOP_LOGPROBS:
            raise ValueError(f"top_logprobs must be in [0, {MAX_TOP_LOGPROBS}], got {top_logprobs}")
        longest = max(len(s) for s in sequences)
        if longest > self.config.max_len:
            raise ValueError(f"a sequence of {longest} tokens exceeds the model's context of {self.config.max_len}")
        n, batch = len(sequences), self._batch_bucket(len(sequences))
        length = bucket(longest, MIN_LENGTH_BUCKET, self.config.max_len)
        tokens = np.zeros((batch, length), np.int32)
        mask = np.zeros((batch, length), bool)
        for i, seq in enumerate(sequences):
            tokens[i, :len(seq)] = seq
            mask[i, :len(seq)] = True
        mask[n:, 0] = True
        b2 = self._batch_sharding(2)
        num_top = MAX_TOP_LOGPROBS if top_logprobs else 0
        self.stats["score_calls"] += 1
        outs = self._score(self.params, place(tokens, b2), place(mask, b2), num_top)
        target_lp, greedy, top_ids, top_lps = (_to_host(x) for x in outs)
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


def _find_stop(text: str, stops: Sequence[str]) -> int | None:
    """Index of the earliest stop string in `text`, or None."""
    hits = [text.find(s) for s in stops if s]
    hits = [h for h in hits if h >= 0]
    return min(hits) if hits else None


def _tokens_covering(tokenizer, ids: list[int], chars: int) -> list[int]:
    """The shortest prefix of `ids` whose text reaches `chars` characters (the tokens before a stop string)."""
    for count in range(len(ids) + 1):
        if len(tokenizer.decode(ids[:count])) >= chars:
            return ids[:count]
    return ids


# --------------------------------------------------------------------------------------
# Tokenizer, weights and the `--mode=sample` entry point
# --------------------------------------------------------------------------------------


def get_tokenizer():
    """The project's GPT-2 BPE tokenizer (`gptj.vocab`: offline, no TensorFlow)."""
    from gptj import vocab

    return vocab.get_tokenizer()


def build_sampler(config, workdir: str | None) -> Sampler:
    """A Sampler for a run config: mesh from `config.mesh`, weights as `gptj.weights.load_for_inference` finds them."""
    partitioner = Partitioner.from_config(config.mesh)
    params, model_config = load_for_inference(config, workdir, partitioner)
    return Sampler(model_config, params, partitioner, tokenizer=get_tokenizer(),
                   chunk_steps=int(config.sample.chunk_steps))


def sample_main(config, workdir: str | None, prompt: str | None = None, prompt_file: str | None = None,
                output: str | None = None) -> list[dict]:
    """`python main.py --mode=sample`: completes `prompt` or each line of `prompt_file`.

    Prints each completion; with `output`, also writes JSON lines
    {"prompt", "completion", "token_ids"}. Returns the records.
    """
    from gptj.config_validation import ConfigError

    if (prompt is None) == (prompt_file is None):
        raise ConfigError("give exactly one of --prompt or --prompt_file")
    if prompt_file is not None:
        try:
            with open(prompt_file) as f:
                prompts = [line.rstrip("\n") for line in f if line.strip()]
        except OSError as e:
            raise ConfigError(f"--prompt_file: {e}") from None
        if not prompts:
            raise ConfigError(f"--prompt_file {prompt_file} holds no prompts")
    elif not prompt:
        raise ConfigError("--prompt is empty")
    else:
        prompts = [prompt]
    sample = config.sample
    sampler = build_sampler(config, workdir)
    records = []
    batch_size = max(1, int(sample.batch_size))
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start:start + batch_size]
        try:
            outs = sampler.complete(chunk, max_new_tokens=int(sample.max_new_tokens),
                                    temperature=float(sample.temperature), top_k=int(sample.top_k),
                                    top_p=float(sample.top_p),
                                    seed=[int(sample.seed) + start + i for i in range(len(chunk))])
        except ValueError as e:  # a prompt too long for the context, a setting out of range
            raise ConfigError(f"sample: {e}") from None
        for text, out in zip(chunk, outs):
            records.append({"prompt": text, "completion": out.text, "token_ids": out.tokens})
            if jax.process_index() == 0:
                print(f"{text}{out.text}\n" + "-" * 40, file=sys.stdout, flush=True)
    if output and jax.process_index() == 0:
        with open(output, "w") as f:
            for record in records:
                f.write(json.dumps(record) + "\n")
    return records
