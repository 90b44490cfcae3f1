"""The roles of an online run (PPO, rejection sampling), colocated in this process or served over HTTP.

* **Reward sources**: a reward function is any ``reward_fn(prompt_ids, response_ids) -> list[float]``, one score
  per response (:data:`nemo_aligner.algorithms.online.RewardFn`); :func:`reward_fn_from_scorer` wraps a local
  :class:`~nemo_aligner.models.reward_model.RewardScorer`, :func:`reward_fn_from_client` the reward-model server
  (:class:`~nemo_aligner.servers.client.RewardModelClient`), and :func:`build_reward_fn` picks one of the two from
  an entry script's settings.
* **PPO's critic and initial policy**: :func:`served_ppo_roles` connects to the critic and initial-policy servers;
  :func:`colocated_critic` builds the :class:`~nemo_aligner.algorithms.ppo.LocalCritic` in this process.

The trainers in :mod:`nemo_aligner.algorithms` only see the results (a reward function, objects with the critic's
and initial policy's methods), never how they were built.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from nemo_aligner.algorithms.online import RewardFn
from nemo_aligner.algorithms.ppo import LocalCritic, PPOConfig
from nemo_aligner.errors import MissingFileError
from nemo_aligner.models.critic import HFCritic
from nemo_aligner.models.reward_model import RewardScorer
from nemo_aligner.servers.client import RewardModelClient
from nemo_aligner.servers.critic_server import RemoteCritic
from nemo_aligner.servers.initial_policy_server import RemoteInitialPolicy


# ---------------------------------------------------------------------------------------------------------------
# reward sources
# ---------------------------------------------------------------------------------------------------------------
def reward_fn_from_scorer(scorer, micro_batch_size: int | None = None) -> RewardFn:
    """A reward function scoring ``prompt + response`` token ids with a local
    :class:`~nemo_aligner.models.reward_model.RewardScorer` (the policy and RM must share a tokenizer)."""

    def reward_fn(prompt_ids, response_ids):
        return list(scorer.score([list(p) + list(r) for p, r in zip(prompt_ids, response_ids)], micro_batch_size))

    return reward_fn


def reward_fn_from_client(client) -> RewardFn:
    """A reward function calling the reward-model server (``RewardModelClient.score_token_ids``)."""

    def reward_fn(prompt_ids, response_ids):
        return list(client.score_token_ids([list(p) + list(r) for p, r in zip(prompt_ids, response_ids)]))

    return reward_fn


def build_reward_fn(
    rm_path: str | None,
    device: Any,
    micro_batch_size: int,
    remote_url: str | None = None,
    api_token: str | None = None,
    timeout: float = 600.0,
    remote_key: str = "remote_rm.enable",
) -> tuple[RewardFn, int | None, str]:
    """The reward source of an online run: the reward-model server at ``remote_url`` when given, else a local
    :class:`~nemo_aligner.models.reward_model.RewardScorer` loaded from the RM export ``rm_path`` onto ``device``
    (scoring in micro-batches of ``micro_batch_size``).

    Args:
        remote_key: the config key that turns the server on, named in the error for a missing export.

    Returns:
        ``(reward_fn, max_seq_length, description)``: ``max_seq_length`` is the longest prompt + response the
        reward model accepts (``None``: no limit; see :func:`nemo_aligner.data.prompts.prompt_token_budget`).

    Raises:
        MissingFileError: no RM export directory at ``rm_path`` (local mode).
        ServerUnavailableError: the server does not answer ``/health`` within ``timeout`` seconds.
    """
    if remote_url is not None:
        client = RewardModelClient(remote_url, api_token=api_token, timeout=float(timeout))
        client.wait_until_ready(timeout=float(timeout))
        max_len = client.info().get("max_seq_length")
        return reward_fn_from_client(client), (int(max_len) if max_len else None), f"reward-model server {remote_url}"
    if not rm_path or not Path(str(rm_path)).is_dir():
        raise MissingFileError(f"reward_model.restore_from_path={rm_path!r} is not an RM export directory "
                               f"(or set {remote_key}=true to use the reward-model server)")
    scorer = RewardScorer.from_pretrained(str(rm_path), device=device, micro_batch_size=micro_batch_size)
    return reward_fn_from_scorer(scorer, micro_batch_size), scorer.max_seq_length, f"local reward model {rm_path}"


# ---------------------------------------------------------------------------------------------------------------
# PPO's critic and initial policy
# ---------------------------------------------------------------------------------------------------------------
def server_url(section: DictConfig) -> str:
    """``http://<ip>:<port>`` of a server section (``{ip, port}``)."""
    return f"http://{section.ip}:{int(section.port)}"


def served_ppo_roles(remote: DictConfig) -> tuple[RemoteCritic, RemoteInitialPolicy]:
    """Served PPO: ``(critic, initial_policy)`` clients of the critic and initial-policy servers named in
    ``remote`` (the ``remote_critic_rm`` section: ``critic.{ip,port}``, ``initial_policy.{ip,port}``,
    ``api_token``, ``timeout``), once both answer.

    Raises:
        ServerUnavailableError: a server does not answer within ``remote.timeout`` seconds.
    """
    kwargs = dict(api_token=remote.get("api_token"), timeout=float(remote.timeout))
    critic = RemoteCritic(server_url(remote.critic), **kwargs)
    initial = RemoteInitialPolicy(server_url(remote.initial_policy), **kwargs)
    critic.wait_until_ready(timeout=float(remote.timeout))
    initial.wait_until_ready(timeout=float(remote.timeout))
    return critic, initial


def colocated_critic(cfg: DictConfig, fabric, ppo_cfg: PPOConfig, max_steps: int, precision: str,
                     log_dir: Path) -> tuple[LocalCritic, str]:
    """Colocated PPO: the :class:`~nemo_aligner.algorithms.ppo.LocalCritic` initialised from
    ``critic.restore_from_path`` (default ``reward_model.restore_from_path``) of the PPO config ``cfg``,
    checkpointing to ``<log_dir>/critic_checkpoints``; returns ``(critic, its source path)``.

    Raises:
        MissingFileError: neither path is set.
    """
    critic_path = cfg.critic.get("restore_from_path") or cfg.reward_model.get("restore_from_path")
    if not critic_path:
        raise MissingFileError("no critic checkpoint: set critic.restore_from_path or reward_model.restore_from_path")
    critic_model_cfg = OmegaConf.create({
        "optim": OmegaConf.to_container(cfg.critic.optim, resolve=True),
        "attn_implementation": cfg.model.get("attn_implementation", "sdpa"),
        "gradient_checkpointing": cfg.model.get("gradient_checkpointing", False),
    })
    model = HFCritic(
        fabric, critic_model_cfg, str(critic_path),
        max_steps=ppo_cfg.critic_optimizer_steps(max_steps),  # warm-up included; the same on every rank
        gradient_clip_val=ppo_cfg.gradient_clip_val,
        loss_clip_val=float(cfg.critic.loss_clip_val),
        precision=precision,
    )
    critic = LocalCritic(model, log_dir / "critic_checkpoints", ppo_cfg.forward_micro_batch_size,
                         ppo_cfg.critic_global_batch_size, ppo_cfg.critic_micro_batch_size, ppo_cfg.ppo_epochs)
    return critic, critic_path
