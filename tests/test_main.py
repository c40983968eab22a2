"""main.py and config validation: bad configs fail with one clear line before anything is built or compiled.

Subprocesses only where the command line itself is under test.
"""

import os
import subprocess
import sys

import pytest
from trainer_utils import SyntheticIterator, synthetic_eval_sets, tiny_config
from xla_env import xla_flags

from gptj import train
from gptj.settings import validate
from gptj.errors import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("change, message", [
    (lambda c: c.optimizer.update(dict(lr=-0.1)), "optimizer.lr must be positive, got -0.1"),
    (lambda c: c.train.update(dict(batch_size=12, microbatches=2)),
     "train.batch_size=12 must be divisible by the data-parallel size (4, from mesh.data and rule set 'zero3') "
     "times train.microbatches=2 = 8"),
    (lambda c: c.train.update(dict(on_nonfinite="ignore")), "train.on_nonfinite must be 'stop' or 'skip'"),
    (lambda c: c.model.update(dict(num_heads=5)), "model: invalid GPT-J config: d_model 32 is not divisible"),
    (lambda c: c.mesh.update(dict(data=3, model=2)), "mesh: data=3 x model=2 does not divide the 8"),
    (lambda c: c.update(dict(init_from="hf:/no/such/dir")), "init_from='hf:/no/such/dir': /no/such/dir does not exist"),
])
def test_bad_values_are_named(change, message):
    config = tiny_config()
    config.mesh.update(dict(data=4, model=2, rules="zero3"))
    change(config)
    with pytest.raises(ConfigError) as error:
        validate(config, "train", check_tasks=False)
    assert message in str(error.value)


def test_unknown_key_unknown_mode_and_unknown_task():
    config = tiny_config()
    with config.train.unlocked():
        config.train.learning_rate = 0.1
    with pytest.raises(ConfigError, match="unknown config key 'train.learning_rate'"):
        validate(config, "train", check_tasks=False)
    with pytest.raises(ConfigError, match="unknown mode 'fly'"):
        validate(tiny_config(), "fly")
    config = tiny_config()
    config.data.train_task = "no_such_task"
    with pytest.raises(ConfigError, match="unknown data task 'no_such_task'"):
        validate(config, "train")


def test_training_refuses_a_bad_config_before_building_anything(tmp_path):
    config = tiny_config()
    config.optimizer.lr = -1.0
    with pytest.raises(ConfigError, match="optimizer.lr"):
        train.train_and_evaluate(config, str(tmp_path / "run"), train_iter_fn=SyntheticIterator,
                                    eval_iters_fn=synthetic_eval_sets)
    assert not (tmp_path / "run").exists()  # no config.json, no checkpoints: nothing was built


def test_command_line_errors_are_one_line_without_a_traceback(tmp_path):
    base = [sys.executable, os.path.join(ROOT, "main.py"), "--config=gptj/configs/tiny.py",
            f"--workdir={tmp_path / 'run'}"]
    cases = {
        "unknown key": (base + ["--config.train.learning_rate=0.1"], "unknown config key 'train.learning_rate'"),
        "negative lr": (base + ["--config.optimizer.lr=-1"], "optimizer.lr must be positive"),
        "unknown mode": (base + ["--mode=fly"], "unknown --mode='fly'"),
    }
    env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
    running = {name: subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True) for name, (cmd, _) in cases.items()}
    for name, process in running.items():
        _, stderr = process.communicate(timeout=300)
        assert process.returncode == 1, (name, stderr[-2000:])
        assert "Traceback" not in stderr, (name, stderr[-2000:])
        assert "error: " in stderr and cases[name][1] in stderr, (name, stderr[-2000:])
    assert not (tmp_path / "run").exists()


def test_main_starts_the_process_before_importing_jax(tmp_path):
    """main.py calls runtime.start_process first: the collector's thresholds are set before jax loads, and the
    loader that imports TensorFlow without Keras's extras is in place."""
    from gptj.core import runtime

    record = ("import atexit, gc, runpy, sys; real = gc.set_threshold; "
              "gc.set_threshold = lambda *t: (print('thresholds', t, 'jax' in sys.modules), real(*t)); "
              "atexit.register(lambda: print('loaders', [type(f).__name__ for f in sys.meta_path][:1])); "
              "sys.argv = ['main.py'] + sys.argv[1:]; runpy.run_path('main.py', run_name='__main__')")
    done = subprocess.run([sys.executable, "-c", record, "--config=gptj/configs/tiny.py", "--mode=fly",
                           f"--workdir={tmp_path}"], cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 1 and "unknown --mode='fly'" in done.stderr, done.stderr[-2000:]
    assert done.stdout.splitlines() == [f"thresholds ({runtime.GC_YOUNG_THRESHOLD}, 20, 10) False",
                                        "loaders ['_TensorFlowLoader']"]


def test_main_trains_on_the_demo_corpus_and_exits_0_on_sigterm(tmp_path):
    """The README command (shrunk): real data, a fresh process, SIGTERM -> finish the step, save, exit 0."""
    import json
    import signal
    import threading

    from trainer_utils import read_scalars

    from gptj.core.checkpoint import latest_step

    workdir = tmp_path / "run"
    cmd = [sys.executable, os.path.join(ROOT, "main.py"), "--config=gptj/configs/tiny.py", f"--workdir={workdir}",
           "--config.model.num_layers=1", "--config.model.d_model=32", "--config.model.num_heads=2",
           "--config.model.rotary_dim=8", "--config.data.seq_len=16", "--config.train.batch_size=8",
           "--config.train.total_steps=100000", "--config.train.log_every=1", "--config.train.eval_every=0",
           "--config.train.ckpt_every=0"]
    # One CPU device, as the README's command has: 8 fake ones would each initialise the replicated 50k-row
    # embedding and head, on the same 2 cores.
    env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu", XLA_FLAGS=xla_flags(1))
    process = subprocess.Popen(cmd, cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True)
    watchdog = threading.Timer(400, process.kill)
    watchdog.start()
    seen = []
    try:
        for line in process.stderr:
            seen.append(line)
            if "step 3/100000" in line:
                process.send_signal(signal.SIGTERM)
                break
        rest = process.communicate()[1]
    finally:
        watchdog.cancel()
    log = "".join(seen) + rest
    assert process.returncode == 0, log[-3000:]
    assert "training preempted at step" in log
    # A quiet console: gptj's own lines, none of Orbax's per-save chatter or jax's backend probing.
    noisy = [line for line in log.splitlines() if any(
        name in line for name in ("checkpoint_manager.py", "atomicity.py", "xla_bridge.py", "logging_writer.py"))]
    assert not noisy, noisy[:3]
    assert "devices: 1 x cpu" in log or "devices: 8 x cpu" in log
    step = latest_step(str(workdir))
    assert step is not None and step >= 3
    with open(workdir / "config.json") as f:
        assert json.load(f)["model"]["d_model"] == 32
    assert read_scalars(str(workdir / "tensorboard"), "train/loss")


def test_console_keeps_gptj_lines_and_verbosity_brings_back_the_rest():
    import logging as pylogging

    from absl import logging

    from gptj.core import runtime

    handler = logging.get_absl_handler()
    before = list(handler.filters)
    try:
        runtime.configure_console(0)
        (quiet,) = [f for f in handler.filters if f not in before]

        def record(path, level):
            return pylogging.LogRecord("x", level, path, 1, "message", None, None)

        own = os.path.join(ROOT, "gptj", "driver.py")
        library = os.path.join(ROOT, ".venv", "lib", "orbax", "checkpoint_manager.py")
        assert quiet.filter(record(own, pylogging.INFO))
        assert not quiet.filter(record(library, pylogging.INFO))
        assert not quiet.filter(record(library, pylogging.WARNING))
        assert quiet.filter(record(library, pylogging.ERROR))  # errors always show
        handler.removeFilter(quiet)
        runtime.configure_console(1)
        assert handler.filters == before  # --verbosity=1: nothing is filtered
    finally:
        for f in list(handler.filters):
            if f not in before:
                handler.removeFilter(f)


def test_tensorflow_start_up_lines_stay_off_a_quiet_console_and_keras_extras_stay_unloaded():
    """TensorFlow's native start-up lines (CUDA probing, oneDNN / CPU-feature notices) never reach a quiet
    console, on import or on its first dataset, and the data still flows. TensorFlow loads without the Keras
    extras (scikit-learn, pandas, matplotlib, scipy), which import as usual afterwards."""
    code = ("import sys; from gptj.core import runtime; runtime.start_process(); "
            "runtime.configure_console(int(sys.argv[1])); "
            "import seqio, tensorflow as tf; print(list(tf.data.Dataset.range(3).map(lambda x: x * 2)"
            ".as_numpy_iterator())); print([m for m in runtime.KERAS_EXTRAS if m in sys.modules]); "
            "import sklearn, scipy.sparse; print(sklearn.__name__, scipy.sparse.__name__)")
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    env.update(PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
    quiet = subprocess.run([sys.executable, "-c", code, "0"], cwd=ROOT, env=env, capture_output=True, text=True,
                           timeout=300)
    assert quiet.returncode == 0, quiet.stderr[-2000:]
    assert quiet.stdout.splitlines() == ["[np.int64(0), np.int64(2), np.int64(4)]", "[]", "sklearn scipy.sparse"]
    noise = ("cuda", "cuinit", "onednn", "cpu_feature_guard", "absl::initializelog", "tensorflow binary")
    assert not [line for line in quiet.stderr.splitlines() if any(n in line.lower() for n in noise)], quiet.stderr
