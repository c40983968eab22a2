"""A 40B GPT-J, the size the reference names as its limit, trained as a pipeline on a TPU v3-256.

mesh-transformer-jax "scales up to approximately 40B parameters on TPUv3s,
beyond which different parallelism strategies should be used". Shape: 48
layers, d_model 8192, 64 heads of 128, rotary_dim 32 (a quarter of each head,
as in GPT-J-6B), d_ff 4 x 8192, n_ctx 2048, GPT-J's vocabulary (50400) and
block: 39,483,278,560 parameters. d_model 8192 and 48 layers are GPT-3's
depth-to-width ratio between its 13B (40 x 5140) and 175B (96 x 12288); 48
layers split evenly into 2, 4, 8 or 16 stages.

Optimizer: GPT-3's schedule interpolated between its 13B (1.0e-4) and 175B
(0.6e-4) learning rates: 8e-5 -> 8e-6, 1% warmup of 150,000 steps, Adam b2
0.95, weight decay 0.1, clipping at 1.0. Batch 512 x 2048 (1M tokens: GPipe
keeps every microbatch's saved activations of a stage until the backward
pass, so the memory grows with the batch per data-parallel replica).

Mesh: 8 pipeline stages (6 layers each) x data (the rest: 2 on a v3-256) x
16 model (two cores of 8 chips), `megatron_sp`, 128 microbatches (bubble
7/135 = 5.2% of the layers' iterations). The TPU compiler (`--mode=plan
--target=tpu:v3-256`, README) compiles its step within a v3 core's 16 GiB.
It refuses the same pipeline split 8 ways by model (8 x 4 x 8: 17.3 GiB
needed of 15.5 available) and the pipeline without sequence sharding (62
GiB); without the pipeline, 8-way tensor parallelism holds 55 GiB of weights
and Adam moments per core. On one v3 pod zero3 32 x 8 (--config.mesh.stage=1
--config.mesh.model=8 --config.mesh.rules=zero3 --config.train.microbatches=16)
is `python -m gptj.scaling compare`'s pick; across slices (2 v4-512, 4
v5e-256) `compare` ranks the pipeline with sequence sharding first.

The rest is GPT-J-6B's run (gptj_6b.py, which this file starts from): bf16
compute over fp32 weights with full remat, scanned layers, the data, the
batch size, and the checkpoint and evaluation cadence.
"""

from gptj.configs import gptj_6b


def get_config():
    config = gptj_6b.get_config()  # what is not set below is GPT-J-6B's run
    config.model.update(dict(num_layers=48, d_model=8192, num_heads=64, rotary_dim=32))
    config.mesh.update(dict(stage=8, model=16, rules="megatron_sp"))
    config.optimizer.update(dict(lr=8e-5, end_lr=8e-6, warmup_steps=1500, anneal_steps=150000, b2=0.95))
    config.train.update(dict(microbatches=128, total_steps=150000))
    return config
