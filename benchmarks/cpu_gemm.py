"""XLA:CPU's GEMM paths against torch's on this CPU: which XLA flag, if any, makes jnp's matmul tie torch's.

    python benchmarks/cpu_gemm.py [--quick] [--json PATH]

XLA:CPU sends a dot to Eigen's GEMM by default (built into jaxlib for its
baseline ISA), while torch calls oneDNN, which picks its kernels at run time
for the CPU it finds (AVX-512 where there is one). This jaxlib also carries
XNNPACK and YNNPACK (run-time dispatch as well) and oneDNN, each behind a flag.
Every configuration below runs in a process of its own (XLA_FLAGS is read once
per process), alternating with torch's matmul of the same shape in this one,
so each row's ratio compares the two under the same load:

- `default`: Eigen;
- `xnn dot`: `--xla_cpu_experimental_xnn_fusion_type=dot` (dots through XNNPACK);
- `ynn dot`: `--xla_cpu_experimental_ynn_fusion_type=dot` (through YNNPACK);
- `onednn`: `--xla_cpu_use_onednn=true` (oneDNN thunks for matmul fusions);
- `onednn custom call`: `--xla_cpu_experimental_onednn_custom_call=true`;
- `512-bit vectors`: `--xla_cpu_prefer_vector_width=512` (LLVM codegen of fusions; AVX-512 only).

fp32 and bf16 operands (bf16 with fp32 accumulation, as the model computes).
A configuration whose flag this jaxlib refuses is reported as such.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks.common import add_common_args, cpu_description, emit_results, result, time_runs  # noqa: E402

CONFIGS = {
    "default": "",
    "xnn dot": "--xla_cpu_experimental_xnn_fusion_type=dot",
    "ynn dot": "--xla_cpu_experimental_ynn_fusion_type=dot",
    "onednn": "--xla_cpu_use_onednn=true",
    "onednn custom call": "--xla_cpu_experimental_onednn_custom_call=true",
    "512-bit vectors": "--xla_cpu_prefer_vector_width=512",
}

# Run in a child process with XLA_FLAGS set: prints {"median_s": ..., "runs": [...]} for one n^3 matmul.
_CHILD = """
import json, sys, time
import jax, jax.numpy as jnp
n, dtype, runs = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
a, b = (jax.random.normal(k, (n, n), jnp.float32).astype(dtype) for k in jax.random.split(jax.random.PRNGKey(0)))
f = jax.jit(lambda x, y: jnp.matmul(x, y, preferred_element_type=jnp.float32))
f(a, b).block_until_ready(); f(a, b).block_until_ready()
times = []
for _ in range(runs):
    t = time.perf_counter(); f(a, b).block_until_ready(); times.append(time.perf_counter() - t)
print(json.dumps({"runs": times}))
"""


def jnp_matmul_seconds(flags: str, n: int, dtype: str, runs: int) -> list[float] | str:
    """Timed runs of jnp's n^3 matmul under `flags` (its own process), or the error line if it failed."""
    env = dict(os.environ, XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} {flags}".strip(), JAX_PLATFORMS="cpu")
    done = subprocess.run([sys.executable, "-c", _CHILD, str(n), dtype, str(runs)], env=env, capture_output=True,
                          text=True, timeout=900)
    if done.returncode != 0:
        lines = [line for line in done.stderr.splitlines() if line.strip()]
        return (lines[-1] if lines else f"exit status {done.returncode}")[:200]
    return json.loads(done.stdout.strip().splitlines()[-1])["runs"]


def torch_matmul_seconds(n: int, dtype: str, runs: int) -> list[float]:
    """Timed runs of torch's n^3 matmul (bf16 operands accumulate in fp32 inside oneDNN)."""
    import torch

    a, b = (torch.randn(n, n).to(getattr(torch, dtype)) for _ in range(2))
    return list(time_runs(lambda: torch.matmul(a, b), runs=runs, warmup=2).runs)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_args(parser)
    parser.add_argument("--n", type=int, default=0, help="matrix size (default 2048, --quick 1024)")
    parser.add_argument("--configs", default=",".join(CONFIGS), help="comma-separated names of CONFIGS")
    args = parser.parse_args(argv)
    import torch

    n = args.n or (1024 if args.quick else 2048)
    runs = 5 if args.quick else 9
    flops = 2.0 * n**3
    print(f"{cpu_description()}; torch {torch.__version__} with {torch.get_num_threads()} threads", flush=True)
    rows = []
    for dtype in ("float32", "bfloat16"):
        for name in args.configs.split(","):
            timed = jnp_matmul_seconds(CONFIGS[name], n, dtype, runs)
            peer = torch_matmul_seconds(n, dtype, runs)  # right after, under the same load
            metric = f"{dtype} matmul {n}^3, XLA {name}"
            peer_gflops = flops / sorted(peer)[len(peer) // 2] / 1e9
            if isinstance(timed, str):
                print(f"{metric}: refused ({timed})", flush=True)
                rows.append(result(metric, "GFLOP/s", 0.0, peer=peer_gflops, peer_name="torch (oneDNN)",
                                   note=f"flag refused: {timed}"))
                continue
            gflops = flops / sorted(timed)[len(timed) // 2] / 1e9
            rows.append(result(metric, "GFLOP/s", gflops, peer=peer_gflops, peer_name="torch (oneDNN)",
                               note=CONFIGS[name] or "Eigen (XLA's default)"))
    emit_results(args.json, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
