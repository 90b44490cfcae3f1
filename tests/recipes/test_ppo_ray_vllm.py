"""PPO on Ray with the vLLM rollout engine in its own Ray actor (``trainer.ppo.ray.enable=true`` and
``trainer.ppo.vllm.enable=true``) against colocated PPO with vLLM in the driver, on the session's tiny head_dim-64
Llama: the same metrics step by step, the refit of step 2 reaches the actor's engine through Ray's object store,
and afterwards that engine answers exactly like the trained policy's native greedy decoding.

Fixture order matters: the colocated run starts the session's shared in-process engine (``VLLMEngine.shared``, reused
by the later vLLM tests) *before* this module's Ray cluster starts, so vLLM forks its engine process while Ray is
not initialised here (see the ``ray_cluster`` fixture on the hang that this avoids)."""

from __future__ import annotations

import os

import pytest

from nemo_aligner.generation import LengthParams
from tests.helpers import engine_and_native_greedy, load_example_script, ppo_cfg, vllm_overrides, write_prompts

pytestmark = [pytest.mark.ray, pytest.mark.vllm]

COMPARED = ["rewards_mean", "init_policy_kl", "advantages_mean", "returns_mean", "value_loss", "explained_variance",
            "policy_loss", "clip_fraction", "approx_kl", "entropy", "response_lengths_mean",
            "rollout_logprob_mismatch"]
OVERRIDES = [*vllm_overrides("ppo"), "trainer.ppo.max_steps=2", "trainer.ppo.ppo_epochs=2",
             "trainer.ppo.val_check_interval=0", "model.optim.lr=5e-2", "model.optim.sched.min_lr=5e-2",
             "critic.optim.lr=1e-3", "model.ppo.mask_truncated=false", "exp_manager.export_hf=false"]


def fraction_reward(prompt_ids, response_ids):
    """The share of response tokens with an id in [3, 80) (a programmatic reward: no reward-model actor)."""
    return [sum(3 <= t < 80 for t in r) / len(r) for r in response_ids]



@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory):
    return write_prompts(tmp_path_factory.mktemp("ppo_ray_vllm_prompts") / "prompts.jsonl")


@pytest.fixture(scope="module")
def colocated(tmp_path_factory, vllm_model_dir, prompts_file):
    """Two colocated PPO steps with vLLM rollouts (the engine in this process). Requested before ``ray_cluster``."""
    tmp_path = tmp_path_factory.mktemp("ppo_vllm_colocated")
    cfg = ppo_cfg(tmp_path, vllm_model_dir, prompts_file, *OVERRIDES, run="colocated")
    return load_example_script("train_gpt_ppo_actor").run(cfg, reward_fn=fraction_reward)


def test_ppo_with_the_vllm_engine_as_a_ray_actor_matches_colocated(colocated, ray_cluster, tmp_path, vllm_model_dir,
                                                                   prompts_file, monkeypatch):
    """The same two PPO steps on Ray, critic and initial policy sharing a bundle, the vLLM engine in a bundle of
    its own: every compared metric of both steps equals colocated mode's (step 2's rollouts come from the weights
    refit after step 1, so a missing or wrong refit would change them); both steps refit (``time_refit > 0``); the
    engine lives in another process and loaded one refit per weights version (3: the initial weights, after step 1,
    after step 2 for the final validation), none when the weights were current; after training its greedy output
    equals the trained actor's native greedy output."""
    from nemo_aligner.algorithms.ppo import PPOTrainer
    from nemo_aligner.recipes.ray_ppo import RayRolloutEngine

    seen = {}
    original_fit = PPOTrainer.fit

    def fit_then_look_at_the_engine(self):  # before run() shuts the Ray actors down
        history = original_fit(self)
        engine = self.actor.rollout_engine
        seen["engine"] = engine
        seen["refits"] = engine.refits
        seen["roles"] = engine.handle.roles.groups
        seen["engine_pid"] = engine.handle.call("pid")
        seen["placement"] = engine.handle.call("placement")
        tok = self.actor.tokenizer
        prompts = [tok(f"Human: Tell me about owls {i}. Assistant:")["input_ids"] for i in range(4)]
        seen["greedy"] = engine_and_native_greedy(self.actor, prompts, LengthParams(max_length=12))
        seen["refits_after_greedy"] = engine.refits
        return history

    monkeypatch.setattr(PPOTrainer, "fit", fit_then_look_at_the_engine)
    cfg = ppo_cfg(tmp_path, vllm_model_dir, prompts_file, *OVERRIDES, "trainer.ppo.ray.enable=true",
                  "trainer.ppo.ray.colocate=[[critic,initial_policy]]", run="ray")
    on_ray = load_example_script("train_gpt_ppo_actor").run(cfg, reward_fn=fraction_reward)

    assert seen["roles"] == [["critic", "initial_policy"], ["rollout"]]
    assert isinstance(seen["engine"], RayRolloutEngine) and seen["engine_pid"] != os.getpid()
    assert seen["placement"][1] == {"CPU": 1.0}
    assert colocated["trainer"].actor.rollout_engine.__class__.__name__ == "VLLMEngine"
    assert len(on_ray["history"]) == len(colocated["history"]) == 2
    for step, (a, b) in enumerate(zip(colocated["history"], on_ray["history"]), start=1):
        assert b["time_refit"] > 0, step
        for key in COMPARED:
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-5), (step, key)
    assert colocated["history"][1]["clip_fraction"] > 0 or colocated["history"][1]["approx_kl"] > 0
    # step 1's rollouts: the initial weights; step 2's: after step 1's update; the final validation: after step 2's
    # update; the greedy check after training finds the engine up to date (no refit when the weights are current)
    assert seen["refits"] == seen["refits_after_greedy"] == 3
    engine_out, native_out = seen["greedy"]
    assert engine_out.response_ids == native_out.response_ids
    assert any(engine_out.response_ids)


def _fraction_reward_by_value():
    """:func:`fraction_reward` as a closure, so that it travels to Ray Train workers pickled by value (a module-level
    test function would be pickled by reference, and the workers cannot import the test modules)."""
    def reward_fn(prompt_ids, response_ids):
        return [sum(3 <= t < 80 for t in r) / len(r) for r in response_ids]
    return reward_fn


@pytest.mark.long
def test_two_actor_workers_each_refit_and_generate_with_their_own_vllm_engine(ray_cluster, tmp_path, vllm_model_dir,
                                                                              prompts_file, monkeypatch):
    """``num_actor_workers=2`` with vLLM: one rollout actor per actor rank (``rollout``, ``rollout:1``, each in a
    bundle of its own). Each rank refits its engine before each step (``time_refit > 0``) and the engine's log-probs of
    its own greedy responses agree with its trainer's to 1e-3 nats in both steps; step 1's large update (lr 5e-2)
    moves the policy far from the initial one (``init_policy_kl`` of step 2), so an engine of either rank that
    still held the initial weights in step 2 would disagree by much more. Each engine loaded the refits of its own
    rank (the initial weights, then step 1's). (The 2-worker metrics equal 2-rank Fabric DDP's in
    ``test_ppo_ray.py``; vLLM's rollouts equal the native engine's in the colocated vLLM tests.)"""
    from nemo_aligner.recipes.ray_ppo import RayRoles

    refits: dict[str, int] = {}
    original_shutdown = RayRoles.shutdown

    def count_refits_then_shut_down(self):  # the driver's roles, before their actors go
        for role, handle in self.handles.items():
            if role.startswith("rollout") and role not in refits:
                refits[role] = handle.call("call", "num_refits")
        original_shutdown(self)

    monkeypatch.setattr(RayRoles, "shutdown", count_refits_then_shut_down)
    common = [o for o in OVERRIDES if not o.startswith("trainer.ppo.vllm.")] + [
        "model.ppo.sampling_params.use_greedy=true", "trainer.ppo.ray.enable=true",
        "trainer.ppo.ray.num_actor_workers=2", "trainer.ppo.ray.resources_per_worker={CPU: 0.5}",
        "trainer.ppo.ray.colocate=[[critic,initial_policy]]"]
    engines = load_example_script("train_gpt_ppo_actor").run(
        ppo_cfg(tmp_path, vllm_model_dir, prompts_file, *common, *vllm_overrides("ppo"), run="vllm"),
        reward_fn=_fraction_reward_by_value())

    assert engines["ray_roles"].groups == [["critic", "initial_policy"], ["rollout"], ["rollout:1"]]
    history = engines["history"]
    assert len(history) == 2
    for step, metrics in enumerate(history, start=1):
        assert metrics["time_refit"] > 0 and metrics["rollout_logprob_mismatch"] < 1e-3, step
    assert history[1]["init_policy_kl"] > 1.0, history[1]  # step 2's rollouts: far from the initial policy (~32 nats)
    assert set(refits) == {"rollout", "rollout:1"} and all(n >= 2 for n in refits.values()), refits


def test_rollout_in_colocate_is_a_known_role():
    """``rollout`` is accepted in ``trainer.ppo.ray.colocate``; a typo is an error naming the key and the roles."""
    from nemo_aligner.recipes.ray_ppo import PPORayConfig
    from nemo_aligner.utils.config import ConfigValueError

    ok = PPORayConfig.from_cfg({"enable": True, "colocate": [["critic", "rollout"]]})
    assert ok.groups(["critic", "initial_policy", "rollout"]) == [["critic", "rollout"], ["initial_policy"]]
    # the engines of actor ranks > 0 get bundles of their own, after rank 0's
    assert ok.groups(["critic", "initial_policy", "rollout", "rollout:2", "rollout:1"]) == [
        ["critic", "rollout"], ["initial_policy"], ["rollout:1"], ["rollout:2"]]
    with pytest.raises(ConfigValueError, match=r"trainer.ppo.ray.colocate: unknown role 'rollot'.*'rollout'"):
        PPORayConfig.from_cfg({"enable": True, "colocate": [["rollot"]]})
