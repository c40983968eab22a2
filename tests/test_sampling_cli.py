"""`python main.py --mode=sample` and `--mode=serve` end to end, in subprocesses, on a params directory."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest
from xla_env import xla_flags

from gptj.inference.sampler import Sampler, get_tokenizer
from gptj.weights.params_dir import load_params
from tests.sampling_utils import gpt2_vocab_config, write_params_dir

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "gptj", "configs", "tiny.py")


def env():
    values = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    values["XLA_FLAGS"] = xla_flags(1)
    return values


@pytest.fixture(scope="module")
def params_dir(tmp_path_factory):
    """GPT-J-6B's padded vocabulary (50400 ids), the padding ids made the raw argmax: greedy sampling
    crashed decoding them before they were masked."""
    return write_params_dir(str(tmp_path_factory.mktemp("weights") / "params"),
                            gpt2_vocab_config(vocab_size=50400), pad_bias=4.0)


def test_sample_mode_writes_json_lines_of_greedy_completions(params_dir, tmp_path):
    prompts = ["Once upon a time", "The meaning of life is"]
    prompt_file, output = tmp_path / "prompts.txt", tmp_path / "out.jsonl"
    prompt_file.write_text("\n".join(prompts) + "\n")
    cmd = [sys.executable, os.path.join(ROOT, "main.py"), f"--config={TINY}", f"--workdir={tmp_path / 'run'}",
           "--mode=sample", f"--prompt_file={prompt_file}", f"--output={output}", "--max_new_tokens=8",
           "--temperature=0", f"--config.init_from={params_dir}", "--config.mesh.data=1"]
    done = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    records = [json.loads(line) for line in output.read_text().splitlines()]
    assert [r["prompt"] for r in records] == prompts

    params, config = load_params(params_dir)
    tokenizer = get_tokenizer()
    want = Sampler(config, params, tokenizer=tokenizer).complete(prompts, max_new_tokens=8, temperature=0.0)
    for record, expected in zip(records, want):
        assert record["token_ids"] == expected.tokens and record["completion"] == expected.text
        assert tokenizer.decode(record["token_ids"]) == record["completion"]
        assert record["completion"] in done.stdout


def test_sample_mode_rejects_missing_prompt_with_one_line(params_dir, tmp_path):
    cmd = [sys.executable, os.path.join(ROOT, "main.py"), f"--config={TINY}", f"--workdir={params_dir}",
           "--mode=sample"]
    done = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    assert "error: give exactly one of --prompt or --prompt_file" in done.stderr
    assert "Traceback" not in done.stderr


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_serve_mode_answers_completions_until_interrupted(params_dir):
    port = free_port()
    cmd = [sys.executable, os.path.join(ROOT, "main.py"), f"--config={TINY}", f"--workdir={params_dir}",
           "--mode=serve", f"--port={port}", "--config.mesh.data=1", "--config.serve.max_new_tokens_limit=16",
           # Compiling every shape up front is test_engine's subject; here it would only add a minute.
           "--config.serve.warmup=False"]
    proc = subprocess.Popen(cmd, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 240
        while True:
            assert proc.poll() is None, proc.stdout.read()[-3000:]
            assert time.monotonic() < deadline, "server did not come up"
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.5)
        reply = httpx.post(url + "/v1/completions", json={"prompt": "Hello", "max_tokens": 4, "temperature": 0},
                           timeout=120)
        assert reply.status_code == 200 and reply.json()["usage"]["completion_tokens"] <= 4
        too_long = httpx.post(url + "/v1/completions", json={"prompt": "Hello", "max_tokens": 17}, timeout=30)
        assert too_long.status_code == 400
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
