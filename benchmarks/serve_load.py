"""Serving under load over HTTP: gptj's continuous batching, the previous batching engine, HF generate.

    python benchmarks/serve_load.py [--quick] [--json PATH] [--rates 0.5,1,2,4,8] [--requests 64]
    python benchmarks/serve_load.py --url http://127.0.0.1:5000 --rates 2    # a server you started

An open-loop load generator: requests arrive as a Poisson process at each
offered rate (requests/s) whether or not earlier ones have finished; prompt
and output lengths are drawn from a fixed, seeded long-tailed distribution
(lognormal: prompts median 32 tokens, clipped to 1-200; outputs median 24,
clipped to 1-128 and to the context). Every request streams as load tools
send it (server-sent events, `ignore_eos` so that every request generates its
max_tokens, `stream_options.include_usage` so that the server says how many
tokens it generated, and `logprobs: 0` so each event says how many tokens it
carries), which gives per request the time to first token (TTFT) and the time
per output token after it (TPOT). Output tokens are the usage the server
reports (counted from the events for a server that sends none: the previous
engine), checked against the tokens the events carried and against the
server's own counter (`vllm:generation_tokens_total` in /metrics) over the
run. Reported per server and rate: output tokens/s over the whole run (every
token, first request sent to last token: vLLM benchmark_serving's output
throughput) and while requests were still arriving (meaningful only when the
arrivals last longer than a first token takes), TTFT p50/p99 (all requests,
and short ones: <= 16 output tokens), TPOT p50/p99, the server process's CPU
time per output token, and errors.

The three servers, each in its own process on the same weights (the CPU bench
model of benchmarks/common.py as an HF checkpoint, fp32, greedy):
  gptj      `main.py --mode=serve` from this tree: continuous batching over
            8 slots (`config.serve` defaults), shapes compiled at start-up.
  previous  `main.py --mode=serve` from the last commit that had the previous
            engine (gptj/serve_batching.py: batches of up to 8 that run to
            their end), unpacked with `git archive` into a temporary folder;
            `--previous-commit` names another.
  hf        HF `generate` serving one request at a time (this script's
            `--serve-hf`), streaming through a `BaseStreamer`.
  gptj-coarse  gptj with `serve.stream_interval` = `decode_steps` (about one
            event per decode call instead of one per token): what per-token
            streaming costs (`--servers gptj,gptj-coarse`).
gptj compiles its shapes at start-up (`config.serve.warmup`) and HF has none;
the previous engine compiles one program per batch, prompt and generation
bucket it meets, so it gets each rate's load once untimed before the timed run. The model's EOS and
padding ids get a large negative output bias, as in a trained GPT-J, so every
request generates exactly its max_tokens on every server.

The goals (issue 12): gptj's output tokens/s over the run at the highest offered
rate (where every engine is saturated: its capacity) >= 2x the previous engine's, and the
p99 TTFT of short requests <= 1/3 of the previous engine's at the highest rate
the previous engine sustains (completes >= 90% of the offered request rate).

Two more workloads (issue 23), each with its own servers on the same weights:

  --workload=adapters   mixed traffic over 4 LoRA adapters (PEFT directories of
            ranks 8, 16, 16, 32 on different projections) and the base,
            each request's model drawn at random, Poisson arrivals as above:
            one gptj server holding the base once and every adapter
            (`config.serve.adapters`, rows of all of them in one batch)
            against five servers, one per model with its adapter merged
            (`lora.init_from`), running at once. Both get the same slots in
            all (10: 2 per merged server); the report gives what each holds in
            memory (the five hold the weights five times).
  --workload=prefix     20 requests sharing a 1,500-token prefix, each with its
            own 10-30 token question (16 tokens out), sent one after another
            (each when the one before has finished, so a request's time to
            first token is its own prefill): one server without a prefix cache,
            one with (`config.serve.prefix_cache_gib`), on the bench model at a
            2,048-token context. Goal: the TTFT of requests 2-20 >= 5x lower
            with the cache, and every output the same.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see decode_vs_hf.py: torch's spinning threads on a shared CPU

from benchmarks.common import BENCH_MODEL, add_common_args, cpu_description, emit_results, result  # noqa: E402

PREVIOUS_ENGINE_FILE = "gptj/serve_batching.py"
SHORT_TOKENS = 16
SLOTS = 8
GPT2_VOCAB = 50257
EOS = 50256


# -- the workload -----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Request:
    at: float           # seconds after the run starts
    prompt: list
    max_tokens: int
    model: str = ""     # the request's `model` ("": left out, the server's base)


def workload(rate: float, count: int, seed: int, max_len: int, prompt_median: int = 32, prompt_max: int = 200,
             output_median: int = 24, output_max: int = 128, vocab: int = GPT2_VOCAB) -> list[Request]:
    """`count` requests arriving as a Poisson process of `rate` per second, with lognormal prompt and output
    lengths (medians and caps as given; a prompt plus its output fits `max_len`), seeded."""
    import numpy as np

    rng = np.random.default_rng(seed)
    gaps = rng.exponential(1.0 / rate, count)
    prompts = np.clip(np.round(rng.lognormal(np.log(prompt_median), 0.8, count)), 1, min(prompt_max, max_len - 1))
    prompts = prompts.astype(int)
    outputs = np.clip(np.round(rng.lognormal(np.log(output_median), 0.9, count)), 1, output_max).astype(int)
    requests, at = [], 0.0
    for gap, p, o in zip(gaps, prompts, outputs):
        at += float(gap)
        o = int(min(o, max_len - p))
        requests.append(Request(at, rng.integers(0, vocab, int(p)).tolist(), o))
    return requests


def with_models(requests: list[Request], models: list[str], seed: int) -> list[Request]:
    """`requests`, each with a `model` drawn uniformly from `models` (seeded)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    return [dataclasses.replace(r, model=models[int(rng.integers(len(models)))]) for r in requests]


def shared_prefix_requests(count: int, prefix_tokens: int, seed: int, max_tokens: int = 16,
                           vocab: int = GPT2_VOCAB) -> list[Request]:
    """`count` requests sharing one random `prefix_tokens`-token prefix, each with its own 10-30 token question."""
    import numpy as np

    rng = np.random.default_rng(seed)
    prefix = rng.integers(0, vocab, prefix_tokens).tolist()
    return [Request(0.0, prefix + rng.integers(0, vocab, int(rng.integers(10, 31))).tolist(), max_tokens)
            for _ in range(count)]


@dataclasses.dataclass
class Outcome:
    request: Request
    status: int = 0
    sent: float = 0.0
    first: float | None = None
    last: float | None = None
    tokens: int = 0              # tokens the streamed events carried
    usage: int | None = None     # completion_tokens of the stream's usage event, when the server sends one
    error: str = ""
    text: str = ""
    arrivals: list = dataclasses.field(default_factory=list)  # (time, tokens) of each streamed event

    @property
    def output_tokens(self) -> int:
        """The request's output tokens: the server's usage, else the tokens the events carried."""
        return self.tokens if self.usage is None else self.usage

    def received(self, count: int) -> None:
        now = time.monotonic()
        self.first = self.first or now
        self.last = now
        self.tokens += count
        self.arrivals.append((now, count))


async def _one(client, url: str, request: Request, start: float, model: str = "") -> Outcome:
    outcome = Outcome(request)
    await asyncio.sleep(max(0.0, start + request.at - time.monotonic()))
    outcome.sent = time.monotonic()
    body = {"prompt": [request.prompt], "max_tokens": request.max_tokens, "temperature": 0, "stream": True,
            "logprobs": 0, "ignore_eos": True, "stream_options": {"include_usage": True},
            **({"model": model} if model else {})}
    try:
        async with client.stream("POST", url + "/v1/completions", json=body) as reply:
            outcome.status = reply.status_code
            if reply.status_code != 200:
                outcome.error = (await reply.aread()).decode(errors="replace")[:200]
                return outcome
            async for line in reply.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                event = json.loads(line[len("data: "):])
                if "error" in event:
                    outcome.error = str(event["error"])[:200]
                    continue
                if not event.get("choices"):  # the usage event
                    outcome.usage = (event.get("usage") or {}).get("completion_tokens")
                    continue
                logprobs = event["choices"][0].get("logprobs") or {}
                count = len(logprobs.get("tokens") or [])
                outcome.text += event["choices"][0].get("text") or ""
                if count or event["choices"][0].get("text"):
                    outcome.received(count)
    except Exception as e:  # noqa: BLE001 - a failed request is a result, not a crash
        outcome.error = f"{type(e).__name__}: {e}"[:200]
    return outcome


def _route(url: str | dict[str, str], request: Request) -> tuple[str, str]:
    """(server, `model` to send) of a request: `url` with the request's model, or the server `url` (a dict)
    names for its model, which serves that model alone (no `model` sent)."""
    return (url, request.model) if isinstance(url, str) else (url[request.model], "")


async def _run(url: str | dict[str, str], requests: list[Request], timeout: float) -> tuple[list[Outcome], float]:
    import httpx

    limits = httpx.Limits(max_connections=len(requests) + 1, max_keepalive_connections=len(requests) + 1)
    async with httpx.AsyncClient(timeout=timeout, limits=limits) as client:
        start = time.monotonic() + 0.1
        outcomes = await asyncio.gather(*(_one(client, server_url, r, start, model)
                                          for r in requests for server_url, model in [_route(url, r)]))
    end = max([o.last for o in outcomes if o.last] + [start])
    return list(outcomes), end - start


def server_counters(url: str | dict[str, str]) -> dict:
    """The server's generated-token counter (vLLM's name, else gptj's) and its process CPU seconds, from
    /metrics (summed over the servers of a dict of them); a name the server does not export is left out."""
    import httpx

    if not isinstance(url, str):
        found: dict = {}
        for each in [server_counters(u) for u in url.values()]:
            for key, value in each.items():
                found[key] = found.get(key, 0.0) + value
        return found
    names = {"vllm:generation_tokens_total": "generated", "gptj_tokens_generated_total": "generated",
             "process_cpu_seconds_total": "cpu_seconds"}
    found = {}
    try:
        text = httpx.get(url + "/metrics", timeout=30).text
    except httpx.HTTPError:
        return found
    for line in text.splitlines():
        name = line.split("{")[0].split(" ")[0]
        if name in names and names[name] not in found:
            found[names[name]] = float(line.rsplit(" ", 1)[1])
    return found


def run_load(url: str | dict[str, str], requests: list[Request], timeout: float = 1800.0) -> dict:
    """Sends `requests` open-loop to `url` (or, a dict, to the server of each request's model); returns the
    summary (see `summarize`) with the servers' own count of the tokens they generated over the run
    (`server_tokens`, None when they export none) and their CPU seconds per output token
    (`cpu_ms_per_token`, None when they export no process CPU time)."""
    before = server_counters(url)
    outcomes, seconds = asyncio.run(_run(url, requests, timeout))
    after = server_counters(url)
    summary = summarize(outcomes, seconds, requests[-1].at)
    delta = {key: after[key] - before[key] for key in after.keys() & before.keys()}
    summary["server_tokens"] = delta.get("generated")
    summary["cpu_ms_per_token"] = (1e3 * delta["cpu_seconds"] / summary["tokens"]
                                   if "cpu_seconds" in delta and summary["tokens"] else None)
    return summary


def run_one_after_another(url: str, requests: list[Request], timeout: float = 1800.0) -> list[Outcome]:
    """Sends each request when the one before has finished (closed loop, one at a time)."""
    import httpx

    async def run():
        async with httpx.AsyncClient(timeout=timeout) as client:
            return [await _one(client, url, request, time.monotonic()) for request in requests]

    return asyncio.run(run())


def _pct(values: list[float], q: float) -> float | None:
    import numpy as np

    return float(np.percentile(values, q)) if values else None


def summarize(outcomes: list[Outcome], seconds: float, offered_span: float) -> dict:
    """Throughput and latency percentiles of one run.

    `tokens_per_s` counts every token over the whole run (first request sent to last token), so a
    run's ramp-up and drain are in it; `window_tokens_per_s` counts only the tokens streamed while
    requests were still arriving (0 for a server whose first token comes after the last arrival).
    """
    ok = [o for o in outcomes if o.status == 200 and not o.error and o.first is not None]
    ttft = [o.first - o.sent for o in ok]
    short = [o.first - o.sent for o in ok if o.request.max_tokens <= SHORT_TOKENS]
    tpot = [(o.last - o.first) / (o.tokens - 1) for o in ok if o.tokens > 1]
    tokens = sum(o.output_tokens for o in ok)
    opened, closed = min(o.sent for o in outcomes), max(o.sent for o in outcomes)
    in_window = sum(n for o in ok for t, n in o.arrivals if opened <= t <= closed)
    return {"requests": len(outcomes), "ok": len(ok), "errors": len(outcomes) - len(ok),
            "error_sample": next((o.error or f"status {o.status}" for o in outcomes if o not in ok), ""),
            "seconds": seconds, "tokens": tokens, "tokens_per_s": tokens / seconds if seconds > 0 else 0.0,
            "token_source": "usage" if ok and all(o.usage is not None for o in ok) else "events",
            "streamed_tokens": sum(o.tokens for o in ok),
            "window_tokens_per_s": in_window / (closed - opened) if closed > opened else 0.0,
            "requests_per_s": len(ok) / seconds if seconds > 0 else 0.0,
            "offered_per_s": (len(outcomes) - 1) / offered_span if offered_span > 0 else 0.0,
            "expected_tokens": sum(o.request.max_tokens for o in outcomes),
            "ttft_p50": _pct(ttft, 50), "ttft_p99": _pct(ttft, 99), "short_ttft_p50": _pct(short, 50),
            "short_ttft_p99": _pct(short, 99), "tpot_p50": _pct(tpot, 50), "tpot_p99": _pct(tpot, 99)}


def run_engine_load(engine, requests: list[Request]) -> dict:
    """The same open-loop load straight into a running `gptj.inference.engine.Engine` (no HTTP), as gpu_bench uses it."""
    from gptj.inference.engine import GENERATE, Job

    outcomes = [Outcome(r) for r in requests]

    def listener(outcome):
        def update(generation):
            if len(generation.tokens) > outcome.tokens:
                outcome.received(len(generation.tokens) - outcome.tokens)
        return update

    start, jobs = time.monotonic() + 0.05, []
    for outcome in outcomes:
        time.sleep(max(0.0, start + outcome.request.at - time.monotonic()))
        outcome.sent = time.monotonic()
        job = Job(GENERATE, outcome.request.prompt, max_new_tokens=outcome.request.max_tokens, temperature=0.0,
                  on_update=listener(outcome))
        engine.submit([job])
        jobs.append(job)
    for job, outcome in zip(jobs, outcomes):
        try:
            job.future.result()
            outcome.status = 200
        except Exception as e:  # noqa: BLE001 - counted as an error
            outcome.error = f"{type(e).__name__}: {e}"[:200]
    end = max([o.last for o in outcomes if o.last] + [start])
    return summarize(outcomes, end - start, requests[-1].at)


def sustained(summary: dict) -> bool:
    """The server kept up: it completed at least 90% of the offered request rate, without errors."""
    return summary["errors"] == 0 and summary["requests_per_s"] >= 0.9 * summary["offered_per_s"]


# -- the servers ------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def bench_weights(folder: str, seed: int = 0, max_len: int = BENCH_MODEL["max_len"]) -> str:
    """The CPU bench model (of context `max_len`) as an HF GPT-J checkpoint in `folder` (fp32); EOS and padding
    ids never chosen."""
    import torch
    import transformers

    from gptj.model.transformer import GPTJConfig
    from gptj.weights.formats.hf import hf_config_dict

    config = GPTJConfig(**{**BENCH_MODEL, "max_len": max_len})
    torch.manual_seed(seed)
    hf_config = transformers.GPTJConfig(**{k: v for k, v in hf_config_dict(config).items()
                                           if k not in ("architectures", "model_type", "torch_dtype", "dtype")})
    model = transformers.GPTJForCausalLM(hf_config).eval()
    with torch.no_grad():
        model.lm_head.bias[EOS:] = -1e4  # like a trained model's padding rows; no early EOS either
    model.save_pretrained(folder)
    return folder


@contextlib.contextmanager
def server(command: list[str], cwd: str, env: dict, port: int, log_path: str, startup_s: float = 900.0):
    """Runs a server process; yields its URL once /health answers; stops it (SIGINT, then SIGKILL)."""
    import httpx

    url = f"http://127.0.0.1:{port}"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(command, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            deadline = time.monotonic() + startup_s
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"server exited with {proc.returncode}; see {log_path}")
                if time.monotonic() > deadline:
                    raise RuntimeError(f"server not up after {startup_s:.0f} s; see {log_path}")
                try:
                    if httpx.get(url + "/health", timeout=5).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                time.sleep(1.0)
            yield url
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGINT)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def previous_engine_commit(root: str) -> str:
    """The last commit whose tree has the previous engine: the parent of the one that removed it (or HEAD)."""
    removed = subprocess.run(["git", "log", "-1", "--format=%H", "--diff-filter=D", "--", PREVIOUS_ENGINE_FILE],
                             cwd=root, capture_output=True, text=True, check=True).stdout.strip()
    return f"{removed}^" if removed else "HEAD"


def unpack(root: str, commit: str, folder: str) -> str:
    """The tree of `commit` as plain files in `folder` (`git archive`: no worktree left registered)."""
    archive = subprocess.run(["git", "archive", "--format=tar", commit], cwd=root, capture_output=True, check=True)
    subprocess.run(["tar", "-x", "-C", folder], input=archive.stdout, check=True)
    if not os.path.exists(os.path.join(folder, PREVIOUS_ENGINE_FILE)):
        raise RuntimeError(f"commit {commit} has no {PREVIOUS_ENGINE_FILE}; pass --previous-commit")
    return folder


def gptj_command(tree: str, hf_dir: str, workdir: str, port: int, extra: list[str], slots: int = SLOTS) -> list[str]:
    return [sys.executable, os.path.join(tree, "main.py"), f"--config={os.path.join(tree, 'gptj/configs/tiny.py')}",
            f"--workdir={workdir}", "--mode=serve", f"--port={port}", f"--config.init_from=hf:{hf_dir}",
            "--config.mesh.data=1", f"--config.serve.max_batch_size={slots}",
            "--config.serve.max_new_tokens_limit=256"] + extra


# -- HF generate, one request at a time ----------------------------------------------------------


def serve_hf(hf_dir: str, port: int) -> None:
    """`--serve-hf`: an OpenAI-style streaming /v1/completions over HF `generate`, one request at a time."""
    import threading

    import torch
    import transformers
    import uvicorn
    from fastapi import Body, FastAPI
    from fastapi.responses import StreamingResponse

    torch.set_num_threads(os.cpu_count() or 1)
    model = transformers.GPTJForCausalLM.from_pretrained(hf_dir).eval()
    suppressed = list(range(GPT2_VOCAB, model.config.vocab_size))
    lock = threading.Lock()
    app = FastAPI()

    class Streamer(transformers.generation.streamers.BaseStreamer):
        def __init__(self, loop, queue):
            self.loop, self.queue, self.prompt_seen = loop, queue, False

        def put(self, value):
            if not self.prompt_seen:  # generate() passes the prompt first
                self.prompt_seen = True
                return
            self.loop.call_soon_threadsafe(self.queue.put_nowait, value.reshape(-1).tolist())

        def end(self):
            self.loop.call_soon_threadsafe(self.queue.put_nowait, None)

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.post("/v1/completions")
    async def completions(body: dict = Body(...)):
        ids = torch.tensor(body["prompt"])
        loop, queue = asyncio.get_running_loop(), asyncio.Queue()
        streamer = Streamer(loop, queue)

        def generate():
            with lock, torch.inference_mode():
                model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                               max_new_tokens=body["max_tokens"], min_new_tokens=body["max_tokens"],
                               eos_token_id=None, pad_token_id=0, suppress_tokens=suppressed, streamer=streamer)

        task = loop.run_in_executor(None, generate)

        async def events():
            made = 0
            while (tokens := await queue.get()) is not None:
                made += len(tokens)
                choice = {"text": "", "index": 0, "logprobs": {"tokens": [str(t) for t in tokens]},
                          "finish_reason": None}
                yield f"data: {json.dumps({'choices': [choice]})}\n\n"
            await task
            if (body.get("stream_options") or {}).get("include_usage"):
                usage = {"prompt_tokens": len(body["prompt"][0]), "completion_tokens": made,
                         "total_tokens": len(body["prompt"][0]) + made}
                yield f"data: {json.dumps({'choices': [], 'usage': usage})}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")


# -- the benchmark ------------------------------------------------------------------------------


def measure(name: str, url: str | dict[str, str], rates: list[float], count: int, max_len: int, warm_pass: bool,
            models: list[str] = ()) -> dict:
    """{rate: summary}. With `warm_pass`, each rate's load first runs once untimed, for a server that
    compiles lazily (the previous engine compiles a program per batch, prompt and generation bucket).
    With `models`, each request names one of them at random (`url`: a dict of a server per model)."""
    import httpx

    results = {}
    for i, rate in enumerate(rates):
        requests = workload(rate, count, seed=i, max_len=max_len)
        if models:
            requests = with_models(requests, list(models), seed=100 + i)
        if warm_pass:
            run_load(url, requests)
        summary = run_load(url, requests)
        results[rate] = summary
        compiled = sum(httpx.get(u + "/health", timeout=30).json().get("compiled_while_serving") or 0
                       for u in ([url] if isinstance(url, str) else url.values()))
        print(f"  {name:8s} {rate:5.2f} req/s: {summary['tokens_per_s']:7.1f} tokens/s "
              f"({summary['window_tokens_per_s']:.1f} while arriving), TTFT p50/p99 "
              f"{_ms(summary['ttft_p50'])}/{_ms(summary['ttft_p99'])} ms (short {_ms(summary['short_ttft_p99'])}), "
              f"TPOT p50/p99 {_ms(summary['tpot_p50'])}/{_ms(summary['tpot_p99'])} ms, "
              f"{summary['errors']} errors {summary['error_sample']}; {token_check(summary)}"
              + ("" if summary["cpu_ms_per_token"] is None else
                 f"; server CPU {summary['cpu_ms_per_token']:.2f} ms/token")
              + f", programs compiled while serving: {compiled}", flush=True)
    return results


def token_check(summary: dict) -> str:
    """How the run's output tokens were counted, and whether the events and the server's counter agree."""
    parts = [f"{summary['tokens']} output tokens ({summary['token_source']})"]
    if summary["token_source"] == "usage":
        parts.append(f"events carried {summary['streamed_tokens']}")
    if summary.get("server_tokens") is not None:
        parts.append(f"server counted {summary['server_tokens']:.0f}")
    return ", ".join(parts)


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{1e3 * seconds:.0f}"


def markdown(results: dict[str, dict], rates: list[float]) -> str:
    """The README table: one row per server and rate."""
    lines = ["| server | offered req/s | output tokens/s (run / while arriving) | TTFT p50 / p99 (ms) | "
             "short-request TTFT p99 (ms) | TPOT p50 / p99 (ms) | server CPU ms / token | errors |",
             "|---|---|---|---|---|---|---|---|"]
    for name, per_rate in results.items():
        for rate in rates:
            s = per_rate.get(rate)
            if s is None:
                continue
            lines.append(f"| {name} | {rate:g} | {s['tokens_per_s']:.0f} / {s['window_tokens_per_s']:.0f} | "
                         f"{_ms(s['ttft_p50'])} / {_ms(s['ttft_p99'])} "
                         f"| {_ms(s['short_ttft_p99'])} | {_ms(s['tpot_p50'])} / {_ms(s['tpot_p99'])} | "
                         f"{'-' if s.get('cpu_ms_per_token') is None else format(s['cpu_ms_per_token'], '.2f')} | "
                         f"{s['errors']} |")
    return "\n".join(lines) + "\n"


def rows_for(results: dict[str, dict], rates: list[float], machine: str) -> list[dict]:
    """The results contract: capacity against each peer, and short-request p99 TTFT against the previous engine."""
    rows = []
    ours, top = results.get("gptj"), max(rates)
    if ours is None:
        return rows
    for peer, label in (("previous", "previous batching engine"), ("hf", "HF generate, one at a time")):
        if peer in results:
            rows.append(result(
                f"serving capacity, output tokens/s under Poisson {top:g} req/s (bench model, {SLOTS} slots, streamed)",
                "tokens/s", ours[top]["tokens_per_s"], peer=results[peer][top]["tokens_per_s"], peer_name=label,
                note=(f"goal >= 2x the previous engine; every output token over the run (first request sent to "
                      f"last token), requests arriving faster than any server keeps up; while they arrived "
                      f"{ours[top]['window_tokens_per_s']:.0f} vs {results[peer][top]['window_tokens_per_s']:.0f} "
                      f"tokens/s; TTFT p50 {_ms(ours[top]['ttft_p50'])} vs {_ms(results[peer][top]['ttft_p50'])} ms; "
                      f"{machine}")))
    if "gptj-coarse" in results:
        mine, theirs = ours[top], results["gptj-coarse"][top]
        if mine.get("cpu_ms_per_token") and theirs.get("cpu_ms_per_token"):
            rows.append(result(
                f"server CPU per output token, one event per token vs one per decode call (Poisson {top:g} req/s)",
                "ms", mine["cpu_ms_per_token"], peer=theirs["cpu_ms_per_token"],
                peer_name="gptj, stream_interval = decode_steps", higher_is_better=False,
                note=(f"what per-token streaming costs; output tokens/s {mine['tokens_per_s']:.0f} vs "
                      f"{theirs['tokens_per_s']:.0f}, TPOT p50 {_ms(mine['tpot_p50'])} vs {_ms(theirs['tpot_p50'])} "
                      f"ms; {machine}")))
    if "previous" in results:
        held = [r for r in rates if sustained(results["previous"][r])] or [min(rates)]
        rate = max(held)
        mine, theirs = ours[rate]["short_ttft_p99"], results["previous"][rate]["short_ttft_p99"]
        if mine and theirs:
            rows.append(result(
                f"p99 time to first token, short requests (<= {SHORT_TOKENS} tokens), Poisson {rate:g} req/s",
                "ms", 1e3 * mine, peer=1e3 * theirs, peer_name="previous batching engine", higher_is_better=False,
                note=(f"goal <= 1/3 of the previous engine's (ratio >= 3x), at the highest rate it sustains; "
                      f"TPOT p99 {_ms(ours[rate]['tpot_p99'])} vs {_ms(results['previous'][rate]['tpot_p99'])} ms")))
    return rows


# -- --workload=adapters: one server of many adapters against one server per merged adapter ------------------

# (name, rank, targets) of the adapters of the mixed workload.
ADAPTERS = (("a0", 8, ("q_proj", "v_proj")), ("a1", 16, ("q_proj", "k_proj", "v_proj", "out_proj")),
            ("a2", 16, ("fc_in", "fc_out")), ("a3", 32, ("q_proj", "k_proj", "v_proj", "out_proj", "fc_in", "fc_out")))
SLOTS_PER_MODEL = 2  # each merged server's slots; the multi-adapter server gets as many in all


def adapter_dirs(folder: str, seed: int = 0) -> dict[str, str]:
    """Random PEFT adapters (ADAPTERS) of the bench model in `folder`: {name: directory}."""
    import numpy as np

    from gptj.model.lora import adapter_tree
    from gptj.model.transformer import GPTJConfig, LoraConfig
    from gptj.weights.formats.peft import adapter_pair_shapes, write_peft

    config, rng, dirs = GPTJConfig(**BENCH_MODEL), np.random.default_rng(seed), {}
    for name, rank, targets in ADAPTERS:
        lora = LoraConfig(rank=rank, alpha=2.0 * rank, targets=targets)
        pairs = {t: tuple(rng.normal(0.0, 0.02, shape).astype(np.float32) for shape in shapes)
                 for t, shapes in adapter_pair_shapes(config, lora).items()}
        dirs[name] = os.path.join(folder, name)
        write_peft(adapter_tree(pairs), config, lora, dirs[name])
    return dirs


def deployment_bytes(slots: int, copies: int, pool_slots: int = 0, pool_rank: int = 0) -> int:
    """What a deployment holds (fp32): `copies` of the bench model's weights, KV caches of `slots` rows of its
    context in all, and an adapter pool of `pool_slots` x `pool_rank` (gptj.model.lora.pool_shapes)."""
    import math

    import flax.linen as nn

    from gptj.model.lora import pool_shapes
    from gptj.model.transformer import GPTJConfig, abstract_params, count_params

    config = GPTJConfig(**BENCH_MODEL)
    weights = 4 * count_params(nn.meta.unbox(abstract_params(config)))
    kv = 2 * config.num_layers * config.d_model * (config.max_len + 1) * 4
    pool = sum(4 * math.prod(shape) for pair in pool_shapes(config, pool_slots, pool_rank).values()
               for shape in pair) if pool_slots else 0
    return copies * weights + slots * kv + pool


def run_adapters(args, tmp: str, env: dict, logs: str, machine: str) -> tuple[list[dict], str]:
    """--workload=adapters: (rows, the README table); see the module docstring."""
    rates = [float(r) for r in (args.rates or ("4" if args.quick else "2,4,8")).split(",")]
    count = args.requests or (32 if args.quick else 64)
    models = [""] + [name for name, _, _ in ADAPTERS]
    hf_dir = bench_weights(os.path.join(tmp, "hf"))
    dirs = adapter_dirs(os.path.join(tmp, "adapters"))
    total = SLOTS_PER_MODEL * len(models)
    rank = max(r for _, r, _ in ADAPTERS)
    results: dict[str, dict] = {}
    with contextlib.ExitStack() as stack:
        print("starting one server with every adapter ...", flush=True)
        adapters = ",".join(f"{name}=peft:{path}" for name, path in dirs.items())
        port = free_port()
        command = gptj_command(ROOT, hf_dir, os.path.join(tmp, "run-multi"), port,
                               [f"--config.serve.adapters={adapters}", f"--config.serve.max_adapter_rank={rank}"],
                               slots=total)
        url = stack.enter_context(server(command, ROOT, env, port, os.path.join(logs, "adapters-multi.log")))
        results["one server, every adapter"] = measure("multi", url, rates, count, BENCH_MODEL["max_len"], False,
                                                       models)
    with contextlib.ExitStack() as stack:
        urls = {}
        for model in models:
            print(f"starting the server of {model or 'the base'} ...", flush=True)
            extra = [f"--config.lora.init_from=peft:{dirs[model]}"] if model else []
            port = free_port()
            command = gptj_command(ROOT, hf_dir, os.path.join(tmp, f"run-{model or 'base'}"), port, extra,
                                   slots=SLOTS_PER_MODEL)
            urls[model] = stack.enter_context(server(command, ROOT, env, port,
                                                     os.path.join(logs, f"adapters-{model or 'base'}.log")))
        results["a server per merged model"] = measure("separate", urls, rates, count, BENCH_MODEL["max_len"],
                                                       False, models)
    multi_bytes = deployment_bytes(total, 1, len(ADAPTERS), rank)
    separate_bytes = deployment_bytes(total, len(models))
    memory = (f"{total} slots in all; memory (fp32 weights, KV caches, adapter pool): one server "
              f"{multi_bytes / 2**20:.0f} MiB, five servers {separate_bytes / 2**20:.0f} MiB")
    print(memory, flush=True)
    ours, theirs, top = results["one server, every adapter"], results["a server per merged model"], max(rates)
    peer = "a server per merged adapter (5)"
    rows = [result(
        f"mixed-adapter capacity, output tokens/s under Poisson {top:g} req/s (4 adapters + base, bench model)",
        "tokens/s", ours[top]["tokens_per_s"], peer=theirs[top]["tokens_per_s"], peer_name=peer,
        note=(f"TTFT p50 {_ms(ours[top]['ttft_p50'])} vs {_ms(theirs[top]['ttft_p50'])} ms, p99 "
              f"{_ms(ours[top]['ttft_p99'])} vs {_ms(theirs[top]['ttft_p99'])} ms; {memory}; {machine}"))]
    if ours[top]["cpu_ms_per_token"] and theirs[top]["cpu_ms_per_token"]:
        # On a machine others load too, five processes take a larger share of the cores than one: the CPU time
        # the servers spent per output token is the comparison that share does not tilt.
        rows.append(result(
            f"mixed-adapter serving, server CPU per output token, Poisson {top:g} req/s (4 adapters + base)", "ms",
            ours[top]["cpu_ms_per_token"], peer=theirs[top]["cpu_ms_per_token"], peer_name=peer,
            higher_is_better=False, note=f"every server process's CPU time over the run; {memory}; {machine}"))
    return rows, f"{memory}\n\n" + markdown(results, rates)


# -- --workload=prefix: shared-prefix traffic with and without the prefix cache ---------------------------------

PREFIX_TOKENS, PREFIX_CONTEXT, PREFIX_BLOCK = 1500, 2048, 64


def run_prefix(args, tmp: str, env: dict, logs: str, machine: str) -> tuple[list[dict], str]:
    """--workload=prefix: (rows, the README table); see the module docstring."""
    import statistics

    import httpx

    count = args.requests or 20
    hf_dir = bench_weights(os.path.join(tmp, "hf-2048"), max_len=PREFIX_CONTEXT)
    # Two requests of another prefix compile the programs the timed ones use (a first prompt's, a later one's).
    warm = shared_prefix_requests(2, PREFIX_TOKENS, seed=1)
    timed = shared_prefix_requests(count, PREFIX_TOKENS, seed=2)
    outcomes, health = {}, {}
    for name, gib in (("without prefix cache", 0.0), ("with prefix cache", 0.25)):
        port = free_port()
        command = gptj_command(ROOT, hf_dir, os.path.join(tmp, f"run-prefix-{gib}"), port,
                               [f"--config.serve.prefix_cache_gib={gib}",
                                f"--config.serve.prefix_block_size={PREFIX_BLOCK}", "--config.serve.warmup=false"])
        print(f"starting the server {name} ...", flush=True)
        with server(command, ROOT, env, port, os.path.join(logs, f"prefix-{gib}.log")) as url:
            run_one_after_another(url, warm)
            before = httpx.get(url + "/health", timeout=30).json()
            outcomes[name] = run_one_after_another(url, timed)
            after = httpx.get(url + "/health", timeout=30).json()
            health[name] = {key: after[key] - before[key] for key in ("prefilled_tokens", "prompt_tokens",
                                                                      "prefix_cache_hits", "prefix_cache_misses",
                                                                      "prefix_cache_tokens_saved")}
        errors = [o.error for o in outcomes[name] if o.error or o.status != 200]
        if errors:
            raise RuntimeError(f"{name}: {len(errors)} requests failed: {errors[0]}")
        ttft = [o.first - o.sent for o in outcomes[name]]
        print(f"  {name}: TTFT first {_ms(ttft[0])} ms, later p50 {_ms(statistics.median(ttft[1:]))} ms", flush=True)
    plain, cached = outcomes["without prefix cache"], outcomes["with prefix cache"]
    same = sum(a.text == b.text for a, b in zip(plain, cached))
    later = {name: statistics.median([o.first - o.sent for o in rows[1:]]) for name, rows in outcomes.items()}
    first = {name: rows[0].first - rows[0].sent for name, rows in outcomes.items()}
    stats = health["with prefix cache"]
    table = ("| server | TTFT, first request (ms) | TTFT, requests 2-20, p50 (ms) | prompt tokens prefilled | "
             "prefix-cache hits / misses | outputs equal |\n|---|---|---|---|---|---|\n")
    for name in outcomes:
        h = health[name]
        table += (f"| {name} | {_ms(first[name])} | {_ms(later[name])} | {h['prefilled_tokens']} of "
                  f"{h['prompt_tokens']} | {h['prefix_cache_hits']} / {h['prefix_cache_misses']} | "
                  f"{same} of {count} |\n")
    rows = [result(
        f"time to first token, requests 2-{count} sharing a {PREFIX_TOKENS}-token prefix (bench model, one after "
        "another)", "ms", 1e3 * later["with prefix cache"], peer=1e3 * later["without prefix cache"],
        peer_name="gptj without prefix cache", higher_is_better=False,
        note=(f"goal >= 5x; first request {_ms(first['with prefix cache'])} vs {_ms(first['without prefix cache'])} "
              f"ms; outputs equal {same} of {count}; {stats['prefix_cache_tokens_saved']} prompt tokens taken from "
              f"the cache; {machine}"))]
    return rows, table


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser)
    parser.add_argument("--workload", default="load", choices=("load", "adapters", "prefix"),
                        help="load: the three engines (default); adapters: many adapters in one server against a "
                             "server per merged adapter; prefix: shared-prefix traffic with and without the cache")
    parser.add_argument("--rates", default="", help="offered requests/s, comma separated (default by --quick)")
    parser.add_argument("--requests", type=int, default=0, help="requests per rate (default 32 quick, 64 full)")
    parser.add_argument("--servers", default="gptj,previous,hf",
                        help="which of gptj, previous, hf, gptj-coarse to run")
    parser.add_argument("--previous-commit", default="", help="commit holding the previous engine")
    parser.add_argument("--url", default="", help="load a running server instead (its name: gptj)")
    parser.add_argument("--markdown", default="", help="also write the per-rate table here")
    parser.add_argument("--serve-hf", default="", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve_hf:
        serve_hf(args.serve_hf, args.port)
        return
    machine = cpu_description()
    if args.workload != "load":
        with tempfile.TemporaryDirectory(prefix="gptj-serve-load-") as tmp:
            env = dict(os.environ, JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
                       PYTHONPATH=ROOT)
            env.pop("XLA_FLAGS", None)
            logs = os.path.join(args.json and os.path.dirname(os.path.abspath(args.json)) or tmp, "serve_load_logs")
            os.makedirs(logs, exist_ok=True)
            print(f"serve_load --workload={args.workload}: {machine}", flush=True)
            run = run_adapters if args.workload == "adapters" else run_prefix
            rows, table = run(args, tmp, env, logs, machine)
        print("\n" + table)
        if args.markdown:
            with open(args.markdown, "w") as f:
                f.write(f"`python benchmarks/serve_load.py --workload={args.workload}"
                        f"{' --quick' if args.quick else ''}` on {machine}\n\n{table}")
        emit_results(args.json, rows)
        return
    rates = [float(r) for r in (args.rates or ("1,8" if args.quick else "0.5,1,2,4,8")).split(",")]
    count = args.requests or (32 if args.quick else 64)
    names = [n.strip() for n in args.servers.split(",") if n.strip()]
    print(f"serve_load: rates {rates} req/s, {count} requests each, {machine}", flush=True)
    max_len = BENCH_MODEL["max_len"]
    results: dict[str, dict] = {}
    if args.url:
        results["gptj"] = measure("gptj", args.url, rates, count, max_len, warm_pass=True)
    else:
        with tempfile.TemporaryDirectory(prefix="gptj-serve-load-") as tmp:
            hf_dir = bench_weights(os.path.join(tmp, "hf"))
            env = dict(os.environ, JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
            env.pop("XLA_FLAGS", None)  # one CPU device, as a user's server has
            logs = os.path.join(args.json and os.path.dirname(os.path.abspath(args.json)) or tmp, "serve_load_logs")
            os.makedirs(logs, exist_ok=True)
            for name in names:
                port = free_port()
                if name in ("gptj", "gptj-coarse"):
                    coarse = ["--config.serve.stream_interval=4"] if name == "gptj-coarse" else []  # decode_steps
                    command, cwd = gptj_command(ROOT, hf_dir, os.path.join(tmp, f"run-{name}"), port, coarse), ROOT
                    tree = ROOT
                elif name == "previous":
                    tree = unpack(ROOT, args.previous_commit or previous_engine_commit(ROOT),
                                  tempfile.mkdtemp(dir=tmp, prefix="previous-"))
                    command, cwd = gptj_command(tree, hf_dir, os.path.join(tmp, "run-previous"), port, []), tree
                elif name == "hf":
                    command, cwd, tree = [sys.executable, os.path.abspath(__file__), "--serve-hf", hf_dir,
                                          "--port", str(port)], ROOT, ROOT
                else:
                    parser.error(f"unknown server {name!r}; choose from gptj, gptj-coarse, previous, hf")
                print(f"starting {name} ...", flush=True)
                with server(command, cwd, dict(env, PYTHONPATH=tree), port, os.path.join(logs, f"{name}.log")) as url:
                    results[name] = measure(name, url, rates, count, max_len, warm_pass=name == "previous")
                if name == "previous":
                    shutil.rmtree(tree, ignore_errors=True)
    table = markdown(results, rates)
    print("\n" + table)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(f"`python benchmarks/serve_load.py{' --quick' if args.quick else ''}` on {machine}\n\n" + table)
    emit_results(args.json, rows_for(results, rates, machine))


if __name__ == "__main__":
    main()
