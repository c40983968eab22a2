"""Continuous batching: a fixed number of slots over one KV cache, scheduled per decode step.

    engine = Engine(runner, slots=8, tokenizer=tok)
    jobs = [Job(GENERATE, ids, max_new_tokens=32, temperature=0.0) for ids in prompts]
    engine.submit(jobs)
    engine.run_until_idle()       # synchronous (what Sampler.generate does); engine.start() for a server
    generations = [job.future.result() for job in jobs]

Each scheduler step (vLLM, TGI and JetStream schedule the same way):
  1. drops cancelled rows, freeing their slots, and admits waiting rows into free slots, oldest first;
  2. runs at most one scoring batch (echo + logprobs requests) of at most `prefill_chunk` tokens;
  3. runs at most one prefill call: the next chunk (<= `prefill_chunk` tokens) of the oldest prompt
     still prefilling, with other prompts at the same cursor while the call stays within `prefill_budget`;
  4. runs one decode call over every decoding slot: 1 step while a prompt is still prefilling or
     scores wait (so a long prompt delays running rows by one chunk at a time), otherwise up to
     `decode_steps`, ending early when a row finishes while requests wait for a slot.
A row that finishes (max tokens, EOS, a stop string, a cancelled client) frees its slot at once.

Adapters: a job's `adapter` names a LoRA adapter loaded beside the base (`gptj.inference.adapters`:
`load_adapter` / `unload_adapter`, within the runner's adapter pool); every program call runs rows of
any adapters and of the base together, each through its own. Unloading waits for the adapter's rows.

Prefix cache (`prefix_cache_gib` > 0): the keys and values of a prompt's full blocks of
`prefix_block_size` tokens are copied into a block store as the prompt is prefilled, and stay there after
the row ends, keyed by the tokens up to the block's end and the adapter (`gptj.inference.prefix_cache`;
least recently used blocks go first). A row whose prompt starts with stored blocks gets them copied into
its slot and prefills only the rest (at least its last token, whose logits it samples from); a prompt
whose next block an older row is computing waits for it instead of computing it too. Only prompt blocks
are stored (keys computed by prefill, as a prompt without the cache computes them), so a row's output is
the same with and without the cache. Scoring (echo + logprobs) runs whole sequences and does not use it.

Each slot is one sequence at its own positions (`gptj.inference.runner`), so a row's
greedy tokens do not depend on what else is running, and a sampled row draws
from fold_in(PRNGKey(seed), i) for its i-th token, as it would alone.
The engine keeps counters, histograms (time to first token, time per output
token, queue wait) and a bounded log of what each step ran (`step_log`).
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import itertools
import logging
import math
import threading
import time
from typing import Callable, Sequence

import numpy as np

from gptj.inference.adapters import Adapter, AdapterRegistry, read_adapter
from gptj.inference.prefix_cache import PrefixIndex, block_keys, prefix_block_bytes, store_blocks
from gptj.inference.runner import (ADAPTER, EOS, MAX_TOP_LOGPROBS, MIN_LENGTH_BUCKET, MIN_TOKENS, NO_ADAPTER, POS,
                                   REMAINING, ROW_FIELDS, SEED, STEP, TEMPERATURE, TOKEN, TOP_K, TOP_P, Generation,
                                   ModelRunner)
from gptj.inference.sampling_ops import bucket

GENERATE, SCORE = "generate", "score"


class QueueFull(RuntimeError):
    """More rows are waiting than the engine's `max_queue` allows."""


@dataclasses.dataclass(eq=False)
class Job:
    """One row of work: score `prompt`, or generate a completion of it.

    `future` resolves to a `Generation` (generate) or a `Score` (score).
    `on_update`, when set, is called from the engine's thread with the row's
    partial Generation after each step that adds tokens, and once finished
    (streaming). `eos_id` -1 keeps the engine's EOS; None disables it.
    `ignore_eos` (vLLM's meaning): the row runs to `max_new_tokens` whatever
    it samples; EOS tokens it draws stay in `tokens` but not in the text.
    `min_tokens`: EOS is never drawn before that many tokens (unless
    `ignore_eos`: it ends nothing then), and no stop string ends the row
    before them. `adapter` names a loaded adapter to run through ("": the
    base); `Engine.submit` resolves it (`served_adapter`).
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
    eos_id: int | None = -1
    ignore_eos: bool = False
    min_tokens: int = 0
    adapter: str = ""
    on_update: Callable[[Generation], None] | None = None
    future: concurrent.futures.Future = dataclasses.field(default_factory=concurrent.futures.Future)
    cancelled: bool = False
    # Decode calls the engine had made when cancel() was called and when the slot was freed.
    cancelled_at_call: int | None = None
    freed_at_call: int | None = None
    submitted_at: float = 0.0
    served_adapter: Adapter | None = None

    @property
    def adapter_slot(self) -> int:
        """The adapter pool slot the job runs through (NO_ADAPTER: the base)."""
        return NO_ADAPTER if self.served_adapter is None else self.served_adapter.slot


@dataclasses.dataclass(eq=False)
class _Row:
    """A generate job in a slot: how much of its prompt is cached and what it has produced.

    `keys` are the prefix-cache keys of its prompt's full blocks (none without a cache); the first `stored`
    of them are known to be in the block store (restored from it, or saved to it).
    """

    job: Job
    slot: int
    order: int
    eos: int            # the id that ends the row on the device (-1: none)
    hidden: int | None  # an id left out of the text (EOS under ignore_eos)
    admitted_at: float
    keys: list = dataclasses.field(default_factory=list)
    stored: int = 0
    reused: int = 0  # prompt tokens taken from the prefix cache
    cursor: int = 0
    tokens: list = dataclasses.field(default_factory=list)
    logprobs: list = dataclasses.field(default_factory=list)
    top: list = dataclasses.field(default_factory=list)
    first_token_at: float | None = None
    last_token_at: float | None = None

    @property
    def prefilling(self) -> bool:
        return self.cursor < len(self.job.prompt)


class Histogram:
    """A Prometheus histogram of seconds (cumulative buckets, sum and count); thread-safe."""

    BOUNDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)

    def __init__(self):
        self._counts = [0] * (len(self.BOUNDS) + 1)
        self.sum, self.count = 0.0, 0
        self._lock = threading.Lock()

    def observe(self, seconds: float, times: int = 1) -> None:
        """Records `times` observations of `seconds`."""
        with self._lock:
            self._counts[next((i for i, b in enumerate(self.BOUNDS) if seconds <= b), len(self.BOUNDS))] += times
            self.sum += seconds * times
            self.count += times

    def prometheus(self, name: str, help_text: str, labels: str = "") -> list[str]:
        """The histogram in Prometheus' text exposition format; `labels` ('a="x",b="y"') go on every sample."""
        with self._lock:
            counts, total, count = list(self._counts), self.sum, self.count
        lines = [f"# HELP {name} {help_text}", f"# TYPE {name} histogram"]
        extra = f",{labels}" if labels else ""
        for bound, cumulative in zip(self.BOUNDS + (float("inf"),), itertools.accumulate(counts)):
            le = "+Inf" if bound == float("inf") else repr(bound)
            lines.append(f'{name}_bucket{{le="{le}"{extra}}} {cumulative}')
        tag = f"{{{labels}}}" if labels else ""
        return lines + [f"{name}_sum{tag} {total}", f"{name}_count{tag} {count}"]


HISTOGRAMS = {
    "time_to_first_token_seconds": "Seconds from a generate row's submission to its first token.",
    "time_per_output_token_seconds": "Seconds per output token after the first, per finished row.",
    "inter_token_latency_seconds": "Seconds between a row's successive tokens (a step's tokens share its time).",
    "e2e_request_latency_seconds": "Seconds from a generate row's submission to its end.",
    "queue_wait_seconds": "Seconds a row waited for a slot (or a scoring batch).",
}


class Engine:
    """Slots over one KV cache of a ModelRunner, with the scheduler above.

    Args:
      runner: the model's programs (`gptj.inference.runner.ModelRunner`).
      slots: rows decoded together (rounded up to the batch axis' mesh size).
      cache_len: columns per slot (default the model's context); a row needs
        prompt + max_new_tokens of them.
      prefill_chunk: most tokens of one prompt prefilled per call.
      prefill_budget: most tokens (rows x padded chunk) per prefill call
        (default `prefill_chunk`): what a decoding row can be delayed by.
      decode_steps: most decode steps per call when nothing else waits.
      max_queue: most rows waiting for a slot (or a scoring batch); more is QueueFull.
      tokenizer: for stop strings and `Generation.text`.
      eos_id: the token that ends a row (None: none).
      prefix_cache_gib: memory of the prefix block store (0: no prefix cache).
      prefix_block_size: tokens per prefix block.
    """

    def __init__(self, runner: ModelRunner, *, slots: int = 8, cache_len: int | None = None,
                 prefill_chunk: int = 512, prefill_budget: int | None = None, decode_steps: int = 4,
                 max_queue: int = 256, tokenizer=None, eos_id: int | None = None, log_size: int = 4096,
                 prefix_cache_gib: float = 0.0, prefix_block_size: int = 64):
        if slots < 1 or max_queue < 1 or decode_steps < 1 or prefill_chunk < 1 or prefix_block_size < 1:
            raise ValueError("slots, max_queue, decode_steps, prefill_chunk and prefix_block_size must be >= 1")
        if not prefix_cache_gib >= 0:
            raise ValueError(f"prefix_cache_gib must be >= 0 (0: no prefix cache), got {prefix_cache_gib}")
        self.runner = runner
        self.slots = -(-int(slots) // runner.row_multiple) * runner.row_multiple
        self.cache_len = int(cache_len or runner.config.max_len)
        if not 1 <= self.cache_len <= runner.config.max_len:
            raise ValueError(f"cache_len must lie in [1, {runner.config.max_len}], got {cache_len}")
        self.prefill_chunk = min(int(prefill_chunk), self.cache_len)
        self.prefill_budget = max(int(prefill_budget or prefill_chunk), self.prefill_chunk)
        self.decode_steps = int(decode_steps)
        self.max_queue = int(max_queue)
        self.tokenizer = tokenizer
        self.eos_id = eos_id
        self._cache = runner.new_cache(self.slots, self.cache_len)
        self._row_counts = sorted({runner.row_bucket(n) for n in range(1, self.slots + 1)})
        self._pick_rows = self._row_counts[-1]  # prefill logits are padded to one shape for the pick program
        self._rows: list[_Row | None] = [None] * self.slots
        self._waiting: collections.deque[Job] = collections.deque()
        self._scoring: collections.deque[Job] = collections.deque()
        self._order = itertools.count()
        self._lock = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.counters = {"requests": 0, "rows": 0, "rejected": 0, "finished_rows": 0, "failed_rows": 0,
                         "cancelled_rows": 0, "tokens_generated": 0, "prompt_tokens": 0, "prefilled_tokens": 0,
                         "scored_rows": 0, "prefill_calls": 0, "decode_calls": 0, "decode_steps": 0, "score_calls": 0,
                         "prefix_cache_queries": 0, "prefix_cache_hits": 0, "prefix_cache_misses": 0,
                         "prefix_cache_tokens_saved": 0,
                         "adapters_loaded": 0, "adapters_unloaded": 0}
        self.adapters = AdapterRegistry(runner.adapter_slots)
        self._control: collections.deque = collections.deque()  # work for the engine's thread (pool writes)
        self.prefix_block_size = int(prefix_block_size)
        self._row_blocks = self.cache_len // self.prefix_block_size  # blocks a row's columns hold
        blocks = store_blocks(prefix_cache_gib, prefix_block_bytes(runner.config, self.prefix_block_size),
                              self._row_blocks)
        self._prefix = PrefixIndex(blocks, self.prefix_block_size) if blocks > 0 else None
        self._store = runner.new_prefix_store(blocks, self.prefix_block_size) if self._prefix else None
        self.histograms = {name: Histogram() for name in HISTOGRAMS}
        self.step_log: collections.deque[dict] = collections.deque(maxlen=log_size)

    # -- submission (any thread) --------------------------------------------------------

    def check(self, job: Job) -> None:
        """Raises ValueError for a job this engine cannot run (kind, lengths, settings)."""
        if job.kind not in (GENERATE, SCORE):
            raise ValueError(f"job kind must be {GENERATE!r} or {SCORE!r}, got {job.kind!r}")
        [job.prompt] = self.runner.check_tokens([job.prompt])
        if not 0 <= job.top_logprobs <= MAX_TOP_LOGPROBS:
            raise ValueError(f"top_logprobs must be in [0, {MAX_TOP_LOGPROBS}], got {job.top_logprobs}")
        if job.kind == SCORE:
            if len(job.prompt) > self.runner.config.max_len:
                raise ValueError(f"a sequence of {len(job.prompt)} tokens exceeds the model's context of "
                                 f"{self.runner.config.max_len}")
            return
        if job.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {job.max_new_tokens}")
        if not 0 <= job.min_tokens <= job.max_new_tokens:
            raise ValueError(f"min_tokens must lie in [0, max_new_tokens={job.max_new_tokens}], got {job.min_tokens}")
        if len(job.prompt) + job.max_new_tokens > self.cache_len:
            raise ValueError(f"a prompt of {len(job.prompt)} tokens with max_new_tokens={job.max_new_tokens} "
                             f"exceeds the engine's {self.cache_len} tokens per row")
        if job.temperature < 0 or not np.isfinite(job.temperature):
            raise ValueError(f"temperature must be a finite number >= 0, got {job.temperature}")
        if not 0.0 < job.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {job.top_p}")
        if job.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 disables it), got {job.top_k}")
        if job.stop and self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer")

    def submit(self, jobs: Sequence[Job]) -> None:
        """Queues all of `jobs` (one request's rows) or none; QueueFull when more than max_queue rows would wait,
        UnknownAdapterError when a job names an adapter that is not loaded (or is being unloaded)."""
        for job in jobs:
            self.check(job)
        now = time.monotonic()
        with self._lock:
            waiting = len(self._waiting) + len(self._scoring)
            if waiting + len(jobs) > self.max_queue:
                self.counters["rejected"] += 1
                raise QueueFull(f"{waiting} rows are waiting and this engine queues at most {self.max_queue}")
            self._acquire_adapters(jobs)
            for job in jobs:
                job.submitted_at = now
                (self._scoring if job.kind == SCORE else self._waiting).append(job)
            self.counters["requests"] += 1
            self.counters["rows"] += len(jobs)
            self._lock.notify_all()

    def _acquire_adapters(self, jobs: Sequence[Job]) -> None:
        """Resolves each job's adapter, counting it as used until the job's future is done (all or none)."""
        taken = []
        try:
            for job in jobs:
                if job.adapter:
                    job.served_adapter = self.adapters.acquire(job.adapter)
                    taken.append(job)
        except Exception:
            for job in taken:
                self.adapters.release(job.served_adapter)
                job.served_adapter = None
            raise
        for job in taken:
            job.future.add_done_callback(lambda _, adapter=job.served_adapter: self.adapters.release(adapter))

    # -- adapters (any thread) ----------------------------------------------------------

    def load_adapter(self, name: str, path: str) -> Adapter:
        """Reads the adapter at `path` (on this thread), writes it into a free pool slot (on the engine's
        thread, between steps) and makes `name` take requests; returns it. AdapterError (one line) for a
        name in use, no free slot, or an adapter that cannot be read or does not fit the base."""
        slot = self.adapters.reserve(name)
        try:
            lora, entry = read_adapter(path, self.runner)
            self._on_engine_thread(lambda: self.runner.write_adapter(slot, entry)).result()
        except BaseException:
            self.adapters.unreserve(name)
            raise
        self.counters["adapters_loaded"] += 1
        return self.adapters.activate(name, path, lora)

    def unload_adapter(self, name: str) -> concurrent.futures.Future:
        """Stops `name` taking requests; the future resolves (to the Adapter) once the rows already using it
        have finished and its slot is free. UnknownAdapterError if it is not loaded."""
        future = self.adapters.drain(name)
        future.add_done_callback(lambda _: self.counters.__setitem__("adapters_unloaded",
                                                                     self.counters["adapters_unloaded"] + 1))
        with self._lock:
            self._lock.notify_all()  # the engine forgets the adapter's prefix blocks at its next step
        return future

    def _on_engine_thread(self, action: Callable[[], None]) -> concurrent.futures.Future:
        """Runs `action` between two steps of the engine's thread (here and now when none runs)."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        if self._thread is None:
            action()
            future.set_result(None)
            return future
        with self._lock:
            self._control.append((action, future))
            self._lock.notify_all()
        return future

    def _run_control(self) -> None:
        """The actions queued for this thread, and forgetting the prefix blocks of unloaded adapters."""
        while True:
            with self._lock:
                if not self._control:
                    break
                action, future = self._control.popleft()
            try:
                action()
                future.set_result(None)
            except Exception as error:  # noqa: BLE001 - the caller gets the error, the engine goes on
                future.set_exception(error)
        for namespace in self.adapters.retired():
            if self._prefix is not None:
                self._prefix.drop(namespace)

    def cancel(self, jobs: Sequence[Job]) -> None:
        """Stops `jobs` (their client went away): waiting ones leave the queue at once, running ones free
        their slot before the next decode call."""
        with self._lock:
            for job in jobs:
                if job.future.done() or job.cancelled:
                    continue
                job.cancelled = True
                job.cancelled_at_call = self.counters["decode_calls"]
                if job.future.cancel():  # still waiting: never started
                    queue = self._scoring if job.kind == SCORE else self._waiting
                    if job in queue:
                        queue.remove(job)
                    self.counters["cancelled_rows"] += 1
            self._lock.notify_all()

    # -- state for /health and /metrics -------------------------------------------------

    @property
    def waiting_rows(self) -> int:
        return len(self._waiting) + len(self._scoring)

    @property
    def running_slots(self) -> int:
        return sum(row is not None for row in self._rows)

    def adapter_activity(self) -> tuple[list[str], list[str]]:
        """(the adapters of rows in a slot, the adapters of rows waiting for one), each sorted."""
        running = {r.job.adapter for r in list(self._rows) if r is not None and r.job.adapter}
        with self._lock:
            waiting = {job.adapter for job in list(self._waiting) + list(self._scoring) if job.adapter}
        return sorted(running), sorted(waiting)

    GAUGES = ("slots", "running_slots", "prefilling_slots", "waiting_rows", "adapters", "prefix_cache_blocks",
              "prefix_cache_blocks_used")

    def health(self) -> dict:
        """Slots, queue, adapters, prefix cache and counters as plain numbers (and each adapter's rows)."""
        rows = list(self._rows)
        adapters = self.adapters.describe()
        prefix = self._prefix
        return {"slots": self.slots, "running_slots": sum(r is not None for r in rows),
                "prefilling_slots": sum(r is not None and r.prefilling for r in rows),
                "waiting_rows": self.waiting_rows, **self.counters,
                "prefix_cache_blocks": prefix.blocks if prefix else 0,
                "prefix_cache_blocks_used": prefix.used if prefix else 0,
                "prefix_cache_evictions": prefix.evictions if prefix else 0,
                "prefix_block_size": self.prefix_block_size,
                "programs_compiled": self.runner.stats["programs"],
                "compiled_while_serving": self.runner.stats["compiled_while_serving"],
                **adapters, "adapters": len(adapters["adapters"]), "adapter_rows": adapters["adapters"]}

    def prometheus(self, prefix: str = "gptj") -> str:
        """/metrics: gauges, counters and the latency histograms in Prometheus' text format."""
        health = self.health()
        lines = []
        for name in self.GAUGES:
            lines += [f"# TYPE {prefix}_{name} gauge", f"{prefix}_{name} {health[name]}"]
        for name in list(self.counters) + ["prefix_cache_evictions", "programs_compiled", "compiled_while_serving"]:
            lines += [f"# TYPE {prefix}_{name}_total counter", f"{prefix}_{name}_total {health[name]}"]
        for name, help_text in HISTOGRAMS.items():
            lines += self.histograms[name].prometheus(f"{prefix}_{name}", help_text)
        return "\n".join(lines) + "\n"

    # -- running ------------------------------------------------------------------------

    def has_work(self) -> bool:
        return bool(self._waiting or self._scoring or self._control or any(r is not None for r in self._rows))

    def run_until_idle(self) -> None:
        """Steps on this thread until every submitted job has finished."""
        while self.has_work():
            self.step()

    def start(self) -> None:
        """Runs the scheduler on a worker thread until `stop()`; new program shapes are then logged as warnings."""
        if self._thread is None:
            self._stopping = False
            self.runner.serving = True
            self._thread = threading.Thread(target=self._serve, name="gptj-engine", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        """Stops the worker after its current step; every unfinished job fails with an error."""
        with self._lock:
            self._stopping = True
            self._lock.notify_all()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self.runner.serving = False
        error = RuntimeError("the server is shutting down")
        with self._lock:
            left = list(self._waiting) + list(self._scoring)
            self._waiting.clear()
            self._scoring.clear()
            control, self._control = list(self._control), collections.deque()
        for _, future in control:
            future.set_exception(error)
        for job in left:
            self._fail(job, error)
        for row in list(self._rows):
            if row is not None:
                self._free(row)
                self._fail(row.job, error)

    def _serve(self) -> None:
        while True:
            with self._lock:
                while not self._stopping and not self.has_work():
                    self._lock.wait()
                if self._stopping:
                    return
            try:
                self.step()
            except Exception as error:  # noqa: BLE001 - a failed device call must not stop the server
                logging.exception("engine step failed; failing the rows in flight and resetting the cache")
                self._reset(error)

    def warmup(self) -> int:
        """Compiles every program this engine can run (each prefill shape, the pick, the decode loop, with and
        without top log-probabilities), touching no slot. Returns how many programs were compiled."""
        before = self.runner.stats["programs"]
        idle_rows = np.zeros((self.slots, ROW_FIELDS), np.int32)
        idle_f = np.ones((self.slots, 2), np.float32)
        for length in self._chunk_lengths():
            # Every row count up to the budget: a call's rows are padded to the next power of two only,
            # not to the budget (a few co-arriving prompts cost their own tokens, for ~2x the programs).
            for k in [k for k in self._row_counts if k <= self._most_rows(length)]:
                self._cache, logits = self.runner.prefill(
                    self._cache, np.full(k, self.slots, np.int32), np.zeros((k, length), np.int32),
                    np.zeros(k, np.int32), 0, self._pick_rows)
        for num_top in (0, MAX_TOP_LOGPROBS):
            self._cache, _ = self.runner.decode(self._cache, idle_rows, idle_f, 0, False, self.decode_steps, num_top)
            self.runner.pick(logits, np.zeros((self._pick_rows, ROW_FIELDS), np.int32),
                             np.ones((self._pick_rows, 2), np.float32), num_top)
        if self._prefix is not None:  # a copy into the padding slot past the cache's rows changes nothing
            skip = np.full(self._row_blocks, self._prefix.blocks, np.int32)
            self._store = self.runner.save_prefix(self._store, self._cache, self.slots, skip)
            self._cache = self.runner.restore_prefix(self._cache, self._store, self.slots, skip, 0)
        return self.runner.stats["programs"] - before

    def _chunk_lengths(self) -> list[int]:
        """The padded chunk lengths _prefill_group can pick: powers of two below the chunk, the chunk, and
        what is left of a row's columns when that is less than a chunk (a prompt restored from the prefix
        cache starts at a multiple of the block size)."""
        powers = {min(bucket(n, MIN_LENGTH_BUCKET), self.prefill_chunk) for n in range(1, self.prefill_chunk + 1)}
        stride = math.gcd(self.prefill_chunk, self.prefix_block_size) if self._prefix else self.prefill_chunk
        rests = {room for room in range(self.cache_len, 0, -stride) if room < self.prefill_chunk}
        return sorted(powers | rests)

    def _most_rows(self, length: int) -> int:
        """The most rows a prefill call of chunks of `length` tokens may have: as many as fit the budget
        (at least one)."""
        fits = [k for k in self._row_counts if k * length <= self.prefill_budget]
        return max(fits, default=self._row_counts[0])

    def step(self) -> bool:
        """One scheduler step (see the module docstring); returns whether it ran anything."""
        self._run_control()
        self._sweep_cancelled()
        self._admit()
        ran = False
        if self._scoring:
            ran = self._score_batch() or ran
        group = self._prefill_group()
        if group is not None:
            self._prefill(*group)
            ran = True
        self._sweep_cancelled()  # a client may have left during the prefill: not one more decode step for it
        decoding = [r for r in self._rows if r is not None and not r.prefilling]
        if decoding:
            self._decode(decoding)
            ran = True
        return ran

    # -- scheduling ---------------------------------------------------------------------

    def _log(self, kind: str, **fields) -> None:
        self.step_log.append({"kind": kind, "call": self.counters["decode_calls"], "time": time.monotonic(),
                              **fields})

    def _sweep_cancelled(self) -> None:
        for row in self._rows:
            if row is not None and row.job.cancelled:
                self.counters["cancelled_rows"] += 1
                self._free(row)
                self._log("cancelled", slot=row.slot, requested_at_call=row.job.cancelled_at_call)

    def _admit(self) -> None:
        free = [slot for slot, row in enumerate(self._rows) if row is None]
        while free:
            with self._lock:
                if not self._waiting:
                    return
                job = self._waiting.popleft()
            if not job.future.set_running_or_notify_cancel():
                continue
            now = time.monotonic()
            self.histograms["queue_wait_seconds"].observe(now - job.submitted_at)
            if job.max_new_tokens == 0:
                self._complete(job, [], [], [], "length")
                continue
            slot = free.pop(0)
            eos = self.eos_id if job.eos_id == -1 else job.eos_id
            eos = -1 if eos is None else int(eos)
            row = _Row(job, slot, next(self._order), -1 if job.ignore_eos else eos,
                       eos if job.ignore_eos and eos >= 0 else None, now)
            self._rows[slot] = row
            self.counters["prompt_tokens"] += len(job.prompt)
            self._log("admit", slot=slot, prompt_tokens=len(job.prompt))
            if self._prefix is not None:
                namespace = "" if job.served_adapter is None else job.served_adapter.namespace
                row.keys = block_keys(job.prompt, self.prefix_block_size, namespace)
                self.counters["prefix_cache_queries"] += len(job.prompt)
                self._extend_from_store(row)

    # -- the prefix cache ---------------------------------------------------------------

    def _extend_from_store(self, row: _Row) -> int:
        """Copies the stored blocks that continue a row's prompt from its cursor into its slot (at most up to
        its prompt's last token, which it must prefill to sample from); returns how many tokens that saved."""
        size = self.prefix_block_size
        first, limit = row.cursor // size, (len(row.job.prompt) - 1) // size
        if row.cursor % size or first >= limit:
            return 0
        found = self._prefix.lookup(row.keys[first:limit])
        if not found:
            return 0
        blocks = np.full(self._row_blocks, self._prefix.blocks, np.int32)  # out of range: keep the slot's own
        blocks[first:first + len(found)] = found
        self._cache = self.runner.restore_prefix(self._cache, self._store, row.slot, blocks, first + len(found))
        saved = len(found) * size
        row.cursor += saved
        row.reused += saved
        row.stored = max(row.stored, first + len(found))
        self.counters["prefix_cache_tokens_saved"] += saved
        self._log("restore", slot=row.slot, start=first * size, tokens=saved)
        return saved

    def _save_to_store(self, row: _Row) -> None:
        """After a row's prefill chunk: copies its prompt blocks so far that the store lacks into it (the whole
        chain is offered, so a block evicted since it was stored is stored again and no block of the chain is
        evicted for another)."""
        done = min(row.cursor // self.prefix_block_size, len(row.keys))
        if done <= row.stored:
            return
        namespace = "" if row.job.served_adapter is None else row.job.served_adapter.namespace
        placed = self._prefix.add(row.keys[:done], namespace)
        row.stored = done
        if any(block is not None for block in placed):
            blocks = np.full(self._row_blocks, self._prefix.blocks, np.int32)  # out of range: not saved
            for i, block in enumerate(placed):
                if block is not None:
                    blocks[i] = block
            self._store = self.runner.save_prefix(self._store, self._cache, row.slot, blocks)

    def _computing(self, row: _Row, older: list[_Row]) -> bool:
        """Whether an older prefilling row will compute the block `row` needs next (the same tokens up to its
        end, through the same adapter): then `row` waits and takes it from the store."""
        if self._prefix is None or row.cursor % self.prefix_block_size:
            return False
        block = row.cursor // self.prefix_block_size
        if block >= len(row.keys):
            return False
        return any(block < len(o.keys) and o.keys[block] == row.keys[block] and o.cursor <= row.cursor
                   for o in older)

    def _score_batch(self) -> bool:
        """Scores the oldest waiting sequences that fit in one call of `prefill_chunk` tokens (at least one)."""
        jobs, length = [], 0
        with self._lock:
            while self._scoring:
                job = self._scoring[0]
                longer = bucket(max(length, len(job.prompt)), MIN_LENGTH_BUCKET)
                if jobs and self.runner.row_bucket(len(jobs) + 1) * longer > self.prefill_chunk:
                    break
                jobs.append(self._scoring.popleft())
                length = max(length, len(job.prompt))
        jobs = [job for job in jobs if job.future.set_running_or_notify_cancel()]
        if not jobs:
            return False
        now = time.monotonic()
        for job in jobs:
            self.histograms["queue_wait_seconds"].observe(now - job.submitted_at)
        self.counters["score_calls"] += 1
        self._log("score", rows=len(jobs), tokens=sum(len(j.prompt) for j in jobs))
        try:
            scores = self.runner.score([job.prompt for job in jobs], top_logprobs=max(j.top_logprobs for j in jobs),
                                       adapter_ids=[job.adapter_slot for job in jobs])
        except Exception as error:  # noqa: BLE001 - a failed scoring call fails only its own rows
            logging.exception("scoring batch failed")
            for job in jobs:
                self._fail(job, error)
            return True
        for job, score in zip(jobs, scores):
            self.counters["scored_rows"] += 1
            job.future.set_result(score)
        return True

    def _prefill_group(self):
        """(start, rows, padded rows, chunk length) of the next prefill call, or None.

        The oldest prompt still prefilling goes first, with the next oldest at the same cursor while
        their padded chunks fit one call of `prefill_budget` tokens.
        """
        pending = sorted((r for r in self._rows if r is not None and r.prefilling), key=lambda r: r.order)
        if self._prefix is not None:
            for row in pending:
                self._extend_from_store(row)  # blocks an older row saved since this one was admitted
            pending = [r for i, r in enumerate(pending) if r.prefilling and not self._computing(r, pending[:i])]
        if not pending:
            return None
        start = pending[0].cursor
        cap = min(self.cache_len - start, self.prefill_chunk)
        length_of = lambda rows: bucket(max(min(len(r.job.prompt) - start, cap) for r in rows),  # noqa: E731
                                        MIN_LENGTH_BUCKET, cap)
        group = [pending[0]]
        for row in pending[1:]:
            if row.cursor == start and len(group) < self._most_rows(length_of(group + [row])):
                group.append(row)
        return start, group, self.runner.row_bucket(len(group)), length_of(group)

    def _settings(self, row: _Row, out: np.ndarray, out_f: np.ndarray) -> None:
        """Writes a row's sampling settings and decode position into one row of the programs' arrays."""
        job, made = row.job, len(row.tokens)
        out[TOKEN] = row.tokens[-1] if made else 0
        out[POS] = len(job.prompt) + made - 1
        out[STEP] = made
        out[REMAINING] = job.max_new_tokens - made
        out[TOP_K] = job.top_k
        out[SEED] = np.array(job.seed & 0xFFFFFFFF, np.uint32).view(np.int32)
        out[EOS] = row.eos
        out[MIN_TOKENS] = job.min_tokens
        out[ADAPTER] = job.adapter_slot
        out_f[TEMPERATURE], out_f[TOP_P] = job.temperature, job.top_p

    def _prefill(self, start: int, group: list[_Row], k: int, length: int) -> None:
        slot_ids = np.full(k, self.slots, np.int32)  # padding rows point past the cache: never written
        tokens = np.zeros((k, length), np.int32)
        lengths = np.zeros(k, np.int32)
        adapter_ids = np.full(k, NO_ADAPTER, np.int32)
        for i, row in enumerate(group):
            chunk = row.job.prompt[start:start + length]
            tokens[i, :len(chunk)] = chunk
            lengths[i], slot_ids[i], adapter_ids[i] = len(chunk), row.slot, row.job.adapter_slot
        self.counters["prefill_calls"] += 1
        self.counters["prefilled_tokens"] += int(lengths.sum())
        self._log("prefill", slots=[r.slot for r in group], start=start, tokens=int(lengths.sum()),
                  shape=(k, length))
        self._cache, logits = self.runner.prefill(self._cache, slot_ids, tokens, lengths, start, self._pick_rows,
                                                  adapter_ids)
        for i, row in enumerate(group):
            row.cursor += int(lengths[i])
            if self._prefix is not None:
                self._save_to_store(row)
                if not row.prefilling and len(row.job.prompt) > self.prefix_block_size:
                    # A prompt of more than one block could have reused one: a hit if it did, else a miss.
                    self.counters["prefix_cache_hits" if row.reused else "prefix_cache_misses"] += 1
        ready = [(i, row) for i, row in enumerate(group) if not row.prefilling]
        if not ready:  # a middle chunk of a long prompt: nothing to sample yet
            return
        rows, rows_f = np.zeros((self._pick_rows, ROW_FIELDS), np.int32), np.ones((self._pick_rows, 2), np.float32)
        for i, row in ready:
            self._settings(row, rows[i], rows_f[i])
        num_top = MAX_TOP_LOGPROBS if any(row.job.top_logprobs for _, row in ready) else 0
        token, token_lp, top_ids, top_lps = self.runner.pick(logits, rows, rows_f, num_top)
        now = time.monotonic()
        for i, row in ready:
            row.first_token_at = row.last_token_at = now
            self.histograms["time_to_first_token_seconds"].observe(now - row.job.submitted_at)
            self._accept(row, token[i:i + 1], token_lp[i:i + 1], top_ids[i:i + 1], top_lps[i:i + 1])

    def _decode(self, decoding: list[_Row]) -> None:
        rows, rows_f = np.zeros((self.slots, ROW_FIELDS), np.int32), np.ones((self.slots, 2), np.float32)
        for row in decoding:
            self._settings(row, rows[row.slot], rows_f[row.slot])
        interleave = self._scoring or any(r is not None and r.prefilling for r in self._rows)
        steps = 1 if interleave else self.decode_steps
        num_top = MAX_TOP_LOGPROBS if any(r.job.top_logprobs for r in decoding) else 0
        self.counters["decode_calls"] += 1
        self._cache, (tokens, token_lps, top_ids, top_lps, produced) = self.runner.decode(
            self._cache, rows, rows_f, steps, bool(self._waiting), self.decode_steps, num_top)
        self.counters["decode_steps"] += int(produced.max())
        self._log("decode", slots=[r.slot for r in decoding], steps=int(produced.max()),
                  adapters=sorted({r.job.adapter_slot for r in decoding}))
        now = time.monotonic()
        for row in decoding:
            n = int(produced[row.slot])
            s = row.slot
            if n:
                self.histograms["inter_token_latency_seconds"].observe((now - row.last_token_at) / n, n)
                row.last_token_at = now
            self._accept(row, tokens[s, :n], token_lps[s, :n], top_ids[s, :n], top_lps[s, :n])

    def _text(self, ids: list[int], hidden: int | None) -> str:
        return self.tokenizer.decode(ids if hidden is None else [t for t in ids if t != hidden])

    def _accept(self, row: _Row, tokens, token_lps, top_ids, top_lps) -> None:
        """Adds a row's new tokens; finishes it on EOS, max tokens or a stop string; reports progress."""
        job, reason, ended_on_eos = row.job, None, False
        for i, token in enumerate(tokens.tolist()):
            if token == row.eos:
                reason, ended_on_eos = "stop", True
                break
            row.tokens.append(token)
            row.logprobs.append(float(token_lps[i]))
            if job.top_logprobs:
                row.top.append(list(zip(top_ids[i, :job.top_logprobs].tolist(),
                                        top_lps[i, :job.top_logprobs].tolist())))
        self.counters["tokens_generated"] += len(tokens)
        if reason is None and len(row.tokens) >= job.max_new_tokens:
            reason = "length"
        ids, text = row.tokens, None
        if self.tokenizer is not None and (job.stop or job.on_update is not None or reason is not None):
            text = self._text(ids, row.hidden)
            # A stop string counts only once it ends past the text of the first min_tokens - 1 tokens.
            start = len(self._text(ids[:job.min_tokens - 1], row.hidden)) if job.stop and job.min_tokens > 1 else 0
            cut = _find_stop(text, job.stop, start)
            if cut is not None:
                ids = _tokens_covering(lambda part: self._text(part, row.hidden), ids, cut)
                text, reason, ended_on_eos = text[:cut], "stop", False
        if reason is not None:
            self._free(row)
            self._complete(job, ids, row.logprobs[:len(ids)], row.top[:len(ids)], reason, text, row.first_token_at,
                           row.hidden, ended_on_eos)
        elif job.on_update is not None:
            self._notify(job, Generation(list(ids), row.logprobs[:len(ids)], None, text,
                                         row.top[:len(ids)] if job.top_logprobs else None))

    def _complete(self, job: Job, ids, logprobs, top, reason: str, text: str | None = None,
                  first_token_at: float | None = None, hidden: int | None = None, ended_on_eos: bool = False) -> None:
        if text is None and self.tokenizer is not None:
            text = self._text(ids, hidden)
        generation = Generation(list(ids), list(logprobs), reason, text, list(top) if job.top_logprobs else None,
                                ended_on_eos)
        now = time.monotonic()
        self.histograms["e2e_request_latency_seconds"].observe(now - job.submitted_at)
        if first_token_at is not None and len(ids) > 1:
            self.histograms["time_per_output_token_seconds"].observe((now - first_token_at) / (len(ids) - 1))
        self.counters["finished_rows"] += 1
        if job.on_update is not None:
            self._notify(job, generation)
        if not job.future.done():
            job.future.set_result(generation)

    @staticmethod
    def _notify(job: Job, generation: Generation) -> None:
        try:
            job.on_update(generation)
        except Exception as error:  # noqa: BLE001 - a listener that went away must not fail the row
            logging.info("stopped streaming a row whose listener failed (%s)", error)
            job.on_update = None

    def _free(self, row: _Row) -> None:
        if self._rows[row.slot] is row:
            self._rows[row.slot] = None
            row.job.freed_at_call = self.counters["decode_calls"]
            self._log("free", slot=row.slot)

    def _fail(self, job: Job, error: BaseException) -> None:
        self.counters["failed_rows"] += 1
        if not job.future.done():
            job.future.set_exception(error)

    def _reset(self, error: BaseException) -> None:
        """After a failed device call (whose donated cache or store may be gone): fail every row in a slot, new
        cache, empty prefix store."""
        for row in list(self._rows):
            if row is not None:
                self._free(row)
                self._fail(row.job, error)
        self._cache = self.runner.new_cache(self.slots, self.cache_len)
        if self._prefix is not None:
            self._prefix.clear()
            self._store = self.runner.new_prefix_store(self._prefix.blocks, self.prefix_block_size)


def _find_stop(text: str, stops: Sequence[str], start: int = 0) -> int | None:
    """Index of the earliest stop string in `text` that ends past character `start`, or None."""
    hits = [text.find(s, max(0, start - len(s) + 1)) for s in stops if s]
    hits = [h for h in hits if h >= 0]
    return min(hits) if hits else None


def _tokens_covering(decode: Callable[[list[int]], str], ids: list[int], chars: int) -> list[int]:
    """The shortest prefix of `ids` whose text reaches `chars` characters (the tokens before a stop string)."""
    for count in range(len(ids) + 1):
        if len(decode(ids[:count])) >= chars:
            return ids[:count]
    return ids
