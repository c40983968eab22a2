"""Input pipeline: seqio tasks -> per-host tf.data -> global `jax.Array` batches, resumable.

Each host reads its share of a task (`seqio.ShardInfo(process_index,
process_count)`: whole files when there are at least as many files as hosts,
otherwise every host-count-th record), batches `batch_size / process_count`
rows, and `jax.make_array_from_process_local_data` assembles the global batch
laid out by the rule set's batch sharding:

    {"inputs": int32 [B, L], "targets": int32 [B, L], "loss_mask": float32 [B, L]}

from records of L + 1 tokens (inputs = r[:-1], targets = r[1:]). A DPO run
(train.objective=dpo) reads a preference task, whose record is a pair of
sequences [2, L + 1] (chosen, rejected), and its batch is B pairs:

    {"inputs": int32 [B, 2, L], "targets": int32 [B, 2, L], "loss_mask": float32 [B, 2, L]}

The pair axis comes after the batch axis, so everything that divides a batch
(hosts, the batch's sharding over devices, microbatches) divides it between
pairs, never inside one: a pair's two sequences always sit on one device, and
train.batch_size counts pairs (as TRL counts examples). A task may
give each record a per-token "loss_mask" feature (1 = learn to predict this
token, as the SFT task marks completions); the model's mask is then its
[1:], since target i is token i + 1. Without one (packed text) the mask is all
ones. Eval padding rows are 0 either way.

Epochs and resuming: epoch e is the task read once, shuffled with a seed
derived from (settings.train.seed, e), cut into full local batches (the tail
shorter than a batch is dropped, a different tail each epoch). The iterator's
state is just (epoch, batches into the epoch) per host plus the global batch
count: a few integers, saved with the checkpoint as JSON. Restoring rebuilds
epoch e and skips the batches already taken, so resume costs at most one
epoch's read, never the whole history, and the batch after a restore is
exactly the one an uninterrupted run would have produced.
"""

from __future__ import annotations

import contextlib
import logging
import math
import threading
from typing import Any, Callable, Iterator

import jax
import numpy as np

from gptj.data.tasks.files import ERROR_TAG
from gptj.errors import DataError

STATE_VERSION = 1
FEATURE = "text"
MASK_FEATURE = "loss_mask"


# -- helpers --------------------------------------------------------------------------


def epoch_seed(seed: int, epoch: int) -> int:
    """The shuffle seed of one epoch: different every epoch, the same on every run."""
    return int(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(epoch)]).generate_state(1)[0] & 0x7FFFFFFF)


def local_batch_size(settings, process_count: int | None = None) -> int:
    """Rows each host reads per step: the global batch over the number of processes."""
    process_count = jax.process_count() if process_count is None else process_count
    batch = settings.train.batch_size
    if batch <= 0 or batch % process_count:
        raise ValueError(f"train.batch_size={batch} must be a positive multiple of the {process_count} processes")
    return batch // process_count


def record_shape(settings) -> tuple[int, ...]:
    """The shape of one record of the run's tasks: [L + 1] tokens, or a pair [2, L + 1] for train.objective=dpo."""
    length = settings.data.seq_len + 1
    return (2, length) if settings.train.objective == "dpo" else (length,)


def train_batch_spec(settings) -> dict[str, jax.ShapeDtypeStruct]:
    """Global shapes and dtypes of one training (or eval) batch: [B, L], or [B, 2, L] for pairs."""
    shape = (settings.train.batch_size,) + record_shape(settings)[:-1] + (settings.data.seq_len,)
    return {"inputs": jax.ShapeDtypeStruct(shape, np.int32), "targets": jax.ShapeDtypeStruct(shape, np.int32),
            "loss_mask": jax.ShapeDtypeStruct(shape, np.float32)}


def to_model_features(text: np.ndarray, valid_rows: int | None = None,
                      token_mask: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Records [b, ..., L + 1] -> inputs / targets / loss_mask [b, ..., L]; rows from `valid_rows` on are padding.

    `token_mask` [b, ..., L + 1]: the task's per-token mask (None: every token
    counts); target i is token i + 1, so the loss mask is its [..., 1:]. A
    record may be a pair of sequences ([b, 2, L + 1]); each is shifted alike.
    """
    text = np.asarray(text, dtype=np.int32)
    if token_mask is None:
        mask = np.ones(text[..., 1:].shape, np.float32)
    else:
        mask = np.asarray(token_mask, np.float32)[..., 1:].copy()
    if valid_rows is not None:
        mask[valid_rows:] = 0.0
    return {"inputs": text[..., :-1], "targets": text[..., 1:], "loss_mask": mask}


def make_global(local: dict[str, np.ndarray], partitioner, global_batch: int) -> dict[str, jax.Array]:
    """Host-local rows -> global arrays laid out by the partitioner's batch sharding (of their leading axis)."""
    return {k: jax.make_array_from_process_local_data(partitioner.batch_sharding(v.ndim), v,
                                                      (global_batch,) + v.shape[1:])
            for k, v in local.items()}


def _check_sharding(settings, partitioner) -> None:
    if partitioner is None:
        return
    batch, ways = settings.train.batch_size, partitioner.data_parallel_size
    if batch % ways:
        raise ValueError(f"train.batch_size={batch} must be a multiple of the {ways}-way batch sharding "
                         f"of mesh {dict(partitioner.mesh.shape)} under rule set {partitioner.rule_set.name!r}")


def _allgather(values: list[int]) -> np.ndarray:
    """[process_count, len(values)]: every process's values (a collective when multi-process)."""
    if jax.process_count() == 1:
        return np.asarray([values], dtype=np.int64)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(np.asarray(values, dtype=np.int32)), dtype=np.int64)


def _task(name: str):
    import seqio

    try:
        return seqio.get_mixture_or_task(name)
    except ValueError:
        raise ValueError(f"data task {name!r} is not registered; call gptj.data.tasks.register_tasks_for_config "
                         "(or register it with seqio) first") from None


def check_record_layout(settings) -> None:
    """Every task the settings name gives the records `train.objective` trains on (register them first).

    A DPO run needs preference pairs (gptj_dpo); a language-model run, single
    sequences. Raises DataError naming the task otherwise.
    """
    for name in dict.fromkeys(n for n in [settings.data.train_task, *settings.data.val_tasks] if n):
        _check_layout(name, settings)


def _check_layout(task_name: str, settings) -> None:
    from gptj.data.tasks import records_are_pairs

    _task(task_name)  # an unregistered name is reported as such
    pairs = records_are_pairs(task_name)
    if settings.train.objective == "dpo" and not pairs:
        raise DataError(f"train.objective=dpo trains on preference pairs, but task {task_name!r} gives single "
                        "sequences: use gptj_dpo / gptj_dpo_validation (data.dpo_pattern / dpo_val_pattern)")
    if settings.train.objective != "dpo" and pairs:
        raise DataError(f"task {task_name!r} gives preference pairs (chosen, rejected): train on them with "
                        "train.objective=dpo")


def task_split(task, purpose: str) -> str:
    """The split to read: "train" for training, "validation" for eval, else the task's only split."""
    splits = list(task.splits)
    for want in ((purpose,) if purpose == "train" else (purpose, "test", "train")):
        if want in splits:
            return want
    return splits[0]


def host_dataset(task_name: str, split: str, *, shard_info=None, shuffle: bool = False, seed: int = 0,
                 shuffle_buffer: int | None = None, with_mask: bool = False):
    """One epoch of this host's share of a task: a tf.data.Dataset of its "text" records, int32 [L + 1].

    With `with_mask`, elements are (text, mask) pairs, mask int32 [L + 1]: the
    task's "loss_mask" feature, or all ones for a task without one.
    """
    import seqio
    import tensorflow as tf

    task = _task(task_name)
    kwargs = dict(sequence_length=None, split=split, shuffle=shuffle, seed=seed if shuffle else None,
                  shard_info=shard_info, num_epochs=1, trim_output_features=False)
    if isinstance(task, seqio.Task) and shuffle_buffer:
        kwargs["shuffle_buffer_size"] = int(shuffle_buffer)
    with translate_errors(task_name):
        ds = task.get_dataset(**kwargs)
    if FEATURE not in ds.element_spec:
        raise DataError(f"task {task_name!r} has no {FEATURE!r} feature (has {sorted(ds.element_spec)})")
    options = tf.data.Options()
    options.deterministic = True  # the same order on every run is what makes resuming exact
    # No autotuning thread: on a 2-core machine its optimisation loop held the iterator's release (at the end of
    # a run, or on SIGTERM) for 10-20 s in 3 of 4 short tiny.py runs, and the model step, not the input
    # pipeline, sets the pace (the same tokens/s without it). AUTOTUNE parallelism then means one per core.
    options.autotune.enabled = False
    if not with_mask:
        return ds.map(lambda ex: ex[FEATURE]).with_options(options)
    has_mask = MASK_FEATURE in ds.element_spec

    def pair(ex):
        text = ex[FEATURE]
        return text, tf.cast(ex[MASK_FEATURE], tf.int32) if has_mask else tf.ones_like(text)

    return ds.map(pair).with_options(options)


@contextlib.contextmanager
def translate_errors(task_name: str):
    """Turns a TensorFlow error from a task's pipeline into a one-line `DataError` naming file and row."""
    import tensorflow as tf

    try:
        yield
    except tf.errors.OpError as e:
        message = e.message or str(e)
        if ERROR_TAG in message:
            line = message.split(ERROR_TAG, 1)[1].splitlines()[0]
            raise DataError(line.rstrip('"]').rstrip()) from None  # tf.debugging.Assert quotes and brackets it
        where = _describe_source_error(task_name)
        raise DataError(where or f"task {task_name!r}: {message.strip().splitlines()[0]}") from None
    except UnicodeDecodeError:  # TensorFlow quoting undecodable record bytes in its own error message
        where = _describe_source_error(task_name)
        raise DataError(where or f"task {task_name!r}: unreadable data (not UTF-8 where text was expected)") from None


def _describe_source_error(task_name: str) -> str | None:
    from gptj.data.tasks.tfrecords import TFRecordSource, describe_tfrecord_error

    source = getattr(_task(task_name), "source", None)
    if isinstance(source, TFRecordSource):
        return describe_tfrecord_error(source.files, source.seq_len, source.vocab_size)
    return None


# -- training -------------------------------------------------------------------------


def _announce_slow_close() -> None:
    logging.warning("waiting for the input pipeline (tf.data) to finish the work it has in flight before exiting")


class TrainIterator:
    """Endless (or `settings.data.num_epochs`-long) iterator of global training batches.

    `next()` returns the dict described in the module docstring (host-local
    numpy arrays when built without a partitioner). `get_state()` /
    `set_state()` save and restore the position; with several processes
    `get_state` is a collective: call it on every process, as a checkpoint save is.
    """

    def __init__(self, settings, partitioner=None, shard_info=None):
        import seqio

        self.task_name = settings.data.train_task
        if not self.task_name:
            raise ValueError("data.train_task is empty; name a task (e.g. gptj_demo_train)")
        _check_sharding(settings, partitioner)
        self.partitioner = partitioner
        self.shard_info = shard_info or seqio.ShardInfo(jax.process_index(), jax.process_count())
        self.global_batch = settings.train.batch_size
        self.local_batch = local_batch_size(settings, self.shard_info.num_shards)
        self.seq_len = settings.data.seq_len
        self.seed = settings.train.seed
        self.num_epochs = settings.data.num_epochs
        self.shuffle_buffer = settings.data.shuffle_buffer
        self.split = task_split(_task(self.task_name), "train")
        _check_layout(self.task_name, settings)
        self._epoch, self._position, self._batches = 0, 0, 0
        self._stop_at: int | None = None
        self._stream: Iterator | None = None

    # iteration

    def _epoch_batches(self, epoch: int, skip: int):
        ds = host_dataset(self.task_name, self.split, shard_info=self.shard_info, shuffle=True,
                          seed=epoch_seed(self.seed, epoch), shuffle_buffer=self.shuffle_buffer, with_mask=True)
        return ds.batch(self.local_batch, drop_remainder=True).skip(skip).prefetch(2).as_numpy_iterator()

    def _generate(self):
        epoch, position = self._epoch, self._position
        while self.num_epochs < 0 or epoch < self.num_epochs:
            produced = position
            with translate_errors(self.task_name):
                for batch in self._epoch_batches(epoch, position):
                    produced += 1
                    yield epoch, produced, batch
            if produced == 0:
                raise DataError(f"task {self.task_name!r} has fewer than {self.local_batch} records on process "
                                f"{self.shard_info.index} of {self.shard_info.num_shards}: not one batch per epoch")
            epoch, position = epoch + 1, 0

    def _agreed_stop(self) -> int | None:
        """With several processes and finite epochs, the global batch count at which every process
        stops (hosts may hold different numbers of records, and a host stepping alone would hang)."""
        if self.num_epochs < 0 or self.shard_info.num_shards == 1:
            return None
        ds = host_dataset(self.task_name, self.split, shard_info=self.shard_info)
        with translate_errors(self.task_name):
            count = int(ds.reduce(np.int64(0), lambda c, _: c + 1))
        return self.num_epochs * int(_allgather([count // self.local_batch]).min())

    def next_local(self) -> dict[str, np.ndarray]:
        """The next batch as this host's numpy rows [B / process_count, L]."""
        if self._stream is None:
            self._stop_at = self._agreed_stop()
            self._stream = self._generate()
        if self._stop_at is not None and self._batches >= self._stop_at:
            raise StopIteration
        with translate_errors(self.task_name):
            epoch, position, (text, mask) = next(self._stream)
        self._epoch, self._position, self._batches = epoch, position, self._batches + 1
        return to_model_features(text, token_mask=mask)

    def close(self) -> None:
        """Releases the input pipeline now (a live tf.data iterator otherwise stalls interpreter exit).

        tf.data first finishes the work its background threads have in flight
        (tokenizing documents on the fly, for text tasks), which can take
        seconds; a console line says so rather than leaving a silent pause.
        """
        if self._stream is None:
            return
        notice = threading.Timer(2.0, _announce_slow_close)
        notice.daemon = True
        notice.start()
        try:
            self._stream.close()
        finally:
            notice.cancel()
            self._stream = None

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, Any]:
        local = self.next_local()
        if self.partitioner is None:
            return local
        return make_global(local, self.partitioner, self.global_batch)

    # checkpointing

    def get_state(self) -> dict[str, Any]:
        """A small JSON-serializable dict of the position (collective with several processes)."""
        positions = _allgather([self._epoch, self._position]).tolist()
        return {"version": STATE_VERSION, "task": self.task_name, "seed": self.seed, "seq_len": self.seq_len,
                "batch_size": self.global_batch, "process_count": self.shard_info.num_shards,
                "batches": self._batches, "positions": positions}

    def set_state(self, state: dict[str, Any]) -> None:
        """Continues from a `get_state()` dict: the next batch is the one that followed it.

        If the task, seed, sequence length, batch size or process count changed,
        exact resumption is impossible; the iterator then starts the saved
        (earliest) epoch afresh and logs a warning.
        """
        if int(state.get("version", -1)) != STATE_VERSION:
            raise ValueError(f"data iterator state version {state.get('version')!r} is not {STATE_VERSION}")
        same = (state["task"] == self.task_name and int(state["seed"]) == self.seed
                and int(state["seq_len"]) == self.seq_len and int(state["batch_size"]) == self.global_batch
                and int(state["process_count"]) == self.shard_info.num_shards)
        positions = state["positions"]
        if same:
            self._epoch, self._position = (int(x) for x in positions[self.shard_info.index])
        else:
            self._epoch, self._position = min(int(p[0]) for p in positions), 0
            logging.warning("data iterator state was saved for a different task/seed/seq_len/batch/process "
                            "count (%s); restarting epoch %d from its beginning", state, self._epoch)
        self._batches = int(state["batches"])
        self._stream = None


def build_train_iterator(settings, partitioner=None, shard_info=None) -> TrainIterator:
    """The training iterator for `settings.data.train_task` (register tasks first).

    `partitioner`: a `gptj.core.partitioning.Partitioner` (batches come back as
    global jax.Arrays) or None (host-local numpy). `shard_info` overrides this
    process's `seqio.ShardInfo` (tests simulate hosts with it).
    """
    return TrainIterator(settings, partitioner, shard_info)


# -- evaluation -----------------------------------------------------------------------


class EvalSet:
    """A named validation set: calling it returns a fresh finite iterator of global batches.

    Reads at most `settings.train.val_batches` batches (<= 0: the whole set),
    unshuffled. Every process yields the same number of batches (agreed once,
    collectively); rows past a host's data are padding with loss_mask 0.
    """

    def __init__(self, task_name: str, settings, partitioner=None, shard_info=None):
        import seqio

        _check_sharding(settings, partitioner)
        self.task_name = task_name
        self.partitioner = partitioner
        self.shard_info = shard_info or seqio.ShardInfo(jax.process_index(), jax.process_count())
        self.global_batch = settings.train.batch_size
        self.local_batch = local_batch_size(settings, self.shard_info.num_shards)
        self.max_batches = settings.train.val_batches
        self.record_shape = record_shape(settings)
        self.split = task_split(_task(task_name), "validation")
        _check_layout(task_name, settings)
        self._num_batches: int | None = None

    def _dataset(self):
        ds = host_dataset(self.task_name, self.split, shard_info=self.shard_info, with_mask=True)
        return ds.take(self.max_batches * self.local_batch) if self.max_batches > 0 else ds

    @property
    def num_batches(self) -> int:
        """Batches per pass, the same on every process."""
        if self._num_batches is None:
            with translate_errors(self.task_name):
                count = int(self._dataset().reduce(np.int64(0), lambda c, _: c + 1))
            most = int(_allgather([count]).max())
            if most == 0:
                raise DataError(f"validation task {self.task_name!r} has no records (is seq_len longer than the data?)")
            self._num_batches = math.ceil(most / self.local_batch)
        return self._num_batches

    def __call__(self) -> Iterator[dict[str, Any]]:
        num_batches = self.num_batches
        return self._iterate(num_batches)

    def _iterate(self, num_batches: int):
        with translate_errors(self.task_name):
            batches = self._dataset().batch(self.local_batch).as_numpy_iterator()
            for _ in range(num_batches):
                text, mask = next(batches, (None, None))
                rows = 0 if text is None else len(text)
                if rows < self.local_batch:  # pad to a full batch; padding rows carry no loss
                    pad = np.zeros((self.local_batch - rows,) + self.record_shape, np.int32)
                    if text is None:
                        text, mask = pad, pad
                    else:
                        text, mask = np.concatenate([text, pad]), np.concatenate([mask, pad])
                local = to_model_features(text, valid_rows=rows, token_mask=mask)
                yield local if self.partitioner is None else make_global(local, self.partitioner, self.global_batch)


def build_eval_iterators(settings, partitioner=None, shard_info=None) -> dict[str, Callable[[], Iterator]]:
    """{task name: callable returning a fresh finite iterator} for each of `settings.data.val_tasks`."""
    return {name: EvalSet(name, settings, partitioner, shard_info) for name in settings.data.val_tasks if name}
