"""`python -m gptj.convert`: every subcommand end to end, and one-line errors with exit status 2."""

import os
import subprocess
import sys

import jax
import numpy as np
import pytest
import torch
from hf_utils import hf_logits, random_hf_model
from mtj_utils import TINY, random_shards, reference_logits, write_checkpoint
from transformers import GPTJForCausalLM

from gptj.convert.__main__ import main
from gptj.weights.formats import mtj
from gptj.weights.params_dir import load_params

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOKENS = np.array([[3, 77, 127, 64, 10, 0, 42]])


def _run_cli(*args):
    env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, "-m", "gptj.convert", *args], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=300)


def test_from_mtj_to_hf_slim(tmp_path):
    shards = random_shards(TINY, seed=4)
    model_dir = str(tmp_path / "mtj")
    write_checkpoint(model_dir, shards, TINY, step=7, with_opt=True, bf16=False)

    # The real command line once: the module runs, prints a summary, exits 0.
    done = _run_cli("from_mtj", f"--mtj_dir={model_dir}", f"--out={tmp_path / 'params'}")
    assert done.returncode == 0, done.stderr
    assert "wrote params directory" in done.stdout
    params, config = load_params(str(tmp_path / "params"))
    direct, _ = mtj.read_mtj(model_dir)
    jax.tree_util.tree_map(np.testing.assert_array_equal, params, direct)

    assert main(["to_hf", f"--workdir={tmp_path / 'params'}", f"--out={tmp_path / 'hf'}"]) == 0
    model = GPTJForCausalLM.from_pretrained(str(tmp_path / "hf")).eval()
    np.testing.assert_allclose(hf_logits(model, TOKENS)[0], reference_logits(shards, TINY, TOKENS[0]),
                               atol=2e-4, rtol=1e-4)

    assert main(["slim", f"--workdir={tmp_path / 'params'}", f"--out={tmp_path / 'slim'}"]) == 0
    slim_params, slim_config = load_params(str(tmp_path / "slim"))
    assert slim_config.param_dtype == "bfloat16"
    jax.tree_util.tree_map(lambda s, p: np.testing.assert_array_equal(s, p.astype("bfloat16")), slim_params, params)


def test_from_hf_round_trip(tmp_path):
    source = random_hf_model(vocab_size=90, n_embd=32, n_layer=2, n_head=4, rotary_dim=4, seed=5)
    source.save_pretrained(tmp_path / "hf_in")
    assert main(["from_hf", f"--hf_dir={tmp_path / 'hf_in'}", f"--out={tmp_path / 'params'}",
                 "--vocab_pad_multiple=64"]) == 0
    _, config = load_params(str(tmp_path / "params"))
    assert config.padded_vocab_size == 128
    assert main(["to_hf", f"--workdir={tmp_path / 'params'}", f"--out={tmp_path / 'hf_out'}"]) == 0
    back = GPTJForCausalLM.from_pretrained(str(tmp_path / "hf_out")).state_dict()
    for name, tensor in source.state_dict().items():
        if name in back:
            assert torch.equal(back[name], tensor), name


def test_bad_input_is_one_line_and_exit_2(tmp_path):
    done = _run_cli("from_mtj", f"--mtj_dir={tmp_path / 'missing'}", f"--out={tmp_path / 'out'}")
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1] == f"error: {tmp_path / 'missing'}: no such directory"

    (tmp_path / "params").mkdir()
    for argv in (["to_hf", f"--workdir={tmp_path / 'params'}", f"--out={tmp_path / 'o1'}"],
                 ["slim", f"--workdir={tmp_path / 'params'}", f"--out={tmp_path / 'o2'}"],
                 ["from_hf", f"--hf_dir={tmp_path / 'params'}", f"--out={tmp_path / 'o3'}"]):
        assert main(argv) == 2
    with pytest.raises(SystemExit) as usage:
        main(["from_mtj", "--out=x"])  # --mtj_dir missing: argparse's usage error, also status 2
    assert usage.value.code == 2
