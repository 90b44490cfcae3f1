"""DPO-family losses and metrics against closed-form values computed by hand."""

import math

import pytest
import torch

from nemo_aligner.algorithms.dpo import DPOLossConfig, dpo_loss_and_metrics, preference_loss, sequence_logprobs
from nemo_aligner.data.preference_batch import collate_preference_pairs

from tests.helpers import compose_config

BETA = 0.5
CHOSEN = torch.tensor([1.0, -0.5])  # log pi - log pi_ref of each chosen response
REJECTED = torch.tensor([0.2, 0.5])
GT_CHOSEN = torch.tensor([1.0, 2.0])
GT_REJECTED = torch.tensor([0.0, 0.0])


def sigmoid(x):
    return 1.0 / (1.0 + math.exp(-x))


def bernoulli_kl(p, q):
    return p * math.log(p / q) + (1 - p) * math.log((1 - p) / (1 - q))


def test_dpo_loss_closed_form():
    # delta = [0.8, -1.0]; -log sigmoid(beta * delta)
    expected = [math.log(1 + math.exp(-0.4)), math.log(1 + math.exp(0.5))]
    assert expected == pytest.approx([0.5130153, 0.9740770], abs=1e-6)
    got = preference_loss(CHOSEN, REJECTED, BETA, "dpo")
    assert got.tolist() == pytest.approx(expected, abs=1e-6)


def test_ipo_loss_closed_form():
    # (delta - 1/(2 beta))^2 = (0.8 - 1)^2, (-1 - 1)^2
    got = preference_loss(CHOSEN, REJECTED, BETA, "ipo")
    assert got.tolist() == pytest.approx([0.04, 4.0], abs=1e-6)


def test_rpo_sq_closed_form():
    # (beta * delta - gt_delta)^2 = (0.4 - 1)^2, (-0.5 - 2)^2 ; with gt_reward_scale 2: (0.4 - 2)^2, (-0.5 - 4)^2
    got = preference_loss(CHOSEN, REJECTED, BETA, "rpo_sq", GT_CHOSEN, GT_REJECTED)
    assert got.tolist() == pytest.approx([0.36, 6.25], abs=1e-6)
    scaled = preference_loss(CHOSEN, REJECTED, BETA, "rpo_sq", GT_CHOSEN, GT_REJECTED, gt_reward_scale=2.0)
    assert scaled.tolist() == pytest.approx([2.56, 20.25], abs=1e-5)


@pytest.mark.parametrize("loss_type", ["rpo_bwd_kl", "rpo_fwd_kl"])
def test_rpo_kl_closed_form(loss_type):
    expected = []
    for beta_delta, gt_delta in [(0.4, 1.0), (-0.5, 2.0)]:
        alpha, b = sigmoid(gt_delta), sigmoid(beta_delta)
        expected.append(bernoulli_kl(alpha, b) if loss_type == "rpo_bwd_kl" else bernoulli_kl(b, alpha))
    got = preference_loss(CHOSEN, REJECTED, BETA, loss_type, GT_CHOSEN, GT_REJECTED)
    assert got.tolist() == pytest.approx(expected, abs=1e-6)
    # both KLs vanish when the policy's preference probability equals the ground truth's
    zero = preference_loss(torch.tensor([2.0]), torch.tensor([0.0]), 0.5, loss_type, torch.tensor([1.0]), torch.tensor([0.0]))
    assert zero.item() == pytest.approx(0.0, abs=1e-7)


def test_loss_errors():
    with pytest.raises(ValueError, match="preference_loss"):
        preference_loss(CHOSEN, REJECTED, BETA, "kto")
    with pytest.raises(ValueError, match="ground-truth"):
        preference_loss(CHOSEN, REJECTED, BETA, "rpo_sq")
    with pytest.raises(ValueError, match="ref_policy_kl_penalty"):
        preference_loss(CHOSEN, REJECTED, 0.0, "dpo")
    with pytest.raises(ValueError, match="preference_loss"):
        DPOLossConfig.from_cfg({"preference_loss": "dpoo"})


def test_sequence_logprobs_sums_by_sequence():
    tokens = torch.tensor([-1.0, -2.0, -0.5, -3.0])
    seq = torch.tensor([0, 0, 2, 1])
    assert sequence_logprobs(tokens, seq, 3).tolist() == [-3.0, -3.0, -0.5]


def _known_batch():
    # pair 0: chosen 2 tokens, rejected 1 token; pair 1: chosen 1 token, rejected 2 tokens; pair 1 has gt rewards
    examples = [
        {"prompt_ids": [5, 6], "chosen_ids": [7, 8], "rejected_ids": [9]},
        {"prompt_ids": [5], "chosen_ids": [10], "rejected_ids": [11, 12], "chosen_reward": 3.0, "rejected_reward": 1.0},
    ]
    batch = collate_preference_pairs(examples, pad_token_id=0)
    # token logprobs by sequence: chosen0 = -1, -1 (sum -2); chosen1 = -0.5; rejected0 = -1; rejected1 = -2, -2
    per_seq = {0: [-1.0, -1.0], 1: [-0.5], 2: [-1.0], 3: [-2.0, -2.0]}
    counters = {k: 0 for k in per_seq}
    values = []
    for s in batch.seq_id.tolist():
        values.append(per_seq[s][counters[s]])
        counters[s] += 1
    return batch, torch.tensor(values)


def test_metrics_on_known_case():
    batch, logprobs = _known_batch()
    ref = torch.tensor([-3.0, -0.5, -1.5, -3.0])  # reference sums: chosen0, chosen1, rejected0, rejected1
    cfg = DPOLossConfig(ref_policy_kl_penalty=0.5, sft_loss_weight=0.25)
    loss, m = dpo_loss_and_metrics(logprobs, ref, batch, cfg)
    # log-ratios: chosen [1, 0], rejected [0.5, -1]; rewards = 0.5 * ratios
    assert m["rewards_chosen_mean"].item() == pytest.approx((0.5 + 0.0) / 2)
    assert m["rewards_rejected_mean"].item() == pytest.approx((0.25 - 0.5) / 2)
    assert m["acc"].item() == pytest.approx(1.0)  # 0.5 > 0.25 and 0 > -0.5
    pref = (math.log(1 + math.exp(-0.25)) + math.log(1 + math.exp(-0.5))) / 2
    sft = -(-2.0 + -0.5) / 2
    assert m["preference_loss"].item() == pytest.approx(pref, abs=1e-6)
    assert m["sft_loss"].item() == pytest.approx(sft, abs=1e-6)
    assert loss.item() == pytest.approx(pref + 0.25 * sft, abs=1e-6)
    assert m["chosen_lengths"].item() == 1.5 and m["rejected_lengths"].item() == 1.5

    # pair 1 ranked the wrong way (chosen ratio -1.5 < rejected ratio -1) -> acc 0.5
    _, m2 = dpo_loss_and_metrics(logprobs, torch.tensor([-3.0, 1.0, -1.5, -3.0]), batch, cfg)
    assert m2["acc"].item() == pytest.approx(0.5)


def test_average_log_probs_and_default_rewards():
    batch, logprobs = _known_batch()
    ref = torch.tensor([-3.0, -0.5, -1.5, -3.0])
    cfg = DPOLossConfig(
        ref_policy_kl_penalty=1.0, preference_loss="rpo_sq", preference_average_log_probs=True,
        default_chosen_reward=0.5, default_rejected_reward=0.25,
    )
    _, m = dpo_loss_and_metrics(logprobs, ref, batch, cfg)
    # averaged ratios: chosen [1/2, 0/1], rejected [0.5/1, -1/2]; deltas [0, 0.5]
    # gt deltas: pair 0 defaults 0.5 - 0.25 = 0.25; pair 1 given 3 - 1 = 2
    expected = ((0.0 - 0.25) ** 2 + (0.5 - 2.0) ** 2) / 2
    assert m["preference_loss"].item() == pytest.approx(expected, abs=1e-6)


# ---- sft_average_log_probs default and rewards_all_* metrics (issue 10, item 10) ----------------------------------


def test_sft_average_log_probs_follows_preference_average_log_probs():
    assert DPOLossConfig.from_cfg({"preference_average_log_probs": True}).sft_average_log_probs is True
    assert DPOLossConfig.from_cfg({}).sft_average_log_probs is False
    explicit = DPOLossConfig.from_cfg({"preference_average_log_probs": True, "sft_average_log_probs": False})
    assert explicit.sft_average_log_probs is False
    cfg = compose_config("gpt_dpo", ["model.dpo.preference_average_log_probs=true"])
    assert DPOLossConfig.from_cfg(cfg.model.dpo).sft_average_log_probs is True
    # and the SFT loss is then the per-token mean: chosen sums [-2, -0.5] over lengths [2, 1] -> -(-1 - 0.5) / 2
    batch, logprobs = _known_batch()
    _, m = dpo_loss_and_metrics(logprobs, torch.tensor([-3.0, -0.5, -1.5, -3.0]), batch,
                                DPOLossConfig.from_cfg(cfg.model.dpo))
    assert m["sft_loss"].item() == pytest.approx(0.75, abs=1e-6)


def test_rewards_all_mean_and_std_closed_form():
    batch, logprobs = _known_batch()
    ref = torch.tensor([-3.0, -0.5, -1.5, -3.0])
    _, m = dpo_loss_and_metrics(logprobs, ref, batch, DPOLossConfig(ref_policy_kl_penalty=0.5))
    # implicit rewards 0.5 * [1, 0, 0.5, -1] = [0.5, 0, 0.25, -0.5]: mean 0.0625, unbiased variance
    # ((0.4375)^2 + (0.0625)^2 + (0.1875)^2 + (0.5625)^2) / 3 = 0.546875 / 3
    assert m["rewards_all_mean"].item() == pytest.approx(0.0625, abs=1e-7)
    assert m["rewards_all_std"].item() == pytest.approx(math.sqrt(0.546875 / 3), abs=1e-6)
    assert m["rewards_all_sq_mean"].item() == pytest.approx((0.25 + 0 + 0.0625 + 0.25) / 4, abs=1e-7)


class _FakePolicy:
    """Just enough of an AlignableModel for BaseTrainer.train_step/validate on one rank: per-token log-probs
    are a fixed value per pair index, the reference comes from the precomputed table."""

    data_parallel_rank, data_parallel_size = 0, 1

    def __init__(self, token_logprob, ref_token_logprob):
        # [n_pairs, 2]: per-token log-prob of (chosen, rejected) under the policy / the reference policy
        self.token_logprob, self.ref_token_logprob = token_logprob, ref_token_logprob

    def get_logprobs(self, batch, reference=False):
        b = batch.num_pairs
        side = (batch.seq_id >= b).long()
        pair = batch.sample_index[batch.seq_id % b]
        table = self.ref_token_logprob if reference else self.token_logprob
        return table[pair, side].clone().requires_grad_(not reference)

    def prepare_for_training_step(self):
        pass

    def accumulate(self, is_last):
        import contextlib

        return contextlib.nullcontext()

    def backward(self, loss):
        pass

    def finish_training_step(self):
        return {}

    def inference(self):
        import contextlib

        return contextlib.nullcontext()

    def all_reduce_mean(self, values):
        return dict(values)


def test_rewards_all_std_is_over_the_whole_global_batch(tmp_path):
    """With micro-batches of one pair, the logged std is that of all 2 x global_batch_size implicit rewards (as
    NeMo-Aligner computes it over the gathered global batch), not the mean of per-micro-batch stds."""
    from nemo_aligner.algorithms.base import RunContext, TrainerConfig
    from nemo_aligner.algorithms.dpo import DPOTrainer
    from nemo_aligner.utils.checkpoint import CheckpointManager

    torch.manual_seed(0)
    n = 4
    data = [{"prompt_ids": [5], "chosen_ids": [7, 8], "rejected_ids": [9]} for _ in range(n)]
    token_logprob, ref_token_logprob = -torch.rand(n, 2), -torch.rand(n, 2)
    ref_table = -torch.rand(n, 2)  # precomputed reference sums used in training
    beta = 0.5
    trainer = DPOTrainer(
        model=_FakePolicy(token_logprob, ref_token_logprob), train_dataset=data, val_dataset=data,
        collate_fn=lambda ex: collate_preference_pairs(ex, pad_token_id=0),
        cfg=TrainerConfig(global_batch_size=n, micro_batch_size=1, max_steps=1),
        context=RunContext(tmp_path, CheckpointManager(tmp_path / "ckpt")),
        loss_cfg=DPOLossConfig(ref_policy_kl_penalty=beta), ref_logprobs=ref_table,
    )
    metrics = trainer.train_step(trainer.sampler.micro_batches(0))
    sums = torch.stack([token_logprob[:, 0] * 2, token_logprob[:, 1] * 1], dim=1)  # chosen 2 tokens, rejected 1
    rewards = (beta * (sums - ref_table)).flatten().double()
    assert metrics["rewards_all_mean"] == pytest.approx(rewards.mean().item(), abs=1e-6)
    assert metrics["rewards_all_std"] == pytest.approx(rewards.std().item(), abs=1e-6)
    assert "rewards_all_sq_mean" not in metrics
    # validation runs the reference policy (no cache) over all 4 pairs, one per micro-batch
    val = trainer.validate()
    ref_sums = torch.stack([ref_token_logprob[:, 0] * 2, ref_token_logprob[:, 1] * 1], dim=1)
    val_rewards = (beta * (sums - ref_sums)).flatten().double()
    assert val["rewards_all_mean"] == pytest.approx(val_rewards.mean().item(), abs=1e-6)
    assert val["rewards_all_std"] == pytest.approx(val_rewards.std().item(), abs=1e-6)
