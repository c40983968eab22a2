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
# The CPU build of torch first, pinned, so that nothing pulls a multi-GB CUDA build.
# --no-compile: Python compiles the modules that are imported on first use; compiling
# every file of torch and tensorflow up front took over a minute of a fresh install.
python -m pip install -q --no-compile "torch==2.13.0"
python -m pip install -q --no-compile -e ".[train,hf,eval,serve,test]"
# The TPU and GPU compilers (libtpu, XLA's CUDA plugin: what the `tpu` and `cuda12` extras install), matched to
# the installed jax, in a folder of their own (gptj.targets.COMPILERS_DIR) that only --target plans load: among the
# site-packages, jax would load both at every start of every process, a second and a few lines of chatter each.
if ! python -m gptj.targets installed; then
  python -m pip install -q --no-compile --no-deps --upgrade --target .venv/target-compilers \
    $(python -m gptj.targets requirements)
fi
