"""prepare_data's end-to-end tokens/s against raw HF `tokenizers` batch encoding on the same text and cores.

    python benchmarks/prepare_data.py [--quick] [--json PATH] [--mb 32] [--runs 3]

Corpus: the Python standard library's own source files (real, varied text
present on every machine), written as JSON-lines shards (one document per
module) up to --mb megabytes.

- gptj: `gptj.data.prepare.prepare_data` end to end: read and parse the files,
  tokenize in one worker process per core, shuffle, append EOT, pack into
  2049-token records and write TFRecords (worker start-up included).
- peer: HF `tokenizers` GPT-2 `ByteLevelBPETokenizer.encode_batch` over the
  same documents already in memory, using every core (its Rust thread pool):
  the raw tokenizer throughput, with no reading, packing or writing.

The two alternate run by run so that load from elsewhere hits both alike; the
figures are medians. Goal: ratio >= 0.8.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys
import sysconfig
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks.common import Timing, add_common_args, emit_results, result  # noqa: E402


def build_corpus(out_dir: str, megabytes: float, shards: int = 4) -> list[str]:
    """JSON-lines shards of stdlib source files (one document each) totalling about `megabytes`."""
    sources = sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "**", "*.py"), recursive=True))
    budget, docs = int(megabytes * 2**20), []
    for path in sources:
        try:
            text = open(path, encoding="utf-8").read()
        except (UnicodeDecodeError, OSError):
            continue
        docs.append(text)
        budget -= len(text)
        if budget <= 0:
            break
    paths = []
    for i in range(shards):
        path = os.path.join(out_dir, f"corpus_{i}.jsonl")
        with open(path, "w") as f:
            f.writelines(json.dumps({"text": d}) + "\n" for d in docs[i::shards])
        paths.append(path)
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_args(parser)
    parser.add_argument("--mb", type=float, default=0.0, help="corpus size (default: 4 with --quick, else 32)")
    parser.add_argument("--runs", type=int, default=0, help="timed runs of each (default: 3 with --quick, else 5)")
    parser.add_argument("--seq_len", type=int, default=2048)
    args = parser.parse_args()
    megabytes = args.mb or (4 if args.quick else 32)
    runs = args.runs or (3 if args.quick else 5)

    from tokenizers import ByteLevelBPETokenizer

    from gptj.data.prepare import prepare_data
    from gptj.data.tasks.files import read_documents
    from gptj.data.vocab import default_vocab_dir

    cores = os.cpu_count() or 1
    with tempfile.TemporaryDirectory() as tmp:
        files = build_corpus(tmp, megabytes)
        docs = [text for f in files for _, text in read_documents(f)]
        d = default_vocab_dir()
        hf = ByteLevelBPETokenizer(os.path.join(d, "encoder.json"), os.path.join(d, "vocab.bpe"))
        hf.add_special_tokens(["<|endoftext|>"])

        def peer():
            return sum(len(e.ids) for e in hf.encode_batch(docs))

        def ours(run):
            summary = prepare_data(files, os.path.join(tmp, f"out{run}"), args.seq_len, seed=run,
                                   num_workers=cores, progress=False)
            return summary["splits"]["train"]["tokens"] - summary["splits"]["train"]["documents"]  # without EOTs

        tokens = peer()  # warm-up of both (vocabulary caches, TensorFlow import)
        assert ours(runs) == tokens, "prepare_data and the raw tokenizer disagree on the token count"
        peer_times, our_times = [], []
        for run in range(runs):
            start = time.perf_counter()
            peer()
            peer_times.append(time.perf_counter() - start)
            start = time.perf_counter()
            ours(run)
            our_times.append(time.perf_counter() - start)
    ours_t, peer_t = Timing(tuple(our_times)), Timing(tuple(peer_times))
    row = result(
        f"prepare_data tokens/s ({megabytes:g} MB of stdlib source, {cores} cores)", "tokens/s",
        tokens / ours_t.median, peer=tokens / peer_t.median, peer_name="HF tokenizers encode_batch",
        spread=ours_t.spread, peer_spread=peer_t.spread,
        note=f"{tokens:,} tokens; gptj = read + tokenize ({cores} worker processes) + shuffle + pack + write "
             f"TFRecords, peer = encode_batch of in-memory documents; goal ratio >= 0.8")
    emit_results(args.json, [row])


if __name__ == "__main__":
    main()
