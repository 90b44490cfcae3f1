"""PPO critic: a value per response token, from a transformers sequence-classification backbone.

The critic is an ``AutoModelForSequenceClassification(num_labels=1)`` model -- the same architecture as a reward
model export, so it is normally initialised from the reward model (as in NeMo-Aligner), or from any causal-LM
checkpoint (its ``score`` head then starts random). Its scalar ``score`` head is applied at every position that
predicts a response token: the value ``V(s_t)`` of the state just before response token ``t`` is taken.

Values are on the rewards' scale: a reward-model export that stores ``reward_standardization = {"mean": m, "std":
s}`` (see :mod:`nemo_aligner.models.reward_model`) gives rewards ``(raw - m) / s``, so the critic initialised from it
outputs ``V = (w^T h - m) / s`` too, at inference and in the value loss (as NeMo-Aligner's critic, which applies the
reward model's ``reward_standardization`` to its value head). A critic from a causal-LM checkpoint has ``m = 0``,
``s = 1``.
"""

from __future__ import annotations

import copy
import math
import random
from typing import Any

import numpy as np
import torch
import torch.nn as nn
from lightning.fabric import Fabric

from nemo_aligner.data.sequences import SequenceBatch
from nemo_aligner.models.hf_causal_lm import HFModel, load_tokenizer, prepare_attention_mask
from nemo_aligner.models.pretrained import resolve_pretrained
from nemo_aligner.models.reward_model import STANDARDIZATION_KEY, standardization_from_config
from nemo_aligner.utils.config import ConfigValueError


def score_head(model: nn.Module) -> nn.Module:
    """The scalar head of a transformers sequence-classification model (``score``; ``classifier`` as fallback).

    Raises:
        ValueError: no such head.
    """
    for name in ("score", "classifier"):
        head = getattr(model, name, None)
        if isinstance(head, nn.Module):
            return head
    raise ConfigValueError(f"{type(model).__name__} has no 'score' head; a critic needs a sequence-classification model")


def _rng_state() -> dict:
    """The global torch (CPU and CUDA), Python and NumPy RNG states."""
    return {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def _set_rng_state(state: dict) -> None:
    """Restore what :func:`_rng_state` returned."""
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class TokenValues(nn.Module):
    """Wraps a sequence-classification model so ``forward`` returns its head's scalar at chosen positions.

    Only the ``N`` hidden states at ``(pred_row, pred_col)`` go through the head.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        pred_row: torch.Tensor,
        pred_col: torch.Tensor,
    ) -> torch.Tensor:
        """Shapes: ids/positions ``[R, T]``; mask ``[R, T]`` or ``[R, 1, T, T]`` bool; ``pred_*`` ``[N]``.

        Returns ``[N]`` float32 raw head outputs ``w^T h`` (before the standardisation of
        :meth:`HFCritic.get_values`).
        """
        backbone = getattr(self.model, self.model.base_model_prefix)
        hidden = backbone(
            input_ids=input_ids,
            position_ids=position_ids,
            attention_mask=prepare_attention_mask(attention_mask, self.model.config, "model.data.pack_sequences=false and model.data.shared_prefix=false"),
            use_cache=False,
        ).last_hidden_state
        head = score_head(self.model)
        picked = hidden[pred_row, pred_col]
        return head(picked.to(head.weight.dtype)).squeeze(-1).float()


def load_value_model(source: str, model_cfg: Any, precision: str = "32-true") -> nn.Module:
    """``AutoModelForSequenceClassification.from_pretrained(source, num_labels=1)`` (a reward-model export or a
    causal-LM checkpoint, whose new ``score`` head is then randomly initialised).

    ``model_cfg`` may set ``attn_implementation`` and ``gradient_checkpointing``.
    """
    from transformers import AutoModelForSequenceClassification

    dtype = {"bf16-true": torch.bfloat16, "16-true": torch.float16}.get(precision, torch.float32)
    model = AutoModelForSequenceClassification.from_pretrained(
        source, num_labels=1, dtype=dtype, attn_implementation=model_cfg.get("attn_implementation", "sdpa")
    )
    model.config.use_cache = False
    if model.config.pad_token_id is None:
        model.config.pad_token_id = model.config.eos_token_id if isinstance(model.config.eos_token_id, int) else 0
    if model_cfg.get("gradient_checkpointing", False):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
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


class HFCritic(HFModel):
    """The PPO critic as an :class:`~nemo_aligner.models.alignable.AlignableModel` (full-parameter training).

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
        self.source = resolve_pretrained(str(restore_from_path))
        self._model_cfg, self._precision = model_cfg, precision
        self._rng_before_load = _rng_state()  # a causal-LM checkpoint's new score head is drawn from it
        model = load_value_model(self.source, model_cfg, precision)
        score_head(model)
        self.loss_clip_val = loss_clip_val
        self.reward_mean, self.reward_std = critic_standardization(model.config, model_cfg)
        setattr(model.config, STANDARDIZATION_KEY, {"mean": self.reward_mean, "std": self.reward_std})
        super().__init__(
            fabric, TokenValues(model), model, load_tokenizer(self.source), model_cfg.optim, max_steps, gradient_clip_val
        )
        # Before any step the optimizer state holds no moments: these are small (hyper-parameters, step counters).
        self._initial_optimizer_state = copy.deepcopy(self.optimizer.state_dict())
        self._initial_scheduler_state = copy.deepcopy(self.scheduler.state_dict())
        self._rng_after_init = _rng_state()

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
        _set_rng_state(self._rng_before_load)
        fresh = load_value_model(self.source, self._model_cfg, self._precision)
        with torch.no_grad():
            self._lm.load_state_dict(fresh.state_dict())
        del fresh
        self.optimizer.zero_grad(set_to_none=True)
        self.optimizer.load_state_dict(copy.deepcopy(self._initial_optimizer_state))
        self.scheduler.load_state_dict(copy.deepcopy(self._initial_scheduler_state))
        _set_rng_state(self._rng_after_init)

    def get_values(self, batch: SequenceBatch) -> torch.Tensor:
        """``[N]`` float32 values ``(w^T h - reward_mean) / reward_std``, one per target (response) token of
        ``batch``, read at the position predicting it (with grad outside ``no_grad``)."""
        b = batch.to(self.device)
        raw = self.module(b.input_ids, b.position_ids, b.attention_mask, b.pred_row, b.pred_col)
        return (raw - self.reward_mean) / self.reward_std

    def get_rewards(self, batch: SequenceBatch) -> torch.Tensor:
        """``[S]`` float32 standardised head output at each sequence's last token (what
        :class:`~nemo_aligner.models.reward_model.RewardScorer` returns for the same weights)."""
        b = batch.to(self.device)
        raw = self.module(b.input_ids, b.position_ids, b.attention_mask, b.last_row, b.last_col)
        return (raw - self.reward_mean) / self.reward_std
