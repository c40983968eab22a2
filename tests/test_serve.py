"""The HTTP server: the official OpenAI client, concurrent clients, errors, the reference API."""

import concurrent.futures
import threading

import httpx
import numpy as np
import pytest

from gptj.inference.server import build_app
from tests.serve_utils import running, serve_config, tiny_sampler

openai = pytest.importorskip("openai")

WORDS = ["The", "A small", "Once upon a time", "In 1998,", "Hello world", "def f(x):", "Paris is", "We"]


@pytest.fixture(scope="module")
def sampler():
    return tiny_sampler()


@pytest.fixture(scope="module")
def server(sampler):
    with running(build_app(sampler, sampler.tokenizer, serve_config())) as url:
        yield url


def client(url):
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)


def health(url):
    return httpx.get(url + "/health", timeout=30).json()


def test_openai_client_plain_and_streamed(server, sampler):
    [want] = sampler.complete(["Once upon a time"], max_new_tokens=12, temperature=0.0)
    api = client(server)
    plain = api.completions.create(model="gptj-test", prompt="Once upon a time", max_tokens=12, temperature=0)
    assert plain.choices[0].text == want.text
    assert plain.choices[0].finish_reason == want.finish_reason
    assert plain.usage.completion_tokens == len(want.tokens)

    chunks = list(api.completions.create(model="gptj-test", prompt="Once upon a time", max_tokens=12, temperature=0,
                                         stream=True))
    assert len(chunks) >= 2  # really streamed, not one final event
    assert "".join(c.choices[0].text for c in chunks) == want.text
    assert chunks[-1].choices[0].finish_reason == want.finish_reason

    # A stop string cuts the text in both modes, and nothing past it is ever streamed.
    stop = want.text[len(want.text) // 2:len(want.text) // 2 + 3]
    cut = want.text[:want.text.find(stop)]
    plain = api.completions.create(model="gptj-test", prompt="Once upon a time", max_tokens=12, temperature=0,
                                   stop=[stop])
    assert plain.choices[0].text == cut and plain.choices[0].finish_reason == "stop"
    streamed = list(api.completions.create(model="gptj-test", prompt="Once upon a time", max_tokens=12, temperature=0,
                                           stop=stop, stream=True))
    assert "".join(c.choices[0].text for c in streamed) == cut


def test_sampling_options_list_prompts_n_and_seed(server, sampler):
    api = client(server)
    kwargs = dict(model="gptj-test", max_tokens=6, temperature=0.9, top_p=0.8, seed=7)
    first = api.completions.create(prompt=["Paris is", "We"], n=2, **kwargs)
    assert [c.index for c in first.choices] == [0, 1, 2, 3]
    again = api.completions.create(prompt=["Paris is", "We"], n=2, **kwargs)
    assert [c.text for c in first.choices] == [c.text for c in again.choices]  # a seed reproduces
    # Choice i of a prompt uses seed + i: the same draw the sampler makes directly.
    direct = sampler.complete(["Paris is", "Paris is"], max_new_tokens=6, temperature=0.9, top_p=0.8, seed=[7, 8])
    assert [c.text for c in first.choices[:2]] == [g.text for g in direct]


def test_concurrent_clients_get_their_own_greedy_answer_sharing_decode_calls(server, sampler):
    prompts = [f"{WORDS[i % len(WORDS)]} {i}" for i in range(32)]
    budgets = [4 + i % 5 for i in range(32)]
    want = [sampler.complete([p], max_new_tokens=m, temperature=0.0)[0].text for p, m in zip(prompts, budgets)]
    before = health(server)
    api = client(server)
    barrier = threading.Barrier(32)

    def ask(i):
        barrier.wait()
        reply = api.completions.create(model="gptj-test", prompt=prompts[i], max_tokens=budgets[i], temperature=0)
        return reply.choices[0].text

    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        got = list(pool.map(ask, range(32)))
    after = health(server)
    assert got == want
    assert after["requests"] - before["requests"] == 32
    calls = after["decode_calls"] - before["decode_calls"]
    assert calls < sum(budgets) // 2, f"{calls} decode calls for {sum(budgets)} tokens: rows did not share steps"


def test_echo_logprobs_return_prompt_scores(server, sampler):
    tokens = sampler.tokenizer.encode("The cat sat on the mat")
    [score] = sampler.score([tokens], top_logprobs=1)
    api = client(server)
    reply = api.completions.create(model="gptj-test", prompt="The cat sat on the mat", max_tokens=0, echo=True,
                                   logprobs=1, temperature=0)
    choice = reply.choices[0]
    assert choice.text == "The cat sat on the mat"
    assert choice.logprobs.token_logprobs[0] is None
    np.testing.assert_allclose(choice.logprobs.token_logprobs[1:], score.token_logprobs[1:], atol=1e-5)
    assert choice.logprobs.tokens == [sampler.tokenizer.decode([t]) for t in tokens]
    # lm-eval's request shape: token ids, max_tokens 1; the last entry is the generated token.
    reply = httpx.post(server + "/v1/completions", timeout=60, json={
        "model": "gptj-test", "prompt": [tokens], "max_tokens": 1, "logprobs": 1, "echo": True, "temperature": 0})
    body = reply.json()["choices"][0]["logprobs"]
    assert len(body["token_logprobs"]) == len(tokens) + 1
    np.testing.assert_allclose(body["token_logprobs"][1:-1], score.token_logprobs[1:], atol=1e-5)
    greedy = [max(top.values()) == lp for top, lp in zip(body["top_logprobs"][1:-1], body["token_logprobs"][1:-1])]
    assert greedy == score.greedy[1:]


def test_reference_complete_api_models_health_tokenizer(server, sampler):
    reply = httpx.post(server + "/complete", json={"context": "eleutherai", "top_p": 0.9, "temp": 0.75,
                                                   "max_tokens": 8}, timeout=60)
    assert reply.status_code == 200 and isinstance(reply.json()["completion"], str)
    models = httpx.get(server + "/v1/models").json()
    assert models["data"][0]["id"] == "gptj-test"
    assert health(server)["status"] == "ok"
    assert "gptj_decode_calls_total" in httpx.get(server + "/metrics").text
    tokens = httpx.post(server + "/tokenize", json={"prompt": "Hello world"}).json()["tokens"]
    assert tokens == [15496, 995]
    assert httpx.post(server + "/detokenize", json={"tokens": tokens}).json()["prompt"] == "Hello world"
    assert httpx.get(server + "/tokenizer_info").json()["eos_token"] == "<|endoftext|>"


BAD_REQUESTS = [
    ("/v1/completions", b"{not json"),
    ("/v1/completions", {"max_tokens": 4}),
    ("/v1/completions", {"prompt": 12, "max_tokens": 4}),
    ("/v1/completions", {"prompt": "hi", "max_tokens": "ten"}),
    ("/v1/completions", {"prompt": "hi", "max_tokens": -1}),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 10 ** 9}),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 65}),
    ("/v1/completions", {"prompt": "word " * 100, "max_tokens": 40}),
    ("/v1/completions", {"prompt": "", "max_tokens": 4}),
    ("/v1/completions", {"prompt": [], "max_tokens": 4}),
    ("/v1/completions", {"prompt": ["ok", ""], "max_tokens": 4}),
    ("/v1/completions", {"prompt": "word " * 200, "max_tokens": 4}),
    ("/v1/completions", {"prompt": [[1, 2, 99999999]], "max_tokens": 4}),
    ("/v1/completions", {"prompt": "hi", "temperature": -1}),
    ("/v1/completions", {"prompt": "hi", "temperature": "hot"}),
    ("/v1/completions", {"prompt": "hi", "top_p": 0}),
    ("/v1/completions", {"prompt": "hi", "n": 0}),
    ("/v1/completions", {"prompt": "hi", "n": 100000}),
    ("/v1/completions", {"prompt": "hi", "logprobs": 9}),
    ("/v1/completions", {"prompt": "hi", "stop": ["a", "b", "c", "d", "e"]}),
    ("/v1/completions", {"prompt": "hi", "stream": "yes"}),
    ("/v1/completions", [1, 2, 3]),
    ("/v1/completions", {"prompt": "hi", "min_tokens": 17}),
    ("/v1/completions", {"prompt": "hi", "stream_options": {"include_usage": True}}),
    ("/v1/completions", {"prompt": "hi", "ignore_eos": "yes"}),
    ("/v1/chat/completions", {"messages": []}),
    ("/v1/chat/completions", {"messages": "hi"}),
    ("/v1/chat/completions", {"messages": [{"role": "robot", "content": "hi"}]}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": 3}]}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": ""}]}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "word " * 200}]}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 65}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "logprobs": True, "top_logprobs": 6}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "n": 100000}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "model": "other"}),
    ("/complete", {"top_p": 0.9, "temp": 1.0}),
    ("/complete", {"context": "hi", "top_p": 2.0, "temp": 1.0}),
    ("/no/such/route", {}),
]


def test_malformed_requests_get_4xx_json_and_the_server_keeps_answering(server):
    for path, body in BAD_REQUESTS:
        if isinstance(body, bytes):
            reply = httpx.post(server + path, content=body, headers={"content-type": "application/json"}, timeout=10)
        else:
            reply = httpx.post(server + path, json=body, timeout=10)
        assert 400 <= reply.status_code < 500, (path, body, reply.status_code, reply.text)
        assert reply.json()["error"]["message"], (path, body)
    reply = httpx.post(server + "/v1/completions", json={"prompt": "Still here", "max_tokens": 3, "temperature": 0},
                       timeout=60)
    assert reply.status_code == 200 and reply.json()["choices"][0]["text"]
    assert health(server)["status"] == "ok"


def test_a_client_that_leaves_mid_stream_does_not_disturb_the_server(server):
    body = {"prompt": "Once upon a time", "max_tokens": 40, "temperature": 0, "stream": True}
    with httpx.stream("POST", server + "/v1/completions", json=body, timeout=60) as reply:
        assert reply.status_code == 200
        next(reply.iter_lines())  # one event, then hang up
    reply = httpx.post(server + "/v1/completions", json={"prompt": "Still here", "max_tokens": 3, "temperature": 0},
                       timeout=60)
    assert reply.status_code == 200 and reply.json()["choices"][0]["text"]
