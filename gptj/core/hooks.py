"""The hooks the training loop runs every N steps: metrics, validation, checkpoints, profiling.

Each is a `gptj.core.trainer.Hook`; none knows the model. Order matters only for
timing: give `Throughput` to hooks that pause training (validation) so their
time does not count as training time.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any, Callable, Iterator, Mapping

import jax
import numpy as np

from gptj.core import metrics as metrics_lib
from gptj.core.trainer import Hook, Trainer


class MetricsHook(Hook):
    """Every `every` steps: averages the window's train metrics, adds rates and MFU, writes them and a progress line."""

    def __init__(self, writer, every: int, total_steps: int, throughput: metrics_lib.Throughput):
        self.writer = writer
        self.every = every
        self.total_steps = total_steps
        self.throughput = throughput
        self._window: list[Mapping[str, jax.Array]] = []

    def on_start(self, step, state):
        self.throughput.start(step)

    def on_step(self, step, state, metrics):
        self._window.append(metrics)  # device arrays: no wait here
        if step % self.every == 0 or step == self.total_steps:
            self._flush(step)

    def on_end(self, step, state, status):
        if self._window:
            self._flush(step)
        self.writer.flush()

    def _flush(self, step: int) -> None:
        window = jax.device_get(self._window)
        self._window = []
        finite = np.array([bool(m["finite"]) for m in window])
        scalars = {}
        for key in window[0]:
            if key == "finite":
                continue
            values = np.array([float(m[key]) for m in window])
            if key == "lr":
                scalars["train/lr"] = float(values[-1])
            elif finite.any():
                scalars[f"train/{key}"] = float(values[finite].mean())
        if "train/nll" in scalars:
            scalars["train/perplexity"] = float(np.exp(scalars["train/nll"]))
        if not finite.all():
            scalars["train/nonfinite_steps"] = float((~finite).sum())
        rates = self.throughput.report(step)
        scalars.update(rates)
        self.writer.write_scalars(step, scalars)
        seconds_per_step = rates.get("train/step_time", 0.0)
        metrics_lib.log_process0("%s", metrics_lib.progress_line(step, self.total_steps, scalars, seconds_per_step))


class EvalHook(Hook):
    """Validation metrics (all the Trainer's summary gives: loss, perplexity, accuracy, ...) on every named
    eval set, every `every` steps.

    `eval_sets` maps a name to a callable returning a fresh finite iterator
    of batches; at most `max_batches` (0: all) are used. With `at_start`, a
    run beginning at step 0 is evaluated before its first update, which gives
    the untrained baseline.
    """

    def __init__(self, trainer: Trainer, eval_sets: Mapping[str, Callable[[], Iterator]], every: int,
                 max_batches: int, writer, throughput: metrics_lib.Throughput | None = None, at_start: bool = True):
        self.trainer = trainer
        self.eval_sets = dict(eval_sets)
        self.every = every
        self.max_batches = max_batches
        self.writer = writer
        self.throughput = throughput
        self.at_start = at_start
        self.history: list[tuple[int, dict[str, dict[str, float]]]] = []

    def on_start(self, step, state):
        if self.at_start and step == 0:
            self._evaluate(step, state)

    def on_step(self, step, state, metrics):
        if self.every and step % self.every == 0:
            self._evaluate(step, state)

    def on_end(self, step, state, status):
        if status == "completed" and (not self.history or self.history[-1][0] != step):
            self._evaluate(step, state)

    def _evaluate(self, step: int, state) -> None:
        if not self.eval_sets:
            return
        jax.block_until_ready(state["params"])  # train steps in flight count as training time
        results, scalars = {}, {}
        with self.throughput.paused() if self.throughput else contextlib.nullcontext():
            for name, make_iter in self.eval_sets.items():
                result = self.trainer.evaluate(state["params"], make_iter(), self.max_batches)
                results[name] = result
                metrics = {k: v for k, v in result.items() if k not in ("batches", "weight")}
                scalars.update((f"val/{name}/{key}", value) for key, value in metrics.items())
                metrics_lib.log_process0("validation at step %d on %s: %s (%d batches)", step, name,
                                         ", ".join(f"{key} {value:.4f}" for key, value in metrics.items()),
                                         result.get("batches", 0))
        self.history.append((step, results))
        self.writer.write_scalars(step, scalars)


class CheckpointHook(Hook):
    """Saves the train state, the data iterator's state and the run config every `every` steps and at the end.

    Saves run in the background; every step it asks whether the last one
    failed (a full disk, say), so that the run stops with that error at once
    rather than training on without checkpoints.
    """

    def __init__(self, checkpointer, every: int, data_iter: Any, config: Mapping[str, Any],
                 throughput: metrics_lib.Throughput | None = None):
        self.checkpointer = checkpointer
        self.throughput = throughput
        self.every = every
        self.data_iter = data_iter
        self.config = dict(config)

    def needs_sync(self, step):
        return bool(self.every) and step % self.every == 0

    def _save(self, state) -> None:
        data_state = self.data_iter.get_state() if hasattr(self.data_iter, "get_state") else {}
        with self.throughput.paused() if self.throughput else contextlib.nullcontext():
            saved = self.checkpointer.save(state, data_state, self.config)
        if saved:
            metrics_lib.log_process0("saving a checkpoint at step %d", int(jax.device_get(state["step"])))

    def on_step(self, step, state, metrics):
        self.checkpointer.check()
        if self.needs_sync(step):
            self._save(state)

    def on_end(self, step, state, status):
        self._save(state)
        self.checkpointer.wait()
        metrics_lib.log_process0("checkpoint at step %d complete in %s", step, self.checkpointer.directory)


def parse_profile_steps(spec: str) -> tuple[int, int] | None:
    """'20:25' -> (20, 25): trace steps 20 through 25. '' -> None."""
    if not spec:
        return None
    try:
        first, last = (int(x) for x in spec.split(":"))
    except ValueError:
        raise ValueError(f"train.profile_steps must look like 'FIRST:LAST' (e.g. '20:25'), got {spec!r}") from None
    if not 1 <= first <= last:
        raise ValueError(f"train.profile_steps {spec!r}: need 1 <= FIRST <= LAST")
    return first, last


class ProfileHook(Hook):
    """Captures a jax.profiler trace (TensorBoard's profile plugin reads it) of steps FIRST..LAST."""

    def __init__(self, logdir: str, steps: tuple[int, int]):
        self.logdir = logdir
        self.first, self.last = steps
        self._active = False

    def _start(self) -> None:
        os.makedirs(self.logdir, exist_ok=True)
        jax.profiler.start_trace(self.logdir)
        self._active = True

    def _stop(self, state) -> None:
        jax.block_until_ready(state["params"])
        jax.profiler.stop_trace()
        self._active = False
        metrics_lib.log_process0("profile of steps %d-%d written to %s", self.first, self.last, self.logdir)

    def on_start(self, step, state):
        if step + 1 == self.first:
            self._start()

    def on_step(self, step, state, metrics):
        if step + 1 == self.first:
            self._start()
        elif step == self.last and self._active:
            self._stop(state)

    def on_end(self, step, state, status):
        if self._active:
            self._stop(state)
