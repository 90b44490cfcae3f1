"""Rejection sampling (best-of-n fine-tuning) against a reward model.

One RS *step* (NeMo-Aligner's "RS step"):

1. **Rollout.** ``num_rollout_samples`` prompts are taken (deterministic, resumable order; split over
   data-parallel ranks) and the policy samples ``num_rollouts_per_prompt`` responses to each
   (``sampling_params``, ``length_params``), in generation calls of ``rollout_micro_batch_size`` responses.
2. **Scoring.** Every response gets one reward-model score (in calls of ``forward_micro_batch_size`` sequences).
3. **Selection.** Per prompt, the ``top_n_rollouts`` highest-scored responses are kept (:func:`select_top_n`).
4. **Training.** The policy is fine-tuned on the kept ``(prompt, response)`` pairs with the SFT loss (negative
   log-likelihood of the response tokens only, :func:`nemo_aligner.algorithms.supervised.sft_loss_and_metrics`),
   one pass over them in global batches of ``model.global_batch_size`` (micro-batches of
   ``model.micro_batch_size``), one optimizer step per global batch.

This is the rejection-sampling fine-tuning of Touvron et al. 2023 ("Llama 2: Open Foundation and Fine-Tuned Chat
Models", sec. 3.2.3: sample K outputs, keep the best by the reward model, fine-tune on it) and RAFT (Dong et al.
2023, "RAFT: Reward rAnked FineTuning for Generative Foundation Model Alignment": rank samples by reward, keep the
top ones, SFT on them), run online: each step samples from the current policy.

The trainer drives the policy only through :class:`~nemo_aligner.models.alignable.AlignableModel`
(``generate``, ``get_logprobs``, ``backward``, ``accumulate``, ``finish_training_step``, ``inference``,
checkpoints, ``export_hf``). The reward is any ``reward_fn(prompt_ids, response_ids) -> list[float]``:
:func:`nemo_aligner.recipes.online.reward_fn_from_scorer` (a local
:class:`~nemo_aligner.models.reward_model.RewardScorer`),
:func:`nemo_aligner.recipes.online.reward_fn_from_client` (the reward-model server) or a programmatic reward in
tests. Rollout generation, validation rollouts, the sample table and the loop (checkpoints, resume, logging, export)
are :class:`~nemo_aligner.algorithms.online.OnlineTrainer`'s, shared with PPO.
"""

from __future__ import annotations

import dataclasses
import math
import random
import time
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from nemo_aligner.algorithms.base import RunContext, optimizer_step
from nemo_aligner.algorithms.online import (
    OnlineTrainer,
    RewardFn,
    RolloutSetup,
    compute_online_max_steps,
    score_rewards,
)
from nemo_aligner.algorithms.supervised import sft_loss_and_metrics
from nemo_aligner.data.rollouts import Rollouts
from nemo_aligner.data.sequences import SequenceBatch
from nemo_aligner.models.alignable import AlignableModel
from nemo_aligner.utils.config import ConfigValueError, config_schema, dataclass_from_sections, key


# ---------------------------------------------------------------------------------------------------------------
# configuration
# ---------------------------------------------------------------------------------------------------------------
@config_schema("gpt_rs_actor", trainer="trainer.rs", rs="model.rs", model="model")
@dataclass
class RSConfig:
    """``trainer.rs`` and ``model.rs`` settings plus batch sizes (NeMo-Aligner key names).

    Loop (``trainer.rs``): ``max_epochs`` (passes over the training prompts), ``max_steps`` (RS steps; -1: all),
    ``val_check_interval``, ``save_interval`` (in RS steps; 0 = only at the end), ``gradient_clip_val``.
    Rollouts (``model.rs``): ``num_rollout_samples`` (prompts per RS step), ``num_rollouts_per_prompt`` (responses
    sampled per prompt), ``top_n_rollouts`` (responses kept per prompt), ``rollout_micro_batch_size`` (responses
    per generation call), ``forward_micro_batch_size`` (sequences per reward-model call),
    ``val_rollout_micro_batch_size``, ``num_val_samples`` (validation prompts), ``num_val_samples_to_show`` (rows
    of the sample table). Training batches (``model``): ``global_batch_size``, ``micro_batch_size`` (kept
    rollouts), ``seed``.

    Each field is the one place of its key's type and default (:func:`~nemo_aligner.utils.config.key`), registered
    as the ``gpt_rs_actor`` structured config; the defaults are ``conf/gpt_rs_actor.yaml``'s values. Nullable keys
    (null or absent: derived): ``forward_micro_batch_size``, ``val_rollout_micro_batch_size`` (->
    ``rollout_micro_batch_size``), ``num_val_samples`` (-> ``num_rollout_samples``).
    """

    max_epochs: int = key("trainer", 1)
    max_steps: int = key("trainer", -1)
    val_check_interval: int = key("trainer", 10)
    save_interval: int = key("trainer", 10)
    gradient_clip_val: float = key("trainer", 1.0)
    num_rollout_samples: int = key("rs", 8)
    num_rollouts_per_prompt: int = key("rs", 4)
    top_n_rollouts: int = key("rs", 1)
    rollout_micro_batch_size: int = key("rs", 8)
    forward_micro_batch_size: int = key("rs", 8, nullable=True)
    num_val_samples: int = key("rs", 8, nullable=True)
    val_rollout_micro_batch_size: int = key("rs", 8, nullable=True)
    num_val_samples_to_show: int = key("rs", 4)
    global_batch_size: int = key("model", 8)
    micro_batch_size: int = key("model", 1)
    seed: int = key("model", 1234)

    @classmethod
    def from_cfg(cls, cfg: Any) -> "RSConfig":
        """From a full RS config (``trainer.rs``, ``model.rs``, ``model``); an absent key takes the field's default,
        null (or 0) micro-batch sizes default to ``rollout_micro_batch_size`` and a null ``num_val_samples`` to
        ``num_rollout_samples``.

        Raises:
            ConfigValueError: a value of the wrong type, naming its key.
            ValueError: an out-of-range value (see :meth:`check`).
        """
        out = dataclass_from_sections(cls, {"trainer": cfg.trainer.rs, "rs": cfg.model.rs, "model": cfg.model})
        derived = {"forward_micro_batch_size": out.rollout_micro_batch_size,
                   "val_rollout_micro_batch_size": out.rollout_micro_batch_size,
                   "num_val_samples": out.num_rollout_samples}
        for name, value in derived.items():
            if not getattr(out, name):  # null, absent or 0, as NeMo-Aligner's `x or y`
                setattr(out, name, value)
        out.check()
        return out

    def check(self, data_parallel_size: int = 1) -> None:
        """Raise ``ValueError`` naming the key of the first out-of-range value."""
        for key in ("num_rollout_samples", "num_rollouts_per_prompt", "rollout_micro_batch_size",
                    "forward_micro_batch_size", "val_rollout_micro_batch_size"):
            if getattr(self, key) < 1:
                raise ConfigValueError(f"model.rs.{key} must be >= 1, got {getattr(self, key)}")
        if not 1 <= self.top_n_rollouts <= self.num_rollouts_per_prompt:
            raise ConfigValueError(
                f"model.rs.top_n_rollouts={self.top_n_rollouts} must lie in [1, model.rs.num_rollouts_per_prompt="
                f"{self.num_rollouts_per_prompt}]"
            )
        if self.num_rollout_samples % data_parallel_size:
            raise ConfigValueError(
                f"model.rs.num_rollout_samples={self.num_rollout_samples} must be a multiple of the data-parallel "
                f"size {data_parallel_size}"
            )
        if (self.global_batch_size < 1 or self.micro_batch_size < 1
                or self.global_batch_size % (self.micro_batch_size * data_parallel_size)):
            raise ConfigValueError(
                f"model.global_batch_size={self.global_batch_size} must be a positive multiple of "
                f"model.micro_batch_size={self.micro_batch_size} x data-parallel size {data_parallel_size}"
            )

    @property
    def kept_per_step(self) -> int:
        """Kept rollouts per RS step over all ranks: ``num_rollout_samples * top_n_rollouts``."""
        return self.num_rollout_samples * self.top_n_rollouts

    def optimizer_steps_per_rs_step(self) -> int:
        """Optimizer steps on one step's kept rollouts: ``ceil(kept_per_step / global_batch_size)`` (the last
        global batch may be smaller)."""
        return math.ceil(self.kept_per_step / self.global_batch_size)


def compute_rs_max_steps(num_prompts: int, cfg: RSConfig) -> int:
    """RS steps of a run: ``max_epochs * (num_prompts // num_rollout_samples)``, capped by ``max_steps`` >= 0
    (the incomplete last prompt batch of an epoch is dropped;
    :func:`~nemo_aligner.algorithms.online.compute_online_max_steps`).

    Raises:
        ValueError: the result is 0 (fewer prompts than one rollout batch, or ``max_steps=0``).
    """
    return compute_online_max_steps(num_prompts, cfg, "rs")


# ---------------------------------------------------------------------------------------------------------------
# selection and the training batch (pure functions)
# ---------------------------------------------------------------------------------------------------------------
def select_top_n(rewards: torch.Tensor | Sequence[Sequence[float]], top_n: int) -> torch.Tensor:
    """Indices of the ``top_n`` highest rewards of each prompt (the selection of rejection sampling).

    Ties are broken deterministically by sample index: among equal rewards the response sampled first (lower
    index along ``N``) ranks higher. ``-inf`` is a valid (lowest) reward.

    Args:
        rewards: ``[P, N]`` rewards, ``N`` responses for each of ``P`` prompts (a tensor or nested lists).
        top_n: responses kept per prompt, ``1 <= top_n <= N``.

    Returns:
        ``[P, top_n]`` int64 indices into ``N``, best first in each row.

    Raises:
        ValueError: ``rewards`` not 2-D, ``top_n`` outside ``[1, N]``, or a NaN reward.

    Source: best-of-n selection of Touvron et al. 2023 (Llama 2, sec. 3.2.3) and RAFT (Dong et al. 2023).
    """
    values = torch.as_tensor(rewards, dtype=torch.float64).detach().cpu()
    if values.dim() != 2:
        raise ValueError(f"rewards must be [prompts, responses_per_prompt], got shape {tuple(values.shape)}")
    n = values.shape[1]
    if not 1 <= int(top_n) <= n:
        raise ValueError(f"top_n={top_n} must lie in [1, {n}] (responses per prompt)")
    if torch.isnan(values).any():
        raise ValueError("rewards contain NaN; the reward model returned an invalid score")
    # a stable ascending sort of the negated rewards keeps equal rewards in sample order
    order = torch.sort(-values, dim=1, stable=True).indices
    return order[:, : int(top_n)].to(torch.long)


def build_rs_training_batch(rollouts: Rollouts, pad_token_id: int, pack: bool = False,
                            max_row_length: int | None = None) -> SequenceBatch:
    """The SFT batch of kept rollouts: ``prompt + response`` tokens with the prompt masked out of the loss
    (:meth:`~nemo_aligner.data.rollouts.Rollouts.sequence_batch`).

    Args:
        rollouts: the kept rollouts.
        pad_token_id: padding id (never attended to, never a target).
        pack, max_row_length: as :func:`nemo_aligner.data.sequences.collate_sequences`.

    Returns:
        :class:`~nemo_aligner.data.sequences.SequenceBatch` whose ``targets`` are exactly the response tokens of each
        rollout, in rollout then token order (``target_lengths[s] = response_lengths[s]``).

    Raises:
        ValueError: as :func:`~nemo_aligner.data.sequences.collate_sequences` (no rollouts).
    """
    return rollouts.sequence_batch(pad_token_id, pack=pack, max_row_length=max_row_length)


def rs_rollout_metrics(rewards: torch.Tensor, response_lengths: torch.Tensor, kept: torch.Tensor) -> dict[str, float]:
    """Statistics of one RS rollout buffer.

    Args:
        rewards: ``[P, N]`` float rewards; response_lengths: ``[P, N]`` response tokens; kept: ``[P, K]`` indices
            from :func:`select_top_n`.

    Returns:
        ``rewards_all_mean``/``rewards_all_std`` (every sample), ``rewards_kept_mean`` (kept samples),
        ``rewards_best_mean`` (best sample per prompt), ``reward_spread_mean`` (mean over prompts of
        ``max - min`` reward), ``reward_std_per_prompt_mean`` (mean over prompts of the std over its samples, 0 when
        ``N = 1``), ``response_lengths_all_mean`` and ``response_lengths_kept_mean`` (tokens).
    """
    rewards = torch.as_tensor(rewards, dtype=torch.float64)
    lengths = torch.as_tensor(response_lengths, dtype=torch.float64)
    kept_rewards = rewards.gather(1, kept)
    n = rewards.shape[1]
    return {
        "rewards_all_mean": float(rewards.mean()),
        "rewards_all_std": float(rewards.flatten().std()) if rewards.numel() > 1 else 0.0,
        "rewards_kept_mean": float(kept_rewards.mean()),
        "rewards_best_mean": float(rewards.max(dim=1).values.mean()),
        "reward_spread_mean": float((rewards.max(dim=1).values - rewards.min(dim=1).values).mean()),
        "reward_std_per_prompt_mean": float(rewards.std(dim=1).mean()) if n > 1 else 0.0,
        "response_lengths_all_mean": float(lengths.mean()),
        "response_lengths_kept_mean": float(lengths.gather(1, kept).mean()),
    }


# ---------------------------------------------------------------------------------------------------------------
# trainer
# ---------------------------------------------------------------------------------------------------------------
class RSTrainer(OnlineTrainer):
    """The online rejection-sampling loop (rollouts -> rewards -> top-n selection -> SFT on the kept rollouts),
    with greedy validation, checkpoints of policy + optimizer + step (the data position), exact resume, logging and
    the HF export.

    Args:
        policy: an :class:`~nemo_aligner.models.alignable.AlignableModel` with ``generate`` and ``get_logprobs``
            (no reference policy needed).
        reward_fn: ``(prompt_ids, response_ids) -> list[float]``, one score per response.
        setup: the prompts and generation settings (:class:`~nemo_aligner.algorithms.online.RolloutSetup`); its
            ``sampling_params`` are the training rollouts', validation uses the same with ``use_greedy=True``.
        cfg: :class:`RSConfig`.
        context: the run (:class:`~nemo_aligner.algorithms.base.RunContext`): checkpoints (monitor
            ``val_global_rewards``, mode ``max``; resume restores policy, optimizer, scheduler, RNG and step),
            ``hf_export/`` and ``val_samples/`` in its ``log_dir``.

    Raises:
        ValueError: too few prompts for one step, or batch sizes that do not divide (see :meth:`RSConfig.check`).

    Generation, validation rollouts, the sample table and the loop (``fit``) are
    :class:`~nemo_aligner.algorithms.online.OnlineTrainer`'s; this class says what an RS step does. A fresh run
    validates once before training (``initial_val_metrics``, logged at step 0) when ``val_check_interval > 0``.

    Source: Touvron et al. 2023 (Llama 2), sec. 3.2.3; Dong et al. 2023 (RAFT).
    """

    name = "RS"
    summary_keys = ["rewards_all_mean", "rewards_kept_mean", "reward_spread_mean", "loss", "response_lengths_all_mean"]
    timing_keys = {"generation": "time_generation", "reward": "time_reward", "training": "time_train"}
    validate_before_training = True
    sample_table_title = "validation samples (greedy)"
    export_role = "the policy"

    def __init__(self, policy: AlignableModel, reward_fn: RewardFn, setup: RolloutSetup, cfg: RSConfig,
                 context: RunContext):
        cfg.check(policy.data_parallel_size)
        super().__init__(policy, reward_fn, setup, cfg, context)
        self.policy = policy
        self.greedy_params = dataclasses.replace(setup.sampling_params, use_greedy=True)
        self.max_steps = compute_rs_max_steps(len(self.train_prompts), cfg)
        self.optimizer_step = 0

    # ---- rollouts and selection -------------------------------------------------------------------------------
    def score_rollouts(self, rollouts: Rollouts) -> None:
        """Set ``rollouts.rewards`` with ``reward_fn``, in calls of ``forward_micro_batch_size`` rollouts.

        Raises:
            RuntimeError: the reward function returned the wrong number of scores.
        """
        score_rewards(self.reward_fn, rollouts, self.cfg.forward_micro_batch_size, self.end_of_turn, self.end_string)

    def select(self, rollouts: Rollouts, num_prompts: int) -> tuple[Rollouts, dict[str, float]]:
        """Keep the ``top_n_rollouts`` best of each prompt's ``num_rollouts_per_prompt`` scored rollouts
        (prompt-major order, as :meth:`generate_rollouts`); returns ``(kept, metrics of rs_rollout_metrics)``,
        the kept rollouts prompt by prompt, best first."""
        n = self.cfg.num_rollouts_per_prompt
        rewards = rollouts.rewards.view(num_prompts, n)
        lengths = rollouts.response_lengths.double().view(num_prompts, n)
        kept_idx = select_top_n(rewards, self.cfg.top_n_rollouts)
        kept = rollouts.select([p * n + j for p in range(num_prompts) for j in kept_idx[p].tolist()])
        metrics = rs_rollout_metrics(rewards, lengths, kept_idx)
        metrics["ended_fraction"] = int(rollouts.ended.sum()) / len(rollouts)
        return kept, metrics

    # ---- training ---------------------------------------------------------------------------------------------
    def train_on_rollouts(self, kept: Rollouts, seed: int) -> dict[str, float]:
        """One pass of SFT over this rank's kept rollouts (shuffled by ``seed``), one optimizer step per global
        batch of ``global_batch_size / data-parallel size`` rollouts on this rank, in micro-batches of
        ``micro_batch_size``. Each micro-batch's loss is its token-mean NLL of the response tokens
        (:func:`~nemo_aligner.algorithms.supervised.sft_loss_and_metrics`), divided by the number of micro-batches.

        Returns metrics averaged over the optimizer steps (and ranks): ``loss``, ``target_tokens``,
        ``grad_norm``, ``lr``, plus ``optimizer_steps``.
        """
        cfg = self.cfg
        per_rank = cfg.global_batch_size // self.policy.data_parallel_size
        order = list(range(len(kept)))
        random.Random(seed).shuffle(order)
        pad = self.policy.pad_token_id
        sums: dict[str, float] = {}
        steps = 0

        def loss_fn(chunk: Rollouts):
            batch = build_rs_training_batch(chunk, pad)
            loss, metrics = sft_loss_and_metrics(self.policy.get_logprobs(batch), batch)
            return loss, {k: metrics[k] for k in ("loss", "target_tokens")}

        for g in range(0, len(order), per_rank):
            micro = kept.select(order[g : g + per_rank]).split(cfg.micro_batch_size)
            step_sums, info = optimizer_step(self.policy, micro, loss_fn, [1.0] * len(micro), len(micro))
            step_sums.update(info)
            self.optimizer_step += 1
            for k, v in self.policy.all_reduce_mean(step_sums).items():
                sums[k] = sums.get(k, 0.0) + v
            steps += 1
        out = {k: v / max(steps, 1) for k, v in sums.items()}
        out["optimizer_steps"] = float(steps)
        return out

    def train_step(self) -> tuple[dict[str, float], Rollouts]:
        """Run RS step ``self.step``: rollouts, rewards, top-n selection, SFT on the kept rollouts.

        Returns ``(metrics averaged over ranks, this rank's kept rollouts)``.
        """
        cfg = self.cfg
        seed = self._step_seed(self.step)
        start = time.perf_counter()
        prompts = self.step_prompts()
        rollouts = self.generate_rollouts(prompts, cfg.num_rollouts_per_prompt, self.sampling_params,
                                          cfg.rollout_micro_batch_size, seed, prompt_indices=self.step_prompt_indices())
        metrics: dict[str, float] = {"time_generation": time.perf_counter() - start}
        metrics.update(self.policy.pop_generation_metrics())  # time_refit with a vLLM engine
        t0 = time.perf_counter()
        self.score_rollouts(rollouts)
        metrics["time_reward"] = time.perf_counter() - t0
        kept, selection = self.select(rollouts, len(prompts))
        metrics.update(selection)
        t0 = time.perf_counter()
        metrics.update(self.train_on_rollouts(kept, seed))
        metrics["time_train"] = time.perf_counter() - t0
        metrics["step_time"] = time.perf_counter() - start
        return self.policy.all_reduce_mean(metrics), kept

    # ---- validation -------------------------------------------------------------------------------------------
    def validate(self) -> dict[str, float]:
        """Greedy responses to the first ``num_val_samples`` validation prompts (split over ranks), scored by the
        reward: ``global_rewards`` (mean reward, the checkpoint monitor ``val_global_rewards``),
        ``global_response_lengths_mean`` (tokens). Writes ``<log_dir>/val_samples/step=<N>.md``, a table of the
        first ``num_val_samples_to_show`` prompts, responses and rewards (rank 0's share)."""
        if not self.val_prompts:
            return {}
        rollouts = self.validation_rollouts(self.greedy_params, self.cfg.val_rollout_micro_batch_size,
                                            self.cfg.forward_micro_batch_size)
        totals = torch.tensor([sum(rollouts.rewards.tolist()), sum(rollouts.response_lengths.tolist()),
                               float(len(rollouts))], dtype=torch.float64, device=self.policy.device)
        if self.policy.data_parallel_size > 1:
            totals = self.policy.all_reduce(totals, "sum")
        reward_sum, length_sum, count = totals.tolist()
        if count == 0:
            return {}
        if self.context.is_global_zero:
            self.write_samples(rollouts.select(range(min(self.cfg.num_val_samples_to_show, len(rollouts)))))
        return {"global_rewards": reward_sum / count, "global_response_lengths_mean": length_sum / count}

    # ---- loop state -------------------------------------------------------------------------------------------
    def _counters(self) -> dict[str, int]:
        """``optimizer_step`` (the policy's LR-schedule position), checkpointed and logged with each step."""
        return {"optimizer_step": self.optimizer_step}

    def _restore(self, extra: dict) -> None:
        self.optimizer_step = int(extra.get("optimizer_step", self.step * self.cfg.optimizer_steps_per_rs_step()))

    def _progress_postfix(self, metrics: dict[str, float]) -> dict[str, str]:
        return {"reward": f"{metrics['rewards_all_mean']:.3g}", "kept": f"{metrics['rewards_kept_mean']:.3g}"}
