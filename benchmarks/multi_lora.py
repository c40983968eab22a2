"""How a batch of rows of different LoRA adapters is multiplied: why gptj gathers each row's A and B for
prefill and multiplies every row by every adapter for a decode step.

    python benchmarks/multi_lora.py [--quick] [--json PATH]

One GPT-J-6B projection (4096 -> 4096, bf16 on accelerators, fp32 here) with
8 adapters of rank 16 held beside the base, and rows whose adapters are drawn
at random (a quarter of them the plain base). Timed, per shape (decode: many
rows of one token; prefill: a few rows of many tokens), for the adapters'
delta alone and for the projection with it:

  gather    each row's A and B gathered by its id, then two batched
            contractions (Punica's BGMV, S-LoRA): work follows the rows'
            tokens, but each row copies its adapter.
  dense     every row through every adapter in one contraction, the other
            adapters' results masked out (one-hot): reads each adapter once,
            work follows rows x tokens x adapters.
  grouped   rows sorted by adapter and a grouped matmul per adapter
            (`jax.lax.ragged_dot`, the segmented matmul of MoE kernels):
            work follows the rows, plus the sort and its inverse.
  gptj      `gptj.model.transformer.pooled_lora_delta`: dense for one token
            per row and at least as many rows as adapters (a decode step),
            gather otherwise.
  merged    the projection alone, as a model with its adapter merged runs it
            (what a server per adapter computes): the floor.

Each method's time is its best of the runs, taken in turn with the others
(on a shared machine, load only slows a run down). The rows report gptj
against the better of the two ways it does not take at that shape, and the
overhead of its delta over the plain projection.
"""

from __future__ import annotations

import argparse
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks.common import add_common_args, cpu_description, emit_results, result  # noqa: E402

D_MODEL, RANK, ADAPTERS = 4096, 16, 8
# (name, rows, tokens per row)
SHAPES = (("decode", 32, 1), ("prefill", 2, 512))
PEER_NAMES = {"gather": "per-row gather", "dense": "every row through every adapter (one-hot)",
              "grouped": "grouped matmul (ragged_dot)"}


def methods(pool_a, pool_b):
    """{name: fn(x [rows, T, d], ids [rows]) -> delta [rows, T, d]} for one projection's adapter pool."""
    import jax
    import jax.numpy as jnp

    from gptj.model.transformer import _split_einsum, pooled_lora_delta

    letters = _split_einsum("btd,dk->btk")
    slots = pool_a.shape[0]

    def gather(x, ids):
        slot = jnp.where(ids < 0, slots, ids)
        a = jnp.take(pool_a, slot, axis=0, mode="fill", fill_value=0)
        b = jnp.take(pool_b, slot, axis=0, mode="fill", fill_value=0)
        return jnp.einsum("btr,brk->btk", jnp.einsum("btd,bdr->btr", x, a), b)

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

    def gptj(x, ids):
        return pooled_lora_delta(x, pool_a, pool_b, ids, letters)

    return {"gather": gather, "dense": dense, "grouped": grouped, "gptj": gptj}


def measure(runs: int) -> dict:
    """{(shape, rows, tokens): {method: best seconds}} for the delta alone, and for the projection with gptj's
    delta ("gptj+W") and without ("merged"); the methods run in turn, each keeping its best time."""
    import time

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
        delta = methods(pool_a, pool_b)
        programs = {name: jax.jit(fn) for name, fn in delta.items()}
        programs["gptj+W"] = jax.jit(lambda x, ids: jnp.einsum("btd,dk->btk", x, w) + delta["gptj"](x, ids))
        programs["merged"] = jax.jit(lambda x, ids: jnp.einsum("btd,dk->btk", x, w))
        results = {name: np.asarray(fn(x, ids)) for name, fn in programs.items()}  # compiled, warmed
        for name in ("dense", "grouped", "gptj"):  # every method computes the same delta
            np.testing.assert_allclose(results[name], results["gather"], rtol=2e-3, atol=2e-4)
        best = {name: float("inf") for name in programs}
        for _ in range(runs):
            for name, fn in programs.items():
                start = time.perf_counter()
                fn(x, ids).block_until_ready()
                best[name] = min(best[name], time.perf_counter() - start)
        out[(shape, rows, tokens)] = best
        print(f"{shape} ({rows} rows x {tokens} tokens): "
              + ", ".join(f"{k} {1e3 * v:.2f} ms" for k, v in best.items()), flush=True)
    return out


def rows_for(measured: dict, machine: str) -> list[dict]:
    rows = []
    for (shape, n, tokens), t in measured.items():
        taken = "dense" if tokens == 1 and n >= ADAPTERS else "gather"
        peer = min((k for k in ("gather", "dense", "grouped") if k != taken), key=lambda k: t[k])
        what = f"{shape}: {n} rows x {tokens} tokens, {ADAPTERS} adapters of rank {RANK}, 4096 -> 4096"
        rows.append(result(
            f"multi-LoRA delta, gptj ({taken}) vs {peer} ({what})", "ms", 1e3 * t["gptj"], peer=1e3 * t[peer],
            peer_name=PEER_NAMES[peer], higher_is_better=False,
            note=(f"best of the runs: gather {1e3 * t['gather']:.2f}, dense {1e3 * t['dense']:.2f}, grouped "
                  f"{1e3 * t['grouped']:.2f} ms; the projection with gptj's delta {1e3 * t['gptj+W']:.2f} ms "
                  f"against {1e3 * t['merged']:.2f} ms merged; {machine}")))
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser)
    args = parser.parse_args(argv)
    machine = cpu_description()
    print(f"multi_lora: {machine}", flush=True)
    emit_results(args.json, rows_for(measure(runs=7 if args.quick else 21), machine))


if __name__ == "__main__":
    main()
