"""Shared helpers for the trainer, checkpoint and main tests: a tiny config and an in-memory data iterator."""

from __future__ import annotations

import functools
import os
import signal

import jax
import numpy as np

from gptj.configs import base

VOCAB = 128
SEQ = 16
BATCH = 8


def tiny_config(**train):
    """A run config for a 2-layer, d_model 32 GPT-J on in-memory data (see SyntheticIterator)."""
    config = base.get_config()
    config.model.update(dict(vocab_size=VOCAB, num_layers=2, d_model=32, num_heads=4, rotary_dim=4, max_len=32,
                             vocab_pad_multiple=8, dtype="float32", param_dtype="float32", scan_layers=True,
                             remat_policy="none"))
    config.mesh.update(dict(data=-1, model=1, rules="megatron"))
    config.optimizer.update(dict(lr=1e-2, end_lr=1e-3, warmup_steps=2, anneal_steps=50))
    config.train.update(dict(batch_size=BATCH, total_steps=6, log_every=1, ckpt_every=0, eval_every=0,
                             val_batches=2, keep_last=5))
    config.train.update(train)
    config.data.update(dict(train_task="synthetic", val_tasks=["synthetic_val"], seq_len=SEQ))
    return config


def synthetic_batch(index: int, seed: int = 0, batch: int = BATCH, seq: int = SEQ) -> dict[str, np.ndarray]:
    """Batch `index` of a fixed stream: rows count upward from a random start (mod VOCAB), so it is learnable."""
    rng = np.random.default_rng([seed, index])
    start = rng.integers(0, VOCAB, size=(batch, 1))
    text = ((start + np.arange(seq + 1)[None, :]) % VOCAB).astype(np.int32)
    noise = rng.random(text.shape) < 0.1  # a little noise so the loss never reaches zero
    text = np.where(noise, rng.integers(0, VOCAB, size=text.shape), text).astype(np.int32)
    return {"inputs": text[:, :-1], "targets": text[:, 1:], "loss_mask": np.ones((batch, seq), np.float32)}


class SyntheticIterator:
    """gptj.data.pipeline's train-iterator protocol over `synthetic_batch`: next(), get_state(), set_state().

    `sigterm_at`: send this process SIGTERM while producing that batch number
    (1-based), i.e. during the step that the run should stop after.
    `poison_at`: make that batch's loss NaN (a NaN loss mask).
    """

    def __init__(self, config, partitioner=None, sigterm_at: int = 0, poison_at: int = 0):
        self.seed = int(config.train.seed)
        self.batch = int(config.train.batch_size)
        self.seq = int(config.data.seq_len)
        self.partitioner = partitioner
        self.sigterm_at = sigterm_at
        self.poison_at = poison_at
        self.index = 0

    def __iter__(self):
        return self

    def __next__(self):
        local = synthetic_batch(self.index, self.seed, self.batch, self.seq)
        self.index += 1
        if self.index == self.poison_at:
            local["loss_mask"] = np.full_like(local["loss_mask"], np.nan)
        if self.index == self.sigterm_at:
            os.kill(os.getpid(), signal.SIGTERM)
        if self.partitioner is None:
            return local
        sharding = self.partitioner.batch_sharding(2)
        return {k: jax.device_put(v, sharding) for k, v in local.items()}

    def get_state(self):
        return {"index": self.index}

    def set_state(self, state):
        self.index = int(state["index"])


def synthetic_eval_sets(config, partitioner=None):
    """gptj.data.pipeline's eval protocol: {name: callable -> finite iterator}."""
    def make():
        return iter([synthetic_batch(10_000 + i, 0, int(config.train.batch_size), int(config.data.seq_len))
                     for i in range(2)])

    return {"synthetic_val": make}


MESHES = {  # name -> (data, model, rule set)
    "single": (1, 1, "megatron"),
    "megatron": (2, 4, "megatron"),
    "zero3": (4, 2, "zero3"),
}


@functools.lru_cache(maxsize=None)
def cached_trainer(mesh: str = "single", microbatches: int = 1, warmup_steps: int = 2):
    """A Trainer for `tiny_config()` on one of MESHES, compiled once per test process."""
    from gptj import recipe
    from gptj.core.partitioning import Partitioner, make_mesh
    from gptj.model.transformer import GPTJConfig

    data, model, rules = MESHES[mesh]
    config = tiny_config(microbatches=microbatches)
    config.optimizer.warmup_steps = warmup_steps
    partitioner = Partitioner(make_mesh(data, model, devices=jax.devices()[:data * model]), rules)
    trainer = recipe.build_trainer(config, GPTJConfig.from_dict(config.model.to_dict()), partitioner)
    trainer.compile()
    return trainer


def to_numpy(tree):
    """A host copy of a (sharded) tree."""
    return jax.tree_util.tree_map(lambda x: np.array(jax.device_get(x)), tree)


def read_scalars(logdir: str, tag: str) -> dict[int, float]:
    """{step: value} of one scalar tag from every TensorBoard event file under `logdir`."""
    import glob

    import tensorflow as tf

    values = {}
    for path in sorted(glob.glob(os.path.join(logdir, "**", "events.out.tfevents.*"), recursive=True)):
        for event in tf.compat.v1.train.summary_iterator(path):
            for value in event.summary.value:
                if value.tag == tag:
                    values[event.step] = float(tf.make_ndarray(value.tensor))
    return values
