"""The analytic pod model: its arithmetic against hand-computed values, and the published reference points."""

import dataclasses

import pytest

from gptj import hardware, scaling
from gptj.model.transformer import GPTJConfig, abstract_params, count_params

# vocab 100, 2 layers, d_model 8, 2 heads, d_ff 32.
TINY = GPTJConfig(vocab_size=100, num_layers=2, d_model=8, num_heads=2, rotary_dim=2, max_len=16, d_ff=32,
                  remat_policy="full")

# Round numbers so every term below can be checked by hand.
TOY_HW = hardware.Accelerator("toy", peak_flops=1e12, hbm_bandwidth=1e11, hbm_bytes=10**12, fast_bandwidth=1e9,
                              fast_domain=4, slow_bandwidth=1e8, compute_efficiency=0.5, collective_latency=0.0)


def test_flops_by_hand():
    # matmul params: 2 layers x (4*8*8 + 2*8*32) + head 8*100 = 2*768 + 800
    assert scaling.matmul_params(TINY) == 2336
    # forward: 2*2336 + attention 4 * layers 2 * seq 4 * d 8 = 4672 + 256
    assert scaling.forward_flops_per_token(TINY, 4) == 4928
    model, hardware = scaling.train_flops_per_token(TINY, 4)
    assert (model, hardware) == (3 * 4928, 4 * 4928)  # full remat recomputes one forward
    assert scaling.train_flops_per_token(TINY, 4, "none")[1] == 3 * 4928
    assert scaling.train_flops_per_token(TINY, 4, "dots_no_batch")[1] == 3 * 4928 + 256  # attention dots only


def test_param_count_matches_the_model():
    assert scaling.total_params(TINY) == count_params(abstract_params(TINY))
    # The reference's 6,053,381,344 counts replicated vectors once per shard; unique parameters:
    assert scaling.total_params(scaling.MODEL_SHAPES["gptj_6b"]) == 6_050_882_784


def test_collective_formulas():
    assert scaling.all_reduce_seconds(1e9, 4, 1e9, 0.0) == pytest.approx(1.5)  # 2 * 3/4 of a GB at 1 GB/s
    assert scaling.gather_seconds(1e9, 4, 1e9, 0.0) == pytest.approx(0.75)
    assert scaling.all_reduce_seconds(1e9, 1, 1e9, 1.0) == 0.0  # no collective on one device


def test_megatron_step_by_hand():
    w = scaling.Workload(TINY, seq_len=4, global_batch=8, data=2, model_parallel=2, microbatches=2,
                         tp_allreduces_per_layer=3)
    est = scaling.estimate(w, TOY_HW)
    # 8 sequences / (2 replicas * 2 microbatches) = 2 sequences = 8 tokens per microbatch per replica.
    compute = 2 * 8 * (4 * 4928) / 2 / (1e12 * 0.5)
    assert est.compute_s == pytest.approx(compute)
    # activations 8 tokens * d 8 * 2 bytes = 128 B; (2 layers * 3 + 2) all-reduces over m=2: 2 * 1/2 * 128 B each.
    assert est.tensor_parallel_s == pytest.approx(2 * 8 * 128 / 1e9)
    params = scaling.total_params(TINY)
    # one gradient all-reduce over data=2 of the model-parallel shard in bf16.
    assert est.data_parallel_s == pytest.approx(params / 2 * 2 / 1e9)
    adam = params / 2 * 28 / 1e11
    accumulate = 2 * 2 * params / 2 * 2 / 1e11
    assert est.memory_bound_s == pytest.approx(adam + accumulate)
    assert est.step_s == pytest.approx(compute + 2 * 8 * 128 / 1e9 + params / 1e9 + adam + accumulate)
    assert est.tokens_per_s == pytest.approx(32 / est.step_s)


def test_zero3_step_by_hand_and_overlap():
    w = scaling.Workload(TINY, seq_len=4, global_batch=8, data=2, model_parallel=1, rules="zero3", microbatches=2)
    est = scaling.estimate(w, TOY_HW)
    params = scaling.total_params(TINY)
    per_micro = 3 * 0.5 * params * 2 / 1e9  # two gathers + one reduce-scatter, each moving half the bf16 weights
    assert est.param_gather_s == pytest.approx(2 * per_micro)
    assert est.tensor_parallel_s == 0.0 and est.data_parallel_s == 0.0
    overlapped = scaling.estimate(dataclasses.replace(w, overlap=True), TOY_HW)
    assert overlapped.hidden_s == pytest.approx(2 * min(per_micro, est.compute_s / 2))
    assert overlapped.step_s < est.step_s
    # zero3 keeps 1/(data*model) of params and optimizer state per device.
    assert est.state_bytes_per_device == pytest.approx(params / 2 * 12 + params / 2 * 2)


def test_slow_links_beyond_the_fast_domain():
    inside = scaling.estimate(scaling.Workload(TINY, 4, 8, data=2, model_parallel=2), TOY_HW)
    across = scaling.estimate(scaling.Workload(TINY, 4, 16, data=4, model_parallel=2), TOY_HW)
    params = scaling.total_params(TINY)
    assert across.data_parallel_s == pytest.approx(2 * 3 / 4 * params / 2 * 2 / 1e8)  # 8 devices > fast_domain 4
    assert inside.data_parallel_s == pytest.approx(params / 2 * 2 / 1e9)


def test_pipeline_step_by_hand():
    # 2 stages of 1 layer x 1 data x 2 model, 4 microbatches of 2 sequences: 5 iterations.
    w = scaling.Workload(TINY, seq_len=4, global_batch=8, data=1, model_parallel=2, microbatches=4, stages=2,
                         tp_allreduces_per_layer=3)
    assert w.devices == 4 and w.iterations == 5
    est = scaling.estimate(w, TOY_HW)
    head = 6 * 8 * 100  # the head's FLOPs per token (forward and backward), run once over this device's 16 tokens
    stage_micro = 8 * (4 * 4928 - head) / 2 / 2 / (1e12 * 0.5)  # one layer of the two, on 8 tokens, model 2
    assert est.compute_s == pytest.approx(4 * stage_micro + 16 * head / 2 / (1e12 * 0.5))
    assert est.bubble_s == pytest.approx(stage_micro)  # (S - 1) iterations of a stage's compute
    # the bubble is (S - 1) / (M + S - 1) of the time the stage's layers take
    assert est.bubble_s / (est.bubble_s + 4 * stage_micro) == pytest.approx(1 / 5)
    # 3 all-reduces of 8 tokens x d 8 x 2 B per layer and iteration; embedding and head once over 16 tokens.
    assert est.tensor_parallel_s == pytest.approx(5 * 3 * 128 / 1e9 + 2 * 256 / 1e9)
    # 2 transfers (to the next stage, the stream's slot back) each way per iteration, 128 B each.
    assert est.stage_transfer_s == pytest.approx(4 * 5 * 128 / 1e9)
    # Each device holds its stage's layer and the (unsplit) embedding and head, over model 2: fp32 weights and Adam
    # moments, the backward loop's fp32 gradient sum and each iteration's bf16 gradient, the bf16 weights it reads.
    block = scaling.total_params(TINY) - scaling.embedding_and_head_params(TINY)
    per_device = (block / 2 + scaling.embedding_and_head_params(TINY)) / 2
    assert est.state_bytes_per_device == pytest.approx(per_device * (4 + 8 + 4 + 2 + 2))
    assert est.step_s == pytest.approx(est.compute_s + est.bubble_s + est.tensor_parallel_s + est.stage_transfer_s
                                       + est.memory_bound_s)


def test_sequence_parallel_same_bytes_less_activation_memory():
    base = scaling.Workload(TINY, seq_len=4, global_batch=8, data=2, model_parallel=2, microbatches=2)
    megatron, sp = (scaling.estimate(dataclasses.replace(base, rules=r), TOY_HW) for r in ("megatron", "megatron_sp"))
    assert sp.tensor_parallel_s == pytest.approx(megatron.tensor_parallel_s)  # latency 0: the same bytes
    assert sp.activation_bytes_per_device < megatron.activation_bytes_per_device
    # full remat saves the block's input, d per token: split over model 2 by sequence.
    saved = 2 * 8 * 8 * 2  # layers x tokens x d x bytes
    assert megatron.activation_bytes_per_device - sp.activation_bytes_per_device == pytest.approx(saved / 2)
    assert sp.state_bytes_per_device == megatron.state_bytes_per_device


def test_20b_40b_picks():
    results = {(name, system.name): (rows, pick) for name, system, rows, pick in scaling.compare_20b_40b()}
    for (name, system), (rows, pick) in results.items():
        by_label = dict(rows)
        assert pick is not None, (name, system)
        # Without a pipeline, megatron's state alone outgrows a device: 20B and 40B over 8-way tensor parallelism.
        plain = next(est for label, est in rows if label.startswith("megatron ") and "pipeline" not in label)
        assert not plain.fits, (name, system)
        if "slices" in system:  # across slices a pipeline (over the slices) and sequence sharding win
            assert pick[0].startswith("megatron_sp + pipeline"), (name, system, pick[0])
        assert pick[1].fits and by_label[pick[0]] is pick[1]
    # On one v3-256, as the TPU compiler found (README): each config's layout fits, its pipeline with the stages split
    # 8 ways instead of 16 does not, nor does it without sequence sharding.
    from gptj.configs import load_config

    for name in ("gptj_20b", "gptj_40b"):
        def planned(**mesh):
            config = load_config(name)
            config.mesh.update(mesh)
            memory = scaling.estimate_from_config(config, 256, "tpu_v3").memory_bytes_per_device
            return memory / (scaling.FIT_MARGIN * 16 * 2**30)

        assert planned() < 1 < min(planned(model=8), planned(rules="megatron")), name


def test_reference_points_within_25_percent():
    for point, est in scaling.check_reference_points():
        assert est.tokens_per_s == pytest.approx(point.tokens_per_s, rel=0.25), point.name


def test_efficiency_comes_from_the_calibration_point():
    cal = scaling.CALIBRATION_POINT
    solved = scaling.calibrate_efficiency(cal.workload, cal.hardware, cal.tokens_per_s)
    assert solved == pytest.approx(hardware.ACCELERATORS["tpu_v3"].compute_efficiency, abs=0.01)
    hw = dataclasses.replace(hardware.ACCELERATORS["tpu_v3"], compute_efficiency=solved)
    assert scaling.estimate(cal.workload, hw).tokens_per_s == pytest.approx(cal.tokens_per_s, rel=1e-9)


def test_megatron_vs_zero3_prediction():
    rows = dict(scaling.compare_6b_v3_256())
    megatron = rows["megatron 32x8, 16 micro x 1 seq"]
    zero3 = rows["zero3 32x8, 16 micro x 1 seq"]
    zero3_overlap = rows["zero3 32x8, 16 micro x 1 seq +overlap"]
    assert zero3.tokens_per_s < megatron.tokens_per_s < zero3_overlap.tokens_per_s
    assert zero3.state_bytes_per_device < megatron.state_bytes_per_device / 20
    fsdp = rows["zero3 256x1, 1 micro x 2 seq +overlap"]
    assert fsdp.tensor_parallel_s == 0.0 and fsdp.tokens_per_s == max(r.tokens_per_s for r in rows.values())


def test_decode_limit_by_hand():
    # batch 1, cache 4: weights 2336 * 2 B + kv 2 * 2 layers * 4 slots * 8 * 2 B = 4672 + 256 bytes per step.
    assert scaling.decode_bytes_per_step(TINY, 1, 4) == 4928
    assert scaling.decode_limit(TINY, 1, 4, TOY_HW) == pytest.approx(1 / (4928 / 1e11))


def test_estimate_from_run_config_matches_the_reference_workload():
    from gptj.configs import gptj_6b

    est = scaling.estimate_from_config(gptj_6b.get_config(), num_devices=256)
    ref = dataclasses.replace(scaling.REFERENCE_POINTS["v3-256"].workload,
                              tp_allreduces_per_layer=scaling.GPTJ_TP_ALLREDUCES)
    assert est.step_s == pytest.approx(scaling.estimate(ref, "tpu_v3").step_s)


def test_cli(capsys):
    assert scaling.main(["check"]) == 0
    out = capsys.readouterr().out
    assert "v3-256" in out and "worst error" in out
    assert scaling.main(["compare"]) == 0
    assert "Why:" in capsys.readouterr().out
    assert scaling.main(["estimate", "--model", "nope"]) == 2
    assert capsys.readouterr().err.strip() == (
        "error: unknown model 'nope'; choose one of ['gptj_1.3b', 'gptj_6b']")


def test_bad_workload_is_one_clear_error():
    with pytest.raises(ValueError, match="global_batch 10 is not divisible by 4 data-parallel replicas x 1"):
        scaling.Workload(TINY, seq_len=4, global_batch=10, data=4)
    with pytest.raises(ValueError, match="rules 'fsdp'"):
        scaling.Workload(TINY, seq_len=4, global_batch=8, data=1, rules="fsdp")
    with pytest.raises(ValueError, match="microbatches=1 is fewer than stages=2"):
        scaling.Workload(TINY, seq_len=4, global_batch=8, data=1, stages=2)
    with pytest.raises(ValueError, match="layers=2 is not divisible by stages=4"):
        scaling.Workload(TINY, seq_len=4, global_batch=8, data=1, stages=4, microbatches=4)
    with pytest.raises(ValueError, match="rules 'dp' splits no layers"):
        scaling.Workload(TINY, seq_len=4, global_batch=8, data=1, stages=2, microbatches=2, rules="dp")


def _collective_operands(rules: str, mesh: tuple[int, int], layers: int, batch: int, seq: int, op: str):
    """Shapes of the operands of every `op` collective in the compiled gradient of a tiny unrolled model."""
    import re

    import jax
    import jax.numpy as jnp

    from gptj.core.partitioning import Partitioner, make_mesh
    from gptj.model.transformer import GPTJ

    cfg = GPTJConfig(vocab_size=256, num_layers=layers, d_model=64, num_heads=4, rotary_dim=8, max_len=32,
                     scan_layers=False, remat_policy="full")
    partitioner = Partitioner(make_mesh(*mesh), rules)
    model = GPTJ(cfg)
    abstract, _, shardings = partitioner.abstract_state(
        lambda rng: model.init(rng, jnp.zeros((batch, seq), jnp.int32)), jax.random.PRNGKey(0))

    def loss(params, tokens):
        logp = jax.nn.log_softmax(model.apply({"params": params}, tokens))
        return -jnp.take_along_axis(logp, tokens[..., None], axis=-1).mean()

    grad = partitioner.jit(jax.grad(loss), in_shardings=(shardings["params"], partitioner.batch_sharding(2)),
                           out_shardings=shardings["params"])
    hlo = grad.lower(abstract["params"], jax.ShapeDtypeStruct((batch, seq), jnp.int32)).compile().as_text()
    shapes = []
    for line in hlo.splitlines():
        parts = re.split(rf" {op}(?:-start)?\(", line)
        if len(parts) > 1:  # "%name = (f32[..], f32[..]) op(" : one entry per (tuple) operand
            shapes += re.findall(r"\w+(\[[\d,]*\])", parts[0].split("=", 1)[1])
    return shapes


def test_tensor_parallel_all_reduce_count_matches_the_compiled_model():
    # megatron on 2 x 4: each data shard holds [2, 8, 64] activations.
    two, three = (_collective_operands("megatron", (2, 4), n, 4, 8, "all-reduce").count("[2,8,64]") for n in (2, 3))
    assert three - two == scaling.GPTJ_TP_ALLREDUCES, "update scaling.GPTJ_TP_ALLREDUCES to the compiled count"
    assert two - 2 * (three - two) == 2  # embedding forward, head backward


def test_zero3_gathers_each_weight_for_forward_and_backward():
    # zero3 on 4 x 2: weights gathered over data to their model shard: q/k/v [64, 2, 16], fc_in [64, 128].
    two, three = (_collective_operands("zero3", (4, 2), n, 8, 8, "all-gather") for n in (2, 3))
    assert three.count("[64,2,16]") - two.count("[64,2,16]") >= 2 * 3  # q, k, v: forward and backward
    assert three.count("[64,128]") - two.count("[64,128]") >= 2
