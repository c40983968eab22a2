"""Peak host memory and time of every path that reads or writes GPT-J weights, beside HF's own loading.

    python benchmarks/weights_memory.py [--quick] [--json PATH] [--shapes=0.7b,2.7b] [--dir=DIR] [--keep]

For each shape, a random GPT-J checkpoint is written as HF writes it (fp32 safetensors,
`model.safetensors` or 5 GB shards, config.json) a tensor at a time; then each path runs
in a fresh process that imports what it needs, resets its peak resident memory
(`/proc/self/clear_refs`), runs, and reports its peak (VmHWM) above that baseline and its
wall time:

- `from_hf`: `python -m gptj.convert from_hf` (HF dir -> params directory);
- `to_hf`: `python -m gptj.convert to_hf` (params directory -> HF dir);
- `slim`: `python -m gptj.convert slim` (params directory -> bf16 params directory);
- `quantize`: `python -m gptj.convert quantize` (params directory -> int8 params directory);
- `load hf:` / `load params`: the weights placed for inference on this machine's device
  (`Weights.place`, what sample/serve/eval do first), fp32 and, with `-bf16`, cast to
  bf16 on read;
- `sample hf:` / `sample params`: `main.py --mode=sample` end to end (4 greedy tokens):
  loading plus compiling and running the model;
- `HF from_pretrained`: `GPTJForCausalLM.from_pretrained(low_cpu_mem_usage=True)` on the
  same safetensors, fp32 (and `torch_dtype=bfloat16` beside the `-bf16` row), every
  parameter then read once (fp32 weights stay memory-mapped until used; a first forward
  pass would read them all): the peer.

On a CPU the device is host memory, so a load's peak includes the placed weights (the
model's bytes in the placed dtype); on a GPU only the transient host buffers remain. Times
on a shared machine are noisy; peak memory is not. Shapes: `0.5b` (the memory test's,
0.53 GiB), `0.7b` (the issue's 710M parameters, 2.64 GiB fp32), `2.7b` (2.78B, 10.4 GiB:
needs about 24 GB free), `6b` (GPT-J-6B, 22.5 GiB). --quick: 0.5b only, and only the conversions
and fp32 loads beside HF's (about a minute on 2 cores).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import runpy
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks.common import add_common_args, emit_results, result  # noqa: E402

GIB = 2**30
# HF config fields of each shape (n_positions: 2048 unless given).
SHAPES = {
    "0.5b": dict(n_embd=1024, n_layer=4, n_head=16, rotary_dim=32, vocab_size=50400),
    "0.7b": dict(n_embd=2048, n_layer=10, n_head=16, rotary_dim=64, vocab_size=50400),
    "2.7b": dict(n_embd=2560, n_layer=32, n_head=20, rotary_dim=64, vocab_size=50400),
    "6b": dict(n_embd=4096, n_layer=28, n_head=16, rotary_dim=64, vocab_size=50400),
}
# Its tokens are all below 4096, so shapes with a small vocabulary sample it too.
PROMPT = "The man and the dog"
# Every child's path, in the order the table lists them.
PATHS = ("from_hf", "to_hf", "slim", "quantize", "load_hf", "load_params", "load_hf_bf16", "load_params_bf16", "sample_hf",
         "sample_params", "hf_from_pretrained", "hf_from_pretrained_bf16")
QUICK_PATHS = ("from_hf", "to_hf", "quantize", "load_hf", "load_params", "hf_from_pretrained")


def _status(field: str) -> int:
    """A VmRSS/VmHWM-style field of this process's /proc status, in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def write_random_checkpoint(out_dir: str, shape: dict, seed: int = 0, max_shard_size: str = "5GB") -> int:
    """A random HF GPT-J checkpoint (fp32 safetensors + config.json) written a tensor at a time; returns its bytes."""
    import numpy as np

    from gptj.model.transformer import GPTJConfig
    from gptj.weights.formats import hf, hf_files

    config = GPTJConfig(vocab_size=shape["vocab_size"], num_layers=shape["n_layer"], d_model=shape["n_embd"],
                        num_heads=shape["n_head"], rotary_dim=shape["rotary_dim"],
                        max_len=shape.get("n_positions", 2048))
    tensors = [(name, hf_shape, np.float32) for name, (_, _, hf_shape) in hf.hf_tensors(config).items()]
    os.makedirs(out_dir, exist_ok=True)
    writer = hf_files.ShardedWriter(out_dir, tensors, hf_files.parse_size(max_shard_size))
    rng = np.random.default_rng(seed)
    for name, hf_shape, _ in tensors:
        values = rng.standard_normal(hf_shape, dtype=np.float32) * np.float32(0.02)
        if name.endswith(("ln_1.weight", "ln_f.weight")):
            values += np.float32(1.0)
        writer.write(name, values)
    writer.commit()
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(hf.hf_config_dict(config), f, indent=2)
    return writer.total


# --- the children -----------------------------------------------------------------------------------------------


def _child(path: str, work: str) -> dict:
    """Runs one path in this (fresh) process; returns its peak above the post-import baseline, and its seconds."""
    import jax  # every path's baseline includes jax

    hf_dir, params_dir = os.path.join(work, "hf"), os.path.join(work, "params")
    out = os.path.join(work, f"out_{path}")
    shutil.rmtree(out, ignore_errors=True)
    if path.startswith("hf_from_pretrained"):
        import torch
        from transformers import GPTJForCausalLM

        def run():
            dtype = torch.bfloat16 if path.endswith("bf16") else torch.float32
            model = GPTJForCausalLM.from_pretrained(hf_dir, low_cpu_mem_usage=True, torch_dtype=dtype)
            # Memory-mapped weights are read when first used: touch them all, as a first forward pass would.
            with torch.no_grad():
                sum(float(p.sum()) for p in model.parameters())
    elif path.startswith("load"):
        from gptj.core.partitioning import Partitioner, make_mesh
        from gptj.weights.source import open_weights, param_shardings

        def run():
            weights = open_weights(f"hf:{hf_dir}" if "hf" in path else params_dir)
            dtype = "bfloat16" if path.endswith("bf16") else "float32"
            config = weights.config.replace(param_dtype=dtype, dtype=dtype)
            params = weights.place(param_shardings(config, Partitioner(make_mesh(1, 1), "megatron")), dtype=dtype)
            jax.block_until_ready(params)
    elif path.startswith("sample"):
        for module in ("gptj.inference.sampler", "gptj.weights.source"):  # before the baseline, as main.py's run has them
            importlib.import_module(module)

        weights = f"--config.init_from=hf:{hf_dir}" if path == "sample_hf" else ""
        workdir = out if path == "sample_hf" else params_dir
        argv = ["main.py", "--config=gptj/configs/tiny.py", f"--workdir={workdir}", "--mode=sample",
                f"--prompt={PROMPT}", "--max_new_tokens=4", "--temperature=0"] + ([weights] if weights else [])

        def run():
            sys.argv = argv
            try:
                runpy.run_path(os.path.join(ROOT, "main.py"), run_name="__main__")
            except SystemExit as e:
                if e.code:
                    raise
    else:
        from gptj.convert.__main__ import main

        argv = {"from_hf": ["from_hf", f"--hf_dir={hf_dir}", f"--out={params_dir}"],
                "to_hf": ["to_hf", f"--workdir={params_dir}", f"--out={out}"],
                "slim": ["slim", f"--workdir={params_dir}", f"--out={out}"],
                "quantize": ["quantize", f"--workdir={params_dir}", f"--out={out}", "--bits=8"]}[path]

        def run():
            if main(argv) != 0:
                raise RuntimeError(f"python -m gptj.convert {' '.join(argv)} failed")
    baseline = _status("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := VmRSS: the peak from here on
    start = time.perf_counter()
    run()
    return {"peak": _status("VmHWM") - baseline, "seconds": time.perf_counter() - start, "baseline": baseline}


def measure(path: str, work: str, timeout: float = 3600) -> dict:
    """Runs `path` (one of PATHS) in a fresh process on the checkpoint in `work`; {"peak", "seconds", "baseline"}."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT] + [p for p in [os.environ.get("PYTHONPATH")] if p]),
               JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", "cpu"), TF_CPP_MIN_LOG_LEVEL="3",
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env["XLA_FLAGS"] = " ".join(f for f in env.get("XLA_FLAGS", "").split()
                                if "xla_force_host_platform_device_count" not in f)  # one device, as a user has
    done = subprocess.run([sys.executable, os.path.abspath(__file__), f"--child={path}", f"--dir={work}"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"{path} failed (exit {done.returncode}): {(done.stdout + done.stderr)[-2000:]}")
    return json.loads(lines[-1])


# --- the benchmark ----------------------------------------------------------------------------------------------


def run_shape(name: str, base: str, paths=PATHS) -> tuple[int, dict[str, dict]]:
    """(the checkpoint's bytes, {path: measurement}) for one shape; the paths that write run before their readers."""
    work = os.path.join(base, name)
    shutil.rmtree(work, ignore_errors=True)
    model_bytes = write_random_checkpoint(os.path.join(work, "hf"), SHAPES[name])
    print(f"{name}: {model_bytes / GIB:.2f} GiB of fp32 weights in {work}/hf", flush=True)
    found = {}
    for path in paths:
        found[path] = measure(path, work)
        print(f"  {path:<24} peak {found[path]['peak'] / GIB:6.2f} GiB "
              f"({found[path]['peak'] / model_bytes:4.2f}x the model) in {found[path]['seconds']:6.1f} s", flush=True)
    return model_bytes, found


def rows_for(name: str, model_bytes: int, found: dict[str, dict]) -> list[dict]:
    """Result rows (benchmarks/common.py's contract): peak GiB and seconds of each path, HF's loading as the peer."""
    label = f"{name} fp32, {model_bytes / GIB:.2f} GiB"
    peer = {"fp32": found.get("hf_from_pretrained"), "bf16": found.get("hf_from_pretrained_bf16")}
    rows = []
    titles = {"from_hf": "convert from_hf", "to_hf": "convert to_hf", "slim": "convert slim (bf16)",
              "quantize": "convert quantize (int8)",
              "load_hf": "load hf: for inference", "load_params": "load params dir for inference",
              "load_hf_bf16": "load hf: as bf16", "load_params_bf16": "load params dir as bf16",
              "sample_hf": "--mode=sample init_from=hf:", "sample_params": "--mode=sample params dir"}
    for path, title in titles.items():
        if path not in found:
            continue
        versus = peer["bf16" if path.endswith("bf16") else "fp32"] if path.startswith("load") else None
        note = (f"{found[path]['peak'] / model_bytes:.2f}x the model's bytes; {found[path]['seconds']:.1f} s"
                + (f" (HF from_pretrained {versus['seconds']:.1f} s)" if versus else ""))
        rows.append(result(f"peak host RSS, {title} ({label})", "GiB", found[path]["peak"] / GIB,
                           peer=None if versus is None else versus["peak"] / GIB,
                           peer_name="HF from_pretrained(low_cpu_mem_usage=True)" if versus else "",
                           higher_is_better=False, note=note))
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_args(parser)
    parser.add_argument("--shapes", default="0.7b", help=f"comma list of {sorted(SHAPES)} (default 0.7b)")
    parser.add_argument("--dir", default=None, help="where the checkpoints go (default: a temporary directory)")
    parser.add_argument("--keep", action="store_true", help="keep the checkpoints")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(_child(args.child, args.dir)), flush=True)
        return 0
    shapes = ["0.5b"] if args.quick else [s.strip() for s in args.shapes.split(",") if s.strip()]
    unknown = sorted(set(shapes) - set(SHAPES))
    if unknown:
        parser.error(f"unknown shapes {unknown}; choose from {sorted(SHAPES)}")
    base = args.dir or tempfile.mkdtemp(prefix="weights_memory_")
    rows = []
    try:
        for name in shapes:
            model_bytes, found = run_shape(name, base, QUICK_PATHS if args.quick else PATHS)
            rows += rows_for(name, model_bytes, found)
            if not args.keep:
                shutil.rmtree(os.path.join(base, name), ignore_errors=True)
    finally:
        if not args.keep and not args.dir:
            shutil.rmtree(base, ignore_errors=True)
    emit_results(args.json, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
