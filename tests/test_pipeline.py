"""The pipeline axis (mesh.stage, GPipe) and sequence-parallel activations (megatron_sp), on 8 fake CPU devices.

One tiny 4-layer model trains 6 steps on each layout below from the same init and
data; every layout's trainer is compiled once for the module (`_trainer`), the
initial state is made once, on one device, and laid out on each layout
(`_initial_state`: no layout compiles an init of its own), and the runs are
shared by the tests (`_run`):

    single  1 device                                          the reference
    d2s2m2  stage 2 x data 2 x model 2, megatron               a pipeline of 2 stages of 2 layers
    s4m2    stage 4 x model 2, megatron                        4 stages of 1 layer
    sp      stage 2 x data 2 x model 2, megatron_sp            the pipeline with sequence-sharded activations

Every layout runs 4 microbatches per step: gradient accumulation on one device,
the pipeline's microbatches on the others.
"""

import functools
import os
import re

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P
from trainer_utils import synthetic_batch, tiny_config, to_numpy

from gptj import plan as plan_lib
from gptj import recipe, targets
from gptj.core.checkpoint import Checkpointer
from gptj.core.param_tree import merge_params, path_matcher, select_params
from gptj.core.partitioning import Partitioner, make_mesh
from gptj.core.pipeline import Schedule
from gptj.errors import ConfigError, PartitioningError
from gptj.model.transformer import GPTJConfig
from gptj.settings import validate

LAYOUTS = {  # name -> (stage, data, model, rule set)
    "single": (1, 1, 1, "megatron"),
    "d2s2m2": (2, 2, 2, "megatron"),
    "s4m2": (4, 1, 2, "megatron"),
    "sp": (2, 2, 2, "megatron_sp"),
}
STEPS, SAVED_AT = 6, 3
B1 = 0.9  # Adam's b1: after one step its first moment is (1 - b1) x the gradient


def _config(lora: bool = False, **mesh):
    config = tiny_config(microbatches=4)
    config.model.update(dict(num_layers=4, d_model=16, num_heads=2, rotary_dim=4))
    config.optimizer.clip_norm = 0.0  # so that Adam's first moment is the plain gradient, scaled
    config.mesh.update(mesh)
    if lora:
        config.lora.update(dict(rank=4, alpha=8.0, targets=("q_proj", "v_proj", "fc_in")))
    return config


@functools.lru_cache(maxsize=None)
def _trainer(layout: str, lora: bool = False):
    stage, data, model, rules = LAYOUTS[layout]
    config = _config(lora)
    devices = jax.devices()[:stage * data * model]
    partitioner = Partitioner(make_mesh(data, model, devices=devices, stage=stage), rules)
    trainer = recipe.build_trainer(config, GPTJConfig.from_dict(config.model.to_dict()), partitioner)
    return trainer, trainer.compile()


@functools.lru_cache(maxsize=None)
def _host_initial_state(lora: bool):
    """(state, frozen) on the host, made once on one device. LoRA: the base's initial weights frozen, fresh adapters."""
    reference, _ = _trainer("single", lora)
    if not lora:
        return to_numpy(reference.init_state(0)), None
    base = to_numpy(_host_initial_state(False)[0]["params"])
    trained, frozen = select_params(base, path_matcher(reference.trainable))
    reference.set_frozen(frozen)
    return to_numpy(reference.state_from_params(merge_params(reference.init_params(0), trained))), frozen


def _initial_state(trainer, lora: bool = False):
    """The shared initial state laid out on `trainer`'s layout (its frozen base given to it)."""
    state, frozen = _host_initial_state(lora)
    if lora:
        trainer.set_frozen(frozen)
    return jax.device_put(state, trainer.state_shardings)


@functools.lru_cache(maxsize=None)
def _run(layout: str, lora: bool = False):
    """6 steps: (losses, host copy of the state after step 3, host copy of Adam's first moment after step 1)."""
    trainer, _ = _trainer(layout, lora)
    state = _initial_state(trainer, lora)
    losses, saved, first_moment = [], None, None
    for step in range(STEPS):
        state, metrics = trainer.train_step(state, synthetic_batch(step))
        losses.append(float(metrics["loss"]))
        if step == 0:
            first_moment = to_numpy(next(part.mu for part in state["opt_state"] if hasattr(part, "mu")))
        if step + 1 == SAVED_AT:
            saved = to_numpy(state)
    return np.asarray(losses), saved, first_moment


@pytest.mark.parametrize("layout,lora", [("d2s2m2", False), ("s4m2", False), ("d2s2m2", True)],
                         ids=["d2s2m2", "s4m2", "d2s2m2-lora"])
def test_pipeline_losses_equal_one_device(layout, lora):
    """With LoRA on the layout that uses all three axes: adapters split over stage and model, base frozen in bf16."""
    reference, _, _ = _run("single", lora)
    losses, _, _ = _run(layout, lora)
    assert reference[-1] < reference[0]  # it learns
    np.testing.assert_allclose(losses, reference, rtol=0, atol=1e-5)
    # The layers really are split over the stages: each device holds 1/stage of each stacked weight.
    trainer, _ = _trainer(layout, lora)
    sharding = trainer.state_shardings["params"]["blocks"]["attn"]
    kernel = sharding["q_proj_lora_b" if lora else "q_proj"]
    assert kernel.spec[0] == "stage" and "model" in kernel.spec
    assert kernel.shard_shape((4, 4, 2, 8) if lora else (4, 16, 2, 8))[0] == 4 // trainer.partitioner.stages


def test_pipeline_gradients_equal_stage_1():
    # Adam's first moment after one step is (1 - b1) x the gradient of the whole batch (4 microbatches on both).
    _, _, accumulated = _run("single")
    _, _, pipelined = _run("d2s2m2")
    for (path, g1), g2 in zip(jax.tree_util.tree_leaves_with_path(accumulated), jax.tree_util.tree_leaves(pipelined)):
        g1, g2 = g1 / (1 - B1), g2 / (1 - B1)
        assert np.abs(g1).max() > 0, path
        assert np.abs(g2 - g1).max() <= 1e-6 * np.abs(g1).max(), path


def test_sequence_parallel_same_losses_smaller_temporaries():
    reference, _, _ = _run("single")
    losses, _, _ = _run("sp")
    np.testing.assert_allclose(losses, reference, rtol=0, atol=1e-5)
    _, megatron = _trainer("d2s2m2")
    trainer, sequence_parallel = _trainer("sp")
    print(f"\ntemporaries per device, stage 2 x data 2 x model 2: megatron {megatron.temporaries:,} B, "
          f"megatron_sp {sequence_parallel.temporaries:,} B")
    assert sequence_parallel.temporaries < megatron.temporaries
    # Parameters and optimizer state are laid out as megatron's: only activations differ.
    assert (sequence_parallel.params, sequence_parallel.opt_state) == (megatron.params, megatron.opt_state)
    assert trainer.partitioner.mesh_spec(("act_batch", "act_residual_length", "act_embed")) == \
        P(("stage", "data"), "model", None)


def test_stage_transfers_are_what_the_scaling_model_counts():
    """The compiled step sends 2 collective-permutes per iteration each way (gptj.scaling's stage transfers).

    And nothing else moves between stages but the gradients' reductions: no
    weight or activation is gathered.
    """
    trainer, _ = _trainer("d2s2m2")
    hlo = trainer.compiled_train_step.as_text()
    permutes = re.findall(r" collective-permute(?:-start)?\(", hlo)
    assert len(permutes) == 4  # in the forward loop's body and the backward loop's: outputs on, the stream back
    assert not re.findall(r" all-gather(?:-start)?\(", hlo)


def test_non_finite_guard_inside_the_pipeline():
    trainer, _ = _trainer("d2s2m2")
    state = _initial_state(trainer)
    before = to_numpy(state["params"])
    poisoned = synthetic_batch(0)
    poisoned["loss_mask"][3, 5] = np.nan
    state, metrics = trainer.train_step(state, poisoned)
    assert not bool(metrics["finite"])
    _leaves_equal(to_numpy(state["params"]), before)  # the update was dropped


@pytest.fixture(scope="module")
def staged_checkpoint(tmp_path_factory):
    """A workdir holding the stage 2 x data 2 x model 2 run's state after SAVED_AT steps, saved from that layout."""
    workdir = tmp_path_factory.mktemp("staged")
    saver = Checkpointer(str(workdir))
    saver.save(jax.device_put(_run("d2s2m2")[1], _trainer("d2s2m2")[0].state_shardings), {"index": SAVED_AT})
    saver.close()
    return workdir


def test_train_builds_the_pipeline_from_the_config():
    """--config.mesh.stage=2: the mesh the train mode lays out and the model's pipeline, before anything compiles."""
    settings = validate(_config(stage=2, data=2, model=2), "train", check_tasks=False)
    partitioner = Partitioner.from_config(settings.mesh)
    assert dict(partitioner.mesh.shape) == {"stage": 2, "data": 2, "model": 2}
    trainer = recipe.build_trainer(settings, settings.model, partitioner)
    assert trainer.model.pipeline == Schedule(stages=2, microbatches=4)
    assert trainer.state_shardings["params"]["blocks"]["mlp"]["fc_in_kernel"].spec[0] == "stage"


def test_plan_on_the_tpu_compiler_lays_out_the_stages():
    """--mode=plan --target=tpu:v3-8 with mesh.stage: the pipeline compiled by the TPU compiler on 2 x 2 x 2 of its
    devices, the state laid out as on this machine's; a stage x data x model that does not divide the slice, one line."""
    if not targets.compiler_installed("tpu"):
        if os.environ.get("CI"):
            raise RuntimeError(f"the TPU compiler is not installed (scripts/install.sh puts it in "
                               f"{targets.COMPILERS_DIR})")
        pytest.skip("the TPU compiler is not installed")
    config = _config(stage=2, data=2, model=2, rules="megatron_sp")
    plan = plan_lib.make_plan(config, target="tpu:v3-8")
    assert plan.mesh == {"stage": 2, "data": 2, "model": 2} and plan.pipeline.stages == 2
    assert plan.compiled_for == "the TPU compiler for 8 TPU v3 devices (tpu:v3-8)" and plan.fits
    _, report = _trainer("sp")
    assert (plan.params, plan.opt_state) == (report.params, report.opt_state)
    # The stacked layers split over stage x model, embedding and head over model only.
    assert plan.params_expected <= plan.params <= 1.05 * plan.params_expected
    # Every loop counted: the layers run (M + S - 1) / M times over, the bubble computing on zeros.
    work = plan.work
    assert work.cost.uncounted_loops == 0 and work.compiled_flops > work.model_flops
    text = plan_lib.format_plan(plan, config)
    assert "mesh stage=2 x data=2 x model=2 (compiled by the TPU compiler" in text
    assert "pipeline: 2 stages of 2 layers, GPipe over 4 microbatches: 5 iterations, bubble 20%" in text
    with pytest.raises(targets.TargetError, match="mesh stage=2 x data=3 x model=1 does not divide the 8 devices of "
                                                  "tpu:v3-8"):
        plan_lib.make_plan(_config(stage=2, data=3, model=1), target="tpu:v3-8")


def _leaves_equal(a, b):
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("saved_on,resumed_on", [("d2s2m2", "single"), ("d2s2m2", "s4m2"), ("single", "d2s2m2")])
def test_checkpoint_is_layout_free(tmp_path, staged_checkpoint, saved_on, resumed_on):
    """Saved at one stage count, restored at another: the same state, bit for bit, and training goes on.

    Stage 2's checkpoint is saved once for the module (`staged_checkpoint`);
    one device's here. Continuing from the restored state equals, bit for bit,
    continuing on that layout from the saving run's state without the round
    trip through disk.
    """
    _, saved, _ = _run(saved_on)
    workdir = staged_checkpoint if saved_on == "d2s2m2" else tmp_path
    if saved_on != "d2s2m2":
        saver = Checkpointer(str(workdir))
        saver.save(jax.device_put(saved, _trainer(saved_on)[0].state_shardings), {"index": SAVED_AT})
        saver.close()

    target, _ = _trainer(resumed_on)
    restored, data_state = Checkpointer(str(workdir), read_only=True).restore(target.abstract_state)
    assert data_state == {"index": SAVED_AT} and int(restored["step"]) == SAVED_AT
    _leaves_equal(to_numpy(restored), saved)
    assert restored["params"]["blocks"]["mlp"]["fc_in_kernel"].sharding == \
        target.state_shardings["params"]["blocks"]["mlp"]["fc_in_kernel"]

    def continue_from(state):
        losses = []
        for step in range(SAVED_AT, STEPS):
            state, metrics = target.train_step(state, synthetic_batch(step))
            losses.append(float(metrics["loss"]))
        return losses, to_numpy(state["params"])

    resumed_losses, resumed_params = continue_from(restored)
    straight_losses, straight_params = continue_from(jax.device_put(saved, target.state_shardings))
    assert resumed_losses == straight_losses
    _leaves_equal(resumed_params, straight_params)
    np.testing.assert_allclose(resumed_losses, _run("single")[0][SAVED_AT:], rtol=0, atol=1e-5)


@pytest.mark.parametrize("mesh,train,expected", [
    (dict(stage=4, model=2), dict(), "model.num_layers=6 is not divisible by mesh.stage=4"),
    (dict(stage=4, model=2), dict(microbatches=2), "train.microbatches=2 is fewer than mesh.stage=4"),
    (dict(stage=4, model=2), dict(microbatches=6, batch_size=24), "train.microbatches=6 must be a multiple of "
                                                                  "mesh.stage=4"),
    (dict(stage=2, model=1, rules="dp"), dict(), "mesh.rules='dp' splits no layers over the stage axis"),
], ids=["layers", "microbatches", "multiple", "rules"])
def test_bad_pipeline_settings_are_one_line_before_compiling(mesh, train, expected):
    config = _config(**mesh)
    config.model.num_layers = 6 if "layers" in expected else 4
    config.train.update(train)
    expected = expected.replace("mesh.stage=4", f"mesh.stage={mesh['stage']}")
    with pytest.raises(ConfigError) as e:
        validate(config, "train", check_tasks=False)
    assert expected in str(e.value) and "\n" not in str(e.value)


def test_bad_pipeline_layouts_are_refused_where_they_are_built():
    # Below the settings: the rule set at the Partitioner, the model's layers at the recipe.
    with pytest.raises(PartitioningError, match="rule set 'dp' splits no layers over the stage axis"):
        Partitioner(make_mesh(1, 4, devices=jax.devices()[:8], stage=2), "dp")
    config = _config()
    partitioner = _trainer("s4m2")[0].partitioner
    model = GPTJConfig.from_dict(dict(config.model.to_dict(), num_layers=6))
    with pytest.raises(ConfigError, match="model.num_layers=6 is not divisible by mesh.stage=4"):
        recipe.build_trainer(config, model, partitioner)
