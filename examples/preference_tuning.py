"""Preference tuning: supervised fine-tuning on prompt/completion pairs, then DPO on preference pairs.

    python examples/preference_tuning.py --workdir=runs/pref     # both stages, greedy samples before and after

or stage by stage through main.py (the config takes the stage after a colon):

    python main.py --config=examples/preference_tuning.py:sft --workdir=runs/pref/sft
    python main.py --config=examples/preference_tuning.py:dpo --workdir=runs/pref/dpo --config.init_from=runs/pref/sft
    python main.py --config=examples/preference_tuning.py:dpo --workdir=runs/pref/dpo --mode=sample \\
        --prompt="Request: paint the fence.
    Response:"

The built-in data (examples/data/preferences*.jsonl) are requests "Request: <verb>
the <noun>.\\nResponse:" whose chosen answer complies (" Sure, I will <verb> the
<noun>.") and whose rejected one refuses (" No."); 16 verb/noun pairings are held
out for validation. The SFT stage learns both answers from `preferences_sft.jsonl`,
refusals twice as often, so greedy decoding then refuses; the DPO stage
(`train.objective=dpo`, the SFT model as its frozen reference) learns the preference:
rewards/accuracies on the held-out pairs rise to 1 and greedy decoding complies,
on requests it never saw too. Your own data: --config.data.dpo_pattern='prefs/*.jsonl'
(rows {"prompt", "chosen", "rejected"}), and LoRA over big weights:
--config.lora.rank=16 (the reference is then the base with the adapters off).
"""

import os
import sys

from gptj import build_sampler, load_config, train_and_evaluate

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")
SEQ_LEN = 24  # the longest request + answer + EOS is 18 tokens


def get_config(stage: str = "sft"):
    """The run config of one stage: "sft" (prompt/completion) or "dpo" (preference pairs; set init_from)."""
    config = load_config("tiny")  # a 2-layer GPT-J trained from scratch; override init_from for real weights
    config.data.update(dict(seq_len=SEQ_LEN, sft_pattern=os.path.join(DATA, "preferences_sft.jsonl"),
                            dpo_pattern=os.path.join(DATA, "preferences.jsonl"),
                            dpo_val_pattern=os.path.join(DATA, "preferences_val.jsonl")))
    config.train.update(dict(batch_size=8, log_every=10, ckpt_every=0, val_batches=0))
    config.sample.update(dict(max_new_tokens=12, temperature=0.0))
    if stage == "sft":
        config.data.update(dict(train_task="gptj_sft", val_tasks=()))
        config.train.update(dict(total_steps=120, eval_every=0))
        config.optimizer.update(dict(lr=3e-3, end_lr=3e-4, warmup_steps=10, anneal_steps=120, weight_decay=0.0))
    elif stage == "dpo":
        config.data.update(dict(train_task="gptj_dpo", val_tasks=("gptj_dpo_validation",)))
        config.train.update(dict(objective="dpo", total_steps=40, eval_every=20))
        # TRL's defaults: beta 0.1, the sigmoid loss. The reference is the SFT model (init_from), kept in
        # float32 here so that the rewards start at exactly zero (bfloat16 halves its memory on big models).
        config.dpo.update(dict(beta=0.1, loss_type="sigmoid", reference_dtype="float32"))
        config.optimizer.update(dict(lr=1e-3, end_lr=1e-4, warmup_steps=5, anneal_steps=40, weight_decay=0.0))
    else:
        raise ValueError(f"stage must be 'sft' or 'dpo', got {stage!r}")
    return config


def held_out_prompts():
    """The prompts of the validation pairs (requests neither stage trained on)."""
    import json

    with open(os.path.join(DATA, "preferences_val.jsonl")) as f:
        return [json.loads(line)["prompt"] for line in f if line.strip()]


def greedy(config, workdir, prompts):
    """Greedy completions of `prompts` by the model in `workdir`."""
    sampler = build_sampler(config, workdir)
    return [g.text for g in sampler.complete(prompts, max_new_tokens=config.sample.max_new_tokens, temperature=0.0)]


def run(workdir: str, change=lambda config: None):
    """Both stages in workdir/sft and workdir/dpo; returns the greedy samples of the held-out prompts before
    DPO and after.

    `change(config)` edits each stage's config first (tests shrink the model with it).
    """
    sft, dpo = get_config("sft"), get_config("dpo")
    for config in (sft, dpo):
        change(config)
    train_and_evaluate(sft, os.path.join(workdir, "sft"))
    prompts = held_out_prompts()
    before = greedy(sft, os.path.join(workdir, "sft"), prompts)
    dpo.init_from = os.path.join(workdir, "sft")
    train_and_evaluate(dpo, os.path.join(workdir, "dpo"))
    after = greedy(dpo, os.path.join(workdir, "dpo"), prompts)
    return before, after


if __name__ == "__main__":
    from absl import flags

    flags.DEFINE_string("workdir", "runs/preference_tuning", "where both stages train")
    flags.FLAGS(sys.argv)
    before, after = run(flags.FLAGS.workdir)
    for prompt, a, b in zip(held_out_prompts(), before, after):
        print(f"{prompt!r}\n  after SFT: {a!r}\n  after DPO: {b!r}")
