"""--mode=plan --target=: plans compiled by the TPU compiler (libtpu) and the GPU compiler (XLA's CUDA plugin).

Both compilers run on this CPU machine with compile-only devices (scripts/install.sh installs them in
.venv/target-compilers). The tiny plans are compiled once per module; GPT-J-6B's are the slow tests.
"""

import os
import re
import subprocess
import sys

import pytest
from xla_env import xla_flags

from gptj import plan as plan_lib
from gptj import targets
from gptj.configs import tiny

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GIB = 2**30
GPTJ_6B_PARAMS = 6_050_882_784
TARGETS = ("tpu:v3-8", "gpu:h100x8")
# The rule sets over data x model (megatron_sp, which lays out the parameters as megatron does, is compiled for a
# target with a pipeline in tests/test_pipeline.py).
RULES = ("dp", "megatron", "zero1", "zero3")

if not (targets.compiler_installed("tpu") and targets.compiler_installed("cuda")):
    message = f"the TPU and GPU compilers are not installed (scripts/install.sh puts them in {targets.COMPILERS_DIR})"
    if os.environ.get("CI"):
        raise RuntimeError(message)
    pytest.skip(message, allow_module_level=True)


def _tiny(rules, data=2, model=4, microbatches=2):
    """The tiny model with its layers scanned and two microbatches of 8 rows (one a device under dp): the plan
    walks nested loops."""
    config = tiny.get_config()
    config.model.update(dict(d_model=64, num_layers=2, num_heads=4, rotary_dim=8, vocab_size=1000,
                             vocab_pad_multiple=8, max_len=32, scan_layers=True))
    config.data.seq_len = 32
    config.train.update(dict(batch_size=16, microbatches=microbatches))
    config.mesh.update(dict(rules=rules, data=data, model=model))
    return config


@pytest.fixture(scope="module")
def plans():
    """{(target or 'cpu', rule set): Plan} of the tiny config, each compiled once."""
    found = {}
    for rules in RULES:
        found["cpu", rules] = plan_lib.make_plan(_tiny(rules))
        for target in TARGETS:
            found[target, rules] = plan_lib.make_plan(_tiny(rules), target=target)
    return found


@pytest.mark.parametrize("target", TARGETS)
def test_tiny_plans_under_each_rule_set_are_the_target_compilers(plans, target):
    compiler = {"tpu:v3-8": "the TPU compiler for 8 TPU v3 devices (tpu:v3-8)",
                "gpu:h100x8": "the GPU compiler (XLA:GPU, CUDA) for 8 NVIDIA H100 SXM devices (gpu:h100x8)"}[target]
    memory = {"tpu:v3-8": 16 * GIB, "gpu:h100x8": 84942979072}[target]  # HBM per device by default
    for rules in RULES:
        plan, cpu = plans[target, rules], plans["cpu", rules]
        assert plan.compiled_for == compiler and plan.device_memory == memory and plan.fits
        assert plan.mesh == {"data": 2, "model": 4} and plan.rule_set == rules
        # The state rows are the sharding arithmetic, as on the CPU: the same bytes on any device.
        assert (plan.params, plan.opt_state) == (cpu.params, cpu.opt_state)
        assert plan.params_expected <= plan.params <= 1.1 * plan.params_expected
        assert plan.opt_state_expected <= plan.opt_state <= 1.1 * plan.opt_state_expected
        # The temporaries are the target compiler's own buffer assignment.
        assert plan.temporaries > 0 and plan.temporaries != cpu.temporaries
        assert plan.peak >= plan.params + plan.opt_state
        text = plan_lib.format_plan(plan, _tiny(rules))
        assert f"compiled by {compiler}" in text and "FLOPs per step per device" in text


def test_split_factors_of_each_rule_set(plans):
    """megatron splits weights and moments over model (4); zero1 moments over all 8; zero3 both; dp neither."""
    n = plans["tpu:v3-8", "megatron"].num_params
    for rules, params_ways, opt_ways in (("megatron", 4, 4), ("zero1", 4, 8), ("zero3", 8, 8), ("dp", 1, 1)):
        plan = plans["tpu:v3-8", rules]
        assert (plan.params_expected, plan.opt_state_expected) == (n * 4 // params_ways, n * 8 // opt_ways)


@pytest.mark.parametrize("target", TARGETS)
def test_compiled_flops_count_every_loop_run(plans, target):
    """Two layers scanned in each of two microbatches: XLA's cost analysis counts a loop body once, so a
    count that missed the trip counts would be a quarter of the model's."""
    for rules in RULES:
        work = plans[target, rules].work
        counted = work.model_flops + work.recompute_flops
        assert 0.9 * counted < work.compiled_flops < 1.6 * counted, (rules, work.compiled_flops, counted)
        assert work.cost.uncounted_loops == 0
        bound = work.bound
        assert bound.seconds == max(bound.compute_s, bound.memory_s, bound.link_s) > 0
        peak_flops = targets.parse_target(target).accelerator.peak_flops
        assert bound.compute_s == pytest.approx(work.compiled_flops / peak_flops)
        assert work.tokens == 16 * 32 and work.tokens_per_s == pytest.approx(work.tokens / bound.seconds)
    # dp replicates everything: no collective but the gradient all-reduce; megatron adds activation ones.
    assert plans[target, "megatron"].work.cost.collectives.get("all-reduce", 0) > 0
    assert plans[target, "dp"].work.cost.link_bytes > 0


def test_auto_kernels_are_the_targets_not_the_planning_cpus():
    """A plan's program is the one the target's devices would run: `auto` attention and the fused loss's
    vocabulary chunks resolve for the mesh's platform (the CPU's blockwise kernel, its blocks unrolled, made
    GPT-J-6B's 2048-token GPU plan compile 5x slower, for a kernel the GPU never runs)."""
    from gptj import recipe
    from gptj.settings import RunSettings

    settings = RunSettings.from_config(_tiny("dp"))  # the vocabulary not split: the CPU chunks it
    assert settings.model.attention_impl == "auto" and settings.train.loss_chunk_vocab == -1
    found = {}
    for target in (None, *TARGETS):
        partitioner = plan_lib._partitioner_for(settings.mesh, targets.parse_target(target) if target else None)
        trainer = recipe.build_trainer_for_plan(settings, partitioner)
        found[target] = (partitioner.platform, trainer.model.config.attention_impl,
                         recipe.loss_vocab_chunk(settings.train.loss_chunk_vocab, partitioner))
    assert found == {None: ("cpu", "blockwise", -1), "tpu:v3-8": ("tpu", "einsum", 0),
                     "gpu:h100x8": ("gpu", "einsum", 0)}


def test_serve_plan_on_one_gpu():
    config = _tiny("megatron", data=1, model=1)
    plan = plan_lib.make_serve_plan(config, batch=2, context=32, target="gpu:h100")
    assert plan.compiled_for.endswith("for 1 NVIDIA H100 SXM device (gpu:h100)")
    assert [row.weights_format.split()[0] for row in plan.rows] == ["float32", "int8", "int4"]
    for row in plan.rows:
        assert row.temporaries > 0 and plan.fits(row) and row.decode_bound.seconds > 0
    text = plan_lib.format_serve_plan(plan)
    assert "tokens/s decoded" in text and "compiled by the GPU compiler" in text


@pytest.mark.parametrize("spec, message", [
    ("tpu:v9-8", "unknown --target='tpu:v9-8': a TPU target is tpu:GENERATION-COUNT"),
    ("a100", "unknown --target='a100': name a TPU slice or GPUs"),
    ("gpu:a100x8", "a GPU target is gpu:MODEL or gpu:MODELxCOUNT"),
    ("tpu:v3-12", "TPU v3 is not sold as v3-12; slices are v3-8, v3-32"),
    ("tpu:v5e-2", "TPU v5e is not sold as v5e-2"),
    ("gpu:h100x12", "NVIDIA H100 SXM GPUs come 1, 2, 4, 8 to a host, or in whole hosts of 8"),
])
def test_bad_targets_are_one_line_and_compile_nothing(monkeypatch, spec, message):
    monkeypatch.setattr(plan_lib.recipe, "build_trainer_for_plan", _must_not_compile)
    with pytest.raises(targets.TargetError) as raised:
        plan_lib.make_plan(_tiny("megatron"), target=spec)
    assert message in str(raised.value) and "\n" not in str(raised.value)


def test_mesh_that_does_not_divide_the_target_and_missing_compiler(monkeypatch, tmp_path):
    monkeypatch.setattr(plan_lib.recipe, "build_trainer_for_plan", _must_not_compile)
    with pytest.raises(targets.TargetError, match=r"mesh data=3 x model=1 does not divide the 8 devices of tpu:v3-8"):
        plan_lib.make_plan(_tiny("megatron", data=3, model=1), target="tpu:v3-8")
    with pytest.raises(targets.TargetError, match="does not divide the 8 devices"):
        plan_lib.make_serve_plan(_tiny("megatron", data=-1, model=3), batch=1, context=8, target="gpu:h100x8")
    # Neither compiler installed: the error names the extra.
    monkeypatch.setattr(targets, "COMPILERS_DIR", tmp_path)
    monkeypatch.setattr(targets, "_spec_found", lambda module: False)
    for spec, extra in (("tpu:v5e-8", "'.[tpu]'"), ("gpu:h200x8", "'.[cuda12]'")):
        with pytest.raises(targets.TargetError, match=rf"--target={spec} needs .* pip install -e {re.escape(extra)}") \
                as raised:
            plan_lib.make_plan(_tiny("megatron"), target=spec)
        assert "\n" not in str(raised.value)


def _must_not_compile(*args, **kwargs):
    raise AssertionError("a bad --target reached the compiler")


def test_the_cli_prints_a_bad_target_as_one_line():
    proc = subprocess.run([sys.executable, "main.py", "--config=gptj/configs/tiny.py", "--mode=plan",
                           "--target=tpu:v3-12"], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, PYTHONPATH=ROOT, XLA_FLAGS=xla_flags(8)))
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1] == (
        "error: --target='tpu:v3-12': TPU v3 is not sold as v3-12; slices are v3-8, v3-32, v3-64, v3-128, "
        "v3-256, v3-512, v3-1024, v3-2048")


def test_other_runs_do_not_load_the_compilers():
    """Installed as scripts/install.sh installs them, the compilers stay out of every process but a --target plan:
    jax starts on the CPU as before, with no libtpu or CUDA plugin mapped and nothing on stderr."""
    code = ("import jax, gptj.plan; print(jax.default_backend(), [lib for lib in ('libtpu.so', 'xla_cuda_plugin.so') "
            "if lib in open('/proc/self/maps').read()])")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={k: v for k, v in os.environ.items() if k not in ("JAX_PLATFORMS", "XLA_FLAGS")})
    assert proc.returncode == 0 and proc.stdout.split() == ["cpu", "[]"], proc.stdout + proc.stderr
    assert proc.stderr == ""


def test_target_names_map_to_their_topologies():
    cases = {"tpu:v3-8": (8, "v3:2x2"), "tpu:v3-256": (256, "v3:8x16"), "tpu:v4-8": (4, "v4:2x2x1"),
             "tpu:v5e-8": (8, "v5e:2x4"), "tpu:v5p-8": (4, "v5p:2x2x1"), "tpu:v6e-8": (8, "v6e:2x4"),
             "gpu:h100": (1, "1x1x1"), "gpu:h100x8": (8, "1x1x8"), "gpu:h200x64": (64, "1x8x8")}
    for spec, (devices, topology) in cases.items():
        target = targets.parse_target(spec)
        assert (target.devices, target.topology) == (devices, topology), spec
    assert targets.parse_target("gpu:h100x64").describe() == "64 NVIDIA H100 SXM devices, 8 hosts of 8 (gpu:h100x64)"


# -- GPT-J-6B (acceptance 2): each a compile of the full model by the target's compiler --------------------------


@pytest.mark.slow
def test_gptj_6b_fine_tuning_as_the_seed_ran_it_fits_a_v3_8_and_the_cli_allocates_nothing():
    """The real command on GPT-J-6B in the reference's v3-8 fine-tuning layout: 1 x 8 megatron, batch 16 in 16
    microbatches of one 2048-token sequence, full remat, bf16 compute, compiled by the TPU compiler.

    Nothing is allocated: the planning process stays far below the 22.5 GiB of fp32 weights.
    """
    flags = ["--config=gptj/configs/gptj_6b.py", "--mode=plan", "--target=tpu:v3-8", "--config.mesh.rules=megatron",
             "--config.mesh.data=1", "--config.mesh.model=8", "--config.train.batch_size=16",
             "--config.train.microbatches=16"]
    # The child reports its own peak (VmHWM of its post-exec address space): rusage
    # would also count this test process's memory, which the child had before exec.
    report_peak = ("import atexit, runpy, sys; atexit.register(lambda: print('VmHWM', [l.split()[1] for l in "
                   "open('/proc/self/status') if l.startswith('VmHWM')][0], file=sys.stderr)); "
                   "sys.argv = ['main.py'] + sys.argv[1:]; runpy.run_path('main.py', run_name='__main__')")
    env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu", XLA_FLAGS=xla_flags(8))
    proc = subprocess.run([sys.executable, "-c", report_peak, *flags], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    peak_kib = int(proc.stderr.rsplit("VmHWM", 1)[1].split()[0])
    assert peak_kib * 1024 < 3 * GIB, peak_kib

    assert f"plan: {GPTJ_6B_PARAMS:,} parameters; mesh data=1 x model=8 (compiled by the TPU compiler" in out, out
    rows = {line[:36].strip(): line[36:].split()
            for line in out.splitlines() if line.startswith("  ") and "GiB" in line}
    # 4 bytes per weight and 8 per Adam moment pair, split 8 ways; LayerNorms and [embed]
    # biases stay replicated (+0.05%).
    for row, bytes_per_param in (("params", 4), ("optimizer state (Adam mu, nu)", 8)):
        compiled, arithmetic = float(rows[row][0]), float(rows[row][2])
        assert arithmetic == pytest.approx(GPTJ_6B_PARAMS * bytes_per_param / 8 / GIB, abs=1e-3)
        assert compiled == pytest.approx(arithmetic, rel=1e-3)
    assert float(rows["temporaries (grads, activations)"][0]) > 1.0
    assert "fit: fits in 16.00 GiB per device" in out, out
    compiled_over_counted = float(re.search(r"compiled / counted ([0-9.]+)\)", out).group(1))
    assert 0.8 < compiled_over_counted < 1.3, out


@pytest.mark.slow
def test_gptj_6b_lora_fits_24_gib_and_full_fine_tuning_does_not_fit_one_h100():
    from gptj.configs import gptj_6b, gptj_6b_lora

    lora_config = gptj_6b_lora.get_config()
    lora = plan_lib.make_plan(lora_config, device_memory_gib=24, target="gpu:h100")
    text = plan_lib.format_plan(lora, lora_config)
    assert lora.mesh == {"data": 1, "model": 1} and lora.num_frozen == GPTJ_6B_PARAMS
    adapters = 28 * 16 * (2 * (4096 + 4096) + 2 * (4096 + 16384))  # rank 16 on q_proj, v_proj, fc_in, fc_out
    assert lora.num_params == adapters == 25_690_112
    assert lora.frozen == lora.frozen_expected == GPTJ_6B_PARAMS * 2  # bf16, no fp32 master copy
    assert lora.params == adapters * 4 and 0 <= lora.opt_state - adapters * 8 < 64  # + Adam's step counts
    assert 0 < lora.temporaries < 8 * GIB and lora.fits, text
    assert "frozen params (bfloat16)" in text and "batch 8 x 2048 tokens in 8 microbatch(es) of 1" in text
    assert "fits in 24.00 GiB per device" in text

    full_config = gptj_6b.get_config()
    full_config.mesh.update(dict(data=1, model=1))
    full_config.train.update(dict(batch_size=1, microbatches=1))
    full = plan_lib.make_plan(full_config, target="gpu:h100")
    text = plan_lib.format_plan(full, full_config)
    assert full.num_frozen == 0 and full.params == GPTJ_6B_PARAMS * 4
    assert 0 <= full.opt_state - GPTJ_6B_PARAMS * 8 < 64
    assert full.fits is False and "does NOT fit in 79.11 GiB" in text and "ways out:" in text, text
    assert "LoRA: freeze the weights in bfloat16 (11.27 GiB per device here)" in text
    # zero3 over the fewest devices (a power of two) that hold the whole peak split with 10% to spare.
    devices = int(re.search(r"zero3 over (\d+) devices", text).group(1))
    assert full.peak / devices <= 0.9 * full.device_memory < full.peak / (devices // 2), text
    assert f"--config.mesh.rules=zero3 --config.mesh.data={devices}" in text


@pytest.mark.slow
def test_gptj_6b_int8_serving_fits_one_24_gib_gpu():
    from gptj.configs import gptj_6b

    config = gptj_6b.get_config()
    config.mesh.update(dict(data=1, model=1))
    plan = plan_lib.make_serve_plan(config, batch=1, context=2048, device_memory_gib=24, target="gpu:h100",
                                    weight_bits=(8,))
    (int8,) = plan.rows
    assert int8.weights_format.startswith("int8")
    assert plan.fits(int8), plan_lib.format_serve_plan(plan)
    assert int8.weights < 6.5 * GIB
