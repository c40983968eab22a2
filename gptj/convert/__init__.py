"""Weight converters: HuggingFace GPT-J (hf), mesh-transformer-jax checkpoints (mtj), slim bf16 exports (slim).

Run them as `python -m gptj.convert <to_hf|from_hf|from_mtj|slim> ...`.
"""

FOREIGN_KINDS = ("hf", "mtj")


def read_weights(kind: str, path: str, vocab_pad_multiple: int = 1):
    """(numpy params, GPTJConfig) of foreign weights: `kind` "hf" (a HuggingFace directory) or "mtj"."""
    if kind == "hf":
        from gptj.convert.hf import read_hf

        return read_hf(path, vocab_pad_multiple=vocab_pad_multiple)
    if kind == "mtj":
        from gptj.convert.mtj import read_mtj

        return read_mtj(path, vocab_pad_multiple=vocab_pad_multiple)
    raise ValueError(f"unknown weights kind {kind!r}; expected one of {FOREIGN_KINDS}")
