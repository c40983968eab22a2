"""gptj: train, fine-tune, evaluate and serve GPT-J-style transformers in JAX/Flax.

The public API, for building new tasks on the trainer (see examples/):

    from gptj import Trainer, Partitioner, make_mesh, RunSchedule, train_in_workdir

    partitioner = Partitioner(make_mesh(data=2, model=4), "zero3")
    trainer = Trainer(model, loss_fn, optimizer, partitioner, batch_spec, model_inputs=("inputs", "mask"))
    result = train_in_workdir(trainer, "runs/mine", batches, schedule=RunSchedule(total_steps=500))

The generic core (gptj.core, knows nothing of GPT-J): `Trainer`, `Hook`,
`MemoryReport`, `WithReference` (trainer; the last is what a loss sees beside a
frozen reference model); `Partitioner`, `make_mesh`, `RULE_SETS`, `place`
(partitioning); `Checkpointer` (checkpoint); `train_in_workdir`,
`RunSchedule`, `RunContext`, `RunResult` (driver); `make_optimizer`
(optimizer); `next_token_loss` (losses).

GPT-J: `GPTJ`, `GPTJConfig`, `LoraConfig` (gptj.model.transformer);
`open_weights` (gptj.weights.source: hf:, mtj: and gptj weights);
`load_config` (gptj.configs: the built-in run configs); `task_output_features`
(gptj.data.tasks: the features a seqio task of your own registers, see
examples/custom_task.py); `RunSettings`
(gptj.settings: a run config checked and typed); `train_and_evaluate`
(gptj.train: language-model training as `main.py` runs it); `Sampler`,
`build_sampler` (gptj.inference.sampler).

Errors (gptj.errors): `GptjError`, the base of everything gptj raises about
bad input, and the kinds a caller may want to tell apart.

Names are imported on first use, so `import gptj.core.trainer` (or this package)
pulls in nothing it does not need: the model, TensorFlow and lm-eval stay
unloaded until asked for.
"""

import importlib

_EXPORTS = {
    "Trainer": "gptj.core.trainer",
    "Hook": "gptj.core.trainer",
    "MemoryReport": "gptj.core.trainer",
    "WithReference": "gptj.core.trainer",
    "Partitioner": "gptj.core.partitioning",
    "make_mesh": "gptj.core.partitioning",
    "RULE_SETS": "gptj.core.partitioning",
    "place": "gptj.core.partitioning",
    "Checkpointer": "gptj.core.checkpoint",
    "train_in_workdir": "gptj.core.driver",
    "RunSchedule": "gptj.core.driver",
    "RunContext": "gptj.core.driver",
    "RunResult": "gptj.core.driver",
    "make_optimizer": "gptj.core.optimizer",
    "next_token_loss": "gptj.core.losses",
    "GPTJ": "gptj.model.transformer",
    "GPTJConfig": "gptj.model.transformer",
    "LoraConfig": "gptj.model.transformer",
    "open_weights": "gptj.weights.source",
    "load_config": "gptj.configs",
    "train_and_evaluate": "gptj.train",
    "Sampler": "gptj.inference.sampler",
    "build_sampler": "gptj.inference.sampler",
    "RunSettings": "gptj.settings",
    "task_output_features": "gptj.data.tasks",
    "GptjError": "gptj.errors",
    "ConfigError": "gptj.errors",
    "PartitioningError": "gptj.errors",
    "WeightsError": "gptj.errors",
    "CheckpointError": "gptj.errors",
    "CheckpointDamagedError": "gptj.errors",
    "StorageError": "gptj.errors",
    "DataError": "gptj.errors",
    "VocabularyError": "gptj.errors",
    "EvalError": "gptj.errors",
    "NonFiniteLossError": "gptj.errors",
    "DistributedInitError": "gptj.errors",
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
