"""Orbax checkpoints of a training run, checked on every restore: train state, data-iterator state, config.

Layout of a workdir:

    workdir/config.json                      the resolved run config ("model" is the model section)
    workdir/checkpoints/<step>/params/       Orbax tree of the parameters (a params tree on its own:
                                             `latest_params_path` finds it for inference tools)
    workdir/checkpoints/<step>/train_state/  {"step", "opt_state"}
    workdir/checkpoints/<step>/data/         data-iterator state (JSON)
    workdir/checkpoints/<step>/config/       the run config at save time (JSON)
    workdir/checkpoints/<step>/integrity/    the checksum manifest of all the above (`gptj.core.integrity`)

Saves are asynchronous: `save` returns once the arrays are copied to host
memory and the files are written in the background. Orbax writes a step into
a temporary directory and renames it when every item is complete, so a
process killed mid-save leaves only a `<step>.orbax-checkpoint-tmp*`
directory, which is never listed as a step and is removed when the next run
starts. The manifest is an item of the step like any other, so a finished
step always has one; a step without it reads as damaged.

Restoring checks every array against the manifest (`integrity.restore_verified`), on
whatever mesh it lands: a damaged, truncated or missing file is a
`CheckpointDamagedError` naming the step and the first bad array. `resume`
then sets such a step aside (renamed `<step>.damaged`, never deleted) and
takes the newest intact one. Storage faults (no space, permission denied,
read-only filesystem) are a one-line `StorageError` naming the directory.
"""

from __future__ import annotations

import os
import shutil
from typing import Any, Mapping

import jax
import orbax.checkpoint as ocp
from absl import logging
from jax.experimental import multihost_utils

from gptj.core import integrity, streaming
from gptj.core.storage import as_storage_error, dir_bytes, reason, storage_fault, tree_bytes
from gptj.errors import CheckpointDamagedError, CheckpointError, StorageError

CONFIG_FILE = "config.json"
CHECKPOINTS_SUBDIR = "checkpoints"
PARAMS_ITEM = "params"
TRAIN_STATE_ITEM = "train_state"
DATA_ITEM = "data"
CONFIG_ITEM = "config"
INTEGRITY_ITEM = integrity.MANIFEST_ITEM
# Orbax's marker for a step still being written (or left behind by a crash).
TMP_MARKER = ".orbax-checkpoint-tmp"
DAMAGED_SUFFIX = ".damaged"
SUPERSEDED_SUFFIX = ".superseded"
_MIB = 2**20


def checkpoints_dir(workdir: str) -> str:
    """Where a workdir keeps its checkpoint steps."""
    return os.path.join(os.path.abspath(workdir), CHECKPOINTS_SUBDIR)


def _item_handlers() -> dict[str, ocp.CheckpointHandler]:
    """Orbax's handlers for the items of a step; arrays through `gptj.core.streaming.array_handler`."""
    arrays = {item: ocp.PyTreeCheckpointHandler(type_handler_registry=streaming.type_handler_registry())
              for item in (PARAMS_ITEM, TRAIN_STATE_ITEM)}
    return {**arrays, **{item: ocp.JsonCheckpointHandler() for item in (DATA_ITEM, CONFIG_ITEM, INTEGRITY_ITEM)}}


class Checkpointer:
    """An Orbax CheckpointManager over `workdir/checkpoints` for {step, params, opt_state} train states.

    Keeps the newest `keep_last` steps plus every step divisible by
    `keep_every` (0: none kept for good). Every process must make the same
    calls (each writes and checks the shards it owns). Unless `read_only`,
    opening it removes temporary directories that a crashed save left behind.
    """

    def __init__(self, workdir: str, keep_last: int = 3, keep_every: int = 0, async_save: bool = True,
                 read_only: bool = False):
        self.directory = checkpoints_dir(workdir)
        if not read_only:
            self._remove_stale_temporaries()
        options = ocp.CheckpointManagerOptions(
            max_to_keep=None if read_only else keep_last, keep_period=keep_every or None,
            enable_async_checkpointing=async_save, create=not read_only, read_only=read_only,
            cleanup_tmp_directories=False)  # done by _remove_stale_temporaries, synchronously and logged
        try:
            self._manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=_item_handlers())
        except Exception as e:  # noqa: BLE001 - a directory that cannot be created or listed
            raise as_storage_error(e, self.directory, "cannot open checkpoint directory") from e
        self._warned_space = False
        self._failed = False
        self._in_flight: tuple[int, int, int] | None = None  # (step, bytes expected, bytes free) of the last save

    # -- listing --

    def all_steps(self) -> list[int]:
        """Steps of complete checkpoints, oldest first."""
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        """The newest complete checkpoint's step, or None."""
        return self._manager.latest_step()

    def step_dir(self, step: int) -> str:
        """The directory of a step's checkpoint."""
        return os.path.join(self.directory, str(step))

    # -- saving --

    def save(self, state: Mapping[str, Any], data_state: Mapping[str, Any] | None = None,
             config: Mapping[str, Any] | None = None) -> bool:
        """Starts saving `state` at its own step; False if that step is already saved.

        Waits for the previous save first (a failed one raises StorageError
        here), compares the space this checkpoint needs with the space free,
        and writes the checksum manifest with the state.
        """
        self.wait()
        step = int(jax.device_get(state["step"]))
        if step in self._manager.all_steps():
            return False
        needed, free = self._check_space(state)
        train_state = {"step": state["step"], "opt_state": state["opt_state"]}
        data_state, config = dict(data_state or {}), dict(config or {})
        manifest = integrity.build_manifest({PARAMS_ITEM: state["params"], TRAIN_STATE_ITEM: train_state},
                                            {DATA_ITEM: data_state, CONFIG_ITEM: config})
        args = ocp.args.Composite(**{
            PARAMS_ITEM: ocp.args.PyTreeSave(state["params"]),
            TRAIN_STATE_ITEM: ocp.args.PyTreeSave(train_state),
            DATA_ITEM: ocp.args.JsonSave(data_state),
            CONFIG_ITEM: ocp.args.JsonSave(config),
            INTEGRITY_ITEM: ocp.args.JsonSave(manifest),
        })
        self._in_flight = (step, needed, free)
        try:
            return bool(self._manager.save(step, args=args, force=True))
        except Exception as e:  # noqa: BLE001 - reported as one line naming the directory
            raise self._save_failed(e) from e

    def _check_space(self, state) -> tuple[int, int]:
        """(bytes the next checkpoint needs, bytes free); a one-line warning the first time they do not fit."""
        latest = self._manager.latest_step()
        needed = dir_bytes(self.step_dir(latest)) if latest is not None else tree_bytes(state)
        free = shutil.disk_usage(self.directory).free
        if free < needed and not self._warned_space and jax.process_index() == 0:
            logging.warning("only %d MiB free in %s; the next checkpoint needs ~%d MiB", free // _MIB,
                            self.directory, -(-needed // _MIB))
            self._warned_space = True
        return needed, free

    def _save_failed(self, error: BaseException) -> CheckpointError:
        """The one-line error for a failed save (the last complete checkpoint is untouched)."""
        self._failed = True
        step, needed, free = self._in_flight or (None, 0, shutil.disk_usage(self.directory).free)
        self._in_flight = None
        fault = storage_fault(error)
        if fault == "no space left":
            return StorageError(f"no space left in {self.directory}: the checkpoint needs ~{-(-needed // _MIB)} MiB, "
                                f"{free // _MIB} MiB free")
        if fault:
            return StorageError(f"cannot save checkpoint step {step} in {self.directory}: {fault}")
        return CheckpointError(f"saving checkpoint step {step} in {self.directory} failed: {reason(error)}")

    def check(self) -> None:
        """Raises StorageError if a save running in the background has failed (cheap: call it every step)."""
        try:
            self._manager.check_for_errors()
        except Exception as e:  # noqa: BLE001
            raise self._save_failed(e) from e

    def wait(self) -> None:
        """Blocks until every started save is complete on disk; a failed one raises StorageError."""
        try:
            self._manager.wait_until_finished()
        except Exception as e:  # noqa: BLE001
            raise self._save_failed(e) from e
        self._in_flight = None

    def close(self) -> None:
        """Waits for pending saves and releases the manager (a failure already reported is not raised again)."""
        reported = self._failed
        try:
            self.wait()
        except CheckpointError:
            if not reported:
                raise
        finally:
            try:
                self._manager.close()
            except Exception:  # noqa: BLE001 - after a failed save, which is reported
                if not self._failed:
                    raise

    def _remove_stale_temporaries(self) -> None:
        """Process 0 removes `<step>.orbax-checkpoint-tmp*` directories a crashed or failed save left behind."""
        if jax.process_index() != 0 or not os.path.isdir(self.directory):
            return
        for name in sorted(os.listdir(self.directory)):
            path = os.path.join(self.directory, name)
            if TMP_MARKER in name and os.path.isdir(path):
                size = dir_bytes(path)
                try:
                    shutil.rmtree(path)
                except OSError as e:
                    raise as_storage_error(e, path, "cannot remove the stale temporary checkpoint") from e
                logging.warning("removed %s (%.1f MiB), left by an interrupted save", path, size / _MIB)

    # -- restoring --

    def restore(self, abstract_state: Mapping[str, Any], step: int | None = None, params_only: bool = False):
        """Restores (state, data_state) onto the shardings that `abstract_state` carries, checked.

        `abstract_state` is a tree of ShapeDtypeStructs with shardings (e.g.
        `Trainer.abstract_state`). With `params_only`, only `state["params"]`
        is read (the rest of the returned state is None) and data_state is {}.
        Raises CheckpointDamagedError for data that fails its checksums or
        cannot be read (see `gptj.core.integrity.restore_verified`).
        """
        step = self.latest_step() if step is None else step
        if step is None:
            raise CheckpointError(f"{self.directory}: no complete checkpoint to restore")
        arrays = {PARAMS_ITEM: abstract_state["params"]}
        if not params_only:
            arrays[TRAIN_STATE_ITEM] = {"step": abstract_state["step"], "opt_state": abstract_state["opt_state"]}
        json_items = () if params_only else (DATA_ITEM,)
        restored = integrity.restore_verified(self.step_dir(step), arrays, json_items, step=step)
        if params_only:
            return {"step": None, "params": restored[PARAMS_ITEM], "opt_state": None}, {}
        train_state = restored[TRAIN_STATE_ITEM]
        state = {"step": train_state["step"], "params": restored[PARAMS_ITEM], "opt_state": train_state["opt_state"]}
        return state, dict(restored[DATA_ITEM] or {})

    def resume(self, abstract_state: Mapping[str, Any], step: int | None = None, fallback: bool = True):
        """(state, data_state) to resume training from, or None when there is no checkpoint yet.

        Without `step`: the newest checkpoint that passes its checks. With
        `fallback`, each newer damaged one is reported in one line (by every
        process: each states the step it resumes from) and set aside (renamed
        `<step>.damaged`, never deleted); without it, damage is an error.
        With `step`: exactly that checkpoint (an error if it is missing or
        damaged), and the newer ones are set aside (`<step>.superseded`) so
        that the resumed run's saves do not collide with them.
        """
        steps = sorted(self.all_steps(), reverse=True)
        if step is not None:
            if step not in steps:
                raise CheckpointError(f"{self.directory}: no checkpoint at step {step} "
                                      f"(steps: {', '.join(map(str, sorted(steps))) or 'none'})")
            restored = self.restore(abstract_state, step)
            for newer, target in self._set_aside([s for s in steps if s > step], SUPERSEDED_SUFFIX).items():
                logging.warning("resuming from step %d: set aside the newer %s as %s", step, newer, target)
            return restored
        damaged: list[CheckpointDamagedError] = []
        for candidate in steps:
            try:
                restored = self.restore(abstract_state, candidate)
            except CheckpointDamagedError as e:
                if not fallback:
                    raise
                damaged.append(e)
                continue
            targets = self._set_aside([e.step for e in damaged], DAMAGED_SUFFIX)
            for error in damaged:
                where = f"; set aside as {targets[error.path]}" if error.path in targets else ""
                logging.warning("%s%s; resuming from step %d", error, where, candidate)
            return restored
        if damaged:
            raise CheckpointError(f"no intact checkpoint in {self.directory}: "
                                  + "; ".join(f"step {e.step}: {e.what}: {e.reason}" for e in damaged))
        return None

    def _set_aside(self, steps: list[int], suffix: str) -> dict[str, str]:
        """Renames step directories to `<step><suffix>`: {old path: new path} on process 0, {} elsewhere.

        Only process 0 renames; afterwards every process lists the steps anew.
        """
        moved = {}
        try:
            if jax.process_index() == 0:
                for step in steps:
                    source = self.step_dir(step)
                    target, n = source + suffix, 1
                    while os.path.exists(target):
                        target, n = f"{source}{suffix}-{n}", n + 1
                    try:
                        os.rename(source, target)
                    except OSError as e:
                        raise as_storage_error(e, source, "cannot set aside") from e
                    moved[source] = target
        finally:
            if steps and jax.process_count() > 1:
                multihost_utils.sync_global_devices("gptj_checkpoint_set_aside")
        if steps:
            self._manager.reload()
        return moved


def all_steps(workdir: str) -> list[int]:
    """Steps of the complete checkpoints in `workdir`, oldest first.

    Orbax's own listing: temporary (unfinished) and set-aside step directories are not steps.
    """
    directory = checkpoints_dir(workdir)
    if not os.path.isdir(directory):
        return []
    return sorted(int(found.step) for found in ocp.path.step.standard_name_format().find_all(directory))


def latest_step(workdir: str) -> int | None:
    """Step of the newest complete checkpoint in `workdir`, or None (no checkpoints, or none complete)."""
    steps = all_steps(workdir)
    return steps[-1] if steps else None


def latest_params_path(workdir: str) -> str:
    """Path of the Orbax params tree of the newest COMPLETE checkpoint of a training workdir.

    A checkpoint still being written, or left half-written by a killed
    process, is never returned. Read it with `gptj.core.integrity.restore_verified`
    on its step directory. Raises CheckpointError when the workdir has no
    complete checkpoint.
    """
    step = latest_step(workdir)
    if step is None:
        raise CheckpointError(f"{workdir}: no complete checkpoint in {checkpoints_dir(workdir)}")
    return os.path.join(checkpoints_dir(workdir), str(step), PARAMS_ITEM)
