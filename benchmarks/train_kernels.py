"""The measurements behind two training defaults: the attention kernel per backend and the fused loss's chunks.

    python benchmarks/train_kernels.py [--quick] [--json PATH] [--parts attention,loss] [--trials N]

attention: forward + backward of one attention call (the CPU bench model's
8 heads x 64; B x T = 2048 tokens: batch 8 x 256, 2 x 1024, 1 x 2048) for
each kernel of gptj.model.attention (einsum, dot_product, blockwise at block
sizes 64/128/256), checked against einsum (fp32, max relative error).
loss: forward + backward of the output head and cross-entropy at vocabulary
50400, d_model 512, batch 8 x 256 (and 8 x 1024 unless --quick): the
full-logits path (train.loss_chunk_tokens=0) against the fused path at
several token and vocabulary chunk sizes.

Every variant is compiled first; then trials alternate between variants, so
load from other work on a shared machine falls on all alike. Each row gives
the median wall time, with `peer` the reference (einsum, or the full-logits
loss) from the same trials; the note adds the median CPU time of the process
(less disturbed by other work than wall time when the cores are shared) and
the fraction of the fp32 matmul peak the variant's matmul FLOPs reach.
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks.common import add_common_args, emit_results, matmul_peak_flops, result  # noqa: E402

HEADS, HEAD_DIM = 8, 64
VOCAB, D_MODEL = 50400, 512
BLOCKS = (64, 128, 256)
# (tokens per chunk, vocabulary entries per chunk: 0 = all, -1 = auto) of the fused loss.
LOSS_CHUNKS = ((2048, 0), (2048, -1), (1024, -1), (4096, -1), (2048, 1200), (2048, 2400), (1024, 1200))


def alternate(fns: dict, trials: int) -> dict[str, tuple[list[float], list[float]]]:
    """{name: (wall seconds, process CPU seconds)} per trial; every fn runs once per trial, in turn."""
    times = {name: ([], []) for name in fns}
    for _ in range(trials):
        for name, fn in fns.items():
            cpu, wall = time.process_time(), time.perf_counter()
            fn()
            times[name][0].append(time.perf_counter() - wall)
            times[name][1].append(time.process_time() - cpu)
    return times


def _max_relative_error(got, want) -> float:
    import jax
    import numpy as np

    errors = [float(np.max(np.abs(np.asarray(a) - np.asarray(b))) / max(float(np.max(np.abs(np.asarray(b)))), 1e-30))
              for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want))]
    return max(errors)


def _rows(times: dict, reference: str, flops: dict, peak: float, label: str, unit_scale: float = 1e3,
          notes: dict | None = None) -> list[dict]:
    rows = []
    ref_wall = statistics.median(times[reference][0])
    for name, (wall, cpu) in times.items():
        median = statistics.median(wall)
        note = (f"CPU {statistics.median(cpu) * unit_scale:.0f} ms vs {reference} "
                f"{statistics.median(times[reference][1]) * unit_scale:.0f} ms; matmul FLOPs at "
                f"{100 * flops[name] / median / peak:.0f}% of the {peak / 1e9:.0f} GFLOP/s fp32 peak")
        if notes and notes.get(name):
            note += "; " + notes[name]
        rows.append(result(f"{label}: {name}", "ms", median * unit_scale, peer=ref_wall * unit_scale,
                           peer_name=reference, higher_is_better=False,
                           spread=(max(wall) - min(wall)) / median, note=note))
    return rows


def bench_attention(lengths, trials: int, peak: float) -> list[dict]:
    """Forward + backward of each attention kernel at each length, 2048 tokens per call."""
    import jax
    import jax.numpy as jnp

    from gptj.model.attention import blockwise_attention, einsum_attention

    rows = []
    for length in lengths:
        batch = max(1, 2048 // length)
        keys = jax.random.split(jax.random.PRNGKey(0), 4)
        q, k, v, d_out = (jax.random.normal(key, (batch, length, HEADS, HEAD_DIM), jnp.float32) for key in keys)
        scale = HEAD_DIM ** -0.5
        kernels = {
            "einsum": lambda q, k, v: einsum_attention(q, k, v, scale=scale, dtype=jnp.float32),
            "dot_product": lambda q, k, v: jax.nn.dot_product_attention(q, k, v, scale=scale, is_causal=True),
        }
        for block in BLOCKS:
            if block < length:
                kernels[f"blockwise/{block}"] = functools.partial(
                    lambda q, k, v, block: blockwise_attention(q, k, v, scale=scale, block_size=block), block=block)

        def forward_backward(kernel):
            def run(q, k, v, d_out):
                out, pull = jax.vjp(kernel, q, k, v)
                return out, pull(d_out)
            return jax.jit(run)

        compiled = {name: forward_backward(fn) for name, fn in kernels.items()}
        outputs = {name: jax.block_until_ready(fn(q, k, v, d_out)) for name, fn in compiled.items()}
        errors = {name: _max_relative_error(out, outputs["einsum"]) for name, out in outputs.items()}
        times = alternate({name: functools.partial(lambda fn: jax.block_until_ready(fn(q, k, v, d_out)), fn)
                           for name, fn in compiled.items()}, trials)
        # fwd: scores + weighted sum (4 B H T^2 D); bwd: 2x that (recomputing kernels: 2.5x). Causal kernels
        # that skip blocks do about half (T/block blocks: (n + 1) / 2n of the square).
        full = 4.0 * batch * HEADS * length * length * HEAD_DIM
        flops = {}
        for name in compiled:
            if name.startswith("blockwise"):
                n = -(-length // int(name.split("/")[1]))
                flops[name] = full * (n + 1) / (2 * n) * 3.5
            else:
                flops[name] = full * 3
        notes = {name: f"max relative error vs einsum {errors[name]:.1e}" for name in compiled}
        rows += _rows(times, "einsum", flops, peak, f"attention fwd+bwd, batch {batch} x {length}", notes=notes)
    return rows


def bench_loss(lengths, trials: int, peak: float) -> list[dict]:
    """Forward + backward of the output head + cross-entropy: full logits against fused chunk settings."""
    import jax
    import jax.numpy as jnp

    from gptj import recipe
    from gptj.core import losses
    from gptj.core.partitioning import Partitioner, make_mesh
    from gptj.model.transformer import GPTJConfig, HeadInputs, output_logits

    config = GPTJConfig(vocab_size=VOCAB, num_layers=1, d_model=D_MODEL, num_heads=HEADS, rotary_dim=32)
    partitioner = Partitioner(make_mesh(1, 1, devices=jax.devices()[:1]), "megatron")
    rows = []
    for length in lengths:
        batch_size = 8
        keys = jax.random.split(jax.random.PRNGKey(0), 3)
        hidden = jax.random.normal(keys[0], (batch_size, length, D_MODEL))
        kernel = jax.random.normal(keys[1], (D_MODEL, VOCAB)) * 0.02
        bias = jnp.zeros((VOCAB,))
        batch = {"targets": jax.random.randint(keys[2], (batch_size, length), 0, VOCAB),
                 "loss_mask": jnp.ones((batch_size, length))}
        variants = {"full logits": lambda h, k, b: losses.next_token_loss(output_logits(h, k, b, config), batch,
                                                                          accuracy=False)["loss_sum"]}
        for tokens, vocab_chunk in LOSS_CHUNKS:
            loss_fn = recipe.head_loss_fns(config, tokens, recipe.loss_vocab_chunk(vocab_chunk, partitioner),
                                             0.0)[0]
            variants[f"fused {tokens} x {'auto' if vocab_chunk < 0 else vocab_chunk or 'all'}"] = functools.partial(
                lambda h, k, b, fn: fn(HeadInputs(h, k, b), batch)["loss_sum"], fn=loss_fn)
        compiled = {name: jax.jit(jax.value_and_grad(fn, argnums=(0, 1, 2))) for name, fn in variants.items()}
        outputs = {name: jax.block_until_ready(fn(hidden, kernel, bias)) for name, fn in compiled.items()}
        notes = {name: f"max relative error vs full logits {_max_relative_error(out, outputs['full logits']):.1e}"
                 for name, out in outputs.items()}
        times = alternate({name: functools.partial(lambda fn: jax.block_until_ready(fn(hidden, kernel, bias)), fn)
                           for name, fn in compiled.items()}, trials)
        flops = {name: 6.0 * batch_size * length * D_MODEL * VOCAB for name in compiled}
        rows += _rows(times, "full logits", flops, peak, f"head + loss fwd+bwd, batch {batch_size} x {length}",
                      notes=notes)
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser)
    parser.add_argument("--parts", default="attention,loss", help="comma list of attention, loss")
    parser.add_argument("--trials", type=int, default=0, help="timed trials per variant (default 3 quick, 7 full)")
    args = parser.parse_args(argv)
    parts = [p for p in args.parts.split(",") if p]
    unknown = sorted(set(parts) - {"attention", "loss"})
    if unknown:
        parser.error(f"unknown --parts {unknown}; choose from attention, loss")
    trials = args.trials or (3 if args.quick else 7)
    peak = matmul_peak_flops()
    rows = []
    if "attention" in parts:
        rows += bench_attention((256, 1024) if args.quick else (256, 1024, 2048), trials, peak)
    if "loss" in parts:
        rows += bench_loss((256,) if args.quick else (256, 1024), trials, peak)
    emit_results(args.json, rows)


if __name__ == "__main__":
    main()
