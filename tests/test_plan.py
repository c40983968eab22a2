"""--mode=plan: the train step compiled on abstract inputs; per-device bytes against the arithmetic."""

import dataclasses

import pytest

from gptj import plan as plan_lib
from gptj.configs import tiny

GIB = 2**30


def _tiny(rules, data, model):
    config = tiny.get_config()
    config.model.update(dict(d_model=64, num_layers=2, num_heads=4, rotary_dim=8, vocab_size=1000,
                             vocab_pad_multiple=8, max_len=32))
    config.data.seq_len = 32
    config.mesh.update(dict(rules=rules, data=data, model=model))
    return config


@pytest.fixture(scope="module")
def tiny_plans():
    return {rules: plan_lib.make_plan(_tiny(rules, 2, 4)) for rules in ("megatron", "zero1", "zero3")}


def test_rule_sets_split_what_they_promise(tiny_plans):
    megatron, zero1, zero3 = tiny_plans["megatron"], tiny_plans["zero1"], tiny_plans["zero3"]
    n = megatron.num_params
    assert zero1.num_params == zero3.num_params == n
    # megatron: weights and Adam moments over the 4-way model axis; zero1 also splits the
    # moments over data (2); zero3 splits both over data x model (8).
    for plan, params_ways, opt_ways in ((megatron, 4, 4), (zero1, 4, 8), (zero3, 8, 8)):
        assert plan.params_expected == n * 4 // params_ways
        assert plan.opt_state_expected == n * 8 // opt_ways
        # Only LayerNorm and [embed] bias vectors stay replicated: a few percent at this size.
        assert plan.params_expected <= plan.params <= 1.05 * plan.params_expected
        assert plan.opt_state_expected <= plan.opt_state <= 1.05 * plan.opt_state_expected
        assert plan.temporaries > 0 and plan.peak >= plan.params + plan.opt_state


def test_fit_verdict(tiny_plans):
    config = _tiny("zero3", 2, 4)
    roomy = plan_lib.make_plan(config, device_memory_gib=1.0)
    assert roomy.fits is True and roomy.device_memory == GIB
    cramped = dataclasses.replace(roomy, device_memory=roomy.peak // 2)
    assert cramped.fits is False
    text = plan_lib.format_plan(cramped, config)
    assert "does NOT fit" in text and "rule set zero3" in text and "data=2 x model=4" in text
    assert tiny_plans["zero3"].fits is None  # CPU devices report no memory limit
    with pytest.raises(ValueError, match="positive"):
        plan_lib.make_plan(config, device_memory_gib=0)


def test_mesh_larger_than_the_machine_says_how_to_fake_devices():
    from gptj.errors import PartitioningError

    with pytest.raises(PartitioningError, match="xla_force_host_platform_device_count"):
        plan_lib.make_plan(_tiny("megatron", 2, 8))


def test_serve_plan_counts_the_adapter_pool_and_the_prefix_store():
    """--plan=serve with 3 adapter slots of rank 8 and a prefix cache: the pool is every target's A and B at
    rank 8 for each slot, replicated (bf16); the store is whole blocks of keys and values, heads split over
    the model axis; the peak holds both beside the weights and the KV cache. (The bf16 row only: the
    quantized ones hold the same pool and store.)"""
    config = _tiny("megatron", 2, 2)
    config.model.dtype = "bfloat16"
    config.serve.update(dict(max_adapters=3, max_adapter_rank=8, prefix_block_size=8))
    block = 2 * 2 * 4 * 8 * 16 * 2  # keys and values, 2 layers, 4 heads, 8 positions, head_dim 16, bf16
    config.serve.prefix_cache_gib = 10.5 * block / GIB
    plan = plan_lib.make_serve_plan(config, batch=2, context=32, weight_bits=(0,))
    assert (plan.adapter_slots, plan.adapter_rank, plan.prefix_blocks, plan.prefix_block_size) == (3, 8, 10, 8)
    d, mlp, layers = 64, 256, 2
    per_rank = 4 * (d + d) + (d + mlp) + (mlp + d)  # q, k, v, out; fc_in; fc_out: inputs + outputs per rank
    [row] = plan.rows
    assert row.adapters == 3 * 8 * layers * per_rank * 2
    assert row.prefix_cache == 10 * block // 2  # heads over the 2-way model axis
    assert row.peak >= row.weights + row.kv_cache + row.adapters + row.prefix_cache
    text = plan_lib.format_serve_plan(plan)
    assert "adapters: 3 slots of rank 8 on every target" in text and "prefix cache: 10 blocks of 8 tokens" in text
