"""How a batch of rows of different LoRA adapters is multiplied: why gptj gathers each row's A and B.

    python benchmarks/multi_lora.py [--quick] [--json PATH]

One GPT-J-6B projection (4096 -> 4096, bf16 on accelerators, fp32 here) with
8 adapters of rank 16 held beside the base, and rows whose adapters are drawn
at random (a quarter of them the plain base). Timed, per shape (decode: many
rows of one token; prefill: a few rows of many tokens), for the adapters'
delta alone and for the projection with it:

  gather    each row's A and B gathered by its id, then two batched
            contractions (`gptj.model.transformer.pooled_lora_delta`;
            Punica's BGMV, S-LoRA): work and reads follow the rows.
  dense     every row through every adapter, the other adapters' results
            masked out (one-hot): work follows rows x adapters.
  grouped   rows sorted by adapter and a grouped matmul per adapter
            (`jax.lax.ragged_dot`, the segmented matmul of MoE kernels):
            work follows the rows, plus the sort and its inverse.
  merged    the projection alone, as a model with its adapter merged runs it
            (what a server per adapter computes): the floor.

The rows report gather against the better of dense and grouped, and the
overhead of the gathered delta over the plain projection.
"""

from __future__ import annotations

import argparse
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks.common import add_common_args, cpu_description, emit_results, result, time_runs  # noqa: E402

D_MODEL, RANK, ADAPTERS = 4096, 16, 8
# (name, rows, tokens per row)
SHAPES = (("decode", 32, 1), ("prefill", 2, 512))
PEER_NAMES = {"dense": "every row through every adapter (one-hot)", "grouped": "grouped matmul (ragged_dot)"}


def methods(pool_a, pool_b):
    """{name: fn(x [rows, T, d], ids [rows]) -> delta [rows, T, d]} for one projection's adapter pool."""
    import jax
    import jax.numpy as jnp

    from gptj.model.transformer import _split_einsum, pooled_lora_delta

    letters = _split_einsum("btd,dk->btk")
    slots = pool_a.shape[0]

    def gather(x, ids):
        return pooled_lora_delta(x, pool_a, pool_b, ids, letters)

    def dense(x, ids):
        onehot = jax.nn.one_hot(ids, slots, dtype=x.dtype)  # a negative id: all zeros
        xa = jnp.einsum("btd,ndr->btnr", x, pool_a) * onehot[:, None, :, None]
        return jnp.einsum("btnr,nrk->btk", xa, pool_b)

    def grouped(x, ids):
        rows, tokens, d = x.shape
        slot = jnp.where(ids < 0, slots, ids)  # the base: a group of its own, of zero adapters
        order = jnp.argsort(slot)
        sizes = (jnp.bincount(slot, length=slots + 1) * tokens).astype(jnp.int32)
        zeros_a, zeros_b = jnp.zeros((1,) + pool_a.shape[1:], x.dtype), jnp.zeros((1,) + pool_b.shape[1:], x.dtype)
        flat = x[order].reshape(rows * tokens, d)
        xa = jax.lax.ragged_dot(flat, jnp.concatenate([pool_a, zeros_a]), sizes)
        delta = jax.lax.ragged_dot(xa, jnp.concatenate([pool_b, zeros_b]), sizes).reshape(rows, tokens, -1)
        return delta[jnp.argsort(order)]

    return {"gather": gather, "dense": dense, "grouped": grouped}


def measure(runs: int) -> dict:
    """{shape: {method: (median seconds, spread)}} for the delta alone and the projection with it."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    rng = np.random.default_rng(0)
    w = jnp.asarray(rng.normal(0, 0.02, (D_MODEL, D_MODEL)), jnp.float32)
    pool_a = jnp.asarray(rng.normal(0, 0.02, (ADAPTERS, D_MODEL, RANK)), jnp.float32)
    pool_b = jnp.asarray(rng.normal(0, 0.02, (ADAPTERS, RANK, D_MODEL)), jnp.float32)
    out = {}
    for shape, rows, tokens in SHAPES:
        x = jnp.asarray(rng.normal(size=(rows, tokens, D_MODEL)), jnp.float32)
        ids = jnp.asarray(rng.integers(-ADAPTERS // 3, ADAPTERS, rows), jnp.int32)
        timings, results = {}, {}
        for name, fn in methods(pool_a, pool_b).items():
            delta = jax.jit(fn)
            project = jax.jit(lambda x, ids, fn=fn: jnp.einsum("btd,dk->btk", x, w) + fn(x, ids))
            results[name] = np.asarray(delta(x, ids))
            timings[name] = time_runs(lambda: delta(x, ids).block_until_ready(), runs=runs)
            timings[name + "+W"] = time_runs(lambda: project(x, ids).block_until_ready(), runs=runs)
        base = jax.jit(lambda x: jnp.einsum("btd,dk->btk", x, w))
        timings["merged"] = time_runs(lambda: base(x).block_until_ready(), runs=runs)
        for name in ("dense", "grouped"):  # all three compute the same delta
            np.testing.assert_allclose(results[name], results["gather"], rtol=2e-3, atol=2e-4)
        out[(shape, rows, tokens)] = {k: (t.median, t.spread) for k, t in timings.items()}
        line = ", ".join(f"{k} {1e3 * v[0]:.2f} ms" for k, v in out[(shape, rows, tokens)].items())
        print(f"{shape} ({rows} rows x {tokens} tokens): {line}", flush=True)
    return out


def rows_for(measured: dict, machine: str) -> list[dict]:
    rows = []
    for (shape, n, tokens), t in measured.items():
        peer = min(("dense", "grouped"), key=lambda k: t[k][0])
        what = f"{shape}: {n} rows x {tokens} tokens, {ADAPTERS} adapters of rank {RANK}, 4096 -> 4096"
        rows.append(result(
            f"multi-LoRA delta, per-row gather vs {peer} ({what})", "ms", 1e3 * t["gather"][0],
            peer=1e3 * t[peer][0], peer_name=PEER_NAMES[peer],
            spread=t["gather"][1], peer_spread=t[peer][1], higher_is_better=False,
            note=(f"dense {1e3 * t['dense'][0]:.2f} ms, grouped {1e3 * t['grouped'][0]:.2f} ms; with the base "
                  f"matmul: gather {1e3 * t['gather+W'][0]:.2f} ms against {1e3 * t['merged'][0]:.2f} ms for the "
                  f"merged projection; {machine}")))
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser)
    args = parser.parse_args(argv)
    machine = cpu_description()
    print(f"multi_lora: {machine}", flush=True)
    emit_results(args.json, rows_for(measure(runs=3 if args.quick else 9), machine))


if __name__ == "__main__":
    main()
