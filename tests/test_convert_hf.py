"""HF <-> gptj conversion: exact round trips, both weight formats, and clear errors for bad directories."""

import json
import os

import jax
import numpy as np
import pytest
from hf_utils import assert_loads_as, random_hf_model

from gptj.model.transformer import GPTJ
from gptj.weights.formats import hf
from gptj.weights.params_dir import load_params, save_params
from gptj.errors import WeightsError


@pytest.fixture(scope="module")
def hf_model():
    return random_hf_model(vocab_size=101, n_embd=32, n_layer=2, n_head=4, rotary_dim=4, seed=3)


@pytest.mark.parametrize("safe_serialization", [True, False])
def test_hf_to_gptj_to_hf_is_identical(hf_model, tmp_path, safe_serialization):
    src = tmp_path / "src"
    hf_model.save_pretrained(src, safe_serialization=safe_serialization)
    params, config = hf.read_hf(str(src), vocab_pad_multiple=16)
    assert config.padded_vocab_size == 112

    # Through a gptj params directory (Orbax) and back out to HF.
    save_params(str(tmp_path / "params"), params, config)
    restored, restored_config = load_params(str(tmp_path / "params"))
    assert restored_config == config
    hf.write_hf(jax.tree_util.tree_map(np.asarray, restored), restored_config, str(tmp_path / "out"))

    assert_loads_as(tmp_path / "out", hf_model, np.random.RandomState(0).randint(0, 101, size=(2, 9)))


def test_gptj_to_hf_to_gptj_is_bit_identical(tmp_path):
    import flax.linen as nn

    from gptj.model.transformer import GPTJConfig

    config = GPTJConfig(vocab_size=90, num_layers=3, d_model=32, num_heads=2, rotary_dim=8, max_len=32,
                        vocab_pad_multiple=8)
    variables = GPTJ(config).init(jax.random.PRNGKey(7), np.zeros((1, 4), np.int32))
    params = jax.tree_util.tree_map(np.asarray, nn.meta.unbox(variables["params"]))
    # Randomise zero-initialised biases and unit scales so every tensor is checked.
    rng = np.random.RandomState(0)
    params = jax.tree_util.tree_map(lambda x: (x + rng.normal(size=x.shape)).astype(np.float32), params)
    pad = config.padded_vocab_size - config.vocab_size
    params["wte"][-pad:] = 0  # padded rows carry no information and are zero after import
    params["lm_head_kernel"][:, -pad:] = 0
    params["lm_head_bias"][-pad:] = 0

    hf.write_hf(params, config, str(tmp_path / "hf"))
    back, back_config = hf.read_hf(str(tmp_path / "hf"), vocab_pad_multiple=8)
    assert back_config == config
    flat, _ = jax.tree_util.tree_flatten_with_path(params)
    back_flat = dict(jax.tree_util.tree_flatten_with_path(back)[0])
    for path, value in flat:
        assert back_flat[path].dtype == value.dtype
        np.testing.assert_array_equal(back_flat[path], value, err_msg=jax.tree_util.keystr(path))


def _one_line(error: Exception) -> str:
    message = str(error)
    assert "\n" not in message and len(message) < 400
    return message


def test_bad_hf_directories(hf_model, tmp_path):
    with pytest.raises(WeightsError, match="no such directory"):
        hf.read_hf(str(tmp_path / "missing"))

    (tmp_path / "empty").mkdir()
    with pytest.raises(WeightsError, match="no config.json") as e:
        hf.read_hf(str(tmp_path / "empty"))
    _one_line(e.value)

    bad_json = tmp_path / "bad_json"
    bad_json.mkdir()
    (bad_json / "config.json").write_text("{not json")
    with pytest.raises(WeightsError, match="not valid JSON"):
        hf.read_hf(str(bad_json))

    good = tmp_path / "good"
    hf_model.save_pretrained(good)
    config = json.loads((good / "config.json").read_text())

    gpt2 = tmp_path / "gpt2"
    gpt2.mkdir()
    (gpt2 / "config.json").write_text(json.dumps({**config, "model_type": "gpt2"}))
    with pytest.raises(WeightsError, match="not a GPT-J config") as e:
        hf.read_hf(str(gpt2))
    _one_line(e.value)

    no_weights = tmp_path / "no_weights"
    no_weights.mkdir()
    (no_weights / "config.json").write_text(json.dumps(config))
    with pytest.raises(WeightsError, match="no weights"):
        hf.read_hf(str(no_weights))

    # Weights of another shape than config.json claims.
    wrong_shape = tmp_path / "wrong_shape"
    hf_model.save_pretrained(wrong_shape)
    (wrong_shape / "config.json").write_text(json.dumps({**config, "n_embd": 64}))
    with pytest.raises(WeightsError, match="has shape") as e:
        hf.read_hf(str(wrong_shape))
    _one_line(e.value)

    truncated = tmp_path / "truncated"
    hf_model.save_pretrained(truncated)
    weights = truncated / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: os.path.getsize(weights) // 2])
    with pytest.raises(WeightsError, match="unreadable weights file") as e:
        hf.read_hf(str(truncated))
    _one_line(e.value)
