"""Acceptance 2 (prepare_data output read back by a plain tf.data reader) and 5 (bad text input)."""

import gzip
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import zstandard
from data_utils import read_records

from gptj.data.prepare import prepare_data
from gptj.errors import DataError
from gptj.data.vocab import EOT_ID, get_tokenizer
from gptj.prepare_data import main

SEQ = 16


def make_corpus(root) -> tuple[list[str], list[str]]:
    """Files of every supported kind; returns (input paths in order, documents in that order).

    Every document starts with a marker "[docN]" and is longer than a record, so a
    record stream's decoded text tells which documents it holds."""
    from pydoc_data.topics import topics

    texts = [topics[k][:600] for k in sorted(topics)[:9]]
    texts.append("short doc 😀 with <|endoftext|> inside, and enough words to be longer than one record")
    texts = [f"[doc{i}] {t}" for i, t in enumerate(texts)]
    paths, docs = [], []
    for i in range(2):
        p = os.path.join(root, f"a{i}.txt")
        open(p, "w", encoding="utf-8").write(texts[i])
        paths.append(p)
        docs.append(texts[i])
    rows = [{"text": t, "meta": n} for n, t in enumerate(texts[2:5])]
    p = os.path.join(root, "b.jsonl")
    open(p, "w").write("\n".join(json.dumps(r) for r in rows[:2]) + "\n\n" + json.dumps(rows[2]) + "\n")
    paths.append(p)
    docs += texts[2:5]
    p = os.path.join(root, "c.jsonl.gz")
    with gzip.open(p, "wt", encoding="utf-8") as f:
        f.write("".join(json.dumps({"text": t}) + "\n" for t in texts[5:7]))
    paths.append(p)
    docs += texts[5:7]
    p = os.path.join(root, "d.jsonl.zst")
    open(p, "wb").write(zstandard.ZstdCompressor().compress(
        "".join(json.dumps({"text": t}) + "\n" for t in texts[7:]).encode()))
    paths.append(p)
    docs += texts[7:]
    return paths, docs


def expected_stream(docs):
    tok = get_tokenizer()
    return np.concatenate([np.asarray(tok.encode(d) + [EOT_ID]) for d in docs])


def test_keep_order_roundtrip_and_summary(tmp_path):
    paths, docs = make_corpus(tmp_path)
    out = tmp_path / "out"
    summary = prepare_data(",".join(paths), str(out), SEQ, shuffle=False, records_per_shard=7,
                           num_workers=1, progress=False)
    stream = expected_stream(docs)
    n = len(stream) // (SEQ + 1)
    train = summary["splits"]["train"]
    assert (train["documents"], train["tokens"], train["records"], train["tokens_dropped"]) == \
           (len(docs), len(stream), n, len(stream) - n * (SEQ + 1))
    assert summary["skipped_empty_documents"] == 0
    index = open(out / "train.index").read().split()
    assert index == train["files"] and len(index) == -(-n // 7)
    assert all(os.path.basename(p).endswith(f"_{c}.tfrecords") for p, c in zip(index, [7] * (len(index) - 1)))
    records = read_records(index, SEQ + 1)
    assert records.shape == (n, SEQ + 1)
    np.testing.assert_array_equal(records.reshape(-1), stream[: n * (SEQ + 1)])
    assert json.load(open(out / "summary.json"))["splits"]["train"]["records"] == n


def test_shuffle_validation_split_and_workers(tmp_path):
    paths, docs = make_corpus(tmp_path)
    kwargs = dict(seq_len=SEQ, shuffle=True, seed=3, val_fraction=0.3, progress=False)
    a = prepare_data(paths, str(tmp_path / "a"), num_workers=1, **kwargs)
    b = prepare_data(paths, str(tmp_path / "b"), num_workers=2, **kwargs)  # spawned tokenizer processes
    ra = {s: read_records(a["splits"][s]["files"], SEQ + 1) for s in ("train", "validation")}
    rb = {s: read_records(b["splits"][s]["files"], SEQ + 1) for s in ("train", "validation")}
    for s in ra:  # deterministic, and the worker processes change nothing
        np.testing.assert_array_equal(ra[s], rb[s])
    assert a["splits"]["validation"]["documents"] == 3 and a["splits"]["train"]["documents"] == 7
    assert a["splits"]["train"]["tokens"] + a["splits"]["validation"]["tokens"] == len(expected_stream(docs))
    # Whole documents: each document's marker is in exactly one split, and all are somewhere.
    tok = get_tokenizer()
    found = {s: set(re.findall(r"\[doc(\d+)\]", tok.decode(r.reshape(-1)))) for s, r in ra.items()}
    assert len(found["validation"]) == 3 and not found["train"] & found["validation"]
    assert found["train"] | found["validation"] == {str(i) for i in range(len(docs))}
    c = prepare_data(paths, str(tmp_path / "c"), seq_len=SEQ, shuffle=True, seed=4, num_workers=1, progress=False)
    assert not np.array_equal(read_records(c["splits"]["train"]["files"], SEQ + 1),
                              read_records(prepare_data(paths, str(tmp_path / "d"), seq_len=SEQ, shuffle=False,
                                                        num_workers=1, progress=False)["splits"]["train"]["files"],
                                           SEQ + 1))


def test_empty_documents_are_counted_skips(tmp_path):
    paths, docs = make_corpus(tmp_path)
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    rows = tmp_path / "e.jsonl"
    rows.write_text(json.dumps({"text": ""}) + "\n" + json.dumps({"text": "real text here"}) + "\n")
    summary = prepare_data(paths + [str(empty), str(rows)], str(tmp_path / "o"), SEQ, shuffle=False,
                           num_workers=1, progress=False)
    assert summary["skipped_empty_documents"] == 2
    assert summary["skipped_files"] == [str(empty)]
    assert summary["splits"]["train"]["documents"] == len(docs) + 1


@pytest.mark.parametrize("content,message", [
    ('{"text": "ok"}\n{"body": "no text field"}\n', r"bad\.jsonl: row 2: no 'text' field \(found \['body'\]\)"),
    ('{"text": "ok"}\n\n{not json\n', r"bad\.jsonl: row 3: not valid JSON"),
    ('{"text": 5}\n', r"bad\.jsonl: row 1: field 'text' is int"),
])
def test_bad_jsonl_rows_name_file_and_row(tmp_path, content, message):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(content)
    with pytest.raises(DataError, match=message):
        prepare_data(str(bad), str(tmp_path / "o"), SEQ, num_workers=1, progress=False)
    assert not (tmp_path / "o").exists()  # nothing half-written


def test_missing_inputs_and_cli_errors(tmp_path, capsys):
    with pytest.raises(DataError, match=r"input file .*nope\.txt does not exist"):
        prepare_data(str(tmp_path / "nope.txt"), str(tmp_path / "o"), SEQ, progress=False)
    with pytest.raises(DataError, match=r"pattern .*\*\.txt' matches no files"):
        prepare_data(str(tmp_path / "*.txt"), str(tmp_path / "o"), SEQ, progress=False)
    (tmp_path / "x.csv").write_text("a,b")
    with pytest.raises(DataError, match=r"x\.csv: unknown input format"):
        prepare_data(str(tmp_path / "x.csv"), str(tmp_path / "o"), SEQ, progress=False)
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(DataError, match="no non-empty documents"):
        prepare_data(str(tmp_path / "empty.txt"), str(tmp_path / "o"), SEQ, num_workers=1, progress=False)
    assert main([f"--input={tmp_path / 'nope.txt'}", f"--output={tmp_path / 'o'}", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines() == [f"prepare_data: error: input file {tmp_path / 'nope.txt'} does not exist"]


def test_module_cli(tmp_path):
    paths, _ = make_corpus(tmp_path)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run(
        [sys.executable, "-m", "gptj.prepare_data", f"--input={tmp_path}/*.txt,{tmp_path}/*.jsonl*",
         f"--output={tmp_path / 'cli'}", f"--seq_len={SEQ}", "--val_fraction=0.2", "--num_workers=1", "--quiet"],
        cwd=root, env={**os.environ, "PYTHONPATH": root}, capture_output=True, text=True, check=True)
    printed = json.loads(out.stdout)
    assert set(printed["splits"]) == {"train", "validation"}
    assert printed["splits"]["train"]["records"] == len(read_records(
        open(tmp_path / "cli" / "train.index").read().split(), SEQ + 1))
