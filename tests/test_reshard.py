"""Resharding: params written on a 2x4 megatron mesh load onto other meshes and rule sets, unchanged.

Replaces the reference's resharding script: Orbax restores each array straight into the
target layout, so no un-shard / re-shard pass is needed.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gptj.core.partitioning import Partitioner, make_mesh
from gptj.model.transformer import GPTJ, GPTJConfig
from gptj.weights.params_dir import load_params, save_params

CONFIG = GPTJConfig(vocab_size=120, num_layers=2, d_model=64, num_heads=4, rotary_dim=8, max_len=32,
                    vocab_pad_multiple=8)
TOKENS = np.random.RandomState(0).randint(0, 120, size=(8, 16)).astype(np.int32)


def _init(rng):
    return GPTJ(CONFIG).init(rng, jnp.zeros((1, 4), jnp.int32))["params"]


def _place(partitioner):
    """Shardings of the params under a partitioner, and a jitted forward pass using them."""
    _, _, shardings = partitioner.abstract_state(_init, jax.random.PRNGKey(0))
    forward = partitioner.jit(lambda p, t: GPTJ(CONFIG).apply({"params": p}, t),
                              in_shardings=(shardings, partitioner.batch_sharding(2)))
    return shardings, forward


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """Random params created sharded on 2x4 megatron, their logits there, and the directory they were saved to."""
    partitioner = Partitioner(make_mesh(data=2, model=4), "megatron")
    shardings, forward = _place(partitioner)

    def init(rng):  # every tensor random, biases and LayerNorm included
        params = nn.meta.unbox(_init(rng))
        leaves, tree = jax.tree_util.tree_flatten(params)
        keys = jax.random.split(jax.random.PRNGKey(1), len(leaves))
        return tree.unflatten([x + 0.1 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])

    params = partitioner.jit(init, out_shardings=shardings)(jax.random.PRNGKey(0))
    assert params["blocks"]["attn"]["q_proj"].sharding.spec == jax.sharding.PartitionSpec(None, None, "model", None)
    path = str(tmp_path_factory.mktemp("reshard") / "params")
    save_params(path, params, CONFIG)
    return jax.device_get(params), np.asarray(forward(params, TOKENS)), path


@pytest.mark.parametrize("data,model,rules", [(1, 1, "megatron"), (8, 1, "dp"), (4, 2, "zero3")],
                         ids=["1_device", "8x1_dp", "4x2_zero3"])
def test_params_restore_onto_other_meshes(written, data, model, rules):
    host_params, logits, path = written
    devices = jax.devices()[:data * model]
    partitioner = Partitioner(make_mesh(data=data, model=model, devices=devices), rules)
    shardings, forward = _place(partitioner)

    params, config = load_params(path, shardings=shardings)
    assert config == CONFIG
    # Laid out as the target asks, with every value bit for bit what was written.
    jax.tree_util.tree_map(lambda x, s: np.testing.assert_equal(x.sharding.is_equivalent_to(s, x.ndim), True),
                           params, shardings)
    jax.tree_util.tree_map(np.testing.assert_array_equal, jax.device_get(params), host_params)
    if rules == "zero3":
        assert params["blocks"]["mlp"]["fc_in_kernel"].sharding.spec == jax.sharding.PartitionSpec(None, "data", "model")

    # Same forward outputs; only the order of the sharded sums may differ.
    np.testing.assert_allclose(np.asarray(forward(params, TOKENS)), logits, rtol=0, atol=2e-5)


def test_params_load_without_shardings_onto_one_device(written):
    """Tools that just want the weights (export, inspection) need not know the saving mesh."""
    host_params, _, path = written
    params, _ = load_params(path)
    for leaf in jax.tree_util.tree_leaves(params):
        assert len(leaf.sharding.device_set) == 1
    jax.tree_util.tree_map(np.testing.assert_array_equal, jax.device_get(params), host_params)
