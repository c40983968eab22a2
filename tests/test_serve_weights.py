"""The serving engine on the weights `weights.load_for_inference` gives it: int8 / int4 quantized directories and
LoRA adapters merged over their base, against independent references (the fp32 model's full forward pass on
numpy-dequantized weights; HuggingFace PyTorch with peft's own merge)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gptj.configs import base
from gptj.convert.__main__ import main as convert
from gptj.core.partitioning import Partitioner, make_mesh
from gptj.errors import ConfigError
from gptj.inference.engine import GENERATE, SCORE, Engine, Job
from gptj.inference.runner import ModelRunner
from gptj.model.transformer import GPTJ, GPTJConfig
from gptj.settings import validate
from gptj.weights.params_dir import save_params
from gptj.weights.source import load_for_inference, open_weights
from tests.sampling_utils import random_hf_gptj, random_params
from tests.serve_utils import hf_greedy
from tests.test_quantize import dequantized_tree

# Two prompts prefilled together, then decoded together (few shapes: every program compiles anew per weights).
PROMPT_LENGTHS, NEW_TOKENS = (5, 30), 12
SMALL = GPTJConfig(vocab_size=100, vocab_pad_multiple=8, num_layers=2, d_model=32, num_heads=4, rotary_dim=4,
                   max_len=64)


def _single():
    return Partitioner(make_mesh(1, 1, devices=jax.devices()[:1]), "megatron")


def _inference_config(**changes):
    config = base.get_config()
    config.model.update(dict(dtype="float32", param_dtype="float32"))
    for key, value in changes.items():
        config[key] = value
    return config


def _engine_run(model_config, params, prompts):
    """Greedy generations and scores (top 2 included) of `prompts` through a 2-slot engine."""
    engine = Engine(ModelRunner(model_config, params, _single()), slots=2, prefill_chunk=64, decode_steps=4)
    generate = [Job(GENERATE, p, max_new_tokens=NEW_TOKENS, temperature=0.0, eos_id=None) for p in prompts]
    score = [Job(SCORE, p, top_logprobs=2) for p in prompts]
    engine.submit(generate + score)
    engine.run_until_idle()
    return [j.future.result().tokens for j in generate], [j.future.result() for j in score]


def _forward_reference(config, params, prompts):
    """Greedy continuations by the full forward pass (no KV cache: every token recomputes the prefix) and each
    prompt's log-softmax, in numpy."""
    forward = jax.jit(lambda p, t: GPTJ(config).apply({"params": p}, t))
    length = config.max_len

    def log_probs(tokens):
        logits = np.asarray(forward(params, jnp.asarray([tokens + [0] * (length - len(tokens))])))[0, :len(tokens)]
        logits = logits[:, :config.vocab_size].astype(np.float64)
        return logits - np.logaddexp.reduce(logits, axis=-1, keepdims=True)

    greedy = []
    for prompt in prompts:
        tokens = list(prompt)
        for _ in range(NEW_TOKENS):
            tokens.append(int(log_probs(tokens)[-1].argmax()))
        greedy.append(tokens[len(prompt):])
    return greedy, [log_probs(p) for p in prompts]


def test_cpu_inference_computes_in_fp32_unless_the_model_dtype_is_asked_for(tmp_path):
    """bf16 runs sample, serve and evaluate in fp32 on a CPU (its bf16 matmuls are the slower ones); cpu_dtype=model
    keeps bf16 and its half of the memory; anything else is a config error."""
    save_params(str(tmp_path / "fp32"), random_params(SMALL, seed=5, std=0.2), SMALL)
    bf16_run = _inference_config()
    bf16_run.model.dtype = "bfloat16"
    params, model_config = load_for_inference(bf16_run, str(tmp_path / "fp32"), _single())
    assert (model_config.dtype, model_config.param_dtype) == ("float32", "float32")
    assert params["blocks"]["attn"]["q_proj"].dtype == jnp.float32
    bf16_run.sample.cpu_dtype = "model"
    params, model_config = load_for_inference(bf16_run, str(tmp_path / "fp32"), _single())
    assert (model_config.dtype, model_config.param_dtype) == ("bfloat16", "bfloat16")
    assert params["blocks"]["attn"]["q_proj"].dtype == jnp.bfloat16
    bf16_run.sample.cpu_dtype = "bfloat17"
    with pytest.raises(ConfigError, match=r"sample.cpu_dtype must be one of \('float32', 'model'\), got 'bfloat17'"):
        validate(bf16_run, "sample")


@pytest.mark.parametrize("flags", [["--bits=8"], ["--bits=4", "--group_size=8"]], ids=["int8", "int4"])
def test_quantized_weights_serve_like_the_fp32_model_on_their_dequantized_values(tmp_path, flags):
    save_params(str(tmp_path / "fp32"), random_params(SMALL, seed=5, std=0.2), SMALL)
    assert convert(["quantize", f"--workdir={tmp_path / 'fp32'}", f"--out={tmp_path / 'q'}", *flags]) == 0
    params, model_config = load_for_inference(_inference_config(), str(tmp_path / "q"), _single())
    assert model_config.quant_bits == int(flags[0][-1])
    stored = open_weights(str(tmp_path / "q")).numpy()
    reference_params = dequantized_tree(stored, model_config)
    reference_config = model_config.replace(quant_bits=0, quant_group_size=0, quant_targets=())

    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, SMALL.vocab_size, n).tolist() for n in PROMPT_LENGTHS]
    tokens, scores = _engine_run(model_config, params, prompts)
    want_tokens, want_log_probs = _forward_reference(reference_config, reference_params, prompts)
    assert tokens == want_tokens
    for prompt, score, want in zip(prompts, scores, want_log_probs):
        np.testing.assert_allclose(score.token_logprobs[1:], want[np.arange(len(prompt) - 1), prompt[1:]], atol=1e-4)
        np.testing.assert_allclose([[lp for _, lp in top] for top in score.top_logprobs[1:]],
                                   -np.sort(-want[:-1], axis=-1)[:, :2], atol=1e-4)


def test_lora_adapter_merged_over_its_base_serves_like_peft(tmp_path):
    """lora.init_from=peft:DIR over init_from=hf:DIR (what --mode=serve loads): the engine's greedy tokens equal
    HF generate on peft's merge_and_unload() of the same adapter, and differ from the base's."""
    import peft
    import torch

    torch.set_num_threads(1)
    hf_model = random_hf_gptj(str(tmp_path / "hf"), vocab_size=96, max_len=64, std=0.2, seed=1)
    base_tokens = {}
    rng = np.random.default_rng(1)
    prompts = [rng.integers(0, 96, n).tolist() for n in PROMPT_LENGTHS]
    for i, prompt in enumerate(prompts):
        base_tokens[i] = hf_greedy(hf_model, prompt, NEW_TOKENS)
    torch.manual_seed(2)
    lora = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, init_lora_weights=False,
                           target_modules=["q_proj", "v_proj", "fc_in", "out_proj"])
    adapted = peft.get_peft_model(hf_model, lora)
    adapted.save_pretrained(str(tmp_path / "adapter"))
    merged = adapted.merge_and_unload().eval()

    config = _inference_config(init_from=f"hf:{tmp_path / 'hf'}")
    config.lora.init_from = f"peft:{tmp_path / 'adapter'}"
    params, model_config = load_for_inference(config, None, _single())
    tokens, _ = _engine_run(model_config, params, prompts)
    want = [hf_greedy(merged, prompt, NEW_TOKENS) for prompt in prompts]
    assert tokens == want
    assert any(want[i] != base_tokens[i] for i in range(len(prompts)))  # the adapter changed the answers
