"""Shared test set-up: 8 fake CPU devices (for 2x4 / 4x2 meshes), a persistent compile cache and main.py's
process start-up (runtime.start_process: fewer garbage collections, TensorFlow without Keras's extras).

XLA_FLAGS must be set before jax is imported anywhere, hence at the top of conftest.
"""

import os
import sys

from xla_env import xla_flags  # noqa: E402 - tests/ is on sys.path (rootdir conftest)

from gptj.core import runtime

runtime.start_process()  # before jax and the rest are imported, as main.py does

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + xla_flags(8)).strip()
# The test processes cache the bytecode of what they import beyond what scripts/install.sh compiled, where the
# machine sets PYTHONDONTWRITEBYTECODE: otherwise each of their subprocesses would compile it again.
os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
sys.dont_write_bytecode = False
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# glibc backs the blocks it maps with transparent huge pages where the kernel allows them on request (its
# default, THP "madvise"): the test processes' children (training runs, conversions) then fault a third as often on
# fresh XLA and numpy buffers: a 60-step training child 1.95M -> 0.72M page faults, 9% less CPU; int8 quantization
# of a 1.2 GiB model 17% less CPU, the same peak memory. Read by glibc when a process starts, so it reaches the
# pytest workers and every child they start.
os.environ.setdefault("GLIBC_TUNABLES", "glibc.malloc.hugetlb=1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
COMPILE_CACHE = os.environ.setdefault(
    "JAX_COMPILATION_CACHE_DIR", os.path.join(os.path.dirname(os.path.dirname(__file__)), ".jax_cache"))

import jax  # noqa: E402

jax.config.update("jax_compilation_cache_dir", COMPILE_CACHE)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
