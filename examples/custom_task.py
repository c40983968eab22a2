"""Your own data for main.py: a seqio task registered by a module of yours, named in the config.

    python main.py --config=examples/custom_task.py --workdir=runs/arithmetic
    python main.py --config=examples/custom_task.py --workdir=runs/arithmetic --mode=sample --temperature=0 \\
        --prompt="17+25="

`config.data.module` names a module (a dotted name on the Python path, or a .py
file) whose `register_tasks(seq_len, vocabulary)` registers seqio tasks; every
host calls it before the tasks named by `data.train_task` / `data.val_tasks` are
looked up. A task yields {"text": int32 [seq_len + 1]} records of the run's
vocabulary (a "loss_mask" feature too, if only some tokens should be learned);
`task_output_features()` gives the features to register it with. Here
examples/arithmetic_tasks.py makes sums ("17+25=42") on the fly.
"""

import os

from gptj import load_config

TASKS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "arithmetic_tasks.py")


def get_config():
    config = load_config("tiny")
    config.data.update(dict(module=TASKS, train_task="arithmetic_train", val_tasks=("arithmetic_validation",),
                            seq_len=64))
    config.train.update(dict(total_steps=200, eval_every=100, ckpt_every=100))
    return config
