"""The error family: everything gptj raises about bad input or a refused run derives from `GptjError`.

`main.py` and `python -m gptj.convert` catch `GptjError` and print its
message as one `error:` line (exit status 1 / 2); `--verbosity=1` shows the
trace too. A library user can catch `GptjError` for all of them, or one
kind. Each kind also derives from the builtin it refines (ValueError,
FloatingPointError, RuntimeError), so older `except ValueError` code keeps
working.

This module imports nothing of gptj: every layer may import it.
"""


class GptjError(Exception):
    """Bad input or a run that cannot go on; the message says what and, where it helps, what to do."""


class ConfigError(GptjError, ValueError):
    """A configuration that cannot run; the message lists every problem found."""


class PartitioningError(GptjError, ValueError):
    """A mesh, rule set or parameter that cannot be laid out; the message says which and why."""


class TrainableError(GptjError, ValueError):
    """A `trainable` pattern that selects no parameter, or frozen parameters that do not fit the model."""


class NonFiniteLossError(GptjError, FloatingPointError):
    """The loss or gradient became NaN/inf and the run was told to stop rather than skip."""


class DistributedInitError(GptjError, RuntimeError):
    """The hosts of a multi-host run could not be joined."""


class CheckpointError(GptjError, ValueError):
    """A checkpoint that cannot be restored or saved: none complete, one that does not fit, a refused write."""


class CheckpointDamagedError(CheckpointError):
    """Saved data that fails its checksums or cannot be read.

    `path`: the step or params directory; `what`: the first bad array (its
    path in the tree, e.g. "params/blocks/attn/q_proj") or item; `reason`:
    what is wrong with it; `step`: the checkpoint's step, when it is one.
    """

    def __init__(self, path: str, what: str, reason: str, step: int | None = None):
        super().__init__(f"{path} is damaged: {what}: {reason}")
        self.path, self.what, self.reason, self.step = path, what, reason, step


class StorageError(CheckpointError):
    """The filesystem refused: no space left, permission denied, read-only. The message names the path."""


class IntegrityError(GptjError, ValueError):
    """Saved data that does not match its manifest (or a manifest that cannot be trusted).

    `what` names the first bad array (its path, e.g. "train_state/opt_state/0/mu/embed")
    or item; `reason` says what is wrong with it.
    """

    def __init__(self, what: str, reason: str):
        super().__init__(f"{what}: {reason}")
        self.what = what
        self.reason = reason


class WeightsError(GptjError, ValueError):
    """Weights that cannot be read: a missing, malformed or foreign directory."""


class DataError(GptjError, ValueError):
    """Bad input data; the message names the file and, where it applies, the row or record."""


class VocabularyError(GptjError, ValueError):
    """A vocabulary path that cannot be read as a GPT-2 BPE; the message names the path."""


class EvalError(GptjError, ValueError):
    """An evaluation that cannot run as configured; the message says why and what to do."""


class AdapterError(GptjError, ValueError):
    """An adapter a server cannot hold: unreadable, another base's, a name in use, past the server's limits."""


class UnknownAdapterError(AdapterError, LookupError):
    """A request or an unload names an adapter (model) the server does not hold; the message lists those it does."""
