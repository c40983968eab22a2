"""The pipeline's cost on 8 fake CPU devices: compiled FLOPs and step time with and without it, beside gptj.scaling.

    python benchmarks/pipeline.py [--quick] [--json PATH] [--trials N]

One model (8 layers, d_model 256 (128 quick), 4 heads, vocabulary 256, sequences
of 128 (64 quick), batch 32 in 8 microbatches, fp32, no remat) trains on 8 CPU
devices laid out three ways:

    no pipeline   data 4 x model 2, megatron: gradient accumulation over the 8 microbatches
    stage 2       stage 2 x data 2 x model 2: GPipe, 9 iterations of 4 layers
    stage 4       stage 4 x data 1 x model 2: GPipe, 11 iterations of 2 layers

For each: the compiled train step's matmul FLOPs per device (counted in its
optimised HLO, every loop body times its trip count: XLA's own cost analysis
counts a loop's body once) against what `gptj.scaling` predicts for the layout
(the layers' FLOPs for M + S - 1 iterations of one microbatch on 1/S of the
layers, plus the head over the device's rows); and the step's wall-clock time
against the no-pipeline layout's, measured in the same trials. The 8 devices
share the machine's cores, so a step's time follows the total work of all
devices: the bubble's (S - 1) / (M + S - 1) of the layers' iterations, which
the stages compute on zeros, costs time here as idle stages do on a pod. What
the pipeline buys (weights and optimizer state split over the stages) is not a
CPU speed; the figures show that its price is the predicted bubble, not more.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

from benchmarks.common import add_common_args, emit_results, result  # noqa: E402

BATCH, MICROBATCHES, LAYERS = 32, 8, 8
LAYOUTS = {"no pipeline": (1, 4, 2), "stage 2": (2, 2, 2), "stage 4": (4, 1, 2)}  # (stage, data, model)


def hlo_matmul_flops(hlo: str) -> float:
    """Matmul FLOPs of a compiled module's text: 2 x output size x contracted size per dot, loops x trip count.

    Walks the call graph from the entry computation: fusions and calls once per
    call, a while loop's body `known_trip_count` times, a conditional's most
    expensive branch (the train step's update runs in one).
    """
    from gptj.targets import hlo_computations

    computations, entry = hlo_computations(hlo)

    def dims(shape: str) -> list[int]:
        found = re.match(r"\w+\[([\d,]*)\]", shape)
        return [int(d) for d in found.group(1).split(",") if d] if found else []

    cache: dict[str, float] = {}

    def flops(name: str) -> float:
        if name in cache:
            return cache[name]
        shapes, total = {}, 0.0
        for line in computations.get(name, ()):
            found = re.match(r"\s*(?:ROOT )?%([\w.\-]+) = (\([^()]*\)|\S+) ([\w\-]+)\((.*)", line)
            if not found:
                continue
            out, shape, op, rest = found.groups()
            shapes[out] = shape
            if op == "dot":
                lhs = re.match(r"%([\w.\-]+)", rest).group(1)
                contracted = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", rest).group(1)
                size = 1
                for d in (int(x) for x in contracted.split(",") if x):
                    size *= dims(shapes[lhs])[d]
                out_size = 1
                for d in dims(shape):
                    out_size *= d
                total += 2.0 * out_size * size
            elif op == "while":
                trips = re.search(r'"known_trip_count":\{"n":"(\d+)"\}', rest)
                total += int(trips.group(1)) * flops(re.search(r"body=%([\w.\-]+)", rest).group(1))
            elif op == "conditional":
                branches = re.search(r"branch_computations=\{([^}]*)\}", rest)
                names = (re.findall(r"%([\w.\-]+)", branches.group(1)) if branches else
                         re.findall(r"(?:true|false)_computation=%([\w.\-]+)", rest))
                total += max(flops(n) for n in names)
            else:
                total += sum(flops(n) for n in re.findall(r"calls=%([\w.\-]+)", rest))
        cache[name] = total
        return total

    return flops(entry)


def predicted_flops(model, seq_len: int, stage: int, data: int, model_parallel: int) -> float:
    """Per-device FLOPs of one step as gptj.scaling counts them (compute plus bubble, at 1 FLOP/s)."""
    from gptj import hardware, scaling

    unit = hardware.Accelerator("1 FLOP/s", peak_flops=1.0, hbm_bandwidth=1.0, hbm_bytes=1, fast_bandwidth=1.0,
                                fast_domain=8, slow_bandwidth=1.0, compute_efficiency=1.0, collective_latency=0.0)
    workload = scaling.Workload(model, seq_len, BATCH, data=data, model_parallel=model_parallel,
                                microbatches=MICROBATCHES, stages=stage, compute_bytes=4, grad_bytes=4)
    est = scaling.estimate(workload, unit)
    return est.compute_s + est.bubble_s


def build(layout: str, d_model: int, seq_len: int):
    """(compiled trainer, its first state) for one layout."""
    import jax

    from gptj import recipe
    from gptj.configs import base
    from gptj.core.partitioning import Partitioner, make_mesh
    from gptj.model.transformer import GPTJConfig

    stage, data, model = LAYOUTS[layout]
    config = base.get_config()
    config.model.update(dict(vocab_size=256, num_layers=LAYERS, d_model=d_model, num_heads=4, rotary_dim=8,
                             max_len=seq_len, dtype="float32", remat_policy="none"))
    config.train.update(dict(batch_size=BATCH, microbatches=MICROBATCHES, loss_chunk_tokens=0))
    config.data.seq_len = seq_len
    partitioner = Partitioner(make_mesh(data, model, devices=jax.devices()[:8], stage=stage), "megatron")
    trainer = recipe.build_trainer(config, GPTJConfig.from_dict(config.model.to_dict()), partitioner)
    trainer.compile()
    return trainer, trainer.init_state(0)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser)
    parser.add_argument("--trials", type=int, default=0, help="timed steps per layout (default 3 quick, 7 full)")
    args = parser.parse_args(argv)
    trials = args.trials or (3 if args.quick else 7)
    d_model, seq_len = (128, 64) if args.quick else (256, 128)

    import jax
    import numpy as np

    rng = np.random.default_rng(0)
    text = rng.integers(0, 256, size=(BATCH, seq_len + 1), dtype=np.int32)
    batch = {"inputs": text[:, :-1], "targets": text[:, 1:], "loss_mask": np.ones((BATCH, seq_len), np.float32)}

    built = {name: build(name, d_model, seq_len) for name in LAYOUTS}
    states = {name: state for name, (_, state) in built.items()}
    losses = {}
    wall = {name: [] for name in LAYOUTS}
    for name, (trainer, _) in built.items():  # warm-up: the first step of each
        states[name], metrics = trainer.train_step(states[name], batch)
        losses[name] = float(metrics["loss"])
    for _ in range(trials):  # alternating, so that other load on the machine falls on every layout alike
        for name, (trainer, _) in built.items():
            start = time.perf_counter()
            states[name], metrics = trainer.train_step(states[name], batch)
            jax.block_until_ready(metrics)
            wall[name].append(time.perf_counter() - start)

    model_config = built["no pipeline"][0].model.config
    base_time = statistics.median(wall["no pipeline"])
    base_flops = hlo_matmul_flops(built["no pipeline"][0]._compiled_train.as_text())
    rows = []
    for name, (trainer, _) in built.items():
        stage, data, model = LAYOUTS[name]
        compiled = hlo_matmul_flops(trainer._compiled_train.as_text())
        predicted = predicted_flops(model_config, seq_len, stage, data, model)
        bubble = (stage - 1) / (MICROBATCHES + stage - 1)
        rows.append(result(
            f"train step matmul FLOPs per device, {name} (stage {stage} x data {data} x model {model})", "GFLOP",
            compiled / 1e9, peer=predicted / 1e9, peer_name="gptj.scaling", higher_is_better=False,
            note=f"{compiled / base_flops:.3f}x the no-pipeline step's; predicted bubble (S-1)/(M+S-1) = "
                 f"{100 * bubble:.1f}% of the layers' iterations; first-step loss {losses[name]:.5f}"))
        median = statistics.median(wall[name])
        rows.append(result(
            f"train step time on 8 CPU devices, {name}", "ms", median * 1e3, peer=base_time * 1e3,
            peer_name="no pipeline", higher_is_better=False, spread=(max(wall[name]) - min(wall[name])) / median,
            note=f"time {median / base_time:.3f}x the no-pipeline step's, FLOPs {compiled / base_flops:.3f}x; "
                 f"the 8 devices share {os.cpu_count()} cores, so time follows the total work"))
    emit_results(args.json, rows)


if __name__ == "__main__":
    main()
