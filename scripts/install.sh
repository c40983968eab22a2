#!/usr/bin/env bash
# Creates .venv (if missing) and installs gptj with every extra: training, HF conversion,
# evaluation, serving and tests, and the TPU and GPU compilers that --mode=plan --target= uses.
# Re-running it is cheap. Nothing else needs installing by hand.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip
# The CPU build of torch first, pinned, so that nothing pulls a multi-GB CUDA build (pip finds the wheel where a
# machine keeps one on disk; uv would not look there).
python -m pip install -q --no-compile "torch==2.13.0"
# Everything else through uv where it installs: it downloads and unpacks in parallel (33 s for what takes pip 58 s
# on a 2-core machine, the same versions). The installed torch satisfies the pin, so uv keeps it.
if python -m pip install -q uv; then
  INSTALL=(uv pip install -q --python "$PWD/.venv/bin/python")
else
  INSTALL=(python -m pip install -q --no-compile)
fi
"${INSTALL[@]}" -e ".[train,hf,eval,serve,test]"
# Bytecode for what gptj's runs and tests import, written by importing it: two processes side by side, one the
# training, data, serving and planning stack, the other torch, HF, lm-eval and the test clients. Where
# PYTHONDONTWRITEBYTECODE is set (as on some CI machines), Python never caches what it compiles on import, so
# without this every process compiled TensorFlow, torch and jax from source again: 20-40 s of CPU per `python
# main.py` and per test subprocess. These imports reach a third of the 27k modules installed, in 36 s on a
# 2-core machine, where compiling all of them (compileall) took 57 s; tests/conftest.py lets the test processes
# cache the rest they use.
env -u PYTHONDONTWRITEBYTECODE python -c "
import gptj.train, gptj.plan, gptj.evaluation.evaluate, gptj.inference.server, gptj.convert.__main__
import gptj.data.tasks.text, gptj.data.tasks.sft, gptj.data.tasks.dpo, gptj.data.tasks.tfrecords, gptj.data.pipeline
import tensorflow, seqio, tensorflow_datasets, clu.metric_writers, orbax.checkpoint, fastapi, uvicorn" > /dev/null 2>&1 &
env -u PYTHONDONTWRITEBYTECODE python -c "
import torch, transformers, peft, safetensors, lm_eval, lm_eval.tasks, lm_eval.evaluator, trl, openai, httpx
import schemathesis
from transformers import GPTJForCausalLM, GPTJConfig, AutoTokenizer" > /dev/null 2>&1 &
wait  # each import is only a speed-up: a failed one leaves its modules to be compiled on use
# The TPU and GPU compilers (libtpu, XLA's CUDA plugin: what the `tpu` and `cuda12` extras install), matched to
# the installed jax, in a folder of their own (gptj.targets.COMPILERS_DIR) that only --target plans load: among the
# site-packages, jax would load both at every start of every process, a second and a few lines of chatter each.
if ! python -m gptj.targets installed; then
  "${INSTALL[@]}" --no-deps --upgrade --target .venv/target-compilers $(python -m gptj.targets requirements)
fi
