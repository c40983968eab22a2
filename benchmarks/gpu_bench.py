"""The single-GPU check (run through benchmarks/gpu.sh): training MFU, bf16 / int8 / int4 decode and serving load.

(a) Training: a GPT-J-1.3B-shaped model (`gptj.scaling.MODEL_SHAPES["gptj_1.3b"]`:
    24 layers, d_model 2048, 16 heads of 128, rotary 32, vocab 50257 padded to
    50304, ~1.41B parameters), seq 2048, batch 8, bf16 compute with fp32 master
    weights and AdamW, remat `dots_no_batch` (weight matmuls saved, attention
    recomputed), cuDNN flash attention (`--attention`, default `cudnn`) and
    the fused, chunked head + cross-entropy (`--loss-chunk-tokens`, default
    1024 as in training; 0 for the full-logits loss).
    MFU = tokens/s x model FLOPs per token (6 N + 12 L d T, PaLM convention)
    / peak dense bf16 FLOP/s (989 TFLOP/s on H100 SXM and H200).
(a') Attention alone: forward + backward of one causal attention call of the
    1.3B shape (batch 8 x 2048, 16 heads of 128, bf16) with each kernel of
    gptj.model.attention (einsum, dot_product, blockwise, cudnn), MFU from the
    causal attention FLOPs (3.5 x 2 B H T^2 D: forward and the recomputing
    backward, half the square), and each kernel's error against einsum in fp32.
(b) Decode: a GPT-J-6B-shaped model in bf16 (random weights made on the
    device), greedy, prompt 128, through `gptj.inference.sampler.Sampler`, at batch 1
    and 64. Decode tokens/s comes from the difference of two generations
    (128 and 64 new tokens: same compiled programs, so prefill cancels). The
    limit is reading every weight and the KV cache (at the mean context
    length) once per step at the HBM bandwidth (3.35 TB/s H100 SXM, 4.8 TB/s
    H200), or the FLOPs at peak if that is slower.
(c) Quantized decode: the same GPT-J-6B shape with int8 (per channel) and
    int4 (groups of 128) weights and bf16 scales (`gptj.model.quantized`; every
    matrix, embedding included), batch 1, against the same bandwidth limit
    with the quantized bytes (goal: >= 75% of it, i.e. int8 >= 1.6x the bf16
    tokens/s of (b), which the row's ratio gives when (b) ran).
(d) Serving load: the same 6B-shaped model in the continuous-batching engine
    (`gptj.inference.engine.Engine`, 32 slots, chunked prefill), fed open-loop Poisson
    arrivals with lognormal prompt / output lengths (benchmarks/serve_load.py's
    workload, in process: the GPU machine has no HTTP stack) at a few rates:
    output tokens/s over the run (at a rate it cannot keep up with, its
    capacity), time to first token and time per output token p50/p99.

Also measured, for context: a large bf16 matmul's FLOP/s and a copy's HBM
bandwidth, each against the datasheet figure.

Only jax, flax, optax, the gptj model/partitioning/sampling/engine/scaling
modules and serve_load's workload functions are imported (the GPU machine has
no tensorflow, seqio, clu, ml_collections, torch or HTTP server).
`--dry-run` shrinks every shape so the whole script runs on a CPU in seconds;
there the limit is the CPU's measured fp32 matmul peak and no bandwidth limit.
Results go out as the benchmarks/common.py JSON contract, written after each
part so a time-out keeps what finished.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from benchmarks.common import (emit_results, matmul_peak_flops, measure_matmul_flops, result, time_runs,  # noqa: E402
                               write_results)
from gptj import scaling  # noqa: E402
from gptj.core import losses
from gptj.core.partitioning import Partitioner, make_mesh  # noqa: E402
from gptj.hardware import ACCELERATORS  # noqa: E402
from gptj.inference.sampler import Sampler  # noqa: E402
from gptj.model import quantized as quantize
from gptj.model.attention import causal_attention, einsum_attention  # noqa: E402
from gptj.model.transformer import GPTJ, GPTJConfig, output_logits  # noqa: E402

# Shapes for --dry-run: the same code path, small enough for a CPU.
DRY_TRAIN = GPTJConfig(vocab_size=500, vocab_pad_multiple=128, num_layers=2, d_model=64, num_heads=4, rotary_dim=8,
                       max_len=64, dtype="bfloat16", remat_policy="dots_no_batch")
DRY_DECODE = GPTJConfig(vocab_size=500, num_layers=2, d_model=64, num_heads=4, rotary_dim=8, max_len=128,
                        dtype="bfloat16", param_dtype="bfloat16")


@dataclasses.dataclass(frozen=True)
class Limits:
    """What the device can do at best: dense bf16 FLOP/s and HBM bytes/s (None when unknown)."""

    name: str
    peak_flops: float
    hbm_bandwidth: float | None
    nominal: bool  # datasheet figures (True) or measured on this machine (dry run)


def device_limits(dry_run: bool) -> Limits:
    """Datasheet limits from the device kind (H100 SXM / H100 PCIe / H200); the CPU's measured peak in a dry run."""
    device = jax.devices()[0]
    kind = getattr(device, "device_kind", device.platform)
    if dry_run or device.platform == "cpu":
        return Limits(f"{kind} (measured fp32 matmul peak)", matmul_peak_flops(n=512, runs=5), None, False)
    upper = kind.upper()
    name = ("h200" if "H200" in upper else "h100-pcie" if "H100" in upper and "PCIE" in upper
            else "h100" if "H100" in upper else "a100" if "A100" in upper else None)
    if name is None:
        print(f"warning: unknown device kind {kind!r}; using H100 SXM limits", file=sys.stderr)
        name, kind = "h100", f"{kind} (assumed H100 SXM limits)"
    hw = ACCELERATORS[name]
    return Limits(kind, hw.peak_flops, hw.hbm_bandwidth, True)


def _xla_flops(compiled) -> float | None:
    """FLOPs XLA counts for a compiled program (None where the backend does not say)."""
    try:
        analysis = compiled.cost_analysis()
        if isinstance(analysis, (list, tuple)):
            analysis = analysis[0]
        return float(analysis.get("flops")) if analysis and analysis.get("flops") else None
    except Exception:  # noqa: BLE001 - cost analysis is optional context
        return None


def _peak_memory_gib() -> float | None:
    stats = jax.devices()[0].memory_stats() or {}
    peak = stats.get("peak_bytes_in_use")
    return None if peak is None else peak / 2**30


def _si(x: float) -> str:
    """A count with an SI prefix: 1.41G, 3.2M, 850k."""
    for scale, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= scale:
            return f"{x / scale:.3g}{prefix}"
    return f"{x:.3g}"


def _is_oom(error: Exception) -> bool:
    return "RESOURCE_EXHAUSTED" in str(error) or "out of memory" in str(error).lower()


# -- (a) training ----------------------------------------------------------------------------

def bench_hardware(limits: Limits, dry_run: bool) -> list[dict]:
    """A big bf16 matmul's FLOP/s and a copy's HBM bandwidth, against the datasheet."""
    rows = []
    n = 256 if dry_run else 8192
    timing = measure_matmul_flops(n, "bfloat16", runs=5 if dry_run else 10)
    rows.append(result(f"bf16 matmul {n}^3", "TFLOP/s", 2 * n**3 / timing.median / 1e12, spread=timing.spread,
                       limit=limits.peak_flops / 1e12 if limits.nominal else None,
                       note="the best a single matmul reaches here: context for the MFU below"))
    if limits.hbm_bandwidth:
        x = jnp.ones((1 << 30,), jnp.float32)  # 4 GiB, read once and written once per call
        copy = jax.jit(lambda a: a + 1.0)
        t = time_runs(lambda: copy(x).block_until_ready(), runs=10, warmup=2)
        rows.append(result("HBM copy a+1 (4 GiB in, 4 GiB out)", "GB/s", 2 * x.nbytes / t.median / 1e9,
                           spread=t.spread, limit=limits.hbm_bandwidth / 1e9))
        del x
    return rows


def bench_train(cfg: GPTJConfig, batch: int, seq_len: int, steps: int, limits: Limits,
                loss_chunk_tokens: int = 1024) -> dict:
    """Times AdamW training steps on one device; returns the MFU row."""
    partitioner = Partitioner(make_mesh(1, 1, devices=jax.devices()[:1]), "megatron")
    model = GPTJ(cfg, head_inputs=bool(loss_chunk_tokens))
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-4, b1=0.9, b2=0.95, weight_decay=0.1))

    def init(rng):
        params = nn.meta.unbox(model.init(rng, jnp.zeros((1, 8), jnp.int32))["params"])
        return {"params": params, "opt_state": tx.init(params)}

    def logits_fn(hidden, kernel, bias, first_id):
        return output_logits(hidden, kernel, bias, cfg, first_id)

    def train_step(state, tokens):
        def loss_fn(params):
            out = model.apply({"params": params}, tokens[:, :-1])
            batch_ = {"targets": tokens[:, 1:]}
            if loss_chunk_tokens:  # as gptj.recipe.head_loss_fns builds it, without its config machinery
                sums = losses.fused_next_token_loss(out.hidden, out.kernel, out.bias, batch_, logits_fn,
                                                    chunk_tokens=loss_chunk_tokens, accuracy=False)
            else:
                sums = losses.next_token_loss(out, batch_, accuracy=False)
            return sums["loss_sum"] / sums["weight"]

        loss, grads = jax.value_and_grad(loss_fn)(state["params"])
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        return {"params": optax.apply_updates(state["params"], updates), "opt_state": opt_state}, loss

    state = partitioner.jit(init)(jax.random.PRNGKey(0))
    tokens = jax.random.randint(jax.random.PRNGKey(1), (batch, seq_len + 1), 0, cfg.vocab_size, jnp.int32)
    start = time.perf_counter()
    compiled = partitioner.jit(train_step, donate_argnums=(0,)).lower(state, tokens).compile()
    compile_s = time.perf_counter() - start
    xla_flops = _xla_flops(compiled)

    holder = {"state": state}

    def one_step():
        holder["state"], loss = compiled(holder["state"], tokens)
        loss.block_until_ready()

    timing = time_runs(one_step, runs=steps, warmup=2)
    loss = float(compiled(holder["state"], tokens)[1])
    holder.clear()  # frees the state before the next part

    step_tokens = batch * seq_len
    model_flops, hw_flops = scaling.train_flops_per_token(cfg, seq_len)
    tokens_per_s = step_tokens / timing.median
    limit = limits.peak_flops / model_flops  # tokens/s at 100% MFU
    hfu = tokens_per_s * hw_flops / limits.peak_flops
    six_n = tokens_per_s * 6 * scaling.matmul_params(cfg) / limits.peak_flops
    notes = [f"{_si(scaling.total_params(cfg))} params, step {timing.median * 1e3:.1f} ms, compile "
             f"{compile_s:.0f} s, loss {loss:.2f}",
             f"HFU (remat recompute counted) {100 * hfu:.1f}%, 6N-only MFU {100 * six_n:.1f}%"]
    if xla_flops:
        notes.append(f"XLA counts {_si(xla_flops / step_tokens)} FLOP/token vs analytic hardware {_si(hw_flops)}")
    peak = _peak_memory_gib()
    if peak is not None:
        notes.append(f"peak device memory {peak:.1f} GiB")
    return result(f"train MFU: {cfg.num_layers}L d{cfg.d_model} seq {seq_len} batch {batch}, {cfg.dtype}, "
                  f"remat {cfg.remat_policy}, attention {cfg.attention_impl}, loss chunk {loss_chunk_tokens}",
                  "tokens/s", tokens_per_s,
                  limit=limit, spread=timing.spread, note="; ".join(notes))


def run_train(args, limits: Limits) -> dict:
    """(a), retrying once at half the batch if the device runs out of memory."""
    cfg = DRY_TRAIN if args.dry_run else scaling.MODEL_SHAPES["gptj_1.3b"]
    # cuDNN's kernel exists only on NVIDIA GPUs; a dry run on a CPU takes the backend's default.
    attention = args.attention or ("auto" if args.dry_run else "cudnn")
    cfg = cfg.replace(remat_policy=args.remat or cfg.remat_policy, attention_impl=attention)
    seq_len = 32 if args.dry_run else 2048
    batch = 2 if args.dry_run else args.train_batch
    steps = 3 if args.dry_run else args.train_steps
    chunk = 16 if args.dry_run and args.loss_chunk_tokens else args.loss_chunk_tokens
    try:
        return bench_train(cfg, batch, seq_len, steps, limits, chunk)
    except Exception as e:  # noqa: BLE001 - one retry on OOM, otherwise report
        if not _is_oom(e) or batch == 1:
            raise
        print(f"train batch {batch} ran out of memory; retrying at {batch // 2}", file=sys.stderr)
        return bench_train(cfg, batch // 2, seq_len, steps, limits, chunk)


def bench_attention(limits: Limits, dry_run: bool) -> list[dict]:
    """(a'): forward + backward of one attention call per kernel, MFU against the bf16 peak."""
    batch, length, heads, head_dim = (2, 64, 4, 16) if dry_run else (8, 2048, 16, 128)
    dtype = jnp.float32 if dry_run else jnp.bfloat16
    keys = jax.random.split(jax.random.PRNGKey(0), 4)
    q, k, v, d_out = (jax.random.normal(key, (batch, length, heads, head_dim), jnp.float32) for key in keys)
    scale = head_dim ** -0.5

    def forward_backward(impl: str, dtype):
        def run(q, k, v, d_out):
            def attend(q, k, v):
                if impl == "reference":
                    return einsum_attention(q, k, v, scale=scale, dtype=dtype)
                return causal_attention(q, k, v, impl=impl, scale=scale, dtype=dtype)
            out, pull = jax.vjp(attend, q, k, v)
            return out, pull(d_out)
        return jax.jit(run)

    reference = forward_backward("reference", jnp.float32)(q, k, v, d_out)
    inputs = [x.astype(dtype) for x in (q, k, v, d_out)]
    flops = 3.5 * 2.0 * batch * heads * length * length * head_dim  # causal: half of 4 B H T^2 D forward
    impls = ["einsum", "dot_product", "blockwise"] + ([] if jax.devices()[0].platform == "cpu" else ["cudnn"])
    rows = []
    for impl in impls:
        try:
            fn = forward_backward(impl, dtype)
            got = fn(*inputs)
            timing = time_runs(lambda: jax.block_until_ready(fn(*inputs)), runs=3 if dry_run else 10, warmup=1)
        except Exception as e:  # noqa: BLE001 - a kernel this device lacks is reported, not fatal
            rows.append(result(f"attention fwd+bwd {impl} (failed)", "-", 0.0, note=f"{type(e).__name__}: "
                               f"{str(e)[:200]}"))
            continue
        error = max(float(jnp.max(jnp.abs(a.astype(jnp.float32) - b)) / jnp.max(jnp.abs(b)))
                    for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(reference)))
        rows.append(result(f"attention fwd+bwd {impl}: batch {batch} x {length}, {heads} heads x {head_dim}, "
                           f"{jnp.dtype(dtype).name}", "TFLOP/s", flops / timing.median / 1e12,
                           limit=limits.peak_flops / 1e12, spread=timing.spread,
                           note=f"{timing.median * 1e3:.2f} ms; max error vs einsum in fp32 {error:.1e} "
                                f"(relative to the largest value)"))
    return rows


# -- (b) decode ----------------------------------------------------------------------------

def bench_decode(cfg: GPTJConfig, batches: list[int], prompt_len: int, new_tokens: int, runs: int,
                 limits: Limits, peer: dict | None = None) -> list[dict]:
    """Greedy decode tokens/s per batch size with the Sampler, against the bandwidth limit.

    `cfg` may be quantized (its weights are then zeros and unit scales: the
    same bytes to read). `peer`: {batch: (tokens/s, name)} to compare with.
    """
    model = GPTJ(cfg)
    params = jax.jit(lambda rng: nn.meta.unbox(model.init(rng, jnp.zeros((1, 8), jnp.int32))["params"]))(
        jax.random.PRNGKey(0))
    sampler = Sampler(cfg, params, eos_id=None)
    del params
    short = new_tokens // 2 + 1  # same generation bucket as new_tokens, so the same compiled programs
    rows = []
    rng = np.random.default_rng(0)
    for batch in batches:
        prompts = rng.integers(0, cfg.vocab_size, (batch, prompt_len)).tolist()
        generate = lambda n: sampler.generate(prompts, max_new_tokens=n, temperature=0.0)  # noqa: E731
        generate(new_tokens)  # compiles prefill and the decode loop
        # The fastest run of each is the least disturbed by anything else on the machine; a tiny model's
        # difference can still drown in a busy machine's noise, so it is measured again before giving up.
        for _ in range(3):
            long_t = time_runs(lambda: generate(new_tokens), runs=runs, warmup=0)
            short_t = time_runs(lambda: generate(short), runs=runs, warmup=1)
            decode_s = min(long_t.runs) - min(short_t.runs)
            if decode_s > 0:
                break
        else:
            raise RuntimeError(f"batch {batch}: {new_tokens} tokens took no longer than {short} in 3 measurements; "
                               "timing too noisy")
        tokens_per_s = batch * (new_tokens - short) / decode_s
        mean_context = prompt_len + (new_tokens + short) / 2
        limit = None
        weights = quantize.describe(cfg) or "bf16"
        weight_bytes = _matmul_weight_bytes(cfg)
        if limits.hbm_bandwidth:
            hw = dataclasses.replace(ACCELERATORS["h100"], peak_flops=limits.peak_flops,
                                     hbm_bandwidth=limits.hbm_bandwidth)
            limit = scaling.decode_limit(cfg, batch, int(mean_context), hw, weight_bytes=weight_bytes)
        per_step = scaling.decode_bytes_per_step(cfg, batch, int(mean_context), weight_bytes=weight_bytes)
        note = (f"{_si(scaling.total_params(cfg))} params {weights}, prompt {prompt_len}, {_si(per_step)}B "
                f"read per step; step {decode_s / (new_tokens - short) * 1e3:.2f} ms; "
                f"prefill+{short} tokens {short_t.median * 1e3:.0f} ms")
        resident = (jax.devices()[0].memory_stats() or {}).get("bytes_in_use")
        if resident is not None:
            note += f"; {resident / 2**30:.1f} GiB in use (weights, cache)"
        compared = (peer or {}).get(batch)
        rows.append(result(f"decode batch {batch}{'' if weights == 'bf16' else ' ' + weights.split()[0]}: "
                           f"{cfg.num_layers}L d{cfg.d_model} {weights} greedy", "tokens/s", tokens_per_s, limit=limit,
                           spread=max(long_t.spread, short_t.spread), note=note,
                           peer=None if compared is None else compared[0],
                           peer_name="" if compared is None else compared[1]))
    return rows


def run_decode(args, limits: Limits) -> list[dict]:
    cfg = DRY_DECODE if args.dry_run else scaling.MODEL_SHAPES["gptj_6b"].replace(
        param_dtype="bfloat16", dtype="bfloat16", remat_policy="none")
    batches = [1, 4] if args.dry_run else args.decode_batches
    prompt_len = 8 if args.dry_run else args.prompt_len
    new_tokens = 64 if args.dry_run else args.new_tokens
    return bench_decode(cfg, batches, prompt_len, new_tokens, 3, limits)


def _matmul_weight_bytes(cfg: GPTJConfig) -> float:
    """Bytes read per matmul weight: 2 in bf16; int8 or int4 values plus their share of the bf16 scales."""
    if not cfg.quant_bits:
        return 2.0
    scales = 2.0 / cfg.quant_group_size if cfg.quant_group_size else 0.0  # per channel: negligible
    return cfg.quant_bits / 8 + scales


def run_quant_decode(args, limits: Limits, bf16_rows: list[dict]) -> list[dict]:
    """(c): batch-1 decode of the 6B shape in int8 and int4, compared with (b)'s bf16 batch 1 when it ran."""
    base = DRY_DECODE if args.dry_run else scaling.MODEL_SHAPES["gptj_6b"].replace(
        param_dtype="bfloat16", dtype="bfloat16", remat_policy="none")
    prompt_len = 8 if args.dry_run else args.prompt_len
    new_tokens = 64 if args.dry_run else args.new_tokens
    bf16 = {int(r["metric"].split(":")[0].split()[-1]): (r["gptj"], "bf16 (decode part)") for r in bf16_rows
            if r["metric"].startswith("decode batch") and r["metric"].split(":")[0].split()[-1].isdigit()}
    rows = []
    for bits in (8, 4):
        cfg = base.replace(quant_bits=bits, quant_group_size=quantize.default_group_size(base, bits),
                           quant_targets=quantize.TARGETS)
        rows += bench_decode(cfg, [1], prompt_len, new_tokens, 3, limits, peer=bf16)
    return rows


# -- (d) serving load ------------------------------------------------------------------------

def run_load(args, limits: Limits) -> list[dict]:
    """Output tokens/s and latency percentiles of the engine under open-loop Poisson load, per rate."""
    from benchmarks.serve_load import run_engine_load, workload
    from gptj.inference.engine import Engine

    cfg = DRY_DECODE if args.dry_run else scaling.MODEL_SHAPES["gptj_6b"].replace(
        param_dtype="bfloat16", dtype="bfloat16", remat_policy="none")
    slots, chunk = (4, 32) if args.dry_run else (args.load_slots, 512)
    rates = [8.0] if args.dry_run else args.load_rates
    count = 8 if args.dry_run else args.load_requests
    lengths = (dict(prompt_median=8, prompt_max=40, output_median=8, output_max=32) if args.dry_run else
               dict(prompt_median=256, prompt_max=1536, output_median=128, output_max=512))
    model = GPTJ(cfg)
    params = jax.jit(lambda rng: nn.meta.unbox(model.init(rng, jnp.zeros((1, 8), jnp.int32))["params"]))(
        jax.random.PRNGKey(0))
    engine = Engine(Sampler(cfg, params, eos_id=None).runner, slots=slots, prefill_chunk=chunk, decode_steps=4)
    del params
    vocab = min(cfg.vocab_size, 50257)
    engine.start()
    rows = []
    try:
        run_engine_load(engine, workload(max(rates), max(4, count // 2), 1000, cfg.max_len, vocab=vocab, **lengths))
        for i, rate in enumerate(rates):
            before = engine.runner.stats["compiled_while_serving"]
            s = run_engine_load(engine, workload(rate, count, i, cfg.max_len, vocab=vocab, **lengths))
            ms = lambda v: "-" if v is None else f"{1e3 * v:.0f}"  # noqa: E731
            note = (f"{count} requests, {s['errors']} errors; TTFT p50/p99 {ms(s['ttft_p50'])}/{ms(s['ttft_p99'])} ms, "
                    f"TPOT p50/p99 {ms(s['tpot_p50'])}/{ms(s['tpot_p99'])} ms, achieved {s['requests_per_s']:.2f} "
                    f"of {s['offered_per_s']:.2f} req/s; programs compiled during the run: "
                    f"{engine.runner.stats['compiled_while_serving'] - before}")
            rows.append(result(f"serve load: {cfg.num_layers}L d{cfg.d_model} bf16, {engine.slots} slots, Poisson "
                               f"{rate:g} req/s", "tokens/s", s["tokens_per_s"],
                               note=f"output tokens over the run; while requests arrived "
                                    f"{s['window_tokens_per_s']:.0f} tokens/s; " + note))
    finally:
        engine.stop()
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="shrunk shapes: runs end to end on a CPU")
    parser.add_argument("--json", default="", help="results file (benchmarks/common.py contract)")
    parser.add_argument("--parts", default="hardware,attention,train,decode,quant,load",
                        help="comma list of hardware,attention,train,decode,quant,load")
    parser.add_argument("--train-batch", type=int, default=8)
    parser.add_argument("--train-steps", type=int, default=8, help="timed steps (after 2 warm-up steps)")
    parser.add_argument("--remat", default="", help="remat policy (default: the shape's, dots_no_batch)")
    parser.add_argument("--attention", default="",
                        help="the train part's attention_impl (default cudnn; auto in a dry run)")
    parser.add_argument("--loss-chunk-tokens", type=int, default=1024,
                        help="tokens per chunk of the fused head + loss in the train part (0: full logits)")
    parser.add_argument("--decode-batches", type=lambda s: [int(x) for x in s.split(",")], default=[1, 64])
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--load-rates", type=lambda s: [float(x) for x in s.split(",")], default=[4.0, 16.0, 64.0],
                        help="offered requests/s of the serving load test")
    parser.add_argument("--load-requests", type=int, default=64, help="requests per rate")
    parser.add_argument("--load-slots", type=int, default=32, help="engine slots of the serving load test")
    args = parser.parse_args(argv)
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = sorted(set(parts) - {"hardware", "attention", "train", "decode", "quant", "load"})
    if unknown:
        parser.error(f"unknown --parts {unknown}; choose from hardware, attention, train, decode, quant, load")

    limits = device_limits(args.dry_run)
    print(f"device: {limits.name}; jax {jax.__version__}; peak {limits.peak_flops / 1e12:.1f} TFLOP/s"
          + (f", HBM {limits.hbm_bandwidth / 1e12:.2f} TB/s" if limits.hbm_bandwidth else ""), flush=True)
    rows: list[dict] = []
    failed = False
    runners = {"hardware": lambda: bench_hardware(limits, args.dry_run),
               "attention": lambda: bench_attention(limits, args.dry_run),
               "train": lambda: [run_train(args, limits)], "decode": lambda: run_decode(args, limits),
               "quant": lambda: run_quant_decode(args, limits, rows),
               "load": lambda: run_load(args, limits)}
    for part in parts:
        start = time.perf_counter()
        try:
            rows.extend(runners[part]())
        except Exception as e:  # noqa: BLE001 - report and go on to the next part
            failed = True
            traceback.print_exc()
            rows.append(result(f"{part} (failed)", "-", 0.0, note=f"{type(e).__name__}: {str(e)[:300]}"))
        print(f"[{part} done in {time.perf_counter() - start:.0f} s]", flush=True)
        if args.json:
            write_results(args.json, rows)  # keep what finished if time runs out
    emit_results(args.json, rows)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
