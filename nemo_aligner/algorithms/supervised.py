"""Supervised fine-tuning (SFT): maximum likelihood of the assistant tokens.

Loss of a micro-batch with target (assistant) tokens ``y_1 .. y_N`` over all its sequences (``N`` = ``batch.targets``
size, summed over sequences)::

    loss = -(1 / N) * sum_i log pi(y_i | y_<i, x)

the standard autoregressive negative log-likelihood (e.g. Ouyang et al. 2022, "Training language models to follow
instructions with human feedback", sec. 3.5 "supervised fine-tuning"; Radford et al. 2018, eq. 1), averaged over
*tokens* of the micro-batch, so a long response weighs more than a short one (as NeMo's masked token loss). With
gradient accumulation the optimizer step uses the mean of the per-micro-batch losses (each micro-batch weighs the
same, whatever its token count). The value does not depend on the layout (packed or not).

The pure function :func:`sft_loss_and_metrics` is shared with rejection sampling (SFT on kept rollouts).
"""

from __future__ import annotations

from typing import Any

import torch

from nemo_aligner.algorithms.base import BaseTrainer
from nemo_aligner.data.sequences import SequenceBatch


def sft_loss_and_metrics(logprobs: torch.Tensor, batch: SequenceBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Mean negative log-likelihood of the target tokens of one micro-batch, and its metrics.

    Args:
        logprobs: ``[N]`` float natural-log probabilities of ``batch.targets`` under the policy (with grad), e.g.
            ``model.get_logprobs(batch)``.
        batch: the :class:`~nemo_aligner.data.sequences.SequenceBatch` they belong to (``N`` targets, ``S``
            sequences).

    Returns:
        ``(loss, metrics)``: scalar loss in nats per token (``-logprobs.sum() / N``; ``0`` with a graph attached
        when ``N = 0``) and detached scalar metrics: ``loss``; ``target_tokens`` (``N``, assistant tokens in the
        micro-batch); ``num_sequences`` (``S``); ``target_fraction`` (``N`` / real tokens).

    Raises:
        ValueError: ``logprobs`` does not have one entry per target token.
    """
    n = int(batch.targets.numel())
    if logprobs.dim() != 1 or logprobs.numel() != n:
        raise ValueError(f"logprobs has shape {tuple(logprobs.shape)}, expected [{n}] (one per target token)")
    total = -logprobs.float().sum()
    loss = total / n if n > 0 else total * 0.0
    device = logprobs.device
    metrics = {
        "loss": loss.detach(),
        "target_tokens": torch.tensor(float(n), device=device),
        "num_sequences": torch.tensor(float(batch.num_sequences), device=device),
        "target_fraction": torch.tensor(n / max(int(batch.num_tokens), 1), device=device),
    }
    return loss, metrics


class SFTTrainer(BaseTrainer):
    """SFT: the shared offline loop (:class:`~nemo_aligner.algorithms.base.BaseTrainer`) with the loss of
    :func:`sft_loss_and_metrics`. Datasets hold rows with ``input_ids`` and ``loss_mask``; ``collate_fn`` makes a
    :class:`~nemo_aligner.data.sequences.SequenceBatch` (plain or packed). The model needs no reference policy.

    Args:
        **kwargs: see :class:`~nemo_aligner.algorithms.base.BaseTrainer`.
    """

    name = "SFT"
    summary_keys = ["loss", "target_tokens"]

    def loss_and_metrics(self, batch: Any, training: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Policy log-probs of the batch's target tokens -> :func:`sft_loss_and_metrics`."""
        return sft_loss_and_metrics(self.model.get_logprobs(batch), batch)
