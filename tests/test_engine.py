"""The decode engine (gptj/engine.py) on its own: chunked prefill, scheduling, queue limits, warm-up, failures."""

import logging
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gptj.inference.engine import GENERATE, SCORE, Engine, Job, QueueFull
from gptj.inference.runner import MAX_TOP_LOGPROBS, ModelRunner
from gptj.model.transformer import GPTJConfig
from tests.sampling_utils import random_params
from tests.serve_utils import PARITY_MAX_LEN, hf_greedy, padded_vocab_pair

pytest.importorskip("torch")

CHUNK = 32


@pytest.fixture(scope="module")
def pair():
    return padded_vocab_pair()


@pytest.fixture(scope="module")
def small():
    """A tiny model (vocab 100, context 64) for scheduling tests that need no tokenizer or HF."""
    config = GPTJConfig(vocab_size=100, vocab_pad_multiple=8, num_layers=2, d_model=32, num_heads=4, rotary_dim=4,
                        max_len=64)
    return ModelRunner(config, random_params(config, seed=3, std=0.2))


def small_engine(runner, **changes):
    """The one engine shape of the small-model tests (so they share compiled programs)."""
    return Engine(runner, **{**dict(slots=2, prefill_chunk=16, decode_steps=2), **changes})


def alone(runner, prompt, **settings):
    """A generate job's result when it has an engine to itself."""
    engine = small_engine(runner)
    job = Job(GENERATE, prompt, **settings)
    engine.submit([job])
    engine.run_until_idle()
    return job.future.result()


def _prompt(rng, n, vocab=50257):
    return rng.integers(0, vocab, n).tolist()


def test_a_long_prompt_delays_decoding_rows_by_at_most_one_chunk(pair):
    """A prompt of max_len - 1 tokens, admitted while 3 rows decode, is prefilled one 32-token chunk per step:
    the step log never shows more than one chunk between two decode calls, every decode call advances the
    3 rows, and every row (the chunked prompt's first token included) equals HF generate."""
    hf_model, sampler = pair
    engine = Engine(sampler.runner, slots=4, prefill_chunk=CHUNK, decode_steps=2, tokenizer=sampler.tokenizer,
                    eos_id=sampler.eos_id)
    rng = np.random.default_rng(0)
    running = [Job(GENERATE, _prompt(rng, n), max_new_tokens=40, temperature=0.0) for n in (5, 9, 14)]
    engine.submit(running)
    while engine.health()["running_slots"] != 3 or engine.health()["prefilling_slots"]:
        engine.step()
    engine.step_log.clear()
    long_prompt = _prompt(rng, PARITY_MAX_LEN - 1)
    long = Job(GENERATE, long_prompt, max_new_tokens=1, temperature=0.0)
    engine.submit([long])
    while not long.future.done():
        engine.step()
    events = list(engine.step_log)
    engine.run_until_idle()

    prefills = [e for e in events if e["kind"] == "prefill"]
    assert len(prefills) == math.ceil((PARITY_MAX_LEN - 1) / CHUNK)
    assert all(e["tokens"] <= CHUNK for e in prefills)
    decode_slots = {row for e in events if e["kind"] == "decode" for row in e["slots"]}
    between = 0
    for event in events:
        if event["kind"] == "prefill":
            between += 1
            assert between <= 1, "two prefill chunks ran between decode calls"
        elif event["kind"] == "decode":
            assert len(set(event["slots"]) & decode_slots) >= 3 and event["steps"] >= 1
            between = 0
    assert sum(e["kind"] == "decode" for e in events) >= len(prefills) - 1
    assert long.future.result().tokens == hf_greedy(hf_model, long_prompt, 1)
    for job in running:
        assert job.future.result().tokens == hf_greedy(hf_model, job.prompt, 40)


def test_scoring_applies_the_head_chunk_by_chunk_not_to_all_logits_at_once(pair):
    """The runner's scoring program (echo + logprobs in the server) compiled for 64 rows x 256 tokens of a
    50400-id vocabulary, top log-probs included: XLA's temporaries stay under half of the [rows, length,
    vocab] fp32 logits a full log_softmax would hold (AOT: nothing is allocated). They are a few copies of
    one chunk's logits (model.SCORE_CHUNK_TOKENS tokens), whatever the batch."""
    _, sampler = pair
    runner = sampler.runner
    rows, length = 64, PARITY_MAX_LEN
    spec = lambda dtype: jax.ShapeDtypeStruct((rows, length), dtype)  # noqa: E731
    ids = jax.ShapeDtypeStruct((rows,), jnp.int32)
    compiled = runner._score.lower(runner.params, runner.adapter_pool, spec(jnp.int32), spec(bool), ids,
                                   MAX_TOP_LOGPROBS).compile()
    full_logits = rows * (length - 1) * runner.config.padded_vocab_size * 4
    assert compiled.memory_analysis().temp_size_in_bytes < full_logits / 2


def test_queue_is_bounded_all_or_nothing_and_jobs_are_checked(small):
    runner = small
    engine = small_engine(runner, max_queue=3)
    first = [Job(GENERATE, [1, 2], max_new_tokens=2) for _ in range(2)]
    engine.submit(first)
    with pytest.raises(QueueFull, match="2 rows are waiting"):
        engine.submit([Job(GENERATE, [3], max_new_tokens=2) for _ in range(2)])
    assert engine.waiting_rows == 2 and engine.counters["rejected"] == 1
    engine.cancel(first[:1])  # a waiting row leaves the queue at once
    engine.submit([Job(SCORE, [4, 5, 6]), Job(GENERATE, [7], max_new_tokens=0)])
    assert engine.waiting_rows == 3
    engine.run_until_idle()
    assert first[0].future.cancelled() and engine.counters["cancelled_rows"] == 1
    assert len(first[1].future.result().tokens) == 2
    assert engine.running_slots == 0 and engine.waiting_rows == 0
    for bad, message in ((Job(GENERATE, [1] * 62, max_new_tokens=3), "exceeds the engine's 64 tokens"),
                         (Job(GENERATE, [1], top_p=0.0), "top_p"), (Job(GENERATE, [1], temperature=-1.0), "temperature"),
                         (Job(GENERATE, [100]), r"outside \[0, 100\)"), (Job(GENERATE, []), "empty"),
                         (Job(GENERATE, [1], stop=["x"]), "tokenizer"), (Job("nope", [1]), "kind")):
        with pytest.raises(ValueError, match=message):
            engine.submit([bad])


def test_scoring_interleaves_with_generation_and_matches_a_forward_pass(small):
    """Score jobs run one batch per step between decode calls: a generation keeps making tokens while
    eight scoring requests are served, and each score equals the runner's own scoring forward pass."""
    runner = small
    rng = np.random.default_rng(1)
    engine = small_engine(runner)
    generation = Job(GENERATE, _prompt(rng, 6, 100), max_new_tokens=30, temperature=0.0)
    engine.submit([generation])
    engine.step()
    scores = [Job(SCORE, _prompt(rng, 12, 100), top_logprobs=2) for _ in range(8)]
    engine.submit(scores)
    engine.run_until_idle()
    kinds = [e["kind"] for e in engine.step_log if e["kind"] in ("score", "decode")]
    first, last = kinds.index("score"), len(kinds) - 1 - kinds[::-1].index("score")
    assert all(a != b for a, b in zip(kinds[first:last + 1], kinds[first + 1:last + 1])), kinds  # alternating
    want = runner.score([job.prompt for job in scores], top_logprobs=2)
    for job, expected in zip(scores, want):
        got = job.future.result()
        np.testing.assert_allclose(got.token_logprobs[1:], expected.token_logprobs[1:], atol=1e-5)
        np.testing.assert_allclose([[lp for _, lp in top] for top in got.top_logprobs[1:]],
                                   [[lp for _, lp in top] for top in expected.top_logprobs[1:]], atol=1e-5)
    assert generation.future.result().tokens == alone(runner, generation.prompt, max_new_tokens=30,
                                                      temperature=0.0).tokens


def test_warm_engine_compiles_nothing_while_serving_and_a_cold_one_warns(small, caplog):
    runner = small
    rng = np.random.default_rng(2)

    def serve(engine):
        engine.start()
        try:
            jobs = [Job(GENERATE, _prompt(rng, n, 100), max_new_tokens=m, top_logprobs=top, temperature=0.5)
                    for n, m, top in ((3, 5, 0), (20, 9, 2), (40, 20, 0), (50, 3, 1), (17, 1, 0))]
            engine.submit(jobs)
            return [job.future.result(timeout=300) for job in jobs]
        finally:
            engine.stop()

    warm = small_engine(runner)
    warm.warmup()
    before = runner.stats["compiled_while_serving"]
    with caplog.at_level(logging.WARNING):
        outs = serve(warm)  # chunked prompts, mixed lengths, with and without top log-probs
    assert [len(o.tokens) for o in outs] == [5, 9, 20, 3, 1]
    assert runner.stats["compiled_while_serving"] == before
    assert "while serving" not in caplog.text
    with caplog.at_level(logging.WARNING):
        serve(small_engine(runner, slots=1))
    assert runner.stats["compiled_while_serving"] > before
    assert "compiling a new prefill program" in caplog.text and "while serving" in caplog.text


def test_a_failed_device_call_fails_the_rows_in_flight_and_the_engine_recovers(small, monkeypatch):
    runner = small
    prompt = [5, 6, 7, 8]
    want = alone(runner, prompt, max_new_tokens=12, temperature=0.0)
    engine = small_engine(runner)
    real_decode, real_score, calls = runner.decode, runner.score, []

    def failing_decode(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("device lost")
        return real_decode(*args, **kwargs)

    def failing_score(sequences, **kwargs):
        if [13, 13] in sequences:
            raise RuntimeError("bad batch")
        return real_score(sequences, **kwargs)

    monkeypatch.setattr(runner, "decode", failing_decode)
    monkeypatch.setattr(runner, "score", failing_score)
    engine.start()
    try:
        doomed = Job(GENERATE, prompt, max_new_tokens=12, temperature=0.0)
        engine.submit([doomed])
        with pytest.raises(RuntimeError, match="device lost"):
            doomed.future.result(timeout=300)
        again = Job(GENERATE, prompt, max_new_tokens=12, temperature=0.0)
        bad, good = Job(SCORE, [13, 13]), Job(SCORE, [1, 2, 3])
        engine.submit([again])
        engine.submit([bad])
        engine.submit([good])
        assert again.future.result(timeout=300).tokens == want.tokens  # a fresh cache, same answer
        with pytest.raises(RuntimeError, match="bad batch"):
            bad.future.result(timeout=300)
        assert good.future.result(timeout=300).token_logprobs[1:] == real_score([[1, 2, 3]])[0].token_logprobs[1:]
        assert engine.counters["failed_rows"] == 2
    finally:
        engine.stop()


def test_stop_fails_what_is_left_and_cancel_frees_a_running_slot_before_the_next_decode_call(small):
    runner = small
    engine = small_engine(runner)
    running = [Job(GENERATE, [1, 2, 3], max_new_tokens=50) for _ in range(2)]
    queued = Job(GENERATE, [4, 5], max_new_tokens=5)
    engine.submit(running)
    engine.submit([queued])
    for _ in range(3):
        engine.step()
    engine.cancel(running[:1])
    engine.step()  # frees the slot first, then admits and prefills the queued row
    assert running[0].freed_at_call == running[0].cancelled_at_call  # no decode call ran with it after the cancel
    log = list(engine.step_log)
    cancelled = next(i for i, e in enumerate(log) if e["kind"] == "cancelled")
    assert any(e["kind"] == "admit" and e["slot"] == log[cancelled]["slot"] for e in log[cancelled:])
    engine.stop()
    for job in (running[1], queued):
        with pytest.raises(RuntimeError, match="shutting down"):
            job.future.result(timeout=10)
    assert engine.running_slots == 0
