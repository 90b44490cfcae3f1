"""Direct Preference Optimization and its variants IPO and RPO.

Losses (``model.dpo.preference_loss``), with per-sequence log-ratio ``h = log pi(y|x) - log pi_ref(y|x)`` (summed
over response tokens, or averaged with ``preference_average_log_probs``), ``delta = h_chosen - h_rejected``, beta
``= ref_policy_kl_penalty`` and ground-truth reward gap ``g = gt_reward_scale * (r*_chosen - r*_rejected)``:

* ``dpo``: ``-log sigmoid(beta * delta)`` (Rafailov et al. 2023, "Direct Preference Optimization", eq. 7).
* ``ipo``: ``(delta - 1 / (2 beta))^2`` (Azar et al. 2023, "A General Theoretical Paradigm to Understand Learning
  from Human Preferences", eq. 17).
* ``rpo_sq``: ``(beta * delta - g)^2`` (NeMo-Aligner RPO documentation; Nvidia 2024, Nemotron-4 340B report, sec. 3.2.3).
* ``rpo_bwd_kl``: ``KL(alpha || b)`` between the Bernoulli distributions ``alpha = sigmoid(g)`` and
  ``b = sigmoid(beta * delta)`` over {chosen wins, rejected wins} (NeMo-Aligner RPO documentation).
* ``rpo_fwd_kl``: ``KL(b || alpha)`` with the same ``alpha`` and ``b``.

The optional SFT loss is the negative log-likelihood of the chosen response (sum or mean over its tokens,
``sft_average_log_probs``, which follows ``preference_average_log_probs`` unless set, as in NeMo-Aligner).
Total loss = ``preference_loss_weight * preference + sft_loss_weight * sft``.

Metrics use the implicit rewards ``r = beta * h`` of Rafailov et al. 2023 (sec. 5): ``rewards_all_mean`` and
``rewards_all_std`` are the mean and the (Bessel-corrected) standard deviation of ``r`` over the chosen and the
rejected responses of the whole global batch together, as NeMo-Aligner's ``megatron_gpt_dpo_model`` logs them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F

from nemo_aligner.algorithms.base import BaseTrainer
from nemo_aligner.models.alignable import AlignableModel
from nemo_aligner.utils.config import ConfigValueError, config_schema, dataclass_from_cfg
from nemo_aligner.utils.fs import atomic_directory

PREFERENCE_LOSSES = ("dpo", "ipo", "rpo_sq", "rpo_bwd_kl", "rpo_fwd_kl")


def preference_loss(
    chosen_logratio: torch.Tensor,
    rejected_logratio: torch.Tensor,
    beta: float,
    loss_type: str = "dpo",
    gt_reward_chosen: torch.Tensor | None = None,
    gt_reward_rejected: torch.Tensor | None = None,
    gt_reward_scale: float = 1.0,
) -> torch.Tensor:
    """Per-pair preference loss of the DPO family (see the module docstring for each formula).

    Args:
        chosen_logratio, rejected_logratio: ``[B]`` ``log pi - log pi_ref`` of each response (nats).
        beta: KL penalty coefficient (``ref_policy_kl_penalty``), > 0.
        loss_type: one of :data:`PREFERENCE_LOSSES`.
        gt_reward_chosen, gt_reward_rejected: ``[B]`` ground-truth rewards, required by the ``rpo_*`` losses.
        gt_reward_scale: multiplies the ground-truth reward gap.

    Returns:
        ``[B]`` loss per pair (average it for the batch loss).

    Raises:
        ValueError: unknown ``loss_type``, ``beta <= 0``, or an RPO loss without ground-truth rewards.
    """
    if loss_type not in PREFERENCE_LOSSES:
        raise ConfigValueError(f"model.dpo.preference_loss={loss_type!r}: use one of {', '.join(PREFERENCE_LOSSES)}")
    if beta <= 0:
        raise ConfigValueError(f"model.dpo.ref_policy_kl_penalty must be > 0, got {beta}")
    delta = chosen_logratio - rejected_logratio
    if loss_type == "dpo":
        return -F.logsigmoid(beta * delta)
    if loss_type == "ipo":
        return (delta - 1.0 / (2.0 * beta)) ** 2
    if gt_reward_chosen is None or gt_reward_rejected is None:
        raise ConfigValueError(f"preference_loss={loss_type} needs ground-truth rewards (chosen_reward/rejected_reward)")
    gt_delta = gt_reward_scale * (gt_reward_chosen - gt_reward_rejected)
    if loss_type == "rpo_sq":
        return (beta * delta - gt_delta) ** 2
    log_b_chosen, log_b_rejected = F.logsigmoid(beta * delta), F.logsigmoid(-beta * delta)
    log_a_chosen, log_a_rejected = F.logsigmoid(gt_delta), F.logsigmoid(-gt_delta)
    if loss_type == "rpo_bwd_kl":
        return log_a_chosen.exp() * (log_a_chosen - log_b_chosen) + log_a_rejected.exp() * (log_a_rejected - log_b_rejected)
    return log_b_chosen.exp() * (log_b_chosen - log_a_chosen) + log_b_rejected.exp() * (log_b_rejected - log_a_rejected)


def sequence_logprobs(token_logprobs: torch.Tensor, seq_id: torch.Tensor, num_sequences: int) -> torch.Tensor:
    """Sum per-token log-probabilities ``[N]`` into per-sequence totals ``[num_sequences]`` by ``seq_id`` ``[N]``."""
    out = torch.zeros(num_sequences, dtype=token_logprobs.dtype, device=token_logprobs.device)
    return out.index_add(0, seq_id.to(token_logprobs.device), token_logprobs)


@config_schema("gpt_dpo", main="model.dpo")
@dataclass
class DPOLossConfig:
    """The ``model.dpo`` section (NeMo-Aligner key names): the type and default of each of its loss keys, registered
    as the ``model.dpo`` part of the ``gpt_dpo`` structured config (:func:`~nemo_aligner.utils.config.config_schema`);
    the defaults are ``conf/gpt_dpo.yaml``'s values. ``sft_average_log_probs=None`` (the default) follows
    ``preference_average_log_probs``, as NeMo-Aligner's ``sft_average_log_probs: ${.preference_average_log_probs}``."""

    ref_policy_kl_penalty: float = 0.1  # beta; was 0.2 here while conf/gpt_dpo.yaml (what every run used) says 0.1
    preference_loss: str = "dpo"
    gt_reward_scale: float = 1.0
    default_chosen_reward: float = 1.0
    default_rejected_reward: float = 0.0
    preference_average_log_probs: bool = False
    sft_average_log_probs: bool | None = None
    preference_loss_weight: float = 1.0
    sft_loss_weight: float = 0.0

    def __post_init__(self):
        if self.sft_average_log_probs is None:
            self.sft_average_log_probs = self.preference_average_log_probs

    @classmethod
    def from_cfg(cls, cfg: Any) -> "DPOLossConfig":
        """Build from a mapping, checking values before any model is loaded. Each value is converted to its field's
        type by :func:`~nemo_aligner.utils.config.dataclass_from_cfg` (``"false"`` is False, ``2.5`` is no integer).

        Raises:
            ConfigValueError (a ``ValueError``): a value of the wrong type (a boolean that is not
                true/false/1/0/yes/no, ...), an unknown ``preference_loss`` or ``ref_policy_kl_penalty <= 0``; the
                message names the ``model.dpo`` key.
        """
        out = dataclass_from_cfg(cls, cfg, "model.dpo")
        if out.preference_loss not in PREFERENCE_LOSSES:
            raise ConfigValueError(
                f"model.dpo.preference_loss={out.preference_loss!r}: use one of {', '.join(PREFERENCE_LOSSES)}"
            )
        if out.ref_policy_kl_penalty <= 0:
            raise ConfigValueError(f"model.dpo.ref_policy_kl_penalty must be > 0, got {out.ref_policy_kl_penalty}")
        return out


def dpo_loss_and_metrics(
    logprobs: torch.Tensor, ref_seq_logprobs: torch.Tensor, batch: Any, cfg: DPOLossConfig
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Loss and NeMo-Aligner metrics for one micro-batch.

    Args:
        logprobs: ``[N]`` policy log-probabilities of the response tokens (with grad).
        ref_seq_logprobs: ``[2B]`` reference log-probabilities summed per response (chosen first, then rejected).
        batch: the :class:`~nemo_aligner.data.preference_batch.PreferenceBatch` (``seq_id``, lengths, rewards).
        cfg: loss configuration.

    Returns:
        ``(loss, metrics)``: scalar loss (mean over pairs) and detached scalar metrics ``loss``,
        ``preference_loss``, ``sft_loss``, ``acc`` (fraction of pairs with chosen reward > rejected reward),
        ``rewards_chosen_mean``, ``rewards_rejected_mean`` (implicit rewards ``beta * h``), ``reward_margin``,
        ``rewards_all_mean``, ``rewards_all_std`` (mean and Bessel-corrected std of the ``2B`` implicit rewards of
        chosen and rejected together; 0 for a single value), ``rewards_all_sq_mean`` (their mean square, which
        :class:`DPOTrainer` uses to turn per-micro-batch values into the global batch's std), ``chosen_lengths``,
        ``rejected_lengths`` (tokens).
    """
    b = batch.num_pairs
    device = logprobs.device
    seq_sum = sequence_logprobs(logprobs, batch.seq_id, 2 * b)
    ref_sum = ref_seq_logprobs.to(device=device, dtype=seq_sum.dtype)
    lengths = torch.cat([batch.chosen_lengths, batch.rejected_lengths]).to(device=device, dtype=seq_sum.dtype)

    logratio = seq_sum - ref_sum
    if cfg.preference_average_log_probs:
        logratio = logratio / lengths
    chosen_ratio, rejected_ratio = logratio[:b], logratio[b:]

    gt_chosen = torch.nan_to_num(batch.chosen_rewards.to(device), nan=cfg.default_chosen_reward)
    gt_rejected = torch.nan_to_num(batch.rejected_rewards.to(device), nan=cfg.default_rejected_reward)
    pref = preference_loss(
        chosen_ratio,
        rejected_ratio,
        cfg.ref_policy_kl_penalty,
        cfg.preference_loss,
        gt_chosen,
        gt_rejected,
        cfg.gt_reward_scale,
    ).mean()

    chosen_logp = seq_sum[:b] / lengths[:b] if cfg.sft_average_log_probs else seq_sum[:b]
    sft = -chosen_logp.mean()
    loss = cfg.preference_loss_weight * pref + cfg.sft_loss_weight * sft

    with torch.no_grad():
        rewards_chosen = cfg.ref_policy_kl_penalty * chosen_ratio
        rewards_rejected = cfg.ref_policy_kl_penalty * rejected_ratio
        rewards_all = torch.cat([rewards_chosen, rewards_rejected])
        metrics = {
            "loss": loss.detach(),
            "preference_loss": pref.detach(),
            "sft_loss": sft.detach(),
            "acc": (rewards_chosen > rewards_rejected).float().mean(),
            "rewards_chosen_mean": rewards_chosen.mean(),
            "rewards_rejected_mean": rewards_rejected.mean(),
            "reward_margin": (rewards_chosen - rewards_rejected).mean(),
            "rewards_all_mean": rewards_all.mean(),
            "rewards_all_std": rewards_all.std() if rewards_all.numel() > 1 else rewards_all.new_zeros(()),
            "rewards_all_sq_mean": rewards_all.square().mean(),
            "chosen_lengths": lengths[:b].mean(),
            "rejected_lengths": lengths[b:].mean(),
        }
    return loss, metrics


class DPOTrainer(BaseTrainer):
    """DPO/IPO/RPO: the shared offline loop with the preference loss of :func:`dpo_loss_and_metrics`.

    Args:
        loss_cfg: the ``model.dpo`` loss settings.
        ref_logprobs: optional ``[len(train_dataset), 2]`` precomputed reference sums (chosen, rejected); when given
            the reference policy is not run on training batches.
        **kwargs: see :class:`~nemo_aligner.algorithms.base.BaseTrainer`.
    """

    name = "DPO"
    summary_keys = ["loss", "acc", "rewards_chosen_mean", "rewards_rejected_mean", "reward_margin"]

    def __init__(self, *args, loss_cfg: DPOLossConfig, ref_logprobs: torch.Tensor | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.loss_cfg = loss_cfg
        self.ref_logprobs = ref_logprobs

    def _ref_seq_logprobs(self, batch: Any, use_cache: bool) -> torch.Tensor:
        if use_cache and self.ref_logprobs is not None:
            cached = self.ref_logprobs[batch.sample_index]  # [B, 2]
            return torch.cat([cached[:, 0], cached[:, 1]])
        ref_tokens = self.model.get_logprobs(batch, reference=True)
        return sequence_logprobs(ref_tokens, batch.seq_id.to(ref_tokens.device), 2 * batch.num_pairs)

    def loss_and_metrics(self, batch: Any, training: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        logprobs = self.model.get_logprobs(batch)
        ref = self._ref_seq_logprobs(batch, use_cache=training)
        if not training:
            self._val_pairs += batch.num_pairs
        return dpo_loss_and_metrics(logprobs, ref, batch, self.loss_cfg)

    def train_step(self, micro_batch_indices: list[list[int]]) -> dict[str, float]:
        """The shared step, with ``rewards_all_std`` over the whole global batch (``2 * global_batch_size``
        rewards), not the mean of the micro-batches' stds."""
        metrics = super().train_step(micro_batch_indices)
        return pooled_reward_std(metrics, 2 * self.cfg.global_batch_size)

    def validate(self) -> dict[str, float]:
        """The shared validation, with ``rewards_all_std`` over every validation reward of every rank."""
        self._val_pairs = 0
        metrics = super().validate()
        world = self.model.data_parallel_size
        pairs = self.model.all_reduce_mean({"pairs": float(self._val_pairs)})["pairs"] * world
        return pooled_reward_std(metrics, round(2 * pairs)) if metrics else metrics

    _val_pairs = 0


def pooled_reward_std(metrics: dict[str, float], n: int) -> dict[str, float]:
    """Replace ``rewards_all_std`` by the Bessel-corrected std of all ``n`` implicit rewards that
    ``rewards_all_mean`` and ``rewards_all_sq_mean`` average (means over equally weighted rewards):
    ``sqrt((E[r^2] - E[r]^2) * n / (n - 1))`` (0 when ``n < 2``). Drops the helper ``rewards_all_sq_mean``.

    Returns:
        ``metrics`` (changed in place) when it holds both moments, else ``metrics`` unchanged.
    """
    if "rewards_all_mean" not in metrics or "rewards_all_sq_mean" not in metrics:
        return metrics
    mean, sq_mean = metrics["rewards_all_mean"], metrics.pop("rewards_all_sq_mean")
    variance = max(sq_mean - mean * mean, 0.0)
    metrics["rewards_all_std"] = (variance * n / (n - 1)) ** 0.5 if n > 1 else 0.0
    return metrics


@torch.no_grad()
def precompute_reference_logprobs(
    model: AlignableModel, dataset: Sequence[dict], collate_fn: Callable, micro_batch_size: int
) -> torch.Tensor:
    """Reference log-probabilities of every pair, computed once (a speed option: ``precompute_ref_log_probs``).

    Each data-parallel rank computes a strided share; the shares are summed across ranks.

    Returns:
        ``[len(dataset), 2]`` float32 CPU tensor: summed log-probs of (chosen, rejected) under the reference policy.
    """
    n = len(dataset)
    table = torch.zeros(n, 2, dtype=torch.float32, device=model.device)
    rank, world = model.data_parallel_rank, model.data_parallel_size
    with model.inference():
        for start in range(rank * micro_batch_size, n, micro_batch_size * world):
            indices = list(range(start, min(start + micro_batch_size, n)))
            batch = collate_fn([dict(dataset[i], index=i) for i in indices])
            tokens = model.get_logprobs(batch, reference=True)
            seq = sequence_logprobs(tokens, batch.seq_id.to(tokens.device), 2 * len(indices))
            table[indices, 0] = seq[: len(indices)].float()
            table[indices, 1] = seq[len(indices) :].float()
    return model.all_reduce(table, "sum").cpu()


def save_reference_logprobs(table: torch.Tensor, path: str | Path, fingerprint: str) -> None:
    """Store a precomputed reference table atomically with the fingerprint of the data it belongs to."""
    with atomic_directory(path) as tmp:
        torch.save({"fingerprint": fingerprint, "table": table}, tmp / "ref_logprobs.pt")


def load_reference_logprobs(path: str | Path, fingerprint: str) -> torch.Tensor | None:
    """The stored table if it exists and matches ``fingerprint``, else None."""
    file = Path(path) / "ref_logprobs.pt"
    if not file.is_file():
        return None
    stored = torch.load(file, map_location="cpu")
    return stored["table"] if stored.get("fingerprint") == fingerprint else None
