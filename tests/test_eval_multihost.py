"""Several hosts: two processes (4 fake CPU devices each, joined by jax.distributed) form one 2x4 mesh whose
data axis spans the processes. Each asks the same harness requests (loglikelihood with left truncation,
loglikelihood_rolling over several windows, generate_until); both must get identical answers, equal to
those of this single process on one device.

Run as a script, this file is the worker: `python test_eval_multihost.py PORT PROCESS_ID PARAMS OUT`.
"""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
from xla_env import xla_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_WORDS = ("the value of a target occurring in an assignment is evaluated before the exception clause "
          "when the module imports a name from the package and the interpreter prints a stack").split()


def _requests():
    from lm_eval.api.instance import Instance

    rng = np.random.default_rng(0)
    text = lambda n: " ".join(rng.choice(_WORDS, n))
    loglikelihood = [Instance("loglikelihood", {}, (text(n), " " + text(k)), i)
                     for i, (n, k) in enumerate([(3, 1), (12, 2), (45, 1), (8, 5), (20, 3)])]  # 45 words > 32 tokens
    rolling = [Instance("loglikelihood_rolling", {}, (text(n),), i) for i, n in enumerate([10, 70])]
    generate = [Instance("generate_until", {}, (text(n), {"until": ["."], "max_gen_toks": 6}), i)
                for i, n in enumerate([4, 15, 9])]
    return loglikelihood, rolling, generate


def _answers(lm) -> dict:
    loglikelihood, rolling, generate = _requests()
    return {"loglikelihood": [list(a) for a in lm.loglikelihood(loglikelihood, disable_tqdm=True)],
            "rolling": lm.loglikelihood_rolling(rolling, disable_tqdm=True),
            "generate": lm.generate_until(generate, disable_tqdm=True)}


def _worker(port: str, process_id: str, params_dir: str, out: str) -> None:
    sys.path.insert(0, ROOT)
    from gptj.core import runtime
    from gptj.core.partitioning import Partitioner, make_mesh
    from gptj.evaluation.harness import load_lm

    runtime.initialize(f"127.0.0.1:{port}", 2, int(process_id), timeout_s=120)
    import jax

    assert jax.device_count() == 8 and jax.local_device_count() == 4
    lm = load_lm(params_dir, Partitioner(make_mesh(2, 4), "megatron"), batch_size=4)
    with open(out, "w") as f:
        json.dump(_answers(lm), f)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_hosts_get_the_same_answers_as_one(tmp_path):
    import flax.linen as nn
    import jax

    from gptj.core.partitioning import Partitioner, make_mesh
    from gptj.evaluation.harness import load_lm
    from gptj.model.transformer import GPTJ, GPTJConfig
    from gptj.weights import params_dir as params_io

    config = GPTJConfig(vocab_size=50257, vocab_pad_multiple=64, num_layers=2, d_model=32, num_heads=4,
                        rotary_dim=4, max_len=32, init_std=0.3)
    params = nn.meta.unbox(GPTJ(config).init(jax.random.PRNGKey(1), np.zeros((1, 1), np.int32))["params"])
    params_io.save_params(str(tmp_path / "params"), jax.tree_util.tree_map(np.asarray, params), config)

    env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3",
               XLA_FLAGS=xla_flags(4))
    port = str(_free_port())
    procs = [subprocess.Popen([sys.executable, __file__, port, str(i), str(tmp_path / "params"),
                               str(tmp_path / f"answers_{i}.json")], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for i in range(2)]
    # One device in this process meanwhile: the reference answers.
    single = load_lm(str(tmp_path / "params"), Partitioner(make_mesh(1, 1, devices=jax.devices()[:1])),
                     batch_size=4)
    expected = _answers(single)
    for proc in procs:
        try:
            output, _ = proc.communicate(timeout=300)
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            pytest.fail("a worker process did not finish within 300 s")
        assert proc.returncode == 0, output[-3000:]

    host0, host1 = (json.loads((tmp_path / f"answers_{i}.json").read_text()) for i in range(2))
    assert host0 == host1  # bit for bit: outputs are replicated before any host reads them
    assert host0["generate"] == expected["generate"]
    assert [flag for _, flag in host0["loglikelihood"]] == [flag for _, flag in expected["loglikelihood"]]
    np.testing.assert_allclose([lp for lp, _ in host0["loglikelihood"]],
                               [lp for lp, _ in expected["loglikelihood"]], rtol=1e-5)
    np.testing.assert_allclose(host0["rolling"], expected["rolling"], rtol=1e-5)
    assert any(text for text in host0["generate"])


if __name__ == "__main__":
    _worker(*sys.argv[1:])
