"""HTTP server (FastAPI + uvicorn): OpenAI completions, the reference's /complete, health and metrics.

    python main.py --config=... --workdir=... --mode=serve [--port=5000]

Endpoints:
  POST /v1/completions  OpenAI completions: prompt (string, list of strings, token ids or lists of them),
                        max_tokens, temperature, top_p, top_k, n, stop, seed, stream (server-sent events),
                        logprobs (<= 5), echo. echo + logprobs + max_tokens 0 returns the prompt tokens'
                        log-probabilities (how lm-evaluation-harness's `local-completions` scores), from
                        the head applied chunk by chunk of tokens (`model.score_targets`).
  POST /complete        mesh-transformer-jax's API: {"context", "top_p", "temp"} -> {"completion"}.
  GET  /v1/models       the base model and each loaded LoRA adapter (`parent`: the base).
  POST /v1/load_lora_adapter {"lora_name", "lora_path"}, POST /v1/unload_lora_adapter {"lora_name"}: vLLM's
                        runtime adapter endpoints (`gptj.inference.adapters`); unloading waits for the rows
                        using the adapter.
  GET  /health (engine state, adapters, prefix cache, counters), GET /metrics (Prometheus text).
  GET  /tokenizer_info, POST /tokenize, POST /detokenize: vLLM's tokenizer endpoints, so lm-eval's
                        `tokenizer_backend=remote` (auto-detected) needs no tokenizer files of its own.
  GET  /openapi.json    the schema of all of the above, errors included.

Requests run on one `gptj.inference.engine.Engine` (continuous batching over `config.serve.max_batch_size`
slots). A request's `model` names the base (`config.serve.model_name`, or left out) or a loaded adapter
(`CompletionService.resolve_model`); rows of every adapter and of the base decode together. Every error is
a JSON body {"error": {"message", "type", "param", "code"}}: 400 for anything the client got wrong,
404 for a model (adapter) not served here, 429 when more rows wait than `max_queue`, 500 only for a server
fault; no request can stop the server. A streaming client that disconnects frees its slots at the
engine's next step.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
import uuid
from typing import Any

from gptj.errors import AdapterError, UnknownAdapterError
from gptj.inference.adapters import adapter_pool_size, parse_adapter_specs
from gptj.inference.engine import GENERATE, SCORE, Engine, Job, QueueFull
from gptj.inference.runner import Generation, Score
from gptj.inference.sampler import encode_text
from gptj.inference.schema import (CompleteRequest, CompleteResponse, CompletionRequest, CompletionResponse,
                                   DetokenizeResponse, HealthResponse, LoadLoraAdapterRequest, ModelList,
                                   TokenizeRequest, TokenizeResponse, TokenizerInfo, UnloadLoraAdapterRequest,
                                   bounded_requests, declare_errors, describe_validation_errors)

# The reference's /complete always generated this many tokens.
REFERENCE_COMPLETE_TOKENS = 512


class RequestError(Exception):
    """A client error: answered with `status` and an OpenAI-style JSON error."""

    def __init__(self, message: str, status: int = 400, kind: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.kind, self.param, self.code = status, kind, param, code


def error_body(message: str, kind: str, param: str | None = None, code: Any = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


class CompletionService:
    """Validation, tokenization and OpenAI-shaped responses on top of an Engine."""

    def __init__(self, engine: Engine, tokenizer, *, model_name: str = "gptj", max_new_tokens_limit: int = 1024):
        self.engine = engine
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.max_new_tokens_limit = min(int(max_new_tokens_limit), engine.cache_len)
        self.max_len = engine.cache_len
        self.vocab_size = engine.runner.vocab_limit  # ids a client may send: those the tokenizer can decode
        self.started = time.time()

    # -- models: the base and its adapters -----------------------------------------------

    def resolve_model(self, requested: str | None) -> str:
        """The served model a request's `model` field names: the base when left out, empty or its name, else a
        loaded adapter; a 404 (OpenAI's model_not_found) naming the models served for anything else."""
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

    def check_lengths(self, prompts: list[list[int]], max_tokens: int) -> None:
        longest = max(len(p) for p in prompts)
        if longest + max_tokens > self.max_len:
            raise RequestError(
                f"This model's maximum context length is {self.max_len} tokens, however you requested "
                f"{longest + max_tokens} tokens ({longest} in your prompt; {max_tokens} for the completion).",
                param="prompt")

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

    def plan(self, request: CompletionRequest):
        """Turns a (schema-valid) OpenAI request into jobs: (prompts, generate jobs, score jobs, settings)."""
        model = self.resolve_model(request.model)
        adapter = self.adapter_of(model)
        n = request.n or 1
        prompts = self.prompts_of(request.prompt, n)
        max_tokens = request.max_tokens if request.max_tokens is not None else min(16, self.max_new_tokens_limit)
        self.check_lengths(prompts, max_tokens)
        temperature = 1.0 if request.temperature is None else float(request.temperature)
        top_p = 1.0 if request.top_p is None else float(request.top_p)
        # top_k past the vocabulary keeps every token, the same as 0.
        top_k = min(request.top_k or 0, self.vocab_size)
        stop = [request.stop] if isinstance(request.stop, str) else list(request.stop or [])
        stop = [s for s in stop if s]
        seed = request.seed if request.seed is not None else random.getrandbits(31)
        top = request.logprobs or 0
        generate = [Job(GENERATE, prompt, max_new_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                        seed=seed + i, stop=stop, top_logprobs=top, adapter=adapter)
                    for prompt in prompts for i in range(n)] if max_tokens > 0 else []
        score = ([Job(SCORE, prompt, top_logprobs=top, adapter=adapter) for prompt in prompts]
                 if request.echo and request.logprobs is not None else [])
        return prompts, generate, score, dict(n=n, max_tokens=max_tokens, logprobs=request.logprobs, stop=stop,
                                              model=model)

    # -- responses ----------------------------------------------------------------------

    def token_text(self, token: int) -> str:
        return self.tokenizer.decode([token])

    def logprobs_block(self, tokens: list[int], token_logprobs: list, top: list | None, count: int | None,
                       offset: int) -> dict:
        """OpenAI's `logprobs` object for a run of tokens whose text starts at character `offset`."""
        strings = [self.token_text(t) for t in tokens]
        offsets = []
        for s in strings:
            offsets.append(offset)
            offset += len(s)
        top_dicts = []
        for entry in (top or [None] * len(tokens)):
            if entry is None or count is None:
                top_dicts.append(None)
            else:
                top_dicts.append({self.token_text(t): lp for t, lp in entry[:max(count, 1)]})
        return {"tokens": strings, "token_logprobs": list(token_logprobs), "top_logprobs": top_dicts,
                "text_offset": offsets}

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

    def envelope(self, request_id: str, choices: list[dict], usage: dict | None = None, model: str = "") -> dict:
        body = {"id": request_id, "object": "text_completion", "created": int(time.time()),
                "model": model or self.model_name, "choices": choices}
        if usage is not None:
            body["usage"] = usage
        return body

    async def completions(self, request: CompletionRequest) -> dict:
        """A non-streamed OpenAI completion."""
        prompts, generate, score, opts = self.plan(request)
        self.submit(score + generate)
        results = await self.wait(score + generate)
        scores, generations = results[:len(score)], results[len(score):]
        n, choices = opts["n"], []
        for p, prompt in enumerate(prompts):
            for i in range(n):
                generation = generations[p * n + i] if generations else None
                choices.append(self.choice(p * n + i, prompt, generation, scores[p] if scores else None,
                                           bool(request.echo), opts["logprobs"]))
        prompt_tokens = sum(len(p) for p in prompts)
        completion_tokens = sum(len(g.tokens) for g in generations)
        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                 "total_tokens": prompt_tokens + completion_tokens}
        return self.envelope(f"cmpl-{uuid.uuid4().hex}", choices, usage, opts["model"])

    async def stream(self, request: CompletionRequest):
        """Server-sent events for a streamed completion; validation errors are raised before the first event."""
        prompts, generate, score, opts = self.plan(request)
        loop = asyncio.get_running_loop()
        updates: asyncio.Queue = asyncio.Queue()
        for index, job in enumerate(generate):
            job.on_update = lambda gen, index=index: loop.call_soon_threadsafe(updates.put_nowait, (index, gen))
        self.submit(score + generate)
        return self._events(request, f"cmpl-{uuid.uuid4().hex}", prompts, generate, score, opts, updates)

    async def _events(self, request, request_id, prompts, generate, score, opts, updates):
        n, logprobs = opts["n"], opts["logprobs"]
        # Never emit text a later stop string might cover, nor a half-decoded character.
        holdback = max((len(s) for s in opts["stop"]), default=1) - 1

        def event(body) -> str:
            return f"data: {json.dumps(body)}\n\n"

        finished = [False] * len(generate)
        try:
            scores = await self.wait(score) if score else []
            if request.echo:
                for p, prompt in enumerate(prompts):
                    for i in range(n):
                        choice = self.choice(p * n + i, prompt, None, scores[p] if scores else None, True, logprobs)
                        choice["finish_reason"] = None
                        yield event(self.envelope(request_id, [choice], model=opts["model"]))
            sent_text, sent_tokens = [0] * len(generate), [0] * len(generate)
            pending = {asyncio.ensure_future(asyncio.wrap_future(job.future)): k for k, job in enumerate(generate)}
            while not all(finished):
                getter = asyncio.ensure_future(updates.get())
                done, _ = await asyncio.wait(set(pending) | {getter}, return_when=asyncio.FIRST_COMPLETED)
                items = [getter.result()] if getter in done else []
                if getter not in done:
                    getter.cancel()
                for fut in done - {getter}:
                    items.append((pending.pop(fut), fut.result()))  # a failed row raises here
                for index, gen in items:
                    if finished[index]:
                        continue
                    final = gen.finished
                    text = gen.text if final else gen.text.rstrip("\ufffd")
                    if not final and holdback:
                        text = text[:max(0, len(text) - holdback)]
                    delta = text[sent_text[index]:]
                    # The last token's text may still change (a partial character): send its log-prob later.
                    new_tokens = max(len(gen.tokens) if final else len(gen.tokens) - 1, sent_tokens[index])
                    if not delta and not final:
                        continue
                    choice = {"text": delta, "index": index, "logprobs": None,
                              "finish_reason": gen.finish_reason if final else None}
                    if logprobs is not None:
                        lo, hi = sent_tokens[index], new_tokens
                        top = gen.top_logprobs[lo:hi] if gen.top_logprobs else None
                        choice["logprobs"] = self.logprobs_block(gen.tokens[lo:hi], gen.logprobs[lo:hi], top, logprobs, 0)
                    sent_text[index] += len(delta)
                    sent_tokens[index] = new_tokens
                    finished[index] = final
                    yield event(self.envelope(request_id, [choice], model=opts["model"]))
            if not generate and not request.echo:
                choices = [{"text": "", "index": k, "logprobs": None, "finish_reason": "length"}
                           for k in range(len(prompts) * n)]
                yield event(self.envelope(request_id, choices, model=opts["model"]))
        except Exception as e:  # noqa: BLE001 - a failure mid-stream is reported in-band
            yield event(error_body(f"generation failed: {e}", "server_error"))
        finally:
            # The client went away (the stream was cancelled) or generation failed: free the slots now.
            if not all(finished):
                self.engine.cancel(score + generate)
        yield "data: [DONE]\n\n"


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

    async def complete(request):
        return await service.complete_reference(request)

    async def detokenize(request):
        return {"prompt": service.tokenizer.decode(request.tokens)}

    # The bodies are this server's models (bounded_requests), which FastAPI reads from the annotation.
    for path, endpoint, body, response in (("/v1/completions", completions, "completion", CompletionResponse),
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
        return PlainTextResponse(service.engine.prometheus())

    @app.get("/tokenizer_info", response_model=TokenizerInfo)
    async def tokenizer_info():
        eos = "<|endoftext|>"
        return {"tokenizer_class": "GPT2TokenizerFast", "eos_token": eos, "bos_token": eos, "pad_token": None,
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
                                max_new_tokens_limit=serve_config.max_new_tokens_limit)
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
    except ValueError as e:  # a serve setting out of range (slots, queue, chunk, steps)
        raise ConfigError(f"serve: {e}") from None
    uvicorn.run(app, host=settings.serve.host, port=settings.serve.port, log_level="info")
