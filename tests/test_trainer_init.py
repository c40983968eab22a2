"""init_from: HF weights and gptj workdirs, the model shape taken from the weights, fresh or continued optimizer."""

import json

import jax
import numpy as np
import pytest
from trainer_utils import SyntheticIterator, cached_trainer, read_scalars, synthetic_eval_sets, tiny_config, to_numpy

from gptj import recipe, train
from gptj.core.checkpoint import Checkpointer, latest_step
from gptj.model.transformer import GPTJConfig
from gptj.settings import validate
from gptj.errors import ConfigError
from gptj.weights.formats.hf import write_hf

TINY = GPTJConfig.from_dict(tiny_config().model.to_dict())


def _leaves_equal(a, b):
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_init_from_hf_takes_shape_and_values_from_the_weights(tmp_path):
    weights = to_numpy(cached_trainer("single").init_state(11)["params"])
    write_hf(weights, TINY, str(tmp_path / "hf"))
    config = tiny_config()
    config.init_from = f"hf:{tmp_path / 'hf'}"
    config.model.update(dict(d_model=64, num_layers=3))  # the config file's shape loses to the weights'

    source = recipe.open_init_weights(config)
    model = recipe.resolve_model_config(config, init_weights=source)
    assert (model.d_model, model.num_layers, model.vocab_size) == (32, 2, 128)
    trainer = cached_trainer("single")
    state = recipe.initial_state(trainer, model, source, fresh_optimizer=True)
    assert int(state["step"]) == 0
    _leaves_equal(to_numpy(state["params"]), weights)
    assert all(not np.asarray(x).any() for x in jax.tree_util.tree_leaves(to_numpy(state["opt_state"][1].mu)))

    # A shape given on the command line that contradicts the weights is an error, not silently dropped.
    with pytest.raises(ConfigError, match="model.d_model=64 but the weights have 32"):
        recipe.resolve_model_config(config, explicit_model_fields=["d_model"], init_weights=source)
    # Runtime choices (compute dtype, remat) stay the run's.
    config.model.update(dict(dtype="bfloat16", remat_policy="full"))
    model = recipe.resolve_model_config(config, explicit_model_fields=["dtype"], init_weights=source)
    assert (model.dtype, model.remat_policy, model.d_model) == ("bfloat16", "full", 32)


def test_init_from_a_workdir_continues_or_starts_a_fresh_optimizer(tmp_path):
    trainer = cached_trainer("single")
    source = tmp_path / "source"
    state = trainer.init_state(2)
    data = SyntheticIterator(tiny_config())
    for _ in range(3):
        state, _ = trainer.train_step(state, next(data))
    saver = Checkpointer(str(source))
    saver.save(state)
    saver.close()
    with open(source / "config.json", "w") as f:
        json.dump(tiny_config().to_dict(), f)
    saved = to_numpy(state)

    config = tiny_config(total_steps=5)
    config.init_from = str(source)
    fresh = recipe.initial_state(trainer, TINY, recipe.open_init_weights(config),
                                            fresh_optimizer=True)
    assert int(fresh["step"]) == 0
    _leaves_equal(to_numpy(fresh["params"]), saved["params"])

    # Without a fresh optimizer the whole train state carries on: steps 4 and 5 are trained.
    target = tmp_path / "finetune"
    status = train.train_and_evaluate(config, str(target), train_iter_fn=SyntheticIterator,
                                         eval_iters_fn=synthetic_eval_sets)
    assert status == "completed" and latest_step(str(target)) == 5
    assert sorted(read_scalars(str(target / "tensorboard"), "train/loss")) == [4, 5]
    with open(target / "config.json") as f:
        recorded = json.load(f)
    assert recorded["init_from"] == str(source) and recorded["model"]["d_model"] == 32


def test_init_from_an_older_step_directory_takes_that_steps_params(tmp_path):
    """init_from=WORKDIR/checkpoints/N (as the damaged-checkpoint error advises) passes validation and loads step N."""
    trainer = cached_trainer("single")
    source = tmp_path / "source"
    state, data, saved = trainer.init_state(4), SyntheticIterator(tiny_config()), {}
    saver = Checkpointer(str(source))
    for _ in range(2):
        state, _ = trainer.train_step(state, next(data))
        saver.save(state)
        saver.wait()
        saved[int(state["step"])] = to_numpy(state["params"])
    saver.close()
    with open(source / "config.json", "w") as f:
        json.dump(tiny_config().to_dict(), f)

    config = tiny_config()
    config.init_from = str(source / "checkpoints" / "1")
    validate(config, "train", check_tasks=False)
    older = recipe.initial_state(trainer, TINY, recipe.open_init_weights(config), fresh_optimizer=False)
    assert int(older["step"]) == 0  # a step directory gives params only: the optimizer starts afresh
    _leaves_equal(to_numpy(older["params"]), saved[1])
    assert not all(np.array_equal(a, b) for a, b in zip(jax.tree_util.tree_leaves(saved[1]),
                                                      jax.tree_util.tree_leaves(saved[2])))

    config.init_from = str(tmp_path)  # neither a workdir, a step nor a params directory
    with pytest.raises(ConfigError, match=f"init_from='{tmp_path}': .*no config.json.*use hf:PATH"):
        validate(config, "train", check_tasks=False)


def test_init_from_a_mesh_transformer_jax_checkpoint(tmp_path):
    from mtj_utils import TINY as MTJ_TINY
    from mtj_utils import random_shards, write_checkpoint

    from gptj.core.partitioning import Partitioner, make_mesh

    write_checkpoint(str(tmp_path / "mtj"), random_shards(MTJ_TINY, seed=3), MTJ_TINY, step=7, with_opt=True,
                     bf16=False)
    config = tiny_config()
    config.init_from = f"mtj:{tmp_path / 'mtj'}"
    source = recipe.open_init_weights(config)
    model = recipe.resolve_model_config(config, init_weights=source)
    assert (model.d_model, model.num_heads, model.rotary_dim, model.vocab_size) == (64, 8, 4, 128)
    trainer = recipe.build_trainer(recipe.resolved_config(config, model), model,
                                     Partitioner(make_mesh(1, 1, devices=jax.devices()[:1]), "megatron"))
    state = recipe.initial_state(trainer, model, source, fresh_optimizer=False)
    assert int(state["step"]) == 0  # a reference checkpoint's optimizer state is not carried over
    _leaves_equal(to_numpy(state["params"]), source.numpy())
