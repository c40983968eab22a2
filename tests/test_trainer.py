"""Trainer: gradient accumulation, mesh independence, memory report, non-finite handling."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P
from trainer_utils import SyntheticIterator, cached_trainer, synthetic_batch, tiny_config, to_numpy

from gptj.core import losses
from gptj.core.checkpoint import Checkpointer
from gptj.core.hooks import CheckpointHook
from gptj.core.partitioning import Partitioner, make_mesh
from gptj.core.trainer import Trainer
from gptj.errors import NonFiniteLossError, TrainableError
from gptj.data.pipeline import train_batch_spec
from gptj.model.transformer import GPTJ, GPTJConfig


def _one_step(microbatches, lr=0.5):
    """(params before, params after one SGD update, the gradient, metrics) for batch 0 on a 2x4 mesh.

    The optimizer is SGD that also keeps the gradient as its state, so the
    gradient itself can be compared, not only its effect on the params.
    """
    def update(grads, state, params=None):
        return jax.tree_util.tree_map(lambda g: -lr * g, grads), grads

    sgd_recording = optax.GradientTransformation(lambda p: jax.tree_util.tree_map(jnp.zeros_like, p), update)
    config = tiny_config()
    model = GPTJ(GPTJConfig.from_dict(config.model.to_dict()))
    partitioner = Partitioner(make_mesh(2, 4, devices=jax.devices()[:8]), "megatron")
    trainer = Trainer(model, losses.next_token_loss, sgd_recording, partitioner, train_batch_spec(config),
                      microbatches=microbatches, summarize=losses.summarize)
    state = trainer.init_state(0)
    before = to_numpy(state["params"])
    state, metrics = trainer.train_step(state, synthetic_batch(0))
    return before, to_numpy(state["params"]), to_numpy(state["opt_state"]), jax.device_get(metrics)


def test_gradient_accumulation_equals_one_big_batch():
    # One batch of 8 rows versus 4 microbatches of 2 (on a 2x4 mesh, so each microbatch is split over data).
    before, params_one, grads_one, m_one = _one_step(1)
    _, params_four, grads_four, m_four = _one_step(4)
    assert m_one["loss"] == pytest.approx(m_four["loss"], rel=1e-6)
    assert m_one["grad_norm"] == pytest.approx(m_four["grad_norm"], rel=1e-6)
    for (path, g1), g4 in zip(jax.tree_util.tree_leaves_with_path(grads_one), jax.tree_util.tree_leaves(grads_four)):
        assert np.abs(g1).max() > 0, path
        assert np.linalg.norm(g1 - g4) <= 1e-6 * np.linalg.norm(g1), path
    for b, x, y in zip(*(jax.tree_util.tree_leaves(t) for t in (before, params_one, params_four))):
        assert not np.array_equal(b, x)  # the update moved every parameter tensor
        assert np.linalg.norm(y - x) <= 1e-6 * np.linalg.norm(x)


def _five_losses(trainer):
    state = trainer.init_state(0)
    init = to_numpy(state["params"])
    out = []
    for i in range(5):
        state, metrics = trainer.train_step(state, synthetic_batch(i))
        out.append(float(metrics["loss"]))
    return init, out, state


def test_mesh_independence_single_megatron_zero3():
    results = {name: _five_losses(cached_trainer(name)) for name in ("single", "megatron", "zero3")}
    init, reference, _ = results["single"]
    assert reference[-1] < reference[0]  # it learns
    for name in ("megatron", "zero3"):
        other_init, losses_, state = results[name]
        for a, b in zip(jax.tree_util.tree_leaves(init), jax.tree_util.tree_leaves(other_init)):
            np.testing.assert_array_equal(a, b)  # the init does not depend on the layout
        np.testing.assert_allclose(losses_, reference, rtol=0, atol=1e-5)
    # The layouts really differ: zero3 splits the weights' embed axis over data as well.
    zero3_state = results["zero3"][2]
    assert zero3_state["params"]["blocks"]["mlp"]["fc_in_kernel"].sharding.spec == P(None, "data", "model")
    assert zero3_state["opt_state"][1].mu["wte"].sharding.spec == P("model", "data")
    megatron_state = results["megatron"][2]
    assert megatron_state["params"]["blocks"]["mlp"]["fc_in_kernel"].sharding.spec == P(None, None, "model")


def test_memory_report_follows_the_layout():
    single, megatron, zero3 = (cached_trainer(n).compile() for n in ("single", "megatron", "zero3"))
    total = single.params
    assert single.opt_state == pytest.approx(2 * total, rel=0.01)  # Adam's mu and nu
    # Everything but the replicated LayerNorm/bias vectors splits 4 ways under megatron, 8 under zero3.
    assert total / 4 <= megatron.params < total / 3
    assert total / 8 <= zero3.params < megatron.params
    assert single.temporaries is not None and single.temporaries > 0
    assert "per-device memory" in str(single)


@pytest.mark.parametrize("mode", ["stop", "skip"])
def test_nonfinite_loss_stops_or_skips_and_never_saves_a_bad_state(tmp_path, mode):
    trainer = cached_trainer("single")
    trainer.on_nonfinite = mode
    try:
        checkpointer = Checkpointer(str(tmp_path), keep_last=10)
        data = SyntheticIterator(tiny_config(), poison_at=3)
        hooks = [CheckpointHook(checkpointer, 1, data, {})]
        if mode == "stop":
            with pytest.raises(NonFiniteLossError, match="step 3"):
                trainer.fit(trainer.init_state(0), data, 5, hooks)
            checkpointer.wait()
            assert checkpointer.all_steps() == [1, 2]
        else:
            state, status = trainer.fit(trainer.init_state(0), data, 5, hooks)
            assert status == "completed"
            assert checkpointer.all_steps() == [1, 2, 3, 4, 5]
            assert all(np.isfinite(x).all() for x in jax.tree_util.tree_leaves(to_numpy(state["params"])))
            # The poisoned step changed nothing but the step counter.
            at = {s: to_numpy(checkpointer.restore(trainer.abstract_state, s)[0]) for s in (2, 3)}
            assert int(at[3]["step"]) == 3
            for a, b in zip(jax.tree_util.tree_leaves(at[2]["params"]), jax.tree_util.tree_leaves(at[3]["params"])):
                np.testing.assert_array_equal(a, b)
        checkpointer.close()
    finally:
        trainer.on_nonfinite = "stop"


def test_batch_not_divisible_by_microbatches_is_refused():
    config = tiny_config()
    model = GPTJ(GPTJConfig.from_dict(config.model.to_dict()))
    partitioner = Partitioner(make_mesh(1, 1, devices=jax.devices()[:1]), "megatron")
    spec = {"inputs": jax.ShapeDtypeStruct((8, 4), jnp.int32)}
    with pytest.raises(ValueError, match="not divisible by microbatches=3"):
        Trainer(model, losses.next_token_loss, optax.sgd(1.0), partitioner, spec, microbatches=3)


def test_frozen_and_reference_values_are_asked_for_and_checked():
    """The frozen parameters and a reference model's own ones: read before they are given, the error names them
    and their setter; a tree of other parameters is refused naming what is missing and what is unexpected; the
    right tree is placed as the abstract one says (nothing here compiles a step)."""
    config = tiny_config()
    model = GPTJ(GPTJConfig.from_dict(config.model.to_dict()))
    partitioner = Partitioner(make_mesh(1, 1, devices=jax.devices()[:1]), "megatron")
    # Only the final LayerNorm trains; the same module as the reference owns exactly those two parameters.
    trainer = Trainer(model, losses.next_token_loss, optax.sgd(1.0), partitioner, train_batch_spec(config),
                      trainable="ln_f/.*", reference_model=model, reference_dtype=jnp.bfloat16)
    own = ["ln_f/bias", "ln_f/scale"]
    with pytest.raises(TrainableError, match=r"^this Trainer freezes .*wte.*: give their values with set_frozen\(\)"):
        trainer.frozen
    with pytest.raises(TrainableError, match=rf"reference model has its own parameters {', '.join(own)}: give their "
                                             r"values with set_reference\(\)"):
        trainer.reference
    frozen = jax.tree_util.tree_map(lambda a: np.ones(a.shape, a.dtype), trainer.abstract_frozen)
    reference = jax.tree_util.tree_map(lambda a: np.ones(a.shape, np.float32), trainer.abstract_reference)
    with pytest.raises(TrainableError, match=r"frozen parameters do not fit the model: missing \[.*\], unexpected "
                                             r"\['ln_f/bias', 'ln_f/scale'\]"):
        trainer.set_frozen(reference)
    trainer.set_frozen(frozen)
    with pytest.raises(TrainableError, match=r"reference parameters do not fit the reference model: missing "
                                             r"\['ln_f/bias', 'ln_f/scale'\], unexpected \[.*wte"):
        trainer.set_reference(frozen)
    trainer.set_reference(reference)
    placed = jax.tree_util.tree_leaves(trainer.reference)
    assert [leaf.dtype for leaf in placed] == [jnp.bfloat16] * 2  # cast as the reference's dtype says
    assert all(float(leaf.min()) == 1.0 for leaf in placed)
    assert {leaf.dtype for leaf in jax.tree_util.tree_leaves(trainer.frozen)} == {np.dtype(np.float32)}


def test_flops_mfu_and_progress_line():
    from gptj.core import metrics
    from gptj.model.transformer import abstract_params, count_params

    # GPT-J-6B has 6,050,882,784 unique parameters (the reference's 6,053,381,344 counts per-shard
    # replicas), of which 50400 x 4096 are the input embedding, a gather rather than a matmul.
    n = count_params(abstract_params(GPTJConfig())) - 50400 * 4096
    per_token = metrics.flops_per_token(n, 28, 16, 256, 2048)
    assert per_token == 6 * (6_050_882_784 - 50400 * 4096) + 12 * 28 * 16 * 256 * 2048
    assert per_token == pytest.approx(37.885e9, rel=1e-4)
    assert metrics.mfu(1000.0, per_token, 8, 123e12) == pytest.approx(1000 * per_token / (8 * 123e12))
    assert metrics.mfu(1000.0, per_token, 8, 0.0) == 0.0  # no peak configured: not reported
    line = metrics.progress_line(120, 300, {"train/loss": 3.21, "train/tokens_per_sec": 12345.0,
                                            "train/mfu": 0.312}, 0.81)
    assert line == "step 120/300 (40%) | loss 3.2100 | 12,345 tok/s | 0.810 s/step | MFU 31.2% | ETA 2m26s"


def test_profile_hook_writes_a_trace(tmp_path):
    from gptj.core.hooks import ProfileHook, parse_profile_steps

    trainer = cached_trainer("single")
    trainer.fit(trainer.init_state(0), SyntheticIterator(tiny_config()), 3,
                [ProfileHook(str(tmp_path), parse_profile_steps("2:3"))])
    assert list(tmp_path.rglob("*.xplane.pb"))
    with pytest.raises(ValueError, match="FIRST:LAST"):
        parse_profile_steps("20-25")


def test_wandb_writer_logs_everything_it_is_given(monkeypatch):
    """The W&B writer, on a stand-in `wandb` module: each kind of metric arrives at its step as wandb's own type."""
    import sys
    import types

    from gptj.core import metrics

    logged, config = [], {}

    class Media:
        def __init__(self, data=None, **kwargs):
            self.data, self.kwargs = data, kwargs

    class Run:
        config = types.SimpleNamespace(update=lambda values, allow_val_change: config.update(values))

        def log(self, values, step):
            logged.append((step, values))

        def finish(self):
            logged.append(("finished", {}))

    fake = types.SimpleNamespace(init=lambda **kwargs: Run(), Image=type("Image", (Media,), {}),
                                 Video=type("Video", (Media,), {}), Audio=type("Audio", (Media,), {}),
                                 Html=type("Html", (Media,), {}), Histogram=type("Histogram", (Media,), {}))
    monkeypatch.setitem(sys.modules, "wandb", fake)
    writer = metrics._WandbWriter("/tmp", {"lr": 1.0})
    writer.write_scalars(1, {"loss": 2.5})
    writer.write_hparams({"rank": 8})
    writer.write_summaries(2, {"norm": np.float32(3.0)})
    writer.write_images(3, {"img": np.zeros((2, 4, 4, 3))})
    writer.write_videos(4, {"vid": np.zeros((1, 5, 4, 4, 3))})
    writer.write_audios(5, {"wav": np.zeros((1, 100, 1))}, sample_rate=16000)
    writer.write_texts(6, {"sample": "hello"})
    writer.write_histograms(7, {"w": np.arange(10.0)}, num_buckets={"w": 5})
    writer.flush()
    writer.close()
    by_step = dict(logged[:-1])
    assert by_step[1] == {"loss": 2.5} and config == {"rank": 8} and float(by_step[2]["norm"]) == 3.0
    assert [type(x).__name__ for x in by_step[3]["img"]] == ["Image", "Image"]
    assert by_step[4]["vid"][0].data.shape == (5, 3, 4, 4)  # [T, C, H, W], as wandb.Video reads arrays
    assert by_step[5]["wav"][0].kwargs == {"sample_rate": 16000}
    assert "hello" in by_step[6]["sample"].data
    counts, edges = by_step[7]["w"].kwargs["np_histogram"]
    assert len(counts) == 5 and counts.sum() == 10
    assert logged[-1][0] == "finished"


def test_microbatch_gradients_in_the_compute_dtype_are_the_same_numbers():
    """bf16 compute over fp32 weights, 2 microbatches: each microbatch's gradient of the matmul weights taken in
    bf16 (as the recipe sets it: half the bytes in the accumulation loop) gives the step the fp32-weight
    gradient gives, since the model casts those weights to bf16 before every use."""
    from gptj import recipe
    from gptj.settings import RunSettings

    config = tiny_config(microbatches=2)
    config.model.update(dict(dtype="bfloat16", param_dtype="float32"))
    model = RunSettings.from_config(config).model
    partitioner = Partitioner(make_mesh(2, 1, jax.devices()[:2]), "megatron")
    narrow = recipe.build_trainer(config, model, partitioner)
    assert narrow.microbatch_grad_dtype == "bfloat16"
    wide = recipe.build_trainer(config, model, partitioner)
    wide.microbatch_grad_dtype = None
    state, batch = narrow.init_state(0), synthetic_batch(0)
    new_narrow, metrics_narrow = narrow.train_step(state, batch)
    new_wide, metrics_wide = wide.train_step(wide.init_state(0), batch)
    np.testing.assert_allclose(float(metrics_narrow["grad_norm"]), float(metrics_wide["grad_norm"]), rtol=1e-6)
    for a, b in zip(jax.tree_util.tree_leaves(new_narrow["params"]), jax.tree_util.tree_leaves(new_wide["params"])):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)
