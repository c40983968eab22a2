"""mesh-transformer-jax checkpoints: layout, logits against the reference's own forward pass, HF export, bad input."""

import json
import os
import shutil

import flax.linen as nn
import jax
import numpy as np
import pytest
from mtj_utils import TINY, random_shards, reference_logits, write_checkpoint

from gptj.model.transformer import GPTJ, abstract_params, count_params
from gptj.weights.formats import hf, mtj
from gptj.errors import WeightsError

TOKENS = np.array([[5, 17, 126, 64, 33, 0, 99, 100, 15, 127, 80, 81]])


@pytest.fixture(scope="module")
def shards():
    return random_shards(TINY, seed=1)


def _gptj_logits(params, config):
    return np.asarray(GPTJ(config).apply({"params": params}, TOKENS))[0, :, :config.vocab_size]


@pytest.mark.parametrize("with_opt,bf16", [(True, False), (False, True)], ids=["full_fp32_with_opt", "slim_bf16"])
def test_reference_checkpoint_imports_with_the_references_logits(shards, tmp_path, with_opt, bf16):
    model_dir = str(tmp_path / "model")
    # An older checkpoint too: meta.json's list decides which step is read.
    write_checkpoint(model_dir, random_shards(TINY, seed=9), TINY, step=10, with_opt=with_opt, bf16=bf16)
    step_dir = write_checkpoint(model_dir, shards, TINY, step=20, with_opt=with_opt, bf16=bf16, checkpoints=[10, 20])
    sample = np.load(os.path.join(step_dir, "shard_3", "0.npz"))
    assert (sample[sample.files[0]].dtype == np.dtype("V2")) == bf16  # bf16 really is stored as void

    params, config = mtj.read_mtj(model_dir)
    assert (config.num_layers, config.d_model, config.num_heads, config.rotary_dim, config.vocab_size) == (2, 64, 8, 4, 128)
    jax.tree_util.tree_map(lambda a, p: np.testing.assert_equal(a.shape, p.shape),
                           nn.meta.unbox(abstract_params(config)), params)
    # The reference computes from what it stored: bf16 values for a slim checkpoint.
    written = jax.tree_util.tree_map(lambda x: np.asarray(x.astype(np.float32 if not bf16 else "bfloat16"), np.float32),
                                     shards)
    expected = reference_logits(written, TINY, TOKENS[0])
    np.testing.assert_allclose(_gptj_logits(params, config), expected, atol=2e-4, rtol=1e-4)

    # The same weights exported to HuggingFace agree with the reference too.
    import torch
    from transformers import GPTJForCausalLM

    hf.write_hf(params, config, str(tmp_path / "hf"))
    model = GPTJForCausalLM.from_pretrained(str(tmp_path / "hf")).eval()
    with torch.no_grad():
        hf_logits = model(torch.as_tensor(TOKENS)).logits[0].numpy()
    np.testing.assert_allclose(hf_logits, expected, atol=2e-4, rtol=1e-4)


def test_step_dir_and_explicit_config(shards, tmp_path):
    step_dir = write_checkpoint(str(tmp_path / "m"), shards, TINY, step=3, with_opt=False, bf16=False, config_name=None)
    # No config JSON beside it: the GPT-J-6B config is assumed, and the shapes say it is not 6B.
    with pytest.raises(WeightsError, match="6B_roto_256.json.*another architecture|another architecture.*6B_roto_256"):
        mtj.read_mtj(step_dir)
    config_path = str(tmp_path / "cfg.json")
    with open(config_path, "w") as f:
        json.dump(TINY, f)
    from_path, _ = mtj.read_mtj(step_dir, config=config_path)
    from_dict, config = mtj.read_mtj(step_dir, config=TINY, vocab_pad_multiple=48)
    assert config.padded_vocab_size == 144
    np.testing.assert_array_equal(from_dict["wte"][:128], from_path["wte"])
    assert not from_dict["wte"][128:].any() and not from_dict["lm_head_kernel"][:, 128:].any()


def test_reference_parameter_count_arithmetic():
    """The reference's 6,053,381,344 is gptj's unique count plus the per-shard replicas (see mtj's docstring)."""
    config, shards = mtj.model_config_from_mtj(mtj.GPTJ_6B_MTJ_CONFIG)
    unique = count_params(abstract_params(config))
    stored = sum(int(np.prod(leaf.shape)) * shards for leaf in mtj.param_leaves(config, shards))
    assert unique == 6_050_882_784
    assert stored == 6_053_381_344


def _one_line(error) -> str:
    message = str(error.value)
    assert "\n" not in message and len(message) < 500
    return message


def test_truncated_shard(shards, tmp_path):
    step_dir = write_checkpoint(str(tmp_path / "m"), shards, TINY, step=1, with_opt=False, bf16=True)
    victim = os.path.join(step_dir, "shard_5", "7.npz")
    with open(victim, "r+b") as f:
        f.truncate(os.path.getsize(victim) // 2)
    with pytest.raises(WeightsError, match=r"shard_5/7\.npz.*truncated") as error:
        mtj.read_mtj(step_dir)
    _one_line(error)


def test_shard_count_not_matching_the_config(shards, tmp_path):
    model_dir = str(tmp_path / "m")
    step_dir = write_checkpoint(model_dir, shards, TINY, step=1, with_opt=False, bf16=True)
    shutil.rmtree(os.path.join(step_dir, "shard_7"))
    with pytest.raises(WeightsError, match="7 shard directories.*cores_per_replica=8") as error:
        mtj.read_mtj(model_dir)
    _one_line(error)
    shutil.rmtree(os.path.join(step_dir, "shard_2"))
    with pytest.raises(WeightsError, match=r"not shard_0\.\.shard_5"):
        mtj.read_mtj(model_dir)


def test_other_architectures(shards, tmp_path):
    # The reference's learned positional embeddings (pe="fixed") add a pos_embs leaf per shard.
    fixed = dict(shards)
    fixed["causal_transformer_shard/~/embedding_shard"] = {"pos_embs": np.zeros((8, 32, 8), np.float32)}
    step_dir = write_checkpoint(str(tmp_path / "fixed"), fixed, TINY, step=1, with_opt=False, bf16=False)
    with pytest.raises(WeightsError, match="another architecture") as error:
        mtj.read_mtj(step_dir)
    _one_line(error)
    with pytest.raises(WeightsError, match="pe 'fixed'"):
        mtj.read_mtj(step_dir, config={**TINY, "pe": "fixed"})
    with pytest.raises(WeightsError, match="norm 'rmsnorm'"):
        mtj.read_mtj(step_dir, config={**TINY, "norm": "rmsnorm"})
    # The right files, a config of another shape.
    with pytest.raises(WeightsError, match=r"expected \(96, 16\)|another architecture"):
        mtj.read_mtj(step_dir, config={**TINY, "d_model": 96, "n_heads": 8, "pe_rotary_dims": 4})
    # Not a reference checkpoint at all (an HF or gptj directory).
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text("{}")
    with pytest.raises(WeightsError, match="not a mesh-transformer-jax checkpoint"):
        mtj.read_mtj(str(tmp_path / "hf"))
