"""lm-evaluation-harness's `local-completions` model, pointed at the server, scores a local loglikelihood task."""

import json

import numpy as np
import pytest

from gptj.inference.server import build_app
from tests.serve_utils import running, serve_config, tiny_sampler

lm_eval = pytest.importorskip("lm_eval")

DOCS = [
    {"context": "The capital of France is", "continuation": " Paris"},
    {"context": "One, two, three,", "continuation": " four, five"},
    {"context": "Water boils at one hundred", "continuation": " degrees"},
    {"context": "def add(a, b):", "continuation": "\n    return a + b"},
    {"context": "She opened the door and", "continuation": " walked in."},
]

TASK_YAML = """\
task: gptj_serve_tiny
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: loglikelihood
doc_to_text: "{{{{context}}}}"
doc_to_target: "{{{{continuation}}}}"
target_delimiter: ""
metric_list:
  - metric: perplexity
    aggregation: perplexity
    higher_is_better: false
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tasks")
    data = folder / "docs.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in DOCS))
    (folder / "gptj_serve_tiny.yaml").write_text(TASK_YAML.format(data=data))
    return str(folder)


def hf_tokenizer_dir(path, tokenizer):
    """A local HF tokenizer directory for the same GPT-2 BPE (for `tokenizer_backend=huggingface`)."""
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer._tok, eos_token="<|endoftext|>",
                                   bos_token="<|endoftext|>")
    fast.save_pretrained(path)
    return str(path)


@pytest.mark.parametrize("backend", ["remote", "huggingface"])
def test_local_completions_scores_a_loglikelihood_task(task_dir, backend, tmp_path):
    from lm_eval.tasks import TaskManager

    sampler = tiny_sampler()
    tok = sampler.tokenizer
    model_args = {"model": "gptj-test", "num_concurrent": 1, "max_retries": 1, "max_length": 120,
                  "tokenized_requests": True}
    if backend == "huggingface":
        model_args.update(tokenizer_backend="huggingface", tokenizer=hf_tokenizer_dir(tmp_path / "tok", tok))
    # "remote" is auto-detected from the server's /tokenizer_info and /tokenize endpoints.
    with running(build_app(sampler, tok, serve_config())) as url:
        model_args["base_url"] = url + "/v1/completions"
        results = lm_eval.simple_evaluate(
            model="local-completions", model_args=model_args, tasks=["gptj_serve_tiny"], batch_size=4,
            task_manager=TaskManager(include_path=task_dir), log_samples=True)
    samples = sorted(results["samples"]["gptj_serve_tiny"], key=lambda s: s["doc_id"])
    assert len(samples) == len(DOCS)
    # Independent expectation: the sampler's own forward over the tokens lm-eval scores (it encodes
    # context + continuation together and takes the continuation as what follows the context's tokens).
    sequences = [tok.encode(d["context"] + d["continuation"]) for d in DOCS]
    context_lengths = [len(tok.encode(d["context"])) for d in DOCS]
    scores = sampler.score(sequences)
    for sample, score, ctx in zip(samples, scores, context_lengths):
        loglik, is_greedy = sample["resps"][0][0]
        assert loglik == pytest.approx(float(np.sum(score.token_logprobs[ctx:])), abs=1e-4)
        assert bool(is_greedy) == all(score.greedy[ctx:])
    metrics = results["results"]["gptj_serve_tiny"]
    assert np.isfinite(metrics["perplexity,none"]) and metrics["perplexity,none"] > 1
