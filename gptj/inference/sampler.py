"""Generation and scoring for one model: the `Sampler` API over the decode engine.

    sampler = Sampler(model_config, params, partitioner, tokenizer=tok)
    outs = sampler.generate([[15496, 995], [464]], max_new_tokens=32, temperature=0.8, top_p=0.9,
                            seed=0, stop=["\\n\\n"])          # -> list[Generation]
    outs = sampler.complete(["Hello world"], max_new_tokens=32)  # text in, Generation out
    scores = sampler.score([[15496, 995, 11]], top_logprobs=1)   # -> list[Score]

`generate` runs its prompts through a private `gptj.inference.engine.Engine` with one
slot per prompt: prompts of any lengths share the engine, each row at its own
positions, so every row decodes exactly as it would alone. Temperature,
top-k, top-p, `max_new_tokens`, seed and stop strings are per row (a scalar
applies to every row). Randomness is per row: row i draws its step-s token
from `fold_in(PRNGKey(seed_i), s)`, so a request's sample does not depend on
what it shares the engine with. The server (`gptj.inference.server`) runs one long-lived
engine over the same `ModelRunner`.

Ids past the tokenizer's vocabulary (GPT-J-6B pads its 50257 GPT-2 tokens to
50400) are never generated, and carry no probability in any log-prob returned.
"""

from __future__ import annotations

import json
import sys
from typing import Any, Callable, Sequence

import jax
import numpy as np

from gptj.core.partitioning import Partitioner
from gptj.inference.engine import GENERATE, Engine, Job
from gptj.inference.runner import GPT2_EOS_ID, MIN_LENGTH_BUCKET, Generation, ModelRunner, Score, default_vocab_limit
from gptj.inference.sampling_ops import bucket
from gptj.model.transformer import GPTJConfig
from gptj.settings import RunSettings
from gptj.weights.source import load_for_inference


def _per_row(value, n: int, name: str, kind=float) -> list:
    """A scalar broadcast to n rows, or a per-row sequence checked for length."""
    if isinstance(value, (list, tuple, np.ndarray)):
        if len(value) != n:
            raise ValueError(f"{name}: {len(value)} values for {n} prompts")
        return [kind(v) for v in value]
    return [kind(value)] * n


def encode_text(tokenizer, text: str) -> list[int]:
    """Token ids of `text`; a ValueError naming the problem for text that is not valid Unicode.

    A JSON string may hold a lone surrogate ("\\ud83d"), which is no character
    and which the tokenizer would reject with an unrelated TypeError.
    """
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"text is not valid Unicode ({e.reason} at character {e.start})") from None
    return tokenizer.encode(text)


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
        between (stop strings, streaming); otherwise a generation's decoding
        is one call.
      prefill_chunk: most prompt tokens per prefill call (longer prompts are
        prefilled in chunks).
      vocab_limit: ids at or past it are never generated; default the
        tokenizer's vocabulary size when the model's is larger
        (`gptj.inference.runner.default_vocab_limit`).
    """

    def __init__(self, model_config: GPTJConfig, params: Any, partitioner: Partitioner | None = None, *,
                 tokenizer: Any = None, eos_id: int | None = -1, chunk_steps: int = 16, prefill_chunk: int = 512,
                 vocab_limit: int | None = None):
        self.tokenizer = tokenizer
        self.runner = ModelRunner(model_config, params, partitioner,
                                  vocab_limit=vocab_limit or default_vocab_limit(model_config, tokenizer))
        if eos_id == -1:
            eos_id = GPT2_EOS_ID if model_config.vocab_size > GPT2_EOS_ID else None
        self.eos_id = eos_id
        self.chunk_steps = max(1, int(chunk_steps))
        self.prefill_chunk = max(1, int(prefill_chunk))
        self._generate_calls = 0

    @property
    def config(self) -> GPTJConfig:
        return self.runner.config

    @property
    def params(self):
        return self.runner.params

    @property
    def partitioner(self) -> Partitioner:
        return self.runner.partitioner

    @property
    def stats(self) -> dict:
        """Calls made so far: generate, and the runner's prefill / decode / score programs."""
        return {"generate_calls": self._generate_calls, **self.runner.stats}

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
        with the finished one).
        """
        prompts = self.runner.check_tokens(prompts)
        n = len(prompts)
        max_new = _per_row(max_new_tokens, n, "max_new_tokens", int)
        if stop and isinstance(stop[0], str):
            stops = [list(stop)] * n
        else:
            stops = [list(s or []) for s in (stop or [[]] * n)]
            if len(stops) != n:
                raise ValueError(f"stop: {len(stops)} lists for {n} prompts")
        for i, (prompt, new) in enumerate(zip(prompts, max_new)):
            if len(prompt) + new > self.config.max_len:
                raise ValueError(f"prompt {i} has {len(prompt)} tokens; with max_new_tokens={new} that "
                                 f"exceeds the model's context of {self.config.max_len} tokens")
        eos = self.eos_id if eos_id == -1 else eos_id
        settings = zip(max_new, _per_row(temperature, n, "temperature"), _per_row(top_k, n, "top_k", int),
                       _per_row(top_p, n, "top_p"), _per_row(seed, n, "seed", int), stops)
        jobs = [Job(GENERATE, prompt, max_new_tokens=new, temperature=t, top_k=k, top_p=p, seed=s, stop=row_stops,
                    top_logprobs=int(top_logprobs), eos_id=eos,
                    on_update=None if callback is None else (lambda gen, i=i: callback(i, gen)))
                for i, (prompt, (new, t, k, p, s, row_stops)) in enumerate(zip(prompts, settings))]
        # Offline, every row is admitted at once: each gets a slot (slots bucketed like the lengths), and
        # a decode call runs to the end unless the host must look in between (stop strings, a listener).
        watching = callback is not None or any(stops)
        # Columns per row: the prompt and generation lengths each rounded up to a power of two, so that
        # requests of similar sizes share programs without attending over many empty columns.
        cache_len = min(bucket(max(len(p) for p in prompts), MIN_LENGTH_BUCKET) +
                        bucket(max(max_new), MIN_LENGTH_BUCKET), self.config.max_len)
        engine = Engine(self.runner, slots=self.runner.row_bucket(n), max_queue=n, tokenizer=self.tokenizer,
                        eos_id=eos, cache_len=cache_len,
                        prefill_chunk=self.prefill_chunk,
                        decode_steps=self.chunk_steps if watching else bucket(max(max_new), MIN_LENGTH_BUCKET,
                                                                              self.config.max_len))
        for i, job in enumerate(jobs):
            try:
                engine.check(job)
            except ValueError as e:
                raise ValueError(f"prompt {i}: {e}") from None
        self._generate_calls += 1
        engine.submit(jobs)
        engine.run_until_idle()
        return [job.future.result() for job in jobs]

    def complete(self, texts: Sequence[str], **kwargs) -> list[Generation]:
        """`generate` for text prompts (needs a tokenizer); keyword arguments as for `generate`."""
        if self.tokenizer is None:
            raise ValueError("complete() needs a tokenizer; build the Sampler with tokenizer=")
        return self.generate([encode_text(self.tokenizer, t) for t in texts], **kwargs)

    def score(self, sequences: Sequence[Sequence[int]], *, top_logprobs: int = 0) -> list[Score]:
        """Log-probability of each sequence's tokens given the tokens before them (one forward pass).

        This is OpenAI's `echo` + `logprobs` with `max_tokens=0`, which
        lm-evaluation-harness uses for loglikelihood.
        """
        return self.runner.score(sequences, top_logprobs=top_logprobs)


# --------------------------------------------------------------------------------------
# Tokenizer, weights and the `--mode=sample` entry point
# --------------------------------------------------------------------------------------


def get_tokenizer():
    """The project's GPT-2 BPE tokenizer (`gptj.data.vocab`: offline, no TensorFlow)."""
    from gptj.data import vocab

    return vocab.get_tokenizer()


def build_sampler(config, workdir: str | None) -> Sampler:
    """A Sampler for a run config (ConfigDict or RunSettings): mesh from its `mesh` section, weights as
    `gptj.weights.source.load_for_inference` finds them."""
    settings = RunSettings.from_config(config)
    partitioner = Partitioner.from_config(settings.mesh, fold_stages=True)  # no pipeline
    params, model_config = load_for_inference(settings, workdir, partitioner)
    return Sampler(model_config, params, partitioner, tokenizer=get_tokenizer(),
                   chunk_steps=settings.sample.chunk_steps)


def sample_main(config, workdir: str | None, prompt: str | None = None, prompt_file: str | None = None,
                output: str | None = None) -> list[dict]:
    """`python main.py --mode=sample`: completes `prompt` or each line of `prompt_file`.

    Prints each completion; with `output`, also writes JSON lines
    {"prompt", "completion", "token_ids"}. Returns the records.
    """
    from gptj.errors import ConfigError

    if (prompt is None) == (prompt_file is None):
        raise ConfigError("give exactly one of --prompt or --prompt_file")
    if prompt_file is not None:
        try:
            with open(prompt_file) as f:
                prompts = [line.rstrip("\n") for line in f if line.strip()]
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"--prompt_file: {e}") from None
        if not prompts:
            raise ConfigError(f"--prompt_file {prompt_file} holds no prompts")
    elif not prompt:
        raise ConfigError("--prompt is empty")
    else:
        prompts = [prompt]
    settings = RunSettings.from_config(config)
    sample = settings.sample
    sampler = build_sampler(settings, workdir)
    records = []
    batch_size = max(1, sample.batch_size)
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start:start + batch_size]
        try:
            outs = sampler.complete(chunk, max_new_tokens=sample.max_new_tokens, temperature=sample.temperature,
                                    top_k=sample.top_k, top_p=sample.top_p,
                                    seed=[sample.seed + start + i for i in range(len(chunk))])
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
