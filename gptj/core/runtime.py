"""Process start-up shared by every mode: fewer garbage collections, a lighter TensorFlow import, a quiet console,
joining the other hosts, quieting all but process 0."""

from __future__ import annotations

import contextlib
import gc
import importlib.abc
import importlib.machinery
import logging as pylogging
import os
import sys
import threading

from absl import logging

from gptj.errors import DistributedInitError

# The gptj package (this file is gptj/core/runtime.py): records from any of its modules pass.
_PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# Container objects allocated (net of those freed) between young collections; Python's default is 700.
GC_YOUNG_THRESHOLD = 100_000


def collect_garbage_less_often() -> None:
    """Runs Python's cycle collector over young objects 140x less often than its defaults; call before the heavy
    imports.

    A full collection walks every object the process holds, and a gptj process
    holds millions (jax, TensorFlow with Keras and scikit-learn, lm-eval, the
    jaxprs of its programs) that it creates steadily while it imports and
    traces. With the defaults (700, 10, 10) collections took 9% of a small
    training run's CPU time (3.1 of 36 s, 2.4 of them in 9 full collections
    during start-up) and 7% of a test process's (6.7 of 95 s); with these
    thresholds 0.6 s and 1.7 s. Reference counting still frees everything
    outside cycles at once, and young cycles (most of a step's garbage) are
    still collected within 100,000 allocations.
    """
    gc.set_threshold(GC_YOUNG_THRESHOLD, 20, 10)


class _OwnLinesOnly(pylogging.Filter):
    """Passes the records of code under `roots` at every level, everyone else's only at ERROR and above.

    Libraries log dozens of INFO lines per checkpoint (Orbax), per backend
    probe (jax) and per metric write (clu); a user wants the run's own
    progress, validation, checkpoint and error lines.
    """

    def __init__(self, roots: tuple[str, ...]):
        super().__init__()
        self.roots = roots

    def filter(self, record: pylogging.LogRecord) -> bool:
        return record.levelno >= pylogging.ERROR or os.path.abspath(record.pathname).startswith(self.roots)


@contextlib.contextmanager
def stderr_silenced():
    """The process's stderr (file descriptor 2, where native libraries write) goes nowhere inside."""
    sys.stderr.flush()
    saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


# Packages Keras imports when they are installed, for features gptj never uses (its scikit-learn wrapper, pandas
# and plotting utilities). TensorFlow imports Keras whole as it loads, and these took 3.3 of its 11.4 CPU-seconds.
KERAS_EXTRAS = ("sklearn", "pandas", "matplotlib", "scipy")


class _TensorFlowLoader(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Imports TensorFlow without Keras's optional extras and, when `quiet`, with its native start-up lines hidden.

    While TensorFlow's own import runs, KERAS_EXTRAS that are not yet loaded
    read as not installed (Keras then skips what needs them); afterwards they
    import as usual. When quiet, stderr is silenced and the devices are probed
    inside: TensorFlow's CUDA build logs "Could not find cuda drivers" and
    "failed call to cuInit" through absl before any log level applies, once
    when it loads and once when it first lists devices (on a machine without a
    GPU, where the input pipeline runs anyway). An import error still raises.
    gptj itself never needs TensorFlow's devices.
    """

    def __init__(self):
        self.quiet = False
        self._loader = None

    def find_spec(self, fullname, path=None, target=None):
        if fullname != "tensorflow" or self._loader is not None:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None:
            return None
        self._loader, spec.loader = spec.loader, self
        return spec

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        hidden = [name for name in KERAS_EXTRAS if name not in sys.modules]
        sys.modules.update(dict.fromkeys(hidden))  # a None entry makes `import name` raise ImportError
        try:
            with stderr_silenced() if self.quiet else contextlib.nullcontext():
                self._loader.exec_module(module)
                if self.quiet:
                    module.config.list_physical_devices()
        finally:
            for name in hidden:
                if sys.modules.get(name, "") is None:
                    del sys.modules[name]


def _tensorflow_loader() -> _TensorFlowLoader | None:
    """The loader that will import TensorFlow, installed on first use; None once TensorFlow is imported."""
    if "tensorflow" in sys.modules:
        return None
    for finder in sys.meta_path:
        if isinstance(finder, _TensorFlowLoader):
            return finder
    loader = _TensorFlowLoader()
    sys.meta_path.insert(0, loader)
    return loader


def start_process() -> None:
    """What main.py and every other gptj process do first, before jax and TensorFlow are imported.

    Python's cycle collector runs less often (`collect_garbage_less_often`),
    and TensorFlow, when it is imported, loads without Keras's optional
    extras (KERAS_EXTRAS): a training run starts 3 CPU-seconds sooner.
    """
    collect_garbage_less_often()
    _tensorflow_loader()


def configure_console(verbosity: int = 0) -> None:
    """Keeps the console to gptj's own lines unless `verbosity` >= 1 (absl's --verbosity flag).

    Quiet mode drops other libraries' INFO and WARNING log records and Python
    warnings, and TensorFlow's native start-up lines (CUDA probing, oneDNN and
    CPU-feature notices) when called before TensorFlow is imported; errors
    always show.
    """
    if verbosity >= 1:
        return
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    loader = _tensorflow_loader()
    if loader is not None:
        loader.quiet = True
    handler = logging.get_absl_handler()
    if not any(isinstance(f, _OwnLinesOnly) for f in handler.filters):
        handler.addFilter(_OwnLinesOnly((_PACKAGE_DIR,)))
    pylogging.captureWarnings(True)  # warnings become records of the 'py.warnings' logger, filtered above


# jax's own initialization timeout is set this much later than ours, so ours fires first.
_JAX_TIMEOUT_MARGIN_S = 30


def _give_up(message: str) -> None:
    """Ends a process stuck joining the run: one line on stderr, exit status 1 (from a watchdog thread)."""
    os.write(2, f"error: {message}\n".encode())
    os._exit(1)


def _cluster_detected() -> bool:
    """True when the environment describes a multi-host job that jax can join on its own."""
    markers = ("SLURM_NTASKS", "TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS", "OMPI_COMM_WORLD_SIZE")
    if os.environ.get("SLURM_NTASKS", "1") == "1" and not any(os.environ.get(m) for m in markers[1:]):
        return False
    return any(os.environ.get(m) for m in markers)


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, timeout_s: int = 300) -> None:
    """Joins a multi-host run when one is described, then limits logging to process 0.

    Explicit flags (coordinator, process count and id) win; otherwise a cluster
    that jax recognises (TPU pod, SLURM, Open MPI) is joined automatically; a
    plain single-process run does nothing. CPU processes use gloo collectives.
    """
    import jax  # here, not at the top: main.py calls start_process before jax loads

    explicit = coordinator_address is not None or num_processes is not None or process_id is not None
    if explicit:
        missing = [n for n, v in (("coordinator_address", coordinator_address), ("num_processes", num_processes),
                                  ("process_id", process_id)) if v is None]
        if missing:
            raise DistributedInitError(f"an explicit multi-host launch needs all of --coordinator_address, "
                                       f"--num_processes and --process_id; missing {missing}")
    if explicit or _cluster_detected():
        if jax.config.jax_platforms in (None, "", "cpu") or os.environ.get("JAX_PLATFORMS", "") == "cpu":
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
        where = coordinator_address or "the cluster's coordinator"
        failure = (f"could not join the multi-host run at {where} within {timeout_s}s "
                   f"(process {process_id} of {num_processes})")
        # When the coordinator never answers (or a process never starts), jax's runtime
        # aborts the process from C++ with a stack trace. A watchdog that fires first
        # turns that into one line and exit status 1, like every other user error.
        watchdog = threading.Timer(timeout_s, _give_up, args=(
            f"{failure}: the coordinator did not answer or not every process started; check that all "
            "processes run with the same --coordinator_address and --num_processes",))
        watchdog.daemon = True
        watchdog.start()
        try:
            jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                                       process_id=process_id, initialization_timeout=timeout_s + _JAX_TIMEOUT_MARGIN_S)
        except Exception as e:  # the runtime raises several unrelated types for the same failures
            raise DistributedInitError(f"{failure}: {e}") from e
        finally:
            watchdog.cancel()
    if jax.process_index() != 0:
        logging.set_verbosity(logging.WARNING)
    devices = jax.devices()
    logging.info("devices: %d x %s (%s) over %d process(es)", len(devices), devices[0].platform,
                 devices[0].device_kind, jax.process_count())
