"""Helpers for the server tests: a tiny GPT-2-vocabulary model and a uvicorn server on a free port."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
import types

from gptj.sampling import Sampler, get_tokenizer
from tests.sampling_utils import gpt2_vocab_config, random_params


def serve_config(**changes):
    """A `config.serve`-like section with test-sized limits."""
    values = dict(host="127.0.0.1", port=0, max_batch_size=8, max_queue=64, prefill_chunk=32, decode_steps=4,
                  warmup=False, max_new_tokens_limit=64, model_name="gptj-test")
    values.update(changes)
    return types.SimpleNamespace(**values)


def tiny_sampler(seed: int = 0) -> Sampler:
    """A random tiny model over the real GPT-2 vocabulary, with the real tokenizer."""
    config = gpt2_vocab_config()
    return Sampler(config, random_params(config, seed=seed, std=0.2), tokenizer=get_tokenizer())


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
