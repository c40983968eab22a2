"""Weight specs as runs and tools write them: `hf:PATH`, `mtj:PATH`, a plain gptj PATH, and `peft:DIR` adapters."""

from __future__ import annotations

INIT_FROM_PREFIXES = ("hf:", "mtj:")
PEFT_PREFIX = "peft:"


def parse_init_from(spec: str) -> tuple[str, str]:
    """'hf:PATH' -> ('hf', PATH); 'mtj:PATH' -> ('mtj', PATH); a plain PATH -> ('gptj', PATH)."""
    for prefix in INIT_FROM_PREFIXES:
        if spec.startswith(prefix):
            return prefix[:-1], spec[len(prefix):]
    return "gptj", spec


def peft_adapter_dir(spec: str) -> str:
    """The directory of a `peft:DIR` spec; a bare DIR is taken as is."""
    if spec.startswith(PEFT_PREFIX):
        return spec[len(PEFT_PREFIX):]
    return spec
