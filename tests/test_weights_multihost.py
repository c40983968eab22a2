"""Two processes x 4 CPU devices on a 2x4 zero3 mesh: each reads only its own slices of an HF checkpoint.

zero3 splits every matrix's embed axis over `data` (one process's devices) and heads, mlp
and vocabulary over `model`, so each process owns about half of the weights. Each process
places the HF weights on the global mesh (`Weights.place`) and reports the bytes it took
from the safetensors files: exactly the union of the boxes its own devices hold (vocabulary
padding is read from nowhere), about half of the checkpoint. The logits of the two-process
model equal those of the same checkpoint loaded by this single process onto the same mesh.
"""

import json
import os
import socket
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest
from hf_utils import random_hf_model
from xla_env import xla_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOKENS = np.random.RandomState(0).randint(0, 250, size=(4, 12)).astype(np.int32)

CHILD = """
import json, math, sys
import jax
import numpy as np
from jax.experimental import multihost_utils

from gptj.core import runtime
runtime.initialize({coordinator!r}, 2, int(sys.argv[1]), timeout_s=120)

from gptj.weights.formats import hf
from gptj.model.transformer import GPTJ
from gptj.core.partitioning import Partitioner, make_mesh, place
from gptj.weights.source import param_shardings

partitioner = Partitioner(make_mesh(data=2, model=4), "zero3")
params, config, files = hf.open_hf({hf_dir!r}, vocab_pad_multiple=8)
shardings = param_shardings(config, partitioner)
placed = place(params, shardings)

# What this process's devices hold: each distinct box once, the rows past the vocabulary left out.
expected = 0
for path, leaf in jax.tree_util.tree_leaves_with_path(shardings):
    name = "/".join(str(k.key) for k in path)
    lazy = dict(jax.tree_util.tree_leaves_with_path(params))[path]
    boxes = {{tuple(s.indices(n)[:2] for s, n in zip(index, lazy.shape))
             for index in leaf.addressable_devices_indices_map(lazy.shape).values()}}
    vocab_axis = {{"wte": 0, "lm_head_kernel": 1, "lm_head_bias": 0}}.get(name)
    for box in boxes:
        box = list(box)
        if vocab_axis is not None:
            box[vocab_axis] = (box[vocab_axis][0], min(box[vocab_axis][1], config.vocab_size))
        expected += math.prod(max(0, b - a) for a, b in box) * 4

tokens = np.asarray({tokens!r}, np.int32)
batch = partitioner.batch_sharding(2)
inputs = jax.make_array_from_callback(tokens.shape, batch, lambda index: tokens[index])
forward = partitioner.jit(lambda p, t: GPTJ(config).apply({{"params": p}}, t), in_shardings=(shardings, batch))
logits = multihost_utils.process_allgather(forward(placed, inputs), tiled=True)
if jax.process_index() == 0:
    np.save({logits_path!r}, np.asarray(logits))
checkpoint = sum(4 * math.prod(shape) for _, _, shape in hf.hf_tensors(config).values())
print(json.dumps({{"process": jax.process_index(), "bytes_read": files.bytes_read, "expected": expected,
                  "checkpoint": checkpoint}}), flush=True)
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_each_process_reads_only_its_own_slices(tmp_path):
    hf_dir = tmp_path / "hf"
    random_hf_model(vocab_size=250, n_embd=64, n_layer=2, n_head=8, rotary_dim=4, seed=5).save_pretrained(hf_dir)
    script = tmp_path / "child.py"
    logits_path = str(tmp_path / "logits.npy")
    script.write_text(textwrap.dedent(CHILD.format(coordinator=f"127.0.0.1:{_free_port()}", hf_dir=str(hf_dir),
                                                   tokens=TOKENS.tolist(), logits_path=logits_path)))
    env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3",
               XLA_FLAGS=xla_flags(4))
    children = [subprocess.Popen([sys.executable, str(script), str(i)], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True) for i in range(2)]
    reports = []
    for child in children:
        out, err = child.communicate(timeout=600)
        assert child.returncode == 0, err[-3000:]
        reports.append(json.loads([line for line in out.splitlines() if line.startswith("{")][-1]))

    assert sorted(r["process"] for r in reports) == [0, 1]
    for report in reports:
        assert report["bytes_read"] == report["expected"], report
        # About half: all but the small vectors that zero3 leaves whole (biases of the mlp and vocabulary).
        assert 0.45 < report["bytes_read"] / report["checkpoint"] < 0.6, report

    from gptj.core.partitioning import Partitioner, make_mesh
    from gptj.model.transformer import GPTJ
    from gptj.weights.formats import hf
    from gptj.weights.source import open_weights, param_shardings

    partitioner = Partitioner(make_mesh(data=2, model=4), "zero3")
    weights = open_weights(f"hf:{hf_dir}", 8)
    shardings = param_shardings(weights.config, partitioner)
    params = weights.place(shardings)
    forward = partitioner.jit(lambda p, t: GPTJ(weights.config).apply({"params": p}, t),
                              in_shardings=(shardings, partitioner.batch_sharding(2)))
    single = np.asarray(forward(params, TOKENS))
    np.testing.assert_allclose(np.load(logits_path), single, rtol=1e-5, atol=1e-5)
    assert jax.process_count() == 1 and hf.read_hf_model_config(str(hf_dir), 8) == weights.config
