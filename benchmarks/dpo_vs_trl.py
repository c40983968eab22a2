"""DPO training tokens/s under LoRA: gptj's train step against TRL's DPOTrainer + peft, same model, same run.

    python benchmarks/dpo_vs_trl.py [--quick] [--json PATH] [--pairs 4] [--seq_len 256] [--rank 16] [--runs N]

Both preference-tune the same random weights (the CPU bench model of benchmarks/common.py,
fp32, built once in torch and read by gptj.weights.formats.hf, as benchmarks/lora_vs_peft.py
does) with LoRA adapters of the same rank, alpha and targets (q_proj, v_proj, fc_in, fc_out;
no dropout), on the same batch of pairs, with the same optimizer on the adapters alone
(global-norm clipping at 1, Adam(W) 0.9/0.999/1e-8, no weight decay, the same learning
rate) and the same loss (sigmoid, beta 0.1). The reference is the base with the adapters off
on both sides. gptj runs its real train step (gptj.recipe.build_trainer with
train.objective=dpo and lora.rank > 0: one forward of the policy over the 2B sequences,
one of the reference, the backward) on one XLA:CPU device; TRL runs DPOTrainer's own loss
(`compute_loss`: the policy's and the reference's forward over its collated batch of
chosen and rejected rows), then `backward`, `clip_grad_norm_` and `AdamW.step()`, with torch
using every core. Each pair is a prompt and two completions of the same length, so TRL's
dynamic padding pads nothing and both sides process the same 2 x seq_len tokens a pair.
The first step's policy log-probabilities are compared (the adapters start at zero), so
both are known to compute the same thing. Timed steps alternate between the two so load
from other work falls on both alike; figures are medians; tokens/s counts both sequences
of every pair.

The limit is tokens/s at the machine's fp32 matmul peak for DPO's model FLOPs per token
under LoRA: the policy's 4N (forward, and the backward to activations) + the reference's
forward 2N + attention (12 L H Q T for the policy, 4 L H Q T for the reference) + 6 x the
adapters' parameters.
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
from benchmarks.lora_vs_peft import ALPHA, CLIP, LR, TARGETS, peft_model_and_optimizer  # noqa: E402
from benchmarks.train_vs_hf import build_models  # noqa: E402

BETA = 0.1


def gptj_dpo_trainer(config, params, pairs: int, seq_len: int, rank: int):
    """gptj's DPO train step under LoRA for the bench model on one device: the base frozen (fp32) and the reference."""
    import jax

    from gptj import recipe
    from gptj.configs import base
    from gptj.core.partitioning import Partitioner, make_mesh

    run = base.get_config()
    run.model.update(config.to_dict())
    run.lora.update(dict(rank=rank, alpha=ALPHA, dropout=0.0, targets=TARGETS, base_dtype="float32"))
    run.optimizer.update(dict(lr=LR, end_lr=LR, warmup_steps=0, anneal_steps=1, weight_decay=0.0, clip_norm=CLIP,
                              b1=0.9, b2=0.999, eps=1e-8))
    run.train.update(dict(batch_size=pairs, objective="dpo"))
    run.dpo.update(dict(beta=BETA, loss_type="sigmoid"))
    run.data.update(dict(seq_len=seq_len))
    trainer = recipe.build_trainer(run, config, Partitioner(make_mesh(1, 1, devices=jax.devices()[:1]), "megatron"))
    trainer.set_frozen(params)  # with LoRA every base parameter is frozen, and the reference is that base
    start = time.perf_counter()
    trainer.compile()
    return trainer, trainer.init_state(0), time.perf_counter() - start


def trl_trainer(peft_model, workdir: str):
    """TRL's DPOTrainer over the peft model (reference: the adapters disabled), beta and loss as gptj's."""
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    from gptj.data.vocab import hf_tokenizer

    args = DPOConfig(output_dir=workdir, beta=BETA, loss_type="sigmoid", report_to="none", use_cpu=True,
                     bf16=False, per_device_train_batch_size=1)  # fp32 as gptj (TRL's default is bf16 autocast)
    dummy = Dataset.from_list([{"prompt": "a", "chosen": " b", "rejected": " c"}])  # the timed batches are built below
    return DPOTrainer(model=peft_model, args=args, train_dataset=dummy, processing_class=hf_tokenizer())


def pair_tokens(pairs: int, seq_len: int, vocab: int, eos: int, seed: int = 0):
    """Random pairs: a prompt of seq_len / 2 tokens, two completions (EOS last) filling seq_len tokens each."""
    import numpy as np

    rng = np.random.default_rng(seed)
    prompt_len = seq_len // 2
    prompts = rng.integers(0, eos, (pairs, prompt_len))
    completions = rng.integers(0, eos, (pairs, 2, seq_len - prompt_len))
    completions[..., -1] = eos
    return prompts, completions


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser)
    parser.add_argument("--pairs", type=int, default=4)
    parser.add_argument("--seq_len", type=int, default=0, help="tokens per sequence (default 256; 128 with --quick)")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--runs", type=int, default=0, help="timed steps per side (default 3 quick, 5 full)")
    args = parser.parse_args(argv)
    seq_len = args.seq_len or (128 if args.quick else 256)
    runs = args.runs or (3 if args.quick else 5)

    import tempfile

    import jax
    import numpy as np
    import torch

    from gptj.data.vocab import EOT_ID

    threads = os.cpu_count() or 1
    torch.set_num_threads(threads)
    cpu = cpu_description()
    print(f"CPU: {cpu}; {threads} threads", flush=True)
    hf_model, params, config = build_models(seq_len)
    trainer, state, compile_s = gptj_dpo_trainer(config, params, args.pairs, seq_len, args.rank)
    peft_model, optimizer, adapters = peft_model_and_optimizer(hf_model, args.rank)
    peak = matmul_peak_flops()

    prompts, completions = pair_tokens(args.pairs, seq_len, config.vocab_size, EOT_ID)
    # gptj: records [pairs, 2, seq_len + 1] (the last column is padding), the mask on the completions.
    text = np.zeros((args.pairs, 2, seq_len + 1), np.int32)
    text[:, :, :prompts.shape[1]] = prompts[:, None]
    text[:, :, prompts.shape[1]:seq_len] = completions
    mask = np.zeros_like(text, np.float32)
    mask[:, :, prompts.shape[1]:seq_len] = 1
    batch = jax.device_put({"inputs": text[..., :-1], "targets": text[..., 1:], "loss_mask": mask[..., 1:]},
                           trainer.batch_shardings)
    box = {"state": state}

    with tempfile.TemporaryDirectory() as workdir:
        dpo = trl_trainer(peft_model, workdir)
        trl_batch = dpo.data_collator([{"prompt_ids": p.tolist(), "chosen_ids": c[0].tolist(),
                                        "rejected_ids": c[1].tolist()} for p, c in zip(prompts, completions)])
        assert tuple(trl_batch["input_ids"].shape) == (2 * args.pairs, seq_len), trl_batch["input_ids"].shape

        def gptj_step():
            box["state"], metrics = trainer.train_step(box["state"], batch)
            return float(metrics["logps/chosen"])  # waits for the step

        def trl_step():
            optimizer.zero_grad(set_to_none=True)
            loss = dpo.compute_loss(dpo.model, trl_batch)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(adapters, CLIP)
            optimizer.step()
            return dpo._metrics["train"]["logps/chosen"][-1]

        first_gptj, first_trl = gptj_step(), trl_step()  # also the warm-up step of each
        if abs(first_gptj - first_trl) > 1e-3 * abs(first_trl):
            raise SystemExit(f"first-step log-probs differ: gptj {first_gptj} vs TRL {first_trl}; not the same work")
        times = {"gptj": [], "trl": []}
        for _ in range(runs):
            for name, step in (("gptj", gptj_step), ("trl", trl_step)):
                start = time.perf_counter()
                step()
                times[name].append(time.perf_counter() - start)
    gptj_t, trl_t = Timing(tuple(times["gptj"])), Timing(tuple(times["trl"]))

    from gptj.model.transformer import count_params, matmul_params

    n_adapters = count_params(trainer.abstract_state["params"])
    n, attention = matmul_params(config), 4 * config.num_layers * config.num_heads * config.head_dim * seq_len
    per_token = 4 * n + 2 * n + 3 * attention + attention + 6 * n_adapters
    tokens = 2 * args.pairs * seq_len
    gptj_tps, trl_tps = tokens / gptj_t.median, tokens / trl_t.median
    note = (f"{cpu}; fp32, sigmoid loss, beta {BETA}, rank {args.rank}, alpha {ALPHA:g}, {', '.join(TARGETS)}, "
            f"{n_adapters:,} adapter parameters; the reference is the base with the adapters off on both sides; "
            f"AdamW + clip on the adapters, {threads} threads each; first-step logps/chosen gptj {first_gptj:.4f} vs "
            f"TRL {first_trl:.4f}; gptj compile {compile_s:.1f} s (excluded); DPO model FLOPs "
            f"{per_token / 1e6:.0f} MFLOP/token (policy 4N, reference 2N, attention, 6 x adapters); limit at the "
            f"{peak / 1e9:.0f} GFLOP/s fp32 matmul peak")
    rows = [result(f"DPO LoRA train tokens/s (bench model, rank {args.rank}, {args.pairs} pairs x 2 x {seq_len})",
                   "tokens/s", gptj_tps, peer=trl_tps, peer_name="TRL DPOTrainer + peft", limit=peak / per_token,
                   spread=gptj_t.spread, peer_spread=trl_t.spread, note=note)]
    emit_results(args.json, rows)


if __name__ == "__main__":
    main()
