#!/usr/bin/env bash
# Train on a Cloud TPU VM slice: create (or reuse) it, copy this repository to every
# worker, install, and run the same main.py command on all workers at once.
#
#   launch/tpu_pod.sh create                   create the slice (nothing happens if it exists)
#   launch/tpu_pod.sh setup                    copy this checkout to every worker, pip install, mount BUCKET
#   launch/tpu_pod.sh run [main.py flags...]   run main.py on every worker; output streams here
#   launch/tpu_pod.sh all [main.py flags...]   create + setup + run
#   launch/tpu_pod.sh ssh 'COMMAND'            run a shell command on every worker
#   launch/tpu_pod.sh delete                   delete the slice
#
# Environment:
#   TPU_NAME, ZONE         required
#   ACCELERATOR_TYPE       default v3-32 (4 workers x 8 cores); v3-8 is a single worker
#   RUNTIME_VERSION        default tpu-ubuntu2204-base
#   PROJECT                default: gcloud's configured project
#   SPOT=1                 create a spot (preemptible) slice; main.py saves on SIGTERM
#   BUCKET                 a GCS bucket mounted with gcsfuse at ~/bucket on every worker
#   REMOTE_DIR             default gptj (under each worker's home)
#   PIP_EXTRAS             default "train,hf": the setup.py extras to install
#
# Every worker must see the workdir and the data at the same path: use the mounted bucket
# (--workdir=$HOME/bucket/runs/gptj6b) or another shared filesystem. Worker 0 is the
# coordinator; each worker's id and the worker list come from the TPU VM metadata (the
# same attributes jax's own TPU detection reads), passed to main.py as explicit flags.
#
# Example: fine-tune GPT-J-6B from the reference's released checkpoint on a v3-32:
#   TPU_NAME=gptj ZONE=europe-west4-a BUCKET=my-bucket launch/tpu_pod.sh all \
#     --config=gptj/configs/gptj_6b.py --workdir=/home/$USER/bucket/runs/ft \
#     --config.init_from=mtj:/home/$USER/bucket/step_383500 --config.train.total_steps=1000
set -euo pipefail

die() { echo "tpu_pod.sh: $*" >&2; exit 2; }
[[ $# -ge 1 ]] || die "usage: $0 create|setup|run|all|ssh|delete [args...] (see the header)"
: "${TPU_NAME:?set TPU_NAME}" "${ZONE:?set ZONE}"
ACCELERATOR_TYPE=${ACCELERATOR_TYPE:-v3-32}
RUNTIME_VERSION=${RUNTIME_VERSION:-tpu-ubuntu2204-base}
REMOTE_DIR=${REMOTE_DIR:-gptj}
PIP_EXTRAS=${PIP_EXTRAS:-train,hf}
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
GCLOUD=(gcloud compute tpus tpu-vm)
WHERE=(--zone="$ZONE")
if [[ -n "${PROJECT:-}" ]]; then WHERE+=(--project="$PROJECT"); fi

on_all_workers() {
  "${GCLOUD[@]}" ssh "$TPU_NAME" "${WHERE[@]}" --worker=all --command="$1"
}

create() {
  if "${GCLOUD[@]}" describe "$TPU_NAME" "${WHERE[@]}" > /dev/null 2>&1; then
    echo "TPU $TPU_NAME exists in $ZONE; reusing it"
    return
  fi
  local extra=()
  if [[ "${SPOT:-0}" == 1 ]]; then extra+=(--spot); fi
  "${GCLOUD[@]}" create "$TPU_NAME" "${WHERE[@]}" --accelerator-type="$ACCELERATOR_TYPE" \
    --version="$RUNTIME_VERSION" "${extra[@]}"
}

setup() {
  local archive
  archive=$(mktemp -t gptj.XXXXXX.tgz)
  # The working tree as it is here (uncommitted edits included), without local artefacts.
  tar -C "$ROOT" -czf "$archive" --exclude=.git --exclude=.venv --exclude=runs --exclude=.jax_cache \
    --exclude='__pycache__' .
  "${GCLOUD[@]}" scp "$archive" "$TPU_NAME":gptj.tgz "${WHERE[@]}" --worker=all
  rm -f "$archive"
  on_all_workers "set -e; rm -rf ~/$REMOTE_DIR; mkdir -p ~/$REMOTE_DIR; tar -xzf ~/gptj.tgz -C ~/$REMOTE_DIR;
    cd ~/$REMOTE_DIR; python3 -m pip install -q -U pip;
    python3 -m pip install -q -e '.[$PIP_EXTRAS]' 'jax[tpu]' -f https://storage.googleapis.com/jax-releases/libtpu_releases.html"
  if [[ -n "${BUCKET:-}" ]]; then
    # gcsfuse from Google's apt repository, then the bucket at ~/bucket on every worker.
    on_all_workers "set -e; if ! command -v gcsfuse > /dev/null; then
        echo 'deb [signed-by=/usr/share/keyrings/cloud.google.asc] https://packages.cloud.google.com/apt gcsfuse-'\$(lsb_release -cs)' main' | sudo tee /etc/apt/sources.list.d/gcsfuse.list > /dev/null;
        curl -fsSL https://packages.cloud.google.com/apt/doc/apt-key.gpg | sudo tee /usr/share/keyrings/cloud.google.asc > /dev/null;
        sudo apt-get update -q && sudo apt-get install -y -q gcsfuse; fi;
      mkdir -p ~/bucket; mountpoint -q ~/bucket || gcsfuse --implicit-dirs $BUCKET ~/bucket"
  fi
}

run() {
  local args
  args=$(printf '%q ' "$@")
  # Worker id and the worker list from the metadata server; the list's first entry is
  # worker 0 (either "host" or "name:id:ip" entries, depending on the TPU software).
  on_all_workers "set -eo pipefail; cd ~/$REMOTE_DIR;
    md=http://metadata.google.internal/computeMetadata/v1/instance/attributes;
    worker=\$(curl -sf -H 'Metadata-Flavor: Google' \$md/agent-worker-number);
    endpoints=\$(curl -sf -H 'Metadata-Flavor: Google' \$md/worker-network-endpoints);
    count=\$(tr ',' '\n' <<< \"\$endpoints\" | wc -l);
    first=\$(cut -d, -f1 <<< \"\$endpoints\"); coordinator=\${first##*:};
    python3 main.py --coordinator_address=\$coordinator:8476 --num_processes=\$count --process_id=\$worker \
      $args 2>&1 | tee ~/gptj_worker_\$worker.log"
}

command=$1
shift
case "$command" in
  create) create ;;
  setup) setup ;;
  run) run "$@" ;;
  all) create; setup; run "$@" ;;
  ssh) [[ $# -eq 1 ]] || die "usage: $0 ssh 'COMMAND'"; on_all_workers "$1" ;;
  delete) "${GCLOUD[@]}" delete "$TPU_NAME" "${WHERE[@]}" --quiet ;;
  *) die "unknown command '$command'; choose create, setup, run, all, ssh or delete" ;;
esac
