"""Training tokens/s: gptj's Trainer step against HF transformers' PyTorch GPT-J with AdamW, same cores, same run.

    python benchmarks/train_vs_hf.py [--quick] [--json PATH] [--batch 8] [--seq_len 256] [--runs N]

Both train the same random weights (the CPU bench model of benchmarks/common.py:
4 layers, d_model 512, 8 heads, rotary_dim 32, vocab 50400; fp32), built once
in torch and converted with gptj.convert.hf, on the same batches, with the same
optimizer: global-norm clipping at 1, AdamW (betas 0.9/0.999, eps 1e-8, weight
decay 0.1 on matrices only), the same learning rate. gptj runs its real train
step (gptj.train_lm.build_trainer: jitted, donated state, AOT-compiled) on one
XLA:CPU device; HF runs `loss.backward()`, `clip_grad_norm_`, `AdamW.step()`
with torch using every core. The first step's losses are compared, so both are
known to compute the same thing. Timed runs alternate between the two so load
from other work on a shared machine falls on both alike; figures are medians.

MFU is gptj's model FLOPs per token (6 N + 12 L H Q T, PaLM; gptj.metrics)
times tokens/s over the machine's measured fp32 matmul peak
(benchmarks/common.matmul_peak_flops). With --breakdown, gptj's forward,
forward+backward and full step are timed separately to show where time goes.
--quick trains on 128-token sequences so that run_all stays in its budget on a
2-core CPU; the issue's figure is the default (batch 8 x 256).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# torch's OpenMP threads spin while waiting; on a shared machine that starves
# them. Passive waiting keeps the peer at its fair speed (see decode_vs_hf.py).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from benchmarks.common import (BENCH_MODEL, Timing, add_common_args, emit_results, matmul_peak_flops,  # noqa: E402
                               result, time_runs, train_tokens_per_s_limit)

LR, WEIGHT_DECAY, CLIP = 1e-4, 0.1, 1.0


def build_models(seq_len: int, seed: int = 0):
    """(HF model in train mode, gptj params as numpy, gptj model config) with identical random weights."""
    import numpy as np
    import torch
    import transformers

    from gptj.convert.hf import hf_config_dict, hf_state_to_params
    from gptj.model import GPTJConfig

    config = GPTJConfig(**dict(BENCH_MODEL, max_len=max(seq_len, BENCH_MODEL["max_len"])))
    torch.manual_seed(seed)
    hf_config = transformers.GPTJConfig(**{k: v for k, v in hf_config_dict(config).items()
                                           if k not in ("architectures", "model_type", "torch_dtype", "dtype")})
    hf_model = transformers.GPTJForCausalLM(hf_config).train()
    state = {name: t.detach().numpy().astype(np.float32) for name, t in hf_model.state_dict().items()}
    return hf_model, hf_state_to_params(state, config), config


def gptj_trainer(config, params, batch: int, seq_len: int):
    """gptj's train step for the bench model on one device, with the optimizer set like the HF side's."""
    from gptj import train_lm
    from gptj.configs import base
    from gptj.partitioning import Partitioner, make_mesh

    import jax

    run = base.get_config()
    run.model.update(config.to_dict())
    run.optimizer.update(dict(lr=LR, end_lr=LR, warmup_steps=0, anneal_steps=1, weight_decay=WEIGHT_DECAY,
                              clip_norm=CLIP, b1=0.9, b2=0.999, eps=1e-8))
    run.train.update(dict(batch_size=batch))
    run.data.update(dict(seq_len=seq_len))
    partitioner = Partitioner(make_mesh(1, 1, devices=jax.devices()[:1]), "megatron")
    trainer = train_lm.build_trainer(run, config, partitioner)
    start = time.perf_counter()
    trainer.compile()
    compile_s = time.perf_counter() - start
    return trainer, trainer.state_from_params(params), compile_s


def hf_optimizer(model):
    """torch AdamW with weight decay on matrices only, as the reference (and gptj) decay them."""
    import torch

    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    return torch.optim.AdamW([{"params": decay, "weight_decay": WEIGHT_DECAY},
                              {"params": no_decay, "weight_decay": 0.0}], lr=LR, betas=(0.9, 0.999), eps=1e-8)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq_len", type=int, default=0, help="tokens per sequence (default 256; 128 with --quick)")
    parser.add_argument("--runs", type=int, default=0, help="timed steps per side (default 2 quick, 5 full)")
    parser.add_argument("--breakdown", action="store_true", help="also time gptj's forward and backward alone")
    args = parser.parse_args(argv)
    seq_len = args.seq_len or (128 if args.quick else 256)
    runs = args.runs or (2 if args.quick else 5)

    import jax
    import numpy as np
    import torch
    import torch.nn.functional as F

    threads = os.cpu_count() or 1
    torch.set_num_threads(threads)
    hf_model, params, config = build_models(seq_len)
    trainer, state, compile_s = gptj_trainer(config, params, args.batch, seq_len)
    optimizer = hf_optimizer(hf_model)
    peak = matmul_peak_flops()

    rng = np.random.default_rng(0)
    text = rng.integers(0, config.vocab_size, (args.batch, seq_len + 1)).astype(np.int32)
    batch = {"inputs": text[:, :-1], "targets": text[:, 1:], "loss_mask": np.ones((args.batch, seq_len), np.float32)}
    batch = jax.device_put(batch, trainer.batch_shardings)
    inputs, targets = torch.from_numpy(text[:, :-1].astype(np.int64)), torch.from_numpy(text[:, 1:].astype(np.int64))

    box = {"state": state}

    def gptj_step():
        box["state"], metrics = trainer.train_step(box["state"], batch)
        return float(metrics["loss"])  # waits for the step

    def hf_step():
        optimizer.zero_grad(set_to_none=True)
        logits = hf_model(input_ids=inputs).logits
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(hf_model.parameters(), CLIP)
        optimizer.step()
        return loss.detach().item()

    first_gptj, first_hf = gptj_step(), hf_step()  # also the warm-up step of each
    if abs(first_gptj - first_hf) > 1e-3 * abs(first_hf):
        raise SystemExit(f"first-step losses differ: gptj {first_gptj} vs HF {first_hf}; not the same work")
    times = {"gptj": [], "hf": []}
    for _ in range(runs):
        for name, step in (("gptj", gptj_step), ("hf", hf_step)):
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)
    gptj_t, hf_t = Timing(tuple(times["gptj"])), Timing(tuple(times["hf"]))

    from gptj.metrics import mfu
    from gptj.model import train_flops_per_token

    tokens = args.batch * seq_len
    per_token = train_flops_per_token(config, seq_len)
    gptj_tps, hf_tps = tokens / gptj_t.median, tokens / hf_t.median
    note = (f"goal >= 1.0x; fp32, AdamW + clip on both, {threads} threads each; first-step loss gptj "
            f"{first_gptj:.5f} vs HF {first_hf:.5f}; gptj compile {compile_s:.1f} s (excluded); gptj MFU "
            f"{100 * mfu(gptj_tps, per_token, 1, peak):.1f}%, HF {100 * mfu(hf_tps, per_token, 1, peak):.1f}% "
            f"of the {peak / 1e9:.0f} GFLOP/s matmul peak ({per_token / 1e6:.0f} MFLOP/token)")
    if args.breakdown:
        note += "; " + breakdown(trainer, box["state"], batch, runs)
    rows = [result(f"train tokens/s (bench model, batch {args.batch} x {seq_len}, AdamW)", "tokens/s", gptj_tps,
                   peer=hf_tps, peer_name="HF PyTorch", limit=train_tokens_per_s_limit(config, seq_len, peak),
                   spread=gptj_t.spread, peer_spread=hf_t.spread, note=note)]
    emit_results(args.json, rows)


def breakdown(trainer, state, batch, runs: int) -> str:
    """gptj's forward, forward+backward and whole-step seconds, to show where a step's time goes."""
    import jax

    params = state["params"]

    def loss(p):
        logits = trainer.model.apply({"params": p}, batch["inputs"])
        return trainer.loss_fn(logits, batch)["loss_sum"]

    forward = jax.jit(loss)
    backward = jax.jit(jax.grad(loss))
    t_fwd = time_runs(lambda: jax.block_until_ready(forward(params)), runs=runs)
    t_bwd = time_runs(lambda: jax.block_until_ready(backward(params)), runs=runs)
    box = {"state": state}

    def step():
        box["state"], metrics = trainer.train_step(box["state"], batch)
        jax.block_until_ready(metrics)

    t_step = time_runs(step, runs=runs)
    return (f"gptj forward {t_fwd.median:.2f} s, forward+backward {t_bwd.median:.2f} s, whole step "
            f"{t_step.median:.2f} s (optimizer and the rest {t_step.median - t_bwd.median:.2f} s)")


if __name__ == "__main__":
    main()
