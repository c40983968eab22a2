"""Dynamic batching for the server: requests that arrive together decode as one batch.

HTTP handlers turn each completion they want into a `Job` (one prompt, one
row) and `submit` it; a single worker thread owns the Sampler, takes the first
waiting job, gathers more for up to `max_wait_ms` or until `max_batch_size`
rows, and runs the scoring jobs and the generation jobs of that window as one
`Sampler.score` and one `Sampler.generate` call. Per-row settings
(temperature, top-p, top-k, seed, stop strings, max tokens) let unrelated
requests share a batch, and per-row randomness makes a row's result the same
whatever it was batched with.

The queue is bounded: `submit` raises `QueueFull` rather than letting a burst
grow memory without limit (the server answers 429). A batch that fails is
retried row by row, so one bad row fails only its own request.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import queue
import threading
import time
from typing import Any, Callable

from gptj.sampling import Generation, Sampler

GENERATE, SCORE = "generate", "score"


class QueueFull(RuntimeError):
    """The request queue has no room for the submitted rows."""


@dataclasses.dataclass
class Job:
    """One row of work: score `prompt`, or generate a completion of it.

    `future` resolves to a `Generation` (generate) or a `Score` (score).
    `on_update`, when set, is called from the worker thread with the row's
    partial Generation as decoding proceeds (streaming).
    """

    kind: str
    prompt: list[int]
    max_new_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0
    stop: list[str] = dataclasses.field(default_factory=list)
    top_logprobs: int = 0
    on_update: Callable[[Generation], None] | None = None
    future: concurrent.futures.Future = dataclasses.field(default_factory=concurrent.futures.Future)


class BatchingEngine:
    """Owns the Sampler on one worker thread and batches the jobs submitted to it."""

    def __init__(self, sampler: Sampler, *, max_batch_size: int = 8, max_wait_ms: float = 20.0,
                 max_queue: int = 256):
        if max_batch_size < 1 or max_queue < 1 or max_wait_ms < 0:
            raise ValueError("max_batch_size and max_queue must be >= 1 and max_wait_ms >= 0")
        self.sampler = sampler
        self.max_batch_size = int(max_batch_size)
        self.max_wait = float(max_wait_ms) / 1000.0
        self.max_queue = int(max_queue)
        self._queue: queue.Queue[Job] = queue.Queue()
        self._pending = 0  # rows queued or running; bounded by max_queue
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.counters = {"requests": 0, "rows": 0, "decode_batches": 0, "score_batches": 0, "rejected": 0,
                         "failed_rows": 0}

    # -- lifecycle ----------------------------------------------------------------------

    def start(self) -> None:
        if self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name="gptj-batcher", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        """Stops the worker after its current batch; jobs still queued fail with an error."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        while True:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                break
            self._fail(job, RuntimeError("server shutting down"))

    @property
    def queued(self) -> int:
        return self._pending

    # -- submission ---------------------------------------------------------------------

    def submit(self, jobs: list[Job]) -> None:
        """Queues all of `jobs` (one request's rows) or none of them; raises QueueFull when they do not fit."""
        with self._lock:
            if self._pending + len(jobs) > self.max_queue:
                self.counters["rejected"] += 1
                raise QueueFull(f"the request queue is full ({self._pending} of {self.max_queue} rows busy)")
            self._pending += len(jobs)
            self.counters["requests"] += 1
            self.counters["rows"] += len(jobs)
        for job in jobs:
            self._queue.put(job)

    # -- the worker ---------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                first = self._queue.get(timeout=0.05)
            except queue.Empty:
                continue
            batch = [first]
            deadline = time.monotonic() + self.max_wait
            while len(batch) < self.max_batch_size:
                remaining = deadline - time.monotonic()
                try:
                    batch.append(self._queue.get(timeout=remaining) if remaining > 0 else self._queue.get_nowait())
                except queue.Empty:
                    break
            for kind in (SCORE, GENERATE):
                group = [job for job in batch if job.kind == kind]
                if group:
                    self._execute(kind, group)
            with self._lock:
                self._pending -= len(batch)

    def _execute(self, kind: str, jobs: list[Job]) -> None:
        # A job whose client went away (future cancelled) is dropped here.
        jobs = [job for job in jobs if job.future.set_running_or_notify_cancel()]
        if not jobs:
            return
        try:
            results = self._call(kind, jobs)
        except Exception as error:  # noqa: BLE001 - anything a batch raises must not stop the server
            if len(jobs) == 1:
                self._fail(jobs[0], error)
                return
            logging.warning("batch of %d failed (%s); retrying its rows one by one", len(jobs), error)
            for job in jobs:
                try:
                    [result] = self._call(kind, [job])
                except Exception as row_error:  # noqa: BLE001
                    self._fail(job, row_error)
                else:
                    job.future.set_result(result)
            return
        for job, result in zip(jobs, results):
            job.future.set_result(result)

    def _call(self, kind: str, jobs: list[Job]) -> list[Any]:
        top = max(job.top_logprobs for job in jobs)
        if kind == SCORE:
            self.counters["score_batches"] += 1
            return self.sampler.score([job.prompt for job in jobs], top_logprobs=top)
        streaming = [job for job in jobs if job.on_update is not None]
        callback = None
        if streaming:
            def callback(row: int, generation: Generation) -> None:
                job = jobs[row]
                if job.on_update is None:
                    return
                try:
                    job.on_update(generation)
                except Exception as error:  # noqa: BLE001 - a listener that went away must not fail the batch
                    logging.info("stopped streaming a row whose listener failed (%s)", error)
                    job.on_update = None
        self.counters["decode_batches"] += 1
        return self.sampler.generate(
            [job.prompt for job in jobs], max_new_tokens=[job.max_new_tokens for job in jobs],
            temperature=[job.temperature for job in jobs], top_p=[job.top_p for job in jobs],
            top_k=[job.top_k for job in jobs], seed=[job.seed for job in jobs], stop=[job.stop for job in jobs],
            top_logprobs=top, callback=callback)

    def _fail(self, job: Job, error: BaseException) -> None:
        self.counters["failed_rows"] += 1
        if not job.future.done():
            job.future.set_exception(error)
