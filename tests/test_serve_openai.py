"""The server as OpenAI clients and load tools use it: chat completions through the chat template, streamed usage,
vLLM's ignore_eos and min_tokens, one event per token, clean cancellation and vLLM's metric names.

(Chat against an SFT-trained model is in test_examples.py, which trains one.)"""

import concurrent.futures
import copy
import gc
import json
import logging
import threading
import types

import httpx
import pytest

from gptj.data.vocab import EOT_TOKEN
from gptj.errors import ConfigError
from gptj.inference.chat import BUILTIN_TEMPLATES, ChatTemplate, ChatTemplateError
from gptj.inference.runner import GPT2_EOS_ID, Generation
from gptj.inference.sampler import get_tokenizer
from gptj.inference.server import TokenStream, build_app
from tests.serve_utils import running, serve_config, tiny_sampler

openai = pytest.importorskip("openai")

MODEL = "gptj-test"
# Added to the EOS logit of the tiny random model: EOS becomes its greedy choice everywhere and about a third
# of its draws at temperature 1 (9 of 32 for the seed below), "a model that emits end-of-text early".
EOS_BIAS = 10.5


@pytest.fixture(scope="module")
def sampler():
    return tiny_sampler()


@pytest.fixture(scope="module")
def server(sampler):
    """The tiny model's server (decode_steps 4, one event per token); yields (url, engine)."""
    app = build_app(sampler, sampler.tokenizer, serve_config())
    with running(app) as url:
        yield url, app.state.engine


@pytest.fixture(scope="module")
def eos_server(sampler):
    """The same model with EOS_BIAS on EOS: a shallow copy of the runner with other params shares its compiled
    programs (the params are an argument of every program), so this server compiles nothing."""
    runner = copy.copy(sampler.runner)
    runner.params = dict(runner.params, lm_head_bias=runner.params["lm_head_bias"].at[GPT2_EOS_ID].add(EOS_BIAS))
    biased = types.SimpleNamespace(runner=runner, eos_id=GPT2_EOS_ID)
    with running(build_app(biased, sampler.tokenizer, serve_config())) as url:
        yield url


def client(url):
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)


def health(url):
    return httpx.get(url + "/health", timeout=30).json()


def metrics(url) -> dict[str, float]:
    text = httpx.get(url + "/metrics", timeout=30).text
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
            if line and not line.startswith("#")}


def sse(url, path, body):
    """The JSON bodies of a streamed response, up to [DONE] (which must come)."""
    out = []
    with httpx.stream("POST", url + path, json=body, timeout=120) as reply:
        assert reply.status_code == 200, reply.read()
        for line in reply.iter_lines():
            if line == "data: [DONE]":
                return out
            if line.startswith("data: "):
                out.append(json.loads(line[len("data: "):]))
    raise AssertionError("the stream ended without [DONE]")


CONVERSATION = [{"role": "system", "content": "You answer briefly. "},
                {"role": "user", "content": "Q: What is two plus two? A:"},
                {"role": "assistant", "content": " Four."},
                {"role": "user", "content": [{"type": "text", "text": "Q: And three"},
                                             {"type": "text", "text": "? A:"}]}]
# The gptj_sft format: contents back to back, EOS after each assistant turn; text parts joined by newlines.
RENDERED = "You answer briefly. Q: What is two plus two? A: Four." + EOT_TOKEN + "Q: And three\n? A:"


# -- the chat template -----------------------------------------------------------------------------


def test_chat_templates_render_as_transformers_apply_chat_template(tmp_path):
    """The built-in renders the gptj_sft format; a HF-style template (trim_blocks, loop controls, tojson,
    raise_exception) renders exactly as transformers' apply_chat_template renders it; files and errors."""
    transformers = pytest.importorskip("transformers")

    messages = [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Hi \u00e9"},
                {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye"}]
    chatml = ("{% for message in messages %}\n"
              "    {% if message['role'] not in ['system', 'user', 'assistant'] %}"
              "{{ raise_exception('unknown role ' + message['role']) }}{% endif %}\n"
              "    {% if loop.index0 > 2 and message['role'] == 'system' %}{% break %}{% endif %}\n"
              "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}{{ ' ' ~ (message | tojson) }}<|im_end|>\n"
              "{% endfor %}\n"
              "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    hf = transformers.PreTrainedTokenizerFast(tokenizer_object=get_tokenizer()._tok, eos_token=EOT_TOKEN)
    for add in (True, False):
        want = hf.apply_chat_template(messages, chat_template=chatml, tokenize=False, add_generation_prompt=add)
        assert ChatTemplate.load(chatml).render(messages, add_generation_prompt=add) == want
    with pytest.raises(ChatTemplateError, match="unknown role tool"):
        ChatTemplate.load(chatml).render([{"role": "tool", "content": "x"}])

    sft = ChatTemplate.load("gptj_sft")
    assert sft.render([{"role": "user", "content": "Q: What is two plus two? A:"}]) == "Q: What is two plus two? A:"
    assert sft.render([dict(m, content=m["content"] if isinstance(m["content"], str) else "Q: And three\n? A:")
                       for m in CONVERSATION]) == RENDERED

    (tmp_path / "t.jinja").write_text(chatml)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": [
        {"name": "tool_use", "template": "x"}, {"name": "default", "template": chatml}]}))
    for spec in (str(tmp_path / "t.jinja"), str(tmp_path / "tokenizer_config.json")):
        assert ChatTemplate.load(spec).render(messages) == ChatTemplate.load(chatml).render(messages)
    for spec, message in (("no_such_template", "no built-in template"), ("{% for %}", "not a valid Jinja"),
                          (str(tmp_path / "t.json"), "no built-in template")):
        with pytest.raises(ConfigError, match=message):
            ChatTemplate.load(spec)
    assert set(BUILTIN_TEMPLATES) == {"gptj_sft"}


# -- streaming granularity -------------------------------------------------------------------------


def test_token_stream_splits_steps_into_tokens_keeping_characters_and_stop_strings_whole():
    """Updates of several tokens become one piece per token; a character split over byte tokens waits for its
    last byte; text a stop string may still cover waits; the finished text (cut at the stop) ends the pieces."""
    tokenizer = get_tokenizer()
    text = "caf\u00e9 \U0001F600 and \u4e2d\u6587 then STOP here"
    ids = tokenizer.encode(text)
    assert len(ids) > len(text.split())  # the emoji and the CJK characters take several byte tokens
    cut = text.index(" STOP")
    kept = next(k for k in range(len(ids) + 1) if len(tokenizer.decode(ids[:k])) >= cut)
    stream = TokenStream(0, tokenizer, interval=1, holdback=len(" STOP") - 1, hidden=None)
    pieces = []
    for end in range(3, len(ids), 3):  # the engine reports three tokens per step
        pieces += stream.pieces(Generation(ids[:end], [0.0] * end, None))
        assert all("\ufffd" not in p.text for p in pieces)
        assert text[:cut].startswith("".join(p.text for p in pieces))
    pieces += stream.pieces(Generation(ids[:kept], [0.0] * kept, "stop", text[:cut]))
    assert [(p.lo, p.hi) for p in pieces if p.hi > p.lo] == [(k, k + 1) for k in range(kept)]
    assert "".join(p.text for p in pieces) == text[:cut]
    assert [p.finish_reason for p in pieces] == [None] * (len(pieces) - 1) + ["stop"] and stream.finished

    hidden = TokenStream(0, tokenizer, interval=2, holdback=0, hidden=GPT2_EOS_ID)  # ignore_eos: EOS has no text
    hello, world = tokenizer.encode("Hello world")
    pieces = hidden.pieces(Generation([hello, GPT2_EOS_ID, world, GPT2_EOS_ID, GPT2_EOS_ID], [0.0] * 5, "length",
                                      "Hello world"))
    assert [(p.lo, p.hi, p.text) for p in pieces] == [(0, 2, "Hello"), (2, 4, " world"), (4, 5, "")]


def test_one_event_per_token_when_a_step_decodes_four(server, sampler):
    """decode_steps=4: a streamed greedy completion of 32 tokens arrives in 32 content events (each with its own
    log-prob) whose concatenation is the non-streamed text; stream_interval=4 sends about one event per call."""
    url, engine = server
    body = {"model": MODEL, "prompt": "Paris is", "max_tokens": 32, "temperature": 0, "ignore_eos": True}
    plain = httpx.post(url + "/v1/completions", json=body, timeout=120).json()["choices"][0]["text"]
    calls = len(engine.step_log)
    events = sse(url, "/v1/completions", dict(body, stream=True, logprobs=1))
    steps = [entry["steps"] for entry in list(engine.step_log)[calls:] if entry["kind"] == "decode"]
    assert max(steps) == 4  # the engine really decoded four tokens per call
    assert len(events) == 32 and all(len(e["choices"][0]["logprobs"]["tokens"]) == 1 for e in events)
    assert "".join(e["choices"][0]["text"] for e in events) == plain
    assert [e["choices"][0]["finish_reason"] for e in events] == [None] * 31 + ["length"]
    chat = sse(url, "/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "Paris is"}],
                                              "max_tokens": 32, "temperature": 0, "ignore_eos": True, "stream": True})
    assert chat[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert len(chat) == 34 and "".join(c["choices"][0]["delta"].get("content", "") for c in chat) == plain

    with running(build_app(sampler, sampler.tokenizer, serve_config(stream_interval=4))) as coarse:
        events = sse(coarse, "/v1/completions", dict(body, stream=True))
    assert len(events) <= 9 and "".join(e["choices"][0]["text"] for e in events) == plain


# -- the OpenAI client: chat, usage ---------------------------------------------------------------


def test_openai_client_chat_and_streamed_usage_match_sampling_and_the_servers_counters(server, sampler):
    """Chat renders through the template and answers what sampling the rendered prompt gives (greedy);
    stream_options.include_usage ends both endpoints' streams with the usage, which equals the tokens generated
    and the server's own counter; /metrics has vLLM's names beside gptj's."""
    url, _ = server
    api = client(url)
    prompt_ids = sampler.tokenizer.encode(RENDERED)
    [want] = sampler.generate([prompt_ids], max_new_tokens=12, temperature=0.0)
    before = metrics(url)

    plain = api.chat.completions.create(model=MODEL, messages=CONVERSATION, max_completion_tokens=12, temperature=0)
    assert plain.choices[0].message.role == "assistant" and plain.choices[0].message.content == want.text
    assert plain.choices[0].finish_reason == want.finish_reason
    assert (plain.usage.prompt_tokens, plain.usage.completion_tokens) == (len(prompt_ids), want.completion_tokens)

    chunks = list(api.chat.completions.create(model=MODEL, messages=CONVERSATION, max_tokens=12, temperature=0,
                                              stream=True, stream_options={"include_usage": True}, logprobs=True,
                                              top_logprobs=2))
    content = [c for c in chunks[1:] if c.choices and c.choices[0].delta.content is not None]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content for c in content) == want.text and len(content) == len(want.tokens)
    assert [c.choices[0].logprobs.content[0].logprob for c in content] == pytest.approx(want.logprobs, abs=1e-5)
    assert all(len(c.choices[0].logprobs.content[0].top_logprobs) == 2 for c in content)
    assert chunks[-2].choices[0].finish_reason == want.finish_reason and chunks[-2].choices[0].delta.content is None
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == want.completion_tokens
    assert chunks[-1].usage.prompt_tokens == len(prompt_ids)
    assert all(c.usage is None for c in chunks[:-1])

    [text_want] = sampler.complete(["Once upon a time", "Once upon a time"], max_new_tokens=20, temperature=0.9,
                                   seed=[5, 6])[1:]
    chunks = list(api.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=20, temperature=0.9,
                                         seed=5, n=2, stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices and c.choices[0].index == 1) == text_want.text
    usage = chunks[-1].usage
    assert chunks[-1].choices == [] and usage.prompt_tokens == 4

    after = metrics(url)
    generated = after["gptj_tokens_generated_total"] - before["gptj_tokens_generated_total"]
    assert usage.completion_tokens + plain.usage.completion_tokens + want.completion_tokens == generated
    labels = f'{{model_name="{MODEL}",engine="0"}}'
    assert after[f"vllm:generation_tokens_total{labels}"] == after["gptj_tokens_generated_total"]
    assert after[f"vllm:num_requests_running{labels}"] == 0 == after[f"vllm:num_requests_waiting{labels}"]
    assert after[f"vllm:kv_cache_usage_perc{labels}"] == 0
    for name, source in (("time_to_first_token_seconds", "time_to_first_token_seconds"),
                         ("time_per_output_token_seconds", "inter_token_latency_seconds"),
                         ("request_time_per_output_token_seconds", "time_per_output_token_seconds"),
                         ("e2e_request_latency_seconds", "e2e_request_latency_seconds"),
                         ("request_queue_time_seconds", "queue_wait_seconds")):
        count = after[f"vllm:{name}_count{labels}"]
        assert count == after[f"gptj_{source}_count"] > before[f"gptj_{source}_count"], name
        assert after[f'vllm:{name}_bucket{{le="+Inf",model_name="{MODEL}",engine="0"}}'] == count
    gaps = after["gptj_inter_token_latency_seconds_count"] - before["gptj_inter_token_latency_seconds_count"]
    assert gaps == generated - 4  # one gap per token after each row's first (the 4 rows of this test)

    continuous = sse(url, "/v1/completions", {"prompt": "Hi", "max_tokens": 3, "temperature": 0, "stream": True,
                                              "stream_options": {"continuous_usage_stats": True}})
    assert [e["usage"]["completion_tokens"] for e in continuous] == [1, 2, 3]


def test_the_model_field_picks_the_served_model_and_refuses_others(server):
    url, _ = server
    for path, body in (("/v1/completions", {"prompt": "Hi", "max_tokens": 1}),
                       ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1})):
        assert httpx.post(url + path, json=body, timeout=60).status_code == 200  # no model: the served one
        reply = httpx.post(url + path, json=dict(body, model="gpt-4o"), timeout=60)
        assert reply.status_code == 404 and reply.json()["error"]["code"] == "model_not_found", reply.text
        assert httpx.post(url + path, json=dict(body, model=MODEL), timeout=60).status_code == 200


# -- ignore_eos and min_tokens ----------------------------------------------------------------------


def test_ignore_eos_generates_max_tokens_and_min_tokens_holds_eos_back(eos_server, sampler):
    """On a model that draws EOS early: without ignore_eos a sampled row stops ("stop"); with it, the same draws
    go on to exactly max_tokens tokens ("length"), EOS among them but never in the text. min_tokens keeps EOS
    (the greedy choice everywhere) out of the first tokens, which are then the unbiased model's greedy ones."""
    url = eos_server
    body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 32, "temperature": 1.0, "seed": 3}
    stopped = httpx.post(url + "/v1/completions", json=body, timeout=120).json()
    assert stopped["choices"][0]["finish_reason"] == "stop" and stopped["usage"]["completion_tokens"] < 32
    full = httpx.post(url + "/v1/completions", json=dict(body, ignore_eos=True, logprobs=1), timeout=120).json()
    choice = full["choices"][0]
    assert choice["finish_reason"] == "length" and full["usage"]["completion_tokens"] == 32
    assert len(choice["logprobs"]["tokens"]) == 32 and choice["logprobs"]["tokens"].count(EOT_TOKEN) >= 3
    assert EOT_TOKEN not in choice["text"] and choice["text"].startswith(stopped["choices"][0]["text"])
    assert choice["text"] == "".join(t for t in choice["logprobs"]["tokens"] if t != EOT_TOKEN)
    chat = sse(url, "/v1/chat/completions", {"messages": [{"role": "user", "content": "Once upon a time"}],
                                             "max_tokens": 32, "temperature": 1.0, "seed": 3, "ignore_eos": True,
                                             "stream": True, "stream_options": {"include_usage": True}})
    assert chat[-1]["usage"]["completion_tokens"] == 32 and chat[-2]["choices"][0]["finish_reason"] == "length"
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chat[:-1]) == choice["text"]

    greedy = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 16, "temperature": 0}
    assert httpx.post(url + "/v1/completions", json=greedy, timeout=60).json()["usage"]["completion_tokens"] == 1
    held = httpx.post(url + "/v1/completions", json=dict(greedy, min_tokens=5, logprobs=2), timeout=60).json()
    [unbiased] = sampler.complete(["Once upon a time"], max_new_tokens=5, temperature=0.0)
    assert held["choices"][0]["text"] == unbiased.text and held["choices"][0]["finish_reason"] == "stop"
    assert held["usage"]["completion_tokens"] == 6  # five tokens and the EOS
    assert all(next(iter(top)) == EOT_TOKEN for top in held["choices"][0]["logprobs"]["top_logprobs"])
    bad = httpx.post(url + "/v1/completions", json=dict(greedy, min_tokens=17), timeout=60)
    assert bad.status_code == 400 and "min_tokens" in bad.json()["error"]["message"]


def test_min_tokens_ignores_stop_strings_before_them(server, sampler):
    url, _ = server
    [want] = sampler.complete(["Hello world"], max_new_tokens=12, temperature=0.0)
    early = sampler.tokenizer.decode(want.tokens[1:2])  # the second token's text
    body = {"prompt": "Hello world", "max_tokens": 12, "temperature": 0, "stop": [early]}
    assert httpx.post(url + "/v1/completions", json=body, timeout=60).json()["usage"]["completion_tokens"] <= 1
    late = httpx.post(url + "/v1/completions", json=dict(body, min_tokens=4), timeout=60).json()
    assert late["usage"]["completion_tokens"] >= 4 and want.text.startswith(late["choices"][0]["text"])


# -- cancellation -----------------------------------------------------------------------------------


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def test_cancelled_streams_end_cleanly_and_the_server_goes_on(server):
    """16 concurrent streams (8 slots: half of them wait) hang up half-way: no pending-task warning in the
    server's log, every slot frees, and the next requests are served."""
    url, engine = server
    records = _Records()
    logging.getLogger().addHandler(records)
    before = dict(engine.counters)
    barrier = threading.Barrier(16)

    def half_a_stream(i):
        body = {"prompt": f"Story {i}:", "max_tokens": 64, "temperature": 0, "ignore_eos": True, "stream": True,
                "stream_options": {"include_usage": True}}
        barrier.wait()
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=120) as reply:
            seen = 0
            for line in reply.iter_lines():
                seen += line.startswith("data: ")
                if seen == 32:
                    return seen

    try:
        with concurrent.futures.ThreadPoolExecutor(16) as pool:
            assert list(pool.map(half_a_stream, range(16))) == [32] * 16
        deadline = 120
        while (engine.running_slots or engine.waiting_rows) and deadline > 0:
            threading.Event().wait(0.05)
            deadline -= 0.05
        reply = httpx.post(url + "/v1/completions", json={"prompt": "Still here", "max_tokens": 3}, timeout=60)
        assert reply.status_code == 200 and reply.json()["usage"]["completion_tokens"] == 3
        gc.collect()
    finally:
        logging.getLogger().removeHandler(records)
    assert engine.running_slots == 0 and engine.waiting_rows == 0
    assert engine.counters["cancelled_rows"] - before["cancelled_rows"] >= 8  # the later half never ran to the end
    assert not [m for m in records.messages if "destroyed but it is pending" in m or "never awaited" in m]
    assert health(url)["status"] == "ok"


# -- the load benchmark ----------------------------------------------------------------------------


def test_the_load_benchmark_counts_the_usage_the_server_reports_and_agrees_with_its_counter(server):
    """benchmarks/serve_load.py's client sends what load tools send (ignore_eos, include_usage): its output
    tokens are the streams' usage, which equals the tokens the events carried, every request's max_tokens and
    the server's own counter over the run."""
    import os
    import sys

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from benchmarks import serve_load

    url, _ = server
    requests = serve_load.workload(rate=50.0, count=12, seed=0, max_len=128, output_max=64)
    summary = serve_load.run_load(url, requests)
    assert summary["ok"] == 12 and summary["token_source"] == "usage"
    assert summary["tokens"] == summary["streamed_tokens"] == summary["server_tokens"] \
        == sum(r.max_tokens for r in requests)
    assert summary["cpu_ms_per_token"] > 0
    assert "server counted" in serve_load.token_check(summary)
