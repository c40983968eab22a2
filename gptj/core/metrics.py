"""Metric writers (console, TensorBoard, optional W&B), model FLOPs utilisation and the progress line.

MFU follows the PaLM paper (Chowdhery et al. 2022, appendix B): training a
decoder costs, per token,

    6 * N  +  12 * L * H * Q * T   FLOPs

where N is the number of parameters that take part in matrix multiplies (all
of them except the input embedding table, which is a gather), L the number of
layers, H the heads, Q the head dimension and T the sequence length; the
second term is the attention scores and weighted values (forward 2 + 2,
backward twice that), counted over the full T x T square as PaLM does.
MFU = achieved model FLOPs per second / (devices x peak FLOPs per device).
Rematerialisation does not count: it is hardware FLOPs, not model FLOPs.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any, Mapping

import jax
import numpy as np
from absl import logging


def flops_per_token(num_params: int, num_layers: int, num_heads: int, head_dim: int, seq_len: int) -> float:
    """Training FLOPs per token, 6N + 12 L H Q T (PaLM); `num_params` excludes the input embedding."""
    return 6.0 * num_params + 12.0 * num_layers * num_heads * head_dim * seq_len


def mfu(tokens_per_second: float, flops_per_token_: float, num_devices: int, peak_flops_per_device: float) -> float:
    """Model FLOPs utilisation in [0, 1] (0 when the peak is unknown)."""
    if peak_flops_per_device <= 0:
        return 0.0
    return tokens_per_second * flops_per_token_ / (num_devices * peak_flops_per_device)


def format_duration(seconds: float) -> str:
    """Seconds as '1h02m03s' / '2m03s' / '3s'."""
    seconds = int(round(max(seconds, 0)))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m{secs:02d}s"
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def progress_line(step: int, total_steps: int, scalars: Mapping[str, float], seconds_per_step: float) -> str:
    """'step 120/300 (40%) | loss 3.210 | 12,345 tok/s | 0.81 s/step | MFU 31.2% | ETA 2m26s'."""
    parts = [f"step {step}/{total_steps} ({100.0 * step / max(total_steps, 1):.0f}%)"]
    if "train/loss" in scalars:
        parts.append(f"loss {scalars['train/loss']:.4f}")
    if "train/tokens_per_sec" in scalars:
        parts.append(f"{scalars['train/tokens_per_sec']:,.0f} tok/s")
    parts.append(f"{seconds_per_step:.3f} s/step")
    if scalars.get("train/mfu"):
        parts.append(f"MFU {100.0 * scalars['train/mfu']:.1f}%")
    parts.append(f"ETA {format_duration((total_steps - step) * seconds_per_step)}")
    return " | ".join(parts)


class _WandbWriter:
    """A clu MetricWriter that writes everything it is given to Weights & Biases, at the step given.

    Scalars and summaries become logged numbers, images / videos / audio / text /
    histograms become the matching `wandb` media objects, hparams the run's
    config. `flush` has nothing to do: wandb sends from its own process.
    """

    def __init__(self, workdir: str, config: Mapping[str, Any]):
        import wandb

        self._wandb = wandb
        self._run = wandb.init(dir=workdir, config=dict(config), resume="allow")

    def _log(self, step: int, values: Mapping[str, Any]) -> None:
        self._run.log(dict(values), step=step)

    def write_scalars(self, step, scalars):
        self._log(step, scalars)

    def write_hparams(self, hparams):
        self._run.config.update(dict(hparams), allow_val_change=True)

    def write_summaries(self, step, values, metadata=None):
        self._log(step, {k: np.asarray(v) for k, v in values.items()})

    def write_images(self, step, images):  # [N, H, W, C] per key, as clu hands them
        self._log(step, {k: [self._wandb.Image(np.asarray(x)) for x in v] for k, v in images.items()})

    def write_videos(self, step, videos):  # [N, T, H, W, C] per key; wandb wants [T, C, H, W]
        self._log(step, {k: [self._wandb.Video(np.moveaxis(np.asarray(x), -1, 1)) for x in v]
                         for k, v in videos.items()})

    def write_audios(self, step, audios, *, sample_rate):  # [N, samples, channels] per key
        self._log(step, {k: [self._wandb.Audio(np.asarray(x), sample_rate=sample_rate) for x in v]
                         for k, v in audios.items()})

    def write_texts(self, step, texts):
        self._log(step, {k: self._wandb.Html(f"<pre>{v}</pre>") for k, v in texts.items()})

    def write_histograms(self, step, arrays, num_buckets=None):  # num_buckets: {key: buckets}, as clu passes it
        buckets = num_buckets or {}
        self._log(step, {k: self._wandb.Histogram(np_histogram=np.histogram(np.asarray(v), bins=buckets.get(k) or 64))
                         for k, v in arrays.items()})

    def flush(self):
        """Nothing to do: wandb's own process sends what was logged."""

    def close(self):
        self._run.finish()


def create_writer(logdir: str, *, use_wandb: bool = False, workdir: str = "", config: Mapping[str, Any] | None = None):
    """Console + TensorBoard (+ W&B) writer on process 0; other processes only log (and are quiet).

    clu (and through it TensorFlow) is imported here, not at module import,
    so inference-only machines never need it.
    """
    from clu import metric_writers

    is_lead = jax.process_index() == 0
    writer = metric_writers.create_default_writer(logdir, just_logging=not is_lead, asynchronous=True)
    if use_wandb and is_lead:
        writer = metric_writers.MultiWriter([writer, _WandbWriter(workdir or logdir, config or {})])
    return writer


class Throughput:
    """Wall-clock rates over the window since the last report: s/step, tokens/s, MFU."""

    def __init__(self, tokens_per_step: int, flops_per_token_: float, num_devices: int, peak_flops_per_device: float):
        self.tokens_per_step = tokens_per_step
        self.flops_per_token = flops_per_token_
        self.num_devices = num_devices
        self.peak = peak_flops_per_device
        self._mark = None
        self._paused = 0.0

    def start(self, step: int) -> None:
        """Opens a window at `step`."""
        self._mark = (step, time.perf_counter())
        self._paused = 0.0

    @contextlib.contextmanager
    def paused(self):
        """Time spent inside (validation, say) is not training time."""
        began = time.perf_counter()
        try:
            yield
        finally:
            self._paused += time.perf_counter() - began

    def report(self, step: int) -> dict[str, float]:
        """Rates since the window opened; opens the next window."""
        if self._mark is None or step <= self._mark[0]:
            self.start(step)
            return {}
        start_step, start_time = self._mark
        elapsed = time.perf_counter() - start_time - self._paused
        steps = step - start_step
        tokens_per_sec = self.tokens_per_step * steps / elapsed
        self.start(step)
        out = {"train/step_time": elapsed / steps, "train/tokens_per_sec": tokens_per_sec}
        if self.peak > 0:
            out["train/mfu"] = mfu(tokens_per_sec, self.flops_per_token, self.num_devices, self.peak)
        return out


def log_process0(message: str, *args) -> None:
    """logging.info on process 0 only (other processes' logs would repeat it)."""
    if jax.process_index() == 0:
        logging.info(message, *args)
