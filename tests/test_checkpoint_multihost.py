"""Two processes (launch/local.sh, as in test_multihost) resume past a shard that process 1 wrote and rot.

The pod trains 4 steps with checkpoints at 2 and 4; 4 KiB in the middle of process 1's largest
train_state data file of step 4 are zeroed. Only process 1's devices read that shard, yet both
processes must name the same step and array, set it aside once, and resume from step 2 together
(a disagreement would hang the run or crash it).
"""

import glob
import os
import re

import pytest

from checkpoint_utils import damage
from test_multihost import _train, write_pod_config


@pytest.mark.slow
def test_both_processes_agree_on_the_fallback_step(tmp_path):
    config = write_pod_config(tmp_path)
    workdir = str(tmp_path / "pod")
    _train(workdir, config, 4, 2, "--config.train.ckpt_every=2")
    step_4 = os.path.join(workdir, "checkpoints", "4")
    shards = glob.glob(os.path.join(step_4, "train_state", "ocdbt.process_1", "d", "*"))
    assert shards, "process 1 wrote no train_state shard"
    damage(step_4, "zeroed", data_file=max(shards, key=os.path.getsize))

    log = _train(workdir, config, 6, 2, "--config.train.ckpt_every=2")
    verdicts = {}
    for line in log.splitlines():
        found = re.match(r"\[(\d)\] .*checkpoints/4 is damaged: (train_state/\S+): .*resuming from step (\d+)$", line)
        if found:
            verdicts[found.group(1)] = (found.group(2), found.group(3))
    assert set(verdicts) == {"0", "1"}, log[-5000:]
    assert verdicts["0"] == verdicts["1"] and verdicts["0"][1] == "2", verdicts
    # keep_last=2: step 2 made way for 4 and 6 again; the damaged one stays, set aside.
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["4", "4.damaged", "6"]
