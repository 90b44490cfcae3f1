"""Offline trainers on Ray Train (``trainer.ray.enable=true``): the same losses as a Fabric DDP run of as many ranks,
checkpoints and exports where the recipe writes them, user errors raised in the driver."""

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import (
    REPO,
    RayTrainWorkerKiller,
    compose_config,
    dpo_cfg,
    load_example_script,
    save_tiny_reward_model,
    write_pairs,
    write_prompts,
    write_prompts_with_answers,
)

pytestmark = pytest.mark.ray

DPO_COMMON = ["trainer.dpo.max_epochs=3", "trainer.dpo.max_steps=3", "model.global_batch_size=4",
              "model.micro_batch_size=1", "model.optim.lr=1e-3", "exp_manager.export_hf=false"]


def _csv_column(run_dir, key):
    """``train/<key>`` of every logged step in ``run_dir/csv/metrics.csv`` (a resumed run's log holds the steps before
    the interruption and after the resume, once each)."""
    rows = csv.DictReader(open(Path(run_dir) / "csv" / "metrics.csv"))
    return [float(r[f"train/{key}"]) for r in rows if r.get(f"train/{key}")]


def test_two_worker_ray_train_dpo_matches_ddp_and_a_killed_worker_resumes_exactly(tmp_path, tiny_model_dir,
                                                                                   ray_cluster):
    """2 Ray Train workers (gloo group formed by Ray, Fabric attached to it) against the 2-rank torchrun-style Fabric
    DDP run, 12 DPO steps, a checkpoint every step. One worker is SIGKILLed once the step-3 checkpoint is on disk: the
    driver stops with a one-line RayWorkerDiedError and the step-12 checkpoint is not written; the rerun resumes from
    the last checkpoint. The Ray run's logged losses and learning rates, before the kill and after the resume, are
    the DDP run's; the resumed steps came back from rank 0 and the checkpoints are in the recipe's own dir."""
    from nemo_aligner.errors import UserError
    from nemo_aligner.recipes.ray_train import RayWorkerDiedError

    data = write_pairs(tmp_path / "pairs.jsonl", n=24)
    common = ["trainer.dpo.max_epochs=2", "trainer.dpo.max_steps=12", "trainer.dpo.val_check_interval=0",
              "trainer.dpo.save_interval=1", "model.global_batch_size=4", "model.micro_batch_size=2",
              "model.optim.lr=1e-3", "model.optim.sched.warmup_steps=2", "exp_manager.export_hf=false",
              "exp_manager.checkpoint_callback_params.save_top_k=2"]
    ddp = subprocess.run(
        [sys.executable, str(REPO / "examples/nlp/gpt/train_gpt_dpo.py"),
         f"pretrained_checkpoint.restore_from_path={tiny_model_dir}", f"model.data.data_prefix.train=[{data}]",
         f"model.data.data_prefix.validation=[{data}]", f"model.data.cache_dir={tmp_path / 'cache'}",
         "trainer.accelerator=cpu", "model.encoder_seq_length=64", *common,
         f"exp_manager.explicit_log_dir={tmp_path / 'ddp'}", "trainer.devices=2", "trainer.strategy=ddp"],
        capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert ddp.returncode == 0, ddp.stderr[-2000:]

    script = load_example_script("train_gpt_dpo")
    cfg = dpo_cfg(tmp_path / "ray", tiny_model_dir, data, data, *common, "trainer.ray.enable=true",
                  "trainer.ray.num_training_workers=2")
    run_dir = tmp_path / "ray" / "run"
    with RayTrainWorkerKiller(run_dir / "checkpoints" / "step=0000003" / "meta.json") as killer:
        with pytest.raises(RayWorkerDiedError) as err:
            script.run(cfg)
    assert killer.killed
    assert isinstance(err.value, UserError) and "\n" not in str(err.value) and "rerun" in str(err.value)
    done = sorted(p.name for p in (run_dir / "checkpoints").iterdir() if not p.name.startswith("."))
    assert "step=0000003" in done and "step=0000012" not in done, done

    resumed = script.run(cfg)["history"]
    start = 12 - len(resumed)
    assert 3 <= start < 12
    ddp_losses, ray_losses = _csv_column(tmp_path / "ddp", "loss"), _csv_column(run_dir, "loss")
    assert len(ddp_losses) == len(ray_losses) == 12
    assert ray_losses == pytest.approx(ddp_losses, abs=1e-5)
    assert _csv_column(run_dir, "lr") == pytest.approx(_csv_column(tmp_path / "ddp", "lr"), rel=1e-6)
    assert [h["loss"] for h in resumed] == pytest.approx(ddp_losses[start:], abs=1e-5)  # rank 0's result came back
    assert (run_dir / "checkpoints" / "step=0000012" / "meta.json").is_file()


def test_ray_train_user_error_in_a_worker_is_raised_in_the_driver(tmp_path, tiny_model_dir, ray_cluster):
    """A user's mistake found inside the workers (no data file) reaches the driver as the same UserError, one line."""
    from nemo_aligner.errors import UserError

    data = write_pairs(tmp_path / "pairs.jsonl")
    cfg = dpo_cfg(tmp_path, tiny_model_dir, tmp_path / "missing.jsonl", data, *DPO_COMMON,
                  "trainer.ray.enable=true", "trainer.ray.num_training_workers=2")
    with pytest.raises(UserError) as err:
        load_example_script("train_gpt_dpo").run(cfg)
    assert "missing.jsonl" in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("override, message", [
    ("trainer.ray.num_training_workers=3", r"model.global_batch_size=4 must be a multiple of .* data-parallel size 3"),
    ("trainer.devices=2", r"trainer.devices=2 .*set trainer.ray.num_training_workers instead"),
    ("trainer.ray.resources_per_worker={CPU: -1}", r"trainer.ray.resources_per_worker.CPU=-1: expected a number >= 0"),
    ("trainer.ray.num_training_workers=0", r"trainer.ray.num_training_workers=0: expected an integer >= 1"),
])
def test_ray_train_config_errors_fail_before_ray_starts(tmp_path, tiny_model_dir, override, message):
    from nemo_aligner.utils.config import ConfigValueError

    data = write_pairs(tmp_path / "pairs.jsonl")
    cfg = dpo_cfg(tmp_path, tiny_model_dir, data, data, *DPO_COMMON, "trainer.ray.enable=true", override)
    with pytest.raises(ConfigValueError, match=message):
        load_example_script("train_gpt_dpo").run(cfg)


def _sft_and_rm_cfg(recipe, tmp_path, model_dir, data, *overrides):
    from tests.helpers import compose_config

    if recipe == "gpt_sft":
        return compose_config("gpt_sft", [
            f"pretrained_checkpoint.restore_from_path={model_dir}", f"model.data.train_ds.file_path={data}",
            f"model.data.validation_ds.file_path={data}", f"model.data.cache_dir={tmp_path / 'cache'}",
            f"exp_manager.explicit_log_dir={tmp_path / 'run'}", "trainer.accelerator=cpu",
            "model.data.train_ds.max_seq_length=64", "model.data.train_ds.global_batch_size=4",
            "model.data.train_ds.micro_batch_size=2", "model.optim.lr=1e-2", "trainer.sft.max_epochs=4",
            "trainer.sft.max_steps=3", "trainer.sft.val_check_interval=0", *overrides])
    return compose_config("training_rm", [
        f"pretrained_checkpoint.restore_from_path={model_dir}", f"model.data.data_prefix.train=[{data}]",
        f"model.data.data_prefix.validation=[{data}]", f"model.data.cache_dir={tmp_path / 'cache'}",
        f"exp_manager.explicit_log_dir={tmp_path / 'run'}", "trainer.accelerator=cpu", "model.encoder_seq_length=64",
        "model.global_batch_size=4", "model.micro_batch_size=2", "model.optim.lr=1e-3", "trainer.rm.max_epochs=4",
        "trainer.rm.max_steps=3", "trainer.rm.val_check_interval=0", *overrides])


@pytest.mark.long
@pytest.mark.parametrize("recipe, script", [("gpt_sft", "train_gpt_sft"), ("training_rm", "train_reward_model")])
def test_sft_and_rm_on_one_ray_train_worker_match_the_plain_run(tmp_path, tiny_model_dir, ray_cluster, recipe, script):
    """SFT and RM go through the same launcher: one Ray Train worker gives the in-process run's losses, and the
    checkpoints and the HF export are in the recipe's log dir."""
    import json

    if recipe == "gpt_sft":
        data = tmp_path / "chats.jsonl"
        data.write_text("".join(json.dumps({"input": f"Tell me about {t}.", "output": f"Sure, {t} is lovely."}) + "\n"
                                for t in ["bread", "tea", "rain", "maps", "owls", "jazz", "kites", "salt"]))
    else:
        data = write_pairs(tmp_path / "pairs.jsonl")
    module = load_example_script(script)
    plain = module.run(_sft_and_rm_cfg(recipe, tmp_path / "plain", tiny_model_dir, data))["history"]
    on_ray = module.run(_sft_and_rm_cfg(recipe, tmp_path / "ray", tiny_model_dir, data, "trainer.ray.enable=true",
                                        "trainer.ray.num_training_workers=1"))["history"]
    assert len(plain) == len(on_ray) == 3
    assert [h["loss"] for h in on_ray] == pytest.approx([h["loss"] for h in plain], abs=1e-5)
    run_dir = tmp_path / "ray" / "run"
    assert (run_dir / "checkpoints" / "step=0000003" / "meta.json").is_file()
    assert (run_dir / "hf_export" / "config.json").is_file()


def _online_overrides(recipe, tmp_path, model_dir, rm_dir):
    """CLI overrides of a 2-step tiny run of rejection sampling or self-rewarding (both runs of the test below)."""
    common = [f"pretrained_checkpoint.restore_from_path={model_dir}", "trainer.accelerator=cpu",
              "model.encoder_seq_length=64", "model.optim.lr=1e-2", "model.optim.sched.min_lr=1e-2",
              "exp_manager.export_hf=false"]
    if recipe == "gpt_rs_actor":
        prompts = write_prompts(tmp_path / "prompts.jsonl", n=8)
        return common + [
            f"reward_model.restore_from_path={rm_dir}", f"model.data.data_prefix.train=[{prompts}]",
            f"model.data.data_prefix.validation=[{prompts}]", "model.rs.length_params.max_length=6",
            "model.rs.num_rollout_samples=4", "model.rs.num_rollouts_per_prompt=2", "model.rs.top_n_rollouts=1",
            "model.rs.rollout_micro_batch_size=4", "model.rs.num_val_samples=4", "model.global_batch_size=2",
            "model.micro_batch_size=1", "trainer.rs.max_steps=2", "trainer.rs.val_check_interval=0",
            "trainer.rs.save_interval=0"]
    prompts = write_prompts_with_answers(tmp_path / "prompts.jsonl", n=8)
    return common + [
        f"model.data.train_ds.file_path=[{prompts}]", f"model.data.validation_ds.file_path=[{prompts}]",
        "model.global_batch_size=4", "model.micro_batch_size=1", "model.spin.num_responses_to_gen=2",
        "model.spin.num_evals_to_average=1", "model.spin.rollout_micro_batch_size=8",
        "model.spin.judge_max_length=4",
        "model.spin.llm_judge_prompt='JUDGE {{ response }}'", "trainer.self_rewarding.max_iterations=2",
        # the tiny random model seldom samples EOS: a response that writes an "e" has ended (a candidate)
        "model.spin.sampling_params.end_strings=[e]", "model.spin.length_params.max_length=12",
        "trainer.self_rewarding.limit_train_batches=1", "trainer.self_rewarding.val_check_interval=0",
        "trainer.self_rewarding.save_interval=0"]


@pytest.mark.long
@pytest.mark.parametrize("recipe, script", [("gpt_rs_actor", "train_gpt_rs_actor"),
                                            ("gpt_self_rewarding", "train_gpt_self_rewarding")])
def test_two_worker_ray_train_rs_and_self_rewarding_match_two_rank_fabric_ddp(tmp_path, tiny_model_dir, tokenizer,
                                                                            ray_cluster, recipe, script):
    """Rejection sampling and self-rewarding (the policy judges itself, constrained) on 2 Ray Train workers: each
    worker generates, scores (RS: its own reward model; self-rewarding: its own judge) and trains on its share of
    the prompts, and the run's metrics equal those of the 2-rank Fabric DDP run (2 steps; self-rewarding crosses
    an iteration boundary)."""
    rm_dir = save_tiny_reward_model(tmp_path / "rm", tiny_model_dir, tokenizer)
    overrides = _online_overrides(recipe, tmp_path, tiny_model_dir, rm_dir)
    ddp = subprocess.run(
        [sys.executable, str(REPO / "examples/nlp/gpt" / f"{script}.py"), *overrides,
         f"exp_manager.explicit_log_dir={tmp_path / 'ddp'}", "trainer.devices=2", "trainer.strategy=ddp"],
        capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert ddp.returncode == 0, ddp.stderr[-2000:]
    out = load_example_script(script).run(compose_config(recipe, [
        *overrides, f"exp_manager.explicit_log_dir={tmp_path / 'ray'}", "trainer.ray.enable=true",
        "trainer.ray.num_training_workers=2"]))

    keys = (["loss", "rewards_all_mean", "rewards_kept_mean", "response_lengths_all_mean"] if recipe == "gpt_rs_actor"
            else ["loss", "preference_loss", "acc", "judge_parse_rate", "bad_samples_per_GBS",
                  "chosen_generated_rewards", "pairs_trained", "iteration"])

    def metrics(run_dir):
        rows = [r for r in csv.DictReader(open(Path(run_dir) / "csv" / "metrics.csv")) if r.get("train/loss")]
        return [[float(r[f"train/{k}"]) for k in keys] for r in rows]

    ray_rows, ddp_rows = metrics(tmp_path / "ray"), metrics(tmp_path / "ddp")
    assert len(ddp_rows) == len(ray_rows) == 2
    for ray_row, ddp_row in zip(ray_rows, ddp_rows):
        assert ray_row == pytest.approx(ddp_row, abs=1e-5, nan_ok=True), keys
    assert [h["loss"] for h in out["history"]] == pytest.approx([r[0] for r in ddp_rows], abs=1e-5)
    assert any(row[0] != 0.0 for row in ddp_rows)  # something was trained on
    if recipe == "gpt_self_rewarding":
        assert [row[keys.index("iteration")] for row in ray_rows] == [0.0, 1.0]
        assert all(row[keys.index("judge_parse_rate")] == 1.0 for row in ray_rows)


def test_ray_train_rs_refuses_a_programmatic_reward(tmp_path, tiny_model_dir, tokenizer):
    from nemo_aligner.errors import UnsupportedError

    overrides = _online_overrides("gpt_rs_actor", tmp_path, tiny_model_dir, tmp_path / "no_rm")
    with pytest.raises(UnsupportedError, match="trainer.ray.enable=true with a programmatic reward_fn"):
        load_example_script("train_gpt_rs_actor").run(
            compose_config("gpt_rs_actor", [*overrides, "trainer.ray.enable=true",
                                            f"exp_manager.explicit_log_dir={tmp_path / 'x'}"]),
            reward_fn=lambda p, r: [0.0] * len(p))


def test_a_worker_killed_for_memory_is_reported_as_a_dead_worker_with_the_reason():
    """Ray Train reports a worker that Ray's memory monitor killed as a failed health check (``WorkerGroupError``),
    without the word "died": it is still a dead worker (RayWorkerDiedError in the driver) and the reason says what to
    lower; a plain failed health check is a dead worker too; any other error is not."""
    from nemo_aligner.recipes.ray_train import worker_death_reason

    class WorkerGroupError(RuntimeError):  # the name Ray Train's v2 error has; its text as seen in a real OOM kill
        pass

    oom = WorkerGroupError("Training failed due to worker errors:\n[Rank 1 Error Snippet]:\nA worker health check "
                           "failed.\n4 worker(s) were killed due to the node running low on memory.")
    assert "memory monitor" in worker_death_reason(oom) and "VLLM_CPU_KVCACHE_SPACE" in worker_death_reason(oom)
    assert worker_death_reason(WorkerGroupError("A worker health check failed.")) == "WorkerGroupError"
    assert worker_death_reason(RuntimeError("the actor died unexpectedly")) == "RuntimeError"
    assert worker_death_reason(ValueError("model.optim.lr must be > 0")) is None
