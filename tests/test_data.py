"""Input pipeline: host sharding (acceptance 3), exact resume in a fresh process (acceptance 4), global
batches, epochs and validation sets."""

import json
import os
import subprocess
import sys
from collections import Counter

import jax
import numpy as np
import pytest
import seqio
from data_utils import make_config, tfrecord_dir
from xla_env import xla_flags

from gptj.core.partitioning import Partitioner, make_mesh
from gptj.data import tasks
from gptj.data.pipeline import build_eval_iterators, build_train_iterator, host_dataset, train_batch_spec

SEQ = 16
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def rows(ds) -> list[tuple]:
    return [tuple(r) for r in ds.as_numpy_iterator()]


@pytest.mark.parametrize("num_files", [4, 1])  # sharded by file, and by record when files < hosts
def test_two_hosts_partition_the_single_host_set_tfrecords(tmp_path, num_files):
    pattern, records = tfrecord_dir(tmp_path, num_files=num_files, per_file=24 // num_files, seq_len=SEQ)
    tasks.register_tfrecord_task("d_tfr", pattern, SEQ)
    for shuffle in (False, True):
        single = rows(host_dataset("d_tfr", "train", shuffle=shuffle, seed=5))
        hosts = [rows(host_dataset("d_tfr", "train", shard_info=seqio.ShardInfo(i, 2), shuffle=shuffle, seed=5))
                 for i in range(2)]
        assert sorted(single) == sorted(map(tuple, records))
        assert not set(hosts[0]) & set(hosts[1]) and hosts[0] and hosts[1]
        assert sorted(hosts[0] + hosts[1]) == sorted(single)


def test_two_hosts_partition_the_single_host_set_demo():
    tasks.register_demo_tasks(SEQ)
    single = rows(host_dataset("gptj_demo_train", "train", shuffle=True, seed=1))
    hosts = [rows(host_dataset("gptj_demo_train", "train", shard_info=seqio.ShardInfo(i, 2), shuffle=True, seed=1))
             for i in range(2)]
    assert len(single) > 1000 and abs(len(hosts[0]) - len(hosts[1])) <= 1
    # As multisets (the corpus holds a few identical records): every record is read by exactly one host.
    assert Counter(hosts[0]) + Counter(hosts[1]) == Counter(single)


def test_per_host_iterators_read_disjoint_halves(tmp_path):
    pattern, _ = tfrecord_dir(tmp_path, num_files=2, per_file=16, seq_len=SEQ)
    config = make_config("gptj_tfrecords", (), SEQ, batch_size=8, tfrecord_pattern=pattern, num_epochs=1)
    tasks.register_tasks_for_config(config)
    single = [tuple(r) for b in build_train_iterator(config) for r in b["inputs"]]
    per_host = []
    for i in range(2):
        it = build_train_iterator(config, shard_info=seqio.ShardInfo(i, 2))
        batches = list(it)
        assert all(b["inputs"].shape == (4, SEQ) for b in batches)  # B / process_count rows each
        per_host.append([tuple(r) for b in batches for r in b["inputs"]])
    assert sorted(per_host[0] + per_host[1]) == sorted(single) and not set(per_host[0]) & set(per_host[1])


@pytest.mark.parametrize("rules,mesh", [("megatron", (2, 4)), ("dp", (4, 2))])
def test_global_batches_match_local_rows(rules, mesh):
    config = make_config(seq_len=SEQ, batch_size=8)
    tasks.register_tasks_for_config(config)
    partitioner = Partitioner(make_mesh(*mesh), rules)
    spec = train_batch_spec(config)
    local, glob = build_train_iterator(config), build_train_iterator(config, partitioner)
    for _ in range(2):
        want, got = next(local), next(glob)
        for k, v in got.items():
            assert isinstance(v, jax.Array) and v.shape == spec[k].shape and v.dtype == spec[k].dtype
            assert v.sharding == partitioner.batch_sharding(2)
            np.testing.assert_array_equal(np.asarray(v), want[k])
        np.testing.assert_array_equal(want["targets"][:, :-1], want["inputs"][:, 1:])
        assert (want["loss_mask"] == 1).all()
    config.train.batch_size = 6
    with pytest.raises(ValueError, match="multiple of the 8-way batch sharding"):
        build_train_iterator(config, Partitioner(make_mesh(4, 2), "dp"))


def test_epochs_reshuffle_and_stop(tmp_path):
    pattern, records = tfrecord_dir(tmp_path, num_files=3, per_file=10, seq_len=SEQ)
    config = make_config("gptj_tfrecords", (), SEQ, batch_size=8, tfrecord_pattern=pattern, num_epochs=2)
    tasks.register_tasks_for_config(config)
    batches = [b["inputs"] for b in build_train_iterator(config)]
    assert len(batches) == 2 * (30 // 8)  # per epoch, the tail shorter than a batch is dropped
    epochs = [np.concatenate(batches[:3]), np.concatenate(batches[3:])]
    every = {tuple(r) for r in records[:, :-1]}
    assert all({tuple(r) for r in e} <= every and len({tuple(r) for r in e}) == 24 for e in epochs)
    assert not np.array_equal(epochs[0], epochs[1])
    again = [b["inputs"] for b in build_train_iterator(config)]
    np.testing.assert_array_equal(np.concatenate(batches), np.concatenate(again))  # seeded: reproducible
    config.train.seed = 1
    other = np.concatenate([b["inputs"] for b in build_train_iterator(config)])
    assert not np.array_equal(np.concatenate(batches), other)


RESUME_SCRIPT = """
import json, os, sys
from gptj.core import runtime; runtime.start_process()  # as main.py does
os.environ["XLA_FLAGS"] = {xla_flags!r}
import numpy as np
sys.path.insert(0, os.path.join({root!r}, "tests"))
from data_utils import make_config
from gptj.data import tasks
from gptj.data.pipeline import build_train_iterator
from gptj.core.partitioning import Partitioner, make_mesh
out = {{}}
for name, kwargs, state in json.load(open(sys.argv[1])):
    config = make_config(**kwargs)
    tasks.register_tasks_for_config(config)
    it = build_train_iterator(config, Partitioner(make_mesh(2, 4), "megatron"))
    it.set_state(state)
    out[name] = {{k: np.asarray(v).tolist() for k, v in next(it).items()}}
json.dump(out, open(sys.argv[2], "w"))
"""


def test_resume_in_fresh_process_gives_batch_8(tmp_path):
    pattern, _ = tfrecord_dir(tmp_path, num_files=3, per_file=10, seq_len=SEQ)
    cases = {  # 30 records / 8 = 3 batches an epoch: batch 8 is in the third epoch
        "tfrecords": dict(train_task="gptj_tfrecords", val_tasks=(), seq_len=SEQ, tfrecord_pattern=pattern),
        "demo": dict(seq_len=SEQ),
    }
    partitioner = Partitioner(make_mesh(2, 4), "megatron")
    jobs, want = [], {}
    for name, kwargs in cases.items():
        config = make_config(**kwargs)
        tasks.register_tasks_for_config(config)
        it = build_train_iterator(config, partitioner)
        for _ in range(7):
            next(it)
        state = it.get_state()
        assert json.loads(json.dumps(state)) == state and len(json.dumps(state)) < 400
        want[name] = {k: np.asarray(v) for k, v in next(it).items()}  # batch 8, uninterrupted
        jobs.append([name, kwargs, state])
    assert jobs[0][2]["positions"] == [[2, 1]] and jobs[0][2]["batches"] == 7
    (tmp_path / "jobs.json").write_text(json.dumps(jobs))
    subprocess.run([sys.executable, "-c", RESUME_SCRIPT.format(root=ROOT, xla_flags=xla_flags(8)), str(tmp_path / "jobs.json"),
                    str(tmp_path / "out.json")], check=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT})
    got = json.loads((tmp_path / "out.json").read_text())
    for name in cases:
        for k, v in want[name].items():
            np.testing.assert_array_equal(np.asarray(got[name][k], v.dtype), v, err_msg=f"{name} {k}")


def test_state_from_another_setup_restarts_the_epoch(caplog):
    config = make_config(seq_len=SEQ)
    tasks.register_tasks_for_config(config)
    it = build_train_iterator(config)
    first = next(it)["inputs"]
    for _ in range(3):
        next(it)
    state = dict(it.get_state(), batch_size=16)
    fresh = build_train_iterator(config)
    fresh.set_state(state)
    assert "restarting epoch 0" in caplog.text
    np.testing.assert_array_equal(next(fresh)["inputs"], first)
    with pytest.raises(ValueError, match="version"):
        fresh.set_state(dict(state, version=99))


def test_eval_sets_are_finite_padded_and_repeatable(tmp_path):
    pattern, records = tfrecord_dir(tmp_path, num_files=2, per_file=15, seq_len=SEQ)
    config = make_config(val_tasks=("gptj_demo_validation", "gptj_tfrecords_validation"), seq_len=SEQ,
                         val_tfrecord_pattern=pattern)
    config.train.val_batches = 100
    tasks.register_tasks_for_config(config)
    partitioner = Partitioner(make_mesh(4, 2), "megatron")
    sets = build_eval_iterators(config, partitioner)
    assert list(sets) == ["gptj_demo_validation", "gptj_tfrecords_validation"]
    batches = list(sets["gptj_tfrecords_validation"]())
    assert len(batches) == 4  # 30 records: 3 full batches and 6 rows + 2 padding rows
    mask = np.concatenate([np.asarray(b["loss_mask"]) for b in batches])
    assert mask[:30].all() and not mask[30:].any()
    seen = np.concatenate([np.asarray(b["inputs"]) for b in batches])[:30]
    assert sorted(map(tuple, seen)) == sorted(map(tuple, records[:, :-1]))
    again = np.concatenate([np.asarray(b["inputs"]) for b in sets["gptj_tfrecords_validation"]()])[:30]
    np.testing.assert_array_equal(seen, again)
    config.train.val_batches = 3
    demo = list(build_eval_iterators(config)["gptj_demo_validation"]())
    assert len(demo) == 3 and all(b["loss_mask"].all() for b in demo)
