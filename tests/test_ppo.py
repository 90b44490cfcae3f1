"""PPO: the math against hand-computed values, the critic, and colocated training on tiny models."""

import math

import pytest
import torch

from nemo_aligner.algorithms.ppo import PPOConfig, compute_advantages
from nemo_aligner.utils.ppo_utils import (
    calculate_gae,
    calculate_kl_penalty,
    entropy_from_logits,
    explained_variance,
    flat_to_padded,
    kl_penalized_token_rewards,
    masked_mean,
    masked_whiten,
    padded_to_flat,
    ppo_policy_loss,
    ppo_value_loss,
)


# ---------------------------------------------------------------------------------------------------------------
# math
# ---------------------------------------------------------------------------------------------------------------
def test_flat_padded_round_trip():
    values = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
    seq_id = torch.tensor([0, 0, 0, 1, 2, 2])
    padded, mask = flat_to_padded(values, seq_id, 3)
    assert padded.tolist() == [[1, 2, 3], [4, 0, 0], [5, 6, 0]]
    assert mask.tolist() == [[1, 1, 1], [1, 0, 0], [1, 1, 0]]
    assert padded_to_flat(padded, mask).tolist() == values.tolist()
    with pytest.raises(ValueError):
        flat_to_padded(values, torch.tensor([0, 1, 0, 1, 2, 2]), 3)


def test_kl_penalty_and_token_rewards_by_hand():
    logp, init = torch.tensor([-1.0, -2.0]), torch.tensor([-1.5, -1.0])
    assert calculate_kl_penalty(logp, init, use_absolute_kl=False).tolist() == [0.5, -1.0]
    assert calculate_kl_penalty(logp, init, use_absolute_kl=True).tolist() == [0.5, 1.0]
    mask = torch.ones(1, 2)
    # r_t = -beta * kl_t, plus the sequence reward 3.0 at the last token (Ouyang et al. 2022 eq. 2)
    r_abs = kl_penalized_token_rewards(torch.tensor([3.0]), torch.tensor([[0.5, 1.0]]), mask, 0.1)
    assert r_abs[0].tolist() == pytest.approx([-0.05, 2.9])
    r_signed = kl_penalized_token_rewards(torch.tensor([3.0]), torch.tensor([[0.5, -1.0]]), mask, 0.1)
    assert r_signed[0].tolist() == pytest.approx([-0.05, 3.1])
    # a shorter, padded second response: its reward lands on its own last token, padding stays 0
    r = kl_penalized_token_rewards(torch.tensor([1.0, 2.0]), torch.zeros(2, 3), torch.tensor([[1.0, 1, 1], [1, 0, 0]]), 0.5)
    assert r.tolist() == [[0, 0, 1.0], [2.0, 0, 0]]
    with pytest.raises(ValueError):
        kl_penalized_token_rewards(torch.tensor([1.0]), torch.zeros(1, 2), torch.zeros(1, 2), 0.1)


def test_gae_by_hand():
    gamma, lam = 0.9, 0.8
    rewards = torch.tensor([[0.1, -0.2, 1.0], [2.0, 0.0, 0.0]])
    values = torch.tensor([[0.5, 0.4, 0.3], [0.5, 9.0, 9.0]])  # 9.0s are padding and must be ignored
    mask = torch.tensor([[1.0, 1, 1], [1, 0, 0]])
    adv, ret = calculate_gae(rewards, values, mask, gamma, lam)
    # delta_2 = 1.0 - 0.3 = 0.7                     A_2 = 0.7
    # delta_1 = -0.2 + 0.9*0.3 - 0.4 = -0.33        A_1 = -0.33 + 0.72*0.7 = 0.174
    # delta_0 = 0.1 + 0.9*0.4 - 0.5 = -0.04         A_0 = -0.04 + 0.72*0.174 = 0.08528
    assert adv[0].tolist() == pytest.approx([0.08528, 0.174, 0.7], abs=1e-6)
    assert ret[0].tolist() == pytest.approx([0.58528, 0.574, 1.0], abs=1e-6)
    assert adv[1].tolist() == pytest.approx([1.5, 0.0, 0.0])  # terminal after one token: 2.0 - 0.5
    assert ret[1].tolist() == pytest.approx([2.0, 0.0, 0.0])
    # gamma = lambda = 1: A_t = sum of future rewards - V_t (Monte-Carlo advantage)
    adv1, _ = calculate_gae(rewards[:1], values[:1], mask[:1], 1.0, 1.0)
    assert adv1[0].tolist() == pytest.approx([0.9 - 0.5, 0.8 - 0.4, 1.0 - 0.3])
    # lambda = 0: one-step TD errors
    adv0, _ = calculate_gae(rewards[:1], values[:1], mask[:1], gamma, 0.0)
    assert adv0[0].tolist() == pytest.approx([-0.04, -0.33, 0.7], abs=1e-6)
    with pytest.raises(ValueError):
        calculate_gae(rewards, values, mask, 1.5, 0.9)


def test_policy_loss_by_hand():
    old = torch.log(torch.tensor([0.5, 0.5, 0.5]))
    new = torch.log(torch.tensor([0.75, 0.25, 0.55])).requires_grad_(True)  # ratios 1.5, 0.5, 1.1
    adv = torch.tensor([1.0, -2.0, 1.0])
    loss, metrics = ppo_policy_loss(new, old, adv, ratio_eps=0.2)
    # token 0: max(-1.5, -1.2) = -1.2 (clipped); token 1: max(1.0, 1.6) = 1.6 (clipped); token 2: -1.1 (inside)
    assert float(loss) == pytest.approx((-1.2 + 1.6 - 1.1) / 3, abs=1e-6)
    assert float(metrics["clip_fraction"]) == pytest.approx(2 / 3)
    expected_kl = 0.5 * (math.log(1.5) ** 2 + math.log(0.5) ** 2 + math.log(1.1) ** 2) / 3
    assert float(metrics["approx_kl"]) == pytest.approx(expected_kl, rel=1e-5)
    loss.backward()
    # clipped tokens get no gradient; d/dlogp of -A*rho/3 = -A*rho/3 for the unclipped one
    assert new.grad.tolist() == pytest.approx([0.0, 0.0, -1.1 / 3], abs=1e-6)
    # ratio 1 everywhere: loss = -mean(A)
    same, _ = ppo_policy_loss(old, old, adv, 0.2)
    assert float(same) == pytest.approx(-adv.mean().item())


def test_value_loss_by_hand():
    values = torch.tensor([1.0, 0.0], requires_grad=True)
    old, returns = torch.tensor([0.5, 0.5]), torch.tensor([2.0, 0.4])
    loss, metrics = ppo_value_loss(values, old, returns, clip_val=0.2)
    # token 0: max((1-2)^2, (0.7-2)^2) = 1.69; token 1: max((0-0.4)^2, (0.3-0.4)^2) = 0.16
    assert float(loss) == pytest.approx(0.5 * (1.69 + 0.16) / 2)
    assert float(metrics["value_clip_fraction"]) == 0.5
    loss.backward()
    assert values.grad.tolist() == pytest.approx([0.0, 0.5 * 2 * (0.0 - 0.4) / 2])  # clipped branch is constant in V
    plain, _ = ppo_value_loss(values.detach(), old, returns, clip_val=None)
    assert float(plain) == pytest.approx(0.5 * (1.0 + 0.16) / 2)


def test_whiten_entropy_explained_variance():
    x = torch.tensor([1.0, 2.0, 3.0, 100.0])
    mask = torch.tensor([1.0, 1.0, 1.0, 0.0])
    w = masked_whiten(x, mask)
    assert w.tolist() == pytest.approx([-1.0, 0.0, 1.0, 0.0], abs=1e-4)  # mean 2, unbiased var 1
    assert float(masked_mean(x, mask)) == 2.0
    assert entropy_from_logits(torch.zeros(2, 4)).tolist() == pytest.approx([math.log(4)] * 2)
    assert float(entropy_from_logits(torch.tensor([[0.0, -1e4]]))) == pytest.approx(0.0, abs=1e-6)
    returns = torch.tensor([1.0, 2.0, 3.0, 4.0])
    assert float(explained_variance(returns, returns)) == pytest.approx(1.0)
    assert float(explained_variance(torch.full((4,), 2.5), returns)) == pytest.approx(0.0)
    assert float(explained_variance(torch.tensor([4.0, 3, 2, 1]), returns)) == pytest.approx(1 - 5.0 / 1.25)


def test_compute_advantages_matches_hand_gae():
    cfg = PPOConfig(initial_policy_kl_penalty=0.1, use_absolute_kl=False, discount_factor=1.0, gae_lambda=1.0,
                    normalize_advantages=False)
    rollouts = [
        {"logprobs": [-1.0, -1.0], "init_logprobs": [-1.5, -0.5], "values": [0.2, 0.1], "reward": 1.0},
        {"logprobs": [-2.0], "init_logprobs": [-2.0], "values": [0.3], "reward": -1.0},
    ]
    stats = compute_advantages(rollouts, cfg)
    # rollout 0: kl = [0.5, -0.5]; token rewards [-0.05, 0.05 + 1.0]; gamma=lambda=1: A_t = sum_{k>=t} r_k - V_t
    assert rollouts[0]["advantages"] == pytest.approx([1.0 - 0.2, 1.05 - 0.1])
    assert rollouts[0]["returns"] == pytest.approx([1.0, 1.05])
    assert rollouts[1]["advantages"] == pytest.approx([-1.3])
    assert stats["init_policy_kl"] == pytest.approx(0.0)  # (0.5 - 0.5 + 0) / 2 responses
    cfg.normalize_advantages = True
    compute_advantages(rollouts, cfg)
    flat = torch.tensor([a for r in rollouts for a in r["advantages"]])
    assert float(flat.mean()) == pytest.approx(0.0, abs=1e-6)
    assert float(flat.std()) == pytest.approx(1.0, abs=1e-4)


# ---------------------------------------------------------------------------------------------------------------
# end to end on tiny models (colocated)
# ---------------------------------------------------------------------------------------------------------------
import json  # noqa: E402
from pathlib import Path  # noqa: E402

from hydra import compose, initialize_config_dir  # noqa: E402

from nemo_aligner.utils.config import CONF_DIR  # noqa: E402

from conftest import load_example_script  # noqa: E402

TOPICS = ["bread", "tea", "rain", "maps", "owls", "jazz", "kites", "salt", "fox", "dog", "salt", "yeast"]


def write_prompts(path: Path, n: int = 16) -> Path:
    with open(path, "w") as f:
        for i in range(n):
            f.write(json.dumps({"prompt": f"Human: Tell me about {TOPICS[i % len(TOPICS)]} {i}. Assistant:"}) + "\n")
    return path


def target_fraction_reward(target_ids):
    """Programmatic reward: the fraction of response tokens that are in ``target_ids``."""
    targets = set(target_ids)

    def reward_fn(prompt_ids, response_ids):
        return [sum(t in targets for t in r) / len(r) for r in response_ids]

    return reward_fn


def ppo_cfg(tmp_path, model_dir, prompts, *overrides, run="run"):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("gpt_ppo_actor", overrides=[
            f"pretrained_checkpoint.restore_from_path={model_dir}",
            f"critic.restore_from_path={model_dir}",
            "reward_model.restore_from_path=null",
            f"model.data.data_prefix.train=[{prompts}]",
            f"model.data.data_prefix.validation=[{prompts}]",
            f"exp_manager.explicit_log_dir={tmp_path / run}",
            "trainer.accelerator=cpu",
            "model.encoder_seq_length=64",
            "model.ppo.length_params.max_length=8",
            "model.ppo.num_rollout_samples=8",
            "model.ppo.rollout_micro_batch_size=4",
            "model.ppo.num_val_samples=8",
            "model.global_batch_size=8",
            "model.micro_batch_size=4",
            *overrides,
        ])


@pytest.fixture(scope="module")
def ppo_script():
    return load_example_script("train_gpt_ppo_actor")


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Tiny models on a shared 2-core machine: one intra-op thread is ~20x faster than two (no OpenMP barriers
    waiting on a descheduled thread), and the numbers do not depend on the thread count."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


LEARNING_OVERRIDES = [
    "trainer.ppo.max_epochs=100", "trainer.ppo.ppo_epochs=2", "trainer.ppo.gae_lambda=1.0",
    "trainer.ppo.val_check_interval=0", "model.ppo.num_rollout_samples=16", "model.ppo.length_params.max_length=4",
    "model.optim.lr=1e-2", "model.optim.sched.min_lr=1e-2", "critic.optim.lr=1e-3",
]


def test_colocated_ppo_raises_programmatic_reward(tmp_path, tiny_model_dir, ppo_script):
    """Reward = fraction of response tokens among ids 3..79 (about 24% of the vocabulary under the random policy).

    10 PPO steps of 16 four-token responses at lr 1e-2: the mean reward goes from ~0.2 to ~0.8 (seeds 1-6 all
    rise by more than 0.3 between the first and last three steps); a few seconds on one CPU thread.
    """
    prompts = write_prompts(tmp_path / "prompts.jsonl")
    cfg = ppo_cfg(tmp_path, tiny_model_dir, prompts, *LEARNING_OVERRIDES,
                  "trainer.ppo.max_steps=10", "trainer.ppo.save_interval=5")
    out = ppo_script.run(cfg, reward_fn=target_fraction_reward(range(3, 80)))
    rewards = [m["rewards_mean"] for m in out["history"]]
    first, last = sum(rewards[:3]) / 3, sum(rewards[-3:]) / 3
    assert first < 0.35, rewards  # starts near the random policy's ~0.24
    assert last > first + 0.2, rewards
    assert out["history"][-1]["init_policy_kl"] > 0  # the policy moved away from the initial policy
    run = Path(out["log_dir"])
    assert (run / "checkpoints" / "step=0000010" / "state.pt").is_file()
    assert (run / "critic_checkpoints" / "step=0000010" / "state.pt").is_file()
    assert (run / "hf_export" / "model.safetensors").is_file()
    assert list((run / "val_samples").glob("step=*.md"))


class _Killed(Exception):
    """Stands in for a SIGKILL right after a checkpoint."""


def _state(path: Path) -> dict:
    return torch.load(path / "state.pt", map_location="cpu", weights_only=False)["model"]


def test_kill_and_resume_matches_uninterrupted_run(tmp_path, tiny_model_dir, ppo_script, monkeypatch):
    """K=4 PPO steps in one go vs. 2 steps, a crash right after the step-2 checkpoint, and a resume to 4: the same
    per-step metrics and the same final actor and critic weights (cosine LR schedule, Adam state, data position,
    per-step sampling seeds and the validation in between all restored)."""
    prompts = write_prompts(tmp_path / "prompts.jsonl")
    overrides = [*LEARNING_OVERRIDES, "trainer.ppo.max_steps=4", "trainer.ppo.save_interval=2",
                 "trainer.ppo.val_check_interval=1", "model.optim.sched.min_lr=1e-3", "critic.optim.sched.min_lr=1e-4",
                 "model.ppo.num_rollout_samples=8", "exp_manager.export_hf=false",
                 "exp_manager.checkpoint_callback_params.save_top_k=1"]
    reward = target_fraction_reward(range(3, 80))
    straight = ppo_script.run(ppo_cfg(tmp_path, tiny_model_dir, prompts, *overrides, run="straight"), reward_fn=reward)

    from nemo_aligner.algorithms.ppo import PPOTrainer

    original_save, before_kill = PPOTrainer._save, []

    def save_then_die(self):
        original_save(self)
        if self.step == 2:
            before_kill.extend(self.history)
            raise _Killed

    monkeypatch.setattr(PPOTrainer, "_save", save_then_die)
    resumed_cfg = ppo_cfg(tmp_path, tiny_model_dir, prompts, *overrides, run="resumed")
    with pytest.raises(_Killed):
        ppo_script.run(resumed_cfg, reward_fn=reward)
    monkeypatch.setattr(PPOTrainer, "_save", original_save)
    resumed = ppo_script.run(resumed_cfg, reward_fn=reward)
    assert resumed["trainer"].step == 4 and len(resumed["history"]) == 2  # it went on from step 2, not from 0

    history = before_kill + resumed["history"]
    assert len(history) == len(straight["history"]) == 4
    for step, (a, b) in enumerate(zip(straight["history"], history), start=1):
        for key in sorted(a):
            if key.startswith("time_") or key == "step_time":
                continue
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-6), (step, key)
    assert resumed["val"] == pytest.approx(straight["val"])
    for sub in ("checkpoints", "critic_checkpoints"):
        a = _state(Path(straight["log_dir"]) / sub / "step=0000004")
        b = _state(Path(resumed["log_dir"]) / sub / "step=0000004")
        assert a.keys() == b.keys() and len(a) > 0
        for name in a:
            assert torch.equal(a[name], b[name]), (sub, name)


def test_local_critic_reset_restores_the_initial_state(tmp_path, tiny_model_dir):
    """A critic built from a causal-LM checkpoint (random score head), trained for a step, then reset: the same
    weights (head included), an optimizer without moments, the LR schedule at step 0, the RNG state of just after
    construction, so a second training step gives the first one's metrics exactly. An untouched critic's reset is a
    no-op (nothing re-read)."""
    from omegaconf import OmegaConf

    from nemo_aligner.algorithms.ppo import LocalCritic
    from nemo_aligner.models.critic import HFCritic
    from nemo_aligner.utils.runtime import build_fabric

    fabric = build_fabric(OmegaConf.create({"accelerator": "cpu", "devices": 1}), seed=5)
    model_cfg = OmegaConf.create({"optim": {"name": "adamw", "lr": 1e-2, "sched": {"warmup_steps": 1}}})
    hf = HFCritic(fabric, model_cfg, str(tiny_model_dir), max_steps=4)
    critic = LocalCritic(hf, tmp_path / "critic_checkpoints", forward_micro_batch_size=4, global_batch_size=2,
                         micro_batch_size=1)
    weights = lambda: {k: v.detach().clone() for k, v in hf.module.state_dict().items()}  # noqa: E731
    initial, lr0, rng0 = weights(), hf.optimizer.param_groups[0]["lr"], torch.get_rng_state()
    rollouts = [{"input_ids": [1, 5 + i, 9, 12 + i, 7], "prompt_length": 2, "values": [0.0, 0.1, 0.2],
                 "returns": [1.0, 0.5, float(i)]} for i in range(4)]

    calls = []
    original_reset = hf.reset
    hf.reset = lambda: (calls.append(1), original_reset())[1]
    critic.reset()
    assert calls == []  # nothing changed yet: no reload
    first = critic.train(rollouts, seed=3, step=0)
    assert first["critic_optimizer_steps"] == 2 and len(hf.optimizer.state) > 0
    assert any(not torch.equal(v, weights()[k]) for k, v in initial.items())
    torch.manual_seed(99)  # whatever happened to the global RNG since start-up is undone too
    critic.reset()
    assert calls == [1]
    after = weights()
    assert after.keys() == initial.keys() and all(torch.equal(initial[k], after[k]) for k in initial)
    assert len(hf.optimizer.state) == 0 and hf.scheduler.last_epoch == 0
    assert hf.optimizer.param_groups[0]["lr"] == lr0 and torch.equal(torch.get_rng_state(), rng0)
    assert critic.train(rollouts, seed=3, step=0) == first


def test_critic_warmup_takes_no_ppo_step_and_resumes_exactly(tmp_path, tiny_model_dir, ppo_script, monkeypatch):
    """critic_warmup_steps=2, max_steps=3 (NeMo-Aligner's warm-up): 3 PPO steps that all update the actor, on 3
    prompt batches; step 1 first trains the critic on 2 extra rollout buffers (2 x 2 optimizer steps, in the critic's
    LR schedule of (3 + 2) x 2 steps). A crash after the step-2 checkpoint and a resume (no second warm-up) give the
    uninterrupted run's metrics and final weights."""
    from nemo_aligner.algorithms.ppo import PPOTrainer

    prompts = write_prompts(tmp_path / "prompts.jsonl")
    overrides = [*LEARNING_OVERRIDES, "trainer.ppo.critic_warmup_steps=2", "trainer.ppo.max_steps=3",
                 "trainer.ppo.save_interval=2", "trainer.ppo.val_check_interval=1", "model.ppo.num_rollout_samples=8",
                 "critic.optim.sched.min_lr=1e-4", "exp_manager.export_hf=false"]
    reward = target_fraction_reward(range(3, 80))
    straight = ppo_script.run(ppo_cfg(tmp_path, tiny_model_dir, prompts, *overrides, run="straight"), reward_fn=reward)
    hist = straight["history"]
    assert straight["trainer"].step == 3 and len(hist) == 3
    assert [h["actor_optimizer_steps"] for h in hist] == [2, 2, 2]  # ppo_epochs=2 x one global batch of 8
    assert [h["consumed_samples"] for h in hist] == [8, 16, 24]
    assert hist[0]["critic_warmup_optimizer_steps"] == 4 and "critic_warmup_optimizer_steps" not in hist[1]
    assert [h["critic_optimizer_steps"] for h in hist] == [2, 2, 2]
    critic_state = torch.load(Path(straight["log_dir"]) / "critic_checkpoints" / "step=0000003" / "state.pt",
                              map_location="cpu", weights_only=False)
    assert critic_state["scheduler"]["last_epoch"] == 10  # (3 PPO steps + 2 warm-up buffers) x 2
    assert critic_state["optimizer"]["param_groups"][0]["lr"] == pytest.approx(1e-4)  # the schedule ran to its end

    original_save, before_kill = PPOTrainer._save, []

    def save_then_die(self):
        original_save(self)
        if self.step == 2:
            before_kill.extend(self.history)
            raise _Killed

    monkeypatch.setattr(PPOTrainer, "_save", save_then_die)
    resumed_cfg = ppo_cfg(tmp_path, tiny_model_dir, prompts, *overrides, run="resumed")
    with pytest.raises(_Killed):
        ppo_script.run(resumed_cfg, reward_fn=reward)
    monkeypatch.setattr(PPOTrainer, "_save", original_save)
    resumed = ppo_script.run(resumed_cfg, reward_fn=reward)
    assert resumed["trainer"].step == 3 and len(resumed["history"]) == 1
    assert "critic_warmup_optimizer_steps" not in resumed["history"][0]  # no second warm-up after a resume
    for step, (a, b) in enumerate(zip(hist, before_kill + resumed["history"]), start=1):
        assert a.keys() == b.keys(), step
        for key in sorted(a):
            if not (key.startswith("time_") or key == "step_time"):
                assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-6), (step, key)
    for sub in ("checkpoints", "critic_checkpoints"):
        a = _state(Path(straight["log_dir"]) / sub / "step=0000003")
        b = _state(Path(resumed["log_dir"]) / sub / "step=0000003")
        assert a.keys() == b.keys() and len(a) > 0
        for name in a:
            assert torch.equal(a[name], b[name]), (sub, name)
