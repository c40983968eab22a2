"""Evaluation is offline: an unknown task, or a task whose data set is not on the machine, stops with one
paragraph that says how to point the task at local files, never a traceback from `datasets`."""

import os
import subprocess
import sys
import textwrap

import pytest

from gptj.evaluation.harness_tasks import cached_index, flatten_metrics, load_tasks
from gptj.errors import EvalError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _assert_one_paragraph(message):
    assert "\n" not in message and "Traceback" not in message
    assert "--include_path" in message and "dataset_path: json" in message and "data_files" in message


def _write_yaml(folder, name, body):
    folder.mkdir(exist_ok=True)
    (folder / f"{name}.yaml").write_text(f"task: {name}\n" + body)


_TASK_BODY = textwrap.dedent("""\
    test_split: test
    output_type: loglikelihood
    doc_to_text: "{{text}}"
    doc_to_target: " x"
    metric_list:
      - metric: acc
    """)


def test_unknown_task_names_close_matches():
    with pytest.raises(EvalError) as info:
        load_tasks(["lambada_opnai"])
    message = str(info.value)
    _assert_one_paragraph(message)
    assert "'lambada_opnai'" in message and "lambada_openai" in message  # the close match


def test_the_task_index_is_cached_until_a_yaml_changes(tmp_path):
    """lm-eval's index of a folder of YAMLs is built once, read back equal, and built anew when a YAML changes,
    when one is added, and when the cached file is damaged."""
    from lm_eval.tasks._index import TaskIndex

    tasks, cache = tmp_path / "tasks", str(tmp_path / "cache")
    _write_yaml(tasks, "first", "dataset_path: json\n" + _TASK_BODY)
    _write_yaml(tasks, "second", "dataset_path: json\n" + _TASK_BODY)
    builds = []

    def build(paths):
        builds.append(paths)
        return TaskIndex.build(paths)

    def index():
        found = cached_index(str(tasks), build, cache)
        return {name: (entry.kind, str(entry.yaml_path), entry.cfg) for name, entry in found.items()}

    first = index()
    assert sorted(first) == ["first", "second"] and len(builds) == 1
    assert index() == first and len(builds) == 1  # read from the cache
    (tasks / "second.yaml").write_text((tasks / "second.yaml").read_text().replace("acc", "acc_norm"))
    changed = index()
    assert len(builds) == 2 and changed["second"][2]["metric_list"] == [{"metric": "acc_norm"}]
    _write_yaml(tasks, "third", "dataset_path: json\n" + _TASK_BODY)
    assert sorted(index()) == ["first", "second", "third"] and len(builds) == 3
    (cached,) = os.listdir(cache)  # each build replaced the file of the folder's previous state
    with open(os.path.join(cache, cached), "wb") as f:
        f.write(b"not a pickle")
    assert sorted(index()) == ["first", "second", "third"] and len(builds) == 4


def test_hub_dataset_not_on_machine(tmp_path):
    _write_yaml(tmp_path / "tasks", "hub_only", "dataset_path: gptj-tests/no-such-dataset\n" + _TASK_BODY)
    with pytest.raises(EvalError) as info:
        load_tasks(["hub_only"], str(tmp_path / "tasks"))
    message = str(info.value)
    _assert_one_paragraph(message)
    assert "'hub_only'" in message and "gptj-tests/no-such-dataset" in message and "offline" in message


def test_local_data_file_missing(tmp_path):
    missing = tmp_path / "nowhere" / "test.jsonl"
    _write_yaml(tmp_path / "tasks", "local_missing",
                f"dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {missing}\n" + _TASK_BODY)
    with pytest.raises(EvalError) as info:
        load_tasks(["local_missing"], str(tmp_path / "tasks"))
    _assert_one_paragraph(str(info.value))
    assert "'local_missing'" in str(info.value)


def test_local_yaml_replaces_builtin_task(tmp_path):
    """The route the messages describe: a built-in task name, redefined under include_path over local JSON lines."""
    data = tmp_path / "lambada.jsonl"
    data.write_text('{"text": "a local example"}\n')
    _write_yaml(tmp_path / "tasks", "lambada_openai",
                f"dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\n" + _TASK_BODY)
    _, tasks = load_tasks(["lambada_openai"], str(tmp_path / "tasks"))
    assert [t.task_name for t in tasks] == ["lambada_openai"]
    assert [doc["text"] for doc in tasks[0].test_docs()] == ["a local example"]


def test_include_path_must_be_a_folder(tmp_path):
    with pytest.raises(EvalError, match="not a folder"):
        load_tasks(["anything"], str(tmp_path / "missing"))


def test_main_eval_unknown_task_prints_paragraph_not_traceback(tmp_path):
    """`main.py --mode=eval` with a wrong task name: exit status 1, the paragraph on stderr, no traceback."""
    env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "main.py"), "--config", os.path.join(ROOT, "gptj/configs/tiny.py"),
         "--workdir", str(tmp_path / "run"), "--mode=eval", "--tasks=no_such_task_anywhere"],
        capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, proc.stderr[-2000:]
    _assert_one_paragraph(lines[0])
    assert "no_such_task_anywhere" in lines[0]


def test_flatten_metrics_names():
    results = {"results": {"lambada_openai": {"alias": "lambada_openai", "sample_len": 8, "acc,none": 0.5, "acc_stderr,none": 0.1,
                                              "perplexity,none": 4.0, "exact_match,strict-match": 1.0}},
               "groups": {"g": {"acc,none": 0.25}}}
    assert flatten_metrics(results) == {"harness/lambada_openai/acc": 0.5, "harness/lambada_openai/perplexity": 4.0,
                                        "harness/lambada_openai/exact_match_strict-match": 1.0, "harness/g/acc": 0.25}


def test_validation_longer_than_context_is_refused():
    from gptj.configs import base
    from gptj.evaluation.evaluate import validation_metrics
    from gptj.model.transformer import GPTJConfig

    config = base.get_config()
    config.data.update(dict(val_tasks=["gptj_demo_validation"], seq_len=64))
    with pytest.raises(EvalError, match="data.seq_len=64 .* context of 32; pass --config.data.seq_len=32"):
        validation_metrics(config, None, GPTJConfig(max_len=32, vocab_size=64, num_layers=1, d_model=16,
                                                    num_heads=2, rotary_dim=4), None)


def test_harness_tasks_during_training_are_checked_before_anything_is_built(tmp_path):
    """A wrong task name with eval.during_training stops `--mode=train` at validation, not at step N."""
    from gptj.configs import tiny
    from gptj.settings import validate
    from gptj.errors import ConfigError

    config = tiny.get_config()
    config.eval.during_training = True
    with pytest.raises(ConfigError, match="eval.harness_tasks is empty"):
        validate(config, "train")
    config.eval.harness_tasks = ["no_such_task_anywhere"]
    with pytest.raises(ConfigError, match="eval: .*no_such_task_anywhere"):
        validate(config, "train")
