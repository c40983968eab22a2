"""Runs every benchmark against its peer on this machine and reports one table, a JSON file and a bar chart.

    python benchmarks/run_all.py --quick            # < 56 minutes on a 2-core CPU
    python benchmarks/run_all.py --only=train_vs_hf,decode_vs_hf

Each benchmark script (train_vs_hf, lora_vs_peft, decode_vs_hf, quantized_decode, eval_vs_hf, prepare_data,
weights_memory, serve_load, dpo_vs_trl, multi_lora, and serve_load's adapters and prefix workloads:
`serve_load:adapters` runs `serve_load.py --workload=adapters`)
runs as a child process, one after another so they never share the cores, with
`--quick` and `--json PATH`; what it writes follows the contract in
benchmarks/common.py. run_all first measures the machine's fp32 matmul peak
(the limit behind every CPU MFU figure, passed to the children in
GPTJ_BENCH_PEAK_FLOPS) and jnp's matmul against torch's. A script that is
missing, fails, times out or lacks `--json` is left out of the table with a
note saying which. Outputs in --out-dir (default benchmarks/results):
results.json (machine, command, date, per-script status, all rows),
results.md (the table in Markdown, for the README), benchmarks.png (speed-up
over the peer, and fraction of the hardware limit) and logs/<script>.log.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import signal
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks.common import (PEAK_ENV, ResultsError, cpu_description, format_pct, format_table,  # noqa: E402
                               load_results, matmul_peak_flops, result, time_runs)

# (script[:workload], seconds allowed with --quick); a full run gets 4x. The quick budgets
# add up to 56.5 minutes (serve_load starts three servers, its adapters workload six); TOTAL_QUICK_BUDGET_S
# caps the run at 55 (the scripts usually finish well inside their budgets), leaving room for the peak
# measurement.
SCRIPTS = (("train_vs_hf", 270), ("lora_vs_peft", 150), ("decode_vs_hf", 210), ("quantized_decode", 270),
           ("eval_vs_hf", 210), ("prepare_data", 90), ("weights_memory", 120), ("serve_load", 480),
           ("dpo_vs_trl", 150), ("multi_lora", 150), ("serve_load:prefix", 600), ("serve_load:adapters", 720))
TOTAL_QUICK_BUDGET_S = 55 * 60
# jnp and torch run the same fp32 matmul on the same cores, so they should tie; beyond this
# either side lacks threads (a torch with half its threads once made every HF ratio 2x too kind).
MATMUL_TIE_TOLERANCE = 0.2


def matmul_tie_warning(jnp_flops: float, torch_flops: float | None) -> str:
    """'' where jnp's and torch's fp32 matmul tie within MATMUL_TIE_TOLERANCE, else what the gap means.

    jnp far ahead means torch was starved of threads (every ratio against a torch peer is then too kind to
    gptj). jnp far behind, with torch at full strength, is XLA:CPU's GEMM (Eigen) losing to torch's oneDNN
    on this CPU (the README's GEMM section, benchmarks/cpu_gemm.py): the ratios stand, under that ceiling.
    """
    if torch_flops is None:
        return ""
    ratio = jnp_flops / torch_flops
    if abs(ratio - 1) <= MATMUL_TIE_TOLERANCE:
        return ""
    import torch

    threads = f"torch has {torch.get_num_threads()} threads on {os.cpu_count()} cores"
    if ratio > 1:
        return (f"jnp's fp32 matmul is {ratio:.2f}x torch's (they should tie within {MATMUL_TIE_TOLERANCE:.0%}; "
                f"{threads}): torch was starved, so every ratio against a torch peer in this run is too kind to gptj")
    return (f"jnp's fp32 matmul is {ratio:.2f}x torch's ({threads}): XLA:CPU's GEMM is the slower side on this CPU "
            f"(see benchmarks/cpu_gemm.py), so every gptj figure here sits under that lower ceiling")


def measure_matmul_peaks(n: int = 2048, trials: int = 3) -> tuple[float, float | None]:
    """jnp's and torch's fp32 matmul FLOP/s (each the best of `trials` medians of 5), trials alternating.

    Alternating keeps a shared machine's changing load from favouring either.
    torch's figure is None where torch is not installed.
    """
    try:
        import torch
    except ImportError:
        torch = None
    jnp_best = torch_best = 0.0
    for _ in range(trials):
        jnp_best = max(jnp_best, matmul_peak_flops(n=n, trials=1))
        if torch is not None:
            a, b = torch.randn(n, n), torch.randn(n, n)
            t = time_runs(lambda: torch.matmul(a, b), runs=5, warmup=2)
            torch_best = max(torch_best, 2.0 * n**3 / t.median)
    return jnp_best, (torch_best if torch is not None else None)


def matmul_row(peak: float, torch_flops: float | None, n: int = 2048) -> dict:
    """The limit row: jnp's fp32 matmul peak, with torch's as its peer."""
    return result(f"fp32 matmul {n}^3 (the CPU MFU limit)", "GFLOP/s", peak / 1e9,
                  peer=None if torch_flops is None else torch_flops / 1e9, peer_name="torch",
                  note="jnp on XLA:CPU vs torch, trials alternating; each the best of three medians of 5 (a "
                       "shared machine's load only slows a trial down); every CPU MFU below divides by jnp's")


def _tail(path: str, lines: int = 3) -> str:
    try:
        with open(path, errors="replace") as f:
            text = f.read().strip().splitlines()
    except OSError:
        return ""
    return " | ".join(text[-lines:])


def run_script(name: str, bench_dir: str, out_dir: str, quick: bool, timeout: float, env: dict) -> dict:
    """Runs one benchmark script (`script` or `script:workload`, run with --workload=workload); returns its
    status record with the rows it produced (possibly none)."""
    script, _, workload = name.partition(":")
    path = os.path.join(bench_dir, f"{script}.py")
    record = {"name": name, "status": "ok", "seconds": 0.0, "note": "", "rows": []}
    if not os.path.exists(path):
        record.update(status="missing", note=f"{os.path.relpath(path, ROOT)} does not exist yet; left out")
        return record
    stem = name.replace(":", "-")
    json_path = os.path.join(out_dir, "parts", f"{stem}.json")
    log_path = os.path.join(out_dir, "logs", f"{stem}.log")
    for p in (json_path, log_path):
        os.makedirs(os.path.dirname(p), exist_ok=True)
    if os.path.exists(json_path):
        os.remove(json_path)
    workload_args = [f"--workload={workload}"] if workload else []
    cmd = [sys.executable, path] + workload_args + (["--quick"] if quick else []) + ["--json", json_path]
    start = time.perf_counter()
    with open(log_path, "w") as log:
        log.write("$ " + " ".join(cmd) + "\n")
        log.flush()
        # Own process group, so a time-out also ends whatever the script started.
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            rc = None
    record["seconds"] = round(time.perf_counter() - start, 1)
    if rc is None:
        record.update(status="timeout", note=f"stopped after {timeout:.0f} s; see {os.path.relpath(log_path, ROOT)}")
    elif rc != 0:
        tail = _tail(log_path)
        if "unrecognized arguments" in tail and "--json" in tail:
            record.update(status="no-contract",
                          note="does not accept --json (the contract in benchmarks/common.py); results left out")
        else:
            record.update(status="failed", note=f"exit {rc}: {tail[-300:]}")
    if os.path.exists(json_path):
        try:
            record["rows"] = load_results(json_path)
        except ResultsError as e:
            record.update(status="bad-output", note=str(e)[:300])
    elif record["status"] == "ok":
        record.update(status="no-output", note="exited 0 without writing --json; results left out")
    return record


def markdown(rows: list[dict], command: str, date: str, peak: float, records: list[dict], warning: str = "") -> str:
    """The table as Markdown (for the README), with the command, date, machine and anything left out."""
    def num(v):
        return "-" if v is None else (f"{v:,.0f}" if abs(v) >= 1000 else f"{v:.3g}")

    lines = [f"`{command}` on {date}, {cpu_description()}, fp32 matmul peak {peak / 1e9:.0f} GFLOP/s", "",
             "| metric | gptj | peer | ratio | limit | of limit |", "|---|---|---|---|---|---|"]
    for r in rows:
        gptj = f"{num(r['gptj'])} {r['unit']}" + (f" ±{format_pct(50 * r['spread'])}" if r.get("spread") else "")
        peer = "-" if r.get("peer") is None else f"{num(r['peer'])} ({r.get('peer_name') or 'peer'})"
        ratio = "-" if r.get("ratio") is None else f"{r['ratio']:.2f}x"
        frac = "-" if r.get("fraction_of_limit") is None else f"{100 * r['fraction_of_limit']:.1f}%"
        lines.append(f"| {r['metric']} | {gptj} | {peer} | {ratio} | {num(r.get('limit'))} | {frac} |")
    if warning:
        lines.append(f"\n**Warning**: {warning}.")
    lines += [f"\nLeft out: {rec['name']} ({rec['status']}: {rec['note']})" for rec in records if rec["status"] != "ok"]
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: str, title: str) -> None:
    """Two horizontal bar panels: speed-up over the peer (line at 1x) and fraction of the hardware limit."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    vs_peer = [r for r in rows if r.get("ratio") is not None]
    vs_limit = [r for r in rows if r.get("fraction_of_limit") is not None]
    panels = [(vs_peer, "ratio", "times better than the peer (>1: gptj wins)", 1.0),
              (vs_limit, "fraction_of_limit", "fraction of the hardware limit", None)]
    panels = [p for p in panels if p[0]]
    if not panels:
        panels = [([], "ratio", "no comparable results", None)]
    height = 1.5 + 0.45 * sum(max(1, len(p[0])) for p in panels)
    fig, axes = plt.subplots(len(panels), 1, figsize=(10, height), squeeze=False,
                             gridspec_kw={"height_ratios": [max(1, len(p[0])) for p in panels]})
    for ax, (subset, key, label, line) in zip(axes[:, 0], panels):
        names = [r["metric"] if len(r["metric"]) <= 60 else r["metric"][:57] + "..." for r in subset]
        values = [r[key] for r in subset]
        colors = ["tab:green" if (line is None or v >= line) else "tab:red" for v in values]
        ax.barh(range(len(values)), values, color=colors)
        ax.set_yticks(range(len(values)), names, fontsize=8)
        ax.invert_yaxis()
        ax.set_xlabel(label)
        if line is not None:
            ax.axvline(line, color="black", linewidth=1)
        else:
            ax.axvline(1.0, color="gray", linewidth=1, linestyle=":")  # 100% of the limit
        for i, v in enumerate(values):
            ax.text(v, i, f" {v:.2f}x" if key == "ratio" else f" {100 * v:.0f}%", va="center", fontsize=8)
    axes[0, 0].set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="each script's quick mode (a 2-core CPU, < 56 min)")
    parser.add_argument("--only", default="", help="comma list of scripts to run (default: all)")
    parser.add_argument("--out-dir", default=os.path.join(ROOT, "benchmarks", "results"))
    parser.add_argument("--bench-dir", default=os.path.join(ROOT, "benchmarks"), help="where the scripts live")
    parser.add_argument("--peak-flops", type=float, default=0.0, help="skip measuring the matmul peak; use this")
    args = parser.parse_args(argv)

    known = [name for name, _ in SCRIPTS]
    only = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = sorted(set(only) - set(known))
    if unknown:
        parser.error(f"unknown scripts {unknown}; choose from {known}")
    scripts = [(n, t) for n, t in SCRIPTS if not only or n in only]
    os.makedirs(args.out_dir, exist_ok=True)

    started = time.perf_counter()
    peak, torch_flops = measure_matmul_peaks() if not args.peak_flops else (args.peak_flops, None)
    print(f"fp32 matmul peak: {peak / 1e9:.1f} GFLOP/s (load average {os.getloadavg()[0]:.1f}); {cpu_description()}",
          flush=True)
    tie_warning = matmul_tie_warning(peak, torch_flops)
    if tie_warning:
        print(f"warning: {tie_warning}", flush=True)
    rows: list[dict] = []
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT] + [p for p in [os.environ.get("PYTHONPATH")] if p]),
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env[PEAK_ENV] = repr(peak)

    records = []
    for name, quick_budget in scripts:
        budget = quick_budget if args.quick else 4 * quick_budget
        if args.quick:
            budget = min(budget, TOTAL_QUICK_BUDGET_S - (time.perf_counter() - started))
        if budget < 10:
            records.append({"name": name, "status": "skipped", "seconds": 0.0, "rows": [],
                            "note": f"no time left in the {TOTAL_QUICK_BUDGET_S / 60:g}-minute quick budget"})
            continue
        print(f"running {name} (up to {budget:.0f} s) ...", flush=True)
        record = run_script(name, args.bench_dir, args.out_dir, args.quick, budget, env)
        print(f"  {record['status']} in {record['seconds']} s" + (f": {record['note']}" if record["note"] else ""),
              flush=True)
        records.append(record)
        rows.extend(record["rows"])

    # Measured again afterwards as a check on the machine's load: the scripts used the first figure.
    peak_after = matmul_peak_flops() if not args.peak_flops else peak
    if abs(peak_after / peak - 1) > 0.2:
        print(f"warning: the fp32 matmul peak was {peak / 1e9:.1f} GFLOP/s before the scripts and "
              f"{peak_after / 1e9:.1f} after: the machine's load changed during the run, so its figures are noisy")
    rows.insert(0, matmul_row(peak, torch_flops))

    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    command = "python benchmarks/run_all.py" + (" --quick" if args.quick else "") + (
        f" --only={args.only}" if args.only else "")
    machine = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
               "cpu": cpu_description(), "cpu_count": os.cpu_count(), "fp32_matmul_peak_flops": peak,
               "torch_fp32_matmul_flops": torch_flops, "matmul_tie_warning": tie_warning,
               "fp32_matmul_peak_flops_after": peak_after, "load_average": os.getloadavg()}
    print(f"\n{command}  ({date}, {cpu_description()}, fp32 matmul peak {peak / 1e9:.1f} GFLOP/s)\n")
    print(format_table(rows))
    for r in rows:
        if r.get("note"):
            print(f"note ({r['metric']}): {r['note']}")
    for rec in records:
        if rec["status"] != "ok":
            print(f"left out: {rec['name']}: {rec['status']} - {rec['note']}")

    json_path = os.path.join(args.out_dir, "results.json")
    png_path = os.path.join(args.out_dir, "benchmarks.png")
    with open(json_path, "w") as f:
        json.dump({"command": command, "date": date, "machine": machine,
                   "scripts": [{k: v for k, v in rec.items() if k != "rows"} for rec in records],
                   "results": rows}, f, indent=1)
    plot(rows, png_path, f"gptj vs peers on {os.cpu_count()} CPU cores ({date})")
    with open(os.path.join(args.out_dir, "results.md"), "w") as f:
        f.write(markdown(rows, command, date, peak, records, tie_warning))
    print(f"\nwrote {os.path.relpath(json_path)} and {os.path.relpath(png_path)} "
          f"in {time.perf_counter() - started:.0f} s")
    broken = [rec["name"] for rec in records if rec["status"] in ("failed", "timeout", "bad-output", "no-output")]
    return 1 if broken else 0


if __name__ == "__main__":
    sys.exit(main())
