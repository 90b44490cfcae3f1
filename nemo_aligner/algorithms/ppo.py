"""Proximal Policy Optimization for RLHF: actor, critic, reward model and initial policy, colocated or served.

One PPO *step* (NeMo-Aligner's "PPO step"):

1. **Rollout.** ``num_rollout_samples`` prompts are taken (deterministic, resumable order) and the actor samples a
   response to each, in micro-batches of ``rollout_micro_batch_size`` (``sampling_params``, ``length_params``).
2. **Inference.** For every response token: the actor's log-probabilities (the "old" policy of the ratio), the
   initial policy's log-probabilities (KL penalty), the critic's values; per response: one reward-model score.
3. **Advantages.** Per-token rewards ``-beta * KL_t`` plus the score at the last token (Ouyang et al. 2022 eq. 2;
   Ziegler et al. 2019), GAE (Schulman et al. 2016 eq. 11-16) with ``discount_factor`` and ``gae_lambda``,
   optionally whitened (``normalize_advantages``).
4. **Training.** The critic regresses the returns with the clipped value loss, then the actor minimises the
   clipped surrogate (Schulman et al. 2017 eq. 7) minus ``entropy_bonus`` times the entropy, each for
   ``ppo_epochs`` passes over the rollout buffer in global batches (``critic_global_batch_size``,
   ``model.global_batch_size``) split evenly over the data-parallel ranks (:func:`update_critic`,
   :func:`update_actor`; each optimizer step is :func:`~nemo_aligner.algorithms.base.optimizer_step`).

The maths of steps 3 and 4 are the pure functions of :mod:`nemo_aligner.algorithms.ppo_math`.

**Critic warm-up** (``critic_warmup_steps = K``, as in NeMo-Aligner): before the actor's first update of a fresh
run, the critic trains on ``K`` extra rollout buffers of step 1's prompts (each sampled with its own seed and scored
by the critic as it stands), so step 1's advantages come from a warmed-up critic. The warm-up takes no PPO step and
no prompts: ``max_steps`` PPO steps still update the actor ``max_steps`` times on ``max_steps`` prompt batches.

The trainer sees the four roles through small interfaces, so each can live in this process or behind HTTP:

* actor: an :class:`~nemo_aligner.models.alignable.AlignableModel` policy (always local; the master);
* critic: :class:`CriticHandle` -- :class:`LocalCritic` (colocated; one replica per data-parallel rank, each
  training on its share of the global batch) or :class:`nemo_aligner.servers.critic_server.RemoteCritic` (served;
  one critic for all ranks: rank 0 sends it every rank's rollouts, so it trains once per PPO step);
* initial policy: :class:`InitialPolicyHandle` -- :class:`LocalInitialPolicy` (the actor's frozen reference copy,
  or its LoRA adapters switched off) or :class:`nemo_aligner.servers.initial_policy_server.RemoteInitialPolicy`;
* reward: any ``reward_fn(prompt_ids, response_ids) -> list[float]``
  (:func:`~nemo_aligner.recipes.online.reward_fn_from_scorer` for a local
  :class:`~nemo_aligner.models.reward_model.RewardScorer`,
  :func:`~nemo_aligner.recipes.online.reward_fn_from_client` for the RM server, or a programmatic reward in tests).

Rollout generation, validation rollouts, the sample table and the loop (checkpoints, resume, logging, export) are
:class:`~nemo_aligner.algorithms.online.OnlineTrainer`'s, shared with rejection sampling.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Protocol

import torch

from nemo_aligner.algorithms.base import RunContext, optimizer_step
from nemo_aligner.algorithms.online import (
    OnlineTrainer,
    RewardFn,
    RolloutSetup,
    compute_online_max_steps,
    score_rewards,
)
from nemo_aligner.data.rollouts import Rollouts
from nemo_aligner.errors import MissingFileError
from nemo_aligner.models.alignable import AlignableModel
from nemo_aligner.utils.checkpoint import CheckpointManager
from nemo_aligner.utils.config import ConfigValueError, config_schema, dataclass_from_sections, key
from nemo_aligner.algorithms.ppo_math import (
    calculate_gae,
    calculate_kl_penalty,
    explained_variance,
    flat_to_padded,
    kl_penalized_token_rewards,
    logprob_mismatch,
    masked_mean,
    padded_to_flat,
    ppo_policy_loss,
    ppo_value_loss,
)


# ---------------------------------------------------------------------------------------------------------------
# configuration
# ---------------------------------------------------------------------------------------------------------------
@config_schema("gpt_ppo_actor", trainer="trainer.ppo", ppo="model.ppo", model="model", critic="critic")
@dataclass
class PPOConfig:
    """``trainer.ppo`` and ``model.ppo`` settings plus batch sizes (NeMo-Aligner key names).

    Loop (``trainer.ppo``): ``max_epochs`` (passes over the prompts), ``max_steps`` (-1: all), ``val_check_interval``,
    ``save_interval``, ``gradient_clip_val``. Advantages (``trainer.ppo``): ``initial_policy_kl_penalty`` (beta),
    ``use_absolute_kl``, ``discount_factor`` (gamma), ``gae_lambda``, ``normalize_advantages``,
    ``critic_warmup_steps`` (extra critic-only rollout buffers before step 1; no PPO step), ``ppo_epochs`` (passes
    over each rollout buffer).
    Rollouts (``model.ppo``): ``num_rollout_samples``, ``rollout_micro_batch_size``, ``forward_micro_batch_size``,
    ``num_val_samples``, ``val_rollout_micro_batch_size``; loss: ``entropy_bonus``, ``ratio_eps``,
    ``mask_truncated`` (responses that did not end contribute nothing to the actor loss). Actor batches
    (``model``): ``global_batch_size``, ``micro_batch_size``, ``seed``. Critic batches (colocated ``critic``
    section): ``critic_global_batch_size``, ``critic_micro_batch_size``.

    Each field is the one place of its key's type and default (its section and key name are in
    :func:`~nemo_aligner.utils.config.key`), registered as the ``gpt_ppo_actor`` structured config; the defaults
    are ``conf/gpt_ppo_actor.yaml``'s values. Nullable keys (null or absent: derived) are
    ``forward_micro_batch_size``, ``val_rollout_micro_batch_size`` (-> ``rollout_micro_batch_size``),
    ``num_val_samples`` (-> ``num_rollout_samples``) and the critic batch sizes (-> the actor's).
    """

    max_epochs: int = key("trainer", 1)
    max_steps: int = key("trainer", -1)
    val_check_interval: int = key("trainer", 10)
    save_interval: int = key("trainer", 10)
    gradient_clip_val: float = key("trainer", 1.0)
    initial_policy_kl_penalty: float = key("trainer", 0.01)
    use_absolute_kl: bool = key("trainer", True)
    discount_factor: float = key("trainer", 1.0)
    gae_lambda: float = key("trainer", 0.95)
    normalize_advantages: bool = key("trainer", True)
    critic_warmup_steps: int = key("trainer", 0)
    ppo_epochs: int = key("trainer", 1)
    num_rollout_samples: int = key("ppo", 8)
    rollout_micro_batch_size: int = key("ppo", 4)
    forward_micro_batch_size: int = key("ppo", 4, nullable=True)
    num_val_samples: int = key("ppo", 8, nullable=True)
    val_rollout_micro_batch_size: int = key("ppo", 4, nullable=True)
    entropy_bonus: float = key("ppo", 0.0)
    ratio_eps: float = key("ppo", 0.2)
    mask_truncated: bool = key("ppo", True)
    global_batch_size: int = key("model", 8)
    micro_batch_size: int = key("model", 1)
    critic_global_batch_size: int = key("critic", 8, name="global_batch_size", nullable=True)
    critic_micro_batch_size: int = key("critic", 1, name="micro_batch_size", nullable=True)
    seed: int = key("model", 1234)
    num_val_samples_to_show: int = key("ppo", 4)

    @classmethod
    def from_cfg(cls, cfg: Any) -> "PPOConfig":
        """From a full actor config (``trainer.ppo``, ``model.ppo``, ``model``, optional ``critic``); an absent key
        takes the field's default, a null (or 0) nullable key its derived value (see the class docstring).

        Raises:
            ConfigValueError: a value of the wrong type, naming its key.
            ValueError: an out-of-range value (see :meth:`check`).
        """
        out = dataclass_from_sections(
            cls, {"trainer": cfg.trainer.ppo, "ppo": cfg.model.ppo, "model": cfg.model, "critic": cfg.get("critic") or {}}
        )
        derived = {"forward_micro_batch_size": out.rollout_micro_batch_size,
                   "val_rollout_micro_batch_size": out.rollout_micro_batch_size,
                   "num_val_samples": out.num_rollout_samples,
                   "critic_global_batch_size": out.global_batch_size, "critic_micro_batch_size": out.micro_batch_size}
        for name, value in derived.items():
            if not getattr(out, name):  # null, absent or 0, as NeMo-Aligner's `x or y`
                setattr(out, name, value)
        out.check()
        return out

    def check(self) -> None:
        """Raise ``ValueError`` naming the key of the first out-of-range value."""
        if self.num_rollout_samples < 1 or self.rollout_micro_batch_size < 1 or self.forward_micro_batch_size < 1:
            raise ConfigValueError("model.ppo.num_rollout_samples, rollout_micro_batch_size, forward_micro_batch_size must be >= 1")
        if self.num_rollout_samples % self.rollout_micro_batch_size:
            raise ConfigValueError(
                f"model.ppo.num_rollout_samples={self.num_rollout_samples} must be a multiple of "
                f"model.ppo.rollout_micro_batch_size={self.rollout_micro_batch_size}"
            )
        if self.global_batch_size < 1 or self.micro_batch_size < 1 or self.global_batch_size % self.micro_batch_size:
            raise ConfigValueError(
                f"model.global_batch_size={self.global_batch_size} must be a positive multiple of "
                f"model.micro_batch_size={self.micro_batch_size}"
            )
        if self.ratio_eps <= 0:
            raise ConfigValueError(f"model.ppo.ratio_eps must be > 0, got {self.ratio_eps}")
        if self.initial_policy_kl_penalty < 0:
            raise ConfigValueError(f"trainer.ppo.initial_policy_kl_penalty must be >= 0, got {self.initial_policy_kl_penalty}")
        if not (0 <= self.discount_factor <= 1 and 0 <= self.gae_lambda <= 1):
            raise ConfigValueError("trainer.ppo.discount_factor and gae_lambda must lie in [0, 1]")
        if self.ppo_epochs < 1:
            raise ConfigValueError(f"trainer.ppo.ppo_epochs must be >= 1, got {self.ppo_epochs}")
        if self.critic_warmup_steps < 0:
            raise ConfigValueError(f"trainer.ppo.critic_warmup_steps must be >= 0, got {self.critic_warmup_steps}")
        if self.critic_global_batch_size < 1 or self.critic_micro_batch_size < 1:
            raise ConfigValueError("critic.global_batch_size and critic.micro_batch_size must be >= 1")

    def optimizer_steps_per_ppo_step(self, global_batch_size: int | None = None) -> int:
        """Optimizer steps made on one rollout buffer: ``ppo_epochs * ceil(num_rollout_samples / gbs)`` (on every
        data-parallel rank alike: each takes ``gbs / W`` of its ``num_rollout_samples / W`` rollouts per step)."""
        gbs = global_batch_size or self.global_batch_size
        return self.ppo_epochs * math.ceil(self.num_rollout_samples / gbs)

    def critic_optimizer_steps(self, ppo_steps: int) -> int:
        """Critic optimizer steps of a run of ``ppo_steps`` PPO steps, warm-up included (its LR schedule):
        ``(ppo_steps + critic_warmup_steps) * optimizer_steps_per_ppo_step(critic_global_batch_size)``."""
        return (ppo_steps + self.critic_warmup_steps) * self.optimizer_steps_per_ppo_step(self.critic_global_batch_size)


def compute_ppo_max_steps(num_prompts: int, cfg: PPOConfig) -> int:
    """PPO steps of a run: ``max_epochs * (num_prompts // num_rollout_samples)``, capped by ``max_steps`` >= 0
    (:func:`~nemo_aligner.algorithms.online.compute_online_max_steps`).

    Raises:
        ValueError: the result is 0 (fewer prompts than one rollout batch, or ``max_steps=0``).
    """
    return compute_online_max_steps(num_prompts, cfg, "ppo")


# ---------------------------------------------------------------------------------------------------------------
# roles
# ---------------------------------------------------------------------------------------------------------------
def check_ppo_batch_sizes(cfg: PPOConfig, world: int, critic_shared: bool) -> None:
    """Check that ``world`` data-parallel actor ranks can split the PPO batch sizes: ``num_rollout_samples`` a
    multiple of ``rollout_micro_batch_size`` x ``world``, ``model.global_batch_size`` (and, for a per-rank critic,
    ``critic.global_batch_size``; a shared one trains on the gathered batch, in one process) a multiple of
    ``world``.

    Raises:
        ConfigValueError: naming the key that does not split.
    """
    if cfg.num_rollout_samples % (cfg.rollout_micro_batch_size * world):
        raise ConfigValueError(
            f"model.ppo.num_rollout_samples={cfg.num_rollout_samples} must be a multiple of "
            f"rollout_micro_batch_size x data-parallel size ({cfg.rollout_micro_batch_size} x {world})"
        )
    batches = [("model.global_batch_size", cfg.global_batch_size)]
    if not critic_shared:
        batches.append(("critic.global_batch_size", cfg.critic_global_batch_size))
    for key, size in batches:
        if size % world:
            raise ConfigValueError(f"{key}={size} must be a multiple of the data-parallel size {world} (each rank "
                                   f"trains on {key} / {world} of its rollouts per optimizer step)")


class CriticHandle(Protocol):
    """What the PPO trainer needs from a critic (local or remote).

    ``shared`` (class attribute, default ``False``): one critic serves every data-parallel rank (a server). The
    trainer then calls :meth:`train` on rank 0 only, with the rollouts of all ranks, and :meth:`save`,
    :meth:`load`, :meth:`reset` on rank 0 only; otherwise every rank calls every method (with its own rollouts).
    """

    shared: bool

    def infer(self, rollouts: Rollouts) -> torch.Tensor:
        """``[N]`` float32 values of the response tokens of ``rollouts`` (flat, rollout then token order)."""

    def train(self, rollouts: Rollouts, seed: int, step: int) -> dict[str, float]:
        """Critic training on rollouts with ``values`` and ``returns``; returns metrics. ``step`` numbers the
        trainings of a run (warm-up buffer ``w`` is ``w``, PPO step ``s`` (0-based) is ``critic_warmup_steps + s``),
        so that a retried request can be recognised."""

    def save(self, step: int) -> None:
        """Checkpoint the critic as of PPO step ``step``."""

    def load(self, step: int) -> None:
        """Restore the checkpoint written by :meth:`save` at ``step``."""

    def reset(self) -> None:
        """Return to the initial state (initial weights, fresh optimizer and LR schedule, step 0); the trainer calls
        it before the first step of a fresh (not resumed) run."""

    def prune(self, keep_steps: set[int]) -> None:
        """Delete the critic checkpoints whose step is not in ``keep_steps`` (the steps the actor kept)."""


class InitialPolicyHandle(Protocol):
    """What the PPO trainer needs from the initial (reference) policy."""

    def logprobs(self, rollouts: Rollouts) -> torch.Tensor:
        """``[N]`` float32 log-probabilities (nats) of the response tokens of ``rollouts`` (flat)."""


class LocalCritic:
    """A colocated :class:`~nemo_aligner.models.critic.HFCritic` behind :class:`CriticHandle`.

    Args:
        critic: the model.
        checkpoint_dir: where :meth:`save` writes ``step=<N>`` directories (kept in step with the actor's).
        forward_micro_batch_size: inference micro-batch; global/micro_batch_size: training batches; epochs: passes.

    :meth:`reset` costs nothing for a critic this handle has not trained or loaded yet (the usual colocated case: the
    process built it for this run), and re-reads the initial weights otherwise.

    Under data parallelism every rank holds a replica and trains it on its own rollouts, ``global_batch_size / W``
    of them per optimizer step (:func:`update_critic`).
    """

    shared = False

    def __init__(self, critic, checkpoint_dir: str | Path, forward_micro_batch_size: int, global_batch_size: int,
                 micro_batch_size: int, epochs: int = 1):
        self.critic = critic
        self.checkpoints = CheckpointManager(checkpoint_dir, save_top_k=-1)
        self.forward_micro_batch_size = forward_micro_batch_size
        self.global_batch_size = global_batch_size
        self.micro_batch_size = micro_batch_size
        self.epochs = epochs
        self._changed = False  # trained or loaded since construction (or the last reset)

    def infer(self, rollouts: Rollouts) -> torch.Tensor:
        return critic_values(self.critic, rollouts, self.forward_micro_batch_size)

    def train(self, rollouts: Rollouts, seed: int, step: int = 0) -> dict[str, float]:
        self._changed = True
        return update_critic(self.critic, rollouts, self.global_batch_size, self.micro_batch_size, self.epochs, seed)

    def reset(self) -> None:
        """Bring the critic back to its initial state (:meth:`~nemo_aligner.models.critic.HFCritic.reset`); a no-op
        while it has not been trained or loaded through this handle.

        Raises:
            NotImplementedError: the critic changed and is sharded with FSDP (it cannot be reset in place).
        """
        if self._changed:
            self.critic.reset()
            self._changed = False

    def save(self, step):
        self.critic.save_checkpoint(str(self.checkpoints.path_for(step)), {"step": step})

    def load(self, step):
        path = self.checkpoints.path_for(step)
        if not path.is_dir():
            raise MissingFileError(f"critic checkpoint {path} is missing (the actor checkpoint of step {step} exists)")
        self._changed = True
        self.critic.load_checkpoint(str(path))

    def prune(self, keep_steps: set[int]) -> None:
        """Delete critic checkpoints whose step is not in ``keep_steps`` (mirrors the actor's top-k pruning)."""
        import shutil

        for path, meta in self.checkpoints.checkpoints():
            if int(meta.get("step", -1)) not in keep_steps:
                shutil.rmtree(path, ignore_errors=True)


class LocalInitialPolicy:
    """The actor's reference policy (frozen copy, or LoRA adapters off) as the initial policy."""

    def __init__(self, actor: AlignableModel, forward_micro_batch_size: int):
        self.actor = actor
        self.forward_micro_batch_size = forward_micro_batch_size

    def logprobs(self, rollouts: Rollouts) -> torch.Tensor:
        return policy_logprobs(self.actor, rollouts, self.forward_micro_batch_size, reference=True)


@torch.no_grad()
def policy_logprobs(model: AlignableModel, rollouts: Rollouts, micro_batch_size: int,
                    reference: bool = False) -> torch.Tensor:
    """``[N]`` float32 log-probabilities (nats, on the CPU) of the response tokens of ``rollouts`` under ``model``
    (or its reference policy), in consecutive micro-batches of ``micro_batch_size`` rollouts."""
    pad = model.pad_token_id
    with model.inference():
        out = [model.get_logprobs(chunk.sequence_batch(pad), reference=reference).detach().float().cpu()
               for chunk in rollouts.split(micro_batch_size)]
    return torch.cat(out)


@torch.no_grad()
def critic_values(critic: AlignableModel, rollouts: Rollouts, micro_batch_size: int) -> torch.Tensor:
    """``[N]`` float32 values (on the CPU) of the response tokens of ``rollouts`` under ``critic``
    (:meth:`~nemo_aligner.models.alignable.AlignableModel.get_values`), in consecutive micro-batches of
    ``micro_batch_size`` rollouts."""
    with critic.inference():
        out = [critic.get_values(chunk.sequence_batch(critic.pad_token_id)).detach().float().cpu()
               for chunk in rollouts.split(micro_batch_size)]
    return torch.cat(out)


# ---------------------------------------------------------------------------------------------------------------
# advantages
# ---------------------------------------------------------------------------------------------------------------
def compute_advantages(rollouts: Rollouts, cfg: PPOConfig, all_reduce: Callable | None = None) -> dict[str, float]:
    """Set ``rollouts.advantages`` and ``rollouts.returns`` (``[N]`` float32) from its ``logprobs``,
    ``init_logprobs``, ``values`` and ``rewards``; return buffer statistics.

    KL penalty per token (:func:`~nemo_aligner.algorithms.ppo_math.calculate_kl_penalty`), KL-penalised token rewards
    (Ouyang et al. 2022 eq. 2), GAE (Schulman et al. 2016 eq. 11-16) per response; with ``normalize_advantages`` the
    advantages are whitened over every response token of the buffer (``all_reduce(tensor, "sum")`` makes the
    moments global across data-parallel ranks when given).

    Returns:
        ``init_policy_kl`` (mean per-response summed KL, nats; the raw ``log pi - log pi_init`` even with
        ``use_absolute_kl``), ``advantages_mean``/``std`` (before whitening), ``returns_mean``.
    """
    seq_id, num = rollouts.token_seq_id(), len(rollouts)
    logp, init_logp, values = rollouts.logprobs, rollouts.init_logprobs, rollouts.values
    rewards = rollouts.rewards.float()
    kl = calculate_kl_penalty(logp, init_logp, cfg.use_absolute_kl)
    kl_p, mask = flat_to_padded(kl, seq_id, num)
    values_p, _ = flat_to_padded(values, seq_id, num)
    token_rewards = kl_penalized_token_rewards(rewards, kl_p, mask, cfg.initial_policy_kl_penalty)
    adv_p, ret_p = calculate_gae(token_rewards, values_p, mask, cfg.discount_factor, cfg.gae_lambda)
    adv, ret = padded_to_flat(adv_p, mask), padded_to_flat(ret_p, mask)

    moments = torch.stack([adv.sum(), (adv**2).sum(), torch.tensor(float(adv.numel()))]).double()
    if all_reduce is not None:
        moments = all_reduce(moments, "sum")
    total, total_sq, count = moments.tolist()
    mean = total / max(count, 1)
    var = max(total_sq / max(count, 1) - mean**2, 0.0) * (count / (count - 1) if count > 1 else 1.0)
    stats = {
        "advantages_mean": mean,
        "advantages_std": math.sqrt(var),
        "returns_mean": float(ret.mean()),
        "init_policy_kl": float((logp - init_logp).sum() / num),
    }
    if cfg.normalize_advantages:
        adv = (adv - mean) / math.sqrt(var + 1e-8)
    rollouts.advantages, rollouts.returns = adv, ret
    return stats


# ---------------------------------------------------------------------------------------------------------------
# updates: the actor's clipped surrogate and the critic's clipped value regression
# ---------------------------------------------------------------------------------------------------------------
def _global_batches(rollouts: Rollouts, per_rank: int, micro_batch_size: int, seed: int):
    """The global batches of one epoch over ``rollouts`` (shuffled by ``random.Random(seed)``): ``per_rank``
    rollouts each (an incomplete last one too), as ``(group, micro-batches of micro_batch_size)``."""
    order = list(range(len(rollouts)))
    random.Random(seed).shuffle(order)
    for g in range(0, len(order), per_rank):
        group = rollouts.select(order[g : g + per_rank])
        yield group, group.split(micro_batch_size)


def update_actor(actor: AlignableModel, rollouts: Rollouts, cfg: PPOConfig, seed: int) -> dict[str, float]:
    """``ppo_epochs`` passes of clipped-surrogate updates of ``actor`` over ``rollouts`` (shuffled by ``seed + epoch``).

    Each global batch (``global_batch_size / data-parallel size`` rollouts on this rank) is one optimizer step
    (:func:`~nemo_aligner.algorithms.base.optimizer_step`); the loss is the token-weighted mean over the batch of the
    clipped surrogate (Schulman et al. 2017 eq. 7) minus ``entropy_bonus`` times the mean token entropy (eq. 9; the
    entropy comes from ``actor.get_logprobs(batch, return_entropy=True)``): micro-batch ``i`` weighs its share of
    the batch's (kept) response tokens.

    With ``mask_truncated`` (NeMo-Aligner's ``is_end`` mask, always on there) only the tokens of rollouts that
    ``ended`` (EOS or an end string) enter the loss and the entropy: a response cut at ``max_length`` gives no
    gradient, and the mean is over the ended rollouts' tokens of the batch. A batch without an ended rollout
    makes an optimizer step with a zero gradient. ``clip_fraction``, ``approx_kl`` and ``ratio_mean`` are
    over the same tokens (0 for such a batch).

    Args:
        rollouts: this rank's rollouts, with ``ended``, ``logprobs`` (the rollout policy's) and ``advantages``.

    Returns:
        Averages over optimizer steps (and ranks) of ``policy_loss``, ``entropy``, ``actor_loss``,
        ``clip_fraction``, ``approx_kl``, ``ratio_mean``, ``actor_grad_norm``, ``actor_lr``, plus
        ``actor_optimizer_steps``.
    """
    per_rank = max(cfg.global_batch_size // actor.data_parallel_size, 1)
    pad, device = actor.pad_token_id, actor.device
    sums: dict[str, float] = {}
    steps = 0

    def loss_fn(micro: tuple[Rollouts, torch.Tensor]):
        chunk, chunk_keep = micro
        batch = chunk.sequence_batch(pad)
        old = chunk.logprobs.to(device)
        adv = chunk.advantages.to(device)
        mask = None
        if not bool(chunk_keep.all()):  # 1 on the tokens of the rollouts that enter the loss
            mask = chunk_keep.repeat_interleave(chunk.response_lengths).float().to(device)
        logprobs, entropies = actor.get_logprobs(batch, return_entropy=True)
        pg_loss, metrics = ppo_policy_loss(logprobs, old, adv, cfg.ratio_eps, mask)
        entropy = masked_mean(entropies, mask)
        loss = pg_loss - cfg.entropy_bonus * entropy
        metrics.update(policy_loss=pg_loss.detach(), entropy=entropy.detach(), actor_loss=loss.detach())
        return loss, metrics

    for epoch in range(cfg.ppo_epochs):
        for group, micro in _global_batches(rollouts, per_rank, cfg.micro_batch_size, seed + epoch):
            keep = [chunk.ended if cfg.mask_truncated else torch.ones(len(chunk), dtype=torch.bool) for chunk in micro]
            kept = [int(chunk.response_lengths[ks].sum()) for chunk, ks in zip(micro, keep)]
            total_tokens = sum(kept)
            weights = [n / total_tokens if total_tokens else 0.0 for n in kept]
            step_sums, info = optimizer_step(actor, list(zip(micro, keep)), loss_fn, weights)
            step_sums.update({f"actor_{k}": v for k, v in info.items()})
            for k, v in actor.all_reduce_mean(step_sums).items():
                sums[k] = sums.get(k, 0.0) + v
            steps += 1
    out = {k: v / max(steps, 1) for k, v in sums.items()}
    out["actor_optimizer_steps"] = float(steps)
    return out


def update_critic(
    critic: AlignableModel, rollouts: Rollouts, global_batch_size: int, micro_batch_size: int, epochs: int = 1,
    seed: int = 0,
) -> dict[str, float]:
    """Fit the critic's values of the response tokens to their GAE returns with the clipped value loss
    (:func:`~nemo_aligner.algorithms.ppo_math.ppo_value_loss`, clipping range ``critic.loss_clip_val``).

    Each epoch visits the rollouts in an order shuffled by ``random.Random(seed + epoch)``, in global batches of
    ``global_batch_size`` (one optimizer step each, :func:`~nemo_aligner.algorithms.base.optimizer_step`; an
    incomplete last batch is still a step) cut into micro-batches of ``micro_batch_size``; the loss is the
    token-weighted mean over the batch. Under data parallelism (``W`` ranks, each passing its own rollouts) a global
    batch is ``global_batch_size / W`` rollouts of each rank, as for the actor, so a PPO step makes the optimizer
    steps of one process holding all the rollouts. The critic server calls this too, on every rank's rollouts.

    Args:
        critic: a critic (:meth:`~nemo_aligner.models.alignable.AlignableModel.get_values`, ``loss_clip_val``).
        rollouts: rollouts with ``values`` (rollout-time values) and ``returns``.

    Returns:
        Averages over optimizer steps of ``value_loss``, ``value_clip_fraction``, ``explained_variance``,
        ``values_mean``, ``returns_mean``, ``grad_norm``, ``lr``, plus ``critic_optimizer_steps``.

    Raises:
        ValueError: the rollouts have no ``values`` or no ``returns``.
    """
    if rollouts.values is None or rollouts.returns is None:
        raise ValueError("critic training needs rollouts with values and returns")
    per_rank = max(global_batch_size // critic.data_parallel_size, 1)
    device = critic.device
    sums: dict[str, float] = {}
    steps = 0

    def loss_fn(chunk: Rollouts):
        batch = chunk.sequence_batch(critic.pad_token_id)
        old = chunk.values.to(device)
        ret = chunk.returns.to(device)
        values = critic.get_values(batch)
        loss, metrics = ppo_value_loss(values, old, ret, critic.loss_clip_val)
        with torch.no_grad():
            metrics["value_loss"] = loss.detach()
            metrics["values_mean"] = values.detach().mean()
            metrics["returns_mean"] = ret.mean()
        return loss, metrics

    for epoch in range(epochs):
        for group, micro in _global_batches(rollouts, per_rank, micro_batch_size, seed + epoch):
            total_tokens = group.num_response_tokens
            weights = [chunk.num_response_tokens / total_tokens for chunk in micro]
            step_sums, info = optimizer_step(critic, micro, loss_fn, weights)
            with torch.no_grad():
                step_sums["explained_variance"] = float(explained_variance(group.values, group.returns))
            step_sums.update(info)
            for k, v in step_sums.items():
                sums[k] = sums.get(k, 0.0) + v
            steps += 1
    out = {k: v / max(steps, 1) for k, v in sums.items()}
    out["critic_optimizer_steps"] = float(steps)
    return out


# ---------------------------------------------------------------------------------------------------------------
# trainer
# ---------------------------------------------------------------------------------------------------------------
class PPOTrainer(OnlineTrainer):
    """The online PPO loop (rollout -> inference -> advantages -> critic and actor training), with validation,
    checkpoints of actor + critic + data position, exact resume, logging and the HF export.

    Args:
        actor: the policy; must implement ``generate`` and ``get_logprobs``.
        critic: :class:`CriticHandle`.
        initial_policy: :class:`InitialPolicyHandle`.
        reward_fn: ``(prompt_ids, response_ids) -> list[float]``, one score per response.
        setup: the prompts and generation settings (:class:`~nemo_aligner.algorithms.online.RolloutSetup`).
        cfg: :class:`PPOConfig`.
        context: the run (:class:`~nemo_aligner.algorithms.base.RunContext`): the actor's checkpoints (monitor
            ``val_global_rewards``, mode ``max``; resume restores actor, critic and data position), ``hf_export/``
            and ``val_samples/`` in its ``log_dir``.

    Raises:
        ValueError: too few prompts for one step, ``num_rollout_samples`` not a multiple of
            ``rollout_micro_batch_size`` x data-parallel size, or a global batch size (``model.global_batch_size``;
            ``critic.global_batch_size`` of a colocated critic) not a multiple of the data-parallel size.

    Generation, validation rollouts, the sample table and the loop (``fit``) are
    :class:`~nemo_aligner.algorithms.online.OnlineTrainer`'s; this class says what a PPO step does.
    """

    name = "PPO"
    summary_keys = ["rewards_mean", "init_policy_kl", "policy_loss", "value_loss", "clip_fraction", "entropy"]
    timing_keys = {"generation": "time_generation", "inference": "time_inference", "training": "time_train"}
    export_role = "the actor"

    def __init__(self, actor: AlignableModel, critic: CriticHandle, initial_policy: InitialPolicyHandle,
                 reward_fn: RewardFn, setup: RolloutSetup, cfg: PPOConfig, context: RunContext):
        check_ppo_batch_sizes(cfg, actor.data_parallel_size, critic.shared)
        super().__init__(actor, reward_fn, setup, cfg, context, rollout_micro_batch_size=cfg.rollout_micro_batch_size)
        self.actor = actor
        self.critic = critic
        self.initial_policy = initial_policy
        self.max_steps = compute_ppo_max_steps(len(self.train_prompts), cfg)

    # ---- rollouts ---------------------------------------------------------------------------------------------
    def score_rollouts(self, rollouts: Rollouts) -> dict[str, float]:
        """Set ``logprobs``, ``init_logprobs``, ``values`` and ``rewards`` of the rollouts; return timings.

        Raises:
            RuntimeError: the actor, initial policy or critic did not give one number per response token.
        """
        timing = {}
        start = time.perf_counter()
        logprobs = policy_logprobs(self.actor, rollouts, self.cfg.forward_micro_batch_size)
        init_logprobs = self.initial_policy.logprobs(rollouts)
        values = self.critic.infer(rollouts)
        timing["time_inference_policy_critic"] = time.perf_counter() - start
        start = time.perf_counter()
        score_rewards(self.reward_fn, rollouts, end_of_turn=self.end_of_turn, end_string=self.end_string)
        timing["time_inference_reward"] = time.perf_counter() - start
        n = rollouts.num_response_tokens
        if not (logprobs.shape == init_logprobs.shape == values.shape == (n,)):
            raise RuntimeError(f"{n} response tokens got {logprobs.numel()} logprobs, {init_logprobs.numel()} initial, "
                               f"{values.numel()} values")
        rollouts.logprobs, rollouts.init_logprobs, rollouts.values = logprobs, init_logprobs, values
        if rollouts.engine_logprobs is not None:
            timing.update(logprob_mismatch(rollouts.engine_logprobs, logprobs))
        return timing

    # ---- actor training ---------------------------------------------------------------------------------------
    def train_actor(self, rollouts: Rollouts, seed: int) -> dict[str, float]:
        """The actor's update on this rank's rollout buffer (:func:`update_actor`)."""
        return update_actor(self.actor, rollouts, self.cfg, seed)

    # ---- critic training --------------------------------------------------------------------------------------
    def _barrier(self) -> None:
        """Wait for every data-parallel rank (a collective on the actor's process group)."""
        if self.actor.data_parallel_size > 1:
            self.actor.all_reduce(torch.zeros(1, device=self.actor.device), "sum")

    def _on_critic_owner(self, fn: Callable[[], Any]) -> None:
        """``fn()`` on every rank for a per-rank critic; for a shared (served) one on rank 0 only, then a barrier,
        so that no rank talks to the critic before the call is done."""
        if not self.critic.shared:
            fn()
            return
        if self.actor.data_parallel_rank == 0:
            fn()
        self._barrier()

    def train_critic(self, rollouts: Rollouts, seed: int, round_index: int) -> dict[str, float]:
        """One critic training on this PPO step's rollout buffer (``round_index``: see :meth:`CriticHandle.train`).

        A per-rank (colocated) critic trains on this rank's rollouts (each rank ``critic_global_batch_size / W`` per
        optimizer step, gradients averaged by DDP). A shared (served) critic gets every rank's rollouts, gathered on
        rank 0 in rank order, in one request, so it trains once per PPO step on the full global batch; its metrics
        are then given to every rank.
        """
        world = self.actor.data_parallel_size
        if not self.critic.shared or world == 1:
            return self.critic.train(rollouts, seed=seed, step=round_index)
        shards = _all_gather_objects(rollouts, world)
        metrics = None
        if self.actor.data_parallel_rank == 0:
            metrics = self.critic.train(Rollouts.cat(shards), seed=seed, step=round_index)
        return _all_gather_objects(metrics, world)[0]

    def _rollout_buffer(self, seed: int) -> tuple[Rollouts, dict[str, float]]:
        """This rank's rollouts of step ``self.step``'s prompts, sampled with ``seed``, scored (log-probs, values,
        rewards) and with advantages and returns; plus their metrics."""
        cfg = self.cfg
        start = time.perf_counter()
        rollouts = self.generate_rollouts(self.step_prompts(), 1, self.sampling_params, cfg.rollout_micro_batch_size,
                                          seed, prompt_indices=self.step_prompt_indices())
        metrics: dict[str, float] = {"time_generation": time.perf_counter() - start}
        metrics.update(self.actor.pop_generation_metrics())  # time_refit with a vLLM engine
        t0 = time.perf_counter()
        metrics.update(self.score_rollouts(rollouts))
        metrics["time_inference"] = time.perf_counter() - t0
        reduce = self.actor.all_reduce if self.actor.data_parallel_size > 1 else None
        metrics.update(compute_advantages(rollouts, cfg, reduce))
        metrics.update(rollout_metrics(rollouts))
        return rollouts, metrics

    def _warmup_seed(self, index: int) -> int:
        """The sampling seed of critic warm-up buffer ``index`` (apart from every step's :meth:`_step_seed`)."""
        return self.cfg.seed + 2**40 + 1_000_003 * index

    def warm_up_critic(self) -> dict[str, float]:
        """NeMo-Aligner's critic warm-up, run before the actor's first update of a fresh run: ``critic_warmup_steps``
        times, a rollout buffer of step 1's prompts (its own seed, values from the critic as trained so far) and one
        critic training on it. The actor, the data position and the step count do not change.

        Returns:
            ``critic_warmup_<metric>``: the warm-up trainings' mean ``value_loss``, ``explained_variance`` and
            ``rewards_mean``, their total ``optimizer_steps``; ``time_critic_warmup`` (seconds).
        """
        start = time.perf_counter()
        sums: dict[str, float] = {}
        for w in range(self.cfg.critic_warmup_steps):
            seed = self._warmup_seed(w)
            rollouts, buffer_metrics = self._rollout_buffer(seed)
            critic_metrics = self.train_critic(rollouts, seed, round_index=w)
            for k, v in {**critic_metrics, "rewards_mean": buffer_metrics["rewards_mean"]}.items():
                sums[k] = sums.get(k, 0.0) + float(v)
        n = max(self.cfg.critic_warmup_steps, 1)
        out = {f"critic_warmup_{k}": sums.get(k, 0.0) / n for k in ("value_loss", "explained_variance", "rewards_mean")}
        out["critic_warmup_optimizer_steps"] = sums.get("critic_optimizer_steps", 0.0)
        out["time_critic_warmup"] = time.perf_counter() - start
        return out

    # ---- one PPO step -----------------------------------------------------------------------------------------
    def train_step(self) -> tuple[dict[str, float], Rollouts]:
        """Run PPO step ``self.step``: rollouts, inference, advantages, critic then actor training (after the critic
        warm-up of :meth:`warm_up_critic` when this is the first step of a fresh run)."""
        cfg = self.cfg
        seed = self._step_seed(self.step)
        start = time.perf_counter()
        warmup = self.warm_up_critic() if self.step == 0 and cfg.critic_warmup_steps > 0 else {}
        rollouts, metrics = self._rollout_buffer(seed)
        metrics.update(warmup)
        t0 = time.perf_counter()
        critic_metrics = self.train_critic(rollouts, seed, round_index=cfg.critic_warmup_steps + self.step)
        metrics.update({f"critic_{k}" if k in ("grad_norm", "lr", "returns_mean") else k: v for k, v in critic_metrics.items()})
        metrics["time_train_critic"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        metrics.update(self.train_actor(rollouts, seed))
        metrics["time_train_actor"] = time.perf_counter() - t0
        metrics["time_train"] = metrics["time_train_critic"] + metrics["time_train_actor"]
        metrics["step_time"] = time.perf_counter() - start
        return self.actor.all_reduce_mean(metrics), rollouts

    # ---- validation -------------------------------------------------------------------------------------------
    def validate(self) -> dict[str, float]:
        """Rollouts (``sampling_params``, fixed seed) on the first ``num_val_samples`` validation prompts:
        ``global_rewards`` (mean reward), ``rewards_std``, ``response_lengths_mean``; writes
        ``val_samples/step=<N>.md`` with a table of the first ``num_val_samples_to_show`` prompts and responses."""
        rollouts = self.validation_rollouts(self.sampling_params, self.cfg.val_rollout_micro_batch_size)
        if not len(rollouts):
            return {}
        rew_t = rollouts.rewards.float()
        metrics = {
            "global_rewards": float(rew_t.mean()),
            "rewards_std": float(rew_t.std()) if len(rollouts) > 1 else 0.0,
            "response_lengths_mean": float(int(rollouts.response_lengths.sum()) / len(rollouts)),
        }
        metrics = self.actor.all_reduce_mean(metrics)
        if self.context.is_global_zero:
            self.write_samples(rollouts.select(range(min(self.cfg.num_val_samples_to_show, len(rollouts)))))
        return metrics

    # ---- checkpoints ------------------------------------------------------------------------------------------
    def _save(self) -> None:
        """Checkpoint the critic, then the actor (an actor checkpoint never exists without its critic); rank 0
        then prunes both to the same steps (the actor's top-k). A shared (served) critic is saved by rank 0 alone."""
        self._on_critic_owner(lambda: self.critic.save(self.step))
        super()._save()
        if self.context.is_global_zero:
            self.critic.prune({int(meta.get("step", -1)) for _, meta in self.context.checkpoints.checkpoints()})

    def _maybe_resume(self) -> None:
        """Resume from the latest checkpoint (the critic loads its checkpoint of that step), or, in a fresh run,
        reset the critic: a critic server left running from an earlier run then starts from its initial weights,
        optimizer and LR schedule, as a colocated critic would."""
        self._critic_restored = False
        super()._maybe_resume()
        if not self._critic_restored:
            self._on_critic_owner(self.critic.reset)

    def _restore(self, extra: dict) -> None:
        self._on_critic_owner(lambda: self.critic.load(int(extra["step"])))
        self._critic_restored = True

    def _progress_postfix(self, metrics: dict[str, float]) -> dict[str, str]:
        return {"reward": f"{metrics['rewards_mean']:.3g}", "kl": f"{metrics['init_policy_kl']:.3g}"}


def _all_gather_objects(obj: Any, world: int) -> list[Any]:
    """``[obj of rank 0, ..., obj of rank W-1]`` on every rank (``torch.distributed.all_gather_object`` on the
    default process group, the data-parallel one); ``[obj]`` on one rank."""
    if world == 1:
        return [obj]
    import torch.distributed as dist

    out: list[Any] = [None] * world
    dist.all_gather_object(out, obj)
    return out


def rollout_metrics(rollouts: Rollouts) -> dict[str, float]:
    """``rewards_mean``/``std``, ``response_lengths_mean``/``max`` (tokens), ``ended_fraction`` of a scored rollout
    buffer."""
    rewards = rollouts.rewards.float()
    lengths = rollouts.response_lengths.float()
    return {
        "rewards_mean": float(rewards.mean()),
        "rewards_std": float(rewards.std()) if len(rollouts) > 1 else 0.0,
        "response_lengths_mean": float(lengths.mean()),
        "response_lengths_max": float(lengths.max()),
        "ended_fraction": float(int(rollouts.ended.sum()) / len(rollouts)),
    }
