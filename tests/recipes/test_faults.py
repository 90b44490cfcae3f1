"""Fault handling: divergence (NaN/inf) stops, the CSV log across resumes, damaged checkpoints, fsync before rename,
permissions of exports and checkpoints, and leftovers of killed data-cache builds."""

from __future__ import annotations

import csv
import errno
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from lightning.fabric import Fabric
from omegaconf import OmegaConf
from safetensors.torch import load_file

from nemo_aligner.utils.checkpoint import CheckpointManager, DamagedCheckpointError, NonFiniteError, checkpoint_problem
from nemo_aligner.utils.logging import trim_csv_log

from tests.helpers import REPO, dpo_cfg, load_example_script, write_pairs

DPO_SCRIPT = REPO / "examples" / "nlp" / "gpt" / "train_gpt_dpo.py"


@pytest.fixture(scope="module")
def dpo_script():
    return load_example_script("train_gpt_dpo")


@pytest.fixture
def log_records():
    """Messages of the ``nemo_aligner`` logger during the test (it does not propagate to the root logger)."""
    records: list[str] = []

    class _Collect(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())

    handler = _Collect()
    logger = logging.getLogger("nemo_aligner")
    logger.addHandler(handler)
    yield records
    logger.removeHandler(handler)


def _finite_state(path: Path) -> bool:
    """Whether every floating tensor of a ``state.pt`` model state is finite."""
    state = torch.load(path / "state.pt", map_location="cpu", weights_only=False)
    tensors = [t for t in state["model"].values() if torch.is_tensor(t) and t.is_floating_point()]
    return bool(tensors) and all(bool(torch.isfinite(t).all()) for t in tensors)


def _csv_rows(run_dir: Path) -> list[dict]:
    return list(csv.DictReader(open(run_dir / "csv" / "metrics.csv", newline="")))


def _train_steps(rows: list[dict]) -> list[int]:
    return [int(r["step"]) for r in rows if r.get("train/loss")]


# ---- item 14: NaN/inf stops the run ---------------------------------------------------------------------------
DIVERGING = ["trainer.dpo.max_epochs=4", "trainer.dpo.max_steps=4", "model.global_batch_size=4",
             "model.micro_batch_size=2", "model.optim.lr=1e10", "trainer.dpo.save_interval=1",
             "exp_manager.checkpoint_callback_params.save_top_k=1", "model.data.data_prefix.validation=null"]


def test_dpo_nan_without_clipping_stops_with_a_clear_error_and_keeps_the_good_checkpoint(tmp_path, tiny_model_dir):
    """lr=1e10 without clipping: step 2's loss is NaN. The CLI stops with one ``error:`` line naming the step (exit
    2, no traceback), writes no export, and the step-1 checkpoint (the only finite one) survives save_top_k=1."""
    data = write_pairs(tmp_path / "pairs.jsonl", n=16)
    run_dir = tmp_path / "run"
    cmd = [sys.executable, str(DPO_SCRIPT), f"pretrained_checkpoint.restore_from_path={tiny_model_dir}",
           f"model.data.data_prefix.train=[{data}]", f"model.data.cache_dir={tmp_path / 'cache'}",
           f"exp_manager.explicit_log_dir={run_dir}", "trainer.accelerator=cpu", "model.encoder_seq_length=64",
           "trainer.dpo.gradient_clip_val=0", *DIVERGING]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert "error: training stopped at DPO step 2/4: non-finite training values at optimizer step 2 (loss nan" in proc.stderr
    assert "step=0000001, is kept" in proc.stderr
    kept = sorted(p.name for p in (run_dir / "checkpoints").iterdir() if not p.name.startswith("."))
    assert kept == ["step=0000001"]
    assert _finite_state(run_dir / "checkpoints" / "step=0000001")
    assert not (run_dir / "hf_export").exists()
    assert [r["train/loss"] for r in _csv_rows(run_dir) if r.get("train/loss")] == ["0.6931471824645996"]

    # a resume starts from the finite checkpoint and stops at the same step again (it never trains on NaN weights)
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert again.returncode == 2 and "resumed from" in again.stderr and "DPO step 2/4" in again.stderr


def test_dpo_nan_with_clipping_is_the_same_clear_stop(tmp_path, tiny_model_dir, dpo_script):
    """With gradient clipping on, the non-finite norm used to be torch's traceback from clip_grad_norm_."""
    data = write_pairs(tmp_path / "pairs.jsonl", n=16)
    cfg = dpo_cfg(tmp_path, tiny_model_dir, data, data, "trainer.dpo.gradient_clip_val=1.0", *DIVERGING)
    with pytest.raises(NonFiniteError, match=r"training stopped at DPO step 2/4: non-finite .* at optimizer step 2"):
        dpo_script.run(cfg)
    checkpoints = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir() if not p.name.startswith(".")) == ["step=0000001"]
    assert _finite_state(checkpoints / "step=0000001")


# ---- issue 25: a full or read-only disk at a checkpoint, the export or the data cache ------------------------------
DISK_ERRORS = [(errno.ENOSPC, "no space left on the device (errno 28)"),
               (errno.EROFS, "read-only file system (errno 30)")]


def _refuse_writes(monkeypatch, errno_, match):
    """``os.replace`` (how checkpoints, exports and cache entries are put into place) fails as a full or read-only
    disk does for any destination whose name ``match`` accepts (chmod does not stop root, so it is simulated)."""
    real = os.replace

    def replace(src, dst):
        if match(Path(dst)):
            raise OSError(errno_, os.strerror(errno_), str(src), None, str(dst))
        return real(src, dst)

    monkeypatch.setattr(os, "replace", replace)


@pytest.mark.parametrize("errno_, reason", DISK_ERRORS, ids=["ENOSPC", "EROFS"])
def test_a_disk_error_at_a_checkpoint_is_one_line_and_keeps_the_last_good_one(tmp_path, tiny_model_dir, dpo_script,
                                                                             monkeypatch, errno_, reason):
    """Was an OSError traceback. The step-2 save fails with a one-line user error (DiskError: run_or_exit prints it
    and exits 2); the step-1 checkpoint stays valid and the same command, rerun once the disk is fixed, resumes
    from it."""
    from nemo_aligner.errors import DiskError, UserError

    data = write_pairs(tmp_path / "pairs.jsonl", n=8)
    common = ["trainer.dpo.max_epochs=3", "trainer.dpo.max_steps=3", "model.global_batch_size=4",
              "model.micro_batch_size=4", "model.optim.lr=1e-3", "trainer.dpo.save_interval=1",
              "trainer.dpo.val_check_interval=0", "exp_manager.checkpoint_callback_params.save_top_k=-1",
              "exp_manager.export_hf=false", "model.data.data_prefix.validation=null"]
    checkpoints = tmp_path / "run" / "checkpoints"
    _refuse_writes(monkeypatch, errno_, lambda dst: dst.name == "step=0000002")
    with pytest.raises(DiskError) as err:
        dpo_script.run(dpo_cfg(tmp_path, tiny_model_dir, data, data, *common))
    assert isinstance(err.value, UserError) and "\n" not in str(err.value)
    assert str(err.value) == (f"cannot write checkpoint {checkpoints / 'step=0000002'}: {reason}. Free space on that "
                              f"disk or make {checkpoints} writable, or point exp_manager.explicit_log_dir at another "
                              f"disk; the last good checkpoint, {checkpoints / 'step=0000001'}, is kept: rerun the "
                              "same command to resume from it")
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step=0000001"]  # no half-written temporary left
    assert checkpoint_problem(checkpoints / "step=0000001") is None

    monkeypatch.undo()
    out = dpo_script.run(dpo_cfg(tmp_path, tiny_model_dir, data, data, *common))
    assert len(out["history"]) == 2  # steps 2 and 3, from step 1's checkpoint
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step=0000001", "step=0000002", "step=0000003"]


def test_a_full_disk_at_the_export_is_one_line(tmp_path, tiny_model_dir, dpo_script, monkeypatch):
    from nemo_aligner.errors import DiskError

    data = write_pairs(tmp_path / "pairs.jsonl", n=4)
    _refuse_writes(monkeypatch, errno.ENOSPC, lambda dst: dst.name == "hf_export")
    cfg = dpo_cfg(tmp_path, tiny_model_dir, data, data, "trainer.dpo.max_steps=1", "model.global_batch_size=4",
                  "model.micro_batch_size=4", "model.data.data_prefix.validation=null")
    with pytest.raises(DiskError, match=r"^cannot write the Hugging Face export .*hf_export: no space left on the "
                                        r"device \(errno 28\)\. .*the last good checkpoint, .*step=0000001, is kept"):
        dpo_script.run(cfg)
    assert not (tmp_path / "run" / "hf_export").exists()
    assert checkpoint_problem(tmp_path / "run" / "checkpoints" / "step=0000001") is None


def _policy(tiny_model_dir, lr=1e-2, gradient_clip_val=1.0):
    from nemo_aligner.models.hf_causal_lm import HFCausalLM

    cfg = OmegaConf.create({"optim": {"name": "adamw", "lr": lr, "sched": {}}, "peft": {"peft_scheme": "none"}})
    return HFCausalLM(Fabric(accelerator="cpu", devices=1), cfg, str(tiny_model_dir), max_steps=10,
                      gradient_clip_val=gradient_clip_val)


def _weights(model):
    return {k: v.detach().clone() for k, v in model.module.state_dict().items()}


def test_a_non_finite_loss_skips_the_optimizer_step(tiny_model_dir, tokenizer):
    """An inf loss (finite gradients) is caught as well: no optimizer or schedule step, weights unchanged."""
    from nemo_aligner.data.preference_batch import collate_preference_pairs

    ids = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    batch = collate_preference_pairs(
        [{"prompt_ids": [1] + ids("Human: tea?"), "chosen_ids": ids(" yes") + [2], "rejected_ids": ids(" no") + [2]}],
        pad_token_id=0,
    )
    policy = _policy(tiny_model_dir)
    before = _weights(policy)
    policy.prepare_for_training_step()
    with policy.accumulate(is_last=True):
        loss = -policy.get_logprobs(batch).mean()
        policy.backward(loss + float("inf"))  # d(loss + inf)/dw is finite
    with pytest.raises(NonFiniteError, match=r"optimizer step 1 \(loss inf, gradient norm \d"):
        policy.finish_training_step()
    assert all(torch.equal(before[k], v) for k, v in _weights(policy).items())
    assert policy.scheduler.last_epoch == 0 and len(policy.optimizer.state) == 0
    assert all(p.grad is None for p in policy.module.parameters())
    # the next, finite step trains normally
    policy.prepare_for_training_step()
    with policy.accumulate(is_last=True):
        policy.backward(-policy.get_logprobs(batch).mean())
    assert policy.finish_training_step()["grad_norm"] > 0 and policy.scheduler.last_epoch == 1


@pytest.mark.parametrize("clip, hint", [
    (1.0, "Lower model.optim.lr (gradient clipping is already on, gradient_clip_val=1), or look for bad data"),
    (0.0, "Lower model.optim.lr or set the trainer's gradient_clip_val (e.g. 1.0; clipping is off), or look for bad"),
])
def test_the_non_finite_stop_suggests_clipping_only_when_it_is_off(tiny_model_dir, tokenizer, clip, hint):
    """Issue 25: the stop told the user to "set the trainer's gradient_clip_val" with clipping already on."""
    from nemo_aligner.data.preference_batch import collate_preference_pairs

    ids = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    batch = collate_preference_pairs(
        [{"prompt_ids": [1] + ids("Human: tea?"), "chosen_ids": ids(" yes") + [2], "rejected_ids": ids(" no") + [2]}],
        pad_token_id=0,
    )
    policy = _policy(tiny_model_dir, gradient_clip_val=clip)
    policy.prepare_for_training_step()
    with policy.accumulate(is_last=True):
        policy.backward(-policy.get_logprobs(batch).mean() * float("nan"))
    with pytest.raises(NonFiniteError) as err:
        policy.finish_training_step()
    assert hint in str(err.value)
    assert ("set the trainer's gradient_clip_val" in str(err.value)) == (clip == 0)
    with torch.no_grad():
        next(policy.module.parameters())[0].fill_(float("nan"))
    with pytest.raises(NonFiniteError) as err:
        policy.export_hf("/nonexistent/never-written")
    assert ("set the trainer's gradient_clip_val" in str(err.value)) == (clip == 0)


def test_non_finite_weights_are_never_saved_or_exported(tmp_path, tiny_model_dir):
    policy = _policy(tiny_model_dir)
    good = tmp_path / "step=0000001"
    policy.save_checkpoint(str(good), {"step": 1})
    with torch.no_grad():
        next(policy.module.parameters())[0].fill_(float("nan"))
    with pytest.raises(NonFiniteError, match=r"not writing checkpoint .*step=0000002: the weights hold \d+ non-finite"):
        policy.save_checkpoint(str(tmp_path / "step=0000002"), {"step": 2})
    with pytest.raises(NonFiniteError, match="not writing the Hugging Face export"):
        policy.export_hf(str(tmp_path / "hf_export"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step=0000001"]
    assert _finite_state(good)


def test_critic_stops_on_an_infinite_return(tmp_path, tiny_model_dir):
    """The PPO critic goes through the same optimizer step: an infinite GAE return stops it, weights unchanged."""
    from nemo_aligner.algorithms.ppo import update_critic
    from nemo_aligner.data.rollouts import Rollouts
    from nemo_aligner.models.critic import HFCritic
    from nemo_aligner.utils.runtime import build_fabric

    fabric = build_fabric(OmegaConf.create({"accelerator": "cpu", "devices": 1}), seed=5)
    critic = HFCritic(fabric, OmegaConf.create({"optim": {"name": "adamw", "lr": 1e-2, "sched": {}}}),
                      str(tiny_model_dir), max_steps=4)
    before = _weights(critic)
    rollouts = Rollouts.from_lists([[1, 5]], [[9, 12, 7]], values=[[0.0, 0.1, 0.2]], returns=[[1.0, float("inf"), 0.0]])
    with pytest.raises(NonFiniteError, match="non-finite training values at optimizer step 1"):
        update_critic(critic, rollouts, global_batch_size=1, micro_batch_size=1)
    assert all(torch.equal(before[k], v) for k, v in _weights(critic).items())


# ---- item 15: the CSV log across resumes ----------------------------------------------------------------------
def test_resume_appends_to_the_csv_log_and_drops_rows_after_the_checkpoint(tmp_path, tiny_model_dir, dpo_script):
    data = write_pairs(tmp_path / "pairs.jsonl", n=8)
    common = ["trainer.dpo.max_epochs=6", "model.global_batch_size=4", "model.micro_batch_size=4",
              "model.optim.lr=1e-3", "trainer.dpo.save_interval=2", "trainer.dpo.val_check_interval=2",
              "exp_manager.export_hf=false"]
    dpo_script.run(dpo_cfg(tmp_path, tiny_model_dir, data, data, *common, "trainer.dpo.max_steps=4"))
    run_dir = tmp_path / "run"
    assert _train_steps(_csv_rows(run_dir)) == [1, 2, 3, 4]
    # the same run, killed after it logged steps 5-6 but before step 6's checkpoint
    killed = tmp_path / "killed"
    shutil.copytree(run_dir, killed / "run")
    with open(killed / "run" / "csv" / "metrics.csv", "a", newline="") as f:
        header = next(csv.reader(open(run_dir / "csv" / "metrics.csv", newline="")))
        writer = csv.DictWriter(f, fieldnames=header)
        writer.writerows([{"step": s, "train/loss": 123.0} for s in (5, 6)])

    resumed = dpo_script.run(dpo_cfg(tmp_path, tiny_model_dir, data, data, *common, "trainer.dpo.max_steps=6"))
    rows = _csv_rows(run_dir)
    assert _train_steps(rows) == [1, 2, 3, 4, 5, 6]
    assert [int(r["step"]) for r in rows if r.get("val/loss")] == [2, 4, 6]
    losses = {int(r["step"]): float(r["train/loss"]) for r in rows if r.get("train/loss")}
    assert losses[5] == pytest.approx(resumed["history"][0]["loss"])

    dpo_script.run(dpo_cfg(killed, tiny_model_dir, data, data, *common, "trainer.dpo.max_steps=6"))
    killed_rows = _csv_rows(killed / "run")
    assert _train_steps(killed_rows) == [1, 2, 3, 4, 5, 6]
    assert all(float(r["train/loss"]) != 123.0 for r in killed_rows if r.get("train/loss"))
    killed_losses = {int(r["step"]): float(r["train/loss"]) for r in killed_rows if r.get("train/loss")}
    assert killed_losses == pytest.approx(losses)


def test_trim_csv_log_keeps_rows_up_to_the_step(tmp_path):
    path = tmp_path / "csv" / "metrics.csv"
    path.parent.mkdir()
    path.write_text("step,train/loss,val/loss\r\n1,0.5,\r\n2,0.4,0.3\r\n3,0.2,\r\n")
    assert trim_csv_log(tmp_path, 2) == 1
    assert path.read_bytes() == b"step,train/loss,val/loss\r\n1,0.5,\r\n2,0.4,0.3\r\n"
    assert trim_csv_log(tmp_path, 2) == 0
    assert trim_csv_log(tmp_path, -1) == 2 and not path.exists()  # a fresh run starts a new log


# ---- item 21: damaged checkpoints, fsync ----------------------------------------------------------------------
def _damage(checkpoint: Path, how: str) -> None:
    if how == "meta_missing":
        (checkpoint / "meta.json").unlink()
    elif how == "meta_garbage":
        (checkpoint / "meta.json").write_text('{"step": 3, "consumed')
    elif how == "state_truncated":
        state = checkpoint / "state.pt"
        data = state.read_bytes()
        state.write_bytes(data[: len(data) // 2])
    elif how == "state_empty":
        (checkpoint / "state.pt").write_bytes(b"")


@pytest.fixture(scope="module")
def three_step_run(tmp_path_factory, tiny_model_dir):
    """A DPO run of 3 steps with a checkpoint after each (all kept) and its per-step losses."""
    tmp = tmp_path_factory.mktemp("three_steps")
    data = write_pairs(tmp / "pairs.jsonl", n=8)
    common = ["trainer.dpo.max_epochs=3", "trainer.dpo.max_steps=3", "model.global_batch_size=4",
              "model.micro_batch_size=2", "model.optim.lr=1e-3", "trainer.dpo.save_interval=1",
              "trainer.dpo.val_check_interval=0", "exp_manager.checkpoint_callback_params.save_top_k=-1",
              "exp_manager.export_hf=false", "model.optim.sched.warmup_steps=1"]
    out = load_example_script("train_gpt_dpo").run(dpo_cfg(tmp, tiny_model_dir, data, data, *common))
    return tmp, data, common, [h["loss"] for h in out["history"]]


@pytest.mark.parametrize("how", ["meta_missing", "meta_garbage", "state_truncated", "state_empty"])
def test_damaged_latest_checkpoint_falls_back_to_the_previous_one(tmp_path, tiny_model_dir, dpo_script, log_records,
                                                                  three_step_run, how):
    source, data, common, losses = three_step_run
    shutil.copytree(source / "run", tmp_path / "run")
    damaged = tmp_path / "run" / "checkpoints" / "step=0000003"
    _damage(damaged, how)
    assert checkpoint_problem(damaged) is not None
    out = dpo_script.run(dpo_cfg(tmp_path, tiny_model_dir, data, data, *common))
    assert any(f"checkpoint {damaged} is damaged" in m and "step=0000002 instead" in m for m in log_records)
    assert len(out["history"]) == 1  # step 3 trained again from step 2's exact state
    assert out["history"][0]["loss"] == pytest.approx(losses[2], abs=1e-6)
    assert checkpoint_problem(damaged) is None  # and re-saved


def test_no_valid_checkpoint_is_a_clear_error(tmp_path, tiny_model_dir, dpo_script, three_step_run):
    source, data, common, _ = three_step_run
    shutil.copytree(source / "run", tmp_path / "run")
    for step in (1, 2, 3):
        _damage(tmp_path / "run" / "checkpoints" / f"step={step:07d}", "meta_garbage")
    with pytest.raises(DamagedCheckpointError, match=r"no valid checkpoint in .*step=0000003: meta.json is not valid"):
        dpo_script.run(dpo_cfg(tmp_path, tiny_model_dir, data, data, *common))


def test_checkpoint_manager_skips_damaged_checkpoints(tmp_path):
    manager = CheckpointManager(tmp_path, save_top_k=1)
    for step in (1, 2):
        path = manager.path_for(step)
        path.mkdir()
        torch.save({"x": torch.ones(2)}, path / "state.pt")
        (path / "meta.json").write_text(json.dumps({"step": step}))
    (manager.path_for(2) / "meta.json").write_text("")
    assert manager.latest() == manager.path_for(1)
    assert [(p.name, problem[:24]) for p, problem in manager.damaged()] == [("step=0000002", "meta.json is not valid J")]
    manager.prune()
    assert manager.path_for(2).is_dir()  # a damaged checkpoint is left for inspection


def test_checkpoints_and_exports_are_fsynced_before_the_rename(tmp_path, tiny_model_dir, monkeypatch):
    """Every file of the new checkpoint / export and its directory reach the disk before the rename; the parent
    directory (the rename itself) after it."""
    policy = _policy(tiny_model_dir)
    events: list[tuple[str, str]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", str(dst)))
        return real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    final = tmp_path / "checkpoints" / "step=0000001"
    policy.save_checkpoint(str(final), {"step": 1})
    rename = events.index(("replace", str(final)))
    before = {Path(p).name for kind, p in events[:rename] if kind == "fsync"}
    after = [p for kind, p in events[rename:] if kind == "fsync"]
    assert {"state.pt", ".step=0000001.tmp"} <= before
    assert any(name.startswith(".meta.json.tmp-") for name in before)  # meta.json is itself written atomically
    assert str(final.parent) in after

    events.clear()
    export = tmp_path / "hf_export"
    policy.export_hf(str(export))
    rename = events.index(("replace", str(export)))
    before = {Path(p).name for kind, p in events[:rename] if kind == "fsync"}
    assert {"model.safetensors", "config.json", "tokenizer.json"} <= before
    assert any(name.startswith(".hf_export.tmp-") for name in before)
    assert str(tmp_path) in [p for kind, p in events[rename:] if kind == "fsync"]


# ---- item 22: permissions, leftovers of killed data-cache builds -----------------------------------------------
def test_exports_and_checkpoints_are_readable_by_others_under_umask_022(tmp_path, tiny_model_dir):
    old = os.umask(0o022)
    try:
        policy = _policy(tiny_model_dir)
        policy.export_hf(str(tmp_path / "hf_export"))
        policy.save_checkpoint(str(tmp_path / "step=0000001"), {"step": 1})
    finally:
        os.umask(old)
    for directory in (tmp_path / "hf_export", tmp_path / "step=0000001"):
        assert oct(directory.stat().st_mode & 0o777) == "0o755", directory
        files = [p for p in directory.iterdir() if p.is_file()]
        assert files and {p.name: oct(p.stat().st_mode & 0o777) for p in files} == {p.name: "0o644" for p in files}
    assert load_file(tmp_path / "hf_export" / "model.safetensors")  # still a valid export


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_stale_cache_temporaries_are_cleaned_and_live_ones_kept(tmp_path, tokenizer):
    import socket

    from nemo_aligner.data import cache
    from nemo_aligner.data.preference import load_preference_datasets

    root = tmp_path / "cache"
    root.mkdir()
    here = {"host": socket.gethostname(), "pid_namespace": cache._pid_namespace()}
    day_ago = time.time() - 2 * cache.STALE_AFTER_S

    def make(name, owner=None, mtime=None):
        path = root / name
        (path / "generator").mkdir(parents=True)
        (path / "generator" / "part.arrow").write_bytes(b"x")
        if owner is not None:
            (path / cache.OWNER_FILE).write_text(json.dumps(owner))
        if mtime is not None:
            for p in (path / "generator" / "part.arrow", path / "generator", *path.iterdir(), path):
                os.utime(p, (mtime, mtime))
        return path

    dead = make(".tmp-a-dead", {"pid": _dead_pid(), **here})
    live = make(".tmp-b-live", {"pid": os.getpid(), **here}, mtime=day_ago)  # alive: kept however old
    remote_fresh = make(".tmp-c-remote", {"pid": 1, "host": "elsewhere", "pid_namespace": None})
    remote_old = make(".tmp-d-remote-old", {"pid": 1, "host": "elsewhere", "pid_namespace": None}, mtime=day_ago)
    legacy_fresh = make(".tmp-e-legacy")  # no owner record (e.g. being created right now)
    legacy_old = make(".tmp-f-legacy-old", mtime=day_ago)

    data = write_pairs(tmp_path / "pairs.jsonl", n=4)
    load_preference_datasets([data], tokenizer=tokenizer, max_seq_length=64, cache_dir=root)
    left = {p.name for p in root.glob(".tmp-*")}
    assert left == {live.name, remote_fresh.name, legacy_fresh.name}
    assert not dead.exists() and not remote_old.exists() and not legacy_old.exists()


KILLED_BUILD = """
import sys, time, functools
import datasets
from nemo_aligner.data.cache import build_cached_dataset

def rows(shard, num_shards):
    yield {"line_no": 1, "x": 1, "truncated": False}
    print("building", flush=True)
    time.sleep(600)

build_cached_dataset(sys.argv[1], kind="t", dir_name="{stem}-t-{key}", key_parts={},
                     features=datasets.Features({"line_no": datasets.Value("int64"), "x": datasets.Value("int64")}),
                     rows=rows, counters=("num_lines", "num_dropped", "num_rows", "num_truncated"), kept="num_rows",
                     empty_message="empty {path}", missing_message="missing {path}", cache_dir=sys.argv[2])
"""


def test_a_killed_tokenisation_leaves_nothing_after_the_next_build(tmp_path, tokenizer):
    from nemo_aligner.data.preference import load_preference_datasets

    data = write_pairs(tmp_path / "pairs.jsonl", n=4)
    root = tmp_path / "cache"
    proc = subprocess.Popen([sys.executable, "-c", KILLED_BUILD, str(data), str(root)], stdout=subprocess.PIPE,
                            text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        assert proc.stdout.readline().strip() == "building"
        temporaries = list(root.glob(".tmp-*"))
        assert len(temporaries) == 1
        load_preference_datasets([data], tokenizer=tokenizer, max_seq_length=64, cache_dir=root)
        assert temporaries[0].is_dir()  # its builder is alive: a concurrent build leaves it alone
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    load_preference_datasets([data], tokenizer=tokenizer, max_seq_length=64, cache_dir=root)
    assert list(root.glob(".tmp-*")) == []


@pytest.mark.parametrize("errno_, reason", DISK_ERRORS, ids=["ENOSPC", "EROFS"])
@pytest.mark.parametrize("where", ["publish", "datasets-write"])
def test_a_full_or_read_only_data_cache_is_one_line(tmp_path, tokenizer, monkeypatch, errno_, reason, where):
    """Was an OSError traceback (or datasets' DatasetGenerationError around it); nothing is left in the cache."""
    import datasets

    from nemo_aligner.data.preference import load_preference_datasets
    from nemo_aligner.errors import DiskError

    data = write_pairs(tmp_path / "pairs.jsonl", n=4)
    root = tmp_path / "cache"
    if where == "publish":
        _refuse_writes(monkeypatch, errno_, lambda dst: dst.parent == root)
    else:
        def save_to_disk(self, path, *args, **kwargs):
            raise OSError(errno_, os.strerror(errno_), str(Path(path) / "data-00000-of-00001.arrow"))

        monkeypatch.setattr(datasets.Dataset, "save_to_disk", save_to_disk)
    with pytest.raises(DiskError) as err:
        load_preference_datasets([data], tokenizer=tokenizer, max_seq_length=64, cache_dir=root)
    assert str(err.value) == (f"cannot write the tokenised-data cache {root}: {reason}. Free space there or make it "
                              "writable, or point model.data.cache_dir (or $NEMO_ALIGNER_CACHE) at another directory")
    assert list(root.iterdir()) == []
    monkeypatch.undo()
    dataset, _ = load_preference_datasets([data], tokenizer=tokenizer, max_seq_length=64, cache_dir=root)
    assert len(dataset) == 4


def test_a_data_file_this_process_cannot_read_is_not_put_down_to_the_cache(tmp_path):
    """Only a refused write under the directory being written is the disk's fault (disk_problem)."""
    from nemo_aligner.utils.fs import disk_problem

    elsewhere = OSError(errno.EACCES, "Permission denied", str(tmp_path / "data" / "train.jsonl"))
    assert disk_problem(elsewhere, tmp_path / "cache") is None
    wrapped = RuntimeError("generation failed")
    wrapped.__cause__ = OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "cache" / ".tmp-x" / "a"))
    assert disk_problem(wrapped, tmp_path / "cache") == "no space left on the device (errno 28)"
    assert disk_problem(RuntimeError("a bug"), tmp_path / "cache") is None  # this test's disk is not full
