"""benchmarks/serve_load.py's pieces: the seeded workload, the summary's arithmetic, finding the previous engine."""

import os
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # benchmarks/ is a folder of scripts at the repository root

from benchmarks import serve_load  # noqa: E402


def test_workload_is_seeded_poisson_long_tailed_and_fits_the_context():
    requests = serve_load.workload(rate=4.0, count=2000, seed=3, max_len=256)
    assert requests == serve_load.workload(rate=4.0, count=2000, seed=3, max_len=256)
    assert requests != serve_load.workload(rate=4.0, count=2000, seed=4, max_len=256)
    gaps = np.diff([0.0] + [r.at for r in requests])
    assert np.mean(gaps) == pytest.approx(0.25, rel=0.1)  # exponential gaps of mean 1 / rate
    assert np.std(gaps) == pytest.approx(0.25, rel=0.15)
    prompts = np.array([len(r.prompt) for r in requests])
    outputs = np.array([r.max_tokens for r in requests])
    assert prompts.min() >= 1 and prompts.max() <= 200 and np.median(prompts) == pytest.approx(32, rel=0.15)
    assert outputs.min() >= 1 and outputs.max() <= 128 and np.median(outputs) == pytest.approx(24, rel=0.15)
    assert np.mean(outputs) > np.median(outputs)  # a long tail
    assert (prompts + outputs <= 256).all()
    assert max(max(r.prompt) for r in requests) < serve_load.GPT2_VOCAB


def test_summary_percentiles_and_the_throughput_while_requests_arrive():
    requests = [serve_load.Request(at=float(i), prompt=[1], max_tokens=n) for i, n in enumerate((4, 40, 8))]
    outcomes = []
    for i, request in enumerate(requests):
        outcome = serve_load.Outcome(request, status=200, sent=10.0 + i)
        for step in range(request.max_tokens):  # first token 0.5 s after sending, then one per 0.1 s
            outcome.arrivals.append((outcome.sent + 0.5 + 0.1 * step, 1))
        outcome.first, outcome.last = outcome.arrivals[0][0], outcome.arrivals[-1][0]
        outcome.tokens = request.max_tokens
        outcomes.append(outcome)
    outcomes.append(serve_load.Outcome(serve_load.Request(3.0, [1], 2), status=429, sent=13.0))
    summary = serve_load.summarize(outcomes, seconds=8.0, offered_span=3.0)
    assert summary["ok"] == 3 and summary["errors"] == 1 and summary["error_sample"] == "status 429"
    assert summary["ttft_p50"] == pytest.approx(0.5) and summary["tpot_p99"] == pytest.approx(0.1)
    assert summary["short_ttft_p99"] == pytest.approx(0.5)  # the 4- and 8-token requests
    assert summary["tokens_per_s"] == pytest.approx(52 / 8.0)
    # Requests arrived from t=10 to t=13: tokens streamed in that window only.
    in_window = sum(1 for o in outcomes for t, _ in o.arrivals if 10.0 <= t <= 13.0)
    assert summary["window_tokens_per_s"] == pytest.approx(in_window / 3.0)
    assert not serve_load.sustained(summary)


def test_the_previous_engine_is_the_tree_before_its_removal(tmp_path):
    if not os.path.isdir(os.path.join(ROOT, ".git")) and not os.path.isfile(os.path.join(ROOT, ".git")):
        pytest.skip("not a git checkout")
    commit = serve_load.previous_engine_commit(ROOT)
    tree = serve_load.unpack(ROOT, commit, str(tmp_path))
    assert os.path.exists(os.path.join(tree, serve_load.PREVIOUS_ENGINE_FILE))
    assert os.path.exists(os.path.join(tree, "main.py"))
    assert not os.path.exists(os.path.join(ROOT, serve_load.PREVIOUS_ENGINE_FILE))  # gone from this tree
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    assert commit != head


def test_rows_compare_throughput_over_the_run_and_short_request_latency_where_the_previous_engine_held():
    """The capacity row is output tokens over the whole run (a previous engine whose first token came after the
    last arrival streamed 0 tokens 'while arriving', which once made its ratio undefined)."""
    def summary(tokens_per_s, window, short_p99, sustained):
        return {"tokens_per_s": tokens_per_s, "window_tokens_per_s": window, "ttft_p50": 1.0,
                "short_ttft_p99": short_p99, "tpot_p99": 0.1, "errors": 0,
                "requests_per_s": 1.0 if sustained else 0.1, "offered_per_s": 1.0}

    results = {"gptj": {1.0: summary(30.0, 30.0, 0.2, True), 8.0: summary(90.0, 89.0, 2.0, False)},
               "previous": {1.0: summary(20.0, 25.0, 0.9, True), 8.0: summary(30.0, 0.0, 20.0, False)}}
    capacity, latency = serve_load.rows_for(results, [1.0, 8.0], "a CPU")
    assert capacity["gptj"] == 90.0 and capacity["peer"] == 30.0 and capacity["ratio"] == pytest.approx(3.0)
    assert "Poisson 1 req/s" in latency["metric"]  # the highest rate the previous engine sustained
    assert latency["gptj"] == pytest.approx(200.0) and latency["peer"] == pytest.approx(900.0)


def test_the_adapters_and_prefix_workloads_route_and_share_as_described():
    requests = serve_load.with_models(serve_load.workload(rate=2.0, count=500, seed=0, max_len=256),
                                      ["", "a0", "a1"], seed=5)
    assert {r.model for r in requests} == {"", "a0", "a1"}
    assert abs(sum(r.model == "a0" for r in requests) / 500 - 1 / 3) < 0.07  # drawn uniformly
    # One server of every model gets the model by name; a server per model gets none (it serves its own).
    assert serve_load._route("http://one", requests[0]) == ("http://one", requests[0].model)
    assert serve_load._route({"": "http://b", "a0": "http://0", "a1": "http://1"}, requests[0])[1] == ""
    shared = serve_load.shared_prefix_requests(20, 1500, seed=2)
    assert len(shared) == 20 and all(r.prompt[:1500] == shared[0].prompt[:1500] for r in shared)
    assert all(10 <= len(r.prompt) - 1500 <= 30 for r in shared)
    assert len({tuple(r.prompt[1500:]) for r in shared}) == 20  # each its own question
    # Five merged copies hold the weights five times; the adapter pool is small beside one copy.
    one, five = serve_load.deployment_bytes(10, 1, 4, 32), serve_load.deployment_bytes(10, 5)
    weights = serve_load.deployment_bytes(0, 1)
    assert five - one > 3.9 * weights and one - serve_load.deployment_bytes(10, 1) < 0.1 * weights


def test_run_all_runs_a_workload_of_a_script(tmp_path):
    from benchmarks import run_all

    (tmp_path / "serve_load.py").write_text("import sys; print(sys.argv[1:])\n")
    record = run_all.run_script("serve_load:prefix", str(tmp_path), str(tmp_path / "out"), True, 60, dict(os.environ))
    assert record["status"] == "no-output"  # it wrote no --json; the log shows what it was given
    log = (tmp_path / "out" / "logs" / "serve_load-prefix.log").read_text()
    assert "'--workload=prefix', '--quick', '--json'" in log
