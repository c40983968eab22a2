"""The examples are real tasks built on the public API: they train, shard, checkpoint and resume."""

import ast
import importlib.util
import pathlib
import sys

import jax
import numpy as np
import pytest
from trainer_utils import read_scalars
from xla_env import compile_runs_heavy, xla_flags

ROOT = pathlib.Path(__file__).resolve().parents[1]
EXAMPLES = sorted((ROOT / "examples").glob("*.py"))


def _load(name):
    spec = importlib.util.spec_from_file_location(f"example_{name}", ROOT / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # flax modules resolve their annotations through sys.modules
    spec.loader.exec_module(module)
    return module


def _checkpoint_steps(workdir):
    from gptj import Checkpointer

    return Checkpointer(str(workdir), read_only=True).all_steps()


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_examples_import_only_the_public_api_and_stay_short(path):
    import gptj

    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("gptj"):
            assert node.module == "gptj", f"{path.name} imports from {node.module}"
            assert {a.name for a in node.names} <= set(gptj.__all__)
        if isinstance(node, ast.Import):
            assert not any(a.name.startswith("gptj.") for a in node.names), path.name
    assert len(path.read_text().splitlines()) <= 150


@pytest.fixture(scope="module")
def classifier():
    return _load("classifier")


def test_classifier_learns_and_its_losses_do_not_depend_on_the_mesh(classifier, tmp_path):
    """2x4 zero3 and 4x2 megatron train the same model: the same losses (dropout included) at every step."""
    runs = {}
    for name, (data, model, rules) in {"zero3": (2, 4, "zero3"), "megatron": (4, 2, "megatron")}.items():
        result = classifier.train(str(tmp_path / name), data, model, rules, steps=40)
        assert result.status == "completed" and result.step == 40
        runs[name] = result
    train_losses = {name: read_scalars(str(tmp_path / name / "tensorboard"), "train/loss") for name in runs}
    assert sorted(train_losses["zero3"]) == [10, 20, 30, 40]
    for step, loss in train_losses["zero3"].items():
        assert loss == pytest.approx(train_losses["megatron"][step], abs=1e-5)
    for (step_a, a), (step_b, b) in zip(runs["zero3"].validation, runs["megatron"].validation, strict=True):
        assert step_a == step_b
        assert a["validation"]["loss"] == pytest.approx(b["validation"]["loss"], abs=1e-5)
    first, last = runs["zero3"].validation[0][1]["validation"], runs["zero3"].validation[-1][1]["validation"]
    assert last["loss"] < first["loss"] - 0.2 and last["accuracy"] >= 0.8  # it learns the task
    params = jax.tree_util.tree_leaves(runs["zero3"].state["params"])
    sharded = [p for p in params if not p.sharding.is_fully_replicated]
    assert sharded, "zero3 left every parameter replicated"


def test_classifier_resumes_exactly_through_the_driver(classifier, tmp_path):
    straight = classifier.train(str(tmp_path / "straight"), 2, 4, "zero3", steps=40)
    classifier.train(str(tmp_path / "resumed"), 2, 4, "zero3", steps=20)
    resumed = classifier.train(str(tmp_path / "resumed"), 2, 4, "zero3", steps=40)
    assert resumed.step == 40
    for a, b in zip(jax.tree_util.tree_leaves(jax.device_get(straight.state["params"])),
                    jax.tree_util.tree_leaves(jax.device_get(resumed.state["params"]))):
        np.testing.assert_array_equal(a, b)
    assert _checkpoint_steps(tmp_path / "resumed") == [20, 40]


@pytest.fixture(scope="module")
def instruction_tuned(tmp_path_factory):
    """examples/instruction_tuning.py through main.py: trained on its pairs, then `--mode=sample` greedy of every
    pair's prompt and of one conversation in the gptj_sft chat format (earlier turn, EOS, next prompt)."""
    import json
    import os
    import subprocess

    tmp_path = tmp_path_factory.mktemp("instruction_tuning")
    pairs = [json.loads(line) for line in (ROOT / "examples" / "data" / "instructions.jsonl").read_text().splitlines()]
    conversation = pairs[0]["prompt"] + pairs[0]["completion"] + "<|endoftext|>" + pairs[1]["prompt"]
    (tmp_path / "prompts.txt").write_text("".join(p["prompt"] + "\n" for p in pairs) + conversation + "\n")
    workdir = tmp_path / "run"
    # A 1-layer, d_model 64 shrink on one CPU device (fake devices only slow a 2-core machine down).
    common = [sys.executable, str(ROOT / "main.py"), "--config=examples/instruction_tuning.py", f"--workdir={workdir}",
              "--config.model.num_layers=1", "--config.model.d_model=64", "--config.model.num_heads=2",
              "--config.model.rotary_dim=8"]
    train = common + ["--config.train.total_steps=50", "--config.train.eval_every=50",
                      "--config.optimizer.anneal_steps=50"]
    sample = common + ["--mode=sample", f"--prompt_file={tmp_path / 'prompts.txt'}",
                       f"--output={tmp_path / 'out.jsonl'}"]
    env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu",
               XLA_FLAGS=xla_flags(1, fast_compile=False))
    for cmd in (train, sample):
        done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
        assert done.returncode == 0, done.stderr[-3000:]
    outputs = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    return dict(workdir=workdir, common=common, env=env, pairs=pairs, outputs=outputs, tmp_path=tmp_path)


@pytest.mark.slow
def test_instruction_tuning_config_learns_its_pairs_and_greedy_sampling_reproduces_them(instruction_tuned):
    """Train on the pairs, then `--mode=sample` greedy returns every completion exactly, stopping at the
    learned EOS."""
    run = instruction_tuned
    accuracy = read_scalars(str(run["workdir"] / "tensorboard"), "val/gptj_sft_validation/accuracy")
    assert accuracy[0] < 0.5 and accuracy[50] == 1.0  # every completion token and EOS predicted
    outputs, pairs = run["outputs"][:len(run["pairs"])], run["pairs"]
    assert [(o["prompt"], o["completion"]) for o in outputs] == [(p["prompt"], p["completion"]) for p in pairs]


@pytest.mark.slow
def test_the_instruction_tuned_model_answers_chat_requests_as_sampling_does(instruction_tuned):
    """`--mode=serve` on the trained workdir: the OpenAI client's chat completions (the default gptj_sft
    template), plain and streamed, answer each pair as `--mode=sample` completes the rendered prompt, and a
    two-turn conversation as sampling continues its rendering; each answer ends on EOS ("stop")."""
    openai = pytest.importorskip("openai")
    sys.path.insert(0, str(ROOT))
    from benchmarks.serve_load import free_port, server

    run = instruction_tuned
    pairs, outputs = run["pairs"], run["outputs"]
    port = free_port()
    command = run["common"] + ["--mode=serve", f"--port={port}", "--config.serve.warmup=False"]
    with server(command, str(ROOT), run["env"], port, str(run["tmp_path"] / "serve.log"), startup_s=300) as url:
        api = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)
        asks = [[{"role": "user", "content": p["prompt"]}] for p in pairs]
        asks.append([{"role": "user", "content": pairs[0]["prompt"]},
                     {"role": "assistant", "content": pairs[0]["completion"]},
                     {"role": "user", "content": pairs[1]["prompt"]}])
        for messages, sampled in zip(asks, outputs, strict=True):
            reply = api.chat.completions.create(model="gptj", messages=messages, temperature=0, max_tokens=16)
            assert reply.choices[0].message.content == sampled["completion"], messages
            assert reply.choices[0].finish_reason == "stop"
            assert reply.usage.completion_tokens == len(sampled["token_ids"]) + 1  # the answer and its EOS
        chunks = list(api.chat.completions.create(model="gptj", messages=asks[4], temperature=0, max_tokens=16,
                                                  stream=True, stream_options={"include_usage": True}))
        content = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
        assert "".join(content) == outputs[4]["completion"] and len(content) == len(outputs[4]["token_ids"])
        assert chunks[-1].usage.completion_tokens == len(outputs[4]["token_ids"]) + 1


def test_custom_task_module_registers_and_trains_through_the_run(tmp_path, monkeypatch):
    """examples/custom_task.py: `data.module` registers the example's seqio tasks, whose batches are its sums,
    and a run trains on them; a module without `register_tasks`, or one that cannot be imported, is one line."""
    # The example's own config: 8 devices over the GPT-2 vocabulary, whose [512, 50304] logits make its steps
    # cost more unoptimised than compiling them at -O1 does (36 -> 21 CPU-s for this test; see xla_env).
    compile_runs_heavy(monkeypatch)
    from gptj import RunSettings
    from gptj.errors import ConfigError, DataError
    from gptj.data import pipeline, tasks
    from gptj.data.vocab import get_tokenizer
    from gptj.settings import validate
    from gptj.train import train_and_evaluate

    config = _load("custom_task").get_config()
    config.train.update(dict(total_steps=2, eval_every=2, ckpt_every=2, val_batches=1, log_every=1))
    settings = RunSettings.from_config(config)
    assert tasks.register_tasks_for_config(settings) == ["arithmetic_train", "arithmetic_validation"]
    batch = next(iter(pipeline.build_train_iterator(settings)))
    text = get_tokenizer().decode(np.asarray(batch["inputs"])[0])
    sums = [line for line in text.split("\n")[1:-1]]  # whole lines between the row's cut ends
    assert sums and all(eval(line.split("=")[0]) == int(line.split("=")[1]) for line in sums), text
    assert train_and_evaluate(config, str(tmp_path / "run")) == "completed"
    assert read_scalars(str(tmp_path / "run" / "tensorboard"), "val/arithmetic_validation/loss")

    (tmp_path / "no_function.py").write_text("X = 1\n")
    for module, message in ((str(tmp_path / "no_function.py"), "defines no register_tasks"),
                            (str(tmp_path / "missing.py"), "could not be imported"),
                            ("no_such_module_xyz", "could not be imported")):
        with pytest.raises(ConfigError, match=message) as error:
            validate(settings.override("data", module=module), "train")
        assert "\n" not in str(error.value)
    assert issubclass(DataError, ValueError)


@pytest.mark.slow
def test_preference_tuning_learns_the_preferred_answer_on_held_out_requests(tmp_path):
    """examples/preference_tuning.py, shrunk: after SFT greedy decoding refuses the held-out requests; after DPO
    the held-out pairs' rewards/accuracies exceed 0.9 (from 0 at the start) and greedy decoding complies with each
    request, as the chosen answers do and the rejected ones do not."""
    import json
    import os
    import re
    import subprocess
    import textwrap

    # A 1-layer, d_model 64 shrink on one CPU device (fake devices only slow a 2-core machine down), in a child
    # process of its own for that; DPO validates at steps 0, 10 and 20.
    driver = tmp_path / "driver.py"
    driver.write_text(textwrap.dedent(f"""
        import importlib.util, json, sys
        from gptj.core import runtime; runtime.start_process()  # as main.py does
        path = {str(ROOT / "examples" / "preference_tuning.py")!r}
        spec = importlib.util.spec_from_file_location("preference_tuning", path)
        example = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = example
        spec.loader.exec_module(example)

        def shrink(config):
            config.model.update(dict(num_layers=1, d_model=64, num_heads=2, rotary_dim=8))
            if config.train.objective == "dpo":
                config.train.update(dict(total_steps=20, eval_every=10))
                config.optimizer.anneal_steps = 20

        before, after = example.run({str(tmp_path)!r}, shrink)
        print(json.dumps({{"before": before, "after": after}}))
    """))
    env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu", XLA_FLAGS=xla_flags(1, fast_compile=False))
    done = subprocess.run([sys.executable, str(driver)], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    samples = json.loads(done.stdout.strip().splitlines()[-1])
    assert samples["before"] == [" No."] * 16  # SFT saw refusals twice as often as compliance
    assert all(re.fullmatch(r" Sure, I will \w+ the \w+\.", text) for text in samples["after"]), samples
    accuracy = read_scalars(str(tmp_path / "dpo" / "tensorboard"), "val/gptj_dpo_validation/rewards/accuracies")
    assert accuracy[0] == 0.0 and accuracy[20] > 0.9
    margins = read_scalars(str(tmp_path / "dpo" / "tensorboard"), "val/gptj_dpo_validation/rewards/margins")
    assert margins[20] > margins[10] > margins[0] == 0.0
