"""Checkpoints that survive the disk: damage is named and set aside, a full disk is one line, nothing is lost.

Every run here is the generic driver (`train_in_workdir`, what gptj.train runs) on the
cached tiny trainer and synthetic data, checkpointing every 2 steps. The module's
fixture trains to step 4 (checkpoints 2 and 4) and, as the reference, resumes an
undamaged copy holding only step 2 to step 6: a damaged step 4 must end in exactly
those weights.
"""

import errno
import glob
import json
import os
import re
import shutil

import jax
import numpy as np
import pytest
from checkpoint_utils import assert_same, damage, train
from orbax.checkpoint._src.serialization import serialization
from trainer_utils import cached_trainer, tiny_config, to_numpy

from gptj.core import checkpoint, integrity
from gptj.errors import CheckpointDamagedError, CheckpointError, StorageError
from gptj.core.trainer import Hook
from gptj.model.transformer import GPTJConfig
from gptj.weights import params_dir as params_io
from gptj.weights.params_dir import load_params, save_params
from gptj.errors import WeightsError


def _warnings(caplog, text):
    return [r.getMessage() for r in caplog.records if text in r.getMessage()]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("integrity")
    assert train(base / "run", 4).status == "completed"
    assert checkpoint.Checkpointer(str(base / "run"), read_only=True).all_steps() == [2, 4]
    reference = base / "reference"
    shutil.copytree(base / "run", reference)
    shutil.rmtree(reference / "checkpoints" / "4")
    final = train(reference, 6)
    assert final.step == 6
    return {"run": base / "run", "final": to_numpy(final.state)}


def _copy(runs, tmp_path):
    workdir = tmp_path / "run"
    shutil.copytree(runs["run"], workdir)
    return workdir


@pytest.mark.parametrize("how", ["zeroed", "truncated", "deleted", "stale"])
def test_damaged_newest_checkpoint_is_named_set_aside_and_the_run_resumes_from_the_previous(runs, tmp_path, caplog,
                                                                                            how):
    workdir = _copy(runs, tmp_path)
    damage(workdir / "checkpoints" / "4", how)
    result = train(workdir, 6)
    assert result.status == "completed" and result.step == 6
    assert_same(result.state, runs["final"])  # as if step 4 had never been written
    (line,) = _warnings(caplog, "is damaged")
    kind = "checksum mismatch" if how == "stale" else "(checksum mismatch|unreadable)"
    assert re.fullmatch(rf"{workdir}/checkpoints/4 is damaged: train_state/\S+: {kind} .*; "
                        rf"set aside as {workdir}/checkpoints/4.damaged; resuming from step 2", line), line
    assert (workdir / "checkpoints" / "4.damaged").is_dir()  # kept, for whoever wants to look
    assert checkpoint.Checkpointer(str(workdir), read_only=True).all_steps() == [2, 4, 6]


def test_without_fallback_damage_is_a_one_line_error_and_nothing_moves(runs, tmp_path):
    workdir = _copy(runs, tmp_path)
    damage(workdir / "checkpoints" / "4", "zeroed")
    with pytest.raises(CheckpointDamagedError) as error:
        train(workdir, 6, resume_fallback=False)
    message = str(error.value)
    assert "\n" not in message and message.startswith(f"{workdir}/checkpoints/4 is damaged: train_state/")
    assert "train.resume_fallback is off" in message
    assert sorted(os.listdir(workdir / "checkpoints")) == ["2", "4"]


def test_resume_step_picks_an_older_checkpoint_and_sets_the_newer_aside(runs, tmp_path):
    workdir = _copy(runs, tmp_path)
    result = train(workdir, 6, resume_step=2)
    assert_same(result.state, runs["final"])
    assert (workdir / "checkpoints" / "4.superseded").is_dir()
    with pytest.raises(CheckpointError, match=r"no checkpoint at step 3 \(steps: 2, 4, 6\)"):
        train(workdir, 8, resume_step=3)


def test_inference_reads_are_checked_and_name_the_intact_step(runs, tmp_path):
    workdir = _copy(runs, tmp_path)
    damage(workdir / "checkpoints" / "4", "zeroed", item="params")
    with pytest.raises(WeightsError) as error:
        load_params(str(workdir))
    message = str(error.value)
    assert "\n" not in message and message.startswith(f"{workdir}/checkpoints/4 is damaged: params/"), message
    assert message.endswith(f"intact: step 2 (pass {workdir}/checkpoints/2 instead of {workdir})"), message
    # That step directory is a weights path of its own; cast on read, it is still checked array by array.
    params, model = load_params(str(workdir / "checkpoints" / "2"), dtype="bfloat16")
    assert model.d_model == 32 and params["wte"].dtype == np.dtype("bfloat16")
    state, _ = checkpoint.Checkpointer(str(workdir), read_only=True).restore(cached_trainer().abstract_state, step=2)
    assert_same(params, jax.tree_util.tree_map(lambda x: x.astype("bfloat16"), state["params"]))


def test_params_directory_has_the_same_checks(tmp_path):
    params = cached_trainer("single").init_state(1)["params"]
    config = GPTJConfig.from_dict(tiny_config().model.to_dict())
    save_params(str(tmp_path / "p"), params, config)
    assert_same(load_params(str(tmp_path / "p"))[0], params)
    manifest = json.loads((tmp_path / "p" / "integrity" / "metadata").read_text())
    assert set(manifest["items"]["params"]) == set(integrity.leaf_names(params, "params/"))

    # Data that reads back without complaint but is not what was saved (here: another save's tree under this
    # manifest, as a mixed-up copy or silent bit rot would give): only the checksums can tell.
    save_params(str(tmp_path / "other"), cached_trainer("single").init_state(2)["params"], config)
    shutil.copytree(tmp_path / "p", tmp_path / "mixed")
    shutil.rmtree(tmp_path / "mixed" / "params")
    shutil.copytree(tmp_path / "other" / "params", tmp_path / "mixed" / "params")
    first = integrity.leaf_names(params, "params/")[0]
    with pytest.raises(WeightsError, match=rf"^{tmp_path}/mixed is damaged: {first}: checksum mismatch "
                                           r"\(saved [0-9a-f]{8}, read [0-9a-f]{8}\); nothing was read from it$"):
        load_params(str(tmp_path / "mixed"))
    shutil.copytree(tmp_path / "p", tmp_path / "zeroed")
    damage(str(tmp_path / "zeroed"), "zeroed", item="params")
    with pytest.raises(WeightsError, match=rf"^{tmp_path}/zeroed is damaged: params/\S+: "
                                           "(checksum mismatch|unreadable) .*; nothing was read from it$"):
        load_params(str(tmp_path / "zeroed"))
    shutil.copytree(tmp_path / "p", tmp_path / "no_manifest")
    os.remove(tmp_path / "no_manifest" / "integrity" / "metadata")
    with pytest.raises(WeightsError, match="no_manifest is damaged: checksum manifest: missing"):
        load_params(str(tmp_path / "no_manifest"))
    # Another model's shapes: not damage (nothing would be set aside), a plain error.
    other = params_io.abstract_params_like(config.replace(d_model=64, num_heads=8))
    with pytest.raises(CheckpointError, match=r"does not fit this model/optimizer: params/\S+ is saved with shape") \
            as error:
        integrity.restore_verified(str(tmp_path / "p"), {"params": other})
    assert not isinstance(error.value, CheckpointDamagedError)


class _Capture(Hook):
    """Keeps a host copy of the state at one step."""

    def __init__(self, step):
        self.step, self.state = step, None

    def on_step(self, step, state, metrics):
        if step == self.step:
            self.state = to_numpy(state)


def test_full_disk_is_one_line_keeps_the_last_checkpoint_and_the_next_run_cleans_up(tmp_path, monkeypatch,
                                                                                    caplog):
    workdir = tmp_path / "run"
    real_write = serialization.async_serialize_from_host

    async def disk_full_at_step_4(rslices, tensorstore_spec, **kwargs):
        if "/4.orbax-checkpoint-tmp" in json.dumps(tensorstore_spec):
            raise OSError(errno.ENOSPC, "No space left on device", str(workdir))
        return await real_write(rslices, tensorstore_spec, **kwargs)

    monkeypatch.setattr(serialization, "async_serialize_from_host", disk_full_at_step_4)
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(checkpoint.shutil, "disk_usage", lambda path: usage._replace(free=0))
    capture = _Capture(2)
    with pytest.raises(StorageError) as error:
        train(workdir, 4, extra_hooks=lambda context: [capture])
    assert re.fullmatch(rf"no space left in {workdir}/checkpoints: the checkpoint needs ~\d+ MiB, 0 MiB free",
                        str(error.value)), str(error.value)
    assert len(_warnings(caplog, "MiB free in")) == 1  # warned once, at the first save
    stale = glob.glob(str(workdir / "checkpoints" / "4.orbax-checkpoint-tmp*"))
    assert stale
    state, data = checkpoint.Checkpointer(str(workdir), read_only=True).restore(cached_trainer().abstract_state)
    assert int(state["step"]) == 2 and data == {"index": 2}
    assert_same(state, capture.state)

    monkeypatch.undo()  # space again
    caplog.clear()
    result = train(workdir, 4)
    assert result.status == "completed" and checkpoint.latest_step(str(workdir)) == 4
    assert _warnings(caplog, f"removed {stale[0]}")
    assert not glob.glob(str(workdir / "checkpoints" / "*tmp*"))
