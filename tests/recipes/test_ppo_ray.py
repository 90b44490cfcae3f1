"""PPO on Ray (``trainer.ppo.ray.enable=true``: critic, reward model and initial policy as Ray actors in one
placement group) against colocated PPO; colocated roles sharing a bundle; a killed role actor; exact resume."""

import os
import signal
from pathlib import Path

import pytest
import torch

from tests.helpers import (
    LEARNING_OVERRIDES,
    Killed,
    checkpoint_model_state,
    compose_config,
    csv_column,
    load_example_script,
    ppo_cfg,
    ppo_command,
    run_ppo_ranks,
    write_prompts,
)

pytestmark = pytest.mark.ray

COMPARED = ["rewards_mean", "init_policy_kl", "advantages_mean", "returns_mean", "value_loss", "explained_variance",
            "policy_loss", "clip_fraction", "approx_kl", "entropy", "response_lengths_mean"]
ENV_NAME = "NEMO_ALIGNER_RAY_RUNTIME_ENV_TEST"
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
    bundle (reward model in its own), sets an environment variable through ``trainer.ppo.ray.runtime_env``, and
    records, during its step, Ray's placement-group table and each role actor's assigned resources and value of that
    variable."""
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
        seen["env"] = {role: ray.get(h.actor.__ray_call__.remote(lambda _, name: os.environ.get(name), ENV_NAME))
                       for role, h in roles.handles.items()}
        return original(self)

    PPOTrainer.train_step = record
    try:
        on_ray = actor.run(ppo_cfg(tmp_path, tiny_model_dir, prompts, *common, "trainer.ppo.ray.enable=true",
                                   "trainer.ppo.ray.colocate=[[critic,initial_policy]]",
                                   f"trainer.ppo.ray.runtime_env={{env_vars: {{{ENV_NAME}: from_runtime_env}}}}",
                                   run="ray"))
    finally:
        PPOTrainer.train_step = original
    return colocated, on_ray, seen



def _assert_resumed_like_straight(straight, history, first_step, resumed_log_dir):
    """The steps ``first_step..`` of ``history`` equal the uninterrupted run's (every metric but the timings), and
    both runs' step-4 actor and critic checkpoints hold the same weights to the bit."""
    for step, b in enumerate(history, start=first_step):
        a = straight["history"][step - 1]
        for key in sorted(a):
            if not (key.startswith("time_") or key == "step_time"):
                assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-6), (step, key)
    for sub in ("checkpoints", "critic_checkpoints"):
        a = checkpoint_model_state(Path(straight["log_dir"]) / sub / "step=0000004")
        b = checkpoint_model_state(Path(resumed_log_dir) / sub / "step=0000004")
        assert a.keys() == b.keys() and len(a) > 0
        for name in a:
            assert torch.equal(a[name], b[name]), (sub, name)

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


def test_runtime_env_reaches_every_role_actor(first_steps):
    """``trainer.ppo.ray.runtime_env={env_vars: {...}}``: the variable is set in each role actor's process (the Ray
    run joined the test's running cluster, so it came through the actors' own runtime_env), not in the driver."""
    _, _, seen = first_steps
    assert seen["env"] == {"critic": "from_runtime_env", "initial_policy": "from_runtime_env",
                           "reward_model": "from_runtime_env"}
    assert ENV_NAME not in os.environ


@pytest.mark.long
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
    _assert_resumed_like_straight(straight, before_kill + resumed["history"], 1, resumed["log_dir"])


def test_two_ray_actor_workers_match_two_rank_fabric_ddp(tmp_path, tiny_model_dir, rm_dir, ray_cluster):
    """``trainer.ppo.ray.num_actor_workers=2``: the actor as 2 Ray Train workers (one gloo group, Fabric DDP over it)
    sharing one critic, reward model and initial policy actor gives the per-step metrics of colocated 2-rank Fabric
    DDP (``trainer.devices=2 trainer.strategy=ddp``, a critic replica per rank) over 2 PPO steps. The critic's global
    batch is the whole buffer (8 rollouts, equal lengths), so each of its optimizer steps (one per epoch) is the same
    update whether one shared critic trains on the gathered 8 or two DDP replicas on 4 each; ``explained_variance`` is the
    one metric that differs by construction (the shared critic's is over all 8 rollouts, DDP's the ranks' mean)."""
    prompts = write_prompts(tmp_path / "prompts.jsonl")
    extra = [f"reward_model.restore_from_path={rm_dir}", f"critic.restore_from_path={rm_dir}",
             "model.global_batch_size=4", "model.micro_batch_size=2", "critic.global_batch_size=8",
             "trainer.ppo.ppo_epochs=2", "model.ppo.mask_truncated=false"]
    run_ppo_ranks(ppo_command(tmp_path, tiny_model_dir, prompts, "ddp", *extra), 2)
    cfg = compose_config("gpt_ppo_actor", ppo_command(tmp_path, tiny_model_dir, prompts, "ray", *extra,
                                                      "trainer.ppo.ray.enable=true",
                                                      "trainer.ppo.ray.num_actor_workers=2",
                                                      "trainer.ppo.ray.colocate=[[critic,reward_model,initial_policy]]")[2:])
    out = load_example_script("train_gpt_ppo_actor").run(cfg)

    assert csv_column(tmp_path / "ddp", "train/clip_fraction")[0] > 0  # the clipped loss is exercised
    assert len(out["history"]) == 2 and out["ray_roles"].groups == [["critic", "reward_model", "initial_policy"]]
    for key in [k for k in COMPARED if k != "explained_variance"]:
        ddp, on_ray = csv_column(tmp_path / "ddp", f"train/{key}"), csv_column(tmp_path / "ray", f"train/{key}")
        assert len(ddp) == len(on_ray) == 2, key
        assert on_ray == pytest.approx(ddp, rel=1e-4, abs=1e-5), key
        assert [h[key] for h in out["history"]] == pytest.approx(on_ray, rel=1e-6, abs=1e-7), key  # rank 0's result
    # 2 actor ranks (DDP-averaged 2-rollout micro-batches): 2 epochs x 2 global batches of 4 per PPO step
    assert csv_column(tmp_path / "ray", "train/actor_optimizer_steps") == [4.0, 4.0]
    # the shared critic trains once per PPO step, on the gathered buffer: one optimizer step per epoch, as DDP's
    for run in ("ray", "ddp"):
        assert csv_column(tmp_path / run, "train/critic_optimizer_steps") == [2.0, 2.0], run
    for sub in ("checkpoints", "critic_checkpoints"):  # rank 0 and the critic actor write where colocated does
        assert (tmp_path / "ray" / sub / "step=0000002").is_dir(), sub


def _killing_reward(marker: Path, after: Path):
    """A programmatic reward (it travels to the actor workers pickled) that, once ``after`` exists, SIGKILLs the
    process of actor rank 1 the first time it is called there (``marker`` records that it did, so a rerun runs on)."""

    def reward_fn(prompt_ids, response_ids):
        import torch.distributed as dist

        if after.exists() and not marker.exists() and dist.is_initialized() and dist.get_rank() == 1:
            marker.write_text(str(os.getpid()))
            os.kill(os.getpid(), signal.SIGKILL)
        return [sum(t % 7 for t in ids) / (7.0 * max(len(ids), 1)) for ids in response_ids]

    return reward_fn


@pytest.mark.long
def test_killed_actor_worker_stops_the_driver_naming_it_and_the_rerun_resumes_exactly(tmp_path, tiny_model_dir,
                                                                                      ray_cluster):
    """``num_actor_workers=2``, 4 PPO steps straight vs a run whose actor rank 1 is SIGKILLed in step 3 (after the
    step-2 checkpoint): the driver stops with one line naming the PPO actor; the rerun resumes from step 2 and gives
    the straight run's steps 3 and 4 and the same final actor and critic weights."""
    from nemo_aligner.errors import UserError
    from nemo_aligner.recipes.ray_train import RayWorkerDiedError

    prompts = write_prompts(tmp_path / "prompts.jsonl")
    actor = load_example_script("train_gpt_ppo_actor")

    def cfg(run):
        return compose_config("gpt_ppo_actor", ppo_command(
            tmp_path, tiny_model_dir, prompts, run, f"critic.restore_from_path={tiny_model_dir}",
            "reward_model.restore_from_path=null", "trainer.ppo.max_epochs=2", "trainer.ppo.max_steps=4",
            "trainer.ppo.save_interval=2", "model.global_batch_size=4", "model.micro_batch_size=2",
            "model.optim.sched.min_lr=1e-3", "critic.optim.sched.min_lr=1e-3", "model.ppo.mask_truncated=false", "trainer.ppo.ray.enable=true",
            "trainer.ppo.ray.num_actor_workers=2", "trainer.ppo.ray.colocate=[[critic,initial_policy]]")[2:])

    never = tmp_path / "never"
    straight = actor.run(cfg("straight"), reward_fn=_killing_reward(tmp_path / "unused", never))
    marker = tmp_path / "killed"
    reward_fn = _killing_reward(marker, tmp_path / "resumed" / "checkpoints" / "step=0000002" / "meta.json")
    with pytest.raises(RayWorkerDiedError) as err:
        actor.run(cfg("resumed"), reward_fn=reward_fn)
    message = str(err.value)
    assert marker.exists() and isinstance(err.value, UserError) and "\n" not in message
    assert "PPO actor died" in message and "resume" in message

    resumed = actor.run(cfg("resumed"), reward_fn=reward_fn)
    assert len(straight["history"]) == 4 and len(resumed["history"]) == 2
    _assert_resumed_like_straight(straight, resumed["history"], 3, resumed["log_dir"])


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


def test_actor_workers_count_towards_the_cluster_check(tmp_path, tiny_model_dir, ray_cluster):
    """2 role bundles ([critic, initial_policy], reward_model) + 2 actor workers of {CPU: 2} on the 4-CPU cluster:
    8 CPUs, an error naming the keys at once (with the actor in the driver, the 2 bundles would fit: 2 x 2 = 4)."""
    from nemo_aligner.utils.config import ConfigValueError

    prompts = write_prompts(tmp_path / "prompts.jsonl")
    cfg = ppo_cfg(tmp_path, tiny_model_dir, prompts, *FIRST_STEP, "trainer.ppo.ray.enable=true",
                  "trainer.ppo.ray.resources_per_worker={CPU: 2}", "trainer.ppo.ray.num_actor_workers=2",
                  "trainer.ppo.ray.colocate=[[critic,initial_policy]]")
    with pytest.raises(ConfigValueError, match=r"2 bundle\(s\) of \{'CPU': 2.0\} .* and 2 actor worker\(s\) need "
                                               r"\{'CPU': 8.0\}.*trainer.ppo.ray.resources_per_worker"):
        load_example_script("train_gpt_ppo_actor").run(cfg)


@pytest.mark.parametrize("override, message", [
    ("trainer.ppo.ray.colocate=[[critic,actor]]", "the actor .* runs in the driver"),
    ("trainer.ppo.ray.colocate=[[critic],[critic,reward_model]]", "role 'critic' is in two groups"),
    ("trainer.ppo.ray.colocate=[[critc]]", "unknown role 'critc'"),
    ("trainer.devices=2", "set trainer.devices=1"),
    ("trainer.ppo.ray.num_actor_workers=0", r"trainer.ppo.ray.num_actor_workers=0: expected an integer >= 1"),
    (("trainer.ppo.ray.num_actor_workers=2", "trainer.ppo.vllm.enable=true", "trainer.ppo.ray.colocate=[[critic,rollout]]"),
     r"trainer.ppo.ray.num_actor_workers=2 with trainer.ppo.vllm.enable=true .* remove rollout from "
     r"trainer.ppo.ray.colocate"),
    ("trainer.ppo.ray.num_actor_workers=3",
     r"model.ppo.num_rollout_samples=8 must be a multiple of rollout_micro_batch_size x data-parallel size \(4 x 3\)"),
    ("trainer.ppo.ray.runtime_env=3", r"trainer.ppo.ray.runtime_env=3: expected .*dict.* or null"),
    ("trainer.ppo.ray.runtime_env={env_vars: [A]}", r"trainer.ppo.ray.runtime_env.env_vars=\['A'\]: expected a mapping"),
])
def test_ray_ppo_config_errors_fail_before_ray_starts(tmp_path, tiny_model_dir, override, message):
    from nemo_aligner.errors import UserError

    prompts = write_prompts(tmp_path / "prompts.jsonl")
    cfg = ppo_cfg(tmp_path, tiny_model_dir, prompts, *FIRST_STEP, "trainer.ppo.ray.enable=true",
                  *(override if isinstance(override, tuple) else (override,)))
    with pytest.raises(UserError, match=message):
        load_example_script("train_gpt_ppo_actor").run(cfg)
