"""Orbax checkpoints of a training run: train state, data-iterator state and the resolved config.

Layout of a workdir:

    workdir/config.json                      the resolved run config ("model" is the model section)
    workdir/checkpoints/<step>/params/       Orbax tree of the parameters (a params tree on its own:
                                             `latest_params_path` finds it for inference tools)
    workdir/checkpoints/<step>/train_state/  {"step", "opt_state"}
    workdir/checkpoints/<step>/data/         data-iterator state (JSON)
    workdir/checkpoints/<step>/config/       the run config at save time (JSON)

Saves are asynchronous: `save` returns once the arrays are copied to host
memory and the files are written in the background. Orbax writes a step into
a temporary directory and renames it when every item is complete, so a
process killed mid-save leaves only a `<step>.orbax-checkpoint-tmp*`
directory, which is never listed as a step and is removed on the next start.
Restoring takes target shardings, so a checkpoint written on one mesh and
rule set loads onto any other.
"""

from __future__ import annotations

import os
from typing import Any, Mapping

import jax
import orbax.checkpoint as ocp

CONFIG_FILE = "config.json"
CHECKPOINTS_SUBDIR = "checkpoints"
PARAMS_ITEM = "params"
TRAIN_STATE_ITEM = "train_state"
DATA_ITEM = "data"
CONFIG_ITEM = "config"
ITEMS = (PARAMS_ITEM, TRAIN_STATE_ITEM, DATA_ITEM, CONFIG_ITEM)


class CheckpointError(ValueError):
    """A checkpoint that cannot be restored: none complete, or one that does not fit the target state."""


def checkpoints_dir(workdir: str) -> str:
    """Where a workdir keeps its checkpoint steps."""
    return os.path.join(os.path.abspath(workdir), CHECKPOINTS_SUBDIR)


class Checkpointer:
    """An Orbax CheckpointManager over `workdir/checkpoints` for {step, params, opt_state} train states.

    Keeps the newest `keep_last` steps plus every step divisible by
    `keep_every` (0: none kept for good). Every process must make the same
    calls (each writes the shards it owns).
    """

    def __init__(self, workdir: str, keep_last: int = 3, keep_every: int = 0, async_save: bool = True,
                 read_only: bool = False):
        self.directory = checkpoints_dir(workdir)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=None if read_only else keep_last, keep_period=keep_every or None, enable_async_checkpointing=async_save,
            create=not read_only, read_only=read_only, cleanup_tmp_directories=not read_only)
        self._manager = ocp.CheckpointManager(self.directory, options=options, item_names=ITEMS)

    def all_steps(self) -> list[int]:
        """Steps of complete checkpoints, oldest first."""
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        """The newest complete checkpoint's step, or None."""
        return self._manager.latest_step()

    def save(self, state: Mapping[str, Any], data_state: Mapping[str, Any] | None = None,
             config: Mapping[str, Any] | None = None) -> bool:
        """Starts saving `state` at its own step; False if that step is already saved."""
        step = int(jax.device_get(state["step"]))
        if step in self._manager.all_steps():
            return False
        args = ocp.args.Composite(**{
            PARAMS_ITEM: ocp.args.StandardSave(state["params"]),
            TRAIN_STATE_ITEM: ocp.args.StandardSave({"step": state["step"], "opt_state": state["opt_state"]}),
            DATA_ITEM: ocp.args.JsonSave(dict(data_state or {})),
            CONFIG_ITEM: ocp.args.JsonSave(dict(config or {})),
        })
        return bool(self._manager.save(step, args=args, force=True))

    def restore(self, abstract_state: Mapping[str, Any], step: int | None = None, params_only: bool = False):
        """Restores (state, data_state) onto the shardings that `abstract_state` carries.

        `abstract_state` is a tree of ShapeDtypeStructs with shardings (e.g.
        `Trainer.abstract_state`). With `params_only`, only `state["params"]`
        is read (the rest of the returned state is None) and data_state is {}.
        """
        step = self.latest_step() if step is None else step
        if step is None:
            raise CheckpointError(f"{self.directory}: no complete checkpoint to restore")
        items = {PARAMS_ITEM: ocp.args.StandardRestore(abstract_state["params"])}
        if not params_only:
            items[TRAIN_STATE_ITEM] = ocp.args.StandardRestore(
                {"step": abstract_state["step"], "opt_state": abstract_state["opt_state"]})
            items[DATA_ITEM] = ocp.args.JsonRestore()
        try:
            restored = self._manager.restore(step, args=ocp.args.Composite(**items))
        except (ValueError, KeyError, TypeError, FileNotFoundError) as e:
            raise CheckpointError(f"{self.directory}/{step}: cannot restore onto this model/optimizer "
                               f"({type(e).__name__}: {e})") from e
        if params_only:
            return {"step": None, "params": restored[PARAMS_ITEM], "opt_state": None}, {}
        train_state = restored[TRAIN_STATE_ITEM]
        state = {"step": train_state["step"], "params": restored[PARAMS_ITEM], "opt_state": train_state["opt_state"]}
        return state, dict(restored[DATA_ITEM] or {})

    def wait(self) -> None:
        """Blocks until every started save is complete on disk."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        """Waits for pending saves and releases the manager."""
        self._manager.wait_until_finished()
        self._manager.close()


def latest_step(workdir: str) -> int | None:
    """Step of the newest complete checkpoint in `workdir`, or None (no checkpoints, or none complete)."""
    if not os.path.isdir(checkpoints_dir(workdir)):
        return None
    # Orbax's own step listing: temporary (unfinished) step directories are skipped.
    found = ocp.path.step.latest_step_metadata(checkpoints_dir(workdir), ocp.path.step.standard_name_format())
    return None if found is None else int(found.step)


def latest_params_path(workdir: str) -> str:
    """Path of the Orbax params tree of the newest COMPLETE checkpoint of a training workdir.

    The tree restores with `ocp.StandardCheckpointer().restore(path, target)`
    onto any sharding. A checkpoint
    still being written, or left half-written by a killed process, is never
    returned. Raises CheckpointError when the workdir has no complete checkpoint.
    """
    step = latest_step(workdir)
    if step is None:
        raise CheckpointError(f"{workdir}: no complete checkpoint in {checkpoints_dir(workdir)}")
    return os.path.join(checkpoints_dir(workdir), str(step), PARAMS_ITEM)
