"""LoRA training tokens/s: gptj's frozen-base train step against HF transformers + peft, same model, same run.

    python benchmarks/lora_vs_peft.py [--quick] [--json PATH] [--batch 8] [--seq_len 256] [--rank 16] [--runs N]

Both fine-tune the same random weights (the CPU bench model of benchmarks/common.py:
4 layers, d_model 512, 8 heads, vocab 50400; fp32, built once in torch and converted
with gptj.weights.formats.hf, as benchmarks/train_vs_hf.py does) with LoRA adapters of the same
rank, alpha and targets (q_proj, v_proj, fc_in, fc_out; no dropout) over the frozen
base, on the same batches, with the same optimizer on the adapters alone: global-norm
clipping at 1, Adam(W) (betas 0.9/0.999, eps 1e-8, no weight decay), the same learning
rate. gptj runs its real train step (gptj.recipe.build_trainer with lora.rank > 0:
the base is a frozen, non-donated argument; jitted, AOT-compiled) on one XLA:CPU
device; HF runs `peft.get_peft_model(GPTJForCausalLM)`, `loss.backward()`,
`clip_grad_norm_`, `AdamW.step()` with torch using every core. The first step's
losses are compared (B starts at zero, so both equal the base model's loss), so both
are known to compute the same thing. Timed steps alternate between the two so load
from other work falls on both alike; figures are medians.

The limit is tokens/s at the machine's fp32 matmul peak for LoRA's model FLOPs per
token: 4N (forward, and the backward to activations: frozen weights get no gradient)
+ the attention's 12 L H Q T + 6 x the adapters' parameters. The CPU's model and
whether it has AVX-512 are printed, since they decide torch's and XLA's kernels.
--quick trains on 128-token sequences so that run_all stays in its budget on a 2-core CPU.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see train_vs_hf.py: spinning OpenMP threads starve peers

from benchmarks.common import (Timing, add_common_args, cpu_description, emit_results, matmul_peak_flops,  # noqa: E402
                               result)
from benchmarks.train_vs_hf import build_models  # noqa: E402

LR, CLIP, ALPHA = 1e-3, 1.0, 32.0
TARGETS = ("q_proj", "v_proj", "fc_in", "fc_out")


def gptj_lora_trainer(config, params, batch: int, seq_len: int, rank: int):
    """gptj's LoRA train step for the bench model on one device: the base frozen (fp32), the adapters trained."""
    import jax

    from gptj import recipe
    from gptj.configs import base
    from gptj.core.partitioning import Partitioner, make_mesh

    run = base.get_config()
    run.model.update(config.to_dict())
    run.lora.update(dict(rank=rank, alpha=ALPHA, dropout=0.0, targets=TARGETS, base_dtype="float32"))
    run.optimizer.update(dict(lr=LR, end_lr=LR, warmup_steps=0, anneal_steps=1, weight_decay=0.0, clip_norm=CLIP,
                              b1=0.9, b2=0.999, eps=1e-8))
    run.train.update(dict(batch_size=batch))
    run.data.update(dict(seq_len=seq_len))
    trainer = recipe.build_trainer(run, config, Partitioner(make_mesh(1, 1, devices=jax.devices()[:1]), "megatron"))
    trainer.set_frozen(params)  # with LoRA every base parameter is frozen
    start = time.perf_counter()
    trainer.compile()
    return trainer, trainer.init_state(0), time.perf_counter() - start


def peft_model_and_optimizer(hf_model, rank: int):
    """HF peft's LoRA over the HF model (same rank, alpha, targets) and torch AdamW over the adapters."""
    import torch
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(hf_model, LoraConfig(r=rank, lora_alpha=ALPHA, lora_dropout=0.0, bias="none",
                                                target_modules=list(TARGETS), task_type="CAUSAL_LM")).train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    return model, torch.optim.AdamW(trainable, lr=LR, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0), trainable


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq_len", type=int, default=0, help="tokens per sequence (default 256; 128 with --quick)")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--runs", type=int, default=0, help="timed steps per side (default 3 quick, 5 full)")
    args = parser.parse_args(argv)
    seq_len = args.seq_len or (128 if args.quick else 256)
    runs = args.runs or (3 if args.quick else 5)

    import jax
    import numpy as np
    import torch
    import torch.nn.functional as F

    threads = os.cpu_count() or 1
    torch.set_num_threads(threads)
    cpu = cpu_description()
    print(f"CPU: {cpu}; {threads} threads", flush=True)
    hf_model, params, config = build_models(seq_len)
    trainer, state, compile_s = gptj_lora_trainer(config, params, args.batch, seq_len, args.rank)
    peft_model, optimizer, adapters = peft_model_and_optimizer(hf_model, args.rank)
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

    def peft_step():
        optimizer.zero_grad(set_to_none=True)
        logits = peft_model(input_ids=inputs).logits
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(adapters, CLIP)
        optimizer.step()
        return loss.detach().item()

    first_gptj, first_peft = gptj_step(), peft_step()  # also the warm-up step of each
    if abs(first_gptj - first_peft) > 1e-3 * abs(first_peft):
        raise SystemExit(f"first-step losses differ: gptj {first_gptj} vs peft {first_peft}; not the same work")
    times = {"gptj": [], "peft": []}
    for _ in range(runs):
        for name, step in (("gptj", gptj_step), ("peft", peft_step)):
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)
    gptj_t, peft_t = Timing(tuple(times["gptj"])), Timing(tuple(times["peft"]))

    from gptj.model.transformer import count_params, matmul_params, train_flops_per_token

    n_adapters = count_params(trainer.abstract_state["params"])
    per_token = train_flops_per_token(config, seq_len) - 2 * matmul_params(config) + 6 * n_adapters
    tokens = args.batch * seq_len
    gptj_tps, peft_tps = tokens / gptj_t.median, tokens / peft_t.median
    note = (f"goal >= 1.3x; {cpu}; fp32, rank {args.rank}, alpha {ALPHA:g}, {', '.join(TARGETS)}, "
            f"{n_adapters:,} adapter parameters; AdamW + clip on the adapters, {threads} threads each; first-step "
            f"loss gptj {first_gptj:.5f} vs peft {first_peft:.5f}; gptj compile {compile_s:.1f} s (excluded); "
            f"LoRA model FLOPs {per_token / 1e6:.0f} MFLOP/token (4N + attention + 6 x adapters); limit at the "
            f"{peak / 1e9:.0f} GFLOP/s fp32 matmul peak")
    rows = [result(f"LoRA train tokens/s (bench model, rank {args.rank}, batch {args.batch} x {seq_len})", "tokens/s",
                   gptj_tps, peer=peft_tps, peer_name="HF peft", limit=peak / per_token, spread=gptj_t.spread,
                   peer_spread=peft_t.spread, note=note)]
    emit_results(args.json, rows)


if __name__ == "__main__":
    main()
