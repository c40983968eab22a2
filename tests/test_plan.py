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
