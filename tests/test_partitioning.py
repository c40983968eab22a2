"""Rule sets on 2x4 and 4x2 meshes: same forward as one device, and the shardings the tables promise."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from gptj.configs import gptj_6b
from gptj.core.partitioning import (RULE_SETS, Partitioner, PartitioningError, make_mesh, per_device_bytes,
                                    resolve_mesh_shape)
from gptj.model.transformer import GPTJ, GPTJConfig, abstract_params, count_params

CONFIG = GPTJConfig(vocab_size=120, vocab_pad_multiple=8, num_layers=2, d_model=32, num_heads=4, rotary_dim=4,
                    max_len=32)

# What each rule set promises for each parameter, as mesh axes per dimension (stacked layers first).
EXPECTED = {
    "megatron": {
        "wte": P("model", None),
        "blocks/attn/q_proj": P(None, None, "model", None),
        "blocks/attn/out_proj": P(None, "model", None, None),
        "blocks/mlp/fc_in_kernel": P(None, None, "model"),
        "blocks/mlp/fc_in_bias": P(None, "model"),
        "blocks/mlp/fc_out_kernel": P(None, "model", None),
        "blocks/mlp/fc_out_bias": P(None, None),
        "blocks/ln/scale": P(None, None),
        "lm_head_kernel": P(None, "model"),
        "ln_f/scale": P(None),
    },
    "zero3": {
        "wte": P("model", "data"),
        "blocks/attn/q_proj": P(None, "data", "model", None),
        "blocks/attn/out_proj": P(None, "model", None, "data"),
        "blocks/mlp/fc_in_kernel": P(None, "data", "model"),
        "blocks/mlp/fc_in_bias": P(None, "model"),
        "blocks/mlp/fc_out_kernel": P(None, "model", "data"),
        "blocks/mlp/fc_out_bias": P(None, "data"),
        "blocks/ln/scale": P(None, "data"),
        "lm_head_kernel": P("data", "model"),
        "ln_f/scale": P("data"),
    },
}
EXPECTED["zero1"] = EXPECTED["megatron"]  # zero1 shards only the optimizer state further
EXPECTED["megatron_sp"] = EXPECTED["megatron"]  # megatron_sp splits activations differently, not params
EXPECTED["dp"] = {name: P(*([None] * len(spec))) for name, spec in EXPECTED["megatron"].items()}


def _init(rng):
    return GPTJ(CONFIG).init(rng, jnp.zeros((1, 1), jnp.int32))["params"]


def _flat(tree):
    return {"/".join(k.key for k in path): v for path, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


@pytest.fixture(scope="module")
def single_device_run():
    params = nn.meta.unbox(_init(jax.random.PRNGKey(0)))
    tokens = np.random.RandomState(0).randint(0, CONFIG.vocab_size, size=(8, 12))
    return params, tokens, np.asarray(GPTJ(CONFIG).apply({"params": params}, tokens))


@pytest.mark.parametrize("mesh_shape", [(2, 4), (4, 2)])
@pytest.mark.parametrize("rule_set", sorted(RULE_SETS))
def test_forward_and_shardings(single_device_run, rule_set, mesh_shape):
    params, tokens, expected_logits = single_device_run
    partitioner = Partitioner(make_mesh(*mesh_shape), rule_set)
    _, _, shardings = partitioner.abstract_state(_init, jax.random.PRNGKey(0))
    sharded = jax.device_put(params, shardings)

    for name, spec in EXPECTED[rule_set].items():
        assert _flat(sharded)[name].sharding.spec == spec, (rule_set, name)
    # Every parameter is really split as its spec says: each device holds 1/n of it.
    for name, array in _flat(sharded).items():
        spec = array.sharding.spec
        ways = int(np.prod([partitioner.axis_size(axis) for axis in spec if axis is not None]))
        assert array.addressable_shards[0].data.size * ways == array.size, name

    forward = partitioner.jit(lambda p, t: GPTJ(CONFIG).apply({"params": p}, t),
                              in_shardings=(shardings, partitioner.batch_sharding()),
                              out_shardings=partitioner.sharding(("act_batch", "act_length", "act_vocab")))
    logits = forward(sharded, tokens)
    np.testing.assert_allclose(np.asarray(logits), expected_logits, atol=1e-5, rtol=0)


def test_zero1_shards_optimizer_state_but_not_params():
    import optax

    partitioner = Partitioner(make_mesh(2, 4), "zero1")

    def init_state(rng):
        params = _init(rng)
        return {"params": params, "opt_state": optax.adam(1e-3).init(params)}

    _, _, shardings = partitioner.abstract_state(init_state, jax.random.PRNGKey(0))
    assert shardings["params"]["blocks"]["attn"]["q_proj"].spec == P(None, None, "model", None)
    adam_mu = shardings["opt_state"][0].mu
    assert adam_mu["blocks"]["attn"]["q_proj"].spec == P(None, "data", "model", None)


def test_gptj_6b_parameter_count_and_megatron_bytes_per_device():
    config = GPTJConfig.from_dict(gptj_6b.get_config().model.to_dict())
    boxed = abstract_params(config)  # eval_shape: nothing allocated
    params = nn.meta.unbox(boxed)
    unique = count_params(params)
    assert unique == 6_050_882_784
    # The reference's published 6,053,381,344 counts its 8-way sharded layout: every
    # replicated vector (per-layer LayerNorm scale+bias and fc_out bias, the final
    # LayerNorm) once per shard, plus a per-shard bias on the one-hot embedding projection.
    d, layers, shards = config.d_model, config.num_layers, 8
    replicated = layers * 3 * d + 2 * d
    assert unique + (shards - 1) * replicated + shards * d == 6_053_381_344

    partitioner = Partitioner(make_mesh(1, 8), "megatron")
    shardings = partitioner.shardings_for(nn.get_partition_spec(boxed), params)
    total_bytes = unique * 4
    replicated_bytes = replicated * 4
    assert per_device_bytes(params, shardings) == (total_bytes - replicated_bytes) // 8 + replicated_bytes


def test_bad_partitioning_input_is_one_clear_line():
    def one_line(excinfo):
        assert "\n" not in str(excinfo.value)
        return str(excinfo.value)

    with pytest.raises(PartitioningError, match="unknown rule set 'tensor'") as e:
        Partitioner(make_mesh(1, 8), "tensor")
    assert "megatron" in one_line(e)

    with pytest.raises(PartitioningError, match="does not divide the 8 available devices") as e:
        make_mesh(3, -1)
    one_line(e)
    with pytest.raises(PartitioningError, match="2 x model=2 = 4 devices, but 8"):
        make_mesh(2, 2)
    assert resolve_mesh_shape(-1, 4, 8) == (2, 4)

    partitioner = Partitioner(make_mesh(2, 4), "megatron")
    boxed = abstract_params(CONFIG.replace(d_model=48, num_heads=6, rotary_dim=2))
    with pytest.raises(PartitioningError, match=r"blocks/attn/\w_proj: dimension 2 \(heads=6\) is not divisible "
                                                r"by mesh axis 'model' of size 4") as e:
        partitioner.shardings_for(nn.get_partition_spec(boxed), nn.meta.unbox(boxed))
    one_line(e)


def test_unresolved_logical_axis_names_the_parameter():
    class Stray(nn.Module):
        @nn.compact
        def __call__(self, x):
            w = self.param("mystery_kernel", nn.with_logical_partitioning(nn.initializers.ones, ("embed", "experts")),
                           (4, 2))
            return x @ w

    partitioner = Partitioner(make_mesh(2, 4), "megatron")
    with pytest.raises(PartitioningError, match="mystery_kernel: logical axis 'experts' is not resolved"):
        partitioner.abstract_state(lambda rng: Stray().init(rng, jnp.ones((1, 4)))["params"], jax.random.PRNGKey(0))


def test_compiler_options_reach_every_program_the_partitioner_compiles():
    """XLA options given to the Partitioner are the compiler's for its programs: an unknown one is refused by
    name, a real one compiles and runs."""
    one = jax.devices()[:1]
    refused = Partitioner(make_mesh(1, 1, devices=one), "megatron", compiler_options={"xla_not_an_option": True})
    with pytest.raises(jax.errors.JaxRuntimeError, match="No such compile option: 'xla_not_an_option'"):
        refused.jit(lambda x: x + 1)(jnp.ones(3))
    optimised = Partitioner(make_mesh(1, 1, devices=one), "megatron",
                            compiler_options={"xla_backend_optimization_level": 1})
    assert optimised.jit(lambda x: x + 1)(jnp.ones(3)).tolist() == [2.0, 2.0, 2.0]
    assert Partitioner(make_mesh(1, 1, devices=one)).compiler_options is None
