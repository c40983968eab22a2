"""The built-in demo corpus: the CPython documentation topics every interpreter ships.

`pydoc_data.topics.topics` maps ~80 topic names to real English reference
text (~140k GPT-2 tokens), available offline on every machine. Topics are
split by name, so the train and validation splits share no document.
"""

from __future__ import annotations

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
