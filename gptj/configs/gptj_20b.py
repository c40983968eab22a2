"""A 20B GPT-J: GPT-NeoX-20B's shape in GPT-J's block, trained as a pipeline on a TPU v3-256.

Shape (GPT-NeoX-20B, Black et al. 2022): 44 layers, d_model 6144, 64 heads of
96, rotary_dim 24 (a quarter of each head, as in NeoX and GPT-J-6B), d_ff
4 x 6144, n_ctx 2048; GPT-J's vocabulary (50400 rows for GPT-2's BPE) and
block (one LayerNorm, attention and MLP in parallel, no attention biases):
20,552,602,848 parameters (NeoX-20B has 20,554,567,680 with its 50432-row vocabulary
and per-block second LayerNorm and biases).

Optimizer as NeoX-20B trained: lr 9.7e-5 -> 9.7e-6, 1% warmup of 150,000
steps, Adam b2 0.95, weight decay 0.01, clipping at 1.0. Batch 512 x 2048
(GPT-J-6B's 1M tokens; NeoX took 3M): GPipe keeps every microbatch's saved
activations of a stage until the backward pass, so a step's activation memory
grows with the batch per data-parallel replica, and 512 is what fits a v3 core
with this mesh.

Mesh: 4 pipeline stages (11 layers each) x data (the rest: 4 on a v3-256) x
16 model (two cores of 8 chips), `megatron_sp`, 64 microbatches (bubble 3/67
= 4.5% of the layers' iterations). The TPU compiler (`--mode=plan
--target=tpu:v3-256`, README) compiles its step within a v3 core's 16 GiB.
It refuses the same pipeline split 8 ways by model (4 x 8 x 8: 16.3 GiB
needed of 15.5 available: each device's share of the stage's weights, their
fp32 gradient sum and each iteration's gradient) and the pipeline without
sequence sharding (44 GiB: the replicated residual stream of 64 microbatches
in flight); without the pipeline, 8-way tensor parallelism holds 29 GiB of
weights and Adam moments per core before any activation. On one v3 pod zero3
32 x 8 (--config.mesh.stage=1 --config.mesh.model=8 --config.mesh.rules=zero3
--config.train.microbatches=16) is `python -m gptj.scaling compare`'s pick,
its weight gathers riding the torus; the pipeline is the layout that also
runs over TPU slices, where `compare` ranks it first and zero3's gathers
would cross the data-centre network.

The rest is GPT-J-6B's run (gptj_6b.py, which this file starts from): bf16
compute over fp32 weights with full remat, scanned layers, the data, the
batch size, and the checkpoint and evaluation cadence.
"""

from gptj.configs import gptj_6b


def get_config():
    config = gptj_6b.get_config()  # what is not set below is GPT-J-6B's run
    config.model.update(dict(num_layers=44, d_model=6144, num_heads=64, rotary_dim=24))
    config.mesh.update(dict(stage=4, model=16, rules="megatron_sp"))
    config.optimizer.update(dict(lr=9.7e-5, end_lr=9.7e-6, warmup_steps=1500, anneal_steps=150000, weight_decay=0.01,
                                 b2=0.95))
    config.train.update(dict(microbatches=64, total_steps=150000))
    return config
