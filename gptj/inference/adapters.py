"""LoRA adapters served beside one base: reading one into an adapter-pool slot, and which name holds which slot.

    --config.serve.adapters='support=runs/lora_a,legal=peft_b'   # loaded at start-up
    POST /v1/load_lora_adapter {"lora_name": "x", "lora_path": "DIR"}   # at runtime, within max_adapters

The base is held once; each adapter is a slot of the runner's adapter pool
(`gptj.inference.runner.ModelRunner.reserve_adapters`: every target at one
padded rank), so rows of any adapters and of the base decode together. An
adapter is a HuggingFace PEFT directory or a gptj LoRA workdir over the
served base (`gptj.weights.source.open_adapter` checks it fits).

`AdapterRegistry` is the bookkeeping, safe to call from any thread: names to
slots, how many rows (queued or running) use each adapter, and unloading
that waits for them (an adapter being unloaded takes no new rows; its slot
is free once its last row ends). Each load gets a `namespace` of its own, so
prefix-cache blocks computed through one load are never served for another
adapter loaded later under the same name or slot.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import itertools
import logging
import re
import threading
import time
from typing import Any

from gptj.errors import AdapterError, GptjError, UnknownAdapterError
from gptj.model.lora import pool_entry
from gptj.model.transformer import LoraConfig
from gptj.weights.source import open_adapter, open_adapter_config

# The adapter pool's rank when serve.max_adapter_rank is 0 and no start-up adapter has a higher one (vLLM's
# max_lora_rank default).
DEFAULT_ADAPTER_RANK = 16
# Adapter names: what a request's `model` field names (no commas or '=': they separate `serve.adapters`).
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/@-]{0,127}")


def parse_adapter_specs(text: str) -> list[tuple[str, str]]:
    """[(name, path)] of `serve.adapters` ('name=DIR,name2=DIR2'); ValueError naming what is malformed."""
    specs = []
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        name, sep, path = item.partition("=")
        name, path = name.strip(), path.strip()
        if not sep or not path:
            raise ValueError(f"adapter {item!r} must be NAME=DIR")
        if not NAME_PATTERN.fullmatch(name):
            raise ValueError(f"adapter name {name!r} must be letters, digits and . _ : / @ - (starting with a "
                             "letter or digit)")
        specs.append((name, path))
    names = [name for name, _ in specs]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"adapter names must differ; {duplicates} given twice")
    return specs


def _refused(path: str, error: Exception) -> AdapterError:
    """An adapter that cannot be read, as one AdapterError line (a library's own errors logged in full)."""
    if isinstance(error, GptjError):
        message = str(error)
    else:  # a damaged file can make any reader fail; the server keeps serving and says which file
        logging.exception("reading the adapter %s failed", path)
        message = f"{path}: cannot be read ({type(error).__name__}: {error})"
    return AdapterError(" ".join(message.split()))


def read_adapter_config(path: str) -> LoraConfig:
    """The LoraConfig (rank, alpha, targets) of the adapter at `path`, from its config alone; AdapterError if
    it cannot be read."""
    try:
        return open_adapter_config(path)
    except Exception as e:  # noqa: BLE001 - see _refused
        raise _refused(path, e) from None


def read_adapter(path: str, runner) -> tuple[LoraConfig, dict]:
    """(its LoraConfig, its pool slot's arrays) of the adapter at `path` for `runner`'s base and pool.

    AdapterError (one line) when it cannot be read, does not fit the base
    (shape; a gptj workdir: the base's fingerprint), or has a rank past the
    pool's.
    """
    try:
        lora, adapters = open_adapter(path, runner.config, runner.fingerprint)
    except Exception as e:  # noqa: BLE001 - see _refused
        raise _refused(path, e) from None
    if lora.rank > runner.adapter_rank:
        raise AdapterError(f"{path}: rank {lora.rank} exceeds this server's adapter rank {runner.adapter_rank} "
                           "(config.serve.max_adapter_rank)")
    return lora, pool_entry(adapters, lora, runner.adapter_rank, runner.config)


def adapter_pool_size(serve) -> tuple[int, int]:
    """(slots, rank) of the adapter pool a serve section (ServeSettings) asks for; (0, 0): no adapters.

    Slots: `max_adapters`, or as many as `adapters` names; rank:
    `max_adapter_rank`, or the largest rank `adapters` names and at least
    DEFAULT_ADAPTER_RANK (from the adapters' config files)."""
    specs = parse_adapter_specs(serve.adapters)
    slots = serve.max_adapters or len(specs)
    if not slots:
        return 0, 0
    rank = serve.max_adapter_rank or max([DEFAULT_ADAPTER_RANK] + [read_adapter_config(path).rank
                                                                   for _, path in specs])
    return slots, rank


@dataclasses.dataclass(frozen=True)
class Adapter:
    """A loaded adapter: its name, where it came from, its pool slot and its prefix-cache namespace."""

    name: str
    path: str
    lora: LoraConfig
    slot: int
    namespace: str
    loaded_at: float


class AdapterRegistry:
    """Names -> pool slots, with the rows that use each adapter counted; see the module docstring.

    Args:
      slots: the adapter pool's slots (0: this server holds no adapters).
    """

    def __init__(self, slots: int):
        self.slots = int(slots)
        self._lock = threading.Lock()
        self._by_name: dict[str, Adapter] = {}
        self._users: dict[str, int] = {}
        self._draining: dict[str, concurrent.futures.Future] = {}
        self._reserved: dict[str, int] = {}  # name -> slot, while its weights are read and written
        self._retired: list[str] = []  # namespaces of unloaded adapters, for the prefix cache to forget
        self._loads = itertools.count(1)

    def names(self) -> list[str]:
        """Adapters that take requests, in load order."""
        with self._lock:
            return [name for name in self._by_name if name not in self._draining]

    def adapters(self) -> list[Adapter]:
        """Adapters that take requests, in load order."""
        with self._lock:
            return [a for name, a in self._by_name.items() if name not in self._draining]

    def users(self) -> dict[str, int]:
        """Rows (queued or running) per loaded adapter."""
        with self._lock:
            return {name: self._users[name] for name in self._by_name}

    def reserve(self, name: str) -> int:
        """A free slot for a new adapter `name`; AdapterError if the name is taken or every slot is used."""
        with self._lock:
            if name in self._by_name or name in self._reserved:
                raise AdapterError(f"an adapter named {name!r} is already loaded; unload it first or choose "
                                   "another name")
            used = {a.slot for a in self._by_name.values()} | set(self._reserved.values())
            free = [slot for slot in range(self.slots) if slot not in used]
            if not free:
                raise AdapterError(f"this server holds at most {self.slots} adapters (config.serve.max_adapters="
                                   f"{self.slots}) and has no free slot; unload one first"
                                   if self.slots else
                                   "this server holds no adapters (config.serve.max_adapters=0); restart it with "
                                   "--config.serve.max_adapters=N to load adapters")
            self._reserved[name] = free[0]
            return free[0]

    def unreserve(self, name: str) -> None:
        """Gives back a reservation whose adapter could not be loaded."""
        with self._lock:
            self._reserved.pop(name, None)

    def activate(self, name: str, path: str, lora: LoraConfig) -> Adapter:
        """Makes a reserved adapter (its slot now written) take requests."""
        with self._lock:
            slot = self._reserved.pop(name)
            adapter = Adapter(name, path, lora, slot, f"{name}#{next(self._loads)}", time.time())
            self._by_name[name] = adapter
            self._users[name] = 0
            return adapter

    def acquire(self, name: str) -> Adapter:
        """The adapter `name`, counted as used by one more row; UnknownAdapterError if it takes no requests."""
        with self._lock:
            adapter = self._by_name.get(name)
            if adapter is None or name in self._draining:
                raise UnknownAdapterError(self._unknown(name))
            self._users[name] += 1
            return adapter

    def release(self, adapter: Adapter) -> None:
        """One row of `adapter` has ended; frees its slot if it is being unloaded and that was its last row."""
        with self._lock:
            self._users[adapter.name] -= 1
            self._finish_if_drained(adapter.name)

    def drain(self, name: str) -> concurrent.futures.Future:
        """Unloads `name`: no new rows from now on; the future resolves (to the Adapter) once its rows have
        ended and its slot is free. UnknownAdapterError if it is not loaded."""
        with self._lock:
            if name not in self._by_name:
                raise UnknownAdapterError(self._unknown(name))
            future = self._draining.setdefault(name, concurrent.futures.Future())
            self._finish_if_drained(name)
            return future

    def retired(self) -> list[str]:
        """The namespaces of adapters unloaded since the last call."""
        with self._lock:
            out, self._retired = self._retired, []
            return out

    def _finish_if_drained(self, name: str) -> None:
        if name in self._draining and self._users[name] == 0:
            adapter = self._by_name.pop(name)
            self._users.pop(name)
            self._retired.append(adapter.namespace)
            self._draining.pop(name).set_result(adapter)

    def _unknown(self, name: str) -> str:
        held = [n for n in self._by_name if n not in self._draining]
        return f"no adapter named {name!r} is loaded" + (f"; loaded: {', '.join(held)}" if held else "")

    def describe(self) -> dict[str, Any]:
        """For /health: slots, and each loaded adapter's rank, targets and rows in use."""
        with self._lock:
            return {"adapter_slots": self.slots,
                    "adapters": {name: {"rank": a.lora.rank, "targets": list(a.lora.targets), "slot": a.slot,
                                        "rows": self._users[name], "unloading": name in self._draining}
                                 for name, a in self._by_name.items()}}
