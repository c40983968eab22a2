"""Many LoRA adapters over one base in one server: mixed batches equal each adapter's merged model and HF peft,
runtime load and unload, bad adapters refused with one line, the request's `model` picking the adapter."""

import concurrent.futures
import functools
import json
import shutil
import threading

import httpx
import jax
import numpy as np
import pytest
from trainer_utils import tiny_config

from gptj.convert.__main__ import main as convert
from gptj.core.checkpoint import Checkpointer
from gptj.core.driver import write_run_config
from gptj.core.partitioning import Partitioner, make_mesh, place
from gptj.errors import ConfigError, UnknownAdapterError
from gptj.inference.engine import GENERATE, Job
from gptj.inference.sampler import Sampler, get_tokenizer
from gptj.inference.server import build_app
from gptj.model import lora as lora_lib
from gptj.model.transformer import GPTJConfig, LoraConfig, _split_einsum, pooled_lora_delta
from gptj.settings import RunSettings, validate
from gptj.weights.formats.hf import read_hf
from gptj.weights.formats.peft import ADAPTER_CONFIG, ADAPTER_WEIGHTS, adapter_pair_shapes, write_peft
from gptj.weights.source import BASE_WEIGHTS_KEY, fingerprint, load_for_inference
from tests.sampling_utils import write_params_dir
from tests.serve_utils import running, serve_config

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")

VOCAB, NEW = 128, 8
HF_SHAPE = dict(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, rotary_dim=4, n_positions=32)  # tiny_config's
BASE = "gptj-test"
# The adapters served from the start: a gptj LoRA workdir and two PEFT directories, of different ranks and targets.
STARTUP = {"wd": (4, ("q_proj", "v_proj")), "p2": (2, ("k_proj", "out_proj", "fc_in")), "p8": (8, ("fc_out", "q_proj"))}
# Adapters loaded at runtime (PEFT).
LATE = {"late": (4, ("v_proj", "fc_in")), "later": (2, ("q_proj", "fc_out"))}
# The prompts of every request here (the references generate for all of them in one call: one program shape).
PROMPTS = [np.random.default_rng(0).integers(0, VOCAB, n).tolist() for n in (5, 9, 12, 17, 20)]


def random_adapters(config: GPTJConfig, rank: int, targets, seed: int) -> tuple[LoraConfig, dict]:
    """Random (non-zero) adapters A and B, large enough to change greedy outputs."""
    lora = LoraConfig(rank=rank, alpha=2.0 * rank, targets=tuple(targets))
    rng = np.random.default_rng(seed)
    pairs = {t: tuple(rng.normal(0.0, 0.3, shape).astype(np.float32) for shape in shapes)
             for t, shapes in adapter_pair_shapes(config, lora).items()}
    return lora, lora_lib.adapter_tree(pairs)


def random_peft(path, config: GPTJConfig, rank: int, targets, seed: int) -> str:
    """A PEFT adapter directory of `random_adapters`."""
    lora, adapters = random_adapters(config, rank, targets, seed)
    write_peft(adapters, config, lora, str(path))
    return str(path)


def lora_workdir(path, hf_dir: str, base_params, rank: int, targets, seed: int):
    """What a LoRA run over `hf_dir` leaves in its workdir (config.json recording its base, a checkpoint of
    the adapters alone), with `random_adapters` in place of trained ones; returns its run config."""
    run = tiny_config()
    run.init_from = f"hf:{hf_dir}"
    lora, adapters = random_adapters(GPTJConfig.from_dict(run.model.to_dict()), rank, targets, seed)
    run.lora.update(dict(rank=rank, alpha=lora.alpha, targets=targets, base_dtype="float32"))
    run_config = RunSettings.from_config(run).to_dict()
    run_config[BASE_WEIGHTS_KEY] = {"spec": run.init_from, "fingerprint": fingerprint(base_params),
                                    "trained": lora_lib.ADAPTER_PATTERN}
    write_run_config(str(path), run_config)
    saver = Checkpointer(str(path), async_save=False)
    saver.save({"step": np.int32(3), "params": adapters, "opt_state": {}}, config=run_config)
    saver.close()
    return run


def single():
    return Partitioner(make_mesh(1, 1, devices=jax.devices()[:1]), "megatron")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """The HF base, each adapter's directory and a PEFT copy of it for HF, and each model's merged params."""
    from hf_utils import random_hf_model

    root = tmp_path_factory.mktemp("adapters")
    hf_dir = str(root / "hf")
    random_hf_model(seed=3, **HF_SHAPE).save_pretrained(hf_dir)
    params, config = read_hf(hf_dir, vocab_pad_multiple=8)
    # A gptj LoRA workdir, and its adapters exported for HF peft.
    workdir = str(root / "wd")
    run = lora_workdir(workdir, hf_dir, params, *STARTUP["wd"], seed=9)
    assert convert(["to_peft", f"--workdir={workdir}", f"--out={root / 'wd_peft'}"]) == 0
    paths, peft_dirs = {"wd": workdir}, {"wd": str(root / "wd_peft")}
    for seed, (name, (rank, targets)) in enumerate({**STARTUP, **LATE}.items()):
        if name != "wd":
            paths[name] = peft_dirs[name] = random_peft(root / name, config, rank, targets, seed)
    merged = {BASE: params, "wd": load_for_inference(run, workdir, single())[0]}
    for name, directory in peft_dirs.items():
        if name != "wd":
            spec = tiny_config()
            spec.init_from, spec.lora.init_from = f"hf:{hf_dir}", f"peft:{directory}"
            merged[name] = load_for_inference(spec, None, single())[0]
    return dict(root=root, hf_dir=hf_dir, params=params, config=config, paths=paths, peft_dirs=peft_dirs,
                merged=merged)


@pytest.fixture(scope="module")
def reference(models):
    """greedy(model, prompt): the model merged and run alone (an adapter merged into the base weights, as
    `--mode=sample` serves it), for a prompt of PROMPTS. One sampler whose params are swapped and one call
    of all PROMPTS per model (each row as it would alone), so its programs compile once."""
    sampler = Sampler(models["config"], models["params"])
    runner = sampler.runner

    @functools.lru_cache(maxsize=None)
    def greedy_all(model: str) -> list[list[int]]:
        runner.params = place(models["merged"][model], runner.param_shardings, np.dtype(runner.config.dtype))
        return [g.tokens for g in sampler.generate(PROMPTS, max_new_tokens=NEW, temperature=0.0)]

    return lambda model, prompt: greedy_all(model)[PROMPTS.index(prompt)]


@pytest.fixture(scope="module")
def hf_reference(models):
    """hf(model, prompt): HF generate greedy with `peft.PeftModel` over the HF base (the plain base for BASE)."""
    from peft import PeftModel
    from transformers import GPTJForCausalLM

    torch.set_num_threads(1)
    cache = {}

    @functools.lru_cache(maxsize=None)
    def generate_once(model: str, prompt: tuple) -> list[int]:
        if model not in cache:
            base = GPTJForCausalLM.from_pretrained(models["hf_dir"]).eval()
            cache[model] = base if model == BASE else PeftModel.from_pretrained(base, models["peft_dirs"][model]).eval()
        ids = torch.tensor([prompt])
        with torch.no_grad():
            out = cache[model].generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                        max_new_tokens=NEW, min_new_tokens=NEW, pad_token_id=0)
        return out[0, len(prompt):].tolist()

    return lambda model, prompt: generate_once(model, tuple(prompt))


@pytest.fixture(scope="module")
def server(models):
    """An 8-slot server over the base with the three start-up adapters, room for one more, and a prefix cache
    of 8-token blocks; yields (url, engine)."""
    sampler = Sampler(models["config"], models["params"], tokenizer=get_tokenizer())
    adapters = ",".join(f"{name}={models['paths'][name]}" for name in STARTUP)
    app = build_app(sampler, sampler.tokenizer, serve_config(
        model_name=BASE, adapters=adapters, max_adapters=4, max_batch_size=8, prefill_chunk=16, decode_steps=2,
        max_new_tokens_limit=16, prefix_cache_gib=0.001, prefix_block_size=8))
    with running(app) as url:
        yield url, app.state.engine


def complete(url, model, prompt, **extra):
    return httpx.post(url + "/v1/completions", json={"model": model, "prompt": [prompt], "max_tokens": NEW,
                                                     "temperature": 0, "logprobs": 0, **extra}, timeout=300)


def tokens_of(reply) -> list[int]:
    """The generated token ids of a completion (logprobs tokens are strings; the server's tokenizer decodes)."""
    assert reply.status_code == 200, reply.text
    return reply.json()["choices"][0]["logprobs"]["tokens"]


def as_strings(ids: list[int]) -> list[str]:
    tokenizer = get_tokenizer()
    return [tokenizer.decode([t]) for t in ids]


def model_ids(url) -> list[str]:
    return [card["id"] for card in httpx.get(url + "/v1/models", timeout=30).json()["data"]]


def test_24_concurrent_mixed_requests_equal_each_adapters_merged_model_and_hf_peft(server, reference, hf_reference):
    """3 adapters (a gptj LoRA workdir and two PEFT directories; ranks 4, 2, 8; different targets) and the base,
    6 requests each, sent at once: each returns what its model merged returns alone and what HF peft
    generates; the adapters change the outputs, rows of several adapters share decode calls, and the same
    prompt through two adapters never shares prefix-cache blocks (some prompts repeat: hits are counted)."""
    url, engine = server
    requests = [(model, PROMPTS[(3 * i + j) % len(PROMPTS)]) for i, model in enumerate([BASE, *STARTUP])
                for j in range(6)]
    assert model_ids(url) == [BASE, *STARTUP]
    engine.step_log.clear()
    barrier = threading.Barrier(len(requests))

    def send(request):
        barrier.wait()
        return tokens_of(complete(url, *request))

    with concurrent.futures.ThreadPoolExecutor(len(requests)) as pool:
        got = list(pool.map(send, requests))
    for (model, prompt), tokens in zip(requests, got):
        want = reference(model, prompt)
        assert tokens == as_strings(want), (model, prompt)
        assert want == hf_reference(model, prompt), (model, prompt)
    for model in STARTUP:  # every adapter changes what the base generates
        assert any(reference(model, p) != reference(BASE, p) for p in PROMPTS), model
    mixed = [e for e in engine.step_log if e["kind"] == "decode" and len(e["adapters"]) >= 3]
    assert mixed, "no decode call ran rows of three adapters together"
    metrics = httpx.get(url + "/metrics", timeout=30).text
    values = {line.split(" ")[0]: float(line.split(" ")[1]) for line in metrics.splitlines() if line[0] != "#"}
    assert values["gptj_prefix_cache_hits_total"] > 0 and values["gptj_prefix_cache_tokens_saved_total"] > 0
    assert values["gptj_adapters"] == 3


def test_an_unknown_model_is_a_404_naming_the_served_ones(server):
    url, _ = server
    reply = complete(url, "nope", [1, 2, 3])
    assert reply.status_code == 404
    error = reply.json()["error"]
    assert error["code"] == "model_not_found" and error["param"] == "model"
    assert "`nope`" in error["message"] and all(name in error["message"] for name in (BASE, *STARTUP))
    assert complete(url, None, [1, 2, 3]).status_code == 200  # no model: the base


def load(url, name, path):
    return httpx.post(url + "/v1/load_lora_adapter", json={"lora_name": name, "lora_path": path}, timeout=300)


def unload(url, name):
    return httpx.post(url + "/v1/unload_lora_adapter", json={"lora_name": name}, timeout=300)


def test_runtime_load_serves_at_once_within_max_adapters_and_unload_frees_the_slot(server, models, reference,
                                                                                      hf_reference):
    """A loaded adapter serves at once (its merged model's output); a fifth is refused naming the limit; after
    unloading it is a 404, and another adapter loaded into its slot answers the same prompt with its own
    output (no prefix block of the first is reused)."""
    url, engine = server
    prompt = PROMPTS[3]  # two full prefix blocks
    reply = load(url, "late", models["paths"]["late"])
    assert reply.status_code == 200 and "late" in reply.text
    cards = httpx.get(url + "/v1/models", timeout=30).json()["data"]
    assert cards[-1]["id"] == "late" and cards[-1]["parent"] == BASE and cards[-1]["root"] == models["paths"]["late"]
    assert tokens_of(complete(url, "late", prompt)) == as_strings(reference("late", prompt))
    assert reference("late", prompt) == hf_reference("late", prompt)

    refused = load(url, "later", models["paths"]["later"])
    assert refused.status_code == 400 and "max_adapters=4" in refused.json()["error"]["message"]
    taken = load(url, "late", models["paths"]["later"])
    assert taken.status_code == 400 and "already loaded" in taken.json()["error"]["message"]

    assert unload(url, "late").status_code == 200
    assert complete(url, "late", prompt).status_code == 404 and "late" not in model_ids(url)
    assert unload(url, "late").status_code == 404
    assert load(url, "later", models["paths"]["later"]).status_code == 200
    assert tokens_of(complete(url, "later", prompt)) == as_strings(reference("later", prompt))
    assert unload(url, "later").status_code == 200


def test_unloading_finishes_the_rows_using_the_adapter_first(server, models, reference):
    """The engine's thread is paused and stepped by hand: a row of the adapter is running when the unload
    comes; new rows of it are refused at once, the running one finishes with its full output, and only then is
    the adapter gone."""
    url, engine = server
    assert load(url, "late", models["paths"]["late"]).status_code == 200
    prompt = PROMPTS[1]
    engine.stop()
    try:
        job = Job(GENERATE, prompt, max_new_tokens=NEW, temperature=0.0, adapter="late")
        engine.submit([job])
        engine.step()
        assert engine.running_slots == 1 and not job.future.done()
        unloaded = engine.unload_adapter("late")
        assert not unloaded.done() and engine.adapters.users()["late"] == 1
        with pytest.raises(UnknownAdapterError, match="no adapter named 'late'"):
            engine.submit([Job(GENERATE, prompt, max_new_tokens=1, adapter="late")])
        assert "late" not in model_ids(url)
        engine.run_until_idle()
        assert job.future.result().tokens == reference("late", prompt)
        assert unloaded.done() and unloaded.result().name == "late" and "late" not in engine.adapters.users()
    finally:
        engine.start()
    assert complete(url, "wd", prompt).status_code == 200


def test_bad_adapters_are_one_line_4xx_and_the_server_keeps_serving(server, models):
    url, _ = server
    root, config = models["root"], models["config"]
    corrupt = shutil.copytree(models["paths"]["p2"], root / "corrupt")
    (corrupt / ADAPTER_WEIGHTS).write_bytes(b"not a safetensors file")
    other_shape = random_peft(root / "other_shape", config.replace(d_model=64), 2, ("q_proj",), 0)
    unknown_target = shutil.copytree(models["paths"]["p2"], root / "unknown_target")
    adapter_config = json.loads((unknown_target / ADAPTER_CONFIG).read_text())
    (unknown_target / ADAPTER_CONFIG).write_text(json.dumps({**adapter_config, "target_modules": ["c_attn"]}))
    too_wide = random_peft(root / "too_wide", config, 32, ("q_proj",), 0)
    other_base = shutil.copytree(models["paths"]["wd"], root / "other_base")
    run_config = json.loads((other_base / "config.json").read_text())
    run_config["base_weights"]["fingerprint"] = "0123456789abcdef"
    (other_base / "config.json").write_text(json.dumps(run_config))
    cases = {str(root / "missing"): "no such directory", str(corrupt): "unreadable adapter weights",
             other_shape: "has shape (2, 64), expected (2, 32)", str(unknown_target): "target_modules",
             too_wide: "rank 32 exceeds this server's adapter rank 16", str(other_base): "another base",
             models["hf_dir"]: "neither a PEFT adapter directory (no adapter_config.json) nor a gptj LoRA workdir",
             write_params_dir(str(root / "full"), config): "a model trained in full, not LoRA adapters"}
    for path, message in cases.items():
        reply = load(url, "bad", path)
        assert reply.status_code == 400, (path, reply.text)
        error = reply.json()["error"]["message"]
        assert message in error and "\n" not in error, (path, error)
    assert model_ids(url) == [BASE, *STARTUP]
    assert complete(url, "p8", [1, 2, 3]).status_code == 200


@pytest.mark.parametrize("tokens", [3, 1], ids=["gathered_per_row", "one_token_every_adapter"])
def test_pooled_delta_is_each_rows_own_adapter_and_nothing_for_the_base(tokens):
    """pooled_lora_delta against numpy, both ways (several tokens a row: gathered; one token, as many rows as
    slots: every adapter, masked): each row gets x·A[id]·B[id] of its own slot (ranks padded with zeros), a
    negative id none, for a projection with split outputs (q: d -> heads x head_dim) and with split inputs
    (out: heads x head_dim -> d)."""
    rng = np.random.default_rng(0)
    rows, d, heads, head_dim, slots, rank = 4, 8, 2, 4, 3, 5
    ids = np.array([2, -1, 0, 2], np.int32)
    for spec, x_shape, a_in, b_out in (("btd,dhk->bthk", (rows, tokens, d), (d,), (heads, head_dim)),
                                       ("bthk,hkd->btd", (rows, tokens, heads, head_dim), (heads, head_dim), (d,))):
        x = rng.normal(size=x_shape).astype(np.float32)
        a = rng.normal(size=(slots, *a_in, rank)).astype(np.float32)
        b = rng.normal(size=(slots, rank, *b_out)).astype(np.float32)
        a[1, ..., 2:] = 0  # slot 1 has rank 2, padded
        got = np.asarray(pooled_lora_delta(x, a, b, ids, _split_einsum(spec)))
        for row, slot in enumerate(ids):
            flat_x = x[row].reshape(tokens, -1)
            want = np.zeros((tokens, int(np.prod(b_out))), np.float32) if slot < 0 else \
                flat_x @ a[slot].reshape(-1, rank) @ b[slot].reshape(rank, -1)
            np.testing.assert_allclose(got[row].reshape(tokens, -1), want, rtol=1e-5, atol=1e-5)


def test_adapters_over_an_int8_base_add_what_the_models_own_lora_forward_adds(models):
    """The base held as int8 (as `python -m gptj.convert quantize` writes it), two adapters in the pool: one
    prefill of three rows (the base, each adapter) gives each row's last-position logits of the model's own
    LoRA forward (`GPTJ(config, lora=...)`) over the same int8 weights."""
    from gptj.convert.quantize import quantize_params, quantized_config
    from gptj.core.param_tree import merge_params
    from gptj.core.streaming import read_all
    from gptj.inference.runner import ModelRunner
    from gptj.model.transformer import GPTJ
    from gptj.weights.formats.peft import read_peft

    config = quantized_config(models["config"], 8)
    runner = ModelRunner(config, read_all(quantize_params(models["params"], config)))
    runner.reserve_adapters(2, 8)
    adapters = [read_peft(models["paths"][name], models["config"]) for name in ("p2", "p8")]
    for slot, (lora, tree) in enumerate(adapters):
        runner.write_adapter(slot, lora_lib.pool_entry(tree, lora, 8, runner.config))
    tokens = np.random.default_rng(3).integers(0, VOCAB, (3, 12)).astype(np.int32)
    cache = runner.new_cache(4, 32)
    _, logits = runner.prefill(cache, np.arange(3, dtype=np.int32), tokens, np.full(3, 12, np.int32), 0, 4,
                               np.array([-1, 0, 1], np.int32))
    logits = np.asarray(logits)
    for row, adapter in enumerate([None] + adapters):
        model, params = GPTJ(runner.config), runner.params
        if adapter is not None:
            model, params = GPTJ(runner.config, lora=adapter[0]), merge_params(params, adapter[1])
        want = np.asarray(model.apply({"params": params}, tokens[row:row + 1]))[0, -1]
        np.testing.assert_allclose(logits[row, :VOCAB], want[:VOCAB], atol=2e-4, rtol=1e-4)
    assert np.abs(logits[1] - logits[0]).max() > 0.1 and np.abs(logits[2] - logits[0]).max() > 0.1


@pytest.mark.parametrize("changes, message", [
    (dict(adapters="a"), "must be NAME=DIR"),
    (dict(adapters="a=/no/such/dir"), "does not exist"),
    (dict(adapters="a=/tmp,a=/tmp"), "given twice"),
    (dict(adapters="bad,name=/tmp"), "must be NAME=DIR"),
    (dict(adapters="a=/tmp,b=/tmp", max_adapters=1), "names 2 adapters but serve.max_adapters=1"),
    (dict(max_adapter_rank=-1), "max_adapter_rank must be >= 0"),
    (dict(prefix_cache_gib=-1.0), "prefix_cache_gib must be >= 0"),
    (dict(prefix_block_size=0), "prefix_block_size must be >= 1"),
])
def test_serve_settings_are_checked(changes, message):
    config = tiny_config()
    config.serve.update(changes)
    with pytest.raises(ConfigError, match=message):
        validate(config, "serve")


def test_schema_fuzz_of_the_adapter_endpoints_finds_no_5xx(server):
    """schemathesis against /openapi.json, on a server with adapter slots (so loads really read the paths it
    makes up): every answer of the two adapter endpoints is a documented non-5xx. Last in this module: it may
    unload an adapter."""
    schemathesis = pytest.importorskip("schemathesis")
    from hypothesis import HealthCheck, given, settings
    from schemathesis.checks import not_a_server_error
    from schemathesis.specs.openapi.checks import (content_type_conformance, negative_data_rejection,
                                                   response_schema_conformance, status_code_conformance)

    url, _ = server
    schema = schemathesis.openapi.from_url(url + "/openapi.json")
    operations = [r.ok() for r in schema.get_all_operations() if r.ok().path.endswith("_lora_adapter")]
    assert len(operations) == 2
    checks = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
    for operation in operations:
        for mode in (schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE):
            mode_checks = checks + ([negative_data_rejection] if mode == schemathesis.GenerationMode.NEGATIVE else [])

            @settings(max_examples=15, deadline=None, database=None, derandomize=True,
                      suppress_health_check=list(HealthCheck))
            @given(operation.as_strategy(generation_mode=mode))
            def call(case):
                case.validate_response(case.call(base_url=url, timeout=120), checks=mode_checks)

            call()
