"""The alignable interface: the only surface algorithm trainers call.

Trainers in ``nemo_aligner/algorithms`` never touch transformers, peft or Fabric objects; they drive a model through
these methods. A backend (today :class:`nemo_aligner.models.hf_causal_lm.HFCausalLM`; later e.g. Megatron) owns the
weights, the optimizer, the learning-rate schedule, mixed precision and data-parallel gradient reduction.

A training step looks like::

    model.prepare_for_training_step()
    for i, micro_batch in enumerate(micro_batches):
        with model.accumulate(is_last=(i == len(micro_batches) - 1)):
            logprobs = model.get_logprobs(micro_batch)                    # with grad
            ref_logprobs = model.get_logprobs(micro_batch, reference=True)  # no grad
            loss = ...
            model.backward(loss / len(micro_batches))
    step_metrics = model.finish_training_step()                           # clip, optimizer and scheduler step
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from typing import Any, Iterator

import torch


class AlignableModel(ABC):
    """Abstract policy model that alignment trainers drive."""

    #: The model's transformers tokenizer (chat template, special tokens), for the data rules that need one (e.g.
    #: :func:`nemo_aligner.data.prompts.end_of_turn_rule`); None when the model has none.
    tokenizer: Any = None

    # ---- training ---------------------------------------------------------------------------------------------
    @abstractmethod
    def prepare_for_training_step(self) -> None:
        """Put the policy in training mode and clear gradients."""

    @abstractmethod
    def accumulate(self, is_last: bool) -> contextlib.AbstractContextManager:
        """Context wrapping the forward and backward of one micro-batch.

        Gradients are reduced across data-parallel ranks only when ``is_last`` is True (the last micro-batch of the
        global batch); earlier micro-batches accumulate locally.
        """

    def get_logprobs(self, batch: Any, reference: bool = False, return_entropy: bool = False):
        """Log-probabilities of the target tokens of ``batch`` (policies; SFT, DPO, PPO actor).

        Args:
            batch: a packed batch with ``pred_row``, ``pred_col``, ``targets`` (e.g.
                :class:`nemo_aligner.data.preference_batch.PreferenceBatch`).
            reference: use the frozen reference policy (no gradient) instead of the trained policy.
            return_entropy: also return the entropy ``-sum_v p_v log p_v`` (nats) of the policy's next-token
                distribution at each target position (PPO's entropy bonus, Schulman et al. 2017 eq. 9), computed
                from the same logits as the log-probabilities, with grad.

        Returns:
            ``[N]`` float32 natural-log probabilities, one per target token, in the batch's packed order; with
            ``return_entropy`` the pair ``(logprobs [N], entropy [N])``.

        Raises:
            NotImplementedError: the model is not a policy.
        """
        raise NotImplementedError(f"{type(self).__name__} does not produce token log-probabilities")

    def get_rewards(self, batch: Any) -> torch.Tensor:
        """One scalar per sequence of ``batch`` (reward models, critics): ``[num_sequences]`` float32.

        Raises:
            NotImplementedError: the model has no scalar head.
        """
        raise NotImplementedError(f"{type(self).__name__} does not produce rewards")

    def get_values(self, batch: Any) -> torch.Tensor:
        """Critic values ``[N]`` float32, one per target token of ``batch``, read at the position that predicts it
        (the state before that action), in the batch's packed order (PPO critics).

        Raises:
            NotImplementedError: the model is not a critic.
        """
        raise NotImplementedError(f"{type(self).__name__} does not produce values")

    def generate(self, prompt_ids: list[list[int]], sampling_params: Any, length_params: Any, seed: int | None = None,
                 seeds: list[int] | None = None):
        """Sample responses to tokenised prompts (policies): a
        :class:`nemo_aligner.generation.GenerationOutput` with one response per prompt.

        Args:
            prompt_ids: ``B`` prompts as lists of token ids.
            sampling_params, length_params: :class:`nemo_aligner.generation.SamplingParams` /
                :class:`~nemo_aligner.generation.LengthParams`.
            seed: makes the sampling reproducible when given.
            seeds: one seed per prompt instead of ``seed`` (each response then depends only on its prompt and its
                seed; the online trainers pass :func:`nemo_aligner.generation.response_seed` of the global prompt
                index).

        Raises:
            NotImplementedError: the model cannot generate.
        """
        raise NotImplementedError(f"{type(self).__name__} does not generate")

    def generate_choices(self, prompt_ids: list[list[int]], choices: list[str], sampling_params: Any,
                         seeds: list[int]) -> list[int] | None:
        """Structured outputs: continue each prompt with exactly one of ``choices`` (a rollout engine constrained to
        those strings), sampled with ``sampling_params`` (greedy: the most likely) and row ``seeds[i]``.

        Returns:
            ``B`` indices into ``choices``, or None when the rollout engine has no structured outputs (the native
            engine): the caller then scores the choices with :meth:`get_logprobs` itself.
        """
        return None

    def pop_generation_metrics(self) -> dict[str, float]:
        """What the rollout engine measured since the last call (e.g. ``time_refit``, seconds spent copying the
        policy's weights into a vLLM engine), then cleared; empty for an engine that measures nothing."""
        return {}

    # ---- iterative algorithms (self-rewarding) -------------------------------------------------------------------
    def reference_weights(self) -> contextlib.AbstractContextManager:
        """Context in which the policy's ``generate`` and ``get_logprobs`` use the reference policy's weights (the
        policy of the previous iteration in iterative DPO / self-rewarding training); the trained weights are
        back, bit for bit, on exit. No gradient may be taken inside.

        Raises:
            NotImplementedError: the model has no reference policy (or does not support this).
        """
        raise NotImplementedError(f"{type(self).__name__} cannot run with its reference weights")

    def reset_reference_to_policy(self) -> None:
        """Make the reference policy a frozen copy of the current policy (full fine-tuning: its weights are
        copied; LoRA: the current adapters are kept as the reference's, the base stays shared), so that
        ``get_logprobs(batch, reference=True)`` equals ``get_logprobs(batch)`` until the next optimizer step.

        Raises:
            NotImplementedError: the model has no reference policy (or does not support this).
        """
        raise NotImplementedError(f"{type(self).__name__} cannot reset its reference policy")

    def reset_optimizer(self) -> None:
        """Drop the optimizer's state (Adam's first and second moments and its per-parameter step count), as at
        the start of training; the learning-rate schedule is not changed.

        Raises:
            NotImplementedError: the model does not support this.
        """
        raise NotImplementedError(f"{type(self).__name__} cannot reset its optimizer")

    @abstractmethod
    def backward(self, loss: torch.Tensor) -> None:
        """Back-propagate a scalar ``loss`` (already divided by the number of micro-batches)."""

    @abstractmethod
    def finish_training_step(self) -> dict[str, float]:
        """Clip gradients, step the optimizer and the LR scheduler; return ``{"grad_norm", "lr"}``."""

    # ---- inference --------------------------------------------------------------------------------------------
    @abstractmethod
    def prepare_for_inference(self) -> None:
        """Evaluation mode (no dropout) for validation or generation."""

    @abstractmethod
    def finish_inference(self) -> None:
        """Return to training mode after :meth:`prepare_for_inference`."""

    # ---- tokenizer ----------------------------------------------------------------------------------------------
    @property
    def pad_token_id(self) -> int:
        """The id that pads batches of this model's token ids (the tokenizer's pad token).

        Raises:
            NotImplementedError: the model has no tokenizer.
        """
        raise NotImplementedError(f"{type(self).__name__} has no pad token id")

    @property
    def vocab_size(self) -> int:
        """Number of token ids the model's embedding accepts (ids must lie in ``[0, vocab_size)``).

        Raises:
            NotImplementedError: the model does not say.
        """
        raise NotImplementedError(f"{type(self).__name__} has no vocabulary size")

    def eos_token_ids(self) -> list[int]:
        """The token ids that end a response (the tokenizer's EOS and any of the model's generation config);
        empty when the model does not say."""
        return []

    def decode(self, token_ids: list[int]) -> str:
        """The text of ``token_ids``, special tokens kept (what sample tables show).

        Raises:
            NotImplementedError: the model has no tokenizer.
        """
        raise NotImplementedError(f"{type(self).__name__} cannot decode token ids")

    # ---- distributed helpers ----------------------------------------------------------------------------------
    @property
    @abstractmethod
    def device(self) -> torch.device:
        """Device the model's inputs must live on."""

    @property
    @abstractmethod
    def data_parallel_rank(self) -> int:
        """This process's rank among the data-parallel replicas."""

    @property
    @abstractmethod
    def data_parallel_size(self) -> int:
        """Number of data-parallel replicas."""

    @abstractmethod
    def all_reduce(self, tensor: torch.Tensor, op: str = "mean") -> torch.Tensor:
        """Reduce ``tensor`` (``op`` = ``mean`` or ``sum``) over data-parallel ranks; identity on one rank."""

    def all_reduce_mean(self, values: dict[str, float]) -> dict[str, float]:
        """Average scalar metrics over data-parallel ranks."""
        if self.data_parallel_size == 1 or not values:
            return dict(values)
        keys = sorted(values)
        tensor = torch.tensor([float(values[k]) for k in keys], device=self.device, dtype=torch.float64)
        return {k: float(v) for k, v in zip(keys, self.all_reduce(tensor, "mean").tolist())}

    # ---- checkpoints ------------------------------------------------------------------------------------------
    @abstractmethod
    def save_checkpoint(self, path: str, extra_state: dict) -> None:
        """Write model (or adapters), optimizer and scheduler state plus ``extra_state`` to ``path`` atomically."""

    @abstractmethod
    def load_checkpoint(self, path: str) -> dict:
        """Restore what :meth:`save_checkpoint` wrote; return its ``extra_state``."""

    @abstractmethod
    def export_hf(self, path: str) -> None:
        """Write a Hugging Face ``save_pretrained`` directory (LoRA merged; adapters beside it) atomically."""

    @contextlib.contextmanager
    def inference(self) -> Iterator[None]:
        """``prepare_for_inference`` / ``finish_inference`` as a context manager, with gradients off."""
        self.prepare_for_inference()
        try:
            with torch.no_grad():
                yield
        finally:
            self.finish_inference()
