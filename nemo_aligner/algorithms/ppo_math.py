"""PPO mathematics on the response tokens of rollouts: KL penalty, rewards, GAE, losses, whitening, diagnostics.

Pure functions of tensors (no model, no state), read top to bottom with :mod:`nemo_aligner.algorithms.ppo`, which
applies them to a rollout buffer and holds the actor and critic updates. The per-token entropy of the policy comes
from the model (``get_logprobs(batch, return_entropy=True)``).

Layouts. A rollout of ``S`` responses is kept either *flat* (``[N]``, the response tokens of all responses
concatenated in sequence order then token order, tagged by ``seq_id`` -- the order of
:class:`nemo_aligner.data.sequences.SequenceBatch` targets) or *padded* (``[S, L]`` with a 0/1 ``mask``, token
``t`` of response ``s`` at ``[s, t]``). :func:`flat_to_padded` and :func:`padded_to_flat` convert between them.
Everything returned is float32; log-probabilities are natural logarithms (nats).

Sources:

* Clipped surrogate objective: Schulman et al. 2017, "Proximal Policy Optimization Algorithms", eq. 7.
* Generalised advantage estimation: Schulman et al. 2016, "High-Dimensional Continuous Control Using Generalized
  Advantage Estimation", eq. 11-16 (``delta_t = r_t + gamma V(s_{t+1}) - V(s_t)``,
  ``A_t = sum_l (gamma lambda)^l delta_{t+l}``).
* KL-penalised reward: Ouyang et al. 2022, "Training language models to follow instructions with human
  feedback", eq. 2 (``r(x, y) - beta log(pi(y|x) / pi_init(y|x))``), applied per token as in Ziegler et al. 2019,
  "Fine-Tuning Language Models from Human Preferences", sec. 2.2 and Stiennon et al. 2020.
* Value clipping: the PPO2 baseline implementation (Dhariwal et al. 2017, OpenAI Baselines), as used by
  NeMo-Aligner's critic (``loss_clip_val``).
"""

from __future__ import annotations

import torch


def flat_to_padded(values: torch.Tensor, seq_id: torch.Tensor, num_sequences: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Scatter flat per-token ``values`` ``[N]`` into ``([S, L] values, [S, L] float mask)``.

    ``seq_id`` ``[N]`` must be non-decreasing (tokens grouped by sequence, in token order), as in a
    :class:`~nemo_aligner.data.sequences.SequenceBatch`. ``L`` is the longest response (at least 1).

    Raises:
        ValueError: shapes differ or ``seq_id`` is not sorted.
    """
    if values.shape != seq_id.shape or values.dim() != 1:
        raise ValueError(f"values {tuple(values.shape)} and seq_id {tuple(seq_id.shape)} must both be [N]")
    seq_id = seq_id.to(values.device)
    if seq_id.numel() > 1 and bool((seq_id[1:] < seq_id[:-1]).any()):
        raise ValueError("seq_id must be non-decreasing (tokens grouped by sequence)")
    counts = torch.bincount(seq_id, minlength=num_sequences)
    width = max(int(counts.max()) if counts.numel() else 0, 1)
    starts = torch.cumsum(counts, 0) - counts
    pos = torch.arange(values.numel(), device=values.device) - starts[seq_id]
    out = torch.zeros(num_sequences, width, dtype=torch.float32, device=values.device)
    mask = torch.zeros_like(out)
    out[seq_id, pos] = values.float()
    mask[seq_id, pos] = 1.0
    return out, mask


def padded_to_flat(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`flat_to_padded`: the ``mask``-ed entries of ``values`` ``[S, L]`` in row-major order ``[N]``."""
    return values[mask.bool()]


def masked_sum(values: torch.Tensor, mask: torch.Tensor | None = None, dim=None) -> torch.Tensor:
    """Sum of ``values * mask`` (all entries when ``mask`` is None), over ``dim`` (all dims when None)."""
    if mask is not None:
        values = values * mask
    return values.sum() if dim is None else values.sum(dim)


def masked_mean(values: torch.Tensor, mask: torch.Tensor | None = None, dim=None) -> torch.Tensor:
    """Mean of ``values`` over the entries where ``mask`` is 1 (all entries when ``mask`` is None).

    An empty selection gives 0 rather than NaN.
    """
    if mask is None:
        return values.mean() if dim is None else values.mean(dim)
    denom = mask.sum() if dim is None else mask.sum(dim)
    return masked_sum(values, mask, dim) / denom.clamp(min=1)


def masked_var(values: torch.Tensor, mask: torch.Tensor | None = None, unbiased: bool = True) -> torch.Tensor:
    """Variance of the masked entries of ``values`` (Bessel-corrected when ``unbiased`` and more than one entry)."""
    mean = masked_mean(values, mask)
    count = mask.sum() if mask is not None else torch.tensor(float(values.numel()))
    var = masked_mean((values - mean) ** 2, mask)
    if unbiased and float(count) > 1:
        var = var * count / (count - 1)
    return var


def masked_whiten(values: torch.Tensor, mask: torch.Tensor | None = None, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """``(values - mean) / sqrt(var + eps)`` over the masked entries (the mean is added back if not ``shift_mean``).

    Used for ``normalize_advantages`` (advantage normalisation, as in the PPO2 baseline). Entries outside ``mask``
    are returned as 0.
    """
    mean, var = masked_mean(values, mask), masked_var(values, mask)
    out = (values - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * mask if mask is not None else out


def calculate_kl_penalty(logprobs: torch.Tensor, init_logprobs: torch.Tensor, use_absolute_kl: bool = True) -> torch.Tensor:
    """Per-token KL estimate between the policy and the initial policy, ``log pi(a_t|s_t) - log pi_init(a_t|s_t)``.

    Its expectation under the policy's samples is ``KL(pi || pi_init)`` (Ouyang et al. 2022, eq. 2; Ziegler et al.
    2019). ``use_absolute_kl`` takes ``|.|`` per token (NeMo-Aligner's option), so a token can never earn a
    positive bonus for being *less* likely under the policy than under the initial policy.

    Args:
        logprobs, init_logprobs: same shape (``[N]`` or ``[S, L]``), nats.

    Returns:
        Same shape, nats.

    Raises:
        ValueError: shapes differ.
    """
    if logprobs.shape != init_logprobs.shape:
        raise ValueError(f"logprobs {tuple(logprobs.shape)} and init_logprobs {tuple(init_logprobs.shape)} differ")
    kl = logprobs.float() - init_logprobs.float()
    return kl.abs() if use_absolute_kl else kl


def kl_penalized_token_rewards(rewards: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, kl_coef: float) -> torch.Tensor:
    """Per-token rewards ``r_t = -kl_coef * kl_t``, plus the sequence reward at each response's last token.

    This is Ouyang et al. 2022 eq. 2 (``R(x, y) = r_theta(x, y) - beta log(pi/pi_init)``) spread over the tokens
    as in Ziegler et al. 2019: the reward model scores the whole response once, at its end.

    Args:
        rewards: ``[S]`` one reward-model score per response.
        kl: ``[S, L]`` per-token KL (:func:`calculate_kl_penalty`), nats.
        mask: ``[S, L]`` 0/1, response tokens; each row must have at least one token.
        kl_coef: ``initial_policy_kl_penalty`` (beta), >= 0.

    Returns:
        ``[S, L]`` float32, zero outside ``mask``.

    Raises:
        ValueError: a response without tokens, or shape mismatch.
    """
    if kl.shape != mask.shape or rewards.shape != (kl.shape[0],):
        raise ValueError(f"rewards {tuple(rewards.shape)}, kl {tuple(kl.shape)}, mask {tuple(mask.shape)} disagree")
    lengths = mask.sum(-1).long()
    if bool((lengths < 1).any()):
        raise ValueError("every response needs at least one token")
    token_rewards = -kl_coef * kl.float() * mask
    last = lengths - 1
    rows = torch.arange(kl.shape[0], device=kl.device)
    token_rewards[rows, last] += rewards.float().to(kl.device)
    return token_rewards


def calculate_gae(
    token_rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over response tokens (Schulman et al. 2016, eq. 11-16).

    ``delta_t = r_t + gamma * V_{t+1} - V_t`` with ``V`` after the last response token taken as 0 (the episode ends
    there), ``A_t = delta_t + gamma * lambda * A_{t+1}``; the critic's regression targets are the returns
    ``R_t = A_t + V_t`` (the lambda-return, eq. 16 context).

    Args:
        token_rewards: ``[S, L]`` per-token rewards (:func:`kl_penalized_token_rewards`).
        values: ``[S, L]`` critic values ``V(s_t)`` read at the position that predicts token ``t``.
        mask: ``[S, L]`` 0/1; response tokens are a prefix of each row.
        gamma: ``discount_factor``; lam: ``gae_lambda`` (both in [0, 1]).

    Returns:
        ``(advantages, returns)``, both ``[S, L]`` float32, zero outside ``mask``.

    Raises:
        ValueError: shapes differ or gamma/lambda outside [0, 1].
    """
    if not (token_rewards.shape == values.shape == mask.shape):
        raise ValueError(f"rewards {tuple(token_rewards.shape)}, values {tuple(values.shape)}, mask {tuple(mask.shape)} differ")
    if not (0.0 <= gamma <= 1.0 and 0.0 <= lam <= 1.0):
        raise ValueError(f"discount_factor={gamma} and gae_lambda={lam} must lie in [0, 1]")
    mask = mask.float()
    values = values.float() * mask
    rewards = token_rewards.float() * mask
    width = rewards.shape[1]
    advantages = torch.zeros_like(rewards)
    next_value = torch.zeros_like(rewards[:, 0])
    next_adv = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(width)):
        m = mask[:, t]
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        adv = delta + gamma * lam * next_adv
        advantages[:, t] = adv * m
        # beyond a response's end the mask is 0: the next value and advantage stay 0 there
        next_value = values[:, t] * m
        next_adv = adv * m
    returns = (advantages + values) * mask
    return advantages, returns


def ppo_policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    ratio_eps: float,
    mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped surrogate loss, Schulman et al. 2017 eq. 7, negated for minimisation and averaged over tokens.

    ``rho_t = exp(logp_t - old_logp_t)``; ``loss = mean_t max(-A_t rho_t, -A_t clip(rho_t, 1 - eps, 1 + eps))``.

    Args:
        logprobs: ``[N]`` (or ``[S, L]``) current policy log-probabilities, with grad.
        old_logprobs: same shape, the rollout policy's log-probabilities (no grad).
        advantages: same shape.
        ratio_eps: clipping range ``eps`` (``ratio_eps``), > 0.
        mask: optional 0/1 of the same shape.

    Returns:
        ``(loss, metrics)``: scalar loss; detached ``clip_fraction`` (share of tokens whose clipped term is the
        active one), ``approx_kl`` (``mean 0.5 (logp - old_logp)^2``, Schulman's k2 estimator of
        ``KL(pi_old || pi)``), ``ratio_mean``.

    Raises:
        ValueError: shapes differ or ``ratio_eps <= 0``.
    """
    if not (logprobs.shape == old_logprobs.shape == advantages.shape):
        raise ValueError("logprobs, old_logprobs and advantages must have the same shape")
    if ratio_eps <= 0:
        raise ValueError(f"model.ppo.ratio_eps must be > 0, got {ratio_eps}")
    log_ratio = logprobs.float() - old_logprobs.float()
    ratio = log_ratio.exp()
    adv = advantages.float()
    unclipped = -adv * ratio
    clipped = -adv * ratio.clamp(1.0 - ratio_eps, 1.0 + ratio_eps)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        metrics = {
            "clip_fraction": masked_mean((clipped > unclipped).float(), mask),
            "approx_kl": masked_mean(0.5 * log_ratio**2, mask),
            "ratio_mean": masked_mean(ratio, mask),
        }
    return loss, metrics


def ppo_value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    clip_val: float | None,
    mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped value loss ``0.5 * mean_t max((V_t - R_t)^2, (clip(V_t, V_old - c, V_old + c) - R_t)^2)``.

    The pessimistic clipped regression of the PPO2 baseline (NeMo-Aligner critic ``loss_clip_val``); with
    ``clip_val`` ``None`` or ``<= 0`` it is plain ``0.5 * mean (V - R)^2``.

    Args:
        values: ``[N]`` (or ``[S, L]``) current critic values, with grad.
        old_values: same shape, the values recorded at rollout time.
        returns: same shape, GAE returns (:func:`calculate_gae`).
        clip_val: ``c``.
        mask: optional 0/1 of the same shape.

    Returns:
        ``(loss, metrics)`` with detached ``value_clip_fraction`` (share of tokens where the clipped error is larger).

    Raises:
        ValueError: shapes differ.
    """
    if not (values.shape == old_values.shape == returns.shape):
        raise ValueError("values, old_values and returns must have the same shape")
    values, old_values, returns = values.float(), old_values.float(), returns.float()
    err = (values - returns) ** 2
    if clip_val is None or clip_val <= 0:
        return 0.5 * masked_mean(err, mask), {"value_clip_fraction": torch.zeros(())}
    clipped = old_values + (values - old_values).clamp(-clip_val, clip_val)
    err_clipped = (clipped - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(err, err_clipped), mask)
    with torch.no_grad():
        frac = masked_mean((err_clipped > err).float(), mask)
    return loss, {"value_clip_fraction": frac}


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """``1 - Var[R - V] / Var[R]`` over the masked entries: 1 is a perfect critic, 0 a constant one, < 0 worse.

    Returns NaN when the returns have zero variance.
    """
    var_r = masked_var(returns.float(), mask, unbiased=False)
    var_err = masked_var(returns.float() - values.float(), mask, unbiased=False)
    if float(var_r) == 0.0:
        return torch.tensor(float("nan"))
    return 1.0 - var_err / var_r


def logprob_mismatch(engine_logprobs: torch.Tensor, trainer_logprobs: torch.Tensor) -> dict[str, float]:
    """How far the rollout engine's log-probabilities of the sampled tokens are from the trainer's, over the tokens
    where both are known (the engine's NaN entries are skipped): ``rollout_logprob_mismatch`` =
    ``mean |logp_engine - logp_trainer|`` (nats per token) and ``rollout_logprob_mismatch_max``. The off-policy gap
    that vLLM-based RLHF trainers monitor (e.g. Yao et al. 2025, "Your Efficient RL Framework Secretly Brings You
    Off-Policy RL Training"); PPO's ratio keeps using the trainer's log-probabilities.

    Args:
        engine_logprobs, trainer_logprobs: ``[N]`` per-token log-probabilities (nats).

    Returns:
        The two metrics; empty when no token has both.

    Raises:
        ValueError: the shapes differ.
    """
    if engine_logprobs.shape != trainer_logprobs.shape:
        raise ValueError(f"engine logprobs {tuple(engine_logprobs.shape)} vs trainer {tuple(trainer_logprobs.shape)}")
    diff = (engine_logprobs.double() - trainer_logprobs.detach().double()).abs()
    diff = diff[~torch.isnan(diff)]
    if diff.numel() == 0:
        return {}
    return {"rollout_logprob_mismatch": float(diff.mean()), "rollout_logprob_mismatch_max": float(diff.max())}
