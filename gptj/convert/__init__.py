"""Weight converters: HuggingFace GPT-J (hf), mesh-transformer-jax checkpoints (mtj), slim bf16 exports (slim).

Run them as `python -m gptj.convert <to_hf|from_hf|from_mtj|slim> ...`. Runs and
tools read weights through `gptj.weights.source`, which calls the readers here.
"""
