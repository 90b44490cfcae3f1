"""PPO on Ray (``trainer.ppo.ray.enable=true``: critic, reward model and initial policy as Ray actors in one
placement group) against colocated PPO; colocated roles sharing a bundle; a killed role actor; exact resume."""

import os
import signal
from pathlib import Path

import pytest
import torch

from tests.helpers import LEARNING_OVERRIDES, Killed, checkpoint_model_state, load_example_script, ppo_cfg, write_prompts

pytestmark = pytest.mark.ray

COMPARED = ["rewards_mean", "init_policy_kl", "advantages_mean", "returns_mean", "value_loss", "explained_variance",
            "policy_loss", "clip_fraction", "approx_kl", "entropy", "response_lengths_mean"]
FIRST_STEP = ["trainer.ppo.max_steps=1", "trainer.ppo.ppo_epochs=2", "model.global_batch_size=4",
              "model.optim.lr=1e-3", "critic.optim.lr=1e-3", "trainer.ppo.val_check_interval=0",
              "exp_manager.export_hf=false",
              "model.ppo.mask_truncated=false"]  # the tiny policy's 8-token responses are all truncated


@pytest.fixture(scope="module")
def rm_dir(tmp_path_factory, tiny_model_dir, tokenizer):
    """A tiny reward-model export: the tiny Llama as AutoModelForSequenceClassification(num_labels=1)."""
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(7)
    path = tmp_path_factory.mktemp("tiny_rm")
    model = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=1)
    model.config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def first_steps(tmp_path_factory, tiny_model_dir, rm_dir, ray_cluster):
    """One colocated and one Ray PPO step of the same seed; the Ray run colocates critic and initial policy in one
    bundle (reward model in its own) and records, during its step, Ray's placement-group table and each role
    actor's assigned resources."""
    from nemo_aligner.algorithms.ppo import PPOTrainer

    tmp_path = tmp_path_factory.mktemp("ppo_ray")
    prompts = write_prompts(tmp_path / "prompts.jsonl")
    common = [*FIRST_STEP, f"reward_model.restore_from_path={rm_dir}", f"critic.restore_from_path={rm_dir}"]
    actor = load_example_script("train_gpt_ppo_actor")
    colocated = actor.run(ppo_cfg(tmp_path, tiny_model_dir, prompts, *common, run="colocated"))

    seen = {}
    original = PPOTrainer.train_step

    def record(self):
        import ray

        roles = seen["roles"] = self.critic.handle.roles
        seen["tables"] = ray.util.placement_group_table()
        seen["available"] = ray.available_resources()
        seen["placement"] = {role: h.call("placement") for role, h in roles.handles.items()}
        return original(self)

    PPOTrainer.train_step = record
    try:
        on_ray = actor.run(ppo_cfg(tmp_path, tiny_model_dir, prompts, *common, "trainer.ppo.ray.enable=true",
                                   "trainer.ppo.ray.colocate=[[critic,initial_policy]]", run="ray"))
    finally:
        PPOTrainer.train_step = original
    return colocated, on_ray, seen


def test_ray_matches_colocated_first_step(first_steps):
    colocated, on_ray, _ = first_steps
    a, b = colocated["history"][0], on_ray["history"][0]
    assert a["clip_fraction"] > 0  # the second PPO epoch moves the ratio: the clipped loss is exercised
    for key in COMPARED:
        assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-5), key
    # the Ray critic checkpointed where the colocated one does
    assert (Path(on_ray["log_dir"]) / "critic_checkpoints" / "step=0000001" / "state.pt").is_file()


def test_colocated_roles_share_a_placement_group_bundle(first_steps):
    """[[critic, initial_policy]] + reward_model: Ray's placement-group table holds one group of 2 bundles of
    {CPU: 1} (not 3: one per role); all three roles run in it, critic and initial policy with half a CPU each, the
    reward model with a whole one, and no bundle has CPU left, so the two halves share one bundle."""
    _, on_ray, seen = first_steps
    assert on_ray["ray_roles"].groups == [["critic", "initial_policy"], ["reward_model"]]
    created = {pg: e for pg, e in seen["tables"].items() if e["state"] == "CREATED"}
    assert len(created) == 1, seen["tables"]
    (pg_id, entry), = created.items()
    assert entry["strategy"] == "PACK"
    assert [entry["bundles"][i] for i in sorted(entry["bundles"])] == [{"CPU": 1.0}, {"CPU": 1.0}]
    placement = seen["placement"]
    assert set(placement) == {"critic", "initial_policy", "reward_model"}
    assert {pg for pg, _ in placement.values()} == {pg_id}
    assert placement["critic"][1] == placement["initial_policy"][1] == {"CPU": 0.5}
    assert placement["reward_model"][1] == {"CPU": 1.0}
    for bundle in (0, 1):  # both bundles fully used: the two half-CPU roles are in one of them
        assert seen["available"].get(f"CPU_group_{bundle}_{pg_id}", 0.0) == 0.0, seen["available"]
    assert seen["available"].get(f"CPU_group_{pg_id}", 0.0) == 0.0


def test_killed_role_actor_stops_the_driver_naming_it_and_the_rerun_resumes_exactly(tmp_path, tiny_model_dir, rm_dir,
                                                                                    ray_cluster, monkeypatch):
    """4 Ray PPO steps straight vs a run whose critic actor is SIGKILLed in step 3 (after the step-2 checkpoint):
    the driver stops with one line naming the critic; rerunning resumes from step 2 and gives the same per-step
    metrics and the same final actor and critic weights."""
    from nemo_aligner.algorithms.ppo import PPOTrainer
    from nemo_aligner.errors import UserError
    from nemo_aligner.recipes.ray_train import RayWorkerDiedError

    prompts = write_prompts(tmp_path / "prompts.jsonl")
    actor = load_example_script("train_gpt_ppo_actor")

    def cfg(run):
        return ppo_cfg(tmp_path, tiny_model_dir, prompts, *LEARNING_OVERRIDES, "trainer.ppo.max_steps=4",
                       "trainer.ppo.save_interval=2", "model.optim.sched.min_lr=1e-3",
                       "model.ppo.num_rollout_samples=8", "exp_manager.export_hf=false",
                       f"reward_model.restore_from_path={rm_dir}", f"critic.restore_from_path={rm_dir}",
                       "trainer.ppo.ray.enable=true", "trainer.ppo.ray.colocate=[[critic,reward_model,initial_policy]]",
                       run=run)

    straight = actor.run(cfg("straight"))
    original_train_actor, before_kill = PPOTrainer.train_actor, []

    def kill_critic_in_step_3(self, rollouts, seed):
        if self.step == 2:
            before_kill.extend(self.history)
            os.kill(self.critic.handle.call("pid"), signal.SIGKILL)
        return original_train_actor(self, rollouts, seed)

    monkeypatch.setattr(PPOTrainer, "train_actor", kill_critic_in_step_3)
    with pytest.raises(RayWorkerDiedError) as err:
        actor.run(cfg("resumed"))
    message = str(err.value)
    assert isinstance(err.value, UserError) and "\n" not in message
    assert "PPO critic died" in message and "resume" in message
    monkeypatch.setattr(PPOTrainer, "train_actor", original_train_actor)

    resumed = actor.run(cfg("resumed"))
    assert len(before_kill) == 2 and len(resumed["history"]) == 2
    for step, (a, b) in enumerate(zip(straight["history"], before_kill + resumed["history"]), start=1):
        for key in sorted(a):
            if not (key.startswith("time_") or key == "step_time"):
                assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-6), (step, key)
    for sub in ("checkpoints", "critic_checkpoints"):
        a = checkpoint_model_state(Path(straight["log_dir"]) / sub / "step=0000004")
        b = checkpoint_model_state(Path(resumed["log_dir"]) / sub / "step=0000004")
        assert a.keys() == b.keys() and len(a) > 0
        for name in a:
            assert torch.equal(a[name], b[name]), (sub, name)


def test_a_missing_reward_model_export_is_the_same_user_error_on_ray(tmp_path, tiny_model_dir, ray_cluster):
    """The reward model's Ray actor fails to build: the driver raises the colocated MissingFileError, not a dead
    actor, and removes the run's actors and placement group."""
    import ray

    from nemo_aligner.errors import MissingFileError

    prompts = write_prompts(tmp_path / "prompts.jsonl")
    cfg = ppo_cfg(tmp_path, tiny_model_dir, prompts, *FIRST_STEP, f"reward_model.restore_from_path={tmp_path / 'no_rm'}",
                  "trainer.ppo.ray.enable=true")
    with pytest.raises(MissingFileError, match="reward_model.restore_from_path"):
        load_example_script("train_gpt_ppo_actor").run(cfg)
    assert not [e for e in ray.util.placement_group_table().values() if e["state"] == "CREATED"]


def test_bundles_larger_than_the_cluster_fail_at_once_naming_the_keys(tmp_path, tiny_model_dir, ray_cluster):
    """3 bundles of {CPU: 2} on the 4-CPU test cluster: an error naming the keys to change, before any actor starts
    (not after the placement group's timeout)."""
    from nemo_aligner.utils.config import ConfigValueError

    prompts = write_prompts(tmp_path / "prompts.jsonl")
    cfg = ppo_cfg(tmp_path, tiny_model_dir, prompts, *FIRST_STEP, "trainer.ppo.ray.enable=true",
                  "trainer.ppo.ray.resources_per_worker={CPU: 2}")
    with pytest.raises(ConfigValueError, match=r"need \{'CPU': 6.0\}, more than the whole Ray cluster has "
                                               r"\(\{'CPU': 4.0\}\).*trainer.ppo.ray.colocate"):
        load_example_script("train_gpt_ppo_actor").run(cfg)


@pytest.mark.parametrize("override, message", [
    ("trainer.ppo.ray.colocate=[[critic,actor]]", "the actor .* runs in the driver"),
    ("trainer.ppo.ray.colocate=[[critic],[critic,reward_model]]", "role 'critic' is in two groups"),
    ("trainer.ppo.ray.colocate=[[critc]]", "unknown role 'critc'"),
    ("trainer.devices=2", "set trainer.devices=1"),
])
def test_ray_ppo_config_errors_fail_before_ray_starts(tmp_path, tiny_model_dir, override, message):
    from nemo_aligner.errors import UserError

    prompts = write_prompts(tmp_path / "prompts.jsonl")
    cfg = ppo_cfg(tmp_path, tiny_model_dir, prompts, *FIRST_STEP, "trainer.ppo.ray.enable=true", override)
    with pytest.raises(UserError, match=message):
        load_example_script("train_gpt_ppo_actor").run(cfg)
