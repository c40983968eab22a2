"""Prefix caching in the decode engine: outputs equal those without the cache, the prefill it saves (counted),
concurrent prompts sharing a prefix computing it once, and eviction under a small budget.

The time to first token it saves is measured by benchmarks/serve_load.py --workload=prefix (README)."""

import numpy as np
import pytest
from xla_env import run_heavy_partitioner

from gptj.inference.engine import GENERATE, Engine, Job
from gptj.inference.prefix_cache import PrefixIndex, block_keys, prefix_block_bytes
from gptj.inference.runner import ModelRunner
from gptj.model.transformer import GPTJConfig
from tests.sampling_utils import random_params

VOCAB, CONTEXT, COLUMNS, PREFIX, BLOCK, NEW = 96, 2048, 1600, 1500, 64, 6
SHARED = PREFIX // BLOCK * BLOCK  # the prefix's tokens in full blocks: what a later prompt reuses


@pytest.fixture(scope="module")
def runner():
    config = GPTJConfig(vocab_size=VOCAB, vocab_pad_multiple=8, num_layers=2, d_model=32, num_heads=4, rotary_dim=4,
                        max_len=CONTEXT)
    # Its programs run over 1,600-token caches many times: compiled at -O1 (see xla_env), 27 -> 21 CPU-s for the module.
    return ModelRunner(config, random_params(config, seed=5, std=0.2), run_heavy_partitioner())


def engine(runner, gib=0.0):
    """The one engine shape of these tests (4 slots of 1,600 tokens, 512-token chunks)."""
    return Engine(runner, slots=4, cache_len=COLUMNS, prefill_chunk=512, decode_steps=4, prefix_cache_gib=gib,
                  prefix_block_size=BLOCK)


def shared_prefix_jobs(seed=0, count=20, prefixes=1, repeat=1, length=PREFIX):
    """`count` requests: one of `prefixes` random prefixes of `length` tokens (in turn, each `repeat` times
    running) and a short question each; greedy and sampled (with seeds) alternately."""
    rng = np.random.default_rng(seed)
    heads = [rng.integers(0, VOCAB, length).tolist() for _ in range(prefixes)]
    jobs = []
    for i in range(count):
        question = rng.integers(0, VOCAB, int(rng.integers(3, 40))).tolist()
        settings = dict(temperature=0.0) if i % 2 == 0 else dict(temperature=0.9, top_p=0.9, seed=100 + i)
        jobs.append(Job(GENERATE, heads[i // repeat % prefixes] + question, max_new_tokens=NEW, **settings))
    return jobs


def run(engine_, jobs, together):
    """Every job's Generation: submitted all at once, or each after the one before has finished."""
    if together:
        engine_.submit(jobs)
        engine_.run_until_idle()
    else:
        for job in jobs:
            engine_.submit([job])
            engine_.run_until_idle()
    return [job.future.result() for job in jobs]


@pytest.fixture(scope="module")
def uncached(runner):
    """The shared-prefix workload's outputs without a prefix cache, and the engine's counters."""
    plain = engine(runner)
    outputs = run(plain, shared_prefix_jobs(), together=False)
    return outputs, plain.counters


def assert_same_outputs(got, want):
    """Token-identical, and log-probabilities equal to float rounding (a prompt's keys and values computed in
    other chunks round differently in the last bits, as between any two batch compositions)."""
    for a, b in zip(got, want):
        assert a.tokens == b.tokens and a.finish_reason == b.finish_reason
        np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-5)


@pytest.mark.parametrize("together", [False, True], ids=["one_after_another", "all_at_once"])
def test_shared_prefix_outputs_equal_the_uncached_ones_and_the_prefix_is_prefilled_once(runner, uncached, together):
    """20 requests sharing a 1,500-token prefix: with the cache each request after the first prefills only the
    tokens past the prefix's full blocks (counted: 19 hits, 1 miss, 19 x 1,472 tokens saved), arriving one
    after another or all at once into 4 slots (a prompt waits for the block an older prompt is computing),
    and every output equals the uncached run's."""
    want, plain = uncached
    jobs = shared_prefix_jobs()
    cached = engine(runner, gib=0.01)
    got = run(cached, jobs, together)
    assert_same_outputs(got, want)
    counters = cached.counters
    prompt_tokens = sum(len(job.prompt) for job in jobs)
    assert plain["prefilled_tokens"] == plain["prompt_tokens"] == prompt_tokens
    assert counters["prefix_cache_hits"] == 19 and counters["prefix_cache_misses"] == 1
    assert counters["prefix_cache_tokens_saved"] == 19 * SHARED
    assert counters["prefilled_tokens"] == prompt_tokens - 19 * SHARED
    assert cached.health()["prefix_cache_blocks_used"] >= PREFIX // BLOCK


def test_eviction_under_a_small_budget_keeps_outputs_equal(runner):
    """Two 320-token prefixes (5 blocks; one prefill chunk a prompt), A A B B A, through a store of 7 blocks:
    B's blocks evict A's least recently used ones, from the end of its chain, so the second A and B hit in
    full and the last A finds the first 2 blocks of its prefix; every output still equals the uncached run's."""
    length = 5 * BLOCK
    jobs, uncached_jobs = (shared_prefix_jobs(seed=1, count=5, prefixes=2, repeat=2, length=length) for _ in "ab")
    want = run(engine(runner), uncached_jobs, together=False)
    small = engine(runner, gib=7.5 * prefix_block_bytes(runner.config, BLOCK) / 2**30)
    assert small.health()["prefix_cache_blocks"] == 7
    got = run(small, jobs, together=False)
    assert_same_outputs(got, want)
    health = small.health()
    assert health["prefix_cache_evictions"] > 0 and health["prefix_cache_blocks_used"] == 7
    assert health["prefix_cache_hits"] == 3 and health["prefix_cache_misses"] == 2
    assert health["prefix_cache_tokens_saved"] == (5 + 5 + 2) * BLOCK


def test_index_chains_keys_evicts_chains_from_their_end_and_forgets_an_adapters_blocks():
    tokens = list(range(10))
    keys = block_keys(tokens, 4)
    assert len(keys) == 2  # the partial third block has no key
    assert block_keys(tokens[:8] + [99], 4) == keys  # a block's key stands for the tokens up to its end
    assert block_keys([0, 1, 2, 9] + tokens[4:], 4)[1] != keys[1]  # ... all of them
    assert block_keys(tokens, 4, "adapter#1") != keys  # and the weights they went through
    index = PrefixIndex(blocks=3, block_size=4)
    first = index.add(keys, "")
    assert sorted(first) == [0, 1] and index.lookup(keys) == first
    other = block_keys([7] * 8, 4, "adapter#1")
    placed = index.add(other, "adapter#1")
    # One block was free; the other comes from the least recently used chain, from its end.
    assert placed[0] == 2 and placed[1] == first[1] and index.evictions == 1
    assert index.lookup(keys) == first[:1] and index.lookup(other) == placed
    assert index.drop("adapter#1") == 2 and index.lookup(other) == [] and index.used == 1
