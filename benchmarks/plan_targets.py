"""The README's table of GPT-J-6B plans on TPUs and GPUs (README, "On GPUs and TPUs"): each plan compiled by the
target's own compiler on this CPU machine, beside the CPU plan of the same config, the model's FLOP count, the
seed's measured throughput where it published one, and `gptj.scaling`'s prediction.

    XLA_FLAGS=--xla_force_host_platform_device_count=256 python benchmarks/plan_targets.py [--only=v3-8,lora]
        [--no-cpu] [--json PATH]

Prints a markdown table (and writes the rows as JSON with --json). Needs the TPU and GPU compilers
(scripts/install.sh). Every row is one compile of the 6B train step (or six, for the serving row) per
compiler: about 20 minutes on a 2-core CPU. `gptj.scaling` is imported here, not by gptj.plan (no module
of gptj imports the scaling model).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=256")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

GIB = 2**30


@dataclasses.dataclass(frozen=True)
class Row:
    """One plan of the table: a name, a config, a target, and what the seed measured (tokens/s), if anything."""

    key: str
    what: str
    target: str
    overrides: dict
    config: str = "gptj_6b"
    device_memory_gib: float | None = None
    seed_tokens_per_s: float | None = None
    scaling_point: str = ""  # a gptj.scaling.REFERENCE_POINTS name; else a Workload from the config


ROWS = (
    Row("v3-8", "GPT-J-6B fine-tuning as the seed ran it: 1 x 8 megatron, batch 16 in 16 microbatches",
        "tpu:v3-8", {"mesh.data": 1, "mesh.model": 8, "train.batch_size": 16, "train.microbatches": 16},
        seed_tokens_per_s=5_000, scaling_point="v3-8"),
    Row("v3-256", "GPT-J-6B pre-training as the seed ran it: 32 x 8 megatron, batch 512 in 16 microbatches",
        "tpu:v3-256", {"mesh.data": 32, "mesh.model": 8, "train.batch_size": 512, "train.microbatches": 16},
        seed_tokens_per_s=151_000, scaling_point="v3-256"),
    Row("lora", "gptj_6b_lora.py: rank-16 LoRA over a frozen bf16 base, batch 8 in 8 microbatches",
        "gpu:h100", {}, config="gptj_6b_lora"),
    Row("lora-24", "the same on a 24 GiB GPU", "gpu:h100", {}, config="gptj_6b_lora", device_memory_gib=24),
    Row("full-1", "full fine-tuning on one GPU, batch 1 x 2048", "gpu:h100",
        {"mesh.data": 1, "mesh.model": 1, "train.batch_size": 1, "train.microbatches": 1}),
    Row("zero3-8", "full fine-tuning, 8 x 1 zero3, batch 16 in 2 microbatches", "gpu:h100x8",
        {"mesh.data": 8, "mesh.model": 1, "mesh.rules": "zero3", "train.batch_size": 16, "train.microbatches": 2}),
    Row("megatron-8", "full fine-tuning, 1 x 8 megatron, batch 16 in 16 microbatches", "gpu:h100x8",
        {"mesh.data": 1, "mesh.model": 8, "train.batch_size": 16, "train.microbatches": 16}),
    Row("serve", "serving batch 1 x 2048 tokens on one GPU: bf16, int8, int4 weights", "gpu:h100",
        {"mesh.data": 1, "mesh.model": 1}),
)


def _config(row: Row):
    from gptj.configs import load_config

    config = load_config(row.config)
    for dotted, value in row.overrides.items():
        section, field = dotted.split(".")
        config[section][field] = value
    return config


def _scaling(row: Row, config, devices: int) -> float | None:
    """gptj.scaling's predicted tokens/s for a train row (None for rows it does not model: LoRA)."""
    from gptj import scaling

    if row.scaling_point:
        return scaling.estimate(scaling.REFERENCE_POINTS[row.scaling_point].workload, "tpu_v3").tokens_per_s
    if config.lora.rank:
        return None
    hardware = "tpu_v3" if row.target.startswith("tpu:v3") else "h100"
    return scaling.estimate_from_config(config, devices, hardware).tokens_per_s


def _train_row(row: Row, with_cpu: bool) -> dict:
    from gptj import plan as plan_lib

    config = _config(row)
    start = time.perf_counter()
    plan = plan_lib.make_plan(config, row.device_memory_gib, target=row.target)
    seconds = time.perf_counter() - start
    cpu = plan_lib.make_plan(config, row.device_memory_gib or 16) if with_cpu else None
    work = plan.work
    devices = plan.work.devices if work else 1
    return dict(
        key=row.key, what=row.what, target=row.target, compile_s=round(seconds, 1),
        peak_gib=None if plan.peak is None else plan.peak / GIB, refused=plan.refused,
        temporaries_gib=None if plan.temporaries is None else plan.temporaries / GIB,
        device_memory_gib=plan.device_memory / GIB, fits=plan.fits,
        cpu_peak_gib=None if cpu is None else cpu.peak / GIB,
        cpu_temporaries_gib=None if cpu is None else cpu.temporaries / GIB,
        compiled_flops=work.compiled_flops if work else None,
        counted_flops=(work.model_flops + work.recompute_flops) if work else None,
        bound_s=work.bound.seconds if work else None, limited_by=work.bound.limited_by if work else None,
        max_tokens_per_s=work.tokens_per_s if work else None, max_mfu=work.mfu if work else None,
        seed_tokens_per_s=row.seed_tokens_per_s, scaling_tokens_per_s=_scaling(row, config, devices))


def _serve_rows(row: Row, with_cpu: bool) -> list[dict]:
    from gptj import plan as plan_lib
    from gptj import scaling

    config = _config(row)
    start = time.perf_counter()
    plan = plan_lib.make_serve_plan(config, batch=1, context=2048, device_memory_gib=row.device_memory_gib,
                                    target=row.target)
    seconds = time.perf_counter() - start
    cpu = plan_lib.make_serve_plan(config, batch=1, context=2048, device_memory_gib=80) if with_cpu else None
    shape = scaling.MODEL_SHAPES["gptj_6b"]
    rows = []
    for i, served in enumerate(plan.rows):
        weight_bytes = {0: 2, 1: 1, 2: 0.5}[i]
        rows.append(dict(
            key=f"serve-{served.weights_format.split()[0]}", what=f"serving {served.weights_format}, batch 1 x 2048",
            target=row.target, compile_s=round(seconds / len(plan.rows), 1),
            peak_gib=None if served.peak is None else served.peak / GIB, refused=served.refused,
            temporaries_gib=None if served.temporaries is None else served.temporaries / GIB,
            device_memory_gib=plan.device_memory / GIB, fits=plan.fits(served),
            cpu_peak_gib=None if cpu is None else cpu.rows[i].peak / GIB,
            cpu_temporaries_gib=None if cpu is None else cpu.rows[i].temporaries / GIB,
            compiled_flops=None, counted_flops=None,
            bound_s=served.decode_bound.seconds if served.decode_bound else None,
            limited_by=served.decode_bound.limited_by if served.decode_bound else None,
            max_tokens_per_s=1 / served.decode_bound.seconds if served.decode_bound else None, max_mfu=None,
            seed_tokens_per_s=None,
            scaling_tokens_per_s=scaling.decode_limit(shape, 1, 2048, "h100", weight_bytes=weight_bytes)))
    return rows


def markdown(results: list[dict]) -> str:
    """The README table."""
    def gib(x):
        return "—" if x is None else f"{x:.2f}"

    def num(x, fmt):
        return "—" if x is None else format(x, fmt)

    lines = ["| plan | target | peak GiB per device (target compiler) | CPU plan's peak | fits | compiled FLOPs "
             "/ model count | step-time bound | at most tokens/s (MFU) | seed measured | gptj.scaling |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        peak = f"refused: {r['refused']}" if r["refused"] else gib(r["peak_gib"])
        flops = "—" if r["compiled_flops"] is None else (
            f"{r['compiled_flops']:.3g} / {r['counted_flops']:.3g} ({r['compiled_flops'] / r['counted_flops']:.2f})")
        bound = "—" if r["bound_s"] is None else f"{r['bound_s']:.3g} s ({r['limited_by']})"
        tokens = num(r["max_tokens_per_s"], ",.0f") + ("" if r["max_mfu"] is None else f" ({100 * r['max_mfu']:.0f}%)")
        fits = {True: "yes", False: "no", None: "?"}[r["fits"]] + f" ({r['device_memory_gib']:.0f} GiB)"
        lines.append(f"| {r['what']} | {r['target']} | {peak} | {gib(r['cpu_peak_gib'])} | {fits} | {flops} | "
                     f"{bound} | {tokens} | {num(r['seed_tokens_per_s'], ',.0f')} | "
                     f"{num(r['scaling_tokens_per_s'], ',.0f')} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", default="", help=f"comma-separated rows of {[r.key for r in ROWS]}")
    parser.add_argument("--no-cpu", action="store_true", help="leave out the CPU plans (half the compiles)")
    parser.add_argument("--json", default="", help="also write the rows here")
    args = parser.parse_args(argv)
    only = [k for k in args.only.split(",") if k]
    unknown = sorted(set(only) - {r.key for r in ROWS})
    if unknown:
        parser.error(f"unknown rows {unknown}")
    results = []
    for row in ROWS:
        if only and row.key not in only:
            continue
        found = _serve_rows(row, not args.no_cpu) if row.key == "serve" else [_train_row(row, not args.no_cpu)]
        for result in found:
            print(json.dumps(result), flush=True)
        results += found
    print(markdown(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
