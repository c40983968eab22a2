"""Two real JAX processes (gloo over loopback, 4 CPU devices each): global batches from per-host rows,
collective iterator state, and hosts agreeing on how many eval/train batches to run."""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import seqio
from data_utils import make_config, numbered_records, write_records
from xla_env import xla_flags

from gptj.data import tasks
from gptj.data.pipeline import build_train_iterator

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEQ = 16

HOST_SCRIPT = """
import json, os, sys
from gptj.core import runtime; runtime.start_process()  # as main.py does
pid, port, tmp = int(sys.argv[1]), sys.argv[2], sys.argv[3]
os.environ["XLA_FLAGS"] = {xla_flags!r}
import jax
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize("127.0.0.1:" + port, num_processes=2, process_id=pid)
import numpy as np
sys.path.insert(0, os.path.join({root!r}, "tests"))
from data_utils import make_config
from gptj.data import tasks
from gptj.data.pipeline import build_eval_iterators, build_train_iterator
from gptj.core.partitioning import Partitioner, make_mesh

def local_rows(array):
    shards = sorted(array.addressable_shards, key=lambda s: s.index[0].start)
    seen, out = set(), []
    for s in shards:
        if s.index[0].start not in seen:
            seen.add(s.index[0].start)
            out.append(np.asarray(s.data))
    return np.concatenate(out).tolist()

partitioner = Partitioner(make_mesh(2, 4), "megatron")
result = {{}}
config = make_config(seq_len={seq})
tasks.register_tasks_for_config(config)
it = build_train_iterator(config, partitioner)
batches = [next(it) for _ in range(3)]
result["global_shape"] = list(batches[0]["inputs"].shape)
result["rows"] = [local_rows(b["inputs"]) for b in batches]
state = it.get_state()
result["state"] = state
result["next"] = local_rows(next(it)["inputs"])
fresh = build_train_iterator(config, partitioner)
fresh.set_state(state)
result["resumed"] = local_rows(next(fresh)["inputs"])
config = make_config("gptj_tfrecords", ["gptj_tfrecords_validation"], seq_len={seq}, num_epochs=1,
                     tfrecord_pattern=os.path.join(tmp, "train_*.tfrecords"),
                     val_tfrecord_pattern=os.path.join(tmp, "val.tfrecords"))
config.train.val_batches = 10
tasks.register_tasks_for_config(config)
result["train_batches"] = len(list(build_train_iterator(config, partitioner)))
evals = list(build_eval_iterators(config, partitioner)["gptj_tfrecords_validation"]())
result["eval_batches"] = len(evals)
result["eval_rows"] = sum(int(np.asarray(local_rows(b["loss_mask"])).any(axis=1).sum()) for b in evals)
json.dump(result, open(os.path.join(tmp, "host%d.json" % pid), "w"))
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes(tmp_path):
    # train: files of 12 and 4 records -> one file per host, 3 and 1 local batches of 4 per epoch;
    # validation: one file of 9 records -> split by record, 5 and 4 rows -> 2 and 1 local batches.
    records = numbered_records(25, SEQ)
    write_records(str(tmp_path / "train_0.tfrecords"), records[:12])
    write_records(str(tmp_path / "train_1.tfrecords"), records[12:16])
    write_records(str(tmp_path / "val.tfrecords"), records[16:])
    port, script = free_port(), HOST_SCRIPT.format(root=ROOT, seq=SEQ, xla_flags=xla_flags(4))
    env = {**os.environ, "PYTHONPATH": ROOT}
    procs = [subprocess.Popen([sys.executable, "-c", script, str(pid), str(port), str(tmp_path)], cwd=ROOT,
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for pid in range(2)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(o[-3000:] for o in outs)
    hosts = [json.loads((tmp_path / f"host{i}.json").read_text()) for i in range(2)]

    config = make_config(seq_len=SEQ)
    tasks.register_tasks_for_config(config)
    for i, host in enumerate(hosts):
        assert host["global_shape"] == [8, SEQ]
        # each process's part of the global batch is exactly what ShardInfo(i, 2) reads on its own
        alone = build_train_iterator(config, shard_info=seqio.ShardInfo(i, 2))
        for got in host["rows"] + [host["next"]]:
            np.testing.assert_array_equal(np.asarray(got), next(alone)["inputs"])
        assert host["resumed"] == host["next"]
        assert host["state"] == hosts[0]["state"] and len(host["state"]["positions"]) == 2
        assert host["train_batches"] == 1  # both stop where the smaller host runs out
        assert host["eval_batches"] == 2  # both run the larger host's count
    assert [h["eval_rows"] for h in hosts] == [5, 4]  # the rest is padding with loss_mask 0
    assert not {tuple(r) for r in hosts[0]["rows"][0]} & {tuple(r) for r in hosts[1]["rows"][0]}
