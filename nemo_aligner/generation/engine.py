"""Batched autoregressive generation with a KV cache for any Hugging Face causal LM (the rollout engine)."""

from __future__ import annotations

import functools
import inspect
from typing import Any

import torch

from nemo_aligner.generation.params import GenerationOutput, LengthParams, SamplingParams
from nemo_aligner.generation.sampling import apply_repetition_penalty, choose_tokens, splitmix64, step_keys
from nemo_aligner.utils.config import ConfigValueError

#: On CUDA the loop looks at which rows finished (a host sync) only every this many tokens; finished rows keep
#: running until then, their extra tokens are discarded. On CPU a sync is free and happens every token.
CUDA_SYNC_EVERY = 8

#: Finished rows are dropped from the batch (and the KV cache) once at least this fraction of rows has finished.
DROP_FRACTION = 0.25


@functools.lru_cache(maxsize=None)
def _forward_kwargs(cls: type) -> tuple[str, bool]:
    """(name of the KV-cache keyword, whether ``logits_to_keep`` exists) of a model class's ``forward``."""
    params = inspect.signature(cls.forward).parameters
    cache_kw = "cache" if "cache" in params else "past_key_values"
    return cache_kw, "logits_to_keep" in params


def _unwrap(lm: torch.nn.Module) -> torch.nn.Module:
    """The transformers model inside DDP / Fabric / peft wrappers (peft: with the LoRA layers, adapters active)."""
    while True:
        if hasattr(lm, "get_base_model"):  # peft: the injected base model runs the adapters
            lm = lm.get_base_model()
        elif hasattr(lm, "module") and isinstance(lm.module, torch.nn.Module) and not hasattr(lm, "config"):
            lm = lm.module  # DistributedDataParallel, Fabric's _FabricModule
        else:
            return lm


def _max_positions(config: Any) -> int | None:
    for name in ("max_position_embeddings", "n_positions"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _seed_keys(num: int, seeds: list[int] | None, generator: torch.Generator | None, device) -> torch.Tensor:
    """``[num]`` int64 row keys on ``device``: from ``seeds`` when given, else drawn from ``generator`` (or the global
    torch RNG)."""
    if seeds is not None:
        if len(seeds) != num:
            raise ValueError(f"seeds has {len(seeds)} entries for {num} prompts")
        raw = torch.tensor([int(s) & ((1 << 63) - 1) for s in seeds], dtype=torch.long)
    else:
        gen_device = generator.device if generator is not None else "cpu"
        raw = torch.randint(0, 1 << 62, (num,), generator=generator, device=gen_device, dtype=torch.long).cpu()
    return splitmix64(raw).to(device)


def _tail_window(end_strings: list[str]) -> int:
    """Tokens to decode to see whether a text ends with an end string: every token holds at least one byte."""
    return max(len(s.encode("utf-8")) for s in end_strings) + 2


@torch.no_grad()
def generate(
    lm: torch.nn.Module,
    prompt_ids: list[list[int]],
    sampling_params: SamplingParams,
    length_params: LengthParams,
    eos_token_ids: list[int],
    pad_token_id: int,
    tokenizer: Any = None,
    generator: torch.Generator | None = None,
    seeds: list[int] | None = None,
) -> GenerationOutput:
    """Generate one response per prompt with ``lm`` (batched, KV cache), without changing its train/eval mode.

    The prompts are left-padded into one ``[B, P]`` batch with position ids counting real tokens only (so a padded
    prompt computes exactly what it computes alone). One prefill forward fills a ``DynamicCache``; each step then
    feeds ``[b, 1]`` new tokens. Per step, on the device: repetition penalty (CTRL, Keskar et al. 2019) on the
    ``[b, V]`` float32 logits, the EOS ban while fewer than ``min_length`` tokens exist, then greedy arg-max or
    temperature / top-k (Fan et al. 2018) / top-p (Holtzman et al. 2020) sampling by the Gumbel-max trick with
    counter-based noise (see :mod:`nemo_aligner.generation.sampling`). Finished rows write padding and are dropped
    from the batch and the cache once :data:`DROP_FRACTION` of them finished; the loop ends when all finished
    or after ``max_length`` new tokens.

    Args:
        lm: a transformers causal LM (or a peft / DDP / Fabric wrapper of one), already on its device and in the
            mode the caller wants (normally ``eval()``); called under ``torch.no_grad``.
        prompt_ids: ``B`` non-empty prompts as lists of token ids.
        sampling_params: :class:`SamplingParams`.
        length_params: :class:`LengthParams` (``max_length`` counts new tokens).
        eos_token_ids: tokens that end a response (kept as its last token).
        pad_token_id: id used for padding (never attended to).
        tokenizer: needed only for ``end_strings`` (the tail of each response is decoded every step).
        generator: seeds the per-row sampling keys; with the same generator state, the result is the same.
        seeds: one integer per prompt instead of ``generator``: row ``i``'s response depends only on
            ``(prompt_ids[i], seeds[i])``, not on the rest of the batch (up to floating-point differences of
            batched matmuls).

    Returns:
        :class:`GenerationOutput` with the new tokens (EOS included, no padding) and whether each response ended.

    Raises:
        ValueError: an empty prompt, ``end_strings`` without a tokenizer, ``seeds`` of the wrong length, or a
            prompt plus ``max_length`` longer than the model's position limit (``max_position_embeddings``).
    """
    num = len(prompt_ids)
    if num == 0:
        return GenerationOutput([], [])
    for i, ids in enumerate(prompt_ids):
        if len(ids) == 0:
            raise ValueError(f"prompt {i} is empty (no token ids)")
    end_strings = list(sampling_params.end_strings)
    if end_strings and tokenizer is None:
        raise ValueError("sampling_params.end_strings needs a tokenizer to decode the responses")
    max_new, min_new = length_params.max_length, length_params.min_length
    if max_new == 0:
        return GenerationOutput([[] for _ in range(num)], [False] * num)

    model = _unwrap(lm)
    config = model.config
    limit = _max_positions(config)
    longest = max(len(ids) for ids in prompt_ids)
    if limit is not None and longest + max_new > limit:
        raise ConfigValueError(
            f"a prompt of {longest} tokens plus max_length={max_new} new tokens exceeds the model's "
            f"{limit} positions; shorten the prompts or lower length_params.max_length"
        )
    device = next(model.parameters()).device
    cache_kw, has_logits_to_keep = _forward_kwargs(type(model))

    # ---- left-padded prompt batch -------------------------------------------------------------------------------
    input_ids = torch.full((num, longest), int(pad_token_id), dtype=torch.long)
    attention = torch.zeros((num, longest), dtype=torch.long)
    for i, ids in enumerate(prompt_ids):
        input_ids[i, longest - len(ids) :] = torch.as_tensor(ids, dtype=torch.long)
        attention[i, longest - len(ids) :] = 1
    input_ids, attention = input_ids.to(device), attention.to(device)
    positions = (attention.cumsum(dim=-1) - 1).clamp_(min=0)

    greedy = sampling_params.is_greedy
    row_keys = None if greedy else _seed_keys(num, seeds, generator, device)
    eos = torch.tensor(sorted(set(int(t) for t in eos_token_ids)), dtype=torch.long, device=device)
    eos_set = set(eos.tolist())
    penalty = sampling_params.repetition_penalty

    from transformers import DynamicCache

    cache = DynamicCache(config=config)
    extra = {"logits_to_keep": 1} if has_logits_to_keep else {}
    logits = model(
        input_ids=input_ids, attention_mask=attention, position_ids=positions, use_cache=True,
        **{cache_kw: cache}, **extra,
    ).logits[:, -1, :].float()
    vocab = logits.shape[-1]
    seen = None
    if penalty != 1.0:
        counts = torch.zeros((num, vocab), dtype=torch.int32, device=device)
        seen = counts.scatter_add_(1, input_ids.clamp(max=vocab - 1), attention.int()) > 0
    next_pos = positions[:, -1] + 1

    # ---- decode loop ----------------------------------------------------------------------------------------------
    out = torch.full((num, max_new), int(pad_token_id), dtype=torch.long, device=device)
    active = torch.arange(num, device=device)  # original row of each batch row
    done = torch.zeros(num, dtype=torch.bool, device=device)
    length = torch.zeros(num, dtype=torch.long, device=device)
    final_done = torch.zeros(num, dtype=torch.bool, device=device)
    final_length = torch.zeros(num, dtype=torch.long, device=device)
    sync_every = 1 if (device.type == "cpu" or end_strings) else CUDA_SYNC_EVERY
    active_host = list(range(num))
    done_host = [False] * num
    tails: list[list[int]] = [[] for _ in range(num)] if end_strings else []
    window = _tail_window(end_strings) if end_strings else 0

    for step in range(max_new):
        if seen is not None:
            logits = apply_repetition_penalty(logits, seen, penalty)
        if step < min_new and eos.numel():
            logits[:, eos] = float("-inf")
        keys = None if greedy else step_keys(row_keys, step)
        token = choose_tokens(logits, sampling_params, keys)
        token = torch.where(done, int(pad_token_id), token)
        out[active, step] = token
        length += (~done).long()
        done |= torch.isin(token, eos)

        if end_strings:  # host-side check of the decoded tail of every running response
            host_tokens = token.tolist()
            hits = []
            for j, row in enumerate(active_host):
                if done_host[j]:
                    continue
                tails[row].append(host_tokens[j])
                if host_tokens[j] in eos_set:
                    done_host[j] = True
                elif step + 1 >= min_new:
                    text = tokenizer.decode(
                        tails[row][-window:], skip_special_tokens=False, clean_up_tokenization_spaces=False
                    )
                    if any(text.endswith(s) for s in end_strings):
                        done_host[j] = True
                        hits.append(j)
            if hits:
                done[torch.tensor(hits, device=device)] = True

        if step == max_new - 1:
            break
        if seen is not None:
            seen.scatter_(1, token[:, None], True)
        if (step + 1) % sync_every == 0:
            if not end_strings:
                done_host = done.tolist()
            finished = sum(done_host)
            if finished == len(done_host):
                break
            if finished and finished >= DROP_FRACTION * len(done_host):
                keep_host = [j for j, d in enumerate(done_host) if not d]
                keep = torch.tensor(keep_host, device=device)
                final_length[active] = length
                final_done[active] = done
                cache.batch_select_indices(keep)
                active, done, length, token = active[keep], done[keep], length[keep], token[keep]
                attention, next_pos = attention[keep], next_pos[keep]
                if seen is not None:
                    seen = seen[keep]
                if row_keys is not None:
                    row_keys = row_keys[keep]
                active_host = [active_host[j] for j in keep_host]
                done_host = [False] * len(keep_host)
        attention = torch.cat([attention, attention.new_ones((attention.shape[0], 1))], dim=1)
        logits = model(
            input_ids=token[:, None], attention_mask=attention, position_ids=next_pos[:, None], use_cache=True,
            **{cache_kw: cache},
        ).logits[:, -1, :].float()
        next_pos = next_pos + 1

    final_length[active] = length
    final_done[active] = done
    rows = out.cpu().tolist()
    lengths = final_length.cpu().tolist()
    return GenerationOutput(
        response_ids=[row[:n] for row, n in zip(rows, lengths)], ended=[bool(d) for d in final_done.cpu().tolist()]
    )
