"""Reward models: a scalar head on a causal-LM backbone, for training (:class:`HFRewardModel`) and inference
(:class:`RewardScorer`).

The backbone is a ``transformers`` ``AutoModelForSequenceClassification`` with ``num_labels=1`` loaded from a
causal-LM checkpoint: the decoder weights come from the checkpoint and the new head ``score`` (``Linear(hidden, 1,
bias=False)``) is initialised by transformers' ``_init_weights``, i.e. ``N(0, initializer_range^2)`` (0.02 for
Llama/SmolLM2/GPT-2); the LM head is dropped. The export therefore loads in plain transformers.

The reward of a sequence is the head applied to the final hidden state of its **last token** (the EOS or
end-of-turn token closing the response), as in Ouyang et al. 2022 (InstructGPT, sec. 3.5) and Stiennon et al. 2020.
:class:`ScalarHead` runs the decoder once (:func:`~nemo_aligner.models.hf_backend.run_backbone`) and applies
``score`` only at the positions asked for, so it works on padded and packed
:class:`~nemo_aligner.data.sequences.SequenceBatch` alike. The PPO critic (:mod:`nemo_aligner.models.critic`) is
this model read at every response token instead of the last one.

Reward standardisation: an export may store ``reward_standardization = {"mean": m, "std": s}`` in its
``config.json``; :class:`RewardScorer` returns ``(raw - m) / s`` so every consumer (server, PPO, rejection sampling)
sees the same scale. Plain transformers ignores that entry and returns the raw reward.

Pad-token caveat: transformers' ``*ForSequenceClassification`` reads the logit at the **rightmost token that is not
``config.pad_token_id``**. When the tokenizer pads with its EOS token (SmolLM2: pad = EOS = ``<|im_end|>``), a
sequence that ends with EOS would be read one token early, even unpadded. The export therefore writes
``pad_token_id = null`` into ``config.json`` when pad == EOS: plain transformers then reads the last position, which
equals our reward for an unpadded sequence (batches of one; it refuses padded batches instead of silently reading the
wrong token). Use :class:`RewardScorer` for batched scoring.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn as nn
from lightning.fabric import Fabric

from nemo_aligner.data.chat import tokenize_prompt_response
from nemo_aligner.data.sequences import SequenceBatch, collate_sequences
from nemo_aligner.errors import MissingFileError
from nemo_aligner.models.hf_backend import HFModel, apply_peft, load_pretrained_model, load_tokenizer, run_backbone
from nemo_aligner.models.pretrained import check_weight_files, resolve_pretrained
from nemo_aligner.utils.config import ConfigValueError

#: Key of the ``config.json`` entry holding ``{"mean": float, "std": float}``.
STANDARDIZATION_KEY = "reward_standardization"
#: Key of the ``config.json`` entry holding the training ``encoder_seq_length`` (the longest input scored).
MAX_SEQ_LENGTH_KEY = "reward_max_seq_length"
#: The config keys that switch the 4-D (packed / shared-prefix) layout of reward-model data off, named in the error
#: of an attention implementation that cannot take it.
LAYOUT_KEYS = "model.data.pack_sequences=false and model.data.shared_prefix=false"


def _unwrap(model: nn.Module) -> nn.Module:
    """The ``*ForSequenceClassification`` model inside a peft wrapper (or ``model`` itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def score_head(model: nn.Module) -> nn.Module:
    """The scalar head of a transformers sequence-classification model (``score``; ``classifier`` as fallback).

    Raises:
        ValueError: no such head.
    """
    for name in ("score", "classifier"):
        head = getattr(model, name, None)
        if isinstance(head, nn.Module):
            return head
    raise ConfigValueError(
        f"{type(model).__name__} has no 'score' head; a reward model or critic needs a sequence-classification model"
    )


class ScalarHead(nn.Module):
    """Wraps a ``*ForSequenceClassification`` model (possibly peft) so one ``forward`` returns its head's scalar at
    chosen positions: the decoder runs once over ``[R, T]`` and the head (:func:`score_head`) only on the ``K``
    hidden states asked for -- each sequence's last token for a reward, each response token's predicting position
    for a critic value.

    Being a single module's ``forward`` keeps DDP/FSDP gradient hooks intact.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, attention_mask: torch.Tensor,
                rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        """Shapes: ids/positions ``[R, T]`` int64; mask ``[R, T]`` padding mask or ``[R, 1, T, T]`` bool (packed);
        ``rows``/``cols`` ``[K]`` int64 (a batch's ``last_row``/``last_col`` or ``pred_row``/``pred_col``).

        Returns:
            ``[K]`` float32 raw head outputs ``w^T h`` (no standardisation).

        Raises:
            ValueError: as :func:`~nemo_aligner.models.hf_backend.prepare_attention_mask`; the model has no head.
        """
        base = _unwrap(self.model)
        decoder = getattr(base, base.base_model_prefix)
        hidden = run_backbone(decoder, input_ids, position_ids, attention_mask, LAYOUT_KEYS).last_hidden_state
        head = score_head(base)
        picked = hidden[rows, cols]
        return head(picked.to(next(head.parameters()).dtype)).squeeze(-1).float()


def load_reward_backbone(source: str, model_cfg: Any, precision: str = "32-true", pad_token_id: int | None = None) -> nn.Module:
    """``AutoModelForSequenceClassification(num_labels=1)`` from a causal-LM (or reward-model) checkpoint.

    A causal-LM checkpoint gets a fresh ``score`` head (``N(0, initializer_range^2)``, no bias); a reward-model
    export keeps its trained head. ``model.{attn_implementation,gradient_checkpointing}`` are applied and
    ``config.pad_token_id`` is set to ``pad_token_id`` when given.

    Raises:
        OSError / ValueError: from transformers, for a missing or unsupported checkpoint.
    """
    import transformers
    from transformers import AutoModelForSequenceClassification

    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # "score.weight newly initialized" is expected, not a warning
    try:
        model = load_pretrained_model(AutoModelForSequenceClassification, source, model_cfg, precision, num_labels=1)
    finally:
        transformers.logging.set_verbosity(verbosity)
    if pad_token_id is not None:
        model.config.pad_token_id = int(pad_token_id)
    return model


def standardization_from_config(config: Any) -> tuple[float, float]:
    """``(mean, std)`` of a model config's ``reward_standardization`` entry (``(0, 1)`` when it has none).

    Raises:
        ValueError: a non-finite mean, or a std that is not finite and > 0.
    """
    value = getattr(config, STANDARDIZATION_KEY, None) or {}
    mean, std = float(value.get("mean", 0.0) or 0.0), float(value.get("std", 1.0) or 1.0)
    if not math.isfinite(mean) or not math.isfinite(std) or std <= 0:
        raise ConfigValueError(f"config.json {STANDARDIZATION_KEY}={value!r}: mean must be finite and std finite and > 0")
    return mean, std


class HFRewardModel(HFModel):
    """A trainable reward model as an :class:`~nemo_aligner.models.alignable.AlignableModel`; the base of the PPO
    critic (:class:`~nemo_aligner.models.critic.HFCritic`), which reads the same head at every response token.

    Args:
        fabric: a launched ``lightning.fabric.Fabric``.
        model_cfg: the ``model`` config section (``optim``, ``peft``, ``attn_implementation``,
            ``gradient_checkpointing``).
        restore_from_path: causal-LM or RM checkpoint: local directory, ``.gguf``, hub id or alias (see
            :func:`~nemo_aligner.models.pretrained.resolve_pretrained`).
        max_steps: optimizer steps of the run (for the LR schedule).
        gradient_clip_val: max global grad norm; ``0``/``None`` disables clipping.
        precision: Fabric precision string; ``bf16-true``/``16-true`` load the weights in that dtype.
        max_seq_length: stored in the export (``reward_max_seq_length``) for servers to enforce.

    LoRA (``model.peft.peft_scheme=lora``) trains adapters plus a full copy of ``score``
    (``task_type="SEQ_CLS"``, ``modules_to_save=["score"]``).

    Attributes:
        source (the resolved checkpoint), cfg, max_seq_length, reward_mean, reward_std, module (the
        :class:`ScalarHead` Fabric set up), tokenizer.

    Raises:
        ValueError: unknown ``peft_scheme`` or LoRA target, unsupported optimizer.
    """

    def __init__(
        self,
        fabric: Fabric,
        model_cfg: Any,
        restore_from_path: str,
        max_steps: int,
        gradient_clip_val: float | None = 1.0,
        precision: str = "32-true",
        max_seq_length: int | None = None,
    ):
        self.cfg = model_cfg
        self.source = resolve_pretrained(str(restore_from_path))
        tokenizer = load_tokenizer(self.source)
        model, use_lora = self._load_backbone(tokenizer, precision)
        self.max_seq_length = max_seq_length
        self.reward_mean, self.reward_std = self._standardization(_unwrap(model).config)
        super().__init__(
            fabric, ScalarHead(model), model, tokenizer, model_cfg.optim, max_steps, gradient_clip_val, use_lora
        )

    def _load_backbone(self, tokenizer: Any, precision: str) -> tuple[nn.Module, bool]:
        """``(model, use_lora)``: :func:`load_reward_backbone` of ``self.source`` (pad id: the tokenizer's), with
        LoRA per ``model.peft``."""
        model = load_reward_backbone(self.source, self.cfg, precision, pad_token_id=tokenizer.pad_token_id)
        return apply_peft(model, self.cfg.get("peft"), task_type="SEQ_CLS", modules_to_save=["score"])

    def _standardization(self, config: Any) -> tuple[float, float]:
        """``(mean, std)`` the model starts with: the checkpoint's (:func:`standardization_from_config`)."""
        return standardization_from_config(config)

    def get_rewards(self, batch: SequenceBatch) -> torch.Tensor:
        """Raw rewards (no standardisation) of the ``S`` sequences of ``batch`` (padded or packed).

        Returns:
            ``[S]`` float32, with grad when called outside ``no_grad``.
        """
        batch = batch.to(self.device)
        return self.module(batch.input_ids, batch.position_ids, batch.attention_mask, batch.last_row, batch.last_col)

    def set_standardization(self, mean: float, std: float = 1.0) -> None:
        """Store ``(mean, std)`` for the export (:class:`RewardScorer` returns ``(raw - mean) / std``).

        Raises:
            ValueError: non-finite ``mean`` or ``std <= 0``.
        """
        if not math.isfinite(mean) or not math.isfinite(std) or std <= 0:
            raise ValueError(f"reward standardisation needs a finite mean and std > 0, got mean={mean}, std={std}")
        self.reward_mean, self.reward_std = float(mean), float(std)

    def export_hf(self, path: str) -> None:
        """``save_pretrained`` of the ``*ForSequenceClassification`` model (LoRA merged) plus the tokenizer, with
        ``reward_standardization``, ``reward_max_seq_length`` and (pad == EOS) ``pad_token_id = null`` in its
        ``config.json`` (see the module docstring). All ranks must call this."""
        config = _unwrap(self._lm).config
        saved = config.pad_token_id
        self._write_export_entries(config)
        try:
            super().export_hf(path)
        finally:
            config.pad_token_id = saved

    def _write_export_entries(self, config: Any) -> None:
        """Set the ``config.json`` entries of the export on ``config`` (its ``pad_token_id`` is restored after)."""
        setattr(config, STANDARDIZATION_KEY, {"mean": self.reward_mean, "std": self.reward_std})
        setattr(config, MAX_SEQ_LENGTH_KEY, self.max_seq_length)
        if self.tokenizer.pad_token_id is not None and self.tokenizer.pad_token_id == self.tokenizer.eos_token_id:
            config.pad_token_id = None

    def as_scorer(self, device: str | torch.device | None = None, micro_batch_size: int = 8) -> "RewardScorer":
        """A :class:`RewardScorer` over this model's current weights, with its ``max_seq_length`` and
        standardisation: what :meth:`RewardScorer.from_pretrained` of its export would score (e.g. for evaluating a
        training checkpoint after :meth:`load_checkpoint`).

        The weights are shared, not copied: they are moved to ``device`` (default this model's) and left in eval
        mode with gradients off, so train no further with this model afterwards.
        """
        return RewardScorer(self._lm, self.tokenizer, self.max_seq_length, self.reward_mean, self.reward_std,
                            device=self.device if device is None else device, micro_batch_size=micro_batch_size)


class RewardScorer:
    """A frozen reward model for inference (RM server, PPO, rejection sampling, generation).

    Args:
        model: a ``*ForSequenceClassification`` model with ``num_labels=1`` (or a peft wrapper of one).
        tokenizer: its tokenizer; a pad token is set (EOS) if it has none.
        max_seq_length: longest sequence servers accept (None: no limit).
        mean, std: standardisation; :meth:`score` returns ``(raw - mean) / std``.
        device: where the model runs.
        micro_batch_size: default sequences per forward in :meth:`score`.

    Attributes:
        tokenizer, max_seq_length, mean, std, model (the wrapped :class:`ScalarHead`), device, vocab_size (the rows
        of the model's input embedding: token ids must lie in ``[0, vocab_size)``), name (the model config's
        ``name_or_path``).
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        max_seq_length: int | None = None,
        mean: float = 0.0,
        std: float = 1.0,
        device: str | torch.device = "cpu",
        micro_batch_size: int = 8,
    ):
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        self.tokenizer = tokenizer
        self.max_seq_length = max_seq_length
        self.mean, self.std = float(mean), float(std)
        self.device = torch.device(device)
        self.micro_batch_size = int(micro_batch_size)
        self.model = ScalarHead(model).to(self.device).eval().requires_grad_(False)
        base = _unwrap(model)
        self.vocab_size = int(base.get_input_embeddings().num_embeddings)
        self.name = base.config.name_or_path

    @classmethod
    def from_pretrained(
        cls, path: str, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32, micro_batch_size: int = 8
    ) -> "RewardScorer":
        """Load an RM export directory (``save_pretrained`` of ``*ForSequenceClassification``, ``num_labels=1``,
        plus the tokenizer), reading ``reward_standardization`` and ``reward_max_seq_length`` from its config
        (``max_seq_length`` falls back to the model's ``max_position_embeddings``).

        Raises:
            FileNotFoundError: ``path`` is not a directory with a ``config.json``, or holds an empty or damaged
                ``*.safetensors`` file.
            ValueError: the model does not have exactly one output (``num_labels != 1``) or a bad
                ``reward_standardization`` entry.
        """
        from transformers import AutoModelForSequenceClassification

        directory = Path(path)
        if not (directory / "config.json").is_file():
            raise MissingFileError(f"reward model export not found: {directory} has no config.json")
        check_weight_files(directory)
        model = AutoModelForSequenceClassification.from_pretrained(str(directory), dtype=dtype)
        if model.config.num_labels != 1:
            raise ConfigValueError(f"{directory}: a reward model needs num_labels=1, this one has {model.config.num_labels}")
        mean, std = standardization_from_config(model.config)
        max_len = getattr(model.config, MAX_SEQ_LENGTH_KEY, None)
        if max_len is None:
            max_len = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", None)
        return cls(model, load_tokenizer(str(directory)), max_len, mean, std, device, micro_batch_size)

    def encode(self, prompt, response) -> list[int]:
        """Token ids scored for ``(prompt, response)``: ``prompt_ids + response_ids`` of
        :func:`~nemo_aligner.data.chat.tokenize_prompt_response` (strings or lists of chat messages), the
        same tokens the reward model was trained on.

        Raises:
            ValueError: as :func:`~nemo_aligner.data.preference.tokenize_example`.
        """
        prompt_ids, response_ids = tokenize_prompt_response(prompt, response, self.tokenizer)
        return list(prompt_ids) + list(response_ids)

    @torch.no_grad()
    def score(self, sequences: Sequence[Sequence[int]], micro_batch_size: int | None = None) -> list[float]:
        """One standardised reward per token sequence, read at its last token: ``(w^T h_last - mean) / std``.

        Sequences are sorted by length and right-padded in micro-batches of ``micro_batch_size`` (default the
        constructor's); padding never changes a reward.

        Raises:
            ValueError: an empty sequence, or one longer than ``max_seq_length``.
        """
        mbs = int(micro_batch_size or self.micro_batch_size)
        if mbs < 1:
            raise ValueError(f"micro_batch_size must be >= 1, got {mbs}")
        seqs = [list(map(int, s)) for s in sequences]
        for i, s in enumerate(seqs):
            if not s:
                raise ValueError(f"sequence {i} is empty")
            if self.max_seq_length is not None and len(s) > self.max_seq_length:
                raise ValueError(f"sequence {i} has {len(s)} tokens, more than max_seq_length={self.max_seq_length}")
        order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
        out = [0.0] * len(seqs)
        for start in range(0, len(order), mbs):
            chunk = order[start : start + mbs]
            batch = collate_sequences(
                [{"input_ids": seqs[i], "loss_mask": [0] * len(seqs[i])} for i in chunk], int(self.tokenizer.pad_token_id)
            ).to(self.device)
            raw = self.model(batch.input_ids, batch.position_ids, batch.attention_mask, batch.last_row, batch.last_col)
            for i, value in zip(chunk, ((raw - self.mean) / self.std).tolist()):
                out[i] = float(value)
        return out

    def score_texts(self, prompts: Sequence, responses: Sequence, micro_batch_size: int | None = None) -> list[float]:
        """:meth:`score` of :meth:`encode` for each ``(prompt, response)``."""
        return self.score([self.encode(p, r) for p, r in zip(prompts, responses)], micro_batch_size)
