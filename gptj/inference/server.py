"""HTTP server (FastAPI + uvicorn): OpenAI completions and chat completions, the reference's /complete, health
and metrics.

    python main.py --config=... --workdir=... --mode=serve [--port=5000]

Endpoints:
  POST /v1/completions  OpenAI completions: prompt (string, list of strings, token ids or lists of them),
                        max_tokens, temperature, top_p, top_k, n, stop, seed, stream (server-sent events),
                        stream_options, logprobs (<= 5), echo, and vLLM's ignore_eos and min_tokens.
                        echo + logprobs + max_tokens 0 returns the prompt tokens' log-probabilities (how
                        lm-evaluation-harness's `local-completions` scores), from the head applied chunk by
                        chunk of tokens (`model.score_targets`).
  POST /v1/chat/completions  OpenAI chat completions: messages rendered by the chat template
                        (`config.serve.chat_template`, `gptj.inference.chat`), max_tokens /
                        max_completion_tokens, the sampling fields above, logprobs / top_logprobs.
  POST /complete        mesh-transformer-jax's API: {"context", "top_p", "temp"} -> {"completion"}.
  GET  /v1/models       the base model and each loaded LoRA adapter (`parent`: the base).
  POST /v1/load_lora_adapter {"lora_name", "lora_path"}, POST /v1/unload_lora_adapter {"lora_name"}: vLLM's
                        runtime adapter endpoints (`gptj.inference.adapters`); unloading waits for the rows
                        using the adapter.
  GET  /health (engine state, adapters, prefix cache, counters), GET /metrics (Prometheus text: gptj_* and the
                        vLLM names of the gauges, counters and histograms that have an equivalent here).
  GET  /tokenizer_info, POST /tokenize, POST /detokenize: vLLM's tokenizer endpoints, so lm-eval's
                        `tokenizer_backend=remote` (auto-detected) needs no tokenizer files of its own.
  GET  /openapi.json    the schema of all of the above, errors included.

Requests run on one `gptj.inference.engine.Engine` (continuous batching over `config.serve.max_batch_size`
slots). A request's `model` names the base (`config.serve.model_name`, or left out) or a loaded adapter
(`CompletionService.resolve_model`); rows of every adapter and of the base decode together. Every error is
a JSON body {"error": {"message", "type", "param", "code"}}: 400 for anything the client got wrong, 404
for a model (adapter) not served here, 429 when more rows wait than `max_queue`, 500 only for a server
fault; no request can stop the server.

Streaming sends each token as its own event (at most `config.serve.stream_interval` tokens per event),
even when one engine step decoded several; text that a stop string might still cover, or that ends inside
a character, waits for the tokens that settle it. With `stream_options.include_usage` the last event
before [DONE] carries the usage and no choices. A client that disconnects frees its slots at the
engine's next step.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import random
import time
import uuid
from typing import Any, AsyncIterator

from gptj.data.vocab import EOT_TOKEN
from gptj.errors import AdapterError, UnknownAdapterError
from gptj.inference.adapters import adapter_pool_size, parse_adapter_specs
from gptj.inference.chat import ChatTemplate, ChatTemplateError
from gptj.inference.engine import GENERATE, SCORE, Engine, Job, QueueFull
from gptj.inference.runner import Generation, Score
from gptj.inference.sampler import encode_text
from gptj.inference.schema import (ChatCompletionRequest, ChatCompletionResponse, CompleteRequest, CompleteResponse,
                                   CompletionRequest, CompletionResponse, DetokenizeResponse, HealthResponse,
                                   LoadLoraAdapterRequest, ModelList, SamplingFields, TokenizeRequest,
                                   TokenizeResponse, TokenizerInfo, UnloadLoraAdapterRequest, bounded_requests,
                                   declare_errors, describe_validation_errors)

# The reference's /complete always generated this many tokens.
REFERENCE_COMPLETE_TOKENS = 512
# Most tokens a streamed row keeps back because they end inside a UTF-8 character (4 bytes at most).
MAX_CHARACTER_TOKENS = 4


class RequestError(Exception):
    """A client error: answered with `status` and an OpenAI-style JSON error."""

    def __init__(self, message: str, status: int = 400, kind: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.kind, self.param, self.code = status, kind, param, code


def error_body(message: str, kind: str, param: str | None = None, code: Any = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def event(body) -> str:
    """One server-sent event."""
    return f"data: {json.dumps(body)}\n\n"


@dataclasses.dataclass
class Piece:
    """What one streamed event says of one choice: new text, the tokens [lo, hi) it comes from, and the
    finish reason on the choice's last piece."""

    index: int
    text: str
    lo: int
    hi: int
    generation: Generation
    finish_reason: str | None = None


class TokenStream:
    """One streamed row: turns the engine's updates (a partial Generation per step) into pieces of at most
    `interval` tokens each.

    Each token's text is decoded once, incrementally (a byte-level BPE token that ends inside a character
    waits for the tokens that complete it); tokens whose text a stop string of up to `holdback` + 1
    characters might still cover wait too. The finished Generation's text (cut at a stop string by the
    engine) is final: the last piece ends exactly there. `hidden` (EOS under ignore_eos) has no text.
    """

    def __init__(self, index: int, tokenizer, interval: int, holdback: int, hidden: int | None):
        self.index, self.tokenizer, self.hidden = index, tokenizer, hidden
        self.interval, self.holdback = interval, holdback
        self.text = ""          # the text of the settled tokens
        self.ends: list = []    # ends[k]: len(self.text) once token k was decoded
        self.settled = 0        # tokens whose text is complete
        self._pending: list = []
        self.sent_text = self.sent_tokens = 0
        self.result: Generation | None = None  # the finished Generation

    def _decode(self, tokens: list[int]) -> None:
        for token in tokens[len(self.ends):]:
            if token != self.hidden:
                self._pending.append(token)
                piece = self.tokenizer.decode(self._pending)
                if not piece.endswith("\ufffd") or len(self._pending) >= MAX_CHARACTER_TOKENS:
                    self.text += piece
                    self._pending = []
            self.ends.append(len(self.text))
            if not self._pending:
                self.settled = len(self.ends)

    def pieces(self, generation: Generation) -> list[Piece]:
        """The pieces an update releases (none, one per `interval` tokens, and the finish on the last)."""
        self._decode(generation.tokens)
        if generation.finished:
            text, count = generation.text or "", len(generation.tokens)
        else:
            text, count, limit = self.text, self.sent_tokens, len(self.text) - self.holdback
            while count < self.settled and self.ends[count] <= limit:
                count += 1
        out = []
        for lo in range(self.sent_tokens, count, self.interval):
            hi = min(lo + self.interval, count)
            end = len(text) if generation.finished and hi == count else min(self.ends[hi - 1], len(text))
            out.append(Piece(self.index, text[self.sent_text:max(end, self.sent_text)], lo, hi, generation))
            self.sent_text, self.sent_tokens = max(end, self.sent_text), hi
        if generation.finished:
            if not out:
                out.append(Piece(self.index, text[self.sent_text:], count, count, generation))
            out[-1].finish_reason = generation.finish_reason
            self.result = generation
        return out

    @property
    def finished(self) -> bool:
        return self.result is not None


def usage_of(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def _prometheus_label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


# vLLM's /metrics names of what the engine measures: (vLLM name, kind, gptj source, help).
VLLM_GAUGES = (("vllm:num_requests_running", "running_slots", "Rows in a slot (prefilling or decoding)."),
               ("vllm:num_requests_waiting", "waiting_rows", "Rows waiting for a slot or a scoring batch."))
VLLM_COUNTERS = (("vllm:prompt_tokens_total", "prompt_tokens", "Prompt tokens of admitted rows."),
                 ("vllm:generation_tokens_total", "tokens_generated", "Tokens generated (EOS included)."),
                 ("vllm:prefix_cache_queries_total", "prefix_cache_queries",
                  "Prompt tokens looked up in the prefix cache."),
                 ("vllm:prefix_cache_hits_total", "prefix_cache_tokens_saved",
                  "Prompt tokens found in the prefix cache (not prefilled)."))
VLLM_HISTOGRAMS = (("vllm:time_to_first_token_seconds", "time_to_first_token_seconds"),
                   ("vllm:time_per_output_token_seconds", "inter_token_latency_seconds"),
                   ("vllm:inter_token_latency_seconds", "inter_token_latency_seconds"),
                   ("vllm:request_time_per_output_token_seconds", "time_per_output_token_seconds"),
                   ("vllm:e2e_request_latency_seconds", "e2e_request_latency_seconds"),
                   ("vllm:request_queue_time_seconds", "queue_wait_seconds"))


def vllm_metrics(engine: Engine, model_name: str) -> str:
    """The engine's gauges, counters and histograms under vLLM's names and labels (model_name, engine), for
    dashboards built on vLLM. The KV cache is one full row per slot, so its usage is the slots in use."""
    from gptj.inference.engine import HISTOGRAMS

    labels = f'model_name="{_prometheus_label(model_name)}",engine="0"'
    health = engine.health()
    lines = []
    for name, source, help_text in VLLM_GAUGES:
        lines += [f"# HELP {name} {help_text}", f"# TYPE {name} gauge", f"{name}{{{labels}}} {health[source]}"]
    usage = health["running_slots"] / health["slots"]
    for name in ("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc"):  # the second: vLLM's older name
        lines += [f"# HELP {name} KV-cache usage (slots in use / slots); 1 means 100 percent.",
                  f"# TYPE {name} gauge", f"{name}{{{labels}}} {usage}"]
    for name, source, help_text in VLLM_COUNTERS:
        lines += [f"# HELP {name} {help_text}", f"# TYPE {name} counter", f"{name}{{{labels}}} {health[source]}"]
    for name, source in VLLM_HISTOGRAMS:
        lines += engine.histograms[source].prometheus(name, HISTOGRAMS[source], labels)
    running, waiting = engine.adapter_activity()
    lora = (f'max_lora="{engine.adapters.slots}",running_lora_adapters="{_prometheus_label(",".join(running))}",'
            f'waiting_lora_adapters="{_prometheus_label(",".join(waiting))}"')
    lines += ["# HELP vllm:lora_requests_info The adapters of running and of waiting rows (value: the time).",
              "# TYPE vllm:lora_requests_info gauge", f"vllm:lora_requests_info{{{lora}}} {time.time()}"]
    return "\n".join(lines) + "\n"


class CompletionService:
    """Validation, tokenization and OpenAI-shaped responses on top of an Engine.

    Args:
      engine: the engine every request runs on.
      tokenizer: encodes prompts and decodes tokens.
      model_name: the name clients pass as `model` (and /v1/models lists).
      max_new_tokens_limit: most tokens one completion may ask for.
      chat_template: renders chat messages (default the built-in "gptj_sft").
      stream_interval: most tokens per streamed event (1: one event per token).
    """

    def __init__(self, engine: Engine, tokenizer, *, model_name: str = "gptj", max_new_tokens_limit: int = 1024,
                 chat_template: ChatTemplate | None = None, stream_interval: int = 1):
        if stream_interval < 1:
            raise ValueError(f"stream_interval must be >= 1, got {stream_interval}")
        self.engine = engine
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.max_new_tokens_limit = min(int(max_new_tokens_limit), engine.cache_len)
        self.max_len = engine.cache_len
        self.vocab_size = engine.runner.vocab_limit  # ids a client may send: those the tokenizer can decode
        self.chat_template = chat_template or ChatTemplate.load("gptj_sft")
        self.stream_interval = int(stream_interval)
        self.started = time.time()

    # -- models: the base and its adapters -----------------------------------------------

    def resolve_model(self, requested: str | None) -> str:
        """The served model a request's `model` field names: the base when left out, empty or its name, else a
        loaded adapter; a 404 (OpenAI's model_not_found) naming the models served for anything else. Every
        endpoint that takes `model` asks here."""
        if not requested or requested == self.model_name:
            return self.model_name
        if requested in self.engine.adapters.names():
            return requested
        served = ", ".join([self.model_name] + self.engine.adapters.names())
        raise RequestError(f"The model `{requested}` does not exist; this server serves: {served}.", status=404,
                           param="model", code="model_not_found")

    def adapter_of(self, model: str) -> str:
        """The engine's adapter name of a resolved model ("" for the base)."""
        return "" if model == self.model_name else model

    def load_adapter(self, name: str, path: str) -> None:
        """POST /v1/load_lora_adapter: reads and loads an adapter (blocking; run it off the event loop)."""
        if name == self.model_name:
            raise RequestError(f"`{name}` is the base model's name; choose another adapter name",
                               param="lora_name")
        try:
            self.engine.load_adapter(name, path)
        except AdapterError as e:
            raise RequestError(str(e), param="lora_path") from None

    async def unload_adapter(self, name: str) -> None:
        """POST /v1/unload_lora_adapter: returns once the rows using it have finished and its slot is free."""
        try:
            future = self.engine.unload_adapter(name)
        except UnknownAdapterError as e:
            raise RequestError(str(e), status=404, param="lora_name", code="model_not_found") from None
        await asyncio.wrap_future(future)

    # -- request checking ---------------------------------------------------------------

    def encode(self, text: str, param: str) -> list[int]:
        try:
            return encode_text(self.tokenizer, text)
        except ValueError as e:
            raise RequestError(f"{param}: {e}", param=param) from None

    def prompts_of(self, prompt, copies: int = 1) -> list[list[int]]:
        """Token ids of each prompt in an OpenAI `prompt` field (string, strings, ids, lists of ids)."""
        prompts = [prompt] if isinstance(prompt, str) or isinstance(prompt[0], int) else prompt
        if len(prompts) * copies > self.engine.max_queue:
            raise RequestError(f"{len(prompts)} prompts x n={copies} completions in one request; this server takes "
                               f"at most {self.engine.max_queue}", param="n")
        out = [self.encode(item, "prompt") if isinstance(item, str) else list(item) for item in prompts]
        if not all(out):
            raise RequestError("prompt must not be empty", param="prompt")
        return out

    def check_lengths(self, prompts: list[list[int]], max_tokens: int, param: str = "prompt") -> None:
        longest = max(len(p) for p in prompts)
        if longest + max_tokens > self.max_len:
            raise RequestError(
                f"This model's maximum context length is {self.max_len} tokens, however you requested "
                f"{longest + max_tokens} tokens ({longest} in your prompt; {max_tokens} for the completion).",
                param=param)

    def chat_prompt(self, request: ChatCompletionRequest) -> list[int]:
        """The token ids of a chat request's messages rendered by the chat template."""
        messages = []
        for message in request.messages:
            content = message.content
            if isinstance(content, list):  # text parts, joined as vLLM joins them
                content = "\n".join(part.text for part in content)
            messages.append({**message.model_dump(exclude_none=True), "content": content})
        try:
            text = self.chat_template.render(messages, add_generation_prompt=request.add_generation_prompt is not False)
        except ChatTemplateError as e:
            raise RequestError(str(e), param="messages") from None
        prompt = self.encode(text, "messages")
        if not prompt:
            raise RequestError("the messages render to an empty prompt", param="messages")
        return prompt

    # -- running jobs -------------------------------------------------------------------

    def submit(self, jobs: list[Job]) -> None:
        try:
            self.engine.submit(jobs)
        except QueueFull as e:
            raise RequestError(f"server busy: {e}; retry later", status=429, kind="rate_limit_error") from None
        except UnknownAdapterError as e:  # unloaded since the request was read
            raise RequestError(str(e), status=404, param="model", code="model_not_found") from None

    async def wait(self, jobs: list[Job]) -> list[Any]:
        try:
            return list(await asyncio.gather(*(asyncio.wrap_future(job.future) for job in jobs)))
        except asyncio.CancelledError:
            self.engine.cancel(jobs)
            raise

    async def complete_reference(self, request: CompleteRequest) -> dict:
        """The reference's /complete: one sampled completion of `context`."""
        [prompt] = self.prompts_of(request.context)
        max_tokens = request.max_tokens
        if max_tokens is None:
            max_tokens = max(0, min(REFERENCE_COMPLETE_TOKENS, self.max_new_tokens_limit, self.max_len - len(prompt)))
        self.check_lengths([prompt], max_tokens)
        job = Job(GENERATE, prompt, max_new_tokens=max_tokens, temperature=request.temp, top_p=request.top_p,
                  seed=random.getrandbits(31))
        self.submit([job])
        [generation] = await self.wait([job])
        return {"completion": generation.text}

    def generate_jobs(self, request: SamplingFields, prompts: list[list[int]], max_tokens: int,
                      top_logprobs: int, model: str) -> list[Job]:
        """The generate jobs of a request: n per prompt (choice i of a prompt draws with seed + i)."""
        if request.stream_options is not None and not request.stream:
            raise RequestError("stream_options can only be given with stream=true", param="stream_options")
        min_tokens = request.min_tokens or 0
        if min_tokens > max_tokens:
            raise RequestError(f"min_tokens ({min_tokens}) must not exceed max_tokens ({max_tokens})",
                               param="min_tokens")
        temperature = 1.0 if request.temperature is None else float(request.temperature)
        top_p = 1.0 if request.top_p is None else float(request.top_p)
        # top_k past the vocabulary keeps every token, the same as 0.
        top_k = min(request.top_k or 0, self.vocab_size)
        stop = [request.stop] if isinstance(request.stop, str) else list(request.stop or [])
        stop = [s for s in stop if s]
        seed = request.seed if request.seed is not None else random.getrandbits(31)
        n = request.n or 1
        if max_tokens == 0:
            return []
        return [Job(GENERATE, prompt, max_new_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                    seed=seed + i, stop=stop, top_logprobs=top_logprobs, ignore_eos=bool(request.ignore_eos),
                    min_tokens=min_tokens, adapter=self.adapter_of(model))
                for prompt in prompts for i in range(n)]

    def plan(self, request: CompletionRequest):
        """Turns a (schema-valid) OpenAI completions request into (model, prompts, generate jobs, score jobs)."""
        model = self.resolve_model(request.model)
        prompts = self.prompts_of(request.prompt, request.n or 1)
        max_tokens = request.max_tokens if request.max_tokens is not None else min(16, self.max_new_tokens_limit)
        self.check_lengths(prompts, max_tokens)
        generate = self.generate_jobs(request, prompts, max_tokens, request.logprobs or 0, model)
        score = ([Job(SCORE, prompt, top_logprobs=request.logprobs or 0, adapter=self.adapter_of(model))
                  for prompt in prompts]
                 if request.echo and request.logprobs is not None else [])
        return model, prompts, generate, score

    def chat_plan(self, request: ChatCompletionRequest):
        """Turns a (schema-valid) chat request into (model, prompt, generate jobs)."""
        model = self.resolve_model(request.model)
        if request.top_logprobs and not request.logprobs:
            raise RequestError("top_logprobs needs logprobs=true", param="top_logprobs")
        prompt = self.chat_prompt(request)
        max_tokens = request.max_completion_tokens if request.max_completion_tokens is not None else request.max_tokens
        if max_tokens is None:
            max_tokens = min(self.max_new_tokens_limit, self.max_len - len(prompt))
            if max_tokens <= 0:
                max_tokens = 1  # the context is full: answered by check_lengths below
        self.check_lengths([prompt], max_tokens, param="messages")
        return model, prompt, self.generate_jobs(request, [prompt], max_tokens, request.top_logprobs or 0, model)

    # -- responses ----------------------------------------------------------------------

    def token_text(self, token: int) -> str:
        return self.tokenizer.decode([token])

    def logprobs_block(self, tokens: list[int], token_logprobs: list, top: list | None, count: int | None,
                       offset: int) -> dict:
        """OpenAI's completions `logprobs` object for a run of tokens whose text starts at character `offset`."""
        strings = [self.token_text(t) for t in tokens]
        offsets = []
        for token, s in zip(tokens, strings):
            offsets.append(offset)
            offset += 0 if token == self.engine.eos_id else len(s)  # an EOS kept by ignore_eos has no text
        top_dicts = []
        for entry in (top or [None] * len(tokens)):
            if entry is None or count is None:
                top_dicts.append(None)
            else:
                top_dicts.append({self.token_text(t): lp for t, lp in entry[:max(count, 1)]})
        return {"tokens": strings, "token_logprobs": list(token_logprobs), "top_logprobs": top_dicts,
                "text_offset": offsets}

    def chat_logprobs(self, generation: Generation, lo: int, hi: int) -> dict:
        """OpenAI's chat `logprobs` object ({"content": [...]}) for tokens [lo, hi) of a generation."""
        def entry(token: int, logprob: float) -> dict:
            text = self.token_text(token)
            return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

        tops = generation.top_logprobs or [[]] * len(generation.tokens)
        return {"content": [dict(entry(token, logprob), top_logprobs=[entry(t, lp) for t, lp in top])
                            for token, logprob, top in zip(generation.tokens[lo:hi], generation.logprobs[lo:hi],
                                                           tops[lo:hi])]}

    def choice(self, index: int, prompt: list[int], generation: Generation | None, score: Score | None,
               echo: bool, logprobs: int | None) -> dict:
        text, parts = "", []
        if echo:
            prompt_text = self.tokenizer.decode(prompt)
            text = prompt_text
            if logprobs is not None:
                parts.append(self.logprobs_block(prompt, score.token_logprobs, score.top_logprobs, logprobs, 0))
        if generation is not None:
            if logprobs is not None:
                parts.append(self.logprobs_block(generation.tokens, generation.logprobs, generation.top_logprobs,
                                                 logprobs, len(text)))
            text += generation.text
        block = None
        if logprobs is not None:
            block = {key: [v for part in parts for v in part[key]] for key in
                     ("tokens", "token_logprobs", "top_logprobs", "text_offset")}
        reason = generation.finish_reason if generation is not None else "length"
        return {"text": text, "index": index, "logprobs": block, "finish_reason": reason}

    @staticmethod
    def envelope(kind: str, request_id: str, model: str, choices: list[dict], usage: dict | None = None,
                 with_usage: bool = True) -> dict:
        """An OpenAI response body (`kind`: its `object`); `usage` only `with_usage` (null when None)."""
        body = {"id": request_id, "object": kind, "created": int(time.time()), "model": model, "choices": choices}
        if with_usage:
            body["usage"] = usage
        return body

    async def completions(self, request: CompletionRequest) -> dict:
        """A non-streamed OpenAI completion."""
        model, prompts, generate, score = self.plan(request)
        self.submit(score + generate)
        results = await self.wait(score + generate)
        scores, generations = results[:len(score)], results[len(score):]
        n, choices = request.n or 1, []
        for p, prompt in enumerate(prompts):
            for i in range(n):
                generation = generations[p * n + i] if generations else None
                choices.append(self.choice(p * n + i, prompt, generation, scores[p] if scores else None,
                                           bool(request.echo), request.logprobs))
        usage = usage_of(sum(len(p) for p in prompts), sum(g.completion_tokens for g in generations))
        return self.envelope("text_completion", f"cmpl-{uuid.uuid4().hex}", model, choices, usage)

    async def chat(self, request: ChatCompletionRequest) -> dict:
        """A non-streamed OpenAI chat completion."""
        model, prompt, jobs = self.chat_plan(request)
        self.submit(jobs)
        generations = await self.wait(jobs)
        choices = [{"index": i, "message": {"role": "assistant", "content": g.text},
                    "logprobs": self.chat_logprobs(g, 0, len(g.tokens)) if request.logprobs else None,
                    "finish_reason": g.finish_reason} for i, g in enumerate(generations)]
        if not jobs:  # max_tokens 0
            choices = [{"index": i, "message": {"role": "assistant", "content": ""},
                        "logprobs": {"content": []} if request.logprobs else None, "finish_reason": "length"}
                       for i in range(request.n or 1)]
        usage = usage_of(len(prompt), sum(g.completion_tokens for g in generations))
        return self.envelope("chat.completion", f"chatcmpl-{uuid.uuid4().hex}", model, choices, usage)

    # -- streaming ----------------------------------------------------------------------

    def _listen(self, jobs: list[Job]) -> tuple[list[TokenStream], asyncio.Queue]:
        """Per-row token streams and a queue that the engine's thread feeds with (row, partial Generation)
        after each step, and (row, error) if a row fails."""
        loop = asyncio.get_running_loop()
        updates: asyncio.Queue = asyncio.Queue()

        def put(item) -> None:
            try:
                loop.call_soon_threadsafe(updates.put_nowait, item)
            except RuntimeError:  # the event loop is gone: the server is shutting down
                pass

        def failed(index: int, future) -> None:
            if not future.cancelled() and future.exception() is not None:
                put((index, future.exception()))

        streams = []
        for index, job in enumerate(jobs):
            job.on_update = lambda generation, index=index: put((index, generation))
            job.future.add_done_callback(lambda future, index=index: failed(index, future))
            holdback = max((len(s) for s in job.stop), default=1) - 1  # what a later stop string might cover
            streams.append(TokenStream(index, self.tokenizer, self.stream_interval, holdback,
                                       self.engine.eos_id if job.ignore_eos else None))
        return streams, updates

    @staticmethod
    async def _pieces(streams: list[TokenStream], updates: asyncio.Queue) -> AsyncIterator[Piece]:
        """Every row's pieces as the engine produces them, until every row has finished (a failed row raises)."""
        while not all(s.finished for s in streams):
            index, update = await updates.get()
            if streams[index].finished:
                continue
            if isinstance(update, BaseException):
                raise update
            for piece in streams[index].pieces(update):
                yield piece

    async def _stream(self, jobs: list[Job], body: AsyncIterator[str]):
        """The events of `body`, then [DONE]; an error mid-stream is an in-band error event; when the client
        goes away (the generator is closed or cancelled), the rows are cancelled so their slots free."""
        try:
            async for text in body:
                yield text
        except Exception as e:  # noqa: BLE001 - a failure mid-stream is reported in-band
            yield event(error_body(f"generation failed: {e}", "server_error"))
        finally:
            self.engine.cancel(jobs)  # a no-op for finished rows
        yield "data: [DONE]\n\n"

    async def stream(self, request: CompletionRequest):
        """Server-sent events for a streamed completion; validation errors are raised before the first event."""
        model, prompts, generate, score = self.plan(request)
        streams, updates = self._listen(generate)
        self.submit(score + generate)
        return self._stream(score + generate, self._completion_events(request, model, prompts, generate, score,
                                                                      streams, updates))

    async def _completion_events(self, request, model, prompts, generate, score, streams, updates):
        request_id, n, logprobs = f"cmpl-{uuid.uuid4().hex}", request.n or 1, request.logprobs
        options = request.stream_options
        include_usage = bool(options and options.include_usage)
        continuous = bool(options and options.continuous_usage_stats)

        def envelope(choices, usage=None, final=False):
            return self.envelope("text_completion", request_id, model, choices, usage,
                                 with_usage=include_usage or continuous or final)

        scores = await self.wait(score) if score else []
        if request.echo:
            for p, prompt in enumerate(prompts):
                for i in range(n):
                    choice = self.choice(p * n + i, prompt, None, scores[p] if scores else None, True, logprobs)
                    choice["finish_reason"] = None
                    yield event(envelope([choice], usage_of(len(prompt), 0) if continuous else None))
        async for piece in self._pieces(streams, updates):
            generation = piece.generation
            block = None
            if logprobs is not None:
                top = generation.top_logprobs[piece.lo:piece.hi] if generation.top_logprobs else None
                block = self.logprobs_block(generation.tokens[piece.lo:piece.hi],
                                            generation.logprobs[piece.lo:piece.hi], top, logprobs, 0)
            choice = {"text": piece.text, "index": piece.index, "logprobs": block, "finish_reason": piece.finish_reason}
            prompt_tokens = len(prompts[piece.index // n])
            made = generation.completion_tokens if piece.finish_reason else piece.hi
            yield event(envelope([choice], usage_of(prompt_tokens, made) if continuous else None))
        if not generate and not request.echo:
            choices = [{"text": "", "index": k, "logprobs": None, "finish_reason": "length"}
                       for k in range(len(prompts) * n)]
            yield event(envelope(choices, usage_of(sum(len(p) for p in prompts), 0) if continuous else None))
        if include_usage:
            made = sum(s.result.completion_tokens for s in streams)
            yield event(envelope([], usage_of(sum(len(p) for p in prompts), made), final=True))

    async def chat_stream(self, request: ChatCompletionRequest):
        """Server-sent events for a streamed chat completion: each choice's role, its tokens' content, its
        finish reason (OpenAI's chunk shapes); validation errors are raised before the first event."""
        model, prompt, jobs = self.chat_plan(request)
        streams, updates = self._listen(jobs)
        self.submit(jobs)
        return self._stream(jobs, self._chat_events(request, model, prompt, jobs, streams, updates))

    async def _chat_events(self, request, model, prompt, jobs, streams, updates):
        request_id = f"chatcmpl-{uuid.uuid4().hex}"
        options = request.stream_options
        include_usage = bool(options and options.include_usage)
        continuous = bool(options and options.continuous_usage_stats)

        def chunk(index, delta, made, finish_reason=None, logprobs=None):
            choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}
            return event(self.envelope("chat.completion.chunk", request_id, model, [choice],
                                       usage_of(len(prompt), made) if continuous else None,
                                       with_usage=include_usage or continuous))

        n = request.n or 1
        for index in range(n):
            yield chunk(index, {"role": "assistant", "content": ""}, 0)
        async for piece in self._pieces(streams, updates):
            if piece.hi > piece.lo or piece.text:
                logprobs = self.chat_logprobs(piece.generation, piece.lo, piece.hi) if request.logprobs else None
                yield chunk(piece.index, {"content": piece.text}, piece.hi, logprobs=logprobs)
            if piece.finish_reason:
                yield chunk(piece.index, {}, piece.generation.completion_tokens, piece.finish_reason)
        if not jobs:  # max_tokens 0
            for index in range(n):
                yield chunk(index, {}, 0, "length")
        if include_usage:
            made = sum(s.result.completion_tokens for s in streams)
            yield event(self.envelope("chat.completion.chunk", request_id, model, [], usage_of(len(prompt), made)))


def create_app(service: CompletionService, *, warmup: bool = False):
    """The FastAPI application; the engine's worker runs for the app's lifetime (after `warmup`, if set)."""
    import contextlib

    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        if warmup:
            await asyncio.to_thread(service.engine.warmup)
        service.engine.start()
        try:
            yield
        finally:
            service.engine.stop()

    app = FastAPI(title="gptj", lifespan=lifespan)
    app.state.engine = service.engine  # for tests and embedding applications: step log, counters
    declare_errors(app)

    @app.exception_handler(RequestError)
    async def _request_error(_request: Request, exc: RequestError):
        return JSONResponse(error_body(str(exc), exc.kind, exc.param, exc.code), status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_request: Request, exc: RequestValidationError):
        return JSONResponse(error_body("invalid request: " + describe_validation_errors(exc.errors()),
                                       "invalid_request_error"), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_request: Request, exc: StarletteHTTPException):
        return JSONResponse(error_body(str(exc.detail), "invalid_request_error"), status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def _server_error(_request: Request, exc: Exception):
        return JSONResponse(error_body(f"internal error: {type(exc).__name__}: {exc}", "server_error"), status_code=500)

    requests = bounded_requests(service.max_new_tokens_limit, service.engine.max_queue, service.vocab_size)

    async def completions(request):
        if request.stream:
            return StreamingResponse(await service.stream(request), media_type="text/event-stream")
        return await service.completions(request)

    async def chat_completions(request):
        if request.stream:
            return StreamingResponse(await service.chat_stream(request), media_type="text/event-stream")
        return await service.chat(request)

    async def complete(request):
        return await service.complete_reference(request)

    async def detokenize(request):
        return {"prompt": service.tokenizer.decode(request.tokens)}

    # The bodies are this server's models (bounded_requests), which FastAPI reads from the annotation.
    for path, endpoint, body, response in (("/v1/completions", completions, "completion", CompletionResponse),
                                           ("/v1/chat/completions", chat_completions, "chat", ChatCompletionResponse),
                                           ("/complete", complete, "complete", CompleteResponse),
                                           ("/detokenize", detokenize, "detokenize", DetokenizeResponse)):
        endpoint.__annotations__ = {"request": requests[body]}
        app.post(path, response_model=response)(endpoint)

    @app.get("/v1/models", response_model=ModelList)
    async def models():
        base = {"id": service.model_name, "object": "model", "created": int(service.started), "owned_by": "gptj",
                "max_model_len": service.max_len, "root": service.model_name, "parent": None}
        adapters = [{**base, "id": a.name, "created": int(a.loaded_at), "root": a.path, "parent": service.model_name}
                    for a in service.engine.adapters.adapters()]
        return {"object": "list", "data": [base] + adapters}

    @app.post("/v1/load_lora_adapter", response_class=PlainTextResponse)
    async def load_lora_adapter(request: LoadLoraAdapterRequest):
        await asyncio.to_thread(service.load_adapter, request.lora_name, request.lora_path)
        return PlainTextResponse(f"Success: LoRA adapter '{request.lora_name}' added successfully.")

    @app.post("/v1/unload_lora_adapter", response_class=PlainTextResponse)
    async def unload_lora_adapter(request: UnloadLoraAdapterRequest):
        await service.unload_adapter(request.lora_name)
        return PlainTextResponse(f"Success: LoRA adapter '{request.lora_name}' removed successfully.")

    @app.get("/health", response_model=HealthResponse)
    async def health():
        return {"status": "ok", "model": service.model_name, **service.engine.health()}

    @app.get("/metrics", response_class=PlainTextResponse)
    async def metrics():
        process = ("# HELP process_cpu_seconds_total CPU seconds of the server process (every thread).\n"
                   f"# TYPE process_cpu_seconds_total counter\nprocess_cpu_seconds_total {time.process_time()}\n")
        return PlainTextResponse(service.engine.prometheus() + vllm_metrics(service.engine, service.model_name)
                                 + process)

    @app.get("/tokenizer_info", response_model=TokenizerInfo)
    async def tokenizer_info():
        return {"tokenizer_class": "GPT2TokenizerFast", "eos_token": EOT_TOKEN, "bos_token": EOT_TOKEN,
                "pad_token": None,
                "model_max_length": service.max_len}

    @app.post("/tokenize", response_model=TokenizeResponse)
    async def tokenize(request: TokenizeRequest):
        tokens = service.encode(request.prompt, "prompt")
        return {"tokens": tokens, "count": len(tokens), "max_model_len": service.max_len}

    return app


def build_app(sampler, tokenizer, serve_config) -> Any:
    """An app serving `sampler`'s model with the engine settings, names, adapters and prefix cache of a serve
    section (ServeSettings); the adapters it names are loaded here. ValueError for a setting out of range,
    AdapterError for an adapter that cannot be served."""
    slots, rank = adapter_pool_size(serve_config)
    if slots:
        sampler.runner.reserve_adapters(slots, rank)
    engine = Engine(sampler.runner, slots=serve_config.max_batch_size, max_queue=serve_config.max_queue,
                    prefill_chunk=serve_config.prefill_chunk, decode_steps=serve_config.decode_steps,
                    tokenizer=tokenizer, eos_id=sampler.eos_id, prefix_cache_gib=serve_config.prefix_cache_gib,
                    prefix_block_size=serve_config.prefix_block_size)
    for name, path in parse_adapter_specs(serve_config.adapters):
        if name == serve_config.model_name:
            raise AdapterError(f"serve.adapters: {name!r} is the base model's name (serve.model_name)")
        engine.load_adapter(name, path)
    service = CompletionService(engine, tokenizer, model_name=serve_config.model_name,
                                max_new_tokens_limit=serve_config.max_new_tokens_limit,
                                chat_template=ChatTemplate.load(serve_config.chat_template),
                                stream_interval=serve_config.stream_interval)
    return create_app(service, warmup=serve_config.warmup)


def serve(config, workdir: str | None) -> None:
    """`python main.py --mode=serve`: loads the weights and serves on serve.host:port until stopped."""
    import jax
    import uvicorn

    from gptj.errors import ConfigError
    from gptj.inference.sampler import build_sampler
    from gptj.settings import RunSettings

    settings = RunSettings.from_config(config)
    if jax.process_count() > 1:
        raise ConfigError("the server runs on a single host; use a mesh over that host's devices")
    sampler = build_sampler(settings, workdir)
    try:
        app = build_app(sampler, sampler.tokenizer, settings.serve)
    except AdapterError as e:
        raise ConfigError(f"serve.adapters: {e}") from None
    except ConfigError:  # the chat template: already says which setting
        raise
    except ValueError as e:  # a serve setting out of range (slots, queue, chunk, steps, stream interval)
        raise ConfigError(f"serve: {e}") from None
    uvicorn.run(app, host=settings.serve.host, port=settings.serve.port, log_level="info")
