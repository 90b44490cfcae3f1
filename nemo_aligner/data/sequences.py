"""Single sequences (SFT examples, reward-model inputs, PPO rollouts) laid out for one forward pass.

Every algorithm that is not pairwise (SFT, reward models, the PPO actor and critic, rejection sampling) feeds the
model a :class:`SequenceBatch`. A sequence is ``input_ids`` plus a ``loss_mask`` marking its *target* tokens (the
response or assistant tokens): the policy is asked for the log-probability of each target token, the critic for a
value at each position that predicts one, and a reward model reads one scalar at the sequence's last token.

Two layouts:

* ``pack=False`` (default): one sequence per row, right-padded, with a 2-D ``[R, T]`` padding mask, so every
  attention kernel works.
* ``pack=True``: sequences are packed first-fit into rows of at most ``max_row_length`` tokens; a 4-D
  block-diagonal causal mask keeps them apart and position ids restart at 0 for each one, so every log-prob equals
  the unpacked one (needs SDPA or eager attention).

In both layouts only the positions predicting a target token are listed (``pred_row``/``pred_col``), so the LM head
never runs on prompt positions (see :class:`nemo_aligner.models.hf_causal_lm.ResponseLogprobs`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any, Sequence

import torch

from nemo_aligner.utils.config import ConfigValueError


@dataclass
class TokenLayout:
    """The tensors a causal LM's forward and its LM head read, shared by every batch layout: ``R`` rows of length
    ``T``, ``N`` target (response) tokens.

    * ``input_ids``, ``position_ids``: ``[R, T]`` int64.
    * ``attention_mask``: ``[R, T]`` int64 padding mask (1 = real token), or ``[R, 1, T, T]`` bool (True = may
      attend) for the packed and shared-prefix layouts.
    * ``pred_row``, ``pred_col``: ``[N]`` int64, the position whose hidden state predicts each target token
      (the token just before it in its sequence).
    * ``targets``: ``[N]`` int64 target token ids; ``seq_id``: ``[N]`` int64, the sequence (or response) each
      target belongs to; within a sequence the targets are in token order.

    Subclasses (:class:`SequenceBatch`, :class:`~nemo_aligner.data.preference_batch.PreferenceBatch`) add what their
    losses read; their fields follow these, in this order.
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    attention_mask: torch.Tensor
    pred_row: torch.Tensor
    pred_col: torch.Tensor
    targets: torch.Tensor
    seq_id: torch.Tensor

    def to(self, device: torch.device | str):
        """A copy (of the same class) with every tensor on ``device``."""
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        return type(self)(**{k: v.to(device) if torch.is_tensor(v) else v for k, v in values.items()})


@dataclass
class SequenceBatch(TokenLayout):
    """``S`` sequences in ``R`` rows of length ``T``; ``N`` target tokens over all sequences.

    * the :class:`TokenLayout` tensors (``input_ids``, ``position_ids``, ``attention_mask`` (4-D when packed),
      ``pred_row``, ``pred_col``, ``targets``); ``seq_id`` is in ``[0, S)``, sequences in input order.
    * ``last_row``, ``last_col``: ``[S]`` int64, where each sequence's last token sits (a reward model reads its
      scalar there).
    * ``seq_lengths``: ``[S]`` int64 tokens per sequence; ``target_lengths``: ``[S]`` int64 target tokens per
      sequence (may be 0 for a reward-model input).
    * ``sample_index``: ``[S]`` int64 dataset index of each sequence (``-1`` if unknown).
    * ``num_tokens``: ``int``, real (non-pad) tokens in the batch, the throughput unit.
    """

    last_row: torch.Tensor
    last_col: torch.Tensor
    seq_lengths: torch.Tensor
    target_lengths: torch.Tensor
    sample_index: torch.Tensor
    num_tokens: int
    packed: bool = False

    @property
    def num_sequences(self) -> int:
        return int(self.seq_lengths.numel())


def loss_mask_from_prompt_length(num_tokens: int, prompt_length: int) -> list[int]:
    """``[0] * prompt_length + [1] * (num_tokens - prompt_length)``: every token after the prompt is a target.

    Raises:
        ValueError: ``prompt_length`` outside ``[0, num_tokens]``.
    """
    if not 0 <= prompt_length <= num_tokens:
        raise ValueError(f"prompt_length={prompt_length} outside [0, {num_tokens}]")
    return [0] * prompt_length + [1] * (num_tokens - prompt_length)


def _example_mask(example: dict, n: int) -> list[int]:
    if "loss_mask" in example and example["loss_mask"] is not None:
        mask = [int(bool(m)) for m in example["loss_mask"]]
        if len(mask) != n:
            raise ValueError(f"loss_mask has {len(mask)} entries for {n} tokens")
        return mask
    if "prompt_length" in example and example["prompt_length"] is not None:
        return loss_mask_from_prompt_length(n, int(example["prompt_length"]))
    return [0] + [1] * (n - 1)  # plain language modelling: every token but the first is a target


def first_fit_rows(lengths: list[int], capacity: int) -> list[list[int]]:
    """Pack sequence indices into rows of total length <= ``capacity`` (first-fit decreasing, stable order)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    rows: list[list[int]] = []
    space: list[int] = []
    for i in order:
        for r, free in enumerate(space):
            if lengths[i] <= free:
                rows[r].append(i)
                space[r] -= lengths[i]
                break
        else:
            rows.append([i])
            space.append(capacity - lengths[i])
    return [sorted(row) for row in rows]


def shared_prefix_attention_mask(block: torch.Tensor, segment: torch.Tensor) -> torch.Tensor:
    """The 4-D mask of every packed or shared-prefix layout: token ``i`` may attend token ``j`` iff ``j <= i``, both
    are in the same block, and ``j`` is in ``i``'s segment or in segment 0 (the block's shared prefix, e.g. the
    prompt that several responses continue). Padding attends only itself, so no softmax row is fully masked.

    Args:
        block: ``[R, T]`` int64, the block (sequence, or prompt with its responses) of each slot; ``-1`` = padding.
        segment: ``[R, T]`` int64, the segment inside the block: ``0`` the shared prefix, ``k > 0`` the k-th
            continuation. All zeros gives the plain block-diagonal causal mask of packed sequences.

    Returns:
        ``[R, 1, T, T]`` bool, True = may attend.
    """
    width = block.shape[1]
    causal = torch.ones(width, width, dtype=torch.bool).tril_()
    same_block = block[:, :, None] == block[:, None, :]
    same_or_prefix = (segment[:, :, None] == segment[:, None, :]) | (segment == 0)[:, None, :]
    mask = (causal & same_block & same_or_prefix & (block >= 0)[:, :, None])[:, None]
    return mask | torch.eye(width, dtype=torch.bool)


#: The config keys that turn each 4-D layout off (named in the sliding-window error).
LAYOUT_KEYS = (
    "model.dpo.shared_prefix=false (DPO), model.data.train_ds.packed_sequence=false (SFT), "
    "model.data.pack_sequences=false and model.data.shared_prefix=false (reward models)"
)


def attention_window(config: Any) -> int | None:
    """The local-attention span of a transformers config, in tokens, or ``None`` if every layer attends to the
    whole prefix.

    A query at position ``i`` of such a model attends only the keys ``j`` with ``i - j < window``: the
    ``sliding_window`` of Mistral, Qwen2/Qwen3 (only with ``use_sliding_window``), Gemma 2/3, Phi-3, Starcoder2,
    Cohere2, ...; or the ``attention_chunk_size`` of chunked attention (Llama 4), whose chunks are no longer than
    it. Nested configs (``text_config``, Gemma 3 multimodal style) are read through ``get_text_config()``. A
    ``layer_types`` list without a ``"sliding_attention"`` entry means the window is unused.
    """
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    windows = []
    sliding = getattr(text, "sliding_window", None)
    layer_types = getattr(text, "layer_types", None)
    if (
        isinstance(sliding, int) and not isinstance(sliding, bool) and sliding > 0
        and getattr(text, "use_sliding_window", True) is not False
        and (not layer_types or "sliding_attention" in layer_types)
    ):
        windows.append(sliding)
    chunk = getattr(text, "attention_chunk_size", None)
    if isinstance(chunk, int) and not isinstance(chunk, bool) and chunk > 0:
        windows.append(chunk)
    return min(windows) if windows else None


def check_attention_window(config: Any, attention_mask: torch.Tensor) -> None:
    """Refuse a 4-D (packed or shared-prefix) mask that the model's sliding window would have cut.

    transformers uses a user-given 4-D mask as it is, so the model's own window is not applied to it. In the
    layouts of :func:`shared_prefix_attention_mask` a token at position ``p`` of its sequence attends exactly the
    ``p + 1`` tokens of that sequence up to itself, so the mask equals the windowed one iff no query attends more
    than ``window`` keys, i.e. every sequence is at most ``window`` tokens. Then the result equals the unpacked
    computation; otherwise this raises instead of silently attending beyond the window.

    Args:
        config: the transformers config of the model the mask is fed to.
        attention_mask: ``[R, T]`` padding mask (always accepted: transformers applies the window itself) or
            ``[R, 1, T, T]`` bool (True = may attend).

    Raises:
        ValueError: a 4-D mask with a sequence longer than the window, naming both lengths and the config keys
            that switch the 4-D layouts off.
    """
    if attention_mask.dim() != 4:
        return
    window = attention_window(config)
    if window is None:
        return
    longest = int(attention_mask.sum(dim=-1).max()) if attention_mask.numel() else 0
    if longest > window:
        model_type = getattr(config, "model_type", type(config).__name__)
        raise ConfigValueError(
            f"this {model_type} model attends only the last {window} tokens (sliding window / chunked attention), "
            f"but a packed or shared-prefix row holds a sequence of {longest} tokens, and a 4-D attention mask "
            f"cannot apply the window; set {LAYOUT_KEYS}, or keep every sequence at most {window} tokens"
        )


def collate_sequences(
    examples: Sequence[dict[str, Any]],
    pad_token_id: int,
    pack: bool = False,
    max_row_length: int | None = None,
    pad_to_multiple_of: int = 1,
) -> SequenceBatch:
    """Lay out tokenised sequences as a :class:`SequenceBatch`.

    Args:
        examples: dicts with ``input_ids`` (list of ints, non-empty) and the targets given by either
            ``loss_mask`` (0/1 per token) or ``prompt_length`` (tokens after it are targets); with neither, every
            token but the first is a target. Token 0 of a sequence can never be a target (nothing predicts it) and
            is silently not one. Optional ``index`` (int) is kept in ``sample_index``.
        pad_token_id: written into padding (never attended to, never a target).
        pack: pack several sequences per row (see the module docstring).
        max_row_length: row capacity when packing; default the longest sequence. Ignored without ``pack``.
        pad_to_multiple_of: round the row length up to a multiple of this.

    Raises:
        ValueError: no examples, an empty sequence, a ``loss_mask`` of the wrong length, or a sequence longer
            than ``max_row_length``.
    """
    if not examples:
        raise ValueError("collate_sequences needs at least one sequence")
    ids_list = [list(ex["input_ids"]) for ex in examples]
    for k, ids in enumerate(ids_list):
        if not ids:
            raise ValueError(f"sequence {examples[k].get('index', k)} is empty")
    masks = [_example_mask(ex, len(ids)) for ex, ids in zip(examples, ids_list)]
    lengths = [len(ids) for ids in ids_list]

    if pack:
        capacity = max_row_length or max(lengths)
        if max(lengths) > capacity:
            raise ValueError(f"a sequence of {max(lengths)} tokens does not fit max_row_length={capacity}")
        rows = first_fit_rows(lengths, capacity)
    else:
        rows = [[k] for k in range(len(examples))]

    width = max(sum(lengths[k] for k in row) for row in rows)
    width = int(math.ceil(width / pad_to_multiple_of) * pad_to_multiple_of)
    num_rows = len(rows)
    input_ids = torch.full((num_rows, width), pad_token_id, dtype=torch.long)
    position_ids = torch.zeros((num_rows, width), dtype=torch.long)
    segment = torch.full((num_rows, width), -1, dtype=torch.long)  # which sequence each slot holds, -1 = pad
    where = [(0, 0)] * len(examples)  # (row, start column) of each sequence
    for r, row in enumerate(rows):
        col = 0
        for k in row:
            n = lengths[k]
            input_ids[r, col : col + n] = torch.tensor(ids_list[k], dtype=torch.long)
            position_ids[r, col : col + n] = torch.arange(n)
            segment[r, col : col + n] = k
            where[k] = (r, col)
            col += n

    pred_row, pred_col, targets, seq_id = [], [], [], []
    for k, (ids, mask) in enumerate(zip(ids_list, masks)):
        r, start = where[k]
        for t in range(1, len(ids)):
            if mask[t]:
                pred_row.append(r)
                pred_col.append(start + t - 1)
                targets.append(ids[t])
                seq_id.append(k)

    if pack:
        attention_mask = shared_prefix_attention_mask(segment, torch.zeros_like(segment))
    else:
        attention_mask = (segment >= 0).long()

    as_long = lambda values: torch.tensor(values, dtype=torch.long)  # noqa: E731
    return SequenceBatch(
        input_ids=input_ids,
        position_ids=position_ids,
        attention_mask=attention_mask,
        pred_row=as_long(pred_row),
        pred_col=as_long(pred_col),
        targets=as_long(targets),
        seq_id=as_long(seq_id),
        last_row=as_long([where[k][0] for k in range(len(examples))]),
        last_col=as_long([where[k][1] + lengths[k] - 1 for k in range(len(examples))]),
        seq_lengths=as_long(lengths),
        target_lengths=as_long([sum(m[1:]) for m in masks]),
        sample_index=as_long([int(ex.get("index", -1)) for ex in examples]),
        num_tokens=sum(lengths),
        packed=pack,
    )


def per_sequence_sum(values: torch.Tensor, seq_id: torch.Tensor, num_sequences: int) -> torch.Tensor:
    """Sum per-token ``values`` ``[N]`` into ``[num_sequences]`` by ``seq_id`` ``[N]`` (float32 result)."""
    out = torch.zeros(num_sequences, dtype=torch.float32, device=values.device)
    return out.index_add_(0, seq_id.to(values.device), values.float())

