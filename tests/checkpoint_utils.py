"""Helpers for the checkpoint tests: short driver runs on the cached tiny trainer, and ways to damage a step."""

import glob
import os
import shutil

import jax
import numpy as np
from trainer_utils import SyntheticIterator, cached_trainer, tiny_config, to_numpy

from gptj.core.driver import RunSchedule, train_in_workdir


def train(workdir, total_steps, extra_hooks=None, **schedule):
    """Trains (or resumes) `workdir` to `total_steps`, checkpointing every 2 steps."""
    config = tiny_config()
    return train_in_workdir(
        cached_trainer("single"), str(workdir), SyntheticIterator(config), run_config=config.to_dict(),
        schedule=RunSchedule(total_steps=total_steps, ckpt_every=2, keep_last=5, log_every=100, **schedule),
        extra_hooks=extra_hooks)


def assert_same(a, b):
    """Two trees of arrays are bitwise equal, leaf by leaf."""
    for x, y in zip(jax.tree_util.tree_leaves(to_numpy(a)), jax.tree_util.tree_leaves(to_numpy(b)), strict=True):
        np.testing.assert_array_equal(x, y)


def largest_data_file(step_dir, item="train_state"):
    """The biggest file of a step item's array data (its OCDBT data files, as process 0 wrote them)."""
    files = glob.glob(os.path.join(step_dir, item, "ocdbt.process_0", "d", "*"))
    return max(files, key=os.path.getsize)


def damage(step_dir, how, item="train_state", data_file=None):
    """Damages a step's item: a data file (default: its largest) zeroed (4 KiB, a quarter in), truncated to half
    or deleted; or "stale".

    "stale" puts step 2's files in its place: valid data that reads back without an error but is not what
    this step saved (what silent bit rot in an uncompressed block leaves), which only the checksums catch.
    """
    if how == "stale":
        shutil.rmtree(os.path.join(step_dir, item))
        shutil.copytree(os.path.join(os.path.dirname(step_dir), "2", item), os.path.join(step_dir, item))
        return
    path = data_file or largest_data_file(step_dir, item)
    size = os.path.getsize(path)
    if how == "zeroed":
        with open(path, "r+b") as f:
            f.seek(size // 4)
            f.write(bytes(min(4096, size // 2)))
    elif how == "truncated":
        os.truncate(path, size // 2)
    else:
        os.remove(path)
