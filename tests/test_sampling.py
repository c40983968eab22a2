"""Generation: greedy parity with HF `generate`, KV-cache exactness, sampler statistics, sharded decoding."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from gptj.core.partitioning import Partitioner, make_mesh
from gptj.inference.runner import ROW_FIELDS, ModelRunner
from gptj.inference.sampler import Sampler
from gptj.inference.sampling_ops import bucket, draw_from, sample_tokens
from gptj.model.transformer import GPTJ, GPTJConfig, init_cache
from tests.sampling_utils import gpt2_vocab_config, random_hf_gptj, random_params
from xla_env import run_heavy_partitioner

torch = pytest.importorskip("torch")

PROMPTS = [[5, 17, 3], [40, 2, 2, 91, 8, 60, 33, 12, 7], list(range(10, 27)), [88, 1, 64, 30, 30, 9]]
NEW_TOKENS = 32


@pytest.fixture(scope="module")
def hf_pair(tmp_path_factory):
    """A random HF GPT-J and a gptj Sampler over the same weights (fp32)."""
    from gptj.weights.formats.hf import read_hf

    hf_dir = str(tmp_path_factory.mktemp("hf"))
    hf_model = random_hf_gptj(hf_dir)
    params, config = read_hf(hf_dir, vocab_pad_multiple=8)
    return hf_model, Sampler(config, params, eos_id=None), params, config


def hf_greedy(hf_model, prompt, new_tokens=NEW_TOKENS):
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = hf_model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=new_tokens,
                                min_new_tokens=new_tokens, pad_token_id=0, eos_token_id=None)
    return out[0, len(prompt):].tolist()


@pytest.fixture(scope="module")
def hf_references(hf_pair):
    return [hf_greedy(hf_pair[0], p) for p in PROMPTS]


def test_greedy_matches_hf_generate_single_prompts(hf_pair, hf_references):
    sampler = hf_pair[1]
    for prompt, expected in zip(PROMPTS[:2], hf_references[:2]):
        [out] = sampler.generate([prompt], max_new_tokens=NEW_TOKENS, temperature=0.0)
        assert out.tokens == expected
        assert out.finish_reason == "length"


def test_greedy_matches_hf_generate_ragged_batch(hf_pair, hf_references):
    """One left-padded batch of different prompt lengths; each row equals HF on that prompt alone."""
    outs = hf_pair[1].generate(PROMPTS, max_new_tokens=NEW_TOKENS, temperature=0.0)
    assert [o.tokens for o in outs] == hf_references


def test_chunked_prefill_matches_hf_generate(hf_pair):
    """Prompts prefilled 16 tokens per call (a 70-token prompt takes five chunks) decode as HF does."""
    hf_model, _, params, config = hf_pair
    sampler = Sampler(config, params, eos_id=None, prefill_chunk=16)
    prompts = PROMPTS + [[(7 * i) % 96 for i in range(70)]]
    outs = sampler.generate(prompts, max_new_tokens=20, temperature=0.0)
    assert [o.tokens for o in outs] == [hf_greedy(hf_model, p, 20) for p in prompts]
    assert sampler.stats["prefill_calls"] >= 5


def test_decode_steps_equal_full_forward(hf_pair):
    """Prefill, a 3-token chunk, then one token at a time through the cache: all logits equal a full forward.

    The chunk checks a multi-token call at a non-zero index (cached slots plus
    new tokens causal among themselves).
    """
    _, _, params, config = hf_pair
    rng = np.random.default_rng(1)
    total, prompt_len = 20, 7
    tokens = rng.integers(0, config.vocab_size, (2, total))
    pad = np.array([0, 3])  # row 1 is left-padded by 3
    mask = np.arange(total)[None] >= pad[:, None]
    positions = np.maximum(np.arange(total)[None] - pad[:, None], 0)
    full = GPTJ(config).apply({"params": params}, tokens, positions, mask)

    decoder = GPTJ(config, decode=True)
    cache = init_cache(config, 2, 32)
    logits, variables = decoder.apply({"params": params, "cache": cache}, tokens[:, :prompt_len],
                                      positions[:, :prompt_len], mask[:, :prompt_len], mutable=["cache"])
    v = config.vocab_size
    worst = float(np.abs(logits - full[:, :prompt_len])[:, :, :v][mask[:, :prompt_len]].max())
    starts = [prompt_len] + list(range(prompt_len + 3, total + 1))
    for t, end in zip(starts, starts[1:]):
        logits, variables = decoder.apply({"params": params, "cache": variables["cache"]}, tokens[:, t:end],
                                          positions[:, t:end], mask[:, t:end], mutable=["cache"])
        worst = max(worst, float(np.abs(logits[..., :v] - full[:, t:end, :v]).max()))
    assert int(variables["cache"]["index"]) == total
    assert worst <= 1e-4


def _cache_sized_instructions(hlo: str, shape: str) -> tuple[list[str], int]:
    """Ops outside fused computations that produce an f32[shape] array: (the others, the in-place writes).

    A write is a dynamic-update-slice or a scatter, or a fusion whose fused
    computation's root is one (XLA performs those in place on their operand).
    """
    fused = set(re.findall(r"calls=(%[\w.-]+)", hlo))
    roots, computation, found = {}, None, []
    for line in hlo.splitlines():
        header = re.match(r"(?:ENTRY )?(%[\w.-]+) \(", line)
        op = re.search(r"\} ([\w-]+)\(", line)
        if header:
            computation = header.group(1)
        elif line.lstrip().startswith("ROOT"):
            roots[computation] = op.group(1) if op else ""
        if computation not in fused and re.search(r"= f32\[" + shape + r"\]\{", line):
            calls = re.search(r"calls=(%[\w.-]+)", line)
            found.append((op.group(1), calls.group(1) if calls else None))
    in_place = ("dynamic-update-slice", "scatter")
    writes = [(op, calls) for op, calls in found
              if op in in_place or (op == "fusion" and roots.get(calls) in in_place)]
    return [op for op, calls in found if (op, calls) not in writes], len(writes)


def test_decode_loop_writes_the_cache_in_place_and_never_copies_it():
    """The compiled decode loop touches the whole [layers, slots, H, S, D] cache only through in-place writes.

    Per step the model writes every slot's new key and value into the scratch
    column (one dynamic_update_slice each) and the step moves each slot's to
    its own column (one scatter each): four writes of one column, never a
    copy or re-stack of the cache, which stays in the donated buffer.
    """
    config = GPTJConfig(vocab_size=100, vocab_pad_multiple=8, num_layers=3, d_model=32, num_heads=4, rotary_dim=4,
                        max_len=64)
    runner = ModelRunner(config, random_params(config, seed=0))
    slots, cache_len = 2, 32
    cache = runner.new_cache(slots, cache_len)
    assert cache["cached_key"].shape == (3, slots, 4, cache_len + 1, 8)
    spec = jax.ShapeDtypeStruct
    with runner.partitioner.activate():
        lowered = runner._decode.lower(runner.params, runner.adapter_pool, cache,
                                       spec((slots, ROW_FIELDS), jnp.int32), spec((slots, 2), jnp.float32),
                                       spec((), jnp.int32), spec((), bool), 4, 0)
    others, writes = _cache_sized_instructions(lowered.compile().as_text(), f"3,{slots},4,{cache_len + 1},8")
    assert set(others) <= {"parameter", "get-tuple-element", "bitcast"}, others
    assert writes == 4


def test_sampled_logprobs_equal_scoring_forward(hf_pair):
    """The sampler's per-token log-probs (cache path, left padding, buckets) equal one full forward's."""
    sampler = hf_pair[1]
    outs = sampler.generate(PROMPTS, max_new_tokens=12, temperature=1.0, seed=[3, 4, 5, 6], top_logprobs=2)
    scores = sampler.score([p + o.tokens for p, o in zip(PROMPTS, outs)], top_logprobs=2)
    for prompt, out, score in zip(PROMPTS, outs, scores):
        assert len(out.tokens) == 12
        np.testing.assert_allclose(out.logprobs, score.token_logprobs[len(prompt):], atol=1e-4)
        got_top = [[lp for _, lp in step] for step in out.top_logprobs]
        want_top = [[lp for _, lp in step] for step in score.top_logprobs[len(prompt):]]
        np.testing.assert_allclose(got_top, want_top, atol=1e-4)


def test_rows_are_independent_of_their_batch(hf_pair):
    """A sampled row (same seed) is the same alone as inside a ragged batch, which the server relies on."""
    sampler = hf_pair[1]
    kwargs = dict(max_new_tokens=10, temperature=[0.9, 1.2, 0.7, 1.0], top_k=[0, 20, 0, 5], top_p=[0.9, 1.0, 1.0, 0.8],
                  seed=[11, 12, 13, 14])
    batch = sampler.generate(PROMPTS, **kwargs)
    for i, prompt in enumerate(PROMPTS):
        row_kwargs = {k: v[i] if isinstance(v, list) else v for k, v in kwargs.items()}
        [alone] = sampler.generate([prompt], **row_kwargs)
        assert alone.tokens == batch[i].tokens


class CharTokenizer:
    """Token i is one letter, so stop strings can be placed exactly."""

    def encode(self, text):
        return [ord(c) - 97 for c in text]

    def decode(self, ids):
        return "".join(chr(97 + i % 26) for i in ids)


def test_eos_stop_strings_and_max_new_tokens_per_row(hf_pair):
    _, _, params, config = hf_pair
    sampler = Sampler(config, params, tokenizer=CharTokenizer(), eos_id=None)
    greedy = sampler.generate(PROMPTS[:3], max_new_tokens=NEW_TOKENS)
    text0, text1 = greedy[0].text, greedy[1].text
    # An EOS id that row 2 produces but rows 0 and 1 do not (before their own stops).
    eos = next(t for t in greedy[2].tokens[3:] if t not in greedy[0].tokens and t not in greedy[1].tokens[:4])
    stop = text0[6:9]
    outs = sampler.generate(PROMPTS[:3], max_new_tokens=[NEW_TOKENS, 4, NEW_TOKENS],
                            stop=[[stop], [], []], eos_id=eos)
    cut = text0.find(stop)
    assert outs[0].text == text0[:cut] and outs[0].finish_reason == "stop"
    assert outs[0].tokens == greedy[0].tokens[:cut] and len(outs[0].logprobs) == cut
    assert outs[1].tokens == greedy[1].tokens[:4] and outs[1].text == text1[:4] and outs[1].finish_reason == "length"
    first_eos = greedy[2].tokens.index(eos)
    assert outs[2].tokens == greedy[2].tokens[:first_eos] and outs[2].finish_reason == "stop"


def test_streaming_callback_sees_growing_prefixes(hf_pair):
    sampler = hf_pair[1]
    seen = {0: [], 1: []}
    outs = sampler.generate(PROMPTS[:2], max_new_tokens=[NEW_TOKENS, 20],
                            callback=lambda row, gen: seen[row].append(list(gen.tokens)))
    for row in (0, 1):
        assert len(seen[row]) >= 2 and seen[row][-1] == outs[row].tokens
        assert all(final[:len(part)] == part for part, final in zip(seen[row], [outs[row].tokens] * len(seen[row])))


def test_shapes_are_bucketed_so_requests_share_programs(hf_pair):
    """Prompts of 3..12 tokens with 4..7 new tokens reuse one prefill, one pick and one decode program."""
    _, _, params, config = hf_pair
    sampler = Sampler(config, params, eos_id=None)
    for length, new in ((3, 5), (9, 7), (12, 4)):
        sampler.generate([list(range(1, length + 1))], max_new_tokens=new)
    assert sampler.stats["programs"] == 3 and sampler.stats["prefill_calls"] == 3
    sampler.generate([list(range(1, 21))], max_new_tokens=4)  # 24 tokens: the next cache bucket
    assert sampler.stats["programs"] == 5  # its own prefill and decode; the pick is shared
    assert bucket(3, 16) == 16 and bucket(17, 16) == 32 and bucket(100, 16, cap=96) == 100 and bucket(40, 16, 48) == 48


def test_bf16_models_keep_a_bf16_cache_and_the_loop_donates_it(hf_pair):
    _, _, params, config = hf_pair
    sampler = Sampler(config.replace(dtype="bfloat16"), params, eos_id=None)
    assert sampler.params["blocks"]["attn"]["q_proj"].dtype == jnp.bfloat16  # no fp32 copy kept for inference
    [out] = sampler.generate([PROMPTS[0]], max_new_tokens=8)
    assert len(out.tokens) == 8
    runner = sampler.runner
    cache = runner.new_cache(1, 32)
    rows = np.zeros((1, ROW_FIELDS), np.int32)
    new_cache, _ = runner.decode(cache, rows, np.ones((1, 2), np.float32), 1, False, 4, 0)
    assert new_cache["cached_key"].dtype == jnp.bfloat16
    assert cache["cached_key"].is_deleted()  # donated to the decode loop


# -- the samplers against analytic distributions --------------------------------------

LOGITS = np.array([2.0, 1.5, 1.2, 0.9, 0.4, 0.0, -0.3, -1.0, -2.0, -4.0], np.float32)


def reference_distribution(temperature, top_k, top_p):
    """Filtered next-token distribution computed independently in numpy (temperature, top-k, then top-p)."""
    scaled = LOGITS.astype(np.float64) / temperature
    order = np.argsort(-scaled)
    keep = np.zeros_like(scaled, dtype=bool)
    keep[order[:top_k or len(scaled)]] = True
    probs = np.where(keep, np.exp(scaled - scaled.max()), 0.0)
    probs /= probs.sum()
    if top_p < 1.0:
        cumulative, nucleus = 0.0, np.zeros_like(keep)
        for token in order:
            if not keep[token] or cumulative >= top_p:
                break
            nucleus[token] = True
            cumulative += probs[token]
        probs = np.where(nucleus, probs, 0.0)
        probs /= probs.sum()
    return probs


SETTINGS = [(0.7, 0, 1.0), (1.5, 3, 1.0), (1.0, 0, 0.75), (1.3, 6, 0.9), (0.5, 0, 0.95)]


def test_samplers_match_analytic_distributions_chi_square():
    """Per-row settings in one batch; each row group's frequencies fit its filtered distribution."""
    draws = 20000
    temperature = np.repeat([s[0] for s in SETTINGS], draws).astype(np.float32)
    top_k = np.repeat([s[1] for s in SETTINGS], draws).astype(np.int32)
    top_p = np.repeat([s[2] for s in SETTINGS], draws).astype(np.float32)
    rows = len(temperature)
    keys = jax.random.split(jax.random.PRNGKey(0), rows)
    logits = jnp.broadcast_to(jnp.asarray(LOGITS), (rows, len(LOGITS)))
    tokens = np.asarray(jax.jit(sample_tokens)(logits, keys, temperature, top_k, top_p))
    for i, setting in enumerate(SETTINGS):
        counts = np.bincount(tokens[i * draws:(i + 1) * draws], minlength=len(LOGITS))
        expected = reference_distribution(*setting)
        support = expected > 0
        assert counts[~support].sum() == 0, f"{setting}: sampled tokens outside the filtered support"
        _, p_value = stats.chisquare(counts[support], expected[support] * draws)
        assert p_value > 1e-3, f"{setting}: chi-square p={p_value:.2e}, counts {counts}, expected {expected * draws}"


def test_inverse_cdf_draw_fits_a_distribution_spread_over_blocks_and_never_draws_zero_mass():
    """`draw_from` works in blocks of 256 ids: mass in several blocks (and none in most) is drawn in
    proportion, and an id of zero probability is never returned."""
    vocab, draws = 1000, 40000
    probs = np.zeros(vocab, np.float32)
    probs[[3, 255, 256, 700, 999]] = [0.1, 0.2, 0.3, 0.15, 0.25]
    keys = jax.random.split(jax.random.PRNGKey(4), draws)
    tokens = np.asarray(jax.jit(draw_from)(jnp.broadcast_to(jnp.asarray(probs), (draws, vocab)), keys))
    counts = np.bincount(tokens, minlength=vocab)
    assert counts[probs == 0].sum() == 0
    _, p_value = stats.chisquare(counts[probs > 0], probs[probs > 0] * draws)
    assert p_value > 1e-3, counts[probs > 0]
    last_only = jnp.zeros((4, vocab)).at[:, -1].set(1e-30)  # all mass on the last id, tiny
    assert np.asarray(draw_from(last_only, keys[:4])).tolist() == [vocab - 1] * 4


def test_temperature_zero_is_greedy_and_nucleus_never_leaks():
    rows = 4096
    keys = jax.random.split(jax.random.PRNGKey(1), rows)
    logits = jnp.broadcast_to(jnp.asarray(LOGITS), (rows, len(LOGITS)))
    zeros, ones = np.zeros(rows, np.float32), np.ones(rows, np.float32)
    greedy = np.asarray(sample_tokens(logits, keys, zeros, np.zeros(rows, np.int32), ones))
    assert (greedy == 0).all()
    # top_p 0.3: the nucleus is {0} alone (p0 ~ 0.32 already reaches it).
    tiny_nucleus = np.asarray(sample_tokens(logits, keys, ones, np.zeros(rows, np.int32), np.full(rows, 0.3, np.float32)))
    assert (tiny_nucleus == 0).all()


# -- padded vocabularies ------------------------------------------------------------------


def test_padding_ids_past_the_tokenizer_are_never_sampled_or_reported():
    """GPT-J-6B pads GPT-2's 50257 ids to 50400. With the padding ids' output bias raised so that they are
    the raw argmax, 8 rows x 200 tokens at temperature 2 (plain, top-k, top-p) and greedy never produce one,
    top log-probs never list one, and the text always decodes (it raised VocabularyError before)."""
    from gptj.inference.sampler import get_tokenizer

    config = gpt2_vocab_config(vocab_size=50400, max_len=256)
    params = random_params(config, seed=5, std=0.2, pad_bias=4.0)
    sampler = Sampler(config, params, run_heavy_partitioner(), tokenizer=get_tokenizer(), eos_id=None)
    assert sampler.runner.vocab_limit == 50257
    assert Sampler(config, params).runner.vocab_limit == 50257  # no tokenizer: GPT-2's, as GPT-J-6B uses
    outs = sampler.generate([[464, 3290], [15496]] * 4, max_new_tokens=200, temperature=[2.0] * 6 + [0.0, 0.0],
                            top_k=[0, 0, 40, 40, 0, 0, 0, 0], top_p=[1.0, 1.0, 1.0, 1.0, 0.9, 0.9, 1.0, 1.0],
                            seed=list(range(8)), top_logprobs=5)
    for out in outs:
        assert len(out.tokens) == 200 and max(out.tokens) < 50257
        assert max(token for step in out.top_logprobs for token, _ in step) < 50257
        assert out.text == sampler.tokenizer.decode(out.tokens)
    [score] = sampler.score([outs[0].tokens[:50]], top_logprobs=5)
    assert max(token for step in score.top_logprobs[1:] for token, _ in step) < 50257
    with pytest.raises(ValueError, match=r"outside \[0, 50257\)"):
        sampler.generate([[50300]], max_new_tokens=1)


# -- model-parallel decoding ------------------------------------------------------------


def test_megatron_2x4_decoding_equals_single_device():
    config = GPTJConfig(vocab_size=100, vocab_pad_multiple=8, num_layers=2, d_model=32, num_heads=4, rotary_dim=4,
                        max_len=64)
    params = random_params(config, seed=2)
    single = Sampler(config, params, eos_id=None)
    sharded = Sampler(config, params, Partitioner(make_mesh(2, 4), "megatron"), eos_id=None)
    cache_key = sharded.runner.new_cache(4, 32)["cached_key"]
    assert tuple(cache_key.sharding.spec) == (None, "data", "model", None, None)  # slots over data, heads over model
    assert sharded.params["blocks"]["attn"]["q_proj"].sharding.spec[2] == "model"
    kwargs = dict(max_new_tokens=16, temperature=[0.0, 0.0, 1.0, 0.8], top_p=[1.0, 1.0, 1.0, 0.9], seed=[0, 1, 2, 3])
    want = single.generate(PROMPTS, **kwargs)
    got = sharded.generate(PROMPTS, **kwargs)
    for w, g in zip(want, got):
        assert g.tokens == w.tokens
        np.testing.assert_allclose(g.logprobs, w.logprobs, atol=1e-5)
