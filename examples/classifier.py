"""A new task on the generic trainer: a sequence classifier with a GPT-J trunk and a head of its own.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 \
        python examples/classifier.py --workdir=runs/classifier --data=2 --model=4 --rules=zero3 --steps=60

(the flag gives a CPU 8 fake devices for the 2 x 4 mesh; on 8 accelerators drop it).

The task: a sequence of tokens is class 1 when most of its tokens come from the
upper half of the vocabulary. The model reads it with a GPT-J trunk, pools the
final hidden states over the real (unpadded) tokens, applies dropout and a
two-way linear head. Everything else (sharded init, the train step, checkpoints,
resume, validation, metrics) is the library's, through its public API only.
"""

from __future__ import annotations

import argparse

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from gptj import GPTJ, GPTJConfig, Partitioner, RunSchedule, Trainer, make_mesh, train_in_workdir

VOCAB, SEQ_LEN, CLASSES = 64, 16, 2


class SequenceClassifier(nn.Module):
    """GPT-J trunk -> masked mean over tokens -> dropout -> linear head over the classes."""

    trunk: GPTJConfig
    dropout: float = 0.1

    @nn.compact
    def __call__(self, tokens, mask, deterministic: bool = True):
        hidden = GPTJ(self.trunk, name="trunk")(tokens, token_mask=mask, return_hidden=True)
        weights = mask.astype(jnp.float32)[..., None]
        pooled = (hidden.astype(jnp.float32) * weights).sum(1) / jnp.maximum(weights.sum(1), 1.0)
        pooled = nn.Dropout(self.dropout)(pooled, deterministic=deterministic)
        # Logical axes like the trunk's: every rule set knows "embed"; the class axis is never split.
        kernel = self.param("head", nn.with_logical_partitioning(nn.initializers.normal(0.02), ("embed", None)),
                            (self.trunk.d_model, CLASSES))
        return pooled @ kernel


def classification_loss(logits, batch):
    """Sums, as the Trainer wants them: cross-entropy, correct predictions and the example count."""
    log_probs = jax.nn.log_softmax(logits)
    nll = -jnp.take_along_axis(log_probs, batch["label"][:, None], axis=1)[:, 0]
    return {"loss_sum": nll.sum(), "correct": (logits.argmax(-1) == batch["label"]).sum().astype(jnp.float32),
            "weight": jnp.asarray(nll.shape[0], jnp.float32)}


def summarize(sums):
    weight = jnp.maximum(sums["weight"], 1.0)
    return {"loss": sums["loss_sum"] / weight, "accuracy": sums["correct"] / weight}


def make_batch(index: int, batch_size: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Batch `index` of a fixed stream: random lengths (right padding), label = mostly upper-half tokens."""
    rng = np.random.default_rng([seed, index])
    lengths = rng.integers(SEQ_LEN // 2, SEQ_LEN + 1, size=batch_size)
    mask = np.arange(SEQ_LEN)[None, :] < lengths[:, None]
    high = rng.random(batch_size) < 0.5
    bias = np.where(high, 0.8, 0.2)[:, None]  # the share of upper-half tokens each row draws from
    upper = rng.random((batch_size, SEQ_LEN)) < bias
    tokens = np.where(upper, rng.integers(VOCAB // 2, VOCAB, (batch_size, SEQ_LEN)),
                      rng.integers(0, VOCAB // 2, (batch_size, SEQ_LEN)))
    label = ((upper & mask).sum(1) * 2 > lengths).astype(np.int32)
    return {"inputs": np.where(mask, tokens, 0).astype(np.int32), "mask": mask, "label": label}


class Batches:
    """The training stream, resumable: the driver saves `get_state()` with each checkpoint."""

    def __init__(self, batch_size: int, seed: int = 0):
        self.batch_size, self.seed, self.index = batch_size, seed, 0

    def __iter__(self):
        return self

    def __next__(self):
        self.index += 1
        return make_batch(self.index - 1, self.batch_size, self.seed)

    def get_state(self):
        return {"index": self.index}

    def set_state(self, state):
        self.index = int(state["index"])


def build_trainer(partitioner: Partitioner, batch_size: int = 8) -> Trainer:
    trunk = GPTJConfig(vocab_size=VOCAB, num_layers=2, d_model=32, num_heads=4, rotary_dim=4, max_len=SEQ_LEN)
    schedule = optax.warmup_cosine_decay_schedule(0.0, 3e-3, warmup_steps=5, decay_steps=100, end_value=3e-4)
    optimizer = optax.adamw(schedule, weight_decay=0.01)
    spec = {"inputs": jax.ShapeDtypeStruct((batch_size, SEQ_LEN), jnp.int32),
            "mask": jax.ShapeDtypeStruct((batch_size, SEQ_LEN), jnp.bool_),
            "label": jax.ShapeDtypeStruct((batch_size,), jnp.int32)}
    return Trainer(SequenceClassifier(trunk), classification_loss, optimizer, partitioner, spec,
                   summarize=summarize, lr_schedule=schedule, model_inputs=("inputs", "mask"),
                   rng_streams=("dropout",))


def train(workdir: str, data: int = 2, model: int = 4, rules: str = "zero3", steps: int = 60,
          batch_size: int = 8):
    """Trains (or resumes) the classifier in `workdir` on a data x model mesh; returns the driver's RunResult."""
    partitioner = Partitioner(make_mesh(data, model, devices=jax.devices()[:data * model]), rules)
    trainer = build_trainer(partitioner, batch_size)
    validation = {"validation": lambda: iter([make_batch(i, batch_size, seed=1) for i in range(4)])}
    schedule = RunSchedule(total_steps=steps, log_every=10, eval_every=20, ckpt_every=20)
    return train_in_workdir(trainer, workdir, Batches(batch_size), schedule=schedule, eval_sets=validation,
                            run_config={"task": "classifier", "mesh": [data, model], "rules": rules})


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--data", type=int, default=2)
    parser.add_argument("--model", type=int, default=4)
    parser.add_argument("--rules", default="zero3")
    parser.add_argument("--steps", type=int, default=60)
    args = parser.parse_args()
    result = train(args.workdir, args.data, args.model, args.rules, args.steps)
    print(f"{result.status} at step {result.step}; validation accuracy "
          f"{result.validation[-1][1]['validation']['accuracy']:.3f}")
