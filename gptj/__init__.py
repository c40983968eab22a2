"""gptj: train, fine-tune, evaluate and serve GPT-J-style transformers in JAX/Flax.

The public API, for building new tasks on the trainer (see examples/):

    from gptj import Trainer, Partitioner, make_mesh, RunSchedule, train_in_workdir

    partitioner = Partitioner(make_mesh(data=2, model=4), "zero3")
    trainer = Trainer(model, loss_fn, optimizer, partitioner, batch_spec, model_inputs=("inputs", "mask"))
    result = train_in_workdir(trainer, "runs/mine", batches, schedule=RunSchedule(total_steps=500))

The generic core (knows nothing of GPT-J): `Trainer`, `Hook`, `MemoryReport`
(gptj.trainer); `Partitioner`, `make_mesh`, `RULE_SETS`, `place`
(gptj.partitioning); `Checkpointer` (gptj.checkpoint); `train_in_workdir`,
`RunSchedule`, `RunContext`, `RunResult` (gptj.driver); `make_optimizer`
(gptj.optimizer); `next_token_loss` (gptj.losses).

GPT-J: `GPTJ`, `GPTJConfig`, `LoraConfig` (gptj.model); `open_weights` (gptj.weights: hf:,
mtj: and gptj weights); `load_config` (gptj.configs: the built-in run configs);
`train_and_evaluate` (gptj.train_lm: language-model training as `main.py`
runs it); `Sampler`, `build_sampler` (gptj.sampling).

Names are imported on first use, so `import gptj.trainer` (or this package)
pulls in nothing it does not need: the model, TensorFlow and lm-eval stay
unloaded until asked for.
"""

import importlib

_EXPORTS = {
    "Trainer": "gptj.trainer",
    "Hook": "gptj.trainer",
    "MemoryReport": "gptj.trainer",
    "NonFiniteLossError": "gptj.trainer",
    "Partitioner": "gptj.partitioning",
    "make_mesh": "gptj.partitioning",
    "RULE_SETS": "gptj.partitioning",
    "place": "gptj.partitioning",
    "Checkpointer": "gptj.checkpoint",
    "train_in_workdir": "gptj.driver",
    "RunSchedule": "gptj.driver",
    "RunContext": "gptj.driver",
    "RunResult": "gptj.driver",
    "make_optimizer": "gptj.optimizer",
    "next_token_loss": "gptj.losses",
    "GPTJ": "gptj.model",
    "GPTJConfig": "gptj.model",
    "LoraConfig": "gptj.model",
    "open_weights": "gptj.weights",
    "load_config": "gptj.configs",
    "train_and_evaluate": "gptj.train_lm",
    "Sampler": "gptj.sampling",
    "build_sampler": "gptj.sampling",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'gptj' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
