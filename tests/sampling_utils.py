"""Shared helpers for the sampling and serving tests: tiny random models and their weights on disk."""

from __future__ import annotations

import os

import numpy as np

from gptj.model.transformer import GPTJConfig

GPT2_VOCAB_SIZE = 50257


def random_hf_gptj(out_dir: str, *, vocab_size: int = 96, d_model: int = 32, layers: int = 2, heads: int = 4,
                   rotary_dim: int = 4, max_len: int = 96, std: float = 0.1, seed: int = 0, pad_bias: float = 0.0):
    """Saves a randomly initialised HF GPTJForCausalLM (fp32) to `out_dir` and returns the torch model.

    A larger init std than GPT-J's 0.02 spreads the logits, so greedy choices
    are not decided by float rounding. `pad_bias` is added to the output bias
    of ids past GPT-2's 50257 (see `random_params`).
    """
    import torch
    import transformers

    torch.manual_seed(seed)
    hf_config = transformers.GPTJConfig(
        vocab_size=vocab_size, n_positions=max_len, n_embd=d_model, n_layer=layers, n_head=heads,
        rotary_dim=rotary_dim, initializer_range=std, bos_token_id=None, eos_token_id=None,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=False)
    model = transformers.GPTJForCausalLM(hf_config).eval()
    # HF zero-initialises biases; random ones make the test see them.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.normal_(0.0, std)
        model.lm_head.bias[GPT2_VOCAB_SIZE:] += pad_bias
    model.save_pretrained(out_dir)
    return model


def random_params(config: GPTJConfig, seed: int = 0, std: float = 0.1, pad_bias: float = 0.0):
    """Random numpy params for `config` (biases and LayerNorm included), without jit.

    `pad_bias` is added to the output bias of every id past GPT-2's 50257, so
    that a sampler which did not mask those padding ids would pick them.
    """
    import flax.linen as nn
    import jax

    from gptj.model.transformer import abstract_params

    abstract = nn.meta.unbox(abstract_params(config))
    rng = np.random.default_rng(seed)

    def one(path, leaf):
        centre = 1.0 if getattr(path[-1], "key", "") == "scale" else 0.0  # LayerNorm gains around 1
        return (centre + rng.normal(0.0, std, leaf.shape)).astype(np.float32)

    params = jax.tree_util.tree_map_with_path(one, abstract)
    params["lm_head_bias"][GPT2_VOCAB_SIZE:] += pad_bias
    return params


def gpt2_vocab_config(**changes) -> GPTJConfig:
    """A tiny model over the real GPT-2 vocabulary (so the BPE tokenizer's ids are valid)."""
    values = dict(vocab_size=50257, vocab_pad_multiple=64, num_layers=2, d_model=32, num_heads=4, rotary_dim=4,
                  max_len=128)
    values.update(changes)
    return GPTJConfig(**values)


def write_params_dir(path: str, config: GPTJConfig, seed: int = 0, pad_bias: float = 0.0) -> str:
    """A gptj params directory with random weights (see `random_params`); returns its path."""
    from gptj.weights.params_dir import save_params

    save_params(path, random_params(config, seed, pad_bias=pad_bias), config)
    return os.path.abspath(path)
