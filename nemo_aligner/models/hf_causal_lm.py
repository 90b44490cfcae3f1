"""Alignable policy backed by a Hugging Face ``transformers`` causal LM, run through lightning Fabric.

Supports full-parameter training with a frozen reference copy, or LoRA through peft where the reference policy is
the same weights with the adapters disabled (no second copy in memory).

The machinery shared with the reward model and the critic (:class:`HFModel`, loading, LoRA, dropout, the optimizer,
the attention mask) lives in :mod:`nemo_aligner.models.hf_backend`; its public names stay importable from here.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
from typing import Any, Iterator

import torch
import torch.nn as nn
from lightning.fabric import Fabric

from nemo_aligner.errors import UnsupportedError
from nemo_aligner.generation import VLLMConfig, VLLMEngine, generate
from nemo_aligner.models.hf_backend import (  # noqa: F401 (HFModel .. prepare_attention_mask: re-exported)
    HFModel,
    apply_peft,
    build_adamw,
    disable_dropout,
    load_pretrained_model,
    load_tokenizer,
    prepare_attention_mask,
    run_backbone,
)
from nemo_aligner.models.pretrained import resolve_pretrained

#: Tells apart the policies that share one vLLM engine (:meth:`HFCausalLM._sync_engine`).
_POLICY_IDS = itertools.count()

__all__ = [
    "HFCausalLM", "HFModel", "ResponseLogprobs", "apply_peft", "build_adamw", "disable_dropout", "entropy_from_logits",
    "load_causal_lm", "load_tokenizer", "prepare_attention_mask",
]


class ResponseLogprobs(nn.Module):
    """Wraps a causal LM so one ``forward`` returns the log-probabilities of the response tokens only.

    The model's own ``*ForCausalLM.forward`` runs (so every model-specific transform of the logits applies: Gemma 2/3
    ``final_logit_softcapping``, also under ``text_config``; Granite's division by ``logits_scaling``; Cohere's
    multiplication by ``logit_scale``; any scaling of the last hidden state before the head), but a forward
    pre-hook on the output embeddings (``lm_head``) hands the head only the ``N`` hidden states that predict a
    response token, so the ``[tokens, vocab]`` logits of the prompt are never materialised. The log-probabilities
    are therefore those of the distribution ``generate`` samples from. A model whose forward never calls its
    output-embeddings module still gets the right answer, from its full logits. Being a single module's
    ``forward`` keeps DDP/FSDP gradient hooks intact.
    """

    def __init__(self, lm: nn.Module):
        super().__init__()
        self.lm = lm

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        pred_row: torch.Tensor,
        pred_col: torch.Tensor,
        targets: torch.Tensor,
        return_entropy: bool = False,
    ):
        """Shapes: ids/positions ``[R, T]``; mask ``[R, 1, T, T]`` bool or ``[R, T]``; pred/targets ``[N]``.

        Returns ``[N]`` float32 log p(target | prefix), computed as ``logit[target] - logsumexp(logits)`` from the
        model's final logits (after its own transforms) in float32; with ``return_entropy`` also the ``[N]``
        entropies of those distributions (:func:`entropy_from_logits` of the same logits).

        Raises:
            ValueError: as :func:`~nemo_aligner.models.hf_backend.prepare_attention_mask`.
        """
        calls = []

        def select_response_positions(module, args, kwargs):
            # lm_head(hidden [R, T, H]) -> lm_head(hidden[pred_row, pred_col] as [1, N, H])
            calls.append(True)
            if args:
                return (args[0][pred_row, pred_col][None], *args[1:]), kwargs
            key = next(iter(kwargs))
            return args, {**kwargs, key: kwargs[key][pred_row, pred_col][None]}

        head = self.lm.get_output_embeddings()
        handle = head.register_forward_pre_hook(select_response_positions, with_kwargs=True) if head is not None else None
        try:
            logits = run_backbone(self.lm, input_ids, position_ids, attention_mask, return_dict=True).logits
        finally:
            if handle is not None:
                handle.remove()
        if len(calls) > 1:
            raise RuntimeError(f"{type(self.lm).__name__} called its output embeddings {len(calls)} times in one forward")
        full = logits
        logits = logits[0] if calls else logits[pred_row, pred_col]  # [N, V]
        logits = logits.float()
        picked = logits.gather(-1, targets[:, None]).squeeze(-1)
        logprobs = picked - torch.logsumexp(logits, dim=-1)
        if not return_entropy:
            return logprobs
        # from the [1, N, V] output itself when the head saw only the response positions (the autograd graph, and
        # so the gradient's bits, of an entropy read off the head's output)
        entropy = entropy_from_logits(full)[0] if calls else entropy_from_logits(logits)
        return logprobs, entropy


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy ``-sum_v p_v log p_v`` (nats) of each row of ``logits`` ``[N, V]`` -> ``[N]`` float32 (differentiable)."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1)


def load_causal_lm(source: str, model_cfg: Any, precision: str = "32-true") -> nn.Module:
    """``AutoModelForCausalLM`` for ``source`` with ``model.{attn_implementation,gradient_checkpointing}`` applied
    (:func:`~nemo_aligner.models.hf_backend.load_pretrained_model`).

    ``bf16-true``/``16-true`` precision loads the weights in that dtype, anything else in float32.
    """
    from transformers import AutoModelForCausalLM

    return load_pretrained_model(AutoModelForCausalLM, source, model_cfg, precision)


class HFCausalLM(HFModel):
    """A transformers causal LM policy as an :class:`AlignableModel` (with its reference policy).

    Args:
        fabric: a launched ``lightning.fabric.Fabric``.
        model_cfg: the ``model`` config section: ``optim``, ``peft``, ``gradient_checkpointing``,
            ``attn_implementation``.
        restore_from_path: local directory, ``.gguf`` file, hub id or alias (see
            :func:`nemo_aligner.models.pretrained.resolve_pretrained`).
        max_steps: optimizer steps of the run (for the LR schedule).
        gradient_clip_val: max global grad norm; ``0`` or ``None`` disables clipping.
        need_reference: keep a reference policy (frozen copy, or adapters-off for LoRA).
        precision: the Fabric precision string; ``bf16-true``/``16-true`` load the weights in that dtype.

    Raises:
        ValueError: unknown ``peft_scheme`` or LoRA target, unsupported optimizer name.
    """

    def __init__(
        self,
        fabric: Fabric,
        model_cfg: Any,
        restore_from_path: str,
        max_steps: int,
        gradient_clip_val: float | None = 1.0,
        need_reference: bool = True,
        precision: str = "32-true",
    ):
        self.cfg = model_cfg
        self.source = resolve_pretrained(str(restore_from_path))
        lm = load_causal_lm(self.source, model_cfg, precision)
        lm, use_lora = apply_peft(lm, model_cfg.get("peft"))
        reference = None
        if need_reference and not use_lora:
            reference = ResponseLogprobs(copy.deepcopy(lm).eval().requires_grad_(False))
        super().__init__(
            fabric, ResponseLogprobs(lm), lm, load_tokenizer(self.source), model_cfg.optim, max_steps,
            gradient_clip_val, use_lora,
        )
        self._reference = self.setup_frozen(reference) if reference is not None else None
        self._has_reference = need_reference
        self._engine: VLLMEngine | None = None
        self._engine_owner = next(_POLICY_IDS)  # never reused (id() is, once a policy is freed)
        self._generation_metrics: dict[str, float] = {}
        # LoRA after reset_reference_to_policy(): the reference's adapter weights (None: adapters off)
        self._reference_adapters: list[torch.Tensor] | None = None
        # which weights the module holds for a rollout engine: ("policy", weights_version) or, inside
        # reference_weights(), ("reference", the number of reference resets so far)
        self._reference_active = False
        self._reference_version = 0

    def get_logprobs(self, batch, reference: bool = False, return_entropy: bool = False):
        inputs = self._inputs(batch)
        if not reference:
            return self.module(*inputs, return_entropy=return_entropy)
        if not self._has_reference:
            raise RuntimeError("this model was built without a reference policy (need_reference=False)")
        with torch.no_grad():
            if self._reference is not None:
                with self.fabric.autocast():
                    return self._reference(*inputs, return_entropy=return_entropy)
            # adapters off (or the reference's adapters), in eval mode like the frozen copy (and PPO's old log-probs)
            was_training = self._unwrapped.training
            self._unwrapped.eval()
            try:
                with self.reference_weights():
                    return self.module(*inputs, return_entropy=return_entropy)
            finally:
                self._unwrapped.train(was_training)

    # ---- iterative algorithms: the reference policy follows the policy -------------------------------------------
    def _trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self._unwrapped.parameters() if p.requires_grad]

    @contextlib.contextmanager
    def _swapped(self, pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> Iterator[None]:
        """Exchange the storage of each ``(parameter, tensor)`` pair, and exchange it back on exit (no copy)."""
        for param, other in pairs:
            param.data, other.data = other.data, param.data
        try:
            yield
        finally:
            for param, other in pairs:
                param.data, other.data = other.data, param.data

    @contextlib.contextmanager
    def reference_weights(self) -> Iterator[None]:
        """The policy runs with the reference weights inside (``generate`` and ``get_logprobs``; no gradients):
        full fine-tuning swaps the parameter storage with the frozen copy's (no copy is made); LoRA swaps in the
        adapters kept by :meth:`reset_reference_to_policy`, or disables the adapters before the first reset (the
        reference is then the base model).

        Raises:
            RuntimeError: the model was built with ``need_reference=False``.
        """
        if not self._has_reference:
            raise RuntimeError("this model was built without a reference policy (need_reference=False)")
        was_active, self._reference_active = self._reference_active, True
        try:
            if self._reference is not None:
                with torch.no_grad(), self._swapped(list(zip(self._unwrapped.parameters(), self._reference.parameters()))):
                    yield
            elif self._reference_adapters is None:
                with torch.no_grad(), self._lm.disable_adapter():
                    yield
            else:
                with torch.no_grad(), self._swapped(list(zip(self._trainable_parameters(), self._reference_adapters))):
                    yield
        finally:
            self._reference_active = was_active

    def reset_reference_to_policy(self) -> None:
        """The reference policy becomes a frozen copy of the current policy (see
        :meth:`~nemo_aligner.models.alignable.AlignableModel.reset_reference_to_policy`): full fine-tuning copies
        the weights (and buffers) into the existing frozen copy; LoRA keeps a copy of the current adapter weights
        (the adapters-off base is shared, never copied).

        Raises:
            RuntimeError: the model was built with ``need_reference=False``.
        """
        if not self._has_reference:
            raise RuntimeError("this model was built without a reference policy (need_reference=False)")
        self._reference_version += 1
        with torch.no_grad():
            if self._reference is not None:
                for ref, param in zip(self._reference.parameters(), self._unwrapped.parameters()):
                    ref.data.copy_(param.data)
                for ref, buf in zip(self._reference.buffers(), self._unwrapped.buffers()):
                    ref.data.copy_(buf.data)
            else:
                self._reference_adapters = [p.detach().clone() for p in self._trainable_parameters()]

    def reset_optimizer(self) -> None:
        """Clear the optimizer's per-parameter state (AdamW's ``exp_avg``, ``exp_avg_sq`` and ``step``), as after
        construction; the learning-rate schedule keeps its position."""
        optimizer = self.optimizer.optimizer if hasattr(self.optimizer, "optimizer") else self.optimizer
        optimizer.state.clear()

    def eos_token_ids(self) -> list[int]:
        """EOS ids of the tokenizer and of the model's ``generation_config`` (an int or a list), de-duplicated."""
        ids = [self.tokenizer.eos_token_id]
        generation_config = getattr(self._lm, "generation_config", None)
        extra = getattr(generation_config, "eos_token_id", None)
        ids.extend(extra if isinstance(extra, (list, tuple)) else [extra])
        return sorted({int(i) for i in ids if i is not None})

    # ---- the rollout engine -------------------------------------------------------------------------------------
    @property
    def rollout_engine(self) -> VLLMEngine | None:
        """The vLLM engine that generates for this policy (:meth:`use_vllm`), or None (the native engine)."""
        return self._engine

    def use_vllm(self, vllm_cfg: VLLMConfig, max_model_len: int | None = None, engine: Any = None) -> VLLMEngine:
        """Generate with vLLM from now on: start (or reuse, :meth:`VLLMEngine.shared`) an engine for this policy's
        architecture; the weights are copied into it before the next ``generate`` (and after every change).

        ``vllm_cfg.dtype=auto`` runs the engine in the policy's parameter dtype (float32 under ``precision=32``,
        bfloat16 under ``bf16-true``), so that greedy outputs match the native engine's.

        ``engine``: use this engine instead of starting one (``vllm_cfg`` and ``max_model_len`` are then the
        engine's business): any object with :class:`VLLMEngine`'s ``cfg``, ``refit(weights) -> seconds``,
        ``generate(prompt_ids, sampling_params, length_params, eos_token_ids, seeds=, generator=)`` and ``sleep()``,
        and a writable ``holder`` attribute (e.g. :class:`nemo_aligner.recipes.ray_ppo.RayRolloutEngine`, a vLLM
        engine in a Ray actor). The policy keeps the same contract with it: a refit before ``generate`` whenever
        the engine does not hold the weights the policy generates with (``weights_version``).

        Raises:
            MissingDependencyError: vLLM is not installed.
            UnsupportedError: more than one data-parallel rank on a CPU without an ``engine`` (each rank would start
                an engine in its own process on the same cores) -- use one process, a GPU per rank, or engines that
                a scheduler placed (Ray's rollout actors); or LoRA under FSDP.
        """
        if self._fsdp and self.use_lora:
            raise UnsupportedError("vllm.enable=true with LoRA under FSDP is not supported; use trainer.strategy=ddp")
        if engine is not None:  # placed elsewhere (e.g. one rollout Ray actor per actor rank)
            self._engine = engine
            return engine
        if self.data_parallel_size > 1 and self.device.type == "cpu":
            raise UnsupportedError("vllm.enable=true with several CPU data-parallel ranks is not supported (every rank "
                                   "would start an engine on the same cores); use trainer.devices=1 on a CPU")
        dtype = vllm_cfg.dtype
        if dtype == "auto":
            dtype = str(next(self._lm.parameters()).dtype).replace("torch.", "")
        self._engine = VLLMEngine.shared(self.source, vllm_cfg, dtype=dtype, max_model_len=max_model_len,
                                         seed=int(torch.initial_seed() % (1 << 31)))
        return self._engine

    @property
    def _fsdp(self) -> bool:
        return self.fabric.strategy.__class__.__name__.startswith("FSDP")

    def rollout_weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        """The policy's full weights under their Hugging Face names (what a ``save_pretrained`` of the policy
        holds): with LoRA, each adapted weight is ``W + B A * scaling`` (peft's ``get_delta_weight``, Hu et al.
        2021 eq. 3), computed without touching the trained modules; under FSDP the full tensors gathered from the
        shards (every rank must call this). Tensors are detached and may share storage with the parameters."""
        if self._fsdp:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            # full_state_dict without cpu_offload: the gathered tensors on every rank (each rank feeds its engine)
            yield from get_model_state_dict(self._lm, options=StateDictOptions(full_state_dict=True)).items()
            return
        if not self.use_lora:
            yield from ((n, t.detach()) for n, t in self._lm.state_dict().items())
            return
        from peft.tuners.lora import LoraLayer

        base = self._lm.get_base_model()
        merged = {}
        with torch.no_grad():
            for name, module in base.named_modules():
                if isinstance(module, LoraLayer):
                    weight = module.get_base_layer().weight
                    if module.disable_adapters:  # inside disable_adapter(): the base weights
                        merged[f"{name}.weight"] = weight.detach()
                        continue
                    delta = sum(module.get_delta_weight(a) for a in module.active_adapters if a in module.lora_A)
                    merged[f"{name}.weight"] = (weight + delta).to(weight.dtype)
        for name, tensor in base.state_dict().items():
            if "lora_" in name:
                continue
            clean = name.replace(".base_layer.", ".")
            yield clean, merged.pop(clean) if clean in merged else tensor.detach()

    def _sync_engine(self) -> None:
        """Refit the engine when it does not hold the weights this policy generates with now: its current weights,
        or inside :meth:`reference_weights` the reference policy's (each change of either is a new version)."""
        holder = ((self._engine_owner, "reference", self._reference_version) if self._reference_active
                  else (self._engine_owner, "policy", self.weights_version))
        if getattr(self._engine, "holder", None) == holder:
            return
        seconds = self._engine.refit(self.rollout_weights())
        self._engine.holder = holder
        self._generation_metrics["time_refit"] = self._generation_metrics.get("time_refit", 0.0) + seconds

    def pop_generation_metrics(self) -> dict[str, float]:
        out, self._generation_metrics = self._generation_metrics, {}
        return out

    def prepare_for_training_step(self) -> None:
        """Training mode, gradients cleared; a vLLM engine with ``unload_engine_train`` goes to sleep."""
        if self._engine is not None and self._engine.cfg.unload_engine_train:
            self._engine.sleep()
        super().prepare_for_training_step()

    def generate_choices(self, prompt_ids: list[list[int]], choices: list[str], sampling_params,
                         seeds: list[int]) -> list[int] | None:
        """With a vLLM engine (:meth:`use_vllm`): one of ``choices`` per prompt through vLLM's structured outputs
        (:meth:`~nemo_aligner.generation.vllm_engine.VLLMEngine.generate_choices`), after a refit when the weights
        changed. The native engine (and an engine without ``generate_choices``, e.g. PPO's Ray rollout actor proxy)
        has no structured outputs: None (see
        :meth:`~nemo_aligner.models.alignable.AlignableModel.generate_choices`)."""
        if self._engine is None or not hasattr(self._engine, "generate_choices"):
            return None  # the native engine (or an engine proxy without structured outputs)
        self._sync_engine()
        return self._engine.generate_choices(prompt_ids, choices, sampling_params, seeds)

    def generate(
        self,
        prompt_ids: list[list[int]],
        sampling_params,
        length_params,
        seed: int | None = None,
        seeds: list[int] | None = None,
    ):
        """Sample one response per prompt with the policy weights (LoRA adapters on) through
        :func:`nemo_aligner.generation.generate`.

        Runs the unwrapped transformers model (no DDP hooks, so ranks may generate different numbers of tokens) in
        eval mode under ``torch.no_grad`` and Fabric's autocast, on the model's device (CPU or CUDA); the previous
        train/eval mode is restored afterwards, also on error.

        Args:
            prompt_ids: ``B`` prompts as lists of token ids.
            sampling_params, length_params: :class:`nemo_aligner.generation.SamplingParams` /
                :class:`~nemo_aligner.generation.LengthParams`.
            seed: seeds a ``torch.Generator`` that draws the per-row sampling keys (same seed, same responses).
            seeds: one seed per prompt instead (each response then depends only on its prompt and its seed, not on
                the rest of the batch); takes precedence over ``seed``.

        Returns:
            :class:`nemo_aligner.generation.GenerationOutput`.

        With a vLLM engine (:meth:`use_vllm`) the engine generates instead, after a refit when the weights changed
        since it last got them (the seconds go to :meth:`pop_generation_metrics` as ``time_refit``); the output
        then also carries the engine's log-probabilities.

        Raises:
            NotImplementedError: under FSDP with the native engine (sharded parameters would need every rank in the
                same forward at every step; generate with ``trainer.strategy=ddp``, or with vLLM, instead).
            ValueError: as :func:`nemo_aligner.generation.generate`.
        """
        if self._engine is not None:
            self._sync_engine()
            generator = torch.Generator().manual_seed(int(seed)) if seed is not None and seeds is None else None
            return self._engine.generate(prompt_ids, sampling_params, length_params, self.eos_token_ids(),
                                         seeds=seeds, generator=generator)
        if self.fabric.strategy.__class__.__name__.startswith("FSDP"):
            raise UnsupportedError(
                "generation under FSDP is not supported (parameters are sharded); use trainer.strategy=ddp"
            )
        generator = torch.Generator().manual_seed(int(seed)) if seed is not None and seeds is None else None
        was_training = self._unwrapped.training
        self._unwrapped.eval()
        try:
            with torch.no_grad(), self.fabric.autocast():
                return generate(
                    self._lm,
                    prompt_ids,
                    sampling_params,
                    length_params,
                    eos_token_ids=self.eos_token_ids(),
                    pad_token_id=self.pad_token_id,
                    tokenizer=self.tokenizer,
                    generator=generator,
                    seeds=seeds,
                )
        finally:
            self._unwrapped.train(was_training)
