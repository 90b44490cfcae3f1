"""Served PPO (critic, initial policy and reward model behind loopback HTTP servers) against colocated PPO."""

from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from nemo_aligner.servers.app import BackgroundServer
from nemo_aligner.servers.client import HTTPClient, ServerRequestError
from nemo_aligner.utils.config import CONF_DIR

from conftest import load_example_script
from test_ppo import one_torch_thread, ppo_cfg, write_prompts  # noqa: F401 (autouse fixture: one torch thread)

COMPARED = ["rewards_mean", "init_policy_kl", "advantages_mean", "returns_mean", "value_loss", "explained_variance",
            "policy_loss", "clip_fraction", "approx_kl", "entropy", "response_lengths_mean"]


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


def compose_cfg(name, *overrides):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(name, overrides=list(overrides))


def test_served_matches_colocated_first_step(tmp_path, tiny_model_dir, rm_dir):
    prompts = write_prompts(tmp_path / "prompts.jsonl")
    common = ["trainer.ppo.max_steps=1", "trainer.ppo.ppo_epochs=2", "model.global_batch_size=4",
              "model.optim.lr=1e-3", "critic.optim.lr=1e-3", "trainer.ppo.val_check_interval=0",
              f"reward_model.restore_from_path={rm_dir}", f"critic.restore_from_path={rm_dir}",
              "exp_manager.export_hf=false"]
    actor = load_example_script("train_gpt_ppo_actor")

    colocated = actor.run(ppo_cfg(tmp_path, tiny_model_dir, prompts, *common, run="colocated"))["history"][0]

    critic_script = load_example_script("serve_ppo_critic")
    policy_script = load_example_script("serve_initial_policy")
    rm_script = load_example_script("serve_reward_model")
    critic_app, _ = critic_script.build(compose_cfg(
        "gpt_ppo_critic", "trainer.accelerator=cpu", f"pretrained_checkpoint.restore_from_path={rm_dir}",
        "model.optim.lr=1e-3", "model.global_batch_size=4", "model.micro_batch_size=4", "trainer.ppo.ppo_epochs=2",
        "trainer.ppo.max_steps=4",  # the colocated critic's LR schedule: 1 PPO step x 2 epochs x 2 batches
        f"exp_manager.explicit_log_dir={tmp_path / 'critic'}", "exp_manager.export_hf=false"))
    policy_app, _ = policy_script.build(compose_cfg(
        "inference_initial_policy", "trainer.accelerator=cpu", f"pretrained_checkpoint.restore_from_path={tiny_model_dir}"))
    rm_app, _ = rm_script.build(compose_cfg("inference_rm", "trainer.accelerator=cpu", f"rm_model_file={rm_dir}"))
    with BackgroundServer(critic_app) as critic_url, BackgroundServer(policy_app) as policy_url, \
            BackgroundServer(rm_app) as rm_url:
        port = lambda url: url.rsplit(":", 1)[1]  # noqa: E731
        served_out = actor.run(ppo_cfg(
            tmp_path, tiny_model_dir, prompts, *common, "remote_critic_rm.enable=true",
            f"remote_critic_rm.critic.port={port(critic_url)}",
            f"remote_critic_rm.initial_policy.port={port(policy_url)}",
            f"remote_critic_rm.reward_model.port={port(rm_url)}", run="served"))
        served = served_out["history"][0]
        # the critic checkpoint of the step was written by the server, beside nothing in the actor's run dir
        assert (tmp_path / "critic" / "checkpoints" / "step=0000001" / "state.pt").is_file()
        with HTTPClient(critic_url, max_retries=0) as client:
            with pytest.raises(ServerRequestError) as err:
                client.post("/infer", {"token_ids": [[1, 2]], "prompt_lengths": [5]})
            assert err.value.status_code == 422
    assert colocated["clip_fraction"] > 0  # the second PPO epoch moves the ratio: the clipped loss is exercised
    for key in COMPARED:
        assert served[key] == pytest.approx(colocated[key], rel=1e-4, abs=1e-5), key


def test_served_kill_and_resume_matches_uninterrupted_run(tmp_path, tiny_model_dir, rm_dir, monkeypatch):
    """Served mode: 4 steps straight vs. a run that crashes in step 3 after the critic server has already trained
    on step 3's rollouts, then resumes from the step-2 checkpoint (the still-running critic server is told to
    reload its step-2 checkpoint, undoing that update): the same per-step metrics and the same final actor and
    critic weights."""
    from nemo_aligner.algorithms.ppo import PPOTrainer
    from test_ppo import LEARNING_OVERRIDES, _Killed, _state

    prompts = write_prompts(tmp_path / "prompts.jsonl")
    actor = load_example_script("train_gpt_ppo_actor")
    critic_script = load_example_script("serve_ppo_critic")
    policy_app, _ = load_example_script("serve_initial_policy").build(compose_cfg(
        "inference_initial_policy", "trainer.accelerator=cpu", f"pretrained_checkpoint.restore_from_path={tiny_model_dir}"))
    rm_app, _ = load_example_script("serve_reward_model").build(
        compose_cfg("inference_rm", "trainer.accelerator=cpu", f"rm_model_file={rm_dir}"))

    def critic_app(name):
        return critic_script.build(compose_cfg(
            "gpt_ppo_critic", "trainer.accelerator=cpu", f"pretrained_checkpoint.restore_from_path={rm_dir}",
            "model.optim.lr=1e-3", "model.optim.sched.min_lr=1e-4", "model.global_batch_size=8",
            "model.micro_batch_size=4", "trainer.ppo.ppo_epochs=2", "trainer.ppo.max_steps=8",
            f"exp_manager.explicit_log_dir={tmp_path / name}", "exp_manager.export_hf=false"))[0]

    def cfg(run, critic_url, policy_url, rm_url):
        port = lambda url: url.rsplit(":", 1)[1]  # noqa: E731
        return ppo_cfg(tmp_path, tiny_model_dir, prompts, *LEARNING_OVERRIDES, "trainer.ppo.max_steps=4",
                       "trainer.ppo.save_interval=2", "trainer.ppo.val_check_interval=2",
                       "model.optim.sched.min_lr=1e-3", "model.ppo.num_rollout_samples=8",
                       "exp_manager.export_hf=false", "remote_critic_rm.enable=true",
                       f"remote_critic_rm.critic.port={port(critic_url)}",
                       f"remote_critic_rm.initial_policy.port={port(policy_url)}",
                       f"remote_critic_rm.reward_model.port={port(rm_url)}", run=run)

    original_train_actor, before_kill = PPOTrainer.train_actor, []

    def die_in_step_3(self, rollouts, seed):  # the critic has trained on this step's rollouts already
        if self.step == 2:
            before_kill.extend(self.history)
            raise _Killed
        return original_train_actor(self, rollouts, seed)

    with BackgroundServer(policy_app) as policy_url, BackgroundServer(rm_app) as rm_url:
        with BackgroundServer(critic_app("critic_straight")) as critic_url:
            straight = actor.run(cfg("straight", critic_url, policy_url, rm_url))
        with BackgroundServer(critic_app("critic_resumed")) as critic_url:
            monkeypatch.setattr(PPOTrainer, "train_actor", die_in_step_3)
            with pytest.raises(_Killed):
                actor.run(cfg("resumed", critic_url, policy_url, rm_url))
            monkeypatch.setattr(PPOTrainer, "train_actor", original_train_actor)
            resumed = actor.run(cfg("resumed", critic_url, policy_url, rm_url))
    assert len(resumed["history"]) == 2
    history = before_kill + resumed["history"]
    for step, (a, b) in enumerate(zip(straight["history"], history), start=1):
        for key in sorted(a):
            if not (key.startswith("time_") or key == "step_time"):
                assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-6), (step, key)
    for a_dir, b_dir in [(Path(straight["log_dir"]) / "checkpoints", Path(resumed["log_dir"]) / "checkpoints"),
                         (tmp_path / "critic_straight" / "checkpoints", tmp_path / "critic_resumed" / "checkpoints")]:
        a, b = _state(a_dir / "step=0000004"), _state(b_dir / "step=0000004")
        assert a.keys() == b.keys() and len(a) > 0
        for name in a:
            assert torch.equal(a[name], b[name]), (a_dir, name)
