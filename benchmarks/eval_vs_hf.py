"""lm-evaluation-harness loglikelihood requests/s: gptj's LM against the harness's own `hf` model (HFLM).

    python benchmarks/eval_vs_hf.py [--quick] [--json PATH] [--requests N] [--batch_size 8]

Both models hold the same random weights (the CPU bench model of
benchmarks/common.py: 4 layers, d_model 512, vocab 50400, context 256; gptj
params exported with gptj.weights.formats.hf.write_hf for HFLM), run on the same cores
in the same process, one after the other, with the same batch size. The
requests are LAMBADA-shaped: a context of 48 to 240 tokens of English text and
a one-word continuation, scored through the harness's public
`LM.loglikelihood`, so tokenisation, batching and the harness's bookkeeping are
timed too. Before timing, the two models' answers are compared (log-probs and
greedy flags). Figures are medians of timed passes over all requests, the two
models alternating, after a warm-up pass (which includes gptj's compiles; its
cold time is reported too).

Where gptj's speed comes from: one compiled program per length bucket instead
of eager PyTorch, per-row sums coming back instead of [batch, length, vocab]
log-softmax tensors, and the vocabulary head applied only at the positions a
request scores (for a one-word continuation, 1-3 of ~150 positions), where the
`hf` model computes it at every position. The limit column counts only the
FLOPs the answers need, so it credits neither model with that saving.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from benchmarks.common import (BENCH_MODEL, Timing, add_common_args, emit_results, matmul_peak_flops,  # noqa: E402
                               result, time_runs)
from gptj.scaling import forward_flops_per_token  # noqa: E402


def _requests(count: int, tokenizer, seed: int = 0):
    """LAMBADA-shaped Instances: English context of 48..240 tokens, then ' <word>'."""
    from pydoc_data.topics import topics

    import numpy as np
    from lm_eval.api.instance import Instance

    words = " ".join(topics[k] for k in sorted(topics)).split()
    words = [w for w in words if w.isascii() and w.isalpha()]
    rng = np.random.default_rng(seed)
    out = []
    for i in range(count):
        target_tokens = int(rng.integers(48, 241))
        start = int(rng.integers(0, len(words) - 400))
        context = " ".join(words[start:start + target_tokens])
        ids = tokenizer.encode(context)[:target_tokens]
        context = tokenizer.decode(ids).rstrip()
        continuation = " " + words[start + 400 - 1]
        out.append(Instance("loglikelihood", {}, (context, continuation), i))
    return out


def _build(workdir: str, batch_size: int):
    """The same random weights as a GPTJLM (one device) and as an HFLM (CPU, fp32)."""
    import flax.linen as nn
    import jax
    import numpy as np
    from lm_eval.models.huggingface import HFLM
    from transformers import GPT2TokenizerFast

    from gptj.core.partitioning import Partitioner, make_mesh
    from gptj.data.vocab import default_vocab_dir
    from gptj.evaluation.harness import GPTJLM, get_tokenizer
    from gptj.model.transformer import GPTJ, GPTJConfig
    from gptj.weights.formats.hf import write_hf

    config = GPTJConfig(**BENCH_MODEL)
    params = nn.meta.unbox(jax.jit(lambda: GPTJ(config).init(jax.random.PRNGKey(0),
                                                              np.zeros((1, 1), np.int32))["params"])())
    hf_dir = os.path.join(workdir, "hf")
    write_hf(jax.tree_util.tree_map(np.asarray, params), config, hf_dir)
    vocab = default_vocab_dir()
    GPT2TokenizerFast(vocab=os.path.join(vocab, "encoder.json"), merges=os.path.join(vocab, "vocab.bpe")) \
        .save_pretrained(hf_dir)
    partitioner = Partitioner(make_mesh(1, 1, devices=jax.devices()[:1]), "megatron")
    ours = GPTJLM(params, config, partitioner, get_tokenizer(), batch_size=batch_size)
    theirs = HFLM(pretrained=hf_dir, device="cpu", batch_size=batch_size, dtype="float32")
    return config, ours, theirs


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser)
    parser.add_argument("--requests", type=int, default=0, help="requests per pass (default 32 quick, 128 full)")
    parser.add_argument("--batch_size", type=int, default=8, help="rows per forward pass, both models")
    parser.add_argument("--runs", type=int, default=0, help="timed passes (default 2 quick, 3 full)")
    args = parser.parse_args(argv)
    count = args.requests or (32 if args.quick else 128)
    runs = args.runs or (2 if args.quick else 3)

    import numpy as np
    import torch

    logging.getLogger("lm_eval").setLevel(logging.ERROR)
    threads = os.cpu_count() or 1
    torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory() as workdir:
        config, ours, theirs = _build(workdir, args.batch_size)
        requests = _requests(count, ours.tokenizer)

        start = time.perf_counter()
        mine = ours.loglikelihood(requests, disable_tqdm=True)
        cold = time.perf_counter() - start
        hf = theirs.loglikelihood(requests, disable_tqdm=True)
        diff = max(abs(a[0] - b[0]) for a, b in zip(mine, hf))
        flags = sum(a[1] == b[1] for a, b in zip(mine, hf))

        # Alternating passes, so that load from other processes falls on both models alike.
        ours_runs, hf_runs = [], []
        for _ in range(runs):
            ours_runs += time_runs(lambda: ours.loglikelihood(requests, disable_tqdm=True), runs=1, warmup=0).runs
            hf_runs += time_runs(lambda: theirs.loglikelihood(requests, disable_tqdm=True), runs=1, warmup=0).runs
        t_ours, t_hf = Timing(tuple(ours_runs)), Timing(tuple(hf_runs))

    # The limit: the FLOPs the answers need, at the machine's fp32 matmul peak: every layer on every
    # token, the vocabulary head only where a continuation token is scored.
    head_flops = 2.0 * config.d_model * config.padded_vocab_size
    flops, lengths = 0.0, []
    for context, continuation in (r.args for r in requests):
        context_ids, continuation_ids = ours._encode_pair(context, continuation)
        length = len(context_ids) + len(continuation_ids) - 1
        lengths.append(length)
        flops += length * (forward_flops_per_token(config, length) - head_flops) + len(continuation_ids) * head_flops
    limit = matmul_peak_flops() / (flops / count)
    mean_tokens = float(np.mean(lengths))
    shape = (f"{count} LAMBADA-shaped requests (mean {mean_tokens:.0f} tokens), batch {args.batch_size}, "
             f"{threads} threads, bench model {BENCH_MODEL['num_layers']}L d{BENCH_MODEL['d_model']}")
    rows = [
        result("eval loglikelihood requests/s", "requests/s", count / t_ours.median, peer=count / t_hf.median,
               peer_name="lm-eval HFLM (PyTorch)", limit=limit, spread=t_ours.spread, peer_spread=t_hf.spread,
               note=f"{shape}; answers agree: max |logprob diff| {diff:.2e}, greedy flags {flags}/{count} equal; "
                    "limit = the FLOPs the answers need (all layers on every token, the head at scored tokens) "
                    "at the fp32 matmul peak"),
        result("eval loglikelihood requests/s, cold (compiles included)", "requests/s", count / cold,
               peer=count / t_hf.median, peer_name="lm-eval HFLM (PyTorch, warm)",
               note="gptj's first pass over the requests, every length bucket compiled on the way"),
    ]
    emit_results(args.json, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
