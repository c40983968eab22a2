"""The command line on a damaged checkpoint or a refused path: one line, a non-zero exit, nothing written.

Subprocesses, because the exit status and what reaches the terminal are what is under test;
they run side by side.
"""

import os
import subprocess
import sys

import pytest
from checkpoint_utils import damage, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_damage_and_refused_paths_are_one_line_errors(tmp_path):
    workdir = tmp_path / "run"
    train(workdir, 4)  # checkpoints 2 and 4
    damage(str(workdir / "checkpoints" / "4"), "zeroed", item="params")
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    main = [sys.executable, os.path.join(ROOT, "main.py"), "--config=gptj/configs/tiny.py"]
    convert = [sys.executable, "-m", "gptj.convert"]
    cases = {  # name: (command, exit status, what the error names)
        "sample": (main + [f"--workdir={workdir}", "--mode=sample", "--prompt=hi", f"--output={tmp_path}/out.jsonl"],
                   1, "damaged"),
        "eval": (main + [f"--workdir={workdir}", "--mode=eval"], 1, "damaged"),
        "to_hf": (convert + ["to_hf", f"--workdir={workdir}", f"--out={tmp_path}/hf"], 2, "damaged"),
        "slim, verbose": (convert + ["--verbosity=1", "slim", f"--workdir={workdir}", f"--out={tmp_path}/slim"], 2,
                          "damaged"),
        "train under a file": (main + [f"--workdir={blocker}/run", "--config.train.total_steps=1"], 1,
                               f"cannot write {blocker}/run/config.json: "),
    }
    env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3")
    running = {name: subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True) for name, (command, _, _) in cases.items()}
    for name, process in running.items():
        _, stderr = process.communicate(timeout=600)
        _, status, named = cases[name]
        assert process.returncode == status, (name, stderr[-3000:])
        lines = stderr.strip().splitlines()
        # --verbosity=1 shows libraries' own shutdown noise (e.g. an asyncio loop closed) after the error line.
        last = [line for line in lines if line.startswith("error:")][-1] if name.endswith("verbose") else lines[-1]
        if named == "damaged":
            assert last.startswith(f"error: {workdir}/checkpoints/4 is damaged: params/"), (name, last)
            assert last.endswith(f"intact: step 2 (pass {workdir}/checkpoints/2 instead of {workdir})"), (name, last)
        else:
            assert last.startswith(f"error: {named}"), (name, last)
        assert ("Traceback" in stderr) == name.endswith("verbose"), (name, stderr[-3000:])
        assert "TensorStore({" not in stderr or name.endswith("verbose"), (name, stderr[-3000:])
    for written in ("out.jsonl", "hf", "slim", "run/eval"):
        assert not (tmp_path / written).exists(), written
