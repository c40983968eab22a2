"""What can go wrong on disk, as one line: the checkpoint error types, their classification, safe small writes.

Orbax and TensorStore report a full disk as a ValueError whose text holds
"RESOURCE_EXHAUSTED", a damaged file as a multi-line dump of a TensorStore
spec, and a failed asynchronous save from several threads at once. Everything
that reads or writes checkpoints turns such failures into one of the errors
below, with a message of one line that names the path; `quiet_storage_noise`
keeps the background threads' own reports off the terminal.
"""

from __future__ import annotations

import errno
import json
import logging as std_logging
import os
import sys
from typing import Any, Iterator

import jax
import numpy as np

from gptj.errors import CheckpointError, StorageError


def _causes(error: BaseException) -> Iterator[BaseException]:
    """`error`, then what caused it (`raise ... from`, or the exception being handled), and so on."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        yield error
        error = error.__cause__ or error.__context__


def storage_fault(error: BaseException) -> str | None:
    """'no space left', 'permission denied' or 'read-only file system' when that is what `error` comes down to.

    Python raises OSErrors; Orbax and TensorStore raise ValueErrors whose
    text carries the status (RESOURCE_EXHAUSTED for a full disk).
    """
    for cause in _causes(error):
        code = cause.errno if isinstance(cause, OSError) else None
        text = str(cause)
        if code in (errno.ENOSPC, errno.EDQUOT) or "RESOURCE_EXHAUSTED" in text or "No space left" in text:
            return "no space left"
        if code in (errno.EACCES, errno.EPERM) or "PERMISSION_DENIED" in text or "Permission denied" in text:
            return "permission denied"
        if code == errno.EROFS or "Read-only file system" in text:
            return "read-only file system"
    return None


def reason(error: BaseException) -> str:
    """The innermost useful message of an error chain, on one line of at most 300 characters."""
    text = ""
    for cause in _causes(error):
        # TensorStore appends its whole spec, over dozens of lines; the status line before it says what failed.
        message = str(cause).split("See full TensorStore details")[0].strip()
        if message:
            text = message
    line = " ".join(text.split()) or type(error).__name__
    return line if len(line) <= 300 else line[:297] + "..."


def as_storage_error(error: BaseException, path: str, doing: str) -> CheckpointError:
    """`error` as "{doing} {path}: ..." on one line: a StorageError for a storage fault, else a CheckpointError."""
    fault = storage_fault(error)
    if fault:
        return StorageError(f"{doing} {path}: {fault}")
    return CheckpointError(f"{doing} {path}: {reason(error)}")


def quiet_storage_noise() -> None:
    """Hides what Orbax's background work prints when a read or a save fails; the failure is raised as one line.

    A failed asynchronous save makes Orbax log the error, with a traceback,
    from each thread involved; a failed read leaves Orbax's other read
    coroutines to be closed with their own errors (each printed with a
    TensorStore spec dump); TensorStore callbacks that arrive after Orbax
    closed its event loop print "Event loop is closed". Entry points call
    this unless asked for details (main.py's --verbosity=1).
    """
    if getattr(quiet_storage_noise, "installed", False):
        return
    quiet_storage_noise.installed = True
    import orbax.checkpoint as ocp

    orbax_dir = os.path.dirname(ocp.__file__)
    std_logging.getLogger("absl").addFilter(
        lambda record: not (record.levelno >= std_logging.ERROR and record.pathname.startswith(orbax_dir)))
    previous = sys.unraisablehook

    def raised_in_orbax(error: BaseException) -> bool:  # any frame of its traceback in Orbax's code
        frame = error.__traceback__
        while frame is not None:
            if frame.tb_frame.f_code.co_filename.startswith(orbax_dir):
                return True
            frame = frame.tb_next
        return False

    def hook(unraisable):  # drops those two kinds, passes on the rest
        error = unraisable.exc_value
        closed_loop = isinstance(error, RuntimeError) and str(error) == "Event loop is closed"
        if not (closed_loop or (error is not None and raised_in_orbax(error))):
            previous(unraisable)

    sys.unraisablehook = hook


def write_json_atomic(path: str, value: Any) -> None:
    """Writes JSON through a temporary file and a rename, so `path` is never half-written."""
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path + ".tmp", "w") as f:
            json.dump(value, f, indent=2, sort_keys=True)
        os.replace(path + ".tmp", path)
    except OSError as e:
        raise as_storage_error(e, path, "cannot write") from e


def read_json(path: str) -> Any:
    """A JSON file's value."""
    with open(path) as f:
        return json.load(f)


def dir_bytes(path: str) -> int:
    """Bytes of the files under `path`."""
    return sum(os.path.getsize(os.path.join(root, name)) for root, _, names in os.walk(path) for name in names)


def tree_bytes(tree: Any) -> int:
    """Bytes of a tree of (global) arrays or ShapeDtypeStructs."""
    return sum(int(np.prod(np.shape(x))) * np.dtype(x.dtype).itemsize for x in jax.tree_util.tree_leaves(tree))
