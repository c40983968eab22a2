"""`python main.py --mode=eval`: validation loss and perplexity, then lm-evaluation-harness tasks.

Validation runs through the Trainer's own eval step (`Trainer.evaluate`, what
the training loop's EvalHook calls), so `--mode=eval` on a checkpoint reports
exactly the number training logged for it. The harness tasks run through
`gptj.evaluation.harness.GPTJLM`.
"""

from __future__ import annotations

import os
import time
from typing import Any

import jax
from absl import logging

from gptj import recipe
from gptj.core.partitioning import Partitioner
from gptj.errors import EvalError
from gptj.evaluation import harness as eval_harness
from gptj.evaluation import harness_tasks as eval_tasks
from gptj.model.transformer import GPTJConfig
from gptj.settings import LoraSettings, RunSettings
from gptj.weights.source import has_own_weights, load_for_inference, with_peft_adapter


def validation_metrics(config, params, model_config: GPTJConfig, partitioner: Partitioner) -> dict[str, dict]:
    """Loss, perplexity and next-token accuracy on each of the settings' `data.val_tasks` (a DPO run:
    the loss, rewards and log-probs of its validation pairs against its reference, init_from's weights).

    Reads at most `train.val_batches` batches of `train.batch_size` rows per
    set (gptj.data.pipeline.build_eval_iterators). Collective: every host calls it.
    """
    settings = RunSettings.from_config(config)
    if not any(settings.data.val_tasks):
        return {}
    from gptj.data import pipeline, tasks

    if settings.data.seq_len > model_config.max_len:
        raise EvalError(f"validation sequences of data.seq_len={settings.data.seq_len} tokens exceed the model's "
                        f"context of {model_config.max_len}; pass --config.data.seq_len={model_config.max_len} "
                        "(or less)")
    # Register only the validation sets: an eval run need not have the training data. `params` are what
    # inference loads (adapters merged), so the Trainer that scores them is the plain model: no LoRA, no freezing.
    eval_only = settings.override("data", train_task="").replace(lora=LoraSettings()).override("train", trainable="")
    tasks.register_tasks_for_config(eval_only)
    trainer = recipe.build_trainer(eval_only, model_config, partitioner)
    dpo = settings.train.objective == "dpo"
    if dpo:
        if not settings.init_from:
            raise EvalError("validation of a DPO run compares it with its reference model: set init_from to the "
                            "weights it started from")
        reference = recipe.open_init_weights(settings)
        if settings.lora.init_from:  # a run that started from an adapter: its reference is base + that adapter
            reference = with_peft_adapter(reference, settings.lora.init_from)
        recipe.load_reference(trainer, eval_only, reference, None)
    results = {}
    for name, make_iterator in pipeline.build_eval_iterators(eval_only, partitioner).items():
        summary = trainer.evaluate(params, make_iterator())
        results[name] = {k: v for k, v in summary.items() if k not in ("z_loss", "batches", "weight")}
        if dpo:
            results[name]["pairs"] = int(summary["weight"])
            logging.info("validation %s: loss %.4f, rewards/accuracies %.4f, rewards/margins %.4f (%d pairs)", name,
                         results[name]["loss"], results[name]["rewards/accuracies"],
                         results[name]["rewards/margins"], results[name]["pairs"])
            continue
        results[name]["tokens"] = int(summary["weight"])
        logging.info("validation %s: loss %.4f perplexity %.3f (%d tokens)", name, results[name]["loss"],
                     results[name]["perplexity"], results[name]["tokens"])
    return results


def evaluate(config, workdir: str) -> dict[str, Any]:
    """Validation loss/perplexity, then the harness tasks, on the workdir's weights (else `init_from`).

    Harness tasks are resolved and their data found before any weights are
    read, so a wrong name or missing data fails in seconds with an EvalError
    whose message is one paragraph (main.py prints it, not a traceback).
    Process 0 writes `workdir/eval/results_<UTC time>.json` (harness results
    plus a "validation" section) and prints the harness's table. Returns
    `{"validation": {...}, "harness": {...}}`.
    """
    settings = RunSettings.from_config(config)
    section = settings.eval
    names = list(section.harness_tasks)
    loaded = eval_tasks.load_tasks(names, section.include_path) if names else None
    if not has_own_weights(workdir) and not settings.init_from:
        raise EvalError(f"nothing to evaluate: {workdir} holds no checkpoint and config.init_from is empty "
                        "(pass --config.init_from=hf:PATH, mtj:PATH or a params directory)")
    partitioner = Partitioner.from_config(settings.mesh, fold_stages=True)  # no pipeline
    params, model_config = load_for_inference(settings, workdir, partitioner)
    started = time.time()
    validation = validation_metrics(settings, params, model_config, partitioner)
    harness: dict[str, Any] = {}
    if loaded is not None:
        lm = eval_harness.GPTJLM(params, model_config, partitioner, eval_harness.get_tokenizer(),
                                 batch_size=section.batch_size)
        harness = eval_tasks.run_tasks(
            lm, names, include_path=section.include_path, loaded=loaded, num_fewshot=section.num_fewshot,
            limit=section.limit, bootstrap_iters=section.bootstrap_iters, log_samples=section.log_samples)
    if jax.process_index() == 0:
        if harness:
            from lm_eval.utils import make_table

            print(make_table(harness), flush=True)
        record = dict(harness, validation=validation, eval_seconds=round(time.time() - started, 3))
        eval_tasks.write_results(record, os.path.join(workdir, "eval"))
    return {"validation": validation, "harness": harness}
