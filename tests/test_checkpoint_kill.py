"""A process SIGKILLed in the middle of an async save: the next start takes the last complete checkpoint.

A fresh process is the point here (the kill must take down the background
save thread), so the training runs in a subprocess.
"""

import glob
import os
import signal
import subprocess
import sys
import textwrap

import jax
import numpy as np
from trainer_utils import SyntheticIterator, cached_trainer, tiny_config, to_numpy

from gptj.core.checkpoint import Checkpointer, latest_params_path, latest_step
from gptj.core.hooks import CheckpointHook

TESTS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(TESTS)

# Trains with a checkpoint every 2 steps and kills itself with SIGKILL right after the
# save of step 4 has started (the arrays are on the host, the files not yet final).
CHILD = textwrap.dedent("""
    import os, signal, sys
    from gptj.core.checkpoint import Checkpointer
    from gptj.core.hooks import CheckpointHook
    from gptj.core.trainer import Hook
    from trainer_utils import SyntheticIterator, cached_trainer, tiny_config

    class KillDuringSave(Hook):
        def on_step(self, step, state, metrics):
            if step == 4:
                os.kill(os.getpid(), signal.SIGKILL)

    trainer = cached_trainer("single")
    checkpointer = Checkpointer(sys.argv[1], keep_last=5)
    data = SyntheticIterator(tiny_config())
    trainer.fit(trainer.init_state(0), data, 10, [CheckpointHook(checkpointer, 2, data, {}), KillDuringSave()])
""")


def test_sigkill_mid_async_save_never_picks_the_partial_checkpoint(tmp_path):
    workdir = str(tmp_path)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, TESTS]), JAX_PLATFORMS="cpu")
    child = subprocess.run([sys.executable, "-c", CHILD, workdir], env=env, capture_output=True, text=True,
                           timeout=300)
    assert child.returncode == -signal.SIGKILL, child.stderr[-3000:]

    partial = glob.glob(os.path.join(workdir, "checkpoints", "4.orbax-checkpoint-tmp*"))
    assert partial, "the kill missed the save window: step 4 completed before SIGKILL"
    assert latest_step(workdir) == 2
    assert latest_params_path(workdir) == os.path.join(workdir, "checkpoints", "2", "params")

    # The next start restores step 2, cleans the partial directory and trains on through step 4 again.
    trainer = cached_trainer("single")
    checkpointer = Checkpointer(workdir, keep_last=5)
    state, data_state = checkpointer.restore(trainer.abstract_state)
    assert int(state["step"]) == 2 and data_state == {"index": 2}
    data = SyntheticIterator(tiny_config())
    data.set_state(data_state)
    state, status = trainer.fit(state, data, 6, [CheckpointHook(checkpointer, 2, data, {})])
    checkpointer.close()
    assert status == "completed"
    assert checkpointer.all_steps() == [2, 4, 6]
    assert not glob.glob(os.path.join(workdir, "checkpoints", "*tmp*"))  # the partial save was cleaned up
    assert all(np.isfinite(x).all() for x in jax.tree_util.tree_leaves(to_numpy(state["params"])))
