"""Shared helpers for the benchmark scripts: timing, the machine's matmul peak, and the results contract.

Every benchmark script takes `--quick` (small enough for a 2-core CPU) and
`--json PATH`, and ends with `emit_results(args.json, rows)`, which prints a
table and writes PATH as a JSON list with one object per measured figure:

    {"metric": "train tokens/s (bench config, batch 8)",  # what was measured
     "unit": "tokens/s",
     "gptj": 812.0,            # our median
     "peer": 640.0,            # the peer's median, measured in the same run (null if none)
     "peer_name": "HF PyTorch",
     "ratio": 1.27,            # how many times better gptj is (gptj/peer, or peer/gptj if lower is better)
     "limit": 1300.0,          # the hardware limit in the same unit (null if none), e.g. tokens/s at peak FLOP/s
     "fraction_of_limit": 0.62,  # gptj / limit (MFU when the limit is the FLOP/s peak)
     "spread": 0.04,           # (max - min) / median over gptj's timed runs
     "peer_spread": 0.06,
     "higher_is_better": true,
     "note": "..."}

Build rows with `result(...)`, which fills ratio and fraction_of_limit.
`benchmarks/run_all.py` runs each script with `--quick --json PATH` and merges
the lists. Timings are medians of several runs after warm-up (`time_runs`).
The matmul peak (`matmul_peak_flops`: the best of three medians) is measured
once by run_all and passed to every script in the `GPTJ_BENCH_PEAK_FLOPS`
environment variable, so all MFU figures of one run share one limit.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import statistics
import sys
import time
from typing import Any, Callable, Iterable, Sequence

PEAK_ENV = "GPTJ_BENCH_PEAK_FLOPS"

# The CPU bench model of issue 8's goals (pass to GPTJConfig(**BENCH_MODEL)), trained/scored at BENCH_SEQ_LEN.
BENCH_MODEL = dict(vocab_size=50400, num_layers=4, d_model=512, num_heads=8, rotary_dim=32, max_len=256)
BENCH_SEQ_LEN = 256

FIELDS = ("metric", "unit", "gptj", "peer", "peer_name", "ratio", "limit", "fraction_of_limit", "spread",
          "peer_spread", "higher_is_better", "note")


class ResultsError(ValueError):
    """A results file or row that breaks the contract above."""


@dataclasses.dataclass(frozen=True)
class Timing:
    """Wall-clock seconds of the timed runs (warm-up excluded)."""

    runs: tuple[float, ...]

    @property
    def median(self) -> float:
        return statistics.median(self.runs)

    @property
    def spread(self) -> float:
        """(max - min) / median: the relative range of the runs."""
        return (max(self.runs) - min(self.runs)) / self.median if self.median > 0 else 0.0


def time_runs(fn: Callable[[], Any], runs: int = 5, warmup: int = 1) -> Timing:
    """Calls `fn` `warmup` times untimed, then `runs` times timed; `fn` must block until its work is done.

    For JAX, end `fn` with `jax.block_until_ready(...)`; asynchronous dispatch
    would otherwise time only the launch.
    """
    if runs < 1 or warmup < 0:
        raise ValueError(f"need runs >= 1 and warmup >= 0, got runs={runs}, warmup={warmup}")
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return Timing(tuple(times))


def measure_matmul_flops(n: int = 2048, dtype: str = "float32", runs: int = 7) -> Timing:
    """Times an n x n x n jitted jnp matmul on the default device; FLOP/s is 2 n^3 / time."""
    import jax
    import jax.numpy as jnp

    ka, kb = jax.random.split(jax.random.PRNGKey(0))
    a = jax.random.normal(ka, (n, n), dtype=jnp.dtype(dtype))
    b = jax.random.normal(kb, (n, n), dtype=jnp.dtype(dtype))
    matmul = jax.jit(jnp.matmul)
    return time_runs(lambda: matmul(a, b).block_until_ready(), runs=runs, warmup=2)


def matmul_peak_flops(n: int = 2048, runs: int = 5, trials: int = 3) -> float:
    """This machine's fp32 matmul FLOP/s, the limit CPU MFU figures are measured against.

    Each trial is the median of `runs` timed n^3 matmuls; the peak is the best
    trial, because other load on a shared machine can only slow a trial down.
    Read from `GPTJ_BENCH_PEAK_FLOPS` when run_all has already measured it.
    """
    if os.environ.get(PEAK_ENV):
        return float(os.environ[PEAK_ENV])
    return max(2.0 * n**3 / measure_matmul_flops(n, "float32", runs).median for _ in range(trials))


def train_tokens_per_s_limit(config, seq_len: int, peak_flops: float | None = None) -> float:
    """Training tokens/s at 100% MFU: the peak over model FLOPs per token (6 N + 12 L d T, gptj.scaling).

    Use it as `limit` of a training row; `fraction_of_limit` is then the MFU.
    """
    from gptj.scaling import train_flops_per_token

    peak = matmul_peak_flops() if peak_flops is None else peak_flops
    return peak / train_flops_per_token(config, seq_len)[0]


def forward_tokens_per_s_limit(config, context_len: int, peak_flops: float | None = None) -> float:
    """Forward-only tokens/s at the FLOP peak (decode steps, scoring), attending over `context_len` tokens."""
    from gptj.scaling import forward_flops_per_token

    peak = matmul_peak_flops() if peak_flops is None else peak_flops
    return peak / forward_flops_per_token(config, context_len)


def result(metric: str, unit: str, gptj: float, *, peer: float | None = None, peer_name: str = "",
           limit: float | None = None, spread: float = 0.0, peer_spread: float | None = None,
           higher_is_better: bool = True, note: str = "") -> dict[str, Any]:
    """One row of the contract, with `ratio` and `fraction_of_limit` derived from the figures."""
    ratio = None
    if peer is not None and gptj > 0 and peer > 0:
        ratio = gptj / peer if higher_is_better else peer / gptj
    fraction = None
    if limit is not None and limit > 0:
        fraction = gptj / limit if higher_is_better else limit / gptj
    row = dict(metric=metric, unit=unit, gptj=float(gptj), peer=None if peer is None else float(peer),
               peer_name=peer_name, ratio=ratio, limit=None if limit is None else float(limit),
               fraction_of_limit=fraction, spread=float(spread),
               peer_spread=None if peer_spread is None else float(peer_spread),
               higher_is_better=bool(higher_is_better), note=note)
    validate_row(row)
    return row


def validate_row(row: Any, where: str = "result") -> dict[str, Any]:
    """Checks one row against the contract; returns it with any missing optional fields set to None/''."""
    if not isinstance(row, dict):
        raise ResultsError(f"{where}: expected an object, got {type(row).__name__}")
    for key in ("metric", "unit", "gptj"):
        if key not in row:
            raise ResultsError(f"{where}: missing required field {key!r}")
    unknown = sorted(set(row) - set(FIELDS))
    if unknown:
        raise ResultsError(f"{where}: unknown fields {unknown}; the contract has {list(FIELDS)}")
    for key in ("gptj", "peer", "ratio", "limit", "fraction_of_limit", "spread", "peer_spread"):
        value = row.get(key)
        if value is not None and (not isinstance(value, (int, float)) or isinstance(value, bool)
                                  or not math.isfinite(value)):
            raise ResultsError(f"{where}: field {key!r} must be a finite number or null, got {value!r}")
    full = {key: row.get(key) for key in FIELDS}
    full["peer_name"] = full["peer_name"] or ""
    full["note"] = full["note"] or ""
    full["higher_is_better"] = True if full["higher_is_better"] is None else bool(full["higher_is_better"])
    full["spread"] = full["spread"] or 0.0
    return full


def load_results(path: str) -> list[dict[str, Any]]:
    """Reads and validates a results file written by `emit_results`."""
    try:
        with open(path) as f:
            rows = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ResultsError(f"{path}: cannot read results ({e})") from None
    if not isinstance(rows, list):
        raise ResultsError(f"{path}: expected a JSON list of result objects")
    return [validate_row(r, f"{path}[{i}]") for i, r in enumerate(rows)]


def format_pct(value: float) -> str:
    """A percentage with one decimal below 1% (so a small spread does not print as 0%)."""
    return f"{value:.1f}%" if value < 1 else f"{value:.0f}%"


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if value == 0:
            return "0"
        if abs(value) >= 1000:
            return f"{value:,.0f}"
        return f"{value:.{digits}g}"
    return str(value)


def format_table(rows: Iterable[dict[str, Any]]) -> str:
    """A plain-text table: metric, unit, gptj (spread), peer, ratio, limit, fraction of limit."""
    header = ("metric", "unit", "gptj", "peer", "ratio", "limit", "of limit")
    lines = []
    for r in rows:
        gptj = _fmt(r["gptj"]) + (f" ±{format_pct(50 * r['spread'])}" if r.get("spread") else "")
        peer = _fmt(r.get("peer"))
        if r.get("peer") is not None and r.get("peer_name"):
            peer = f"{peer} ({r['peer_name']})"
        ratio = "-" if r.get("ratio") is None else f"{r['ratio']:.2f}x"
        frac = "-" if r.get("fraction_of_limit") is None else f"{100 * r['fraction_of_limit']:.1f}%"
        lines.append((r["metric"], r["unit"], gptj, peer, ratio, _fmt(r.get("limit")), frac))
    widths = [max(len(h), *(len(line[i]) for line in lines)) if lines else len(h) for i, h in enumerate(header)]
    out = [" | ".join(h.ljust(w) for h, w in zip(header, widths)), "-+-".join("-" * w for w in widths)]
    out += [" | ".join(c.ljust(w) for c, w in zip(line, widths)) for line in lines]
    return "\n".join(out)


def write_results(path: str, rows: Sequence[dict[str, Any]]) -> None:
    """Writes `rows` to `path` as the JSON contract (validated), creating its folder."""
    rows = [validate_row(r, f"row {i}") for i, r in enumerate(rows)]
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(rows, f, indent=1)


def emit_results(path: str | None, rows: Sequence[dict[str, Any]], stream=None) -> None:
    """Prints `rows` as a table (with their notes) and, when `path` is set, writes them there as the JSON contract."""
    rows = [validate_row(r, f"row {i}") for i, r in enumerate(rows)]
    stream = stream or sys.stdout
    print(format_table(rows), file=stream)
    for r in rows:
        if r["note"]:
            print(f"note ({r['metric']}): {r['note']}", file=stream)
    if path:
        write_results(path, rows)


def cpu_description() -> str:
    """`lscpu`'s model name, the core count and whether the CPU has AVX-512 (from /proc/cpuinfo's flags)."""
    model, flags = "unknown CPU", set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and model == "unknown CPU":
                    model = value.strip()
                elif key.strip() == "flags" and not flags:
                    flags = set(value.split())
    except OSError:
        pass
    avx512 = sorted(f for f in flags if f.startswith("avx512"))
    vector = f"AVX-512 ({', '.join(avx512[:4])}{', ...' if len(avx512) > 4 else ''})" if avx512 else (
        "AVX2 only, no AVX-512" if "avx2" in flags else "no AVX2")
    return f"{model}, {os.cpu_count()} cores, {vector}"


def add_common_args(parser) -> None:
    """Adds the two flags every benchmark script takes: --quick and --json PATH."""
    parser.add_argument("--quick", action="store_true", help="small sizes and few runs (a 2-core CPU in minutes)")
    parser.add_argument("--json", default="", help="write the results here (the contract in benchmarks/common.py)")
