"""Checkpoints: resharding across meshes, exact resume after SIGTERM, latest_params_path."""

import functools
import os

import jax
import numpy as np
import pytest
from trainer_utils import (SyntheticIterator, cached_trainer, read_scalars, synthetic_batch, synthetic_eval_sets,
                           tiny_config, to_numpy)

from gptj import train
from gptj.core import checkpoint
from gptj.core.checkpoint import Checkpointer, latest_params_path, latest_step
from gptj.errors import CheckpointError
from gptj.weights import params_dir as params_io


def _leaves_equal(a, b):
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        np.testing.assert_array_equal(x, y)


def test_checkpoint_from_2x4_restores_on_one_device_and_4x2_zero3_and_keeps_training(tmp_path):
    source = cached_trainer("megatron")
    state = source.init_state(0)
    for i in range(2):
        state, _ = source.train_step(state, synthetic_batch(i))
    saver = Checkpointer(str(tmp_path), keep_last=2)
    assert saver.save(state, {"index": 2}, {"note": "2x4"})
    saver.close()
    saved = to_numpy(state)
    _, expected = source.train_step(state, synthetic_batch(2))

    for name in ("single", "zero3"):
        target = cached_trainer(name)
        restored, data_state = Checkpointer(str(tmp_path)).restore(target.abstract_state)
        assert data_state == {"index": 2}
        assert int(restored["step"]) == 2
        _leaves_equal(to_numpy(restored["params"]), saved["params"])
        _leaves_equal(to_numpy(restored["opt_state"]), saved["opt_state"])
        leaf = restored["params"]["blocks"]["mlp"]["fc_in_kernel"]
        assert leaf.sharding == target.state_shardings["params"]["blocks"]["mlp"]["fc_in_kernel"]
        # ... and training continues where the 2x4 run would have.
        _, metrics = target.train_step(restored, synthetic_batch(2))
        assert float(metrics["loss"]) == pytest.approx(float(expected["loss"]), abs=1e-5)


def test_latest_params_path_and_load_params_read_a_workdir(tmp_path):
    trainer = cached_trainer("single")
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        latest_params_path(str(tmp_path))
    state = trainer.init_state(3)
    saver = Checkpointer(str(tmp_path))
    saver.save(state)
    saver.close()
    assert latest_step(str(tmp_path)) == 0
    assert latest_params_path(str(tmp_path)) == os.path.join(str(tmp_path), "checkpoints", "0", "params")
    # params_io.load_params accepts the workdir once config.json holds the run config.
    with open(tmp_path / "config.json", "w") as f:
        f.write(tiny_config().to_json())
    params, model = params_io.load_params(str(tmp_path), shardings=trainer.state_shardings["params"])
    assert model.d_model == 32
    _leaves_equal(to_numpy(params), to_numpy(state["params"]))


def _run(workdir, **iter_kwargs):
    config = tiny_config(total_steps=20, log_every=1, seed=7)
    return train.train_and_evaluate(
        config, str(workdir), train_iter_fn=functools.partial(SyntheticIterator, **iter_kwargs),
        eval_iters_fn=synthetic_eval_sets)


def test_resume_after_sigterm_is_bitwise_exact(tmp_path):
    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    assert _run(straight) == "completed"
    # SIGTERM arrives while step 10 runs: the step finishes, is saved, and the run returns.
    assert _run(interrupted, sigterm_at=10) == "preempted"
    assert latest_step(str(interrupted)) == 10
    assert _run(interrupted) == "completed"
    assert latest_step(str(interrupted)) == 20

    losses_straight = read_scalars(str(straight / "tensorboard"), "train/loss")
    losses_resumed = read_scalars(str(interrupted / "tensorboard"), "train/loss")
    assert sorted(losses_straight) == list(range(1, 21))
    assert [losses_resumed[s] for s in range(11, 21)] == [losses_straight[s] for s in range(11, 21)]

    trainer = cached_trainer("single")
    final_straight, data_straight = Checkpointer(str(straight)).restore(trainer.abstract_state)
    final_resumed, data_resumed = Checkpointer(str(interrupted)).restore(trainer.abstract_state)
    assert data_straight == data_resumed == {"index": 20}
    _leaves_equal(to_numpy(final_straight), to_numpy(final_resumed))
    # The workdir records the resolved run config and its TensorBoard events.
    assert params_io.read_model_config(str(interrupted)).d_model == 32
    assert read_scalars(str(interrupted / "tensorboard"), "val/synthetic_val/loss")


def test_checkpoints_keep_the_last_k_and_every_keep_every(tmp_path):
    trainer = cached_trainer("single")
    state = trainer.init_state(0)
    saver = Checkpointer(str(tmp_path), keep_last=2, keep_every=4, async_save=False)
    for step in range(1, 10):
        saver.save(dict(state, step=np.int32(step)))
    saver.close()
    assert saver.all_steps() == [4, 8, 9]
    assert checkpoint.latest_step(str(tmp_path)) == 9
