"""The built-in demo corpus: the CPython documentation topics every interpreter ships.

`pydoc_data.topics.topics` maps ~80 topic names to real English reference
text (~140k GPT-2 tokens), available offline on every machine. Topics are
split by name, so the train and validation splits share no document.
`demo_byte_batches` reads the same documents as UTF-8 bytes (token ids
0-255): a model with a 256-token vocabulary trains every weight on them in
seconds, which tests and benchmarks of trained-model quality use.
"""

from __future__ import annotations

import numpy as np

# One topic in VALIDATION_EVERY (by sorted name) is held out for validation.
VALIDATION_EVERY = 10


def demo_documents(split: str) -> list[str]:
    """The demo documents of `split` ("train" or "validation"), in a fixed order."""
    from pydoc_data.topics import topics

    names = sorted(topics)
    if split == "train":
        return [topics[n] for i, n in enumerate(names) if i % VALIDATION_EVERY != VALIDATION_EVERY - 1]
    if split == "validation":
        return [topics[n] for i, n in enumerate(names) if i % VALIDATION_EVERY == VALIDATION_EVERY - 1]
    raise ValueError(f"demo corpus split must be 'train' or 'validation', got {split!r}")


def demo_byte_batches(split: str, count: int, batch: int, seq_len: int, seed: int | None = None) -> list[dict]:
    """`count` batches of `batch` windows of `seq_len` + 1 bytes of the demo corpus's `split`, as token ids.

    Each is {"inputs", "targets", "loss_mask"} [batch, seq_len]. `seed` None:
    windows evenly spaced over the split (a fixed validation set); else at
    random, drawn from `seed`.
    """
    data = np.frombuffer("\n\n".join(demo_documents(split)).encode(), np.uint8).astype(np.int32)
    if seed is None:
        starts = np.linspace(0, len(data) - seq_len - 2, count * batch).astype(int)
    else:
        starts = np.random.default_rng(seed).integers(0, len(data) - seq_len - 1, count * batch)
    text = np.stack([data[s:s + seq_len + 1] for s in starts]).reshape(count, batch, seq_len + 1)
    return [{"inputs": t[:, :-1], "targets": t[:, 1:], "loss_mask": np.ones((batch, seq_len), np.float32)}
            for t in text]
