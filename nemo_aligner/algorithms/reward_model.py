"""Reward-model training: pairwise Bradley-Terry loss and its all-pairs ranking extension.

With scalar rewards ``r`` read at each sequence's last token:

* Pairs: ``loss = -log sigmoid(r_chosen - r_rejected)``, the negative log-likelihood of the Bradley-Terry model
  ``P(chosen > rejected) = sigmoid(r_chosen - r_rejected)`` (Bradley & Terry 1952; Ouyang et al. 2022,
  "Training language models to follow instructions with human feedback", eq. 1).
* Ranked lists of ``K > 2`` responses: the **all-ordered-pairs ranking loss** of InstructGPT eq. 1,
  ``loss = -1/|P| * sum_{(w, l) in P} log sigmoid(r_w - r_l)`` where ``P`` holds every pair of responses of the
  prompt with ``w`` ranked strictly better than ``l`` (``|P| = K choose 2`` without ties; tied responses form no
  pair). Each prompt counts once in the batch mean, however many pairs it has, which avoids overfitting to prompts
  with many responses (InstructGPT sec. 3.5). For ``K = 2`` it is exactly the Bradley-Terry loss. (We chose it over
  Plackett-Luce because it reduces to the pairwise loss, handles ties, and is what InstructGPT trained with.)

Metrics (NeMo-Aligner names): ``loss``, ``acc`` (fraction of ordered pairs with ``r_w > r_l``; for pairs
``r_chosen > r_rejected``), ``rewards_chosen_mean`` / ``rewards_rejected_mean`` (mean reward of each prompt's best /
worst response), ``reward_margin`` (their mean difference), ``rewards_all_mean``, ``rewards_all_std``.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F

from nemo_aligner.algorithms.base import BaseTrainer
from nemo_aligner.models.alignable import AlignableModel


def bradley_terry_loss(rewards_chosen: torch.Tensor, rewards_rejected: torch.Tensor) -> torch.Tensor:
    """Per-pair ``-log sigmoid(r_chosen - r_rejected)`` (Bradley & Terry 1952; InstructGPT eq. 1).

    Args:
        rewards_chosen, rewards_rejected: ``[B]`` scalar rewards (any unit; only differences matter).

    Returns:
        ``[B]`` loss per pair, in nats.
    """
    return -F.logsigmoid(rewards_chosen - rewards_rejected)


def _ordered_pairs(group: torch.Tensor, preferences: torch.Tensor) -> torch.Tensor:
    """``[S, S]`` bool: ``True`` where sequences ``i`` and ``j`` share a group and ``i`` is strictly preferred."""
    return (group[:, None] == group[None, :]) & (preferences[:, None] > preferences[None, :])


def ranking_loss(rewards: torch.Tensor, group: torch.Tensor, preferences: torch.Tensor, num_groups: int) -> torch.Tensor:
    """All-ordered-pairs ranking loss per group (InstructGPT eq. 1): the mean over pairs ``(w, l)`` of a group with
    ``preferences[w] > preferences[l]`` of ``-log sigmoid(r_w - r_l)``.

    Args:
        rewards: ``[S]`` scalar rewards.
        group: ``[S]`` int64 group (prompt) of each sequence, in ``[0, num_groups)``.
        preferences: ``[S]`` larger is better within a group; equal values are ties (no pair).
        num_groups: ``G``.

    Returns:
        ``[G]`` loss per group (nats).

    Raises:
        ValueError: a group without any ordered pair (all tied, or a single response).
    """
    pairs = _ordered_pairs(group.to(rewards.device), preferences.to(rewards.device))
    pair_loss = -F.logsigmoid(rewards[:, None] - rewards[None, :])
    group = group.to(rewards.device)
    total = torch.zeros(num_groups, dtype=rewards.dtype, device=rewards.device).index_add(
        0, group, (pair_loss * pairs).sum(1)
    )
    count = torch.zeros(num_groups, dtype=rewards.dtype, device=rewards.device).index_add(
        0, group, pairs.sum(1).to(rewards.dtype)
    )
    if bool((count == 0).any()):
        raise ValueError(f"groups {torch.nonzero(count == 0).flatten().tolist()} have no ordered pair of responses")
    return total / count


def reward_loss_and_metrics(rewards: torch.Tensor, batch: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Loss (mean of :func:`ranking_loss` over the ``G`` prompts; Bradley-Terry for pairs) and metrics.

    Args:
        rewards: ``[S]`` rewards of ``batch``'s sequences (with grad when training).
        batch: a :class:`~nemo_aligner.data.reward_batch.RewardBatch` (``group``, ``preferences``, ``num_groups``).

    Returns:
        ``(loss, metrics)``: scalar loss and detached scalar metrics (see the module docstring).
    """
    device = rewards.device
    group, prefs, g = batch.group.to(device), batch.preferences.to(device), batch.num_groups
    per_group = ranking_loss(rewards, group, prefs, g)
    loss = per_group.mean()
    with torch.no_grad():
        r = rewards.detach().float()
        pairs = _ordered_pairs(group, prefs)
        correct = ((r[:, None] > r[None, :]) & pairs).sum(1).float()
        n_pairs = pairs.sum(1).float()
        acc = torch.zeros(g, device=device).index_add(0, group, correct) / torch.zeros(g, device=device).index_add(
            0, group, n_pairs
        )
        big = torch.finfo(torch.float32).max
        best = torch.full((g,), -big, device=device).scatter_reduce(0, group, prefs.float(), "amax")
        worst = torch.full((g,), big, device=device).scatter_reduce(0, group, prefs.float(), "amin")
        # first sequence of each group at its best / worst preference
        index = torch.arange(r.numel(), device=device)
        sentinel = torch.full((g,), r.numel(), device=device, dtype=torch.long)
        first_best = sentinel.scatter_reduce(0, group, torch.where(prefs == best[group], index, r.numel()), "amin")
        first_worst = sentinel.clone().scatter_reduce(0, group, torch.where(prefs == worst[group], index, r.numel()), "amin")
        chosen, rejected = r[first_best], r[first_worst]
        metrics = {
            "loss": loss.detach(),
            "acc": acc.mean(),
            "rewards_chosen_mean": chosen.mean(),
            "rewards_rejected_mean": rejected.mean(),
            "reward_margin": (chosen - rejected).mean(),
            "rewards_all_mean": r.mean(),
            "rewards_all_std": r.std(unbiased=False),
        }
    return loss, metrics


class RewardModelTrainer(BaseTrainer):
    """Reward-model training: the shared offline loop with :func:`reward_loss_and_metrics`.

    The model must implement ``get_rewards(SequenceBatch) -> [S]`` (e.g.
    :class:`~nemo_aligner.models.reward_model.HFRewardModel`); batches are
    :class:`~nemo_aligner.data.reward_batch.RewardBatch`. Arguments: see
    :class:`~nemo_aligner.algorithms.base.BaseTrainer`.
    """

    name = "RM"
    summary_keys = ["loss", "acc", "rewards_chosen_mean", "rewards_rejected_mean", "reward_margin"]

    def loss_and_metrics(self, batch: Any, training: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        rewards = self.model.get_rewards(batch.sequences)
        return reward_loss_and_metrics(rewards, batch)


@torch.no_grad()
def compute_reward_statistics(
    model: AlignableModel,
    dataset: Sequence[dict],
    collate_fn: Callable[[list[dict]], Any],
    micro_batch_size: int,
    num_samples: int | None = 1000,
) -> tuple[float, float, int]:
    """Mean and standard deviation of the raw reward over every response of (a sample of) ``dataset``.

    The sample is ``num_samples`` examples evenly spaced over the dataset (all of it when ``None`` or larger);
    data-parallel ranks share the work and the moments are summed across ranks.

    Returns:
        ``(mean, std, num_responses)`` (population std).

    Raises:
        ValueError: ``dataset`` is empty.
    """
    n = len(dataset)
    if n == 0:
        raise ValueError("cannot compute reward statistics of an empty dataset")
    k = n if not num_samples or num_samples >= n else int(num_samples)
    picked = sorted({int(i * n / k) for i in range(k)})
    rank, world = model.data_parallel_rank, model.data_parallel_size
    mine = picked[rank::world]
    moments = torch.zeros(3, dtype=torch.float64, device=model.device)
    with model.inference():
        for start in range(0, len(mine), micro_batch_size):
            indices = mine[start : start + micro_batch_size]
            batch = collate_fn([dict(dataset[i], index=i) for i in indices])
            r = model.get_rewards(batch.sequences).double()
            moments += torch.stack([r.new_tensor(float(r.numel())), r.sum(), (r * r).sum()])
    count, total, sq = model.all_reduce(moments, "sum").tolist()
    mean = total / count
    std = math.sqrt(max(sq / count - mean * mean, 0.0))
    return mean, std, int(count)
