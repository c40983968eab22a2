"""A pod on one machine: `launch/local.sh 2` (2 processes x 4 fake devices) against 1 process x 8 devices.

Both train the same tiny model on the same 4x2 zero3 mesh for 5 steps. Records are packed
before they are split over hosts and the shuffle buffer is 1, so every global batch holds
the same rows whatever the process count (in another order): the losses must agree to
float-summation noise. Then each run's checkpoint is resumed by the other process count
(a 2-process checkpoint in 1 process, a 1-process checkpoint in 2 processes) for a sixth
step, and the two continuations must agree too; the 2-process checkpoint is also restored
in this (single) test process and compared leaf by leaf with the single-process one.

Last, a copy of the 2-process run resumes past a checkpoint shard that process 1 wrote and
rot: 4 KiB in the middle of process 1's largest train_state data file of step 5 are zeroed.
Only process 1's devices read that shard, yet both processes must name the same step and
array, set it aside once, and resume from step 4 together (a disagreement would hang the run
or crash it).
"""

import concurrent.futures
import glob
import os
import re
import shutil
import socket
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest
from checkpoint_utils import damage
from xla_env import xla_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.slow  # several multi-process training runs

CONFIG = """
from gptj.configs import tiny


def get_config():
    config = tiny.get_config()
    config.model.update(dict(d_model=64, num_layers=2, num_heads=4, rotary_dim=8, max_len=32))
    config.mesh.update(dict(data=-1, model=2, rules="zero3"))
    config.data.update(dict(train_task="gptj_text", text_pattern={corpus!r}, val_tasks=[], seq_len=32,
                            shuffle_buffer=1))
    config.train.update(dict(batch_size=8, total_steps=5, log_every=1, ckpt_every=2, eval_every=0))
    return config
"""


def _env(devices: int) -> dict:
    env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3")
    env["XLA_FLAGS"] = xla_flags(devices)
    return env


def _train(workdir, config_path, steps, processes, *extra_flags):
    flags = [f"--config={config_path}", f"--workdir={workdir}", f"--config.train.total_steps={steps}", *extra_flags]
    if processes == 1:
        command = [sys.executable, "main.py", *flags]
    else:
        command = ["bash", "launch/local.sh", str(processes), *flags]
    done = subprocess.run(command, cwd=ROOT, env=_env(8 if processes == 1 else 4), capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout + done.stderr


def _losses(workdir) -> dict[int, float]:
    """train/loss per step from the TensorBoard events process 0 wrote."""
    import tensorflow as tf

    losses = {}
    for path in sorted(glob.glob(os.path.join(workdir, "tensorboard", "events.out.tfevents.*"))):
        for event in tf.compat.v1.train.summary_iterator(path):
            for value in event.summary.value:
                if value.tag == "train/loss":
                    losses[event.step] = float(tf.make_ndarray(value.tensor))
    return losses


def write_pod_config(base) -> str:
    """A small text corpus and the CONFIG that trains on it, written in `base`; returns the config's path."""
    corpus = base / "corpus.txt"
    rng = np.random.RandomState(0)
    words = "the quick brown fox jumps over a lazy dog while seven wizards hex jovial kings".split()
    corpus.write_text("\n\n".join(" ".join(rng.choice(words, 40)) for _ in range(200)))
    config_path = base / "pod_config.py"
    config_path.write_text(textwrap.dedent(CONFIG.format(corpus=str(corpus))))
    return str(config_path)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("pod")
    config_path = write_pod_config(base)

    pod, single = str(base / "pod"), str(base / "single")
    # Independent runs go two at a time: each spends much of its time starting up and waiting on the other process.
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        list(pool.map(lambda args: _train(*args), [(pod, config_path, 5, 2), (single, config_path, 5, 1)]))
        # Each checkpoint resumed by the other process count.
        shutil.copytree(single, base / "single_then_pod")
        shutil.copytree(pod, base / "pod_then_single")
        log_a, log_b = pool.map(lambda args: _train(*args), [(str(base / "single_then_pod"), config_path, 6, 2),
                                                              (str(base / "pod_then_single"), config_path, 6, 1)])
    assert "resuming" in log_a and "from step 5" in log_a and "from step 5" in log_b
    return dict(pod=pod, single=single, single_then_pod=str(base / "single_then_pod"),
                pod_then_single=str(base / "pod_then_single"), config=str(config_path))


def test_two_processes_train_like_one(runs):
    pod, single = _losses(runs["pod"]), _losses(runs["single"])
    assert sorted(pod) == sorted(single) == [1, 2, 3, 4, 5]
    for step in pod:
        assert abs(pod[step] - single[step]) <= 1e-5, (step, pod[step], single[step])
    assert pod[5] < pod[1]  # it trains


def _restore(workdir, config_path, step):
    """The train state of `workdir` at `step`, restored onto this single process's 8 devices."""
    import importlib.util

    from gptj import recipe
    from gptj.core import checkpoint
    from gptj.core.partitioning import Partitioner
    from gptj.weights.params_dir import read_model_config

    spec = importlib.util.spec_from_file_location("pod_config", config_path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    trainer = recipe.build_trainer(config, read_model_config(workdir), Partitioner.from_config(config.mesh))
    state, data_state = checkpoint.Checkpointer(workdir, read_only=True).restore(trainer.abstract_state, step=step)
    return jax.device_get(state), data_state


def test_checkpoints_move_between_process_counts(runs):
    assert jax.process_count() == 1
    # Written by 2 processes, read by 1: the same state the single-process run reached.
    pod_state, pod_data = _restore(runs["pod"], runs["config"], 5)
    single_state, _ = _restore(runs["single"], runs["config"], 5)
    assert pod_data["process_count"] == 2 and int(pod_state["step"]) == 5
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), pod_state, single_state)

    # Resumed across process counts (1 -> 2 and 2 -> 1), the sixth step agrees as well. Both
    # restart the data epoch (the process count changed), so both see the same sixth batch.
    after_a, after_b = _losses(runs["single_then_pod"]), _losses(runs["pod_then_single"])
    assert abs(after_a[6] - after_b[6]) <= 1e-5, (after_a[6], after_b[6])
    state_a, _ = _restore(runs["single_then_pod"], runs["config"], 6)
    state_b, _ = _restore(runs["pod_then_single"], runs["config"], 6)
    assert int(state_a["step"]) == int(state_b["step"]) == 6
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), state_a, state_b)


def test_both_processes_agree_on_the_fallback_step(runs, tmp_path):
    workdir = tmp_path / "pod"
    shutil.copytree(runs["pod"], workdir)  # checkpoints 4 and 5 (every 2 steps, the last two kept, and the end)
    step_5 = os.path.join(workdir, "checkpoints", "5")
    shards = glob.glob(os.path.join(step_5, "train_state", "ocdbt.process_1", "d", "*"))
    assert shards, "process 1 wrote no train_state shard"
    damage(step_5, "zeroed", data_file=max(shards, key=os.path.getsize))

    log = _train(str(workdir), runs["config"], 6, processes=2)
    verdicts = {}
    for line in log.splitlines():
        found = re.match(r"\[(\d)\] .*checkpoints/5 is damaged: (train_state/\S+): .*resuming from step (\d+)$", line)
        if found:
            verdicts[found.group(1)] = (found.group(2), found.group(3))
    assert set(verdicts) == {"0", "1"}, log[-5000:]
    assert verdicts["0"] == verdicts["1"] and verdicts["0"][1] == "4", verdicts
    # The damaged step stays, set aside; step 6 is saved at the end beside 4.
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["4", "5.damaged", "6"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_coordinator_that_never_answers_times_out(tmp_path):
    port = _free_port()  # nothing listens there
    command = [sys.executable, "main.py", "--config=gptj/configs/tiny.py", f"--workdir={tmp_path}",
               f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2", "--process_id=1",
               "--initialization_timeout=3"]
    done = subprocess.run(command, cwd=ROOT, env=_env(4), capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: could not join the multi-host run at 127.0.0.1:{port} within 3s "
                           "(process 1 of 2)"), done.stderr[-2000:]
    assert "Traceback" not in done.stderr and "Check failure" not in done.stderr
