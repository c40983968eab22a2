"""The server on the continuous-batching engine: exactness against HF under load, slots freed by clients that
leave, queue limits, a schema-driven fuzz run, and the regressions for padded vocabularies and lone surrogates."""

import concurrent.futures
import json
import threading
import time

import httpx
import numpy as np
import pytest

from gptj.inference.engine import GENERATE, Job
from gptj.inference.server import build_app
from tests.serve_utils import GPT2_VOCAB_SIZE, PARITY_MAX_LEN, hf_greedy, padded_vocab_pair, running, serve_config

pytest.importorskip("torch")

SLOTS = 4


@pytest.fixture(scope="module")
def pair():
    return padded_vocab_pair()


@pytest.fixture(scope="module")
def server(pair):
    """A 4-slot server over the padded-vocabulary parity model; yields (url, engine)."""
    _, sampler = pair
    app = build_app(sampler, sampler.tokenizer, serve_config(max_batch_size=SLOTS, prefill_chunk=32, decode_steps=2,
                                                             max_queue=64, max_new_tokens_limit=PARITY_MAX_LEN))
    with running(app) as url:
        yield url, app.state.engine


def post(url, body, timeout=120):
    return httpx.post(url + "/v1/completions", json=body, timeout=timeout)


def health(url):
    return httpx.get(url + "/health", timeout=30).json()


def events(lines):
    """The JSON bodies of a server-sent event stream, up to [DONE]."""
    for line in lines:
        if line.startswith("data: "):
            if line == "data: [DONE]":
                return
            yield json.loads(line[len("data: "):])


def wait_until(predicate, timeout=120.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_short_requests_overtake_a_long_streamed_one_and_all_equal_hf(server, pair):
    """While a long greedy request streams, three short ones sent after its first token all finish before it
    does (the old engine made them wait for the batch to drain); every output equals HF generate greedy."""
    url, _ = server
    hf_model, sampler = pair
    rng = np.random.default_rng(0)
    long_prompt = rng.integers(0, GPT2_VOCAB_SIZE, 20).tolist()
    shorts = [(rng.integers(0, GPT2_VOCAB_SIZE, n).tolist(), m) for n, m in ((5, 4), (40, 6), (12, 8))]
    finished_at = {}

    def short(i):
        prompt, budget = shorts[i]
        reply = post(url, {"prompt": [prompt], "max_tokens": budget, "temperature": 0})
        finished_at[i] = time.monotonic()
        return reply

    budget = PARITY_MAX_LEN - len(long_prompt)
    body = {"prompt": [long_prompt], "max_tokens": budget, "temperature": 0, "stream": True}
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=300) as reply, \
            concurrent.futures.ThreadPoolExecutor(3) as pool:
        stream = events(reply.iter_lines())
        text = next(stream)["choices"][0]["text"]
        replies = [pool.submit(short, i) for i in range(3)]
        for event in stream:
            text += event["choices"][0]["text"]
        long_done = time.monotonic()
        replies = [r.result() for r in replies]
    assert all(finished_at[i] < long_done for i in range(3)), "a short request waited for the long one"
    assert text == sampler.tokenizer.decode(hf_greedy(hf_model, long_prompt, budget))
    for (prompt, budget), reply in zip(shorts, replies):
        assert reply.status_code == 200
        assert reply.json()["choices"][0]["text"] == sampler.tokenizer.decode(hf_greedy(hf_model, prompt, budget))


@pytest.mark.slow
def test_32_concurrent_mixed_requests_equal_their_single_request_results(server):
    """Prompt lengths 1-200, max_tokens 1-128, greedy and sampled (temperature, top-p, top-k, seeds), all at
    once: each row equals the same request sent alone (a sampled row with the same seed)."""
    url, engine = server
    rng = np.random.default_rng(1)
    requests = []
    for i in range(32):
        length = int(rng.integers(1, 201))
        budget = int(rng.choice([1, 2, 5, 12, 30, 64, 128]))  # both ends of 1-128, most requests short
        body = {"prompt": [rng.integers(0, GPT2_VOCAB_SIZE, length).tolist()],
                "max_tokens": min(budget, PARITY_MAX_LEN - length), "logprobs": 1}
        if i % 2:
            body.update(temperature=float(rng.choice([0.7, 1.0, 1.3])), top_p=float(rng.choice([1.0, 0.9, 0.5])),
                        top_k=int(rng.choice([0, 0, 40])), seed=int(rng.integers(0, 2**31)))
        else:
            body.update(temperature=0)
        requests.append(body)
    before = engine.counters["decode_calls"]
    barrier = threading.Barrier(32)

    def together(body):
        barrier.wait()
        return post(url, body, timeout=600)

    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        concurrent_replies = list(pool.map(together, requests))
    shared_calls = engine.counters["decode_calls"] - before
    alone = [post(url, body, timeout=600) for body in requests]
    for body, together_reply, alone_reply in zip(requests, concurrent_replies, alone):
        assert together_reply.status_code == alone_reply.status_code == 200
        got, want = together_reply.json()["choices"][0], alone_reply.json()["choices"][0]
        assert got["text"] == want["text"], body
        assert got["logprobs"]["tokens"] == want["logprobs"]["tokens"]
        np.testing.assert_allclose(got["logprobs"]["token_logprobs"], want["logprobs"]["token_logprobs"], atol=1e-4)
    assert shared_calls < sum(r["max_tokens"] for r in requests) / SLOTS  # rows really shared decode calls


def test_clients_that_leave_mid_stream_free_their_slots(server, pair):
    """8 streams closed after their first event: each slot is freed within one decode call of the server
    noticing, the engine ends with no running slot, and the next request is still exact."""
    url, engine = server
    hf_model, sampler = pair
    rng = np.random.default_rng(2)
    since = time.monotonic()

    def leave(i):
        body = {"prompt": [rng.integers(0, GPT2_VOCAB_SIZE, 10 + i).tolist()], "max_tokens": 200, "stream": True,
                "temperature": 0}
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=120) as reply:
            assert reply.status_code == 200
            next(events(reply.iter_lines()))  # one token, then hang up

    with concurrent.futures.ThreadPoolExecutor(SLOTS) as pool:
        list(pool.map(leave, range(8)))
    wait_until(lambda: health(url)["running_slots"] == 0 and health(url)["waiting_rows"] == 0)
    cancelled = [e for e in list(engine.step_log) if e["kind"] == "cancelled" and e["time"] >= since]
    assert len(cancelled) == 8
    # Freed at the engine's next step: at most the decode call already under way ran with the row.
    assert all(e["call"] - e["requested_at_call"] <= 1 for e in cancelled), [(e["requested_at_call"], e["call"])
                                                                              for e in cancelled]
    prompt = rng.integers(0, GPT2_VOCAB_SIZE, 15).tolist()
    reply = post(url, {"prompt": [prompt], "max_tokens": 12, "temperature": 0})
    assert reply.json()["choices"][0]["text"] == sampler.tokenizer.decode(hf_greedy(hf_model, prompt, 12))


def test_a_full_queue_answers_429_at_once_and_overload_gives_no_5xx(server, monkeypatch):
    """The engine is held inside a decode call with every slot busy: 60 mixed requests of two rows each
    arrive; exactly the 32 that fit max_queue (64 rows) wait, the other 28 are answered 429 while the engine
    is still held, and once it runs on, every queued request answers 200 and every stream ends cleanly."""
    url, engine = server
    rng = np.random.default_rng(3)
    prompt = lambda n: [rng.integers(0, GPT2_VOCAB_SIZE, n).tolist()]  # noqa: E731
    gate, real_decode = threading.Event(), engine.runner.decode

    def held_decode(*args, **kwargs):
        gate.wait()
        return real_decode(*args, **kwargs)

    def anything(i):  # two rows each: n=2 completions, or a score and a completion
        body = {"prompt": prompt(1 + i % 30), "max_tokens": 1 + i % 9, "stream": bool(i % 2),
                "temperature": i % 4 * 0.5, "logprobs": i % 3 or None}
        body.update({"n": 2} if i % 3 else {"echo": True, "logprobs": 1})
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=300) as reply:
            text = reply.read().decode()
        return reply.status_code, text

    monkeypatch.setattr(engine.runner, "decode", held_decode)
    with concurrent.futures.ThreadPoolExecutor(64) as pool:
        # One request of SLOTS rows: queued together, so the engine admits all of them in one step.
        holder = pool.submit(post, url, {"prompt": prompt(8), "max_tokens": 20, "n": SLOTS})
        wait_until(lambda: health(url)["running_slots"] == SLOTS)
        flood = [pool.submit(anything, i) for i in range(60)]
        turned_away = 60 - engine.max_queue // 2
        wait_until(lambda: sum(f.done() for f in flood) == turned_away)
        assert [f.result()[0] for f in flood if f.done()] == [429] * turned_away
        assert health(url)["waiting_rows"] == engine.max_queue
        start = time.monotonic()
        busy = post(url, {"prompt": prompt(3), "max_tokens": 1})
        assert busy.status_code == 429 and time.monotonic() - start < 5.0
        assert busy.json()["error"]["type"] == "rate_limit_error" and "retry" in busy.json()["error"]["message"]
        gate.set()
        outcomes = [f.result() for f in flood]
        assert holder.result().status_code == 200
    assert sorted(status for status, _ in outcomes) == [200] * (60 - turned_away) + [429] * turned_away
    assert all('"server_error"' not in text for _, text in outcomes)
    assert all(text.endswith("data: [DONE]\n\n") for status, text in outcomes if status == 200 and "data:" in text)
    wait_until(lambda: health(url)["running_slots"] == 0 and health(url)["waiting_rows"] == 0)


def hf_log_probs(hf_model, tokens: list[int]) -> np.ndarray:
    """log p(next id | prefix) at every position [T, 50257] from HF PyTorch's fp32 logits, in float64 numpy,
    over the tokenizer's vocabulary (the padding ids dropped before the softmax)."""
    import torch

    with torch.no_grad():
        logits = hf_model(torch.tensor([tokens])).logits[0, :, :GPT2_VOCAB_SIZE].double().numpy()
    return logits - np.logaddexp.reduce(logits, axis=-1, keepdims=True)


def test_prompt_logprobs_equal_hf_over_the_tokenizers_vocabulary(server, pair):
    """echo + logprobs (what lm-eval's local-completions sends, with max_tokens 0 and 1): the prompt tokens'
    log-probs and top-5 (served from the chunked head, model.score_targets) equal HF's fp32 logits with the
    padding ids dropped, in numpy; the generated token's entry too. The padding ids would be the argmax
    (serve_utils.PAD_BIAS), so a served log-prob that counted them would be far off. Scoring runs the
    configured attention kernel (attention_impl "auto"); prefill and decode attend over the KV cache."""
    url, _ = server
    hf_model, sampler = pair
    rng = np.random.default_rng(4)
    tokens = rng.integers(0, GPT2_VOCAB_SIZE, 200).tolist()  # two blocks of the blockwise kernel (CPU's auto)
    want = hf_log_probs(hf_model, tokens)
    want_target = [want[i - 1, t] for i, t in enumerate(tokens) if i]
    for max_tokens in (0, 1):
        reply = post(url, {"prompt": [tokens], "max_tokens": max_tokens, "echo": True, "logprobs": 5,
                           "temperature": 0})
        assert reply.status_code == 200, reply.text
        block = reply.json()["choices"][0]["logprobs"]
        assert len(block["token_logprobs"]) == len(tokens) + max_tokens and block["token_logprobs"][0] is None
        np.testing.assert_allclose(block["token_logprobs"][1:len(tokens)], want_target, atol=2e-4)
        for i, top in enumerate(block["top_logprobs"][1:len(tokens) + max_tokens], start=1):
            order = np.argsort(-want[i - 1])[:5]
            np.testing.assert_allclose(sorted(top.values(), reverse=True), want[i - 1, order], atol=2e-4)
            assert set(top) <= {sampler.tokenizer.decode([int(t)]) for t in order}
        if max_tokens:  # the generated (greedy) token is HF's argmax at the last position
            assert block["token_logprobs"][-1] == pytest.approx(want[-1].max(), abs=2e-4)


def test_padded_vocabulary_ids_never_reach_the_tokenizer(server):
    """The model's raw argmax is a padding id (>= 50257; see serve_utils.PAD_BIAS): greedy, hot sampling,
    top-k, top-p and top log-probs all stay inside the tokenizer's vocabulary (these answered 500 before);
    8 rows x 200 tokens at temperature 2 on the server's engine never produce an id >= 50257."""
    url, engine = server
    hot = [Job(GENERATE, [15496, 995], max_new_tokens=200, temperature=2.0, seed=seed, eos_id=None)
           for seed in range(8)]
    engine.submit(hot)
    ids = np.array([job.future.result(timeout=600).tokens for job in hot])
    assert ids.shape == (8, 200) and ids.max() < GPT2_VOCAB_SIZE
    assert len(np.unique(ids)) > 800  # really hot: the draws spread over the vocabulary
    for settings in ({"temperature": 0}, {"temperature": 2.0}, {"temperature": 2.0, "top_k": 50},
                     {"temperature": 2.0, "top_p": 0.95}):
        reply = post(url, {"prompt": "Hello world", "max_tokens": 64, "n": 2, "logprobs": 5, "seed": 1, **settings})
        assert reply.status_code == 200, reply.text
        for choice in reply.json()["choices"]:
            assert len(choice["logprobs"]["tokens"]) == 64
            assert all(len(top) >= 1 for top in choice["logprobs"]["top_logprobs"])
    echo = post(url, {"prompt": [[50256, 50300]], "max_tokens": 0, "echo": True, "logprobs": 1})
    assert echo.status_code == 400 and "prompt.0.1: Input should be less than 50257" in echo.json()["error"]["message"]
    assert httpx.post(url + "/detokenize", json={"tokens": [50300]}).status_code == 400


def test_lone_surrogates_are_a_400_not_a_500(server):
    url, _ = server
    raw = '{"prompt": "\\ud83d", "max_tokens": 2}'
    for path, body in (("/v1/completions", raw), ("/v1/completions", '{"prompt": ["ok", "a\\udc00b"]}'),
                       ("/tokenize", '{"prompt": "\\ud83d"}'), ("/complete", '{"context": "x\\ud83d", "max_tokens": 2}')):
        reply = httpx.post(url + path, content=body, headers={"content-type": "application/json"}, timeout=30)
        assert reply.status_code == 400, (path, reply.text)
        assert "nicode" in reply.json()["error"]["message"], reply.text  # "... valid Unicode ...", "unicode string"
    assert post(url, {"prompt": "\U0001F600 fine", "max_tokens": 2}).status_code == 200


def test_health_and_prometheus_metrics_report_the_engine(server):
    url, _ = server
    post(url, {"prompt": "Count: one, two,", "max_tokens": 5, "temperature": 0})
    state = health(url)
    assert state["slots"] == SLOTS and state["running_slots"] == 0 and state["waiting_rows"] == 0
    assert state["tokens_generated"] >= 5
    text = httpx.get(url + "/metrics", timeout=30).text
    metrics = {line.split(" ")[0]: float(line.split(" ")[1]) for line in text.splitlines() if not line.startswith("#")}
    for name in ("time_to_first_token_seconds", "time_per_output_token_seconds", "queue_wait_seconds"):
        assert metrics[f'gptj_{name}_bucket{{le="+Inf"}}'] == metrics[f"gptj_{name}_count"] > 0
        assert metrics[f"gptj_{name}_sum"] > 0
    assert metrics["gptj_running_slots"] == 0 and metrics["gptj_waiting_rows"] == 0
    assert metrics["gptj_tokens_generated_total"] >= 5
    assert "# TYPE gptj_time_to_first_token_seconds histogram" in text


# -- schema-driven fuzzing ------------------------------------------------------------------------

FUZZ_EXAMPLES = 15


@pytest.fixture(scope="module")
def fuzz_server(pair):
    """The module server's engine shapes (so no new compiles) with tight limits (4 queued rows, 2 new tokens),
    so that generated requests stay cheap."""
    _, sampler = pair
    app = build_app(sampler, sampler.tokenizer, serve_config(max_batch_size=SLOTS, prefill_chunk=32, decode_steps=2,
                                                             max_queue=4, max_new_tokens_limit=2))
    with running(app) as url:
        yield url


@pytest.mark.slow
def test_schema_fuzz_finds_no_5xx_and_no_response_outside_the_schema(fuzz_server):
    """schemathesis generates valid and invalid requests from /openapi.json for every operation; every
    response must be a non-5xx with a documented status, content type and body schema."""
    schemathesis = pytest.importorskip("schemathesis")
    from hypothesis import HealthCheck, given, settings
    from schemathesis.checks import not_a_server_error
    from schemathesis.specs.openapi.checks import (content_type_conformance, negative_data_rejection,
                                                   response_schema_conformance, status_code_conformance)

    schema = schemathesis.openapi.from_url(fuzz_server + "/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {f"{op.method.upper()} {op.path}" for op in operations} >= {
        "POST /v1/completions", "POST /v1/chat/completions", "POST /complete", "POST /tokenize", "POST /detokenize",
        "GET /health", "GET /v1/models", "POST /v1/load_lora_adapter", "POST /v1/unload_lora_adapter"}
    checks = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
    for operation in operations:
        negative = [schemathesis.GenerationMode.NEGATIVE] if operation.body else []  # a GET has nothing to break
        for mode in [schemathesis.GenerationMode.POSITIVE] + negative:
            mode_checks = checks + ([negative_data_rejection] if mode == schemathesis.GenerationMode.NEGATIVE else [])

            @settings(max_examples=FUZZ_EXAMPLES, deadline=None, database=None, derandomize=True,
                      suppress_health_check=list(HealthCheck))
            @given(operation.as_strategy(generation_mode=mode))
            def call(case):
                response = case.call(base_url=fuzz_server, timeout=120)
                case.validate_response(response, checks=mode_checks)

            call()

