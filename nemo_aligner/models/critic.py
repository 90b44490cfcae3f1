"""PPO critic: a value per response token, from a reward-model backbone.

The critic is a reward model (:class:`~nemo_aligner.models.reward_model.HFRewardModel`: an
``AutoModelForSequenceClassification(num_labels=1)`` model and its
:class:`~nemo_aligner.models.reward_model.ScalarHead`) whose scalar ``score`` head is read at every position that
predicts a response token instead of at each sequence's last token: the value ``V(s_t)`` of the state just before
response token ``t``. It is normally initialised from the reward model's export (as in NeMo-Aligner), or from any
causal-LM checkpoint (its ``score`` head then starts random).

Values are on the rewards' scale: a reward-model export that stores ``reward_standardization = {"mean": m, "std":
s}`` (see :mod:`nemo_aligner.models.reward_model`) gives rewards ``(raw - m) / s``, so the critic initialised from it
outputs ``V = (w^T h - m) / s`` too, at inference and in the value loss (as NeMo-Aligner's critic, which applies the
reward model's ``reward_standardization`` to its value head). A critic from a causal-LM checkpoint has ``m = 0``,
``s = 1``.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
import torch.nn as nn
from lightning.fabric import Fabric

from nemo_aligner.data.sequences import SequenceBatch
from nemo_aligner.models.reward_model import (  # noqa: F401 (score_head: re-exported)
    STANDARDIZATION_KEY,
    HFRewardModel,
    ScalarHead,
    load_reward_backbone,
    score_head,
    standardization_from_config,
)
from nemo_aligner.utils.config import ConfigValueError
from nemo_aligner.utils.runtime import rng_state, set_rng_state

#: The critic's module: the reward model's :class:`~nemo_aligner.models.reward_model.ScalarHead`, called with a
#: batch's ``pred_row``/``pred_col`` (kept under its former name).
TokenValues = ScalarHead


def load_value_model(source: str, model_cfg: Any, precision: str = "32-true") -> nn.Module:
    """:func:`~nemo_aligner.models.reward_model.load_reward_backbone` of ``source`` (a reward-model export or a
    causal-LM checkpoint, whose new ``score`` head is then randomly initialised), keeping the checkpoint's
    ``pad_token_id``; a checkpoint without one gets its EOS id (when it is one int), else 0.

    ``model_cfg`` may set ``attn_implementation`` and ``gradient_checkpointing``.
    """
    model = load_reward_backbone(source, model_cfg, precision)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = model.config.eos_token_id if isinstance(model.config.eos_token_id, int) else 0
    return model


def critic_standardization(config: Any, model_cfg: Any) -> tuple[float, float]:
    """``(mean, std)`` of the critic's values: ``model_cfg.reward_standardization.{mean, std}`` when its ``enable``
    is true (NeMo-Aligner's critic keys), else the ``reward_standardization`` entry of the checkpoint's ``config``
    (``(0, 1)`` without one).

    Raises:
        ValueError: enabled without a finite mean and a finite std > 0; a bad entry in ``config``.
    """
    override = model_cfg.get("reward_standardization") if hasattr(model_cfg, "get") else None
    if override is not None and bool(override.get("enable", False)):
        mean, std = override.get("mean"), override.get("std")
        try:
            mean, std = float(mean), float(std)
        except (TypeError, ValueError):
            raise ConfigValueError(f"model.reward_standardization.enable=true needs a mean and a std > 0, got mean={mean!r}, "
                                   f"std={std!r}") from None
        if not (math.isfinite(mean) and math.isfinite(std) and std > 0):
            raise ConfigValueError(f"model.reward_standardization.enable=true needs a finite mean and a finite std > 0, got "
                                   f"mean={mean}, std={std}")
        return mean, std
    return standardization_from_config(config)


class HFCritic(HFRewardModel):
    """The PPO critic as an :class:`~nemo_aligner.models.alignable.AlignableModel` (full-parameter training): the
    reward model (:class:`~nemo_aligner.models.reward_model.HFRewardModel`) read at every response token.

    Args:
        fabric: a launched ``lightning.fabric.Fabric``.
        model_cfg: ``optim`` (and optionally ``attn_implementation``, ``gradient_checkpointing``).
        restore_from_path: reward-model export, causal-LM checkpoint, or alias (see
            :func:`nemo_aligner.models.pretrained.resolve_pretrained`).
        max_steps: optimizer steps of the run (LR schedule).
        gradient_clip_val: max global grad norm (0 disables).
        loss_clip_val: value clipping range ``c`` of :func:`~nemo_aligner.algorithms.ppo_math.ppo_value_loss`
            (NeMo-Aligner ``model.loss_clip_val``), read by the critic update
            (:func:`nemo_aligner.algorithms.ppo.update_critic`).
        precision: Fabric precision string.

    Values are standardised like the rewards (see the module docstring): ``reward_mean``/``reward_std`` come from
    the checkpoint's ``config.json`` entry ``reward_standardization``, or from ``model_cfg.reward_standardization``
    (NeMo-Aligner's ``{enable, mean, std}``) when it is enabled; the choice is written into the critic's own export.

    Raises:
        ValueError: the checkpoint has no scalar head or an unsupported optimizer; a bad
            ``reward_standardization`` (enabled without a mean and a std > 0, or a bad entry in ``config.json``).

    :meth:`reset` returns the critic to the state it had right after construction; for that it keeps only small
    things (the RNG states before and after loading, the empty optimizer's and the scheduler's initial state dicts)
    and re-reads the weights from ``restore_from_path``.
    """

    def __init__(
        self,
        fabric: Fabric,
        model_cfg: Any,
        restore_from_path: str,
        max_steps: int,
        gradient_clip_val: float | None = 1.0,
        loss_clip_val: float | None = 0.2,
        precision: str = "32-true",
    ):
        self.loss_clip_val = loss_clip_val
        self._precision = precision
        super().__init__(fabric, model_cfg, restore_from_path, max_steps, gradient_clip_val, precision)
        # Before any step the optimizer state holds no moments: these are small (hyper-parameters, step counters).
        self._initial_optimizer_state = copy.deepcopy(self.optimizer.state_dict())
        self._initial_scheduler_state = copy.deepcopy(self.scheduler.state_dict())
        self._rng_after_init = rng_state()

    def _load_backbone(self, tokenizer: Any, precision: str) -> tuple[nn.Module, bool]:
        """``(model, False)``: :func:`load_value_model` of ``self.source`` (no LoRA), recording the RNG states it
        starts from (a causal-LM checkpoint's new score head is drawn from them, and :meth:`reset` draws it again).

        Raises:
            ValueError: the model has no scalar head.
        """
        self._rng_before_load = rng_state()
        model = load_value_model(self.source, self.cfg, precision)
        score_head(model)
        return model, False

    def _standardization(self, config: Any) -> tuple[float, float]:
        """:func:`critic_standardization`, also written into ``config`` (so into the critic's export)."""
        mean, std = critic_standardization(config, self.cfg)
        setattr(config, STANDARDIZATION_KEY, {"mean": mean, "std": std})
        return mean, std

    def _write_export_entries(self, config: Any) -> None:
        """The critic's export holds the ``reward_standardization`` of its values and no reward-model serving
        entries (no ``reward_max_seq_length``; its ``pad_token_id`` as loaded)."""
        setattr(config, STANDARDIZATION_KEY, {"mean": self.reward_mean, "std": self.reward_std})

    def reset(self) -> None:
        """Return to the state right after construction: the weights as loaded from ``restore_from_path`` (a new
        score head drawn from the same RNG state, so identical), an optimizer without moments, the LR schedule at
        step 0 and the global RNG states as they were after construction.

        The weights are re-read from disk into a temporary CPU model (a second copy in host memory only while this
        runs) and copied into the live parameters, so the optimizer keeps its parameter references.

        Raises:
            NotImplementedError: under a sharded (FSDP) strategy.
            OSError: ``restore_from_path`` can no longer be read.
        """
        if self.fabric.strategy.__class__.__name__.startswith("FSDP"):
            raise NotImplementedError("resetting a critic sharded with FSDP is not supported; build a new one")
        set_rng_state(self._rng_before_load)
        fresh = load_value_model(self.source, self.cfg, self._precision)
        with torch.no_grad():
            self._lm.load_state_dict(fresh.state_dict())
        del fresh
        self.optimizer.zero_grad(set_to_none=True)
        self.optimizer.load_state_dict(copy.deepcopy(self._initial_optimizer_state))
        self.scheduler.load_state_dict(copy.deepcopy(self._initial_scheduler_state))
        set_rng_state(self._rng_after_init)

    def standardize(self, raw: torch.Tensor) -> torch.Tensor:
        """``(raw - reward_mean) / reward_std``: raw head outputs on the rewards' scale."""
        return (raw - self.reward_mean) / self.reward_std

    def get_values(self, batch: SequenceBatch) -> torch.Tensor:
        """``[N]`` float32 values ``(w^T h - reward_mean) / reward_std``, one per target (response) token of
        ``batch``, read at the position predicting it (with grad outside ``no_grad``)."""
        b = batch.to(self.device)
        return self.standardize(self.module(b.input_ids, b.position_ids, b.attention_mask, b.pred_row, b.pred_col))

    def get_rewards(self, batch: SequenceBatch) -> torch.Tensor:
        """``[S]`` float32 standardised head output at each sequence's last token (what
        :class:`~nemo_aligner.models.reward_model.RewardScorer` returns for the same weights; the reward model's
        :meth:`~nemo_aligner.models.reward_model.HFRewardModel.get_rewards` is the raw one)."""
        return self.standardize(super().get_rewards(batch))
