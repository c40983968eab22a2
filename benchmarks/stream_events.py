"""What one event per token costs the server: CPU per streamed token, one event per token against one per call.

    python benchmarks/stream_events.py [--quick] [--json PATH]

The server's streaming path runs in this process over the ASGI app (httpx's
ASGITransport: request validation, `TokenStream`, each event's JSON body,
Starlette's response; no socket), fed by a stand-in engine that reports four
tokens at a time from its own thread, as the engine reports a decode call of
`decode_steps` = 4. The model's compute, the same whatever the granularity,
is left out, so the figure is what the granularity changes: process CPU per
streamed token with `serve.stream_interval` 1 (one event per token, the
default) against 4 (one event per call, as before). The client reads raw
bytes (no parsing), so nearly all of the time is the server's. Medians of
repeated runs, the two settings alternating.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import threading
import time
import types

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks.common import add_common_args, cpu_description, emit_results, result  # noqa: E402

STEP_TOKENS = 4
TEXT = ("The quick brown fox jumps over the lazy dog, and the dog, being lazy, does not mind; "
        "it sleeps on through the afternoon while the fox runs on into the woods beyond the river. ")


class ScriptedEngine:
    """Stands in for `gptj.inference.engine.Engine`: each submitted job gets the first max_new_tokens of
    `tokens`, reported STEP_TOKENS at a time from a worker thread (the engine's partial Generations), then
    finished."""

    def __init__(self, tokenizer, tokens: list[int]):
        from gptj.inference.runner import GPT2_EOS_ID, GPT2_VOCAB_SIZE

        self.tokenizer, self.tokens = tokenizer, tokens
        self.max_queue, self.cache_len, self.eos_id = 1024, 4096, GPT2_EOS_ID
        self.runner = types.SimpleNamespace(vocab_limit=GPT2_VOCAB_SIZE)

    def submit(self, jobs) -> None:
        threading.Thread(target=self._run, args=(jobs,), daemon=True).start()

    def _run(self, jobs) -> None:
        from gptj.inference.runner import Generation

        for job in jobs:
            ids = self.tokens[:job.max_new_tokens]
            for end in range(1, len(ids), STEP_TOKENS):
                job.on_update(Generation(ids[:end], [0.0] * end, None))
            final = Generation(ids, [0.0] * len(ids), "length", self.tokenizer.decode(ids))
            job.on_update(final)
            job.future.set_result(final)

    def cancel(self, jobs) -> None:
        pass


async def _stream_all(app, body: dict, requests: int) -> int:
    import httpx

    received = 0
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://bench") as client:
        for _ in range(requests):
            async with client.stream("POST", "/v1/completions", json=body) as reply:
                assert reply.status_code == 200, await reply.aread()
                async for chunk in reply.aiter_raw():
                    received += len(chunk)
    return received


def cpu_us_per_token(interval: int, tokens_per_request: int, requests: int) -> float:
    """Process CPU microseconds per streamed token with `stream_interval` = interval."""
    from gptj.inference.sampler import get_tokenizer
    from gptj.inference.server import CompletionService, create_app

    tokenizer = get_tokenizer()
    tokens = (tokenizer.encode(TEXT) * (tokens_per_request // 20 + 1))[:tokens_per_request]
    service = CompletionService(ScriptedEngine(tokenizer, tokens), tokenizer, model_name="bench",
                                max_new_tokens_limit=tokens_per_request, stream_interval=interval)
    app = create_app(service)
    body = {"prompt": "Once", "max_tokens": tokens_per_request, "stream": True, "ignore_eos": True,
            "stream_options": {"include_usage": True}}
    start = time.process_time()
    asyncio.run(_stream_all(app, body, requests))
    return 1e6 * (time.process_time() - start) / (tokens_per_request * requests)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser)
    args = parser.parse_args(argv)
    tokens, requests, repeats = (256, 16, 3) if args.quick else (512, 32, 5)
    cpu_us_per_token(1, 16, 2)  # imports and first-call costs out of the timed runs
    runs = {1: [], STEP_TOKENS: []}
    for _ in range(repeats):
        for interval in runs:
            runs[interval].append(cpu_us_per_token(interval, tokens, requests))
    fine, coarse = (statistics.median(runs[i]) for i in (1, STEP_TOKENS))
    machine = cpu_description()
    print(f"stream_events: {requests} requests x {tokens} tokens, {repeats} runs each, {machine}")
    for interval, values in runs.items():
        print(f"  stream_interval {interval}: {', '.join(f'{v:.1f}' for v in values)} us of CPU per token")
    spread = (max(runs[1]) - min(runs[1])) / fine
    emit_results(args.json, [result(
        "server CPU per streamed token, one event per token vs one per decode call of 4", "us", fine,
        peer=coarse, peer_name=f"stream_interval {STEP_TOKENS}", higher_is_better=False, spread=spread,
        note=(f"the streaming path alone (the model's compute left out): one event per token costs "
              f"{fine - coarse:.0f} us of server CPU per token more; {machine}"))])


if __name__ == "__main__":
    main()
