"""lm-evaluation-harness over a sharded gptj model, and the `--mode=eval` entry point.

`GPTJLM` is an `lm_eval.api.model.LM` (through `TemplateLM`, so tokenising a
(context, continuation) pair and the empty-context rule are the harness's
own): it answers `loglikelihood`, `loglikelihood_rolling` and
`generate_until` with the same token-level conventions as the harness's `hf`
model, so that scores can be compared with it one for one.

How requests run:
- every request becomes one row of at most `max_len` input tokens, cut from the
  left as the `hf` model cuts it (`(context + continuation)[-(max_len + 1):][:-1]`);
- rows are sorted into length buckets (powers of two from `min_bucket`, capped at
  `max_len`) and padded on the right to their bucket, in batches of a fixed size
  that the mesh's data axis divides (batch over `data`, as the rule set says);
- the transformer runs once per batch (one compiled program per length bucket),
  and the vocabulary head only at the positions the requests score (a second,
  small program), which skips most of the head's work for short continuations;
- what comes back is per-row sums (log-probability, all-greedy), not logits,
  fully replicated, so every host reads the same few bytes.

Generation goes through `gptj.inference.sampler.Sampler` (KV cache, stop strings), with
the `hf` model's context truncation and stop-string cut.

Entry points: `load_lm` (an LM over a params directory or workdir),
`run_harness` and `HarnessHook` (the tasks from the trainer every N steps).
`python main.py --mode=eval` is `gptj.evaluation.evaluate`.

Several hosts: every host must hold the same requests (the harness builds them
deterministically on each host) and calls the model together; inputs are built
from the same host-local arrays everywhere and outputs are replicated, so every
host gets the same answers. Only process 0 writes files.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax.sharding import NamedSharding, PartitionSpec
from lm_eval.api.model import TemplateLM

from gptj.core.partitioning import Partitioner, place
from gptj.core.trainer import Hook
from gptj.errors import EvalError
from gptj.inference.sampling_ops import bucket
from gptj.model.transformer import GPTJ, GPTJConfig, score_targets
from gptj.settings import RunSettings
from gptj.weights.source import open_weights, param_shardings

EOT_ID = 50256  # GPT-2's <|endoftext|>: the prefix of empty contexts and rolling windows
DEFAULT_MAX_GEN_TOKS = 256  # the harness's `hf` model default


@dataclasses.dataclass(frozen=True)
class _Row:
    """One scoring row: `inputs` fed to the model, log-probs read for the last `n_scored` targets."""

    inputs: list[int]
    targets: list[int]
    n_scored: int


class GPTJLM(TemplateLM):
    """An lm-evaluation-harness model over gptj params laid out on a mesh.

    Args:
      params: the model's params: jax arrays (any sharding; they stay where they are) or numpy arrays
        (placed by the partitioner's rule set).
      model_config: their `GPTJConfig` (sets the context length `max_len`).
      partitioner: the mesh and rule set the params live on.
      tokenizer: GPT-2 BPE with `encode(str) -> list[int]` and `decode(list[int]) -> str`.
      batch_size: rows per compiled call, rounded up to a multiple of the data-parallel size.
      max_gen_toks: default generation budget when a task names none (the harness's 256).
      min_bucket: the shortest padded length.
    """

    def __init__(self, params, model_config: GPTJConfig, partitioner: Partitioner, tokenizer, *,
                 batch_size: int = 8, max_gen_toks: int = DEFAULT_MAX_GEN_TOKS, min_bucket: int = 16):
        super().__init__()
        if batch_size <= 0:
            raise EvalError(f"eval batch_size must be positive, got {batch_size}")
        self.params = _place_params(params, model_config, partitioner)
        self.model_config = model_config
        self.partitioner = partitioner
        self.tokenizer = tokenizer
        dp = partitioner.data_parallel_size
        self.rows_per_batch = -(-batch_size // dp) * dp
        self._max_gen_toks = max_gen_toks
        self.min_bucket = min(min_bucket, model_config.max_len)
        self._build_scorer()
        self._sampler = None

    # -- the harness's interface ---------------------------------------------------

    @property
    def eot_token_id(self) -> int:
        return EOT_ID

    @property
    def max_length(self) -> int:
        return self.model_config.max_len

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def tokenizer_name(self) -> str:
        return "gpt2"

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        """GPT-2 BPE ids; GPT-2 adds no special tokens, so `add_special_tokens` changes nothing."""
        return list(self.tokenizer.encode(string))

    def tok_decode(self, tokens: Sequence[int]) -> str:
        return self.tokenizer.decode([int(t) for t in tokens if t != EOT_ID])

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """Scores `((context, continuation), context_ids, continuation_ids)` requests.

        Returns `(log p(continuation | context), continuation is the greedy output)` per request.
        """
        rows = []
        for _, context_ids, continuation_ids in requests:
            if not continuation_ids:
                raise EvalError("a loglikelihood request has an empty continuation (nothing to score)")
            if len(continuation_ids) > self.max_length:
                raise EvalError(f"a continuation of {len(continuation_ids)} tokens is longer than the model's "
                                f"context ({self.max_length} tokens); it cannot be scored")
            whole = (list(context_ids) + list(continuation_ids))[-(self.max_length + 1):]
            rows.append(_Row(whole[:-1], whole[1:], len(continuation_ids)))
        scores = self.score_rows(rows, progress=not disable_tqdm)
        for (request, _, _), answer in zip(requests, scores):
            if request is not None:  # rolling windows carry no request key; the harness caches their sum
                self.cache_hook.add_partial("loglikelihood", request, answer)
        return scores

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of whole documents, in disjoint windows of at most `max_len` predictions.

        Windows are the harness's own (`get_rolling_token_windows` with the EOT
        prefix and one token of context), so every token is predicted once,
        with as much context as fits.
        """
        from lm_eval import utils as lm_utils

        windows, owners = [], []
        for index, request in enumerate(requests):
            (text,) = request.args
            for context, continuation in map(lm_utils.make_disjoint_window, lm_utils.get_rolling_token_windows(
                    token_list=self.tok_encode(text), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)):
                windows.append((None, context, continuation))
                owners.append(index)
        totals = [0.0] * len(requests)
        for owner, (logprob, _) in zip(owners, self._loglikelihood_tokens(windows)):
            totals[owner] += logprob
        for request, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy (or sampled, when a task asks) continuations, cut at the first stop string.

        As with the harness's `hf` model: contexts are cut from the left to
        leave room for `max_gen_toks`, EOT always stops a row, and the text is
        cut at the first occurrence of any `until` string.
        """
        from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text

        eot_text = self.tokenizer.decode([EOT_ID])
        groups: dict[str, list[int]] = {}
        for index, request in enumerate(requests):
            groups.setdefault(json.dumps(request.args[1], sort_keys=True, default=str), []).append(index)
        results: list[str | None] = [None] * len(requests)
        for indices in groups.values():
            kwargs = normalize_gen_kwargs(requests[indices[0]].args[1], self.max_gen_toks)
            until = handle_stop_sequences(kwargs.pop("until", None), eos=eot_text)
            max_new = int(kwargs.pop("max_gen_toks"))
            if max_new >= self.max_length:
                raise EvalError(f"a task asks for {max_new} generated tokens, but the model's context is only "
                                f"{self.max_length} tokens")
            budget = self.max_length - max_new
            prompts = [self.tok_encode(requests[i].args[0])[-budget:] for i in indices]
            outputs = self._generate(prompts, max_new, until, kwargs)
            for i, tokens in zip(indices, outputs):
                text = postprocess_generated_text(self.tok_decode(tokens), until, None)
                results[i] = text
                self.cache_hook.add_partial("generate_until", requests[i].args, text)
        return results

    # -- scoring -------------------------------------------------------------------

    def _build_scorer(self):
        """Two compiled programs: the trunk per padded length, the head per (length, scored width).

        The trunk returns the final hidden states (`ln_f`'s output, captured;
        the model's own head is then dead code and XLA drops it). The head
        runs only at the few positions a request scores (a LAMBADA word is 1-3
        of a few hundred tokens), which skips most of the vocabulary matmul.
        Splitting keeps the expensive compiles to one per length bucket.
        """
        cfg = self.model_config
        model = GPTJ(cfg)
        replicated = NamedSharding(self.partitioner.mesh, PartitionSpec())
        shardings = jax.tree_util.tree_map(lambda x: x.sharding, self.params)

        def trunk(params, inputs):
            # Right padding never reaches real positions (attention is causal).
            return model.apply({"params": params}, inputs, return_hidden=True)

        def head(kernel, bias, hidden, index, targets, scored):
            # The model's own head, at the gathered positions only: [B, C, D], chunk by chunk of tokens.
            picked = jnp.take_along_axis(hidden, index[..., None], axis=1)
            scores = score_targets(picked, kernel, bias, targets, cfg)
            logprob = jnp.sum(jnp.where(scored, scores.logprobs, 0.0), axis=-1)
            greedy = jnp.all(scores.greedy | ~scored, axis=-1)
            return logprob, greedy

        b2, b3 = self.partitioner.batch_sharding(2), self.partitioner.batch_sharding(3)
        self._trunk = self.partitioner.jit(trunk, in_shardings=(shardings, b2), out_shardings=b3)
        self._head = self.partitioner.jit(
            head, in_shardings=(shardings["lm_head_kernel"], shardings["lm_head_bias"], b3, b2, b2, b2),
            out_shardings=(replicated, replicated))

    def _global(self, array: np.ndarray) -> jax.Array:
        """A global batch array from the same host-local numpy array on every host."""
        return place(array, self.partitioner.batch_sharding(array.ndim))

    def score_rows(self, rows: Sequence[_Row], progress: bool = False) -> list[tuple[float, bool]]:
        """(sum of log-probs of each row's scored targets, all of them greedy) for each row, in order.

        Rows are bucketed by length (and by how many positions they score),
        padded on the right, and run in batches of `rows_per_batch`, the last
        batch of a bucket padded with empty rows. `progress` shows a bar on process 0.
        """
        from tqdm import tqdm

        bar = tqdm(total=len(rows), desc="Scoring requests", disable=not progress or jax.process_index() != 0)
        groups: dict[tuple[int, int], list[int]] = {}
        for index, row in enumerate(rows):
            length = bucket(len(row.inputs), self.min_bucket, self.max_length)
            groups.setdefault((length, bucket(row.n_scored, 1, length)), []).append(index)
        out: list[tuple[float, bool] | None] = [None] * len(rows)
        width = self.rows_per_batch
        for (length, scored_width), members in sorted(groups.items(), reverse=True):
            members.sort(key=lambda i: -len(rows[i].inputs))
            for start in range(0, len(members), width):
                chunk = members[start:start + width]
                inputs = np.zeros((width, length), np.int32)
                index = np.zeros((width, scored_width), np.int32)
                targets = np.zeros((width, scored_width), np.int32)
                scored = np.zeros((width, scored_width), bool)
                for slot, i in enumerate(chunk):
                    row = rows[i]
                    n, k = len(row.inputs), row.n_scored
                    inputs[slot, :n] = row.inputs
                    # The last `scored_width` positions of the row, its scored ones at the end.
                    first = n - scored_width
                    index[slot] = np.maximum(np.arange(first, n), 0)
                    targets[slot, scored_width - k:] = row.targets[n - k:]
                    scored[slot, scored_width - k:] = True
                hidden = self._trunk(self.params, self._global(inputs))
                logprob, greedy = self._head(self.params["lm_head_kernel"], self.params["lm_head_bias"], hidden,
                                             self._global(index), self._global(targets), self._global(scored))
                logprob, greedy = np.asarray(logprob), np.asarray(greedy)
                for slot, i in enumerate(chunk):
                    out[i] = (float(logprob[slot]), bool(greedy[slot]))
                bar.update(len(chunk))
        bar.close()
        return out

    def set_params(self, params) -> None:
        """Points the LM at new params of the same shapes and shardings (training moved on); the compiled
        scoring programs are kept, the sampler is rebuilt when next needed."""
        self.params = _place_params(params, self.model_config, self.partitioner)
        self._sampler = None

    # -- generation ----------------------------------------------------------------

    def _generate(self, prompts: list[list[int]], max_new_tokens: int, stop: list[str],
                  kwargs: dict[str, Any]) -> list[list[int]]:
        """New tokens for each prompt (EOT and anything after it removed), greedy unless `do_sample`.

        Prompts run longest first in batches of `rows_per_batch`, through
        `gptj.inference.sampler.Sampler` (KV cache, stop strings checked as it decodes).
        """
        from gptj.inference.sampler import Sampler

        if self._sampler is None:
            self._sampler = Sampler(self.model_config, self.params, self.partitioner, tokenizer=self.tokenizer,
                                    eos_id=EOT_ID)
        sampled = bool(kwargs.get("do_sample", False))
        options = dict(temperature=float(kwargs.get("temperature", 1.0)) if sampled else 0.0,
                       top_k=int(kwargs.get("top_k", 0) or 0), top_p=float(kwargs.get("top_p", 1.0) or 1.0))
        order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
        outputs: list[list[int]] = [[] for _ in prompts]
        for start in range(0, len(order), self.rows_per_batch):
            chunk = order[start:start + self.rows_per_batch]
            # An empty context is conditioned on EOT, as for loglikelihood.
            batch = [prompts[i] or [EOT_ID] for i in chunk]
            generations = self._sampler.generate(batch, max_new_tokens=max_new_tokens, stop=stop,
                                                 seed=[start + j for j in range(len(chunk))], **options)
            for i, generation in zip(chunk, generations):
                outputs[i] = list(generation.tokens)
        return outputs


# -- building a model, and the entry points ----------------------------------------------


def get_tokenizer():
    """The project's GPT-2 BPE (`gptj.data.vocab`, offline)."""
    from gptj.data.vocab import get_tokenizer as _get

    return _get()


def load_lm(path: str, partitioner: Partitioner, *, batch_size: int = 8, dtype: str | None = None,
            **kwargs) -> GPTJLM:
    """A GPTJLM over the params of a gptj params directory or workdir, laid out by `partitioner`.

    `dtype` overrides the compute dtype stored with the weights (e.g. bfloat16).
    """
    weights = open_weights(path)
    model_config = weights.config.replace(dtype=dtype) if dtype else weights.config
    params = weights.place(param_shardings(model_config, partitioner))
    return GPTJLM(params, model_config, partitioner, get_tokenizer(), batch_size=batch_size, **kwargs)


def _place_params(params, model_config: GPTJConfig, partitioner: Partitioner):
    """Params on the mesh in the compute dtype; jax arrays already laid out (live training params) stay put."""
    if all(isinstance(x, jax.Array) for x in jax.tree_util.tree_leaves(params)):
        return params
    return place(params, param_shardings(model_config, partitioner), jnp.dtype(model_config.dtype))


def run_harness(lm_or_params, config, *, model_config: GPTJConfig | None = None,
                partitioner: Partitioner | None = None, workdir: str | None = None,
                tag: str | None = None) -> dict[str, float]:
    """Runs the `eval.harness_tasks` of `config` (a ConfigDict or RunSettings) and returns flat metrics `{"harness/<task>/<metric>": value}`.

    For the trainer's periodic evaluation: pass the live params with their
    `model_config` and `partitioner` (or a ready GPTJLM). Every host must call
    it together. With `workdir`, process 0 also writes the results JSON under
    `workdir/eval/` (named by `tag`, e.g. "step_1000"). Raises EvalError for an
    unknown task or data that is not on the machine; `eval_tasks.load_tasks`
    checks that up front.
    """
    from gptj.evaluation import harness_tasks as eval_tasks

    section = RunSettings.from_config(config).eval
    if isinstance(lm_or_params, GPTJLM):
        lm = lm_or_params
    else:
        if model_config is None or partitioner is None:
            raise EvalError("run_harness(params, ...) needs model_config= and partitioner=")
        lm = GPTJLM(lm_or_params, model_config, partitioner, get_tokenizer(), batch_size=section.batch_size)
    results = eval_tasks.run_tasks(lm, list(section.harness_tasks), include_path=section.include_path,
                                   num_fewshot=section.num_fewshot, limit=section.limit,
                                   bootstrap_iters=section.bootstrap_iters, log_samples=section.log_samples)
    if workdir and jax.process_index() == 0:
        eval_tasks.write_results(results, os.path.join(workdir, "eval"), tag)
    return eval_tasks.flatten_metrics(results)


class HarnessHook(Hook):
    """The harness during training: the settings' `eval.harness_tasks` every `every` steps and when training ends.

    Scores go to the metric writer as `harness/<task>/<metric>` at the step
    they measure; process 0 also writes `workdir/eval/results_step_<N>.json`.
    The tasks and their data are checked when the hook is built, so a wrong
    name or missing data stops the run before its first step (EvalError).
    The LM (and its compiled programs) is built once and re-pointed at the
    current params each time. `params_of(state)` gives the plain parameter
    tree to score (default: state["params"]; a run that freezes parameters
    or trains LoRA adapters passes one that joins the frozen base and merges
    the adapters).
    """

    def __init__(self, config, model_config: GPTJConfig, partitioner: Partitioner, writer, workdir: str,
                 every: int, throughput=None, params_of: Callable[[Any], Any] | None = None):
        from gptj.evaluation import harness_tasks as eval_tasks

        self.settings = RunSettings.from_config(config)
        self.model_config = model_config
        self.partitioner = partitioner
        self.writer = writer
        self.workdir = workdir
        self.every = every
        self.throughput = throughput
        self.params_of = params_of or (lambda state: state["params"])
        eval_tasks.load_tasks(list(self.settings.eval.harness_tasks), self.settings.eval.include_path)
        self._lm: GPTJLM | None = None
        self.last_step: int | None = None

    def on_step(self, step, state, metrics):
        if self.every and step % self.every == 0:
            self._run(step, state)

    def on_end(self, step, state, status):
        if status == "completed" and self.last_step != step:
            self._run(step, state)

    def _run(self, step: int, state) -> None:
        import contextlib

        jax.block_until_ready(state["params"])  # train steps in flight count as training time
        with self.throughput.paused() if self.throughput else contextlib.nullcontext():
            params = self.params_of(state)
            if self._lm is None:
                self._lm = GPTJLM(params, self.model_config, self.partitioner, get_tokenizer(),
                                  batch_size=self.settings.eval.batch_size)
            else:
                self._lm.set_params(params)
            scalars = run_harness(self._lm, self.settings, workdir=self.workdir, tag=f"step_{step}")
        self.writer.write_scalars(step, scalars)
        logging.info("harness at step %d: %s", step, ", ".join(f"{k} {v:.4g}" for k, v in sorted(scalars.items())))
        self.last_step = step
