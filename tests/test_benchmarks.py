"""Benchmark plumbing: timing and the results contract, run_all's merging of scripts, and gpu.sh --dry-run."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # benchmarks/ is a folder of scripts at the repository root

from xla_env import xla_flags  # noqa: E402

from benchmarks import common, run_all  # noqa: E402


def test_time_runs_warms_up_then_times():
    calls = []
    timing = common.time_runs(lambda: calls.append(1), runs=4, warmup=2)
    assert len(calls) == 6 and len(timing.runs) == 4
    assert common.Timing((1.0, 2.0, 4.0)).median == 2.0
    assert common.Timing((1.0, 2.0, 4.0)).spread == pytest.approx(1.5)  # (4 - 1) / 2
    with pytest.raises(ValueError, match="runs >= 1"):
        common.time_runs(lambda: None, runs=0)


def test_result_derives_ratio_and_fraction():
    row = common.result("train", "tokens/s", 120.0, peer=100.0, limit=200.0)
    assert row["ratio"] == pytest.approx(1.2) and row["fraction_of_limit"] == pytest.approx(0.6)
    latency = common.result("latency", "ms", 50.0, peer=100.0, higher_is_better=False)
    assert latency["ratio"] == pytest.approx(2.0)  # half the time: twice as good
    assert common.result("x", "u", 1.0)["ratio"] is None
    assert set(row) == set(common.FIELDS)


def test_contract_round_trip_and_errors(tmp_path, capsys):
    rows = [common.result("decode b1", "tokens/s", 10.0, peer=5.0, peer_name="HF", spread=0.1, note="n")]
    path = str(tmp_path / "sub" / "r.json")
    common.emit_results(path, rows)
    out = capsys.readouterr().out
    assert "decode b1" in out and "2.00x" in out and "10 ±5%" in out and "note (decode b1): n" in out
    assert common.load_results(path) == rows
    with pytest.raises(common.ResultsError, match="missing required field 'unit'"):
        common.validate_row({"metric": "m", "gptj": 1.0})
    with pytest.raises(common.ResultsError, match="unknown fields \\['speed'\\]"):
        common.validate_row({"metric": "m", "unit": "u", "gptj": 1.0, "speed": 2})
    with pytest.raises(common.ResultsError, match="'gptj' must be a finite number"):
        common.validate_row({"metric": "m", "unit": "u", "gptj": float("nan")})
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(common.ResultsError, match="expected a JSON list"):
        common.load_results(str(tmp_path / "bad.json"))


def test_peak_comes_from_the_environment(monkeypatch):
    monkeypatch.setenv(common.PEAK_ENV, "123e9")
    assert common.matmul_peak_flops() == 123e9


_GOOD = """
import argparse, os, sys
sys.path.insert(0, {root!r})
from benchmarks.common import add_common_args, emit_results, matmul_peak_flops, result
p = argparse.ArgumentParser(); add_common_args(p); a = p.parse_args()
assert a.quick
emit_results(a.json, [result("train tokens/s", "tokens/s", 30.0, peer=20.0, peer_name="HF",
                             limit=matmul_peak_flops() / 1e9)])
"""
_NO_JSON = "import argparse; argparse.ArgumentParser().parse_args()\n"
_FAILS = "raise SystemExit('boom')\n"


def test_run_all_merges_scripts_and_notes_the_rest(tmp_path):
    bench = tmp_path / "bench"
    bench.mkdir()
    (bench / "train_vs_hf.py").write_text(textwrap.dedent(_GOOD.format(root=ROOT)))
    (bench / "decode_vs_hf.py").write_text(_NO_JSON)
    (bench / "eval_vs_hf.py").write_text(_FAILS)
    out = tmp_path / "out"
    rc = run_all.main(["--quick", "--bench-dir", str(bench), "--out-dir", str(out), "--peak-flops", "1e11"])
    assert rc == 1  # eval_vs_hf failed
    report = json.loads((out / "results.json").read_text())
    status = {s["name"]: s["status"] for s in report["scripts"]}
    assert status == {"train_vs_hf": "ok", "lora_vs_peft": "missing", "decode_vs_hf": "no-contract",
                      "quantized_decode": "missing", "eval_vs_hf": "failed", "prepare_data": "missing",
                      "weights_memory": "missing", "serve_load": "missing", "dpo_vs_trl": "missing",
                      "multi_lora": "missing", "serve_load:prefix": "missing", "serve_load:adapters": "missing"}
    metrics = {r["metric"]: r for r in report["results"]}
    train = metrics["train tokens/s"]
    assert train["ratio"] == pytest.approx(1.5)
    assert train["fraction_of_limit"] == pytest.approx(30.0 / 100.0)  # the child saw run_all's peak
    assert any(m.startswith("fp32 matmul") for m in metrics)
    assert (out / "benchmarks.png").stat().st_size > 1000
    table = (out / "results.md").read_text()
    assert "| train tokens/s | 30 tokens/s | 20 (HF) | 1.50x | 100 | 30.0% |" in table
    assert "Left out: decode_vs_hf (no-contract" in table
    assert "boom" in next(s["note"] for s in report["scripts"] if s["name"] == "eval_vs_hf")


def test_run_all_rejects_unknown_scripts(capsys):
    with pytest.raises(SystemExit):
        run_all.main(["--only", "nope"])
    assert "unknown scripts ['nope']" in capsys.readouterr().err


def test_run_all_flags_a_matmul_that_does_not_tie_with_torch():
    assert run_all.matmul_tie_warning(100e9, 90e9) == ""  # within 20%: the peers are comparable
    assert run_all.matmul_tie_warning(100e9, None) == ""
    warning = run_all.matmul_tie_warning(213e9, 100e9)  # the run where torch had half its threads
    assert "2.13x torch's" in warning and "torch was starved" in warning and "threads" in warning
    slower = run_all.matmul_tie_warning(100e9, 130e9)  # XLA's GEMM behind torch's oneDNN (an AVX-512 Xeon)
    assert slower.startswith("jnp's fp32 matmul is 0.77x") and "XLA:CPU's GEMM is the slower side" in slower
    assert "starved" not in slower
    table = run_all.markdown([], "cmd", "today", 1e11, [], warning)
    assert "**Warning**: jnp's fp32 matmul is 2.13x" in table and common.cpu_description() in table


# Loaded at interpreter start-up (sitecustomize): the GPU machine has none of these packages.
_BLOCK_IMPORTS = """
import sys
BLOCKED = {"tensorflow", "seqio", "clu", "ml_collections", "torch", "transformers"}
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"{name} is not installed on the GPU machine")
sys.meta_path.insert(0, Block())
"""


def test_gpu_sh_dry_run_end_to_end(tmp_path):
    out = tmp_path / "gpu.json"
    (tmp_path / "sitecustomize.py").write_text(_BLOCK_IMPORTS)
    env = dict(os.environ, PYTHON=sys.executable, XLA_FLAGS=xla_flags(8),
               PYTHONPATH=os.pathsep.join([str(tmp_path), ROOT]))
    proc = subprocess.run(["bash", os.path.join(ROOT, "benchmarks", "gpu.sh"), "--dry-run", "--json", str(out)],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    rows = {r["metric"].split(":")[0]: r for r in common.load_results(str(out))}
    attention = {f"attention fwd+bwd {impl}" for impl in ("einsum", "dot_product", "blockwise")}
    assert set(rows) == {"bf16 matmul 256^3", "train MFU", "decode batch 1", "decode batch 4", "decode batch 1 int8",
                         "decode batch 1 int4", "serve load"} | attention
    for name in attention:  # every kernel ran, and (fp32 in a dry run) matched einsum
        assert rows[name]["gptj"] > 0 and float(rows[name]["note"].split("fp32 ")[1].split(" ")[0]) < 1e-5
    train = rows["train MFU"]
    assert train["gptj"] > 0 and 0 < train["fraction_of_limit"] < 1.5
    assert "remat dots_no_batch" in train["metric"] and "loss chunk 16" in train["metric"] and "HFU" in train["note"]
    assert all(rows[k]["gptj"] > 0 for k in ("decode batch 1", "decode batch 4", "serve load"))
    assert "0 errors" in rows["serve load"]["note"] and "TTFT p50" in rows["serve load"]["note"]
    for quantized in ("int8", "int4"):  # compared with the bf16 decode of the same shape
        row = rows[f"decode batch 1 {quantized}"]
        assert row["gptj"] > 0 and row["peer"] == rows["decode batch 1"]["gptj"], row


def test_train_vs_hf_names_the_cpu_and_its_vector_extensions():
    from benchmarks.train_vs_hf import cpu_description

    text = cpu_description()
    assert f"{os.cpu_count()} cores" in text and ("AVX-512" in text or "AVX2" in text or "no AVX2" in text)


def test_flop_limits_match_the_scaling_model():
    from gptj import scaling
    from gptj.model.transformer import GPTJConfig

    cfg = GPTJConfig(**common.BENCH_MODEL)
    model_flops = 3 * (2 * scaling.matmul_params(cfg) + 4 * 4 * 256 * 512)  # 6N + 12 L d T
    assert common.train_tokens_per_s_limit(cfg, 256, 1e12) == pytest.approx(1e12 / model_flops)
    assert common.forward_tokens_per_s_limit(cfg, 256, 1e12) == pytest.approx(3e12 / model_flops)


def test_train_and_lora_benchmarks_give_both_sides_the_same_weights():
    """train_vs_hf / lora_vs_peft start gptj and HF from one saved HF model: equal logits on the bench shape."""
    import numpy as np
    import torch

    from benchmarks import lora_vs_peft, train_vs_hf
    from gptj.model.transformer import GPTJ

    assert lora_vs_peft.build_models is train_vs_hf.build_models
    model, params, config = train_vs_hf.build_models(seq_len=16)
    tokens = np.random.RandomState(0).randint(0, config.vocab_size, (1, 16))
    with torch.no_grad():
        want = model.eval()(torch.as_tensor(tokens)).logits.numpy()
    got = np.asarray(GPTJ(config).apply({"params": params}, tokens))[..., :config.vocab_size]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
