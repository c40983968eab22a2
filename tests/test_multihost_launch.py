"""The TPU-pod and SLURM launch scripts, run against stand-ins for gcloud, curl, srun and scontrol.

Neither cluster is reachable here, so each test puts fake commands first on PATH that
play a 2-worker slice (metadata server included) or a 2-node allocation, and checks the
exact main.py command line every worker would run: coordinator, process count and id,
and the user's flags passed through intact (spaces and quotes included).
"""

import os
import stat
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# A flag whose value needs quoting on its way through ssh and bash -c.
TRICKY = "--config.init_from=mtj:/data/my ckpts/step_383500"


def _stub(bin_dir, name, body):
    path = bin_dir / name
    path.write_text("#!/usr/bin/env bash\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)


def _recorder(bin_dir, name):
    """A fake interpreter that writes its arguments, one per line, and the device ids it was given."""
    _stub(bin_dir, name, 'printf "%s\\n" "$@" > "$RECORD_DIR/args_${RECORD_ID}"\n'
                         'echo "${JAX_LOCAL_DEVICE_IDS:-}" > "$RECORD_DIR/devices_${RECORD_ID}"\n')


def _recorded(record_dir, worker):
    return (record_dir / f"args_{worker}").read_text().splitlines()


def test_tpu_pod_run_starts_main_on_every_worker(tmp_path):
    bin_dir, record_dir = tmp_path / "bin", tmp_path / "record"
    bin_dir.mkdir()
    record_dir.mkdir()
    # gcloud ... ssh NAME --zone=.. --worker=all --command=CMD: run CMD once per worker, each with its own home.
    _stub(bin_dir, "gcloud", """
for arg in "$@"; do case "$arg" in --command=*) command="${arg#--command=}";; esac; done
for worker in 0 1; do
  mkdir -p "$FAKE_HOMES/$worker/gptj"
  HOME="$FAKE_HOMES/$worker" FAKE_WORKER=$worker RECORD_ID=$worker bash -c "$command" || exit $?
done
""")
    _stub(bin_dir, "curl", """
case "${@: -1}" in
  */agent-worker-number) echo -n "$FAKE_WORKER";;
  */worker-network-endpoints) echo -n "t1v-n-1a2b-w-0:0:10.164.0.7,t1v-n-1a2b-w-1:1:10.164.0.8";;
  *) exit 22;;
esac
""")
    _recorder(bin_dir, "python3")
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", TPU_NAME="pod", ZONE="europe-west4-a",
               FAKE_HOMES=str(tmp_path / "homes"), RECORD_DIR=str(record_dir))
    done = subprocess.run(["bash", "launch/tpu_pod.sh", "run", "--config=gptj/configs/gptj_6b.py",
                           "--workdir=/home/me/bucket/run", TRICKY], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    for worker in (0, 1):
        assert _recorded(record_dir, worker) == [
            "main.py", "--coordinator_address=10.164.0.7:8476", "--num_processes=2", f"--process_id={worker}",
            "--config=gptj/configs/gptj_6b.py", "--workdir=/home/me/bucket/run", TRICKY]
        assert (tmp_path / "homes" / str(worker) / f"gptj_worker_{worker}.log").exists()


def test_tpu_pod_refuses_bad_usage(tmp_path):
    env = dict(os.environ, TPU_NAME="pod", ZONE="z")
    done = subprocess.run(["bash", "launch/tpu_pod.sh", "launch"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert done.returncode == 2 and "unknown command 'launch'" in done.stderr
    env.pop("TPU_NAME")
    done = subprocess.run(["bash", "launch/tpu_pod.sh", "run"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert done.returncode != 0 and "TPU_NAME" in done.stderr


def test_slurm_starts_one_process_per_node_with_all_its_gpus(tmp_path):
    bin_dir, record_dir = tmp_path / "bin", tmp_path / "record"
    bin_dir.mkdir()
    record_dir.mkdir()
    _stub(bin_dir, "scontrol", 'echo gpu-node7; echo gpu-node8\n')
    # srun [options] COMMAND...: one task per node, SLURM_PROCID set as SLURM does.
    _stub(bin_dir, "srun", """
while [[ "$1" == --* ]]; do shift; done
for rank in 0 1; do SLURM_PROCID=$rank RECORD_ID=$rank "$@" || exit $?; done
""")
    _recorder(bin_dir, "fakepython")
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", SLURM_JOB_ID="98765",
               SLURM_JOB_NODELIST="gpu-node[7-8]", SLURM_JOB_NUM_NODES="2", SLURM_GPUS_ON_NODE="4",
               SLURM_SUBMIT_DIR=ROOT, PYTHON="fakepython", RECORD_DIR=str(record_dir))
    done = subprocess.run(["bash", os.path.join(ROOT, "launch", "slurm_gpu.sh"), "--config=gptj/configs/gptj_6b.py", TRICKY],
                          cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    port = 20000 + 98765 % 20000
    for rank in (0, 1):
        assert _recorded(record_dir, rank) == [
            "main.py", f"--coordinator_address=gpu-node7:{port}", "--num_processes=2", f"--process_id={rank}",
            "--config=gptj/configs/gptj_6b.py", TRICKY]
        assert (record_dir / f"devices_{rank}").read_text().strip() == "0,1,2,3"

    outside = {k: v for k, v in env.items() if k != "SLURM_JOB_ID"}
    done = subprocess.run(["bash", "launch/slurm_gpu.sh"], cwd=ROOT, env=outside, capture_output=True, text=True)
    assert done.returncode == 2 and "sbatch" in done.stderr
