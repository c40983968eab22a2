"""Slim export: params only in bf16, half the bytes, logits equal to the bf16-cast model's."""

import os

import flax.linen as nn
import jax
import numpy as np

from gptj.convert import slim
from gptj.model.transformer import GPTJ, GPTJConfig
from gptj.weights.params_dir import load_params, save_params

CONFIG = GPTJConfig(vocab_size=100, num_layers=2, d_model=64, num_heads=4, rotary_dim=8, max_len=32,
                    vocab_pad_multiple=8)
TOKENS = np.random.RandomState(0).randint(0, 100, size=(2, 16))


def _disk_bytes(path):
    return sum(os.path.getsize(os.path.join(root, name)) for root, _, names in os.walk(path) for name in names)


def test_slim_halves_bytes_and_matches_the_bf16_cast_model(tmp_path):
    params = nn.meta.unbox(GPTJ(CONFIG).init(jax.random.PRNGKey(0), TOKENS)["params"])
    rng = np.random.RandomState(1)  # non-trivial biases and LayerNorm scales
    params = jax.tree_util.tree_map(lambda x: np.asarray(x + 0.1 * rng.normal(size=x.shape), np.float32), params)
    save_params(str(tmp_path / "full"), params, CONFIG)

    slim_config = slim.slim(str(tmp_path / "full"), str(tmp_path / "slim"))
    assert slim_config == CONFIG.replace(param_dtype="bfloat16")
    loaded, loaded_config = load_params(str(tmp_path / "slim"))
    assert loaded_config == slim_config
    assert {x.dtype.name for x in jax.tree_util.tree_leaves(loaded)} == {"bfloat16"}

    assert slim.params_bytes(loaded) * 2 == slim.params_bytes(params)
    # On disk a bit under half: Orbax compresses, and bf16's exponent bytes compress better.
    ratio = _disk_bytes(tmp_path / "slim" / "params") / _disk_bytes(tmp_path / "full" / "params")
    assert 0.35 < ratio < 0.55, ratio

    cast = jax.tree_util.tree_map(lambda x: x.astype("bfloat16"), params)
    slim_logits = GPTJ(loaded_config).apply({"params": loaded}, TOKENS)
    cast_logits = GPTJ(CONFIG).apply({"params": cast}, TOKENS)
    np.testing.assert_array_equal(np.asarray(slim_logits), np.asarray(cast_logits))
    # ... and bf16 rounding really happened (so the equality above is not fp32 against fp32).
    full_logits = np.asarray(GPTJ(CONFIG).apply({"params": params}, TOKENS))[..., :100]
    difference = np.abs(np.asarray(slim_logits)[..., :100] - full_logits).max()
    assert 1e-4 < difference < 0.2, difference
