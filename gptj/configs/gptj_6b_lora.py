"""GPT-J-6B LoRA fine-tuning on one GPU (24 GiB is enough): frozen bf16 base, fp32 adapters.

    python main.py --config=gptj/configs/gptj_6b_lora.py --workdir=runs/lora \\
        --config.init_from=hf:models/gpt-j-6b --config.data.train_task=gptj_sft --config.data.sft_pattern='sft/*.jsonl'

The base weights (`init_from`, required) are read once in bfloat16 (12.1 GB, no fp32
master copy, no optimizer state, no gradient); rank-16 adapters on q_proj, v_proj, fc_in
and fc_out (25.7M parameters, 0.1% of the model) train in fp32 with Adam. Compute is
bf16 with full rematerialisation; one 2048-token sequence per microbatch, 8 per update.
`--mode=plan --device_memory_gib=24` shows what one device holds.
"""

from gptj.configs import gptj_6b


def get_config():
    config = gptj_6b.get_config()
    config.model.update(dict(dtype="bfloat16", param_dtype="float32", remat_policy="full", scan_layers=True))
    config.lora.update(dict(rank=16, alpha=32.0, dropout=0.05, targets=("q_proj", "v_proj", "fc_in", "fc_out"),
                            base_dtype="bfloat16"))
    config.mesh.update(dict(data=1, model=1, rules="megatron"))
    # LoRA's usual optimizer: a higher learning rate than full fine-tuning, no weight decay.
    config.optimizer.update(dict(lr=2e-4, end_lr=2e-5, warmup_steps=100, anneal_steps=2000, weight_decay=0.0,
                                 clip_norm=1.0))
    config.train.update(dict(batch_size=8, microbatches=8, total_steps=2000, ckpt_every=200, keep_every=0,
                             eval_every=200, val_batches=20))
    config.data.update(dict(seq_len=2048))
    config.eval.harness_tasks = ()
    return config
