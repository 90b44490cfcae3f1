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
``sft_average_log_probs``). Total loss = ``preference_loss_weight * preference + sft_loss_weight * sft``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F

from nemo_aligner.data.samplers import GlobalBatchSampler, sequential_batches
from nemo_aligner.models.alignable import AlignableModel
from nemo_aligner.utils.checkpoint import CheckpointManager
from nemo_aligner.utils.fs import atomic_directory
from nemo_aligner.utils.logging import format_metrics, get_logger

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
        raise ValueError(f"model.dpo.preference_loss={loss_type!r}: use one of {', '.join(PREFERENCE_LOSSES)}")
    if beta <= 0:
        raise ValueError(f"model.dpo.ref_policy_kl_penalty must be > 0, got {beta}")
    delta = chosen_logratio - rejected_logratio
    if loss_type == "dpo":
        return -F.logsigmoid(beta * delta)
    if loss_type == "ipo":
        return (delta - 1.0 / (2.0 * beta)) ** 2
    if gt_reward_chosen is None or gt_reward_rejected is None:
        raise ValueError(f"preference_loss={loss_type} needs ground-truth rewards (chosen_reward/rejected_reward)")
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


@dataclass
class DPOLossConfig:
    """The ``model.dpo`` section (NeMo-Aligner key names)."""

    ref_policy_kl_penalty: float = 0.2
    preference_loss: str = "dpo"
    gt_reward_scale: float = 1.0
    default_chosen_reward: float = 1.0
    default_rejected_reward: float = 0.0
    preference_average_log_probs: bool = False
    sft_average_log_probs: bool = False
    preference_loss_weight: float = 1.0
    sft_loss_weight: float = 0.0

    @classmethod
    def from_cfg(cls, cfg: Any) -> "DPOLossConfig":
        """Build from a mapping, checking values before any model is loaded.

        Raises:
            ValueError: unknown ``preference_loss`` or ``ref_policy_kl_penalty <= 0``.
        """
        fields = cls.__dataclass_fields__
        out = cls(**{k: type(fields[k].default)(cfg[k]) for k in fields if k in cfg})
        if out.preference_loss not in PREFERENCE_LOSSES:
            raise ValueError(f"model.dpo.preference_loss={out.preference_loss!r}: use one of {', '.join(PREFERENCE_LOSSES)}")
        if out.ref_policy_kl_penalty <= 0:
            raise ValueError(f"model.dpo.ref_policy_kl_penalty must be > 0, got {out.ref_policy_kl_penalty}")
        return out


def dpo_loss_and_metrics(
    logprobs: torch.Tensor, ref_seq_logprobs: torch.Tensor, batch: Any, cfg: DPOLossConfig
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Loss and NeMo-Aligner metrics for one micro-batch.

    Args:
        logprobs: ``[N]`` policy log-probabilities of the response tokens (with grad).
        ref_seq_logprobs: ``[2B]`` reference log-probabilities summed per response (chosen first, then rejected).
        batch: the :class:`~nemo_aligner.data.packing.PreferenceBatch` (``seq_id``, lengths, rewards).
        cfg: loss configuration.

    Returns:
        ``(loss, metrics)``: scalar loss (mean over pairs) and detached scalar metrics ``loss``,
        ``preference_loss``, ``sft_loss``, ``acc`` (fraction of pairs with chosen reward > rejected reward),
        ``rewards_chosen_mean``, ``rewards_rejected_mean`` (implicit rewards ``beta * h``), ``reward_margin``,
        ``chosen_lengths``, ``rejected_lengths`` (tokens).
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
        metrics = {
            "loss": loss.detach(),
            "preference_loss": pref.detach(),
            "sft_loss": sft.detach(),
            "acc": (rewards_chosen > rewards_rejected).float().mean(),
            "rewards_chosen_mean": rewards_chosen.mean(),
            "rewards_rejected_mean": rewards_rejected.mean(),
            "reward_margin": (rewards_chosen - rewards_rejected).mean(),
            "chosen_lengths": lengths[:b].mean(),
            "rejected_lengths": lengths[b:].mean(),
        }
    return loss, metrics


@dataclass
class DPOTrainerConfig:
    """The ``trainer.dpo`` section plus batch sizes (NeMo-Aligner key names)."""

    max_epochs: int = 1
    max_steps: int = -1
    val_check_interval: int = 100
    save_interval: int = 100
    limit_val_batches: int | float = 1.0
    gradient_clip_val: float = 1.0
    global_batch_size: int = 8
    micro_batch_size: int = 1
    seed: int = 1234


def compute_max_steps(num_samples: int, cfg: DPOTrainerConfig) -> int:
    """Optimizer steps of a run: ``max_epochs`` epochs of ``num_samples // global_batch_size`` steps, capped by
    ``max_steps`` unless it is negative (NeMo-Aligner's convention).

    Raises:
        ValueError: the result is 0 (too few samples for one global batch, or ``max_steps=0``).
    """
    epoch_steps = cfg.max_epochs * (num_samples // cfg.global_batch_size)
    steps = epoch_steps if cfg.max_steps < 0 else min(cfg.max_steps, epoch_steps)
    if steps < 1:
        raise ValueError(
            f"nothing to train: {num_samples} pairs, global_batch_size={cfg.global_batch_size}, "
            f"max_epochs={cfg.max_epochs}, max_steps={cfg.max_steps} give 0 optimizer steps"
        )
    return steps


class DPOTrainer:
    """The DPO training loop: rollout-free, so just batches -> loss -> optimizer step, with validation,
    checkpoints, resume and HF export. Talks to the model only through :class:`AlignableModel`.

    Args:
        model: the policy (holds the reference policy too).
        train_dataset, val_dataset: indexable datasets of tokenised pairs (dicts with ``prompt_ids``...).
        collate_fn: ``list[dict] -> PreferenceBatch``.
        loss_cfg, cfg: configuration.
        log_dir: where ``checkpoints/`` and ``hf_export/`` go.
        checkpoints: top-k bookkeeping.
        log_metrics: ``(dict, step) -> None`` sink for TensorBoard/CSV (rank 0 only is fine).
        ref_logprobs: optional ``[len(train_dataset), 2]`` precomputed reference sums (chosen, rejected); when given
            the reference policy is not run during training.
        resume: restore the latest checkpoint in ``checkpoints`` if there is one.
        is_global_zero: whether this process prints and shows progress.
    """

    def __init__(
        self,
        model: AlignableModel,
        train_dataset: Sequence[dict],
        val_dataset: Sequence[dict] | None,
        collate_fn: Callable[[list[dict]], Any],
        loss_cfg: DPOLossConfig,
        cfg: DPOTrainerConfig,
        log_dir: str | Path,
        checkpoints: CheckpointManager,
        log_metrics: Callable[[dict, int], None] = lambda metrics, step: None,
        ref_logprobs: torch.Tensor | None = None,
        resume: bool = True,
        export_hf: bool = True,
        is_global_zero: bool = True,
    ):
        self.model = model
        self.train_dataset = train_dataset
        self.val_dataset = val_dataset
        self.collate_fn = collate_fn
        self.loss_cfg = loss_cfg
        self.cfg = cfg
        self.log_dir = Path(log_dir)
        self.checkpoints = checkpoints
        self.log_metrics = log_metrics
        self.ref_logprobs = ref_logprobs
        self.resume = resume
        self.export_hf = export_hf
        self.is_global_zero = is_global_zero
        self.sampler = GlobalBatchSampler(
            len(train_dataset),
            cfg.global_batch_size,
            cfg.micro_batch_size,
            rank=model.data_parallel_rank,
            world_size=model.data_parallel_size,
            seed=cfg.seed,
        )
        self.max_steps = compute_max_steps(len(train_dataset), cfg)
        self.step = 0
        self.last_val_metrics: dict[str, float] = {}
        self.history: list[dict[str, float]] = []
        self.log = get_logger()

    # ---- batches ----------------------------------------------------------------------------------------------
    def _collate(self, dataset: Sequence[dict], indices: list[int]) -> Any:
        examples = []
        for i in indices:
            example = dict(dataset[i])
            example["index"] = i
            examples.append(example)
        return self.collate_fn(examples)

    def _ref_seq_logprobs(self, batch: Any, use_cache: bool) -> torch.Tensor:
        if use_cache and self.ref_logprobs is not None:
            cached = self.ref_logprobs[batch.sample_index]  # [B, 2]
            return torch.cat([cached[:, 0], cached[:, 1]])
        ref_tokens = self.model.get_logprobs(batch, reference=True)
        return sequence_logprobs(ref_tokens, batch.seq_id.to(ref_tokens.device), 2 * batch.num_pairs)

    # ---- steps ------------------------------------------------------------------------------------------------
    def train_step(self, micro_batch_indices: list[list[int]]) -> dict[str, float]:
        """One optimizer step over this rank's micro-batches; returns metrics averaged over the global batch."""
        start = time.perf_counter()
        self.model.prepare_for_training_step()
        sums: dict[str, float] = {}
        num_tokens = 0
        n = len(micro_batch_indices)
        for i, indices in enumerate(micro_batch_indices):
            batch = self._collate(self.train_dataset, indices)
            num_tokens += batch.num_tokens
            with self.model.accumulate(is_last=i == n - 1):
                logprobs = self.model.get_logprobs(batch)
                ref = self._ref_seq_logprobs(batch, use_cache=True)
                loss, metrics = dpo_loss_and_metrics(logprobs, ref, batch, self.loss_cfg)
                self.model.backward(loss / n)
            for key, value in metrics.items():
                sums[key] = sums.get(key, 0.0) + float(value) / n
        step_info = self.model.finish_training_step()
        metrics = self.model.all_reduce_mean(sums)
        elapsed = time.perf_counter() - start
        metrics.update(step_info)
        metrics["tokens_per_sec"] = num_tokens * self.model.data_parallel_size / max(elapsed, 1e-9)
        metrics["step_time"] = elapsed
        return metrics

    def validate(self) -> dict[str, float]:
        """Average the metrics over ``limit_val_batches`` validation batches (weighted by pairs, all ranks)."""
        if not self.val_dataset:
            return {}
        sums: dict[str, float] = {}
        pairs = 0
        with self.model.inference():
            for indices in sequential_batches(
                len(self.val_dataset),
                self.cfg.micro_batch_size,
                self.model.data_parallel_rank,
                self.model.data_parallel_size,
                self.cfg.limit_val_batches,
            ):
                if not indices:
                    continue
                batch = self._collate(self.val_dataset, indices)
                logprobs = self.model.get_logprobs(batch)
                ref = self._ref_seq_logprobs(batch, use_cache=False)
                _, metrics = dpo_loss_and_metrics(logprobs, ref, batch, self.loss_cfg)
                for key, value in metrics.items():
                    sums[key] = sums.get(key, 0.0) + float(value) * len(indices)
                pairs += len(indices)
        reduced = self.model.all_reduce_mean({**sums, "__pairs": float(pairs)})
        total = reduced.pop("__pairs")
        return {k: v / total for k, v in reduced.items()} if total > 0 else {}

    # ---- loop -------------------------------------------------------------------------------------------------
    def _save(self) -> None:
        metrics = {f"val_{k}": v for k, v in self.last_val_metrics.items()}
        extra = {
            "step": self.step,
            "epoch": self.step // self.sampler.steps_per_epoch,
            "consumed_samples": self.step * self.cfg.global_batch_size,
            "metrics": metrics,
        }
        self.model.save_checkpoint(str(self.checkpoints.path_for(self.step)), extra)
        if self.is_global_zero:
            self.checkpoints.prune()

    def _maybe_resume(self) -> None:
        latest = self.checkpoints.latest() if self.resume else None
        if latest is None:
            return
        extra = self.model.load_checkpoint(str(latest))
        self.step = int(extra["step"])
        self.last_val_metrics = {k[4:]: v for k, v in extra.get("metrics", {}).items() if k.startswith("val_")}
        if self.is_global_zero:
            self.log.info(f"resumed from {latest} at step {self.step} (consumed_samples={extra.get('consumed_samples')})")

    def _run_validation(self) -> None:
        self.last_val_metrics = self.validate()
        if self.last_val_metrics:
            self.log_metrics({f"val/{k}": v for k, v in self.last_val_metrics.items()}, self.step)
            if self.is_global_zero:
                keys = ["loss", "acc", "rewards_chosen_mean", "rewards_rejected_mean", "reward_margin"]
                self.log.info(f"validation step {self.step}/{self.max_steps}: {format_metrics(self.last_val_metrics, keys)}")

    def fit(self) -> list[dict[str, float]]:
        """Train to ``max_steps``; returns the per-step training metrics of this call (also logged)."""
        from tqdm.auto import tqdm

        self._maybe_resume()
        progress = tqdm(
            total=self.max_steps, initial=self.step, desc="DPO", disable=not self.is_global_zero, dynamic_ncols=True
        )
        val_every, save_every = int(self.cfg.val_check_interval), int(self.cfg.save_interval)
        while self.step < self.max_steps:
            metrics = self.train_step(self.sampler.micro_batches(self.step))
            self.step += 1
            metrics["epoch"] = (self.step - 1) // self.sampler.steps_per_epoch
            metrics["consumed_samples"] = self.step * self.cfg.global_batch_size
            self.history.append(metrics)
            self.log_metrics({f"train/{k}": v for k, v in metrics.items()}, self.step)
            progress.update(1)
            progress.set_postfix(loss=f"{metrics['loss']:.4f}", acc=f"{metrics['acc']:.2f}", tok_s=f"{metrics['tokens_per_sec']:.0f}")
            is_last = self.step == self.max_steps
            if (val_every > 0 and self.step % val_every == 0) or is_last:
                self._run_validation()
            if (save_every > 0 and self.step % save_every == 0) or is_last:
                self._save()
        progress.close()
        if self.export_hf:
            self.model.export_hf(str(self.log_dir / "hf_export"))
            if self.is_global_zero:
                self.log.info(f"Hugging Face export written to {self.log_dir / 'hf_export'}")
        return self.history


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
            examples = [dict(dataset[i], index=i) for i in indices]
            batch = collate_fn(examples)
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
