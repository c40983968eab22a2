"""Checkpoint save and restore with the integrity checks (gptj.core.integrity) against Orbax alone, on 8 CPU devices.

    python benchmarks/checkpoint_io.py [--quick] [--json PATH] [--models=tiny,1b] [--state=full|params]
                                       [--dtype=float32] [--mesh=2x4] [--rules=megatron] [--runs=N] [--dir=DIR]

Models: `tiny` is gptj/configs/tiny.py's model (13.3M parameters); `1b` is GPT-J-shaped with
d_model 2048, 16 layers of 16 heads, vocabulary 50400: 1.01B parameters. The state is a train
state (step, fp32 params and the AdamW moments: 12 bytes per parameter) or, with
--state=params, the params alone (4 bytes per parameter; 2 with --dtype=bfloat16), laid out on
a `data` x `model` mesh of 8 CPU devices (XLA_FLAGS=--xla_force_host_platform_device_count=8 is
set if missing) by the rule set. The process holds the state, Orbax's host copies and a
restored copy at once: about 4x the state's bytes (the 1b train state needs a 64 GB machine;
its params alone in bf16, --state=params --dtype=bfloat16 --mesh=1x8, about 9 GB). For each
model:

- save: `Checkpointer.save` + `wait` (digests, manifest, Orbax write) against the same items
  written by a plain Orbax CheckpointManager (no checksums), each into a fresh directory;
- restore: `Checkpointer.restore` (read, check every array, agree) against the same
  checkpoint read by Orbax's own `CheckpointManager.restore`;
- the digest pass alone (warm), and its one-off compile (paid once per process, by the
  first save or restore of a given state layout).

Gptj and Orbax alternate run by run, so that load from elsewhere hits both alike; figures
are medians, lower is better. The restore reads what the save just wrote, from the page
cache when it fits. Goal: verification adds at most 10% to restore.
--quick: the tiny model only, 3 runs.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks.common import Timing, add_common_args, emit_results, result  # noqa: E402

MODELS = {
    "tiny": dict(vocab_size=50257, vocab_pad_multiple=64, num_layers=2, d_model=128, num_heads=4, rotary_dim=16,
                 max_len=256),
    "1b": dict(vocab_size=50400, num_layers=16, d_model=2048, num_heads=16, rotary_dim=64, max_len=2048),
}


def build_state(model: dict, mesh: str, rules: str, params_only: bool, dtype: str):
    """(train state on the mesh, its abstract twin, parameter count) for a GPT-J of this shape."""
    import jax
    import optax

    from gptj.core import losses, optimizer
    from gptj.core.partitioning import Partitioner, make_mesh
    from gptj.core.trainer import Trainer
    from gptj.model.transformer import GPTJ, GPTJConfig, count_params

    data, tensor = (int(n) for n in mesh.split("x"))
    config = GPTJConfig(**model, dtype=dtype, param_dtype=dtype, scan_layers=True, remat_policy="none")
    # optax.identity keeps no state: the checkpoint then holds the params (and the step) alone.
    adamw = optax.identity() if params_only else optimizer.make_optimizer(dict(
        lr=1e-4, end_lr=1e-5, warmup_steps=10, anneal_steps=100, weight_decay=0.1, b1=0.9, b2=0.999, eps=1e-8,
        clip_norm=1.0))[0]
    batch = {k: jax.ShapeDtypeStruct((data, 8), "int32") for k in ("inputs", "targets")}
    trainer = Trainer(GPTJ(config), losses.next_token_loss, adamw, Partitioner(make_mesh(data, tensor), rules), batch)
    state = jax.block_until_ready(trainer.init_state(0))
    return state, trainer.abstract_state, count_params(trainer.abstract_state["params"])


class OrbaxAlone:
    """The same items as gptj's Checkpointer, written and read by a plain Orbax CheckpointManager."""

    def __init__(self, directory: str):
        import orbax.checkpoint as ocp

        self.ocp = ocp
        self.manager = ocp.CheckpointManager(directory, item_names=("params", "train_state", "data", "config"))

    def save(self, state):
        """Writes `state` as step 0 and waits until it is on disk."""
        ocp = self.ocp
        self.manager.save(0, args=ocp.args.Composite(
            params=ocp.args.StandardSave(state["params"]),
            train_state=ocp.args.StandardSave({"step": state["step"], "opt_state": state["opt_state"]}),
            data=ocp.args.JsonSave({}), config=ocp.args.JsonSave({})))
        self.manager.wait_until_finished()

    def restore(self, abstract):
        """Step 0 read back onto `abstract`'s shardings."""
        ocp = self.ocp
        return self.manager.restore(0, args=ocp.args.Composite(
            params=ocp.args.StandardRestore(abstract["params"]),
            train_state=ocp.args.StandardRestore({"step": abstract["step"], "opt_state": abstract["opt_state"]}),
            data=ocp.args.JsonRestore()))


def measure(name: str, model: dict, args, workdir: str) -> list[dict]:
    """Save, restore and digest timings of one model; the result rows."""
    import jax

    from gptj.core import integrity
    from gptj.core.checkpoint import Checkpointer
    from gptj.core.storage import tree_bytes

    state, abstract, n_params = build_state(model, args.mesh, args.rules, args.state == "params", args.dtype)
    size = tree_bytes(state)
    start = time.perf_counter()
    integrity.array_digests(state)
    cold = time.perf_counter() - start
    warm = []
    for _ in range(args.runs):
        start = time.perf_counter()
        integrity.array_digests(state)
        warm.append(time.perf_counter() - start)

    times: dict[str, list[float]] = {"ours_save": [], "orbax_save": [], "ours_restore": [], "orbax_restore": []}
    for run in range(args.runs + 1):  # run 0 warms both up (compiles, opens), untimed
        ours_dir, orbax_dir = os.path.join(workdir, f"ours_{run}"), os.path.join(workdir, f"orbax_{run}")
        start = time.perf_counter()
        checkpointer = Checkpointer(ours_dir)
        checkpointer.save(state)
        checkpointer.close()
        ours_save = time.perf_counter() - start
        start = time.perf_counter()
        orbax = OrbaxAlone(os.path.join(orbax_dir, "checkpoints"))
        orbax.save(state)
        orbax_save = time.perf_counter() - start
        start = time.perf_counter()
        restored = Checkpointer(ours_dir, read_only=True).restore(abstract)
        jax.block_until_ready(restored)
        ours_restore = time.perf_counter() - start
        del restored
        start = time.perf_counter()
        restored = orbax.restore(abstract)
        jax.block_until_ready([restored["params"], restored["train_state"]])
        orbax_restore = time.perf_counter() - start
        del restored
        orbax.manager.close()
        shutil.rmtree(ours_dir)
        shutil.rmtree(orbax_dir)
        if run:
            for key, value in (("ours_save", ours_save), ("orbax_save", orbax_save),
                               ("ours_restore", ours_restore), ("orbax_restore", orbax_restore)):
                times[key].append(value)

    what = (f"{n_params / 1e6:,.1f}M {args.dtype} params, "
            f"{'params only' if args.state == 'params' else 'train state'} "
            f"{size / 2**30:.2f} GiB, {args.rules} {args.mesh} on {jax.device_count()} {jax.default_backend()} "
            "devices")
    rows = []
    for op in ("save", "restore"):
        ours, orbax = Timing(tuple(times[f"ours_{op}"])), Timing(tuple(times[f"orbax_{op}"]))
        extra = ours.median / orbax.median - 1
        rows.append(result(f"{op} s ({name})", "s", ours.median, peer=orbax.median, peer_name="Orbax alone",
                           spread=ours.spread, peer_spread=orbax.spread, higher_is_better=False,
                           note=f"{what}; verification adds {extra:+.1%} to {op}"))
    digest = Timing(tuple(warm))
    rows.append(result(f"checksum pass s ({name})", "s", digest.median, spread=digest.spread,
                       higher_is_better=False,
                       note=f"{what}; {size / digest.median / 2**30:.2f} GiB/s; first call {cold:.2f} s "
                            "(compile, once per process and layout)"))
    return rows


def main() -> None:
    """Measures each model asked for and writes the rows (benchmarks/common.py's contract)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_args(parser)
    parser.add_argument("--models", default="", help="comma-separated: tiny, 1b (default: tiny with --quick, "
                                                     "else both)")
    parser.add_argument("--state", default="full", choices=("full", "params"),
                        help="full: params + AdamW moments; params: the params alone")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"), help="params dtype")
    parser.add_argument("--mesh", default="2x4", help="DATAxMODEL devices")
    parser.add_argument("--rules", default="megatron", help="rule set (gptj.core.partitioning)")
    parser.add_argument("--runs", type=int, default=0, help="timed runs of each (default: 3)")
    parser.add_argument("--dir", default="", help="where to write the checkpoints (default: a temporary directory)")
    args = parser.parse_args()
    args.runs = args.runs or 3
    names = [n for n in (args.models or ("tiny" if args.quick else "tiny,1b")).split(",") if n]
    rows = []
    with tempfile.TemporaryDirectory(dir=args.dir or None) as workdir:
        for name in names:
            rows.extend(measure(name, MODELS[name], args, workdir))
    emit_results(args.json, rows)


if __name__ == "__main__":
    main()
