"""Helpers for the server tests: a tiny GPT-2-vocabulary model and a uvicorn server on a free port."""

from __future__ import annotations

import contextlib
import functools
import socket
import tempfile
import threading
import time
import types

from gptj.inference.sampler import Sampler, get_tokenizer
from tests.sampling_utils import GPT2_VOCAB_SIZE, gpt2_vocab_config, random_hf_gptj, random_params
from xla_env import run_heavy_partitioner

# The HF-parity model of the engine tests: GPT-J-6B's padded vocabulary, a context long enough for
# chunked prefill, and padding ids whose output bias makes them the raw argmax (only masking keeps
# them out, in gptj and, through suppress_tokens, in HF).
PADDED_VOCAB, PARITY_MAX_LEN, PAD_BIAS = 50400, 256, 4.0


def serve_config(**changes):
    """A `config.serve`-like section with test-sized limits."""
    values = dict(host="127.0.0.1", port=0, max_batch_size=8, max_queue=64, prefill_chunk=32, decode_steps=4,
                  warmup=False, max_new_tokens_limit=64, model_name="gptj-test", chat_template="gptj_sft",
                  stream_interval=1, adapters="", max_adapters=0, max_adapter_rank=0, prefix_cache_gib=0.0,
                  prefix_block_size=64)
    values.update(changes)
    return types.SimpleNamespace(**values)


def tiny_sampler(seed: int = 0) -> Sampler:
    """A random tiny model over the real GPT-2 vocabulary, with the real tokenizer."""
    config = gpt2_vocab_config()
    return Sampler(config, random_params(config, seed=seed, std=0.2), tokenizer=get_tokenizer())


@functools.lru_cache(maxsize=1)
def padded_vocab_pair():
    """(HF GPTJForCausalLM, gptj Sampler with the GPT-2 tokenizer) over the same random weights (fp32, cached).

    torch runs on one thread: the tests share two cores with XLA, and torch's
    spinning worker threads slow a tiny model's generate ten-fold there.
    """
    import torch

    from gptj.weights.formats.hf import read_hf

    torch.set_num_threads(1)
    hf_dir = tempfile.mkdtemp(prefix="gptj-parity-")
    hf_model = random_hf_gptj(hf_dir, vocab_size=PADDED_VOCAB, max_len=PARITY_MAX_LEN, std=0.2, pad_bias=PAD_BIAS)
    params, config = read_hf(hf_dir, vocab_pad_multiple=64)
    return hf_model, Sampler(config, params, run_heavy_partitioner(), tokenizer=get_tokenizer())


def hf_greedy(hf_model, prompt: list[int], new_tokens: int) -> list[int]:
    """HF `generate` greedy continuation with the padding ids suppressed, as gptj masks them.

    Like gptj it stops at EOS (50256), which it leaves out of the result.
    """
    import torch

    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = hf_model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=new_tokens,
                                pad_token_id=0, eos_token_id=GPT2_VOCAB_SIZE - 1,
                                suppress_tokens=list(range(GPT2_VOCAB_SIZE, hf_model.config.vocab_size)))
    tokens = out[0, len(prompt):].tolist()
    return tokens[:tokens.index(GPT2_VOCAB_SIZE - 1)] if GPT2_VOCAB_SIZE - 1 in tokens else tokens


@contextlib.contextmanager
def running(app):
    """Runs `app` with uvicorn on 127.0.0.1:<free port> in a thread; yields the base URL; shuts it down."""
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("test server did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=60)
        sock.close()
