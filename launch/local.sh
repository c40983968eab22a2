#!/usr/bin/env bash
# A pod on one machine: N processes of main.py, each with its own fake CPU devices,
# joined by jax.distributed over 127.0.0.1 with gloo collectives.
#
#   launch/local.sh N [main.py flags...]
#   launch/local.sh 2 --config=gptj/configs/tiny.py --workdir=runs/pod --config.train.total_steps=5
#
# Environment:
#   DEVICES_PER_PROCESS  fake CPU devices in each process (default 4)
#   PORT                 coordinator port (default: a free one)
#   LOG_DIR              also write process i's output to LOG_DIR/process_i.log (default: none)
#   PYTHON               interpreter (default: python)
#   INIT_TIMEOUT         seconds to wait for every process to join (default 120)
#
# Every process prints to this terminal, its lines prefixed with [i]; only
# process 0 logs below WARNING. If one process fails, the others are stopped
# and the script exits with the failed process's status.
set -euo pipefail

if [[ $# -lt 1 || ! "$1" =~ ^[1-9][0-9]*$ ]]; then
  echo "usage: $0 N [main.py flags...]   (N = number of processes)" >&2
  exit 2
fi
NUM_PROCESSES=$1
shift
DEVICES_PER_PROCESS=${DEVICES_PER_PROCESS:-4}
PYTHON=${PYTHON:-python}
INIT_TIMEOUT=${INIT_TIMEOUT:-120}
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PORT=${PORT:-$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
if [[ -n "${LOG_DIR:-}" ]]; then
  mkdir -p "$LOG_DIR"
fi

pids=()
stop_all() {
  for pid in "${pids[@]}"; do
    kill "$pid" 2>/dev/null || true
  done
}
trap 'stop_all; exit 130' INT TERM

for ((i = 0; i < NUM_PROCESSES; i++)); do
  # Each process sees only its own fake devices; XLA_FLAGS must be set before jax starts.
  log=/dev/null
  if [[ -n "${LOG_DIR:-}" ]]; then log="$LOG_DIR/process_$i.log"; fi
  (
    cd "$ROOT"
    other_flags=$(sed 's/--xla_force_host_platform_device_count=[0-9]*//g' <<< "${XLA_FLAGS:-}")
    export XLA_FLAGS="$other_flags --xla_force_host_platform_device_count=$DEVICES_PER_PROCESS"
    export JAX_PLATFORMS=cpu
    export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
    exec "$PYTHON" -u main.py --coordinator_address="127.0.0.1:$PORT" --num_processes="$NUM_PROCESSES" \
      --process_id="$i" --initialization_timeout="$INIT_TIMEOUT" "$@"
  ) > >(sed -u -e '/^\[Gloo\] Rank [0-9]* is connected to/d' -e "s/^/[$i] /" | tee "$log") 2>&1 &
  pids+=($!)
done

status=0
running=("${pids[@]}")
while [[ ${#running[@]} -gt 0 ]]; do
  finished=
  wait -n -p finished "${running[@]}" || status=$?
  remaining=()
  for pid in "${running[@]}"; do
    if [[ "$pid" != "$finished" ]]; then remaining+=("$pid"); fi
  done
  running=("${remaining[@]}")
  if [[ $status -ne 0 ]]; then
    echo "launch/local.sh: a process exited with status $status; stopping the others" >&2
    stop_all
    break
  fi
done
# Let the output prefixers drain before returning.
wait 2>/dev/null || true
exit "$status"
