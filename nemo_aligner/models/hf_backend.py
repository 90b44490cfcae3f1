"""The transformers backend shared by the policy, the reward model and the critic (all run through lightning Fabric).

* :class:`HFModel`: the :class:`~nemo_aligner.models.alignable.AlignableModel` machinery every transformers-backed
  model shares (optimizer, LR schedule, gradient accumulation and clipping, the non-finite check, checkpoints, the
  Hugging Face export).
* :func:`run_backbone`: the one forward of a transformers model on a
  :class:`~nemo_aligner.data.sequences.SequenceBatch` layout (ids, positions and a padding or packed 4-D mask made
  ready by :func:`prepare_attention_mask`). The three heads read it:
  :class:`~nemo_aligner.models.hf_causal_lm.ResponseLogprobs` (the policy's log-probabilities, through the causal
  LM's own forward) and :class:`~nemo_aligner.models.reward_model.ScalarHead` (the reward model's scalar at each
  sequence's last token, and the critic's at every response token).
* Loading (:func:`load_tokenizer`, :func:`load_pretrained_model`), LoRA (:func:`apply_peft`), dropout
  (:func:`disable_dropout`) and the optimizer (:func:`build_adamw`).
"""

from __future__ import annotations

import copy
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from lightning.fabric import Fabric

from nemo_aligner.data.sequences import LAYOUT_KEYS, check_attention_window
from nemo_aligner.models.alignable import AlignableModel
from nemo_aligner.utils.checkpoint import NonFiniteError
from nemo_aligner.utils.config import ConfigValueError, check_attn_implementation
from nemo_aligner.utils.fs import atomic_directory, atomic_write_text, fsync_dir, fsync_tree, make_readable
from nemo_aligner.utils.runtime import rng_state, set_rng_state
from nemo_aligner.utils.scheduler import build_cosine_scheduler

# NeMo-Aligner LoRA target names -> module-name suffixes of the HF model families we support.
_LORA_TARGETS = {
    "attention_qkv": ["q_proj", "k_proj", "v_proj", "c_attn", "query_key_value"],
    "attention_dense": ["o_proj", "c_proj", "dense"],
    "mlp_fc1": ["gate_proj", "up_proj", "c_fc"],
    "mlp_fc2": ["down_proj"],
}


def prepare_attention_mask(attention_mask: torch.Tensor, config: Any, layout_keys: str = LAYOUT_KEYS) -> torch.Tensor:
    """The attention mask in the form ``config``'s attention implementation takes.

    A ``[R, T]`` padding mask passes through. A ``[R, 1, T, T]`` bool mask (packed or shared-prefix, True = may
    attend) is first checked against the model's sliding window
    (:func:`nemo_aligner.data.sequences.check_attention_window`); it stays bool for ``sdpa`` and becomes an
    additive float mask (0 or the most negative float32) for ``eager``, which adds the mask to the scores.

    Raises:
        ValueError: a 4-D mask with another attention implementation (the message names ``layout_keys``, the
            config keys that switch the 4-D layout off), or a sequence longer than the model's sliding window.
    """
    if attention_mask.dim() == 4 and attention_mask.dtype == torch.bool:
        check_attention_window(config, attention_mask)
        impl = getattr(config, "_attn_implementation", "sdpa")
        if impl == "eager":
            mask = torch.zeros(attention_mask.shape, dtype=torch.float32, device=attention_mask.device)
            return mask.masked_fill_(~attention_mask, torch.finfo(torch.float32).min)
        if impl != "sdpa":
            raise ConfigValueError(
                f"attention implementation {impl!r} cannot take the packed/shared-prefix 4-D mask; "
                f"set {layout_keys}, or model.attn_implementation=sdpa"
            )
    return attention_mask


def run_backbone(
    model: nn.Module, input_ids: torch.Tensor, position_ids: torch.Tensor, attention_mask: torch.Tensor,
    layout_keys: str = LAYOUT_KEYS, **kwargs: Any,
) -> Any:
    """``model(input_ids, position_ids, attention_mask, use_cache=False, **kwargs)`` with the mask made ready for
    ``model.config``'s attention implementation by :func:`prepare_attention_mask`: the one forward of every head.

    ``model`` is any transformers model taking these inputs: a ``*ForCausalLM`` (its output's ``logits``), a bare
    decoder (``last_hidden_state``), or a peft wrapper of either. Shapes: ids/positions ``[R, T]`` int64; mask
    ``[R, T]`` padding mask or ``[R, 1, T, T]`` bool (packed or shared-prefix, True = may attend).

    Returns:
        ``model``'s output object.

    Raises:
        ValueError: as :func:`prepare_attention_mask` (``layout_keys`` name the config keys in its message).
    """
    mask = prepare_attention_mask(attention_mask, model.config, layout_keys)
    return model(input_ids=input_ids, position_ids=position_ids, attention_mask=mask, use_cache=False, **kwargs)


#: Substrings of the config fields and module attributes that hold a dropout probability (``attention_dropout``,
#: ``hidden_dropout``, GPT-2's ``attn_pdrop``/``resid_pdrop``/``embd_pdrop``, ``summary_first_dropout``, ...).
_DROPOUT_NAMES = ("dropout", "pdrop")


def _is_dropout_name(name: str) -> bool:
    return any(k in name.lower() for k in _DROPOUT_NAMES)


def disable_dropout(model: nn.Module, keep: tuple[str, ...] = ("lora_dropout",)) -> nn.Module:
    """Switch every dropout of ``model`` off in place, as TRL's ``disable_dropout_in_model`` does, and also where
    transformers reads the probability as a plain number (``dropout=self.attention_dropout if self.training``,
    some models reading ``self.config.attention_dropout`` in ``forward``).

    * every ``nn.Dropout*`` module gets ``p = 0``;
    * every float attribute of a module whose name contains ``dropout``/``pdrop`` becomes ``0.0``;
    * the same for the fields of ``model.config`` and its nested configs (``text_config``, ...), so a
      ``save_pretrained`` of the model records the dropout it was trained with (0).

    Modules under a name in ``keep`` are left alone: by default peft's ``lora_dropout``, which the user sets
    explicitly (``model.peft.lora_tuning.adapter_dropout``, default 0).

    Why: the alignment losses compare the policy in train mode with log-probabilities computed in eval mode (the
    frozen reference, PPO's old log-probs) or with the same weights (the LoRA reference), so with dropout on
    the first DPO loss is not ``log 2`` and the first PPO ratio is not 1. Returns ``model``.
    """
    for name, module in model.named_modules():
        if any(k in name.split(".") for k in keep):
            continue
        if isinstance(module, nn.modules.dropout._DropoutNd):
            module.p = 0.0
        for attr, value in list(vars(module).items()):
            if isinstance(value, float) and _is_dropout_name(attr):
                setattr(module, attr, 0.0)
    seen: set[int] = set()

    def clear(config: Any) -> None:
        if config is None or id(config) in seen or not hasattr(config, "to_dict"):
            return
        seen.add(id(config))
        for attr, value in list(vars(config).items()):
            if isinstance(value, float) and _is_dropout_name(attr):
                setattr(config, attr, 0.0)
            elif hasattr(value, "to_dict") and hasattr(value, "model_type"):  # a nested PretrainedConfig
                clear(value)

    for module in model.modules():
        clear(getattr(module, "config", None))
    return model


def _lora_target_modules(lm: nn.Module, names) -> list[str] | str:
    names = list(names)
    if names in (["all"], ["all-linear"]):
        return "all-linear"
    present = {n.split(".")[-1] for n, m in lm.named_modules() if isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D"}
    targets: list[str] = []
    for name in names:
        candidates = _LORA_TARGETS.get(name, [name])
        found = [c for c in candidates if c in present]
        if not found:
            raise ConfigValueError(
                f"model.peft.lora_tuning.target_modules: {name!r} matches no linear layer of this model; "
                f"its linear layers are {sorted(present)}"
            )
        targets.extend(found)
    return sorted(set(targets))


def load_tokenizer(source: str):
    """``AutoTokenizer`` for ``source``; a tokenizer without a pad token pads with EOS (padding is never attended)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def precision_dtype(precision: str) -> torch.dtype:
    """The dtype weights load in for a Fabric precision string: ``bf16-true`` -> bfloat16, ``16-true`` -> float16,
    anything else (``32-true``, the ``*-mixed`` ones) float32."""
    return {"bf16-true": torch.bfloat16, "16-true": torch.float16}.get(precision, torch.float32)


def load_pretrained_model(
    auto_class: Any, source: str, model_cfg: Any, precision: str = "32-true", **kwargs: Any
) -> nn.Module:
    """``auto_class.from_pretrained(source, **kwargs)`` (e.g. ``AutoModelForCausalLM``) in the dtype of
    ``precision`` (:func:`precision_dtype`) with ``model.attn_implementation`` (default ``sdpa``), ``use_cache``
    off and ``model.gradient_checkpointing`` (non-reentrant) applied.

    Raises:
        ConfigValueError: ``model.attn_implementation`` is not one of
            :data:`~nemo_aligner.utils.config.ATTN_IMPLEMENTATIONS`.
        OSError / ValueError: from transformers, for a missing or unsupported checkpoint.
    """
    attn_implementation = check_attn_implementation(model_cfg.get("attn_implementation", "sdpa"))
    model = auto_class.from_pretrained(
        source, **kwargs, dtype=precision_dtype(precision), attn_implementation=attn_implementation
    )
    model.config.use_cache = False
    if model_cfg.get("gradient_checkpointing", False):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def apply_peft(lm: nn.Module, peft_cfg: Any, task_type: str = "CAUSAL_LM", modules_to_save: list[str] | None = None):
    """Wrap ``lm`` with LoRA adapters per ``model.peft`` (NeMo key names); return ``(model, use_lora)``.

    Raises:
        ValueError: ``peft_scheme`` other than ``none``/``lora``, or a target module the model lacks.
    """
    peft_cfg = peft_cfg or {}
    scheme = str(peft_cfg.get("peft_scheme", "none")).lower()
    if scheme not in ("none", "lora"):
        raise ConfigValueError(f"model.peft.peft_scheme={scheme!r}: supported values are 'none' and 'lora'")
    if scheme == "none":
        return lm, False
    from peft import LoraConfig, get_peft_model

    lora = peft_cfg.get("lora_tuning", {}) or {}
    config = LoraConfig(
        r=int(lora.get("adapter_dim", 32)),
        lora_alpha=float(lora.get("alpha", 32)),
        lora_dropout=float(lora.get("adapter_dropout", 0.0)),
        target_modules=_lora_target_modules(lm, lora.get("target_modules", ["attention_qkv"])),
        task_type=task_type,
        modules_to_save=modules_to_save,
    )
    return get_peft_model(lm, config), True


def build_adamw(params: list[nn.Parameter], **kwargs: Any) -> torch.optim.AdamW:
    """``torch.optim.AdamW`` (Loshchilov & Hutter 2019), the fused single-kernel implementation where torch has one
    for these parameters (CPU and CUDA floating-point tensors), else the default multi-tensor one.

    Same update either way; fused is what ``transformers.Trainer`` uses by default and on CPU it is ~10x faster than
    the multi-tensor step (0.05 s vs 0.55 s for 100M fp32 parameters, 2 cores), which matters for small models.

    Raises:
        ValueError: from torch, for bad hyper-parameters.
    """
    devices = {p.device.type for p in params}
    if params and devices <= {"cpu", "cuda"} and all(p.dtype.is_floating_point for p in params):
        try:
            return torch.optim.AdamW(params, fused=True, **kwargs)
        except (RuntimeError, TypeError):  # e.g. sharded (DTensor) parameters an older torch cannot fuse
            pass
    return torch.optim.AdamW(params, **kwargs)


class HFModel(AlignableModel):
    """Fabric machinery shared by every transformers-backed model: optimizer, LR schedule, gradient accumulation,
    clipping, checkpoints and the HF export.

    Args:
        fabric: a launched ``lightning.fabric.Fabric``.
        module: the ``nn.Module`` whose ``forward`` the algorithm calls (set up by Fabric here).
        lm: the transformers (or peft) model inside ``module``; what :meth:`export_hf` saves.
        tokenizer: saved with the export.
        optim_cfg: ``model.optim`` (``name``, ``lr``, ``weight_decay``, ``betas``, ``eps``, ``sched``).
        max_steps: optimizer steps of the run (for the LR schedule).
        gradient_clip_val: max global grad norm; ``0``/``None`` disables clipping (the norm is still reported).
        use_lora: ``lm`` is a peft model; checkpoints then hold only the trainable (adapter) weights.
        keep_dropout: keep the model's dropout. By default it is switched off (:func:`disable_dropout`, LoRA's
            ``adapter_dropout`` excepted), as TRL does for DPO, reward models and PPO's policy and value model:
            the algorithms compare train-mode outputs with eval-mode ones (reference policy, PPO's old log-probs).

    Raises:
        ValueError: unsupported optimizer name.
    """

    def __init__(
        self,
        fabric: Fabric,
        module: nn.Module,
        lm: nn.Module,
        tokenizer: Any,
        optim_cfg: Any,
        max_steps: int,
        gradient_clip_val: float | None = 1.0,
        use_lora: bool = False,
        keep_dropout: bool = False,
    ):
        if not keep_dropout:
            disable_dropout(lm)
        self.fabric = fabric
        self.tokenizer = tokenizer
        self.gradient_clip_val = gradient_clip_val or 0.0
        self.use_lora = use_lora
        self._lm = lm
        self._unwrapped = module
        name = str(optim_cfg.get("name", "adamw")).lower()
        if name not in ("adamw", "adam", "distributed_fused_adam", "fused_adam"):
            raise ConfigValueError(f"model.optim.name={name!r}: supported are adamw (and NeMo's fused/distributed adam aliases)")
        self.lr = float(optim_cfg.lr)
        # Module first, optimizer over the wrapped parameters second: the order FSDP needs, valid for every strategy.
        self.module = fabric.setup_module(module)
        optimizer = build_adamw(
            [p for p in self.module.parameters() if p.requires_grad],
            lr=self.lr,
            weight_decay=float(optim_cfg.get("weight_decay", 0.0)),
            betas=tuple(optim_cfg.get("betas", (0.9, 0.98))),
            eps=float(optim_cfg.get("eps", 1e-8)),
        )
        self.optimizer = fabric.setup_optimizers(optimizer)
        self.scheduler = build_cosine_scheduler(self.optimizer, max_steps, self.lr, optim_cfg.get("sched", {}) or {})
        #: Counts the changes of the weights (optimizer steps, checkpoint loads): a rollout engine holding a copy of
        #: the weights refits when it changed.
        self.weights_version = 0

    def setup_frozen(self, module: nn.Module) -> nn.Module:
        """Place a frozen helper module (e.g. a reference policy) on the device; sharded too under FSDP."""
        if self.fabric.strategy.__class__.__name__.startswith("FSDP"):
            return self.fabric.setup_module(module)
        return self.fabric.to_device(module)

    # ---- properties -------------------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.fabric.device

    @property
    def data_parallel_rank(self) -> int:
        return self.fabric.global_rank

    @property
    def data_parallel_size(self) -> int:
        return self.fabric.world_size

    @property
    def pad_token_id(self) -> int:
        """The tokenizer's pad id (:func:`load_tokenizer` sets one when the checkpoint has none)."""
        return int(self.tokenizer.pad_token_id)

    @property
    def vocab_size(self) -> int:
        """``config.vocab_size`` of the transformers model (the embedding's rows)."""
        return int(self._lm.config.vocab_size)

    def decode(self, token_ids: list[int]) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=False)

    def num_trainable_parameters(self) -> tuple[int, int]:
        """``(trainable, total)`` parameter counts."""
        total = sum(p.numel() for p in self._lm.parameters())
        trainable = sum(p.numel() for p in self._lm.parameters() if p.requires_grad)
        return trainable, total

    def freeze(self) -> None:
        """Switch off the gradients of every weight, for a model that only runs inference (e.g. the policy of
        ``generate.py``); a training step on it afterwards fails in :meth:`backward` (nothing to differentiate)."""
        self._lm.requires_grad_(False)

    # ---- training ---------------------------------------------------------------------------------------------
    def prepare_for_training_step(self) -> None:
        self.module.train()
        self.optimizer.zero_grad(set_to_none=True)

    def accumulate(self, is_last: bool):
        return self.fabric.no_backward_sync(self.module, enabled=not is_last)

    def _inputs(self, batch) -> tuple[torch.Tensor, ...]:
        batch = batch.to(self.device)
        return batch.input_ids, batch.position_ids, batch.attention_mask, batch.pred_row, batch.pred_col, batch.targets

    def backward(self, loss: torch.Tensor) -> None:
        # Sum of this step's (already 1/n-scaled) micro-batch losses, kept on the device (no sync here); a NaN or
        # inf in any micro-batch makes the sum non-finite, which finish_training_step checks.
        detached = loss.detach().float().sum()
        self._step_loss = detached if getattr(self, "_step_loss", None) is None else self._step_loss + detached
        self.fabric.backward(loss)

    def _grad_scaler(self):
        """The float16 ``GradScaler`` of Fabric's ``16-mixed`` precision, or None."""
        return getattr(getattr(self.fabric.strategy, "precision", None), "scaler", None)

    def finish_training_step(self) -> dict[str, float]:
        """Clip (when ``gradient_clip_val > 0``), then step the optimizer and the LR schedule.

        The one place every trainer's optimizer step goes through, so it is also where divergence is caught: when
        the step's loss (the micro-batch losses given to :meth:`backward`) or the global gradient norm is NaN or
        infinite on any rank, the optimizer and the schedule do **not** step (the weights stay as they were), the
        gradients are dropped and :class:`~nemo_aligner.utils.checkpoint.NonFiniteError` is raised on every rank.
        Under ``16-mixed`` an infinite gradient norm is the ``GradScaler``'s business (it skips that step and lowers
        its scale), so only the loss is checked there.

        Returns:
            ``{"grad_norm": global L2 norm before clipping, "lr": the LR this step used}``.

        Raises:
            NonFiniteError: naming the optimizer step (1-based, counted over the run, resumes included) and the
                non-finite value(s).
        """
        if self.gradient_clip_val > 0:
            # error_if_nonfinite=False: a non-finite norm is reported below as a clear stop, not torch's traceback.
            grad_norm = self.fabric.clip_gradients(
                self.module, self.optimizer, max_norm=self.gradient_clip_val, error_if_nonfinite=False
            )
        else:
            grads = [p.grad for p in self.module.parameters() if p.grad is not None]
            grad_norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])) if grads else torch.zeros(())
        step_loss, self._step_loss = getattr(self, "_step_loss", None), None
        grad_norm = torch.as_tensor(grad_norm, dtype=torch.float32, device=self.device)
        bad = torch.zeros((), dtype=torch.float32, device=self.device)
        if step_loss is not None:
            bad = bad + (~torch.isfinite(step_loss)).float()
        if self._grad_scaler() is None:
            bad = bad + (~torch.isfinite(grad_norm)).float()
        if float(self.all_reduce(bad, "sum")) > 0:  # every rank stops together
            self.optimizer.zero_grad(set_to_none=True)
            loss_text = f"loss {float(step_loss):.4g}, " if step_loss is not None else ""
            raise NonFiniteError(
                f"non-finite training values at optimizer step {self.scheduler.last_epoch + 1} "
                f"({loss_text}gradient norm {float(grad_norm):.4g} on rank {self.data_parallel_rank}): the optimizer "
                f"step was skipped and nothing was saved. {self._divergence_hint()}, or look for bad data around "
                "this step"
            )
        lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.weights_version += 1
        return {"grad_norm": float(grad_norm), "lr": float(lr)}

    # ---- inference --------------------------------------------------------------------------------------------
    def prepare_for_inference(self) -> None:
        self.module.eval()

    def finish_inference(self) -> None:
        self.module.train()

    def all_reduce(self, tensor: torch.Tensor, op: str = "mean") -> torch.Tensor:
        if self.fabric.world_size == 1:
            return tensor
        return self.fabric.all_reduce(tensor, reduce_op=op)

    # ---- checkpoints ------------------------------------------------------------------------------------------
    def _trainable_filter(self):
        names = {n for n, p in self._unwrapped.named_parameters() if p.requires_grad}
        return {"model": lambda key, value: key in names} if self.use_lora else None

    def _check_finite_weights(self, what: str) -> None:
        """Raise :class:`~nemo_aligner.utils.checkpoint.NonFiniteError` on every rank when any trainable weight
        (this rank's shard under FSDP) is NaN or infinite, so that ``what`` is never written with such weights.
        All ranks must call this."""
        params = [p.detach() for p in self.module.parameters() if p.requires_grad and p.numel() > 0]
        bad = torch.zeros((), dtype=torch.float32, device=self.device)
        for p in params:
            bad = bad + (~torch.isfinite(p)).sum().float()
        bad = self.all_reduce(bad, "sum")
        if float(bad) > 0:
            raise NonFiniteError(
                f"not writing {what}: the weights hold {int(float(bad))} non-finite values (the previous "
                f"checkpoint is kept). {self._divergence_hint()}"
            )

    def _divergence_hint(self) -> str:
        """What to change after a non-finite step: gradient clipping only when it is off."""
        if self.gradient_clip_val > 0:
            return (f"Lower model.optim.lr (gradient clipping is already on, gradient_clip_val="
                    f"{self.gradient_clip_val:g})")
        return "Lower model.optim.lr or set the trainer's gradient_clip_val (e.g. 1.0; clipping is off)"

    def save_checkpoint(self, path: str, extra_state: dict) -> None:
        """Save ``model`` (trainable weights only with LoRA), ``optimizer``, ``scheduler``, RNG and ``extra_state``.

        All ranks must call this. Written to a temporary directory and renamed by rank 0 once complete: every file
        is ``fsync``-ed before the rename and the parent directory after it (a power loss leaves the old checkpoint
        or the complete new one), and the directory gets ordinary permissions (``0755``/``0644`` under umask 022).

        Raises:
            NonFiniteError: a weight is NaN or infinite (nothing is written; older checkpoints are untouched).
            OSError / RuntimeError: a write failed (e.g. a full or read-only disk); the temporary directory is removed
                and older checkpoints are untouched.
        """
        final = Path(path)
        self._check_finite_weights(f"checkpoint {final}")
        tmp = final.parent / f".{final.name}.tmp"
        if self.fabric.is_global_zero:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        self.fabric.barrier()
        state = {
            "model": self.module,
            "optimizer": self.optimizer,
            "scheduler": self.scheduler.state_dict(),
            "extra_state": extra_state,
            "rng": rng_state(),
        }
        try:
            self.fabric.save(tmp / "state.pt", state, filter=self._trainable_filter())
            if (tmp / "state.pt").exists():  # each rank flushes what it wrote (its shards under FSDP)
                fsync_tree(tmp / "state.pt")
            self.fabric.barrier()
            if self.fabric.is_global_zero:
                atomic_write_text(tmp / "meta.json", json.dumps(extra_state, indent=2, default=str))
                make_readable(tmp)
                fsync_dir(tmp)
                old = final.parent / f".{final.name}.old"
                if final.exists():
                    os.replace(final, old)
                os.replace(tmp, final)
                fsync_dir(final.parent)
                if old.exists():
                    shutil.rmtree(old, ignore_errors=True)
        except BaseException:
            if self.fabric.is_global_zero:  # a half-written checkpoint (e.g. on a full disk) frees its space
                shutil.rmtree(tmp, ignore_errors=True)
            raise
        self.fabric.barrier()

    def load_checkpoint(self, path: str) -> dict:
        state = {"model": self.module, "optimizer": self.optimizer, "scheduler": None, "extra_state": None, "rng": None}
        remainder = self.fabric.load(Path(path) / "state.pt", state, strict=not self.use_lora)
        scheduler_state = state["scheduler"] if state["scheduler"] is not None else remainder.get("scheduler")
        self.scheduler.load_state_dict(scheduler_state)
        rng = state["rng"] or remainder.get("rng")
        if rng:
            set_rng_state(rng)
        self.weights_version += 1
        return state["extra_state"] or remainder.get("extra_state") or {}

    def _full_state_dict(self) -> dict[str, torch.Tensor] | None:
        if self.fabric.strategy.__class__.__name__.startswith("FSDP"):
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            return get_model_state_dict(self._lm, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return None

    def export_hf(self, path: str) -> None:
        """Write ``save_pretrained`` output (safetensors + tokenizer) to ``path``; LoRA adapters are merged and also
        saved unmerged to ``<path>_adapter``. All ranks must call this; rank 0 writes. The directories get ordinary
        permissions (``0755``/``0644`` under umask 022) and are ``fsync``-ed before they are renamed into place.

        Raises:
            NonFiniteError: a weight is NaN or infinite (nothing is written; an older export is untouched).
        """
        self._check_finite_weights(f"the Hugging Face export {path}")
        full_state = self._full_state_dict()
        if self.fabric.is_global_zero:
            with atomic_directory(path) as tmp:
                if self.use_lora:
                    merged = copy.deepcopy(self._lm).merge_and_unload()
                    merged.save_pretrained(tmp, safe_serialization=True)
                else:
                    self._lm.save_pretrained(tmp, state_dict=full_state, safe_serialization=True)
                self.tokenizer.save_pretrained(tmp)
            if self.use_lora:
                with atomic_directory(f"{path}_adapter") as tmp:
                    self._lm.save_pretrained(tmp)
        self.fabric.barrier()
