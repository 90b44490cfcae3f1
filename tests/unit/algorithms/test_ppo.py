"""PPO: the math against hand-computed values, the critic, and colocated training on tiny models."""

import math

import pytest
import torch

from nemo_aligner.algorithms.ppo import PPOConfig, compute_advantages
from nemo_aligner.data.rollouts import Rollouts
from nemo_aligner.algorithms.ppo_math import (
    calculate_gae,
    calculate_kl_penalty,
    explained_variance,
    flat_to_padded,
    kl_penalized_token_rewards,
    masked_mean,
    masked_whiten,
    padded_to_flat,
    ppo_policy_loss,
    ppo_value_loss,
)
from nemo_aligner.models.hf_causal_lm import entropy_from_logits


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
    rollouts = Rollouts.from_lists([[1], [1, 3]], [[5, 6], [7]], rewards=[1.0, -1.0],
                                   logprobs=[[-1.0, -1.0], [-2.0]], init_logprobs=[[-1.5, -0.5], [-2.0]],
                                   values=[[0.2, 0.1], [0.3]])
    stats = compute_advantages(rollouts, cfg)
    advantages, returns = rollouts.per_sequence(rollouts.advantages), rollouts.per_sequence(rollouts.returns)
    # rollout 0: kl = [0.5, -0.5]; token rewards [-0.05, 0.05 + 1.0]; gamma=lambda=1: A_t = sum_{k>=t} r_k - V_t
    assert advantages[0] == pytest.approx([1.0 - 0.2, 1.05 - 0.1])
    assert returns[0] == pytest.approx([1.0, 1.05])
    assert advantages[1] == pytest.approx([-1.3])
    assert stats["init_policy_kl"] == pytest.approx(0.0)  # (0.5 - 0.5 + 0) / 2 responses
    cfg.normalize_advantages = True
    compute_advantages(rollouts, cfg)
    flat = rollouts.advantages
    assert flat.dtype == torch.float32 and flat.shape == (3,)
    assert float(flat.mean()) == pytest.approx(0.0, abs=1e-6)
    assert float(flat.std()) == pytest.approx(1.0, abs=1e-4)


# ---------------------------------------------------------------------------------------------------------------
# end to end on tiny models (colocated)
# ---------------------------------------------------------------------------------------------------------------
from pathlib import Path  # noqa: E402

from tests.helpers import LEARNING_OVERRIDES, load_example_script, ppo_cfg, write_prompts  # noqa: E402
from tests.helpers import Killed as _Killed  # noqa: E402
from tests.helpers import checkpoint_model_state as _state  # noqa: E402


def target_fraction_reward(target_ids):
    """Programmatic reward: the fraction of response tokens that are in ``target_ids``."""
    targets = set(target_ids)

    def reward_fn(prompt_ids, response_ids):
        return [sum(t in targets for t in r) / len(r) for r in response_ids]

    return reward_fn


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
    rollouts = Rollouts.from_lists([[1, 5 + i] for i in range(4)], [[9, 12 + i, 7] for i in range(4)],
                                   values=[[0.0, 0.1, 0.2]] * 4, returns=[[1.0, 0.5, float(i)] for i in range(4)])

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


# ---------------------------------------------------------------------------------------------------------------
# data-parallel seeding of PPO rollouts
# ---------------------------------------------------------------------------------------------------------------
def test_ppo_rollouts_differ_across_ranks_and_match_a_one_rank_run(tmp_path, tokenizer):
    """PPO rollouts of step 0 and validation rollouts on 2 simulated ranks (the same prompt text everywhere): the
    ranks' responses differ, and each global prompt gets the response of a 1-rank run (other rollout micro-batches).
    The step stops at the first log-prob forward after generation."""
    from tests.helpers import build_tiny_model
    from tests.helpers import EnginePolicy, step_responses_by_global_index

    from nemo_aligner.algorithms.base import RunContext
    from nemo_aligner.algorithms.online import RolloutSetup
    from nemo_aligner.algorithms.ppo import PPOTrainer
    from nemo_aligner.generation import LengthParams, SamplingParams
    from nemo_aligner.utils.checkpoint import CheckpointManager

    class Generated(Exception):
        pass

    class Actor(EnginePolicy):
        def get_logprobs(self, batch, reference=False):
            raise Generated

    class Unused:
        shared = False  # a colocated critic (read by PPOTrainer's batch-size check)

        def __getattr__(self, name):
            raise Generated

    lm = build_tiny_model("llama", len(tokenizer), seed=5).eval()
    prompt = tokenizer("Human: How do I bake bread? Assistant:", add_special_tokens=False)["input_ids"]

    def run(rank: int, world_size: int, rollout_micro_batch_size: int):
        actor = Actor(lm, rank, world_size)
        cfg = PPOConfig(num_rollout_samples=4, rollout_micro_batch_size=rollout_micro_batch_size, global_batch_size=4,
                        critic_global_batch_size=4, max_steps=1, num_val_samples=4)
        setup = RolloutSetup([prompt] * 12, [prompt] * 4, SamplingParams(top_p=0.95), LengthParams(max_length=8))
        checkpoints = CheckpointManager(tmp_path / f"ckpt-{rank}-{world_size}")
        context = RunContext(tmp_path / f"{rank}-{world_size}", checkpoints, export_hf=False)
        trainer = PPOTrainer(actor, Unused(), Unused(), lambda p, r: [0.0] * len(r), setup, cfg, context)
        with pytest.raises(Generated):
            trainer.train_step()
        step = step_responses_by_global_index(actor, trainer, 1)
        # validation rollouts: rank r has validation prompts r, r + W, ...
        val_rollouts = trainer.validation_rollouts(trainer.sampling_params, rollout_micro_batch_size)
        val = {rank + world_size * p: response
               for p, response in zip(val_rollouts.prompt_index.tolist(), val_rollouts.responses())}
        return step, val

    (rank0, val0), (rank1, val1) = run(0, 2, 1), run(1, 2, 2)
    assert len(rank0) == len(rank1) == 2 and not rank0.keys() & rank1.keys()
    assert all(a != b for a, b in zip(rank0.values(), rank1.values())), (rank0, rank1)
    assert sorted(val0) == [0, 2] and sorted(val1) == [1, 3]
    assert all(a != b for a, b in zip(val0.values(), val1.values())), (val0, val1)
    assert run(0, 1, 4) == ({**rank0, **rank1}, {**val0, **val1})


# ---------------------------------------------------------------------------------------------------------------
# truncated rollouts (model.ppo.mask_truncated, NeMo-Aligner's is_end mask)
# ---------------------------------------------------------------------------------------------------------------
class _TableActor:
    """A stand-in actor for :meth:`PPOTrainer.train_actor`: ``log pi(token) = theta[token]`` (one parameter per
    token id, 0 at the start, so every ratio is 1); ``backward`` accumulates into ``theta.grad`` and
    ``finish_training_step`` records it."""

    data_parallel_size, data_parallel_rank, pad_token_id, device = 1, 0, 0, torch.device("cpu")

    def __init__(self, vocab: int = 16):
        self.theta = torch.zeros(vocab, requires_grad=True)
        self.grads, self.losses = [], []

    def prepare_for_training_step(self):
        self.theta.grad = None

    def accumulate(self, is_last):
        import contextlib

        return contextlib.nullcontext()

    def get_logprobs(self, batch, return_entropy=False):
        logprobs = self.theta[batch.targets]
        return (logprobs, torch.zeros_like(logprobs)) if return_entropy else logprobs

    def backward(self, loss):
        self.losses.append(float(loss))
        loss.backward()

    def finish_training_step(self):
        grad = self.theta.grad
        self.grads.append(torch.zeros_like(self.theta) if grad is None else grad.clone())
        return {"grad_norm": float(self.grads[-1].norm()), "lr": 0.0}

    def all_reduce_mean(self, values):
        return dict(values)


def _train_table_actor(mask_truncated: bool, micro_batch_size: int = 1):
    from types import SimpleNamespace

    from nemo_aligner.algorithms.ppo import PPOTrainer

    # rollout 0 ended at EOS (2); rollout 1 was cut at max_length (tokens 7, 8, 9); rollout 2 ended (an end string)
    rollouts = Rollouts.from_lists([[1, 4], [1, 4], [1, 6]], [[5, 2], [7, 8, 9], [11]], ended=[True, False, True],
                                   logprobs=[[0.0, 0.0], [0.0, 0.0, 0.0], [0.0]],
                                   advantages=[[1.0, 3.0], [2.0, -4.0, 5.0], [-2.0]])
    cfg = PPOConfig(ppo_epochs=1, global_batch_size=3, micro_batch_size=micro_batch_size, ratio_eps=0.2,
                    mask_truncated=mask_truncated)
    actor = _TableActor()
    trainer = SimpleNamespace(cfg=cfg, actor=actor)
    metrics = PPOTrainer.train_actor(trainer, rollouts, seed=0)
    assert len(actor.grads) == 1
    return actor.grads[0], metrics


@pytest.mark.parametrize("micro_batch_size", [1, 2, 3])
def test_mask_truncated_drops_truncated_rollouts_from_the_actor_loss(micro_batch_size):
    """At ratio 1 the clipped surrogate is ``mean_t(-A_t)`` over the tokens in the loss, so
    ``d loss / d theta[token] = -A_token / (tokens in the loss)``. With ``mask_truncated`` the truncated rollout's
    tokens (7, 8, 9) get no gradient and the mean is over the 3 tokens of the two ended rollouts; without it, over
    all 6 tokens. The same for any micro-batching of the global batch."""
    grad_on, metrics_on = _train_table_actor(True, micro_batch_size)
    expected_on = torch.zeros(16)
    for token, adv in ((5, 1.0), (2, 3.0), (11, -2.0)):
        expected_on[token] = -adv / 3
    assert torch.allclose(grad_on, expected_on, atol=1e-7), grad_on
    assert metrics_on["policy_loss"] == pytest.approx(-(1.0 + 3.0 - 2.0) / 3, abs=1e-6)

    grad_off, metrics_off = _train_table_actor(False, micro_batch_size)
    expected_off = torch.zeros(16)
    for token, adv in ((5, 1.0), (2, 3.0), (7, 2.0), (8, -4.0), (9, 5.0), (11, -2.0)):
        expected_off[token] = -adv / 6
    assert torch.allclose(grad_off, expected_off, atol=1e-7), grad_off
    assert metrics_off["policy_loss"] == pytest.approx(-(1.0 + 3.0 + 2.0 - 4.0 + 5.0 - 2.0) / 6, abs=1e-6)


def test_mask_truncated_batch_of_only_truncated_rollouts_gives_zero_gradient():
    """A global batch in which no rollout ended: a zero gradient (NeMo-Aligner's "no valid tokens" case), no NaN."""
    from types import SimpleNamespace

    from nemo_aligner.algorithms.ppo import PPOTrainer

    rollouts = Rollouts.from_lists([[1, 4]] * 2, [[7, 8]] * 2, ended=[False, False], logprobs=[[0.0, 0.0]] * 2,
                                   advantages=[[2.0, -4.0]] * 2)
    actor = _TableActor()
    cfg = PPOConfig(global_batch_size=2, micro_batch_size=1, mask_truncated=True)
    metrics = PPOTrainer.train_actor(SimpleNamespace(cfg=cfg, actor=actor), rollouts, seed=0)
    assert torch.equal(actor.grads[0], torch.zeros(16))
    assert metrics["policy_loss"] == 0.0 and all(math.isfinite(v) for v in metrics.values())


def test_mask_truncated_config_default_and_parsing(tmp_path):
    """``model.ppo.mask_truncated`` defaults to true (as NeMo-Aligner, which always masks); a string other than
    true/false is an error naming the key."""
    prompts = write_prompts(tmp_path / "prompts.jsonl")
    assert PPOConfig.from_cfg(ppo_cfg(tmp_path, "unused", prompts)).mask_truncated is True
    assert PPOConfig.from_cfg(ppo_cfg(tmp_path, "unused", prompts, "model.ppo.mask_truncated=false")).mask_truncated is False
    with pytest.raises(ValueError, match="model.ppo.mask_truncated"):
        PPOConfig.from_cfg(ppo_cfg(tmp_path, "unused", prompts, "model.ppo.mask_truncated=maybe"))

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
