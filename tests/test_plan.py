"""--mode=plan: the train step compiled on abstract inputs; per-device bytes against the arithmetic."""

import dataclasses
import os
import subprocess
import sys

import pytest
from xla_env import xla_flags

from gptj import plan as plan_lib
from gptj.configs import tiny

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GIB = 2**30
GPTJ_6B_PARAMS = 6_050_882_784


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


def test_gptj_6b_plan_on_8_fake_cpu_devices_allocates_nothing(tmp_path):
    """The real command on GPT-J-6B in the reference's v3-8 fine-tuning layout (1 x 8 megatron, 16 x 1 sequences).

    Nothing is allocated: the planning process stays far below the 22.5 GiB of fp32 weights.
    """
    flags = ["--config=gptj/configs/gptj_6b.py", "--mode=plan", "--device_memory_gib=16",
             "--config.train.batch_size=16", "--config.train.microbatches=16", "--config.mesh.rules=megatron"]
    # The child reports its own peak (VmHWM of its post-exec address space): rusage
    # would also count this test process's memory, which the child had before exec.
    report_peak = ("import atexit, runpy, sys; atexit.register(lambda: print('VmHWM', [l.split()[1] for l in "
                   "open('/proc/self/status') if l.startswith('VmHWM')][0], file=sys.stderr)); "
                   "sys.argv = ['main.py'] + sys.argv[1:]; runpy.run_path('main.py', run_name='__main__')")
    env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu",
               XLA_FLAGS=xla_flags(8))
    proc = subprocess.run([sys.executable, "-c", report_peak, *flags], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    peak_kib = int(proc.stderr.rsplit("VmHWM", 1)[1].split()[0])
    assert peak_kib * 1024 < 3 * GIB, peak_kib

    assert f"plan: {GPTJ_6B_PARAMS:,} parameters; mesh data=1 x model=8" in out
    rows = {line[:36].strip(): line[36:].split() for line in out.splitlines() if line.startswith("  ") and "GiB" in line}
    # 4 bytes per weight and 8 per Adam moment pair, split 8 ways; LayerNorms and [embed]
    # biases stay replicated (+0.05%).
    compiled, arithmetic = float(rows["params"][0]), float(rows["params"][2])
    assert arithmetic == pytest.approx(GPTJ_6B_PARAMS * 4 / 8 / GIB, abs=1e-3)
    assert compiled == pytest.approx(arithmetic, rel=1e-3)
    compiled, arithmetic = float(rows["optimizer state (Adam mu, nu)"][0]), float(rows["optimizer state (Adam mu, nu)"][2])
    assert arithmetic == pytest.approx(GPTJ_6B_PARAMS * 8 / 8 / GIB, abs=1e-3)
    assert compiled == pytest.approx(arithmetic, rel=1e-3)
    assert float(rows["temporaries (grads, activations)"][0]) > 1.0
    assert "fit:" in out and "16.00 GiB per device" in out


def test_mesh_larger_than_the_machine_says_how_to_fake_devices():
    from gptj.errors import PartitioningError

    with pytest.raises(PartitioningError, match="xla_force_host_platform_device_count"):
        plan_lib.make_plan(_tiny("megatron", 2, 8))


@pytest.mark.slow
def test_gptj_6b_lora_fits_one_24_gib_gpu_and_full_fine_tuning_does_not_fit_80_gib():
    """On 8 fake CPU devices, single-device plans (the first device): nothing is allocated."""
    from gptj.configs import gptj_6b, gptj_6b_lora

    lora_config = gptj_6b_lora.get_config()
    lora = plan_lib.make_plan(lora_config, device_memory_gib=24)
    assert lora.mesh == {"data": 1, "model": 1} and lora.num_frozen == GPTJ_6B_PARAMS
    adapters = 28 * 16 * (2 * (4096 + 4096) + 2 * (4096 + 16384))  # rank 16 on q_proj, v_proj, fc_in, fc_out
    assert lora.num_params == adapters == 25_690_112
    assert lora.frozen == lora.frozen_expected == GPTJ_6B_PARAMS * 2  # bf16, no fp32 master copy
    assert lora.params == adapters * 4 and 0 <= lora.opt_state - adapters * 8 < 64  # + Adam's step counts
    assert 0 < lora.temporaries < 8 * GIB and lora.fits, plan_lib.format_plan(lora, lora_config)
    text = plan_lib.format_plan(lora, lora_config)
    assert "frozen params (bfloat16)" in text and "batch 8 x 2048 tokens in 8 microbatch(es) of 1" in text
    assert "fits in 24.00 GiB per device" in text

    full_config = gptj_6b.get_config()
    full_config.mesh.update(dict(data=1, model=1))
    full_config.train.update(dict(batch_size=1, microbatches=1))
    full = plan_lib.make_plan(full_config, device_memory_gib=80)
    assert full.num_frozen == 0 and full.params == GPTJ_6B_PARAMS * 4
    assert 0 <= full.opt_state - GPTJ_6B_PARAMS * 8 < 64
    assert full.fits is False
    text = plan_lib.format_plan(full, full_config)
    assert "does NOT fit in 80.00 GiB" in text and "ways out:" in text
    assert "LoRA: freeze the weights in bfloat16 (11.27 GiB per device here)" in text
    assert "zero3 over 2 devices" in text and "--config.mesh.rules=zero3 --config.mesh.data=2" in text


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
