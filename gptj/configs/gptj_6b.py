"""GPT-J-6B as the reference trained it (mesh-transformer-jax configs/6B_roto_256.json).

28 layers, d_model 4096, 16 heads x 256, rotary_dim 64, n_ctx 2048, vocab 50400;
lr 1.2e-4 -> 1.2e-5, 3000 warmup and 300,000 anneal steps, weight decay 0.1,
350,000 steps; 256 TPU v3 cores as 32 replicas of 8-way model parallelism,
per-replica batch 1 with 16 accumulation steps: 512 sequences of 2048 per step.
"""

from gptj.configs import base


def get_config():
    config = base.get_config()
    config.model.update(dict(
        vocab_size=50400, num_layers=28, d_model=4096, num_heads=16, rotary_dim=64, max_len=2048,
        dtype="bfloat16", param_dtype="float32", scan_layers=True, remat_policy="full",
    ))
    config.mesh.update(dict(data=-1, model=8, rules="megatron"))
    config.optimizer.update(dict(
        lr=1.2e-4, end_lr=1.2e-5, warmup_steps=3000, anneal_steps=300000, weight_decay=0.1, clip_norm=1.0,
    ))
    config.train.update(dict(
        batch_size=512, microbatches=16, total_steps=350000,
        ckpt_every=500, keep_every=10000, eval_every=500, val_batches=100,
    ))
    config.data.update(dict(train_task="gptj_tfrecords", seq_len=2048))
    config.eval.harness_tasks = ("lambada_openai", "piqa", "hellaswag", "winogrande")
    return config
