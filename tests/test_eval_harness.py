"""gptj's lm-evaluation-harness model against the harness's own `hf` model, score for score.

One tiny random-weight GPT-J (real GPT-2 vocabulary, d_model 32, 2 layers,
context 32) is saved as a gptj params directory and exported with
`gptj.weights.formats.hf.write_hf` (plus a GPT-2 tokenizer) for `HFLM`. Four local
tasks written here exercise every request type: a LAMBADA-style last word
(loglikelihood, contexts longer than the context window), a multiple-choice
task, a rolling-perplexity task (documents several windows long) and a
generate_until task. The harness runs HFLM once (module fixture); gptj runs
on one device and on a 2x4 megatron mesh, and every score and every
per-example answer must agree.
"""

import json
import math
import os
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gptj.core.partitioning import Partitioner, make_mesh
from gptj.evaluation.harness import load_lm
from gptj.evaluation.harness_tasks import run_tasks
from gptj.model.transformer import GPTJConfig, abstract_params
from gptj.weights import params_dir as params_io
from gptj.weights.formats.hf import write_hf

TASKS = ["tiny_lastword", "tiny_choice", "tiny_rolling", "tiny_generate"]
MODEL = GPTJConfig(vocab_size=50257, vocab_pad_multiple=64, num_layers=2, d_model=32, num_heads=4, rotary_dim=4,
                   max_len=32)
PPL_METRICS = ("perplexity", "word_perplexity", "byte_perplexity", "bits_per_byte")


def _words(count, seed):
    """Real English words (CPython's bundled documentation), in runs of `count` from a seeded offset."""
    from pydoc_data.topics import topics

    words = " ".join(topics[k] for k in sorted(topics)[:40]).split()
    words = [w for w in words if w.isascii() and w.strip(".,:;()`'\"*-=") == w and w.isalpha()]
    start = np.random.default_rng(seed).integers(0, len(words) - count)
    return words[start:start + count]


def _write_tasks(folder):
    rng = np.random.default_rng(0)
    data = {
        # lengths 6..40 words: the longest contexts overflow the 32-token window (left truncation)
        "lastword": [{"text": " ".join(_words(int(n), 10 + i))} for i, n in enumerate(rng.integers(6, 40, 12))],
        "choice": [{"question": " ".join(_words(8, 100 + i)), "choices": [" ".join(_words(int(k), 200 + 4 * i + j))
                                                                         for j, k in enumerate(rng.integers(1, 4, 4))],
                    "label": int(rng.integers(0, 4))} for i in range(8)],
        # 60..110 words: three to five rolling windows each
        "rolling": [{"text": " ".join(_words(int(n), 300 + i))} for i, n in enumerate(rng.integers(60, 110, 4))],
        "generate": [{"question": " ".join(_words(int(n), 400 + i)), "answer": _words(1, 500 + i)[0]}
                     for i, n in enumerate(rng.integers(3, 30, 6))],
    }
    for name, rows in data.items():
        with open(os.path.join(folder, f"{name}.jsonl"), "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    common = "dataset_path: json\ndataset_name: null\ndataset_kwargs:\n  data_files:\n    test: {folder}/{name}.jsonl\n" \
             "test_split: test\n"
    specs = {
        "lastword": """\
            output_type: loglikelihood
            doc_to_text: "{{text.split(' ')[:-1]|join(' ')}}"
            doc_to_target: "{{' '+text.split(' ')[-1]}}"
            metric_list:
              - metric: perplexity
              - metric: acc
            """,
        "choice": """\
            output_type: multiple_choice
            doc_to_text: "Question: {{question}}\\nAnswer:"
            doc_to_choice: "{{choices}}"
            doc_to_target: "{{label}}"
            metric_list:
              - metric: acc
              - metric: acc_norm
            """,
        "rolling": """\
            output_type: loglikelihood_rolling
            doc_to_text: ""
            doc_to_target: "{{text}}"
            metric_list:
              - metric: word_perplexity
              - metric: byte_perplexity
              - metric: bits_per_byte
            """,
        "generate": """\
            output_type: generate_until
            doc_to_text: "Q: {{question}}\\nA:"
            doc_to_target: "{{answer}}"
            generation_kwargs:
              until: ["\\n\\n", "."]
              max_gen_toks: 10
              do_sample: false
            metric_list:
              - metric: exact_match
            """,
    }
    for name, spec in specs.items():
        with open(os.path.join(folder, f"tiny_{name}.yaml"), "w") as f:
            f.write(f"task: tiny_{name}\n" + common.format(folder=folder, name=name) + textwrap.dedent(spec))


def _random_params(config, seed=0):
    """Every weight random (LayerNorm scales around 1), padded vocabulary rows zero; numpy fp32."""
    import flax.linen as nn

    rng = np.random.default_rng(seed)
    shapes = nn.meta.unbox(abstract_params(config))

    def fill(path, leaf):
        name = "/".join(str(getattr(k, "key", k)) for k in path)
        value = 0.2 * rng.standard_normal(leaf.shape).astype(np.float32)
        return value + 1.0 if name.endswith("scale") else value

    params = jax.tree_util.tree_map_with_path(fill, shapes)
    params["wte"][config.vocab_size:] = 0
    params["lm_head_kernel"][:, config.vocab_size:] = 0
    params["lm_head_bias"][config.vocab_size:] = 0
    return params


def _build_workspace(root):
    from transformers import GPT2TokenizerFast

    from gptj.data.vocab import default_vocab_dir

    params = _random_params(MODEL)
    params_io.save_params(str(root / "params"), params, MODEL)
    write_hf(params, MODEL, str(root / "hf"))
    vocab = default_vocab_dir()
    GPT2TokenizerFast(vocab=os.path.join(vocab, "encoder.json"), merges=os.path.join(vocab, "vocab.bpe")) \
        .save_pretrained(str(root / "hf"))
    (root / "tasks").mkdir()
    _write_tasks(str(root / "tasks"))


def _run(lm, workspace):
    return run_tasks(lm, TASKS, include_path=str(workspace / "tasks"), bootstrap_iters=0, log_samples=True)


def _hflm(workspace):
    """The harness's own `hf` model (HFLM, CPU, fp32) on the exported weights."""
    import torch
    from lm_eval.models.huggingface import HFLM

    torch.set_num_threads(2)
    return HFLM(pretrained=str(workspace / "hf"), device="cpu", batch_size=4, dtype="float32")


@pytest.fixture(scope="session")
def shared(tmp_path_factory, worker_id):
    """(workspace, HFLM's results on the four tasks), built once per test run even under pytest-xdist.

    The workspace holds a gptj params directory, its HF export (with a GPT-2
    tokenizer) and the task YAMLs. xdist workers share them through a folder
    of the run's base temp directory, the first one building under a file lock.
    """
    from filelock import FileLock

    base = tmp_path_factory.getbasetemp()
    root = (base if worker_id == "master" else base.parent) / "gptj_eval_workspace"
    with FileLock(str(root) + ".lock"):
        if not (root / "hf_results.json").exists():
            root.mkdir(exist_ok=True)
            _build_workspace(root)
            results = _run(_hflm(root), root)
            keep = {"results": results["results"],
                    "samples": {task: [{k: row[k] for k in ("doc_id", "arguments", "resps")} for row in rows]
                                for task, rows in results["samples"].items()}}
            (root / "hf_results.json").write_text(json.dumps(keep, default=str))
    return root, json.loads((root / "hf_results.json").read_text())


@pytest.fixture(scope="module")
def workspace(shared):
    return shared[0]


@pytest.fixture(scope="module")
def hf_results(shared):
    return shared[1]


@pytest.fixture(scope="module")
def hflm(workspace):
    return _hflm(workspace)


def _gptj_results(workspace, data, model):
    partitioner = Partitioner(make_mesh(data, model, devices=jax.devices()[:data * model]), "megatron")
    lm = load_lm(str(workspace / "params"), partitioner, batch_size=4)
    return _run(lm, workspace), lm


@pytest.fixture(scope="module")
def one_device(workspace):
    """gptj's results on one device, and its LM."""
    return _gptj_results(workspace, 1, 1)


def _answers(results, task):
    """Per-example model answers, by doc id: [(logprob, greedy), ...] or [text]."""
    return {s["doc_id"]: [r for r in s["resps"]] for s in results["samples"][task]}


def _assert_same(ours, theirs):
    for task in TASKS:
        for key, value in theirs["results"][task].items():
            if key == "alias" or "_stderr" in key:
                continue
            metric = key.split(",")[0]
            if metric in PPL_METRICS:
                assert ours["results"][task][key] == pytest.approx(value, rel=1e-4), (task, key)
            else:
                assert ours["results"][task][key] == value, (task, key)
        mine, hf = _answers(ours, task), _answers(theirs, task)
        assert sorted(mine) == sorted(hf)
        for doc, responses in hf.items():
            for a, b in zip(mine[doc], responses):
                a, b = a[0], b[0]
                if isinstance(b, str):
                    assert a == b, (task, doc)
                elif isinstance(b, (list, tuple)):  # (logprob, is_greedy)
                    assert a[0] == pytest.approx(b[0], rel=1e-4, abs=1e-4) and a[1] == b[1], (task, doc)
                else:  # rolling: a summed logprob
                    assert a == pytest.approx(b, rel=1e-4), (task, doc)


def test_matches_hf_on_one_device(one_device, hf_results):
    ours, lm = one_device
    _assert_same(ours, hf_results)
    # the tasks did exercise left truncation and generation
    assert any(len(s["arguments"][0][0]) > 200 for s in hf_results["samples"]["tiny_lastword"])
    assert lm._sampler is not None


def test_matches_hf_on_2x4_mesh(workspace, hf_results):
    ours, _ = _gptj_results(workspace, 2, 4)
    _assert_same(ours, hf_results)


def test_greedy_flags_match_hf(one_device, hflm):
    """Continuations that are (or are one token off) the model's own greedy output: both models say so."""
    _, lm = one_device
    contexts = [lm.tok_encode(text) for text in ("The value of", "A target occurring in a", "Exceptions are")]
    greedy = [g.tokens for g in lm._sampler.generate(contexts, max_new_tokens=4)]
    assert all(len(g) == 4 for g in greedy)
    requests = [(("", ""), c, g) for c, g in zip(contexts, greedy)]
    requests += [(("", ""), c, g[:3] + [(g[3] + 1) % 50257]) for c, g in zip(contexts, greedy)]
    ours = lm._loglikelihood_tokens(requests)
    theirs = hflm._loglikelihood_tokens(requests, disable_tqdm=True)
    assert [flag for _, flag in ours] == [flag for _, flag in theirs] == [True] * 3 + [False] * 3
    np.testing.assert_allclose([lp for lp, _ in ours], [lp for lp, _ in theirs], rtol=1e-4)


def test_run_harness_returns_flat_metrics(one_device, workspace, hf_results, tmp_path):
    """The trainer's entry point: live LM in, `harness/<task>/<metric>` out, results JSON in workdir/eval."""
    from gptj.configs import base
    from gptj.evaluation.harness import run_harness

    _, lm = one_device
    config = base.get_config()
    config.eval.update(dict(harness_tasks=["tiny_choice"], include_path=str(workspace / "tasks"), bootstrap_iters=0))
    metrics = run_harness(lm, config, workdir=str(tmp_path), tag="step_7")
    assert metrics == {"harness/tiny_choice/acc": hf_results["results"]["tiny_choice"]["acc,none"],
                       "harness/tiny_choice/acc_norm": hf_results["results"]["tiny_choice"]["acc_norm,none"]}
    assert os.path.isfile(tmp_path / "eval" / "results_step_7.json")


def test_harness_hook_during_training(one_device, workspace, hf_results, tmp_path):
    """The trainer's hook: at every `every` steps and at the end, harness scores go to the metric writer."""
    from gptj.configs import base
    from gptj.evaluation.harness import HarnessHook
    from gptj.errors import EvalError

    class Writer:
        def __init__(self):
            self.scalars = []

        def write_scalars(self, step, scalars):
            self.scalars.append((step, dict(scalars)))

    _, lm = one_device
    config = base.get_config()
    config.eval.update(dict(harness_tasks=["tiny_choice"], include_path=str(workspace / "tasks"), bootstrap_iters=0,
                            batch_size=4))
    writer = Writer()
    # params_of picks what is scored (a LoRA run joins its frozen base and merges its adapters there).
    hook = HarnessHook(config, lm.model_config, lm.partitioner, writer, str(tmp_path), every=10,
                       params_of=lambda s: s["scored"])
    state = {"params": jax.tree_util.tree_map(jnp.zeros_like, lm.params), "scored": lm.params}
    for step in (5, 10, 12):
        hook.on_step(step, state, {})
    hook.on_end(12, state, "completed")
    acc = hf_results["results"]["tiny_choice"]["acc,none"]
    assert [(step, s["harness/tiny_choice/acc"]) for step, s in writer.scalars] == [(10, acc), (12, acc)]
    assert sorted(os.listdir(tmp_path / "eval")) == ["results_step_10.json", "results_step_12.json"]

    config.eval.harness_tasks = ["tiny_choise"]
    with pytest.raises(EvalError, match="tiny_choice"):  # a typo fails when the hook is built, naming the match
        HarnessHook(config, lm.model_config, lm.partitioner, writer, str(tmp_path), every=10)


def test_evaluate_end_to_end(workspace, hf_results, tmp_path):
    """`--mode=eval` on a 2x4 mesh: validation loss equals HF's cross-entropy on the same batches, the
    harness scores equal HFLM's, and the results JSON lands in workdir/eval/."""
    import torch
    from transformers import GPTJForCausalLM

    from gptj.configs import base
    from gptj.data import pipeline as data
    from gptj.data import tasks
    from gptj.evaluation.evaluate import evaluate

    config = base.get_config()
    config.init_from = str(workspace / "params")
    config.mesh.update(dict(data=2, model=4, rules="megatron"))
    config.data.update(dict(train_task="", val_tasks=["gptj_demo_validation"], seq_len=32))
    config.train.update(dict(batch_size=8, val_batches=2))
    config.eval.update(dict(harness_tasks=["tiny_choice", "tiny_rolling"], include_path=str(workspace / "tasks"),
                            bootstrap_iters=0, batch_size=4))
    out = evaluate(config, str(tmp_path))

    for task in ("tiny_choice", "tiny_rolling"):
        for key, value in hf_results["results"][task].items():
            if key.split(",")[0] in ("acc", "acc_norm"):
                assert out["harness"]["results"][task][key] == value
            elif key.split(",")[0] in PPL_METRICS:
                assert out["harness"]["results"][task][key] == pytest.approx(value, rel=1e-4)

    # independent reference: HF GPT-J's mean cross-entropy over the same validation batches
    tasks.register_tasks_for_config(config)
    model = GPTJForCausalLM.from_pretrained(str(workspace / "hf")).eval()
    nll = count = 0.0
    for batch in data.build_eval_iterators(config)["gptj_demo_validation"]():
        with torch.no_grad():
            logits = model(torch.tensor(np.array(batch["inputs"]), dtype=torch.long)).logits.float()
        losses = torch.nn.functional.cross_entropy(logits.transpose(1, 2), torch.tensor(np.array(batch["targets"]),
                                                   dtype=torch.long), reduction="none").numpy()
        nll += float((losses * batch["loss_mask"]).sum())
        count += float(batch["loss_mask"].sum())
    validation = out["validation"]["gptj_demo_validation"]
    assert validation["tokens"] == count == 2 * 8 * 32
    assert validation["loss"] == pytest.approx(nll / count, rel=1e-4)
    assert validation["perplexity"] == pytest.approx(math.exp(nll / count), rel=1e-4)

    (written,) = [f for f in os.listdir(tmp_path / "eval") if f.startswith("results_")]
    with open(tmp_path / "eval" / written) as f:
        record = json.load(f)
    assert record["validation"]["gptj_demo_validation"]["loss"] == validation["loss"]
    assert record["results"]["tiny_choice"]["acc,none"] == hf_results["results"]["tiny_choice"]["acc,none"]


