"""LoRA and frozen parameters: training over a frozen base, checkpoints, resume, meshes, PEFT and HF interchange.

The references are independent: HuggingFace PyTorch GPT-J with `peft.PeftModel`
for the adapters' function, and single-device runs for the sharded ones. The
models are trainer_utils' tiny shape (vocab 128, d_model 32, 2 layers) over
in-memory data; the runs are module fixtures shared by the tests.
"""

import functools
import os
import shutil

import jax
import numpy as np
import pytest
from hf_utils import hf_logits, random_hf_model
from jax.sharding import PartitionSpec as P
from trainer_utils import VOCAB, SyntheticIterator, read_scalars, synthetic_eval_sets, tiny_config, to_numpy

from gptj import recipe, train
from gptj.convert.__main__ import main as convert
from gptj.core.checkpoint import Checkpointer, latest_step
from gptj.core.param_tree import merge_params, param_paths
from gptj.core.partitioning import Partitioner, make_mesh
from gptj.model.lora import is_adapter, split_adapters
from gptj.model.transformer import GPTJ, LORA_TARGETS, GPTJConfig, LoraConfig
from gptj.settings import validate
from gptj.errors import ConfigError
from gptj.weights.formats.peft import ADAPTER_CONFIG, ADAPTER_WEIGHTS, lora_config_from_peft
from gptj.errors import WeightsError
from gptj.weights.source import load_for_inference, open_weights

TOKENS = np.array([[3, 77, 127, 64, 10, 0, 42, 5, 9, 100, 31]])
HF_SHAPE = dict(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, rotary_dim=4, n_positions=32)


def _train(config, workdir, **iter_kwargs):
    return train.train_and_evaluate(config, str(workdir), eval_iters_fn=synthetic_eval_sets,
                                       train_iter_fn=functools.partial(SyntheticIterator, **iter_kwargs))


def _lora_config(weights, total_steps, eval_every=10, **lora):
    config = tiny_config(total_steps=total_steps, eval_every=eval_every, seed=7)
    config.init_from = str(weights)
    config.lora.update({"base_dtype": "float32", **lora})
    return config


def _single():
    return Partitioner(make_mesh(1, 1, devices=jax.devices()[:1]), "megatron")


def _model(config):
    return GPTJConfig.from_dict(config.model.to_dict())


def _leaves(tree):
    return dict(zip(param_paths(tree), jax.tree_util.tree_leaves(tree)))


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("lora")


@pytest.fixture(scope="module")
def hf_base(root):
    """Random HF GPT-J weights (every tensor random) in trainer_utils' tiny shape."""
    random_hf_model(seed=3, **HF_SHAPE).save_pretrained(root / "hf")
    return str(root / "hf")


@pytest.fixture(scope="module")
def trained_base(root):
    """A gptj workdir of a tiny full training run."""
    assert _train(tiny_config(total_steps=2), root / "trained") == "completed"
    return str(root / "trained")


@pytest.fixture(scope="module")
def qv_run(root, hf_base):
    """Rank 4 on q_proj and v_proj over hf: random weights, 20 steps."""
    config = _lora_config(f"hf:{hf_base}", 20, rank=4, alpha=8.0, targets=("q_proj", "v_proj"))
    assert _train(config, root / "qv") == "completed"
    return config, str(root / "qv")


@pytest.fixture(scope="module")
def all_run(root, trained_base):
    """Rank 2 on all six projections (with dropout) over a trained gptj checkpoint, 6 steps."""
    config = _lora_config(trained_base, 6, eval_every=0, rank=2, alpha=4.0, targets=LORA_TARGETS, dropout=0.1)
    assert _train(config, root / "all") == "completed"
    return config, str(root / "all")


@pytest.mark.slow
def test_lora_learns_trains_only_adapters_and_keeps_the_base(qv_run, all_run, hf_base, trained_base):
    for (config, workdir), base_spec in ((qv_run, f"hf:{hf_base}"), (all_run, trained_base)):
        losses = read_scalars(os.path.join(workdir, "tensorboard"), "val/synthetic_val/loss")
        assert losses[config.train.total_steps] < losses[0] - 0.01, losses
        # The checkpoint holds the adapters and their Adam moments, nothing else.
        trainer = recipe.build_trainer(config, _model(config), _single())
        assert all(is_adapter(p) for p in param_paths(trainer.abstract_state["params"]))
        moments = [(jax.tree_util.keystr(path), leaf) for path, leaf
                   in jax.tree_util.tree_leaves_with_path(trainer.abstract_state["opt_state"])]
        assert all("_lora_" in path for path, leaf in moments if leaf.ndim), moments
        state, _ = Checkpointer(workdir).restore(trainer.abstract_state)
        assert sorted(param_paths(state["params"])) == sorted(
            f"blocks/{'mlp' if t.startswith('fc') else 'attn'}/{t}_lora_{m}" for t in config.lora.targets for m in "ab")
        # Inference reads base + adapters: every parameter the adapters do not touch is the base's, bit for bit.
        merged = _leaves(to_numpy(load_for_inference(config, workdir, _single())[0]))
        base = _leaves(open_weights(base_spec, 8).numpy())
        assert merged.keys() == base.keys()
        adapted = {f"blocks/{'mlp' if t.startswith('fc') else 'attn'}/{t}{'_kernel' if t.startswith('fc') else ''}"
                   for t in config.lora.targets}
        for path in merged:
            if path in adapted:
                assert np.abs(merged[path] - base[path]).max() > 1e-4, path
            else:
                np.testing.assert_array_equal(merged[path], base[path], err_msg=path)


def test_lora_checkpoint_is_under_5_percent_of_a_full_one(tmp_path):
    from gptj.configs import tiny

    sizes = {}
    for name, rank in (("full", 0), ("lora", 4)):
        config = tiny.get_config()
        config.lora.rank = rank
        trainer = recipe.build_trainer(config, _model(config), _single())
        saver = Checkpointer(str(tmp_path / name), async_save=False)
        saver.save(trainer.init_state(0))
        saver.close()
        sizes[name] = sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(tmp_path / name)
                          for f in files)
    assert sizes["lora"] < 0.05 * sizes["full"], sizes


@pytest.mark.slow
def test_lora_resume_after_sigterm_is_bitwise_exact(root, qv_run):
    config, straight = qv_run
    resumed = root / "qv_resumed"
    assert _train(config, resumed, sigterm_at=10) == "preempted"
    assert latest_step(str(resumed)) == 10
    assert _train(config, resumed) == "completed"
    losses_straight = read_scalars(os.path.join(straight, "tensorboard"), "train/loss")
    losses_resumed = read_scalars(str(resumed / "tensorboard"), "train/loss")
    assert [losses_resumed[s] for s in range(11, 21)] == [losses_straight[s] for s in range(11, 21)]
    trainer = recipe.build_trainer(config, _model(config), _single())
    final = [to_numpy(Checkpointer(str(w)).restore(trainer.abstract_state)[0]) for w in (straight, resumed)]
    jax.tree_util.tree_map(np.testing.assert_array_equal, final[0], final[1])


def _hf_dir_of(base_spec, root):
    """An HF directory holding the base weights (converting a gptj workdir once)."""
    if base_spec.startswith("hf:"):
        return base_spec[3:]
    out = root / "base_as_hf"
    if not out.exists():
        assert convert(["to_hf", f"--workdir={base_spec}", f"--out={out}"]) == 0
    return str(out)


@pytest.mark.slow
def test_harness_during_training_scores_what_inference_loads(all_run, trained_base):
    """eval.during_training on a LoRA run: the hook's params are the frozen base joined and the adapters merged,
    as `load_for_inference` reads the finished workdir (and the train state keeps its adapters)."""
    config, workdir = all_run
    model = _model(config)
    trainer = recipe.build_trainer(config, model, _single())
    recipe.load_frozen_base(trainer, model, open_weights(trained_base, 8), config.lora.base_dtype)
    state, _ = Checkpointer(workdir).restore(trainer.abstract_state)
    scored = _leaves(to_numpy(recipe.inference_params(trainer, recipe.resolve_lora(config), state)))
    loaded = _leaves(to_numpy(load_for_inference(config, workdir, _single())[0]))
    assert scored.keys() == loaded.keys() and not any(is_adapter(p) for p in scored)
    for path in loaded:
        np.testing.assert_allclose(scored[path], loaded[path], rtol=1e-6, atol=1e-7, err_msg=path)
    assert all(is_adapter(p) for p in param_paths(state["params"]))
    config.eval.update(dict(during_training=True, harness_tasks=["lambada_openai"]))
    validate(config, "train", check_tasks=False)  # no longer refused with LoRA


@pytest.mark.slow
@pytest.mark.parametrize("run", ["qv_run", "all_run"])
def test_to_peft_and_to_hf_give_gptjs_logits(run, request, root):
    from peft import PeftModel
    from peft.utils import set_peft_model_state_dict
    from safetensors.torch import load_file
    from transformers import GPTJForCausalLM

    config, workdir = request.getfixturevalue(run)
    name = os.path.basename(workdir)
    peft_dir, merged_dir = root / f"{name}_peft", root / f"{name}_merged"
    assert convert(["to_peft", f"--workdir={workdir}", f"--out={peft_dir}"]) == 0
    assert convert(["to_hf", f"--workdir={workdir}", f"--out={merged_dir}"]) == 0

    hf_base = _hf_dir_of(config.init_from, root)
    peft_model = PeftModel.from_pretrained(GPTJForCausalLM.from_pretrained(hf_base), str(peft_dir)).eval()
    # Every tensor of the file is one of the model's adapters, and every adapter is in the file.
    result = set_peft_model_state_dict(peft_model, load_file(str(peft_dir / ADAPTER_WEIGHTS)))
    assert not result.unexpected_keys
    assert not [k for k in result.missing_keys if "lora_" in k]
    reference = hf_logits(peft_model, TOKENS)
    plain_base = hf_logits(GPTJForCausalLM.from_pretrained(hf_base).eval(), TOKENS)
    assert np.abs(reference - plain_base).max() > 0.05  # the adapters matter

    # gptj with the adapters unmerged (the training forward) and merged (inference), and HF's merged model.
    weights = open_weights(workdir)
    lora = weights.adapted.lora
    model = _model(config)
    trained = weights.adapted.trained_params(model)
    base_params = open_weights(config.init_from, 8).numpy()
    unmerged = GPTJ(model, lora=lora).apply({"params": merge_params(base_params, trained)}, TOKENS)
    params, model_config = load_for_inference(config, workdir, _single())
    merged = GPTJ(model_config).apply({"params": params}, TOKENS)
    hf_merged = hf_logits(GPTJForCausalLM.from_pretrained(str(merged_dir)).eval(), TOKENS)
    for logits in (unmerged, merged, hf_merged):
        assert np.abs(np.asarray(logits)[..., :VOCAB] - reference).max() <= 1e-4

    # lora.init_from=peft:DIR: inference over init_from, and the adapters a training run starts from.
    from_peft = tiny_config()
    from_peft.init_from = config.init_from
    from_peft.lora.init_from = f"peft:{peft_dir}"
    params, model_config = load_for_inference(from_peft, None, _single())
    again = GPTJ(model_config).apply({"params": params}, TOKENS)
    assert np.abs(np.asarray(again)[..., :VOCAB] - reference).max() <= 1e-4
    start = _lora_config(config.init_from, 1, **config.lora)
    start.lora.init_from = f"peft:{peft_dir}"
    start = recipe.resolved_config(start, model, recipe.resolve_lora(start))
    trainer = recipe.build_trainer(start, model, _single())
    base = recipe.load_frozen_base(trainer, model, open_weights(config.init_from, 8), "float32")
    state = recipe.adapted_initial_state(trainer, model, base, start)
    jax.tree_util.tree_map(np.testing.assert_array_equal, to_numpy(state["params"]), split_adapters(trained)[1])


@pytest.mark.slow
def test_same_lora_run_on_one_device_2x4_zero3_and_4x2_megatron(hf_base):
    config = _lora_config(f"hf:{hf_base}", 5, rank=4, alpha=8.0, targets=LORA_TARGETS, base_dtype="bfloat16")
    model = _model(config)
    base_bf16 = jax.tree_util.tree_map(lambda x: np.asarray(x, "bfloat16"), open_weights(f"hf:{hf_base}", 8).numpy())
    losses = {}
    for data, size, rules in ((1, 1, "megatron"), (2, 4, "zero3"), (4, 2, "megatron")):
        partitioner = Partitioner(make_mesh(data, size, devices=jax.devices()[:data * size]), rules)
        trainer = recipe.build_trainer(config, model, partitioner)
        base = recipe.load_frozen_base(trainer, model, open_weights(f"hf:{hf_base}", 8), "bfloat16")
        state = recipe.adapted_initial_state(trainer, model, base, config)
        run = []
        for i, batch in zip(range(5), SyntheticIterator(config)):
            state, metrics = trainer.train_step(state, batch)
            run.append(float(metrics["loss"]))
        losses[(data, size, rules)] = run
        # The frozen base is the bf16 base, bit for bit, after the steps.
        frozen = _leaves(to_numpy(trainer.frozen))
        assert frozen.keys() == _leaves(base_bf16).keys()
        for path, value in _leaves(base_bf16).items():
            np.testing.assert_array_equal(frozen[path], value, err_msg=path)
        if rules == "zero3":
            assert trainer.frozen["blocks"]["mlp"]["fc_in_kernel"].sharding.spec == P(None, "data", "model")
    reference = losses[(1, 1, "megatron")]
    assert reference[-1] < reference[0]
    for key, run in losses.items():
        np.testing.assert_allclose(run, reference, rtol=0, atol=1e-5, err_msg=str(key))


@pytest.mark.slow
def test_trainable_without_lora_changes_only_the_matching_parameters(root, hf_base):
    config = tiny_config(total_steps=4, eval_every=0)
    config.init_from = f"hf:{hf_base}"
    config.train.trainable = "blocks/mlp/.*|ln_f/.*"
    assert _train(config, root / "mlp") == "completed"
    trainer = recipe.build_trainer(config, _model(config), _single())
    assert param_paths(trainer.abstract_state["params"]) == [
        "blocks/mlp/fc_in_bias", "blocks/mlp/fc_in_kernel", "blocks/mlp/fc_out_bias", "blocks/mlp/fc_out_kernel",
        "ln_f/bias", "ln_f/scale"]
    trained = _leaves(to_numpy(load_for_inference(config, str(root / "mlp"), _single())[0]))
    base = _leaves(open_weights(f"hf:{hf_base}", 8).numpy())
    for path in base:
        if path.startswith(("blocks/mlp/", "ln_f/")):
            assert not np.array_equal(trained[path], base[path]), path
        else:
            np.testing.assert_array_equal(trained[path], base[path], err_msg=path)
    # A PEFT adapter cannot hold trained base parameters.
    assert convert(["to_peft", f"--workdir={root / 'mlp'}", f"--out={root / 'mlp_peft'}"]) == 2


def test_a_trainable_pattern_that_matches_nothing_names_the_parameters():
    config = tiny_config()
    config.train.trainable = "blocks/mlp/fc_in"  # a module, not a parameter: matches no whole path
    with pytest.raises(ConfigError) as error:
        recipe.build_trainer(config, _model(config), _single())
    message = str(error.value)
    assert "matches no parameter" in message and "blocks/mlp/fc_in_kernel" in message and "wte" in message
    assert "\n" not in message
    config.train.trainable = "ln_f/.*"
    config.lora.rank = 2
    with pytest.raises(ConfigError, match="trains no LoRA adapter"):
        recipe.build_trainer(config, _model(config), _single())


@pytest.mark.parametrize("change, message", [
    (lambda c: c.lora.update(dict(rank=-1)), "lora: invalid LoRA config: rank must be an integer >= 0"),
    (lambda c: c.lora.update(dict(rank=4, targets=("q_proj", "qkv"))), "unknown target(s) ['qkv']"),
    (lambda c: c.lora.update(dict(rank=4, base_dtype="int8")), "lora.base_dtype must be one of"),
    (lambda c: c.lora.update(dict(rank=4)), "LoRA and train.trainable freeze base weights: set init_from"),
    (lambda c: c.lora.update(dict(init_from="/some/dir")), "must name a PEFT adapter directory as peft:DIR"),
    (lambda c: c.train.update(dict(trainable="blocks/(mlp")), "train.trainable='blocks/(mlp' is not a regular"),
])
def test_bad_lora_settings_are_one_line_errors(change, message):
    config = tiny_config()
    change(config)
    with pytest.raises(ConfigError) as error:
        validate(config, "train", check_tasks=False)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_peft_options_gptj_does_not_implement_are_refused():
    good = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["v_proj", "q_proj"], "bias": "none"}
    assert lora_config_from_peft(good) == LoraConfig(rank=4, alpha=8.0, targets=("q_proj", "v_proj"))
    for change, message in (({"use_dora": True}, "use_dora=True is not supported"),
                            ({"bias": "all"}, "bias='all' is not supported"),
                            ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
                            ({"target_modules": ".*proj"}, "regular expressions are not supported"),
                            ({"peft_type": "IA3"}, "only LORA adapters")):
        with pytest.raises(WeightsError, match=message.replace("(", r"\(").replace("[", r"\[")):
            lora_config_from_peft(dict(good, **change))


@pytest.mark.slow
def test_a_lora_workdir_needs_its_own_base_and_nothing_is_overwritten(root, all_run, trained_base, hf_base, capsys):
    config, _ = all_run
    moved = root / "base_copy"
    shutil.copytree(trained_base, moved)
    run = _lora_config(moved, 2, eval_every=0, **config.lora)
    workdir = root / "over_copy"
    assert _train(run, workdir) == "completed"
    snapshot = {p: p.read_bytes() for p in sorted(workdir.rglob("*")) if p.is_file() and "tensorboard" not in str(p)}

    # Resuming over other weights of the same shape: a clear error, and the workdir is left as it was.
    other = _lora_config(f"hf:{hf_base}", 4, eval_every=0, **config.lora)
    with pytest.raises(ConfigError, match="a different base") as error:
        _train(other, workdir)
    assert "\n" not in str(error.value)
    assert {p: p.read_bytes() for p in snapshot} == snapshot
    assert latest_step(str(workdir)) == 2

    # Inference with the base gone: one line naming it; with the same weights elsewhere: it loads.
    shutil.move(str(moved), str(root / "base_elsewhere"))
    plain = tiny_config()
    with pytest.raises(WeightsError, match="base weights .*base_copy cannot be read") as error:
        load_for_inference(plain, str(workdir), _single())
    assert "\n" not in str(error.value)
    plain.init_from = str(root / "base_elsewhere")
    params, _ = load_for_inference(plain, str(workdir), _single())
    plain.init_from = f"hf:{hf_base}"
    with pytest.raises(WeightsError, match="a different base"):
        load_for_inference(plain, str(workdir), _single())

    # to_peft: not on a workdir without adapters; never over an existing adapter.
    assert convert(["to_peft", f"--workdir={trained_base}", f"--out={root / 'nope'}"]) == 2
    assert "is not a LoRA workdir" in capsys.readouterr().err.strip().splitlines()[-1]
    out = root / "over_copy_peft"
    assert convert(["to_peft", f"--workdir={workdir}", f"--out={out}"]) == 0
    written = (out / ADAPTER_CONFIG).read_bytes(), (out / ADAPTER_WEIGHTS).read_bytes()
    assert convert(["to_peft", f"--workdir={workdir}", f"--out={out}"]) == 2
    assert "already holds a PEFT adapter" in capsys.readouterr().err
    assert ((out / ADAPTER_CONFIG).read_bytes(), (out / ADAPTER_WEIGHTS).read_bytes()) == written
