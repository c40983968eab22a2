"""Instruction tuning: a config file for main.py that fine-tunes on prompt/completion pairs, then samples.

    python main.py --config=examples/instruction_tuning.py --workdir=runs/sft
    python main.py --config=examples/instruction_tuning.py --workdir=runs/sft --mode=sample --temperature=0 \\
        --prompt="Q: What is two plus two? A:"

The data is JSON lines, one pair a row: {"prompt": "...", "completion": "..."}
(examples/data/instructions.jsonl by default). The built-in task `gptj_sft`
tokenizes each pair, appends EOS to the completion and counts the loss on the
completion and EOS only, so the model learns to answer and then stop; greedy
sampling of a trained prompt reproduces its completion. Your own data and weights:

    python main.py --config=examples/instruction_tuning.py --workdir=runs/mine \\
        --config.init_from=hf:PATH \\
        --config.data.sft_pattern='data/train*.jsonl' --config.data.sft_val_pattern='data/val.jsonl' \\
        --config.data.sft_pack=True --config.data.seq_len=2048

(`init_from` takes hf:PATH, mtj:PATH or a gptj workdir; the model's shape then
comes from the weights. `sft_pack` packs several pairs per row instead of one
padded pair per row.)
"""

import os

from gptj import load_config

EXAMPLE_DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "instructions.jsonl")


def get_config():
    config = load_config("tiny")  # a 2-layer GPT-J trained from scratch; override init_from for real weights
    config.data.update(dict(
        train_task="gptj_sft", sft_pattern=EXAMPLE_DATA,
        val_tasks=("gptj_sft_validation",), sft_val_pattern=EXAMPLE_DATA,
        sft_pack=False,  # one pair per row, right-padded: every prompt starts at position 0, as when sampling
        seq_len=32,
    ))
    # Eight pairs fit one batch: a high learning rate memorises them in well under a hundred steps.
    config.train.update(dict(batch_size=8, total_steps=80, log_every=10, eval_every=40, ckpt_every=0,
                             val_batches=1))
    config.optimizer.update(dict(lr=1e-2, end_lr=1e-3, warmup_steps=5, anneal_steps=80, weight_decay=0.0))
    config.sample.update(dict(max_new_tokens=16, temperature=0.0))
    return config
