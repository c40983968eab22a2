"""Runs any Trainer in a workdir: resume, periodic hooks, preemption. What every task shares.

    result = train_in_workdir(trainer, "runs/mine", train_iterator,
                              schedule=RunSchedule(total_steps=1000, eval_every=100, ckpt_every=500),
                              eval_sets={"validation": make_validation_iterator}, run_config=config.to_dict())

What it owns, so a new task writes none of it:
- the workdir: `config.json` (`run_config`, written atomically by process 0),
  `checkpoints/<step>/` (train state, data position and run config; see
  `gptj.core.checkpoint`), `tensorboard/` (and `profile/` when asked);
- the start: the newest intact checkpoint (train state and the data
  iterator's position) when there is one, else `init_state()` (default: a
  fresh `trainer.init_state(schedule.seed)`). Every restore is checked
  against the checkpoint's checksums; a damaged newer checkpoint is named in
  one line and set aside (`resume_fallback`, on by default) or is an error;
  `resume_step` picks a step (see `gptj.core.checkpoint.Checkpointer.resume`);
  temporary directories of a crashed save are removed;
- ahead-of-time compilation, with the per-device memory report before step 1;
- the hooks: metrics and a progress line every `log_every` steps, validation
  on `eval_sets` every `eval_every`, checkpoints every `ckpt_every` and at the
  end, a profiler trace of `profile_steps`, plus any `extra_hooks`;
- preemption: SIGTERM/SIGINT finishes the current step, saves, returns
  status 'preempted'; rerunning the same command resumes exactly.

The train iterator yields global batches (dicts of arrays laid out by the
trainer's batch sharding, or host arrays it will place). If it has
`get_state()`/`set_state(dict)` (JSON-serialisable), its position is saved
with every checkpoint and restored on resume; `close()` is called at the end.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any, Callable, Iterator, Mapping, Sequence

import jax

from gptj.core import hooks as train_hooks
from gptj.core import metrics as metrics_lib
from gptj.core.checkpoint import CONFIG_FILE, Checkpointer
from gptj.core.storage import write_json_atomic
from gptj.core.trainer import Hook, Trainer
from gptj.errors import CheckpointDamagedError

TENSORBOARD_SUBDIR = "tensorboard"
PROFILE_SUBDIR = "profile"


@dataclasses.dataclass(frozen=True)
class RunSchedule:
    """When the driver does what (steps), and the run's seed. `from_config` reads a config section."""

    total_steps: int
    log_every: int = 10
    eval_every: int = 0        # 0: validation only at the end
    val_batches: int = 0       # batches per validation set (0: all)
    ckpt_every: int = 0        # 0: a checkpoint only at the end
    keep_last: int = 3
    keep_every: int = 0        # also keep every step divisible by this for good (0: none)
    resume_fallback: bool = True  # a damaged newest checkpoint: set it aside and resume from the newest intact one
    resume_step: int = -1      # resume from exactly this step (newer ones are set aside); -1: the newest
    profile_steps: str = ""    # "FIRST:LAST" traces those steps
    seed: int = 0
    peak_flops_per_device: float = 0.0  # for MFU (0: not reported)
    use_wandb: bool = False

    @classmethod
    def from_config(cls, section: Any) -> "RunSchedule":
        """The schedule from a settings section with (some of) these fields as attributes; the rest are ignored."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: getattr(section, k) for k in names if hasattr(section, k)})


@dataclasses.dataclass(frozen=True)
class RunContext:
    """What `extra_hooks` may need: the workdir, the metric writer and the throughput clock."""

    workdir: str
    writer: Any
    throughput: metrics_lib.Throughput


@dataclasses.dataclass
class RunResult:
    """How a run ended: status 'completed' or 'preempted', the last step, the final state, validation history."""

    status: str
    step: int
    state: Any
    validation: list[tuple[int, dict[str, dict[str, float]]]]


def write_run_config(workdir: str, config: Mapping[str, Any]) -> None:
    """`workdir/config.json`, written by process 0 through a temporary file (never half-written)."""
    if jax.process_index() == 0:
        write_json_atomic(os.path.join(workdir, CONFIG_FILE), dict(config))


def _resume(checkpointer: Checkpointer, trainer: Trainer, schedule: RunSchedule):
    """(state, data_state) of the checkpoint to resume from, or None; see `Checkpointer.resume`."""
    step = None if schedule.resume_step < 0 else schedule.resume_step
    try:
        return checkpointer.resume(trainer.abstract_state, step=step, fallback=schedule.resume_fallback)
    except CheckpointDamagedError as e:
        if step is not None:  # the chosen step is damaged: nothing to add
            raise
        # With fallback on, damage never reaches here (a damaged step is set aside); say how to turn it on.
        raise CheckpointDamagedError(
            e.path, e.what, f"{e.reason} (train.resume_fallback is off: set it to resume from the newest intact "
                            "checkpoint, or choose one with train.resume_step)", e.step) from e


def train_in_workdir(trainer: Trainer, workdir: str, train_iter: Iterator[Mapping[str, Any]], *,
                     schedule: RunSchedule, init_state: Callable[[], Any] | None = None,
                     eval_sets: Mapping[str, Callable[[], Iterator]] | None = None,
                     run_config: Mapping[str, Any] | None = None, flops_per_token: float = 0.0,
                     extra_hooks: Callable[[RunContext], Sequence[Hook]] | None = None) -> RunResult:
    """Trains `trainer` in `workdir` as the module docstring describes; every process calls it.

    Args:
      trainer: the Trainer (model, loss, optimizer, partitioner, batch shape).
      workdir: where checkpoints, metrics and `config.json` live; rerunning resumes from it.
      train_iter: global training batches (see the module docstring for the resume protocol).
      schedule: steps at which to log, validate, checkpoint, profile; the total; the seed.
      init_state: the state of a run that has no checkpoint yet (default: a fresh init from the seed).
      eval_sets: {name: callable returning a fresh finite iterator of batches} for validation.
      run_config: the resolved run configuration, saved as `config.json` and in every checkpoint.
      flops_per_token: model FLOPs per trained token, for MFU (with schedule.peak_flops_per_device).
      extra_hooks: builds more hooks from the RunContext (e.g. an evaluation harness).
    """
    workdir = os.path.abspath(workdir)
    if run_config is not None:
        write_run_config(workdir, run_config)
    checkpointer = Checkpointer(workdir, keep_last=schedule.keep_last, keep_every=schedule.keep_every)
    writer = None
    try:
        resumed = _resume(checkpointer, trainer, schedule)
        if resumed is not None:
            state, data_state = resumed
            metrics_lib.log_process0("resuming %s from step %d", workdir, int(state["step"]))
            if data_state and hasattr(train_iter, "set_state"):
                train_iter.set_state(data_state)
        else:
            state = init_state() if init_state is not None else trainer.init_state(schedule.seed)
        trainer.compile()

        writer = metrics_lib.create_writer(os.path.join(workdir, TENSORBOARD_SUBDIR), use_wandb=schedule.use_wandb,
                                           workdir=workdir, config=dict(run_config or {}))
        # Every entry of the first batch feature counts: rows x length, or rows x 2 x length for pairs.
        tokens_per_step = math.prod(next(iter(trainer.batch_spec.values())).shape)
        throughput = metrics_lib.Throughput(tokens_per_step, flops_per_token, jax.device_count(),
                                            schedule.peak_flops_per_device)
        evaluation = train_hooks.EvalHook(trainer, eval_sets or {}, schedule.eval_every, schedule.val_batches,
                                          writer, throughput)
        hooks: list[Hook] = [
            train_hooks.MetricsHook(writer, schedule.log_every, schedule.total_steps, throughput),
            evaluation,
            train_hooks.CheckpointHook(checkpointer, schedule.ckpt_every, train_iter, dict(run_config or {}),
                                       throughput),
        ]
        if extra_hooks is not None:
            hooks.extend(extra_hooks(RunContext(workdir, writer, throughput)))
        profile = train_hooks.parse_profile_steps(schedule.profile_steps)
        if profile:
            hooks.append(train_hooks.ProfileHook(os.path.join(workdir, PROFILE_SUBDIR), profile))
        state, status = trainer.fit(state, train_iter, schedule.total_steps, hooks)
    finally:
        if writer is not None:
            writer.close()
        checkpointer.close()
        if hasattr(train_iter, "close"):
            train_iter.close()
    step = int(jax.device_get(state["step"]))
    metrics_lib.log_process0("training %s at step %d", status, step)
    return RunResult(status, step, state, evaluation.history)
