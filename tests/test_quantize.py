"""Quantized inference: int8 / int4 weights with bf16 scales (gptj.model.quantized, `python -m gptj.convert quantize`).

Checked against independent references: a numpy dequantization written
here (np.repeat of the scales, not gptj's reshape), the fp32 model fed the
dequantized weights, single-device runs, and the fp32 model's own quality.
"""

import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from gptj.configs import base
from gptj.convert.__main__ import main as convert
from gptj.core.partitioning import Partitioner, make_mesh
from gptj.data.tasks.demo import demo_byte_batches
from gptj.model import quantized as quantize
from gptj.model.transformer import GPTJ, GPTJConfig, abstract_params, init_cache
from gptj.settings import validate
from gptj.errors import ConfigError
from gptj.weights import params_dir as params_io
from gptj.weights.source import load_for_inference, open_weights, with_peft_adapter
from xla_env import run_heavy_partitioner

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The shape of gptj/configs/tiny.py (its 50k-row embedding and head dominate its bytes).
TINY = GPTJConfig(vocab_size=50257, vocab_pad_multiple=64, num_layers=2, d_model=128, num_heads=4, rotary_dim=16,
                  max_len=256)
TOKENS = np.random.default_rng(0).integers(0, TINY.vocab_size, (2, 16)).astype(np.int32)
QUANTIZED = {"int8": ["--bits=8"], "int4": ["--bits=4", "--group_size=32"]}


def reference_dequantize(values, scale, spans, group_size):
    """values * scale in fp32 with numpy: each scale repeated over the inputs it spans."""
    values, scale = np.asarray(values).astype(np.float32), np.asarray(scale).astype(np.float32)
    lo, hi = spans
    if group_size:
        return values * np.repeat(scale, group_size, axis=hi - 1)
    return values * scale.reshape(scale.shape[:lo] + (1,) * (hi - lo) + scale.shape[lo:])


def dequantized_tree(tree, config, path=()):
    """A quantized parameter tree as the fp32 model's (numpy reference dequantization)."""
    if quantize.is_quantized(tree):
        matrix = next(m for m in quantize.MATRICES.values() if m.path == path)
        spans = tuple(d + matrix.stacked for d in matrix.spans)
        return reference_dequantize(tree["values"], tree["scale"], spans, config.quant_group_size)
    if isinstance(tree, dict):
        return {k: dequantized_tree(v, config, path + (k,)) for k, v in tree.items()}
    return np.asarray(tree, np.float32)


def listing(path):
    """Every file under `path` with its size and modification time (to prove nothing was written)."""
    out = {}
    for root, _, names in os.walk(path):
        for name in names:
            stat = os.stat(os.path.join(root, name))
            out[os.path.relpath(os.path.join(root, name), path)] = (stat.st_size, stat.st_mtime_ns)
    return out


def disk_bytes(path):
    return sum(size for size, _ in listing(path).values())


def make_dirs(root, config, params=None):
    """`params` (default: random) of `config` as an fp32 params directory, and its int8 and int4 (group 32) ones."""
    if params is None:
        params = jax.jit(lambda: nn.meta.unbox(GPTJ(config).init(jax.random.PRNGKey(0), TOKENS)["params"]))()
    params_io.save_params(str(root / "fp32"), params, config)
    for name, flags in QUANTIZED.items():
        assert convert(["quantize", f"--workdir={root / 'fp32'}", f"--out={root / name}", *flags]) == 0
    return root


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    """The tiny config's shape, randomly initialised: fp32, int8 and int4 params directories."""
    return make_dirs(tmp_path_factory.mktemp("quantize"), TINY)


@pytest.fixture(scope="module")
def small_dirs(tmp_path_factory):
    """The same with a 512-token vocabulary (quicker to compile on many meshes)."""
    return make_dirs(tmp_path_factory.mktemp("quantize_small"), TINY.replace(vocab_size=512, vocab_pad_multiple=8))


# -- 1. the arithmetic and the files ---------------------------------------------------------------

@pytest.mark.parametrize("bits, group_size", [(8, 0), (8, 16), (4, 0), (4, 16)])
def test_round_trip_error_is_at_most_half_a_scale(bits, group_size):
    rng = np.random.default_rng(bits + group_size)
    layouts = {  # shape (layer axis first for the stacked ones), the dims a scale spans
        "q_proj-like": ((2, 32, 4, 8), (1, 2)),
        "out_proj-like": ((2, 4, 16, 24), (1, 3)),
        "wte-like": ((40, 32), (1, 2)),
    }
    for name, (shape, spans) in layouts.items():
        w = rng.normal(0, 0.02, shape).astype(np.float32)
        w.flat[7] = 0.5  # an outlier
        w[..., 0] = 0.0  # an all-zero output (or row slice)
        values, scale = quantize.quantize_matrix(w, bits, group_size, spans)
        assert values.dtype == np.dtype(quantize.int_dtype(bits)) and values.shape == w.shape, name
        assert scale.dtype == ml_dtypes.bfloat16, name
        assert scale.shape == quantize.scale_shape(shape, spans, group_size), name
        assert np.abs(values.astype(np.int32)).max() <= quantize.qmax(bits), name
        back = reference_dequantize(values, scale, spans, group_size)
        half_scale = reference_dequantize(np.ones(shape, np.int8), scale, spans, group_size) / 2
        assert np.all(np.abs(w - back) <= half_scale * (1 + 1e-6)), name
        # gptj's own dequantization (what the model runs) gives exactly the same numbers.
        ours = quantize.dequantize({"values": values, "scale": scale}, spans, jnp.float32)
        np.testing.assert_array_equal(np.asarray(ours), back, err_msg=name)


def test_a_scale_rounded_down_by_bf16_still_bounds_the_error():
    """The worst case: max|w| / qmax just under 1 + 2**-8, which bf16 rounds down to 1 (by nearly half a step)."""
    for bits in (8, 4):
        largest = quantize.qmax(bits) * (1 + 2.0 ** -8 - 2.0 ** -20)
        w = np.array([[largest], [0.3]], np.float32)
        values, scale = quantize.quantize_matrix(w, bits, 0, (0, 1))
        assert float(scale[0]) == 1.0 and int(values[0, 0]) == quantize.qmax(bits)
        assert abs(largest - quantize.qmax(bits) * float(scale[0])) <= float(scale[0]) / 2


def test_default_groups_fit_the_model():
    from gptj.convert.quantize import quantized_config
    from gptj.scaling import MODEL_SHAPES

    assert quantized_config(MODEL_SHAPES["gptj_6b"], 4).quant_group_size == 128
    assert quantized_config(TINY, 4).quant_group_size == 32  # head_dim 32 (out_proj's input)
    assert quantized_config(TINY, 8).quant_group_size == 0  # int8: a scale per output channel


@pytest.mark.parametrize("bits, group_size", [(8, 0), (4, 4)])
@pytest.mark.parametrize("block_floats", [13, 500])
def test_streamed_quantization_equals_whole_matrices(bits, group_size, block_floats, monkeypatch):
    """The converter reads blocks of odd sizes (groups cut across blocks); every box equals the whole-matrix result.

    The reference is `quantize_matrix` on each whole matrix (a layer at a
    time for stacked ones), as the converter computed it before it streamed.
    """
    from gptj.convert.quantize import quantize_params, quantized_config
    from gptj.core import streaming

    monkeypatch.setattr(streaming, "BLOCK_BYTES", 4 * block_floats)
    config = GPTJConfig(vocab_size=40, num_layers=2, d_model=48, num_heads=4, rotary_dim=4, max_len=16)
    rng = np.random.default_rng(bits + block_floats)
    params = jax.tree_util.tree_map(lambda a: rng.normal(0, 0.02, a.shape).astype(np.float32),
                                    nn.meta.unbox(abstract_params(config)))
    params["blocks"]["mlp"]["fc_in_kernel"][1, :, 5] = 0.0  # an all-zero channel
    q_config = quantized_config(config, bits, group_size)
    lazy = quantize_params(params, q_config)
    for target in quantize.TARGETS:
        matrix = quantize.MATRICES[target]
        w, q = params, lazy
        for key in matrix.path:
            w, q = w[key], q[key]
        layers = [quantize.quantize_matrix(x, bits, group_size, matrix.spans) for x in (w if matrix.stacked else [w])]
        values, scale = (np.stack(part) if matrix.stacked else part[0] for part in zip(*layers))
        np.testing.assert_array_equal(np.asarray(q[quantize.SCALE]).view(np.uint16), scale.view(np.uint16), target)
        np.testing.assert_array_equal(np.asarray(q[quantize.VALUES]).astype(np.int8), values.astype(np.int8), target)
        box = tuple(slice(n // 3, n - n // 4) for n in w.shape)  # any box, not aligned to groups or blocks
        np.testing.assert_array_equal(q[quantize.VALUES].read(box).astype(np.int8), values[box].astype(np.int8))
    assert lazy["blocks"]["ln"]["scale"].dtype == ml_dtypes.bfloat16


def test_quantized_directories_are_small_and_recorded(dirs):
    fp32 = disk_bytes(dirs / "fp32" / "params")
    assert disk_bytes(dirs / "int8" / "params") <= 0.3 * fp32
    assert disk_bytes(dirs / "int4" / "params") <= 0.18 * fp32
    config = open_weights(str(dirs / "int4")).config
    assert (config.quant_bits, config.quant_group_size, config.param_dtype) == (4, 32, "bfloat16")
    assert config.quant_targets == quantize.TARGETS
    stored, _ = params_io.load_params(str(dirs / "int4"))
    assert stored["blocks"]["mlp"]["fc_in_kernel"]["values"].dtype == jnp.int4
    assert stored["blocks"]["mlp"]["fc_in_bias"].dtype == jnp.bfloat16


@pytest.mark.parametrize("name", ["int8", "int4"])
def test_quantized_model_equals_the_fp32_model_on_dequantized_weights(dirs, name):
    stored, config = params_io.load_params(str(dirs / name))
    run = config.replace(param_dtype="float32")
    ours = GPTJ(run).apply({"params": params_io.to_numpy(stored)}, TOKENS)
    reference = GPTJ(TINY).apply({"params": dequantized_tree(params_io.to_numpy(stored), config)}, TOKENS)
    np.testing.assert_allclose(np.asarray(ours), np.asarray(reference), rtol=0,
                               atol=1e-5 * float(np.abs(reference).max()))


# -- 2. every rule set shards it -------------------------------------------------------------------

def _partitioner(data, model, rules):
    return Partitioner(make_mesh(data, model, devices=jax.devices()[:data * model]), rules)


def _loaded(weights_dir, data, model, rules):
    """(params, model config) as sample, serve and eval load `weights_dir` onto a data x model mesh."""
    config = base.get_config()
    config.model.update(open_weights(str(weights_dir)).config.replace(quant_bits=0, quant_group_size=0,
                                                                      quant_targets=()).to_dict())
    config.mesh.update(dict(data=data, model=model, rules=rules))
    return load_for_inference(config, str(weights_dir), _partitioner(data, model, rules))


def _logits(weights_dir, data, model, rules):
    params, model_config = _loaded(weights_dir, data, model, rules)
    forward = _partitioner(data, model, rules).jit(lambda p, t: GPTJ(model_config).apply({"params": p}, t))
    return params, np.asarray(forward(params, TOKENS % model_config.vocab_size))


@pytest.mark.parametrize("name", ["int8", "int4"])
def test_meshes_and_rule_sets_give_the_single_device_logits(small_dirs, name):
    _, single = _logits(small_dirs / name, 1, 1, "megatron")
    for data, model in ((2, 4), (4, 2)):
        for rules in ("megatron", "zero3"):
            params, logits = _logits(small_dirs / name, data, model, rules)
            values = params["blocks"]["attn"]["q_proj"]["values"]
            assert values.dtype == jnp.dtype(quantize.int_dtype(4 if name == "int4" else 8))
            assert values.sharding.shard_shape(values.shape) != values.shape  # really split
            np.testing.assert_allclose(logits, single, rtol=0, atol=1e-5 * float(np.abs(single).max()),
                                       err_msg=f"{name} {data}x{model} {rules}")


def test_evaluation_harness_scores_with_the_quantized_head(small_dirs):
    """--mode=eval's harness applies the head itself (to the scored positions): it must get the scales too."""
    from gptj.evaluation import harness as eval_harness

    params, model = _loaded(small_dirs / "int4", 2, 4, "megatron")
    lm = eval_harness.GPTJLM(params, model, _partitioner(2, 4, "megatron"), tokenizer=None, batch_size=8)
    tokens = TOKENS[0] % model.vocab_size
    (score, _), = lm.score_rows([eval_harness._Row(tokens[:-1], tokens[1:], 3)])
    logits = GPTJ(model).apply({"params": params_io.to_numpy(params)}, tokens[None, :-1])[0]
    expected = jax.nn.log_softmax(logits)[np.arange(len(tokens) - 1), tokens[1:]][-3:].sum()
    assert score == pytest.approx(float(expected), abs=1e-4)


# -- 3. no full-precision copy of the weights ------------------------------------------------------

def test_compiled_decode_and_forward_hold_no_full_precision_copy():
    """XLA's temporaries stay far below one fp32 copy of the matrices (which a dequantize-first model would make).

    A model whose matrices dominate: 8 layers of d_model 256. (XLA:CPU widens
    int4 to int8 for the whole stack before the layer loop: an int8-sized
    temporary, still under the bound; accelerators read int4 as it is.)
    """
    config = GPTJConfig(vocab_size=256, num_layers=8, d_model=256, num_heads=4, rotary_dim=16, max_len=64)
    full_precision = 4 * (12 * config.d_model ** 2 * config.num_layers + 2 * 256 * config.d_model)
    for bits, group_size in ((8, 0), (4, 64)):
        quantized = config.replace(quant_bits=bits, quant_group_size=group_size, quant_targets=quantize.TARGETS)
        params = nn.meta.unbox(abstract_params(quantized))
        cache = jax.eval_shape(lambda: init_cache(quantized, 1, 64))

        def decode(p, c, t):
            return GPTJ(quantized, decode=True).apply({"params": p, "cache": c}, t, mutable=["cache"])

        programs = {
            "decode step": jax.jit(decode, donate_argnums=(1,)).lower(
                params, cache, jax.ShapeDtypeStruct((1, 1), jnp.int32)),
            "forward": jax.jit(lambda p, t: GPTJ(quantized).apply({"params": p}, t)).lower(
                params, jax.ShapeDtypeStruct((1, 64), jnp.int32)),
        }
        for what, lowered in programs.items():
            memory = lowered.compile().memory_analysis()
            assert memory.temp_size_in_bytes < full_precision / 2, (bits, what, memory.temp_size_in_bytes)
            if what == "forward":  # the arguments are the quantized weights themselves
                assert memory.argument_size_in_bytes < full_precision * (0.3 if bits == 8 else 0.2)


# -- 4. bad input --------------------------------------------------------------------------------

def _one_line_error(args, capsys):
    assert convert(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    return err


def test_bad_input_is_one_line_and_overwrites_nothing(dirs, tmp_path, capsys):
    before = {name: listing(dirs / name) for name in ("fp32", "int8", "int4")}
    new = tmp_path / "new"
    cases = {
        "already quantized": ([f"--workdir={dirs / 'int8'}", f"--out={new}"], "already quantized (int8 per channel)"),
        "bit width": ([f"--workdir={dirs / 'fp32'}", f"--out={new}", "--bits=3"], "--bits must be 8 or 4, got 3"),
        "group size": ([f"--workdir={dirs / 'fp32'}", f"--out={new}", "--bits=4", "--group_size=48"],
                       "quant_group_size 48 does not divide the input dimension of wte (128)"),
        "unknown target": ([f"--workdir={dirs / 'fp32'}", f"--out={new}", "--targets=q_proj,lm_haed"],
                           "unknown quant_targets ['lm_haed']"),
        "existing output": ([f"--workdir={dirs / 'fp32'}", f"--out={dirs / 'int4'}"], "already holds params"),
    }
    for case, (args, message) in cases.items():
        assert message in _one_line_error(["quantize", *args], capsys), case
        assert not new.exists(), case
    for command in ("to_hf", "slim"):
        err = _one_line_error([command, f"--workdir={dirs / 'int4'}", f"--out={new}"], capsys)
        assert "int4 in groups of 32-quantized weights" in err and not new.exists()
    assert {name: listing(dirs / name) for name in before} == before


def test_training_refuses_quantized_weights(dirs):
    config = base.get_config()
    config.model.update(TINY.to_dict())
    config.data.train_task = "gptj_demo_train"
    config.init_from = str(dirs / "int8")
    with pytest.raises(ConfigError, match=r"init_from=.*int8 holds int8 per channel-quantized weights: quantized "
                                          "weights are for sampling, serving and evaluation"):
        validate(config, "train", check_tasks=False)
    config.init_from = ""
    with pytest.raises(ConfigError, match=r"--workdir=.*int4 is a params directory of int4 in groups of 32-quantized"):
        validate(config, "train", check_tasks=False, workdir=str(dirs / "int4"))
    config.model.update(dict(quant_bits=8, quant_targets=("q_proj",)))
    with pytest.raises(ConfigError, match="model.quant_bits=8: quantized weights are for"):
        validate(config, "train", check_tasks=False)
    validate(config, "sample")  # inference takes them
    with pytest.raises(ConfigError, match="an adapter cannot be merged into"):
        with_peft_adapter(open_weights(str(dirs / "int8")), "peft:/some/adapter")


@pytest.mark.slow
def test_command_line_samples_quantized_and_refuses_to_train_it(dirs):
    """main.py end to end: --mode=sample reads the int4 directory; --mode=train on it is one line, nothing written."""
    env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
    main = [sys.executable, os.path.join(ROOT, "main.py"), "--config=gptj/configs/tiny.py"]
    before = listing(dirs / "int4")
    runs = {
        "sample": main + [f"--workdir={dirs / 'int4'}", "--mode=sample", "--prompt=Hello", "--max_new_tokens=4",
                          "--temperature=0"],
        "train": main + [f"--workdir={dirs / 'int4'}", "--mode=train"],
    }
    procs = {k: subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for k, cmd in runs.items()}
    (sample_out, sample_err), (_, train_err) = (p.communicate(timeout=300) for p in procs.values())
    assert procs["sample"].returncode == 0, sample_err[-2000:]
    assert sample_out.startswith("Hello"), sample_out
    assert procs["train"].returncode == 1 and "Traceback" not in train_err, train_err[-2000:]
    assert "is a params directory of int4 in groups of 32-quantized weights" in train_err.strip().splitlines()[-1]
    assert listing(dirs / "int4") == before


# -- 5. quality on a trained model ---------------------------------------------------------------

SEQ, BATCH = 64, 8
# Enough that near-ties between the likeliest bytes are rare: after 150 steps a greedy continuation of the
# fp32 model could flip at one of them (and differ from there on) under any perturbation of the weights.
TRAIN_STEPS = 300


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The tiny config's trunk trained on the demo corpus's bytes (vocabulary 256) with gptj's Trainer, then quantized.

    Bytes instead of GPT-2 tokens keep it cheap while every weight is
    trained (a few hundred steps barely move a 50k-row embedding).
    benchmarks/quantized_decode.py trains and measures the same model.
    """
    from gptj import recipe

    config = base.get_config()
    config.model.update(TINY.replace(vocab_size=256, vocab_pad_multiple=1, max_len=128).to_dict())
    config.optimizer.update(dict(lr=3e-3, end_lr=3e-4, warmup_steps=20, anneal_steps=TRAIN_STEPS, weight_decay=0.1))
    config.train.batch_size = BATCH
    config.data.seq_len = SEQ
    model = recipe.run_model_config(config)
    partitioner = run_heavy_partitioner()  # trains 300 steps, then decodes: see xla_env
    trainer = recipe.build_trainer(config, model, partitioner)
    state = trainer.init_state(0)
    for batch in demo_byte_batches("train", TRAIN_STEPS, BATCH, SEQ, seed=0):
        state, _ = trainer.train_step(state, batch)
    root = make_dirs(tmp_path_factory.mktemp("quantize_trained"), model, state["params"])
    return config, partitioner, root


@pytest.mark.slow
def test_quantized_quality_on_a_trained_model(trained):
    """Validation perplexity (as --mode=eval computes it) and greedy tokens of int8 / int4 against fp32."""
    from gptj import recipe
    from gptj.inference.sampler import Sampler

    config, partitioner, root = trained
    validation = demo_byte_batches("validation", 4, BATCH, SEQ)
    prompts = [list(b) for b in validation[0]["inputs"][:, :16]]
    perplexity, tokens = {}, {}
    for name in ("fp32", "int8", "int4"):
        params, model = load_for_inference(config, str(root / name), partitioner)
        perplexity[name] = recipe.build_trainer(config, model, partitioner).evaluate(params, validation)["perplexity"]
        sampler = Sampler(model, params, partitioner, eos_id=None)
        if name != "fp32":  # the sampler holds the integers, not a floating-point copy of them
            assert sampler.params["blocks"]["mlp"]["fc_in_kernel"]["values"].dtype == quantize.int_dtype(int(name[3:]))
        tokens[name] = np.array([g.tokens for g in sampler.generate(prompts, max_new_tokens=32, temperature=0.0)])
    assert perplexity["fp32"] < 12, perplexity  # it learned (a uniform guess over bytes is 256)
    assert abs(perplexity["int8"] / perplexity["fp32"] - 1) <= 0.01, perplexity
    assert abs(perplexity["int4"] / perplexity["fp32"] - 1) <= 0.05, perplexity
    assert tokens["int8"].shape == (8, 32)
    assert np.mean(tokens["int8"] == tokens["fp32"]) >= 0.95, tokens


# -- 6. the serving memory plan ------------------------------------------------------------------

def _serve_config(data, model, rules="megatron"):
    config = base.get_config()
    config.model.update(TINY.replace(vocab_size=512, vocab_pad_multiple=8, dtype="bfloat16").to_dict())
    config.mesh.update(dict(data=data, model=model, rules=rules))
    return config


def test_serve_plan_splits_weights_and_cache_as_the_arithmetic_says():
    from gptj import plan as plan_lib

    plan = plan_lib.make_serve_plan(_serve_config(2, 4), batch=4, context=64, device_memory_gib=1.0)
    bf16, int8, int4 = plan.rows
    assert [r.weights_format for r in plan.rows] == ["bfloat16", "int8 per channel", "int4 in groups of 32"]
    c, v = TINY, 512  # groups of 32: the largest divisor of 128 that head_dim 32 allows
    # megatron on 2 x 4: the vocabulary, heads and mlp dims split 4 ways over `model`, embed dims replicated.
    matrices = (2 * v * c.d_model + c.num_layers * (4 * c.d_model ** 2 + 2 * c.d_model * c.mlp_dim)) // 4
    small = 2 * c.num_layers * c.d_model + c.num_layers * (c.mlp_dim // 4 + c.d_model) + v // 4 + 2 * c.d_model
    assert bf16.weights == 2 * (matrices + small)  # LayerNorms, biases
    # Per channel, a scale per output: q, k, v over heads (split), out_proj and fc_out over embed (replicated).
    per_channel = 2 * v // 4 + c.num_layers * (3 * c.d_model // 4 + c.d_model + c.mlp_dim // 4 + c.d_model)
    assert int8.weights == matrices + 2 * per_channel + 2 * small
    assert int4.weights == matrices // 2 + 2 * (matrices // 32) + 2 * small  # one bf16 scale per 32 values
    # KV cache: keys and values, [layers, batch / 2, heads / 4, context, head_dim] in bf16 on each device.
    # Plus which slots hold tokens ([batch / 2, context] bools) and the next slot's index (int32).
    kv = 2 * c.num_layers * (4 // 2) * (c.num_heads // 4) * 64 * c.head_dim * 2 + (4 // 2) * 64 + 4
    assert bf16.kv_cache == int8.kv_cache == int4.kv_cache == kv
    for row in plan.rows:
        assert row.temporaries > 0 and row.peak >= row.weights + row.kv_cache
        assert plan.fits(row) is True
    assert int4.weights < int8.weights < bf16.weights  # (at this size the temporaries outweigh the weights)
    text = plan_lib.format_serve_plan(plan)
    assert "batch 4 x 64 tokens" in text and "int4 in groups of 32" in text and "fits 1.00 GiB" in text
    with pytest.raises(ConfigError, match="--batch_size=3 must be divisible by the data-parallel size"):
        plan_lib.make_serve_plan(_serve_config(2, 4), batch=3, context=64)


@pytest.mark.slow
def test_gptj_6b_serves_from_an_8_gib_device_in_int4():
    """The issue's example: GPT-J-6B, batch 1 at 2048 tokens, one device: int4 fits 8 GiB, bf16 and int8 do not."""
    from gptj import plan as plan_lib
    from gptj.configs import gptj_6b

    config = gptj_6b.get_config()
    config.mesh.update(dict(data=1, model=1))
    plan = plan_lib.make_serve_plan(config, batch=1, context=2048, device_memory_gib=8)
    bf16, int8, int4 = plan.rows
    assert plan.num_params == 6_050_882_784 and bf16.weights == 2 * plan.num_params
    assert 0.49 < int8.weights / bf16.weights < 0.51 and 0.25 < int4.weights / bf16.weights < 0.27
    assert bf16.kv_cache == 2 * 28 * 2048 * 4096 * 2 + 2048 + 4  # 0.875 GiB, the slots' mask and index
    assert [plan.fits(r) for r in plan.rows] == [False, False, True]
