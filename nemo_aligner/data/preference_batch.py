"""Preference-pair batches: tokenised pairs (rows of :mod:`nemo_aligner.data.preference`) laid out for one forward
pass (:class:`PreferenceBatch`, :func:`collate_preference_pairs`).

Two layouts are supported:

* ``shared_prefix=True`` (default): one row per pair, ``[prompt | chosen | rejected | pad]``. The rejected
  response attends to the prompt and to itself but not to the chosen response, and its position ids restart
  right after the prompt, so every logprob equals the one a separate ``[prompt | rejected]`` forward gives, while
  the prompt is computed once instead of twice. This needs a 4-D attention mask (SDPA or eager attention).
* ``shared_prefix=False``: two rows per pair, ``[prompt | chosen | pad]`` and ``[prompt | rejected | pad]`` (the
  layout TRL uses), with an ordinary 2-D padding mask, so any attention kernel (e.g. flash-attention) works.

In both layouts only the positions that predict a response token are sent through the LM head
(``pred_row``/``pred_col``), which avoids materialising ``[tokens, vocab]`` logits for the prompt.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

from nemo_aligner.data.sequences import TokenLayout, shared_prefix_attention_mask

PROMPT, CHOSEN, REJECTED, PAD = 0, 1, 2, 3


@dataclass
class PreferenceBatch(TokenLayout):
    """A micro-batch of ``B`` preference pairs laid out for one forward pass.

    Shapes (``R`` rows, ``T`` padded row length, ``N`` response tokens over all ``2B`` responses):

    * the :class:`~nemo_aligner.data.sequences.TokenLayout` tensors: ``input_ids``, ``position_ids`` ``[R, T]``;
      ``attention_mask`` ``[R, 1, T, T]`` bool (True = may attend) for the shared-prefix layout, else ``[R, T]``
      int64 padding mask; ``pred_row``, ``pred_col``, ``targets`` ``[N]``; ``seq_id`` ``[N]`` int64 in ``[0, 2B)``:
      chosen response of pair ``k`` is ``k``, rejected is ``B + k``.
    * ``chosen_lengths``, ``rejected_lengths``: ``[B]`` int64 response lengths in tokens.
    * ``chosen_rewards``, ``rejected_rewards``: ``[B]`` float32 ground-truth rewards, NaN where absent.
    * ``sample_index``: ``[B]`` int64 index of each pair in its dataset (for cached reference logprobs).
    * ``num_tokens``: ``int``, tokens of the pairs as two separate sequences ``sum(2P + C + R)`` (throughput unit).
    """

    chosen_lengths: torch.Tensor
    rejected_lengths: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor
    sample_index: torch.Tensor
    num_tokens: int
    shared_prefix: bool

    @property
    def num_pairs(self) -> int:
        return int(self.chosen_lengths.numel())


def collate_preference_pairs(
    examples: Sequence[dict],
    pad_token_id: int,
    shared_prefix: bool = True,
    pad_to_multiple_of: int = 1,
) -> PreferenceBatch:
    """Lay out a list of tokenised pairs as a :class:`PreferenceBatch`.

    Args:
        examples: dicts with ``prompt_ids``, ``chosen_ids``, ``rejected_ids`` (lists of ints, prompt non-empty,
            responses non-empty), optional ``chosen_reward``/``rejected_reward`` (float or NaN/None) and optional
            ``index`` (int).
        pad_token_id: id written into padding positions (never attended to, never a target).
        shared_prefix: layout choice, see the module docstring.
        pad_to_multiple_of: round the row length up to a multiple of this (helps some kernels).

    Raises:
        ValueError: on an empty list, an empty prompt or an empty response.
    """
    if not examples:
        raise ValueError("collate_preference_pairs needs at least one pair")
    num_pairs = len(examples)
    rows: list[tuple[list[int], list[int]]] = []  # (token ids, segment codes)
    preds: list[tuple[int, int, int, int]] = []  # (row, col, target, seq_id)
    num_tokens = 0
    for k, ex in enumerate(examples):
        prompt, chosen, rejected = list(ex["prompt_ids"]), list(ex["chosen_ids"]), list(ex["rejected_ids"])
        if not prompt or not chosen or not rejected:
            raise ValueError(f"pair {ex.get('index', k)} has an empty prompt or response; every part needs a token")
        num_tokens += 2 * len(prompt) + len(chosen) + len(rejected)
        p = len(prompt)
        if shared_prefix:
            row = len(rows)
            rows.append((prompt + chosen + rejected, [PROMPT] * p + [CHOSEN] * len(chosen) + [REJECTED] * len(rejected)))
            for seq, response, start in ((k, chosen, p), (num_pairs + k, rejected, p + len(chosen))):
                for j, tok in enumerate(response):
                    preds.append((row, p - 1 if j == 0 else start + j - 1, tok, seq))
        else:
            for seq, response in ((k, chosen), (num_pairs + k, rejected)):
                row = len(rows)
                rows.append((prompt + response, [PROMPT] * p + [CHOSEN] * len(response)))
                for j, tok in enumerate(response):
                    preds.append((row, p - 1 + j, tok, seq))

    length = max(len(ids) for ids, _ in rows)
    length = int(math.ceil(length / pad_to_multiple_of) * pad_to_multiple_of)
    input_ids = torch.full((len(rows), length), pad_token_id, dtype=torch.long)
    segments = torch.full((len(rows), length), PAD, dtype=torch.long)
    for r, (ids, segs) in enumerate(rows):
        input_ids[r, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        segments[r, : len(segs)] = torch.tensor(segs, dtype=torch.long)

    # Position ids: the prompt counts from 0, each response continues from the end of the prompt.
    position_ids = torch.zeros_like(input_ids)
    for r, (ids, segs) in enumerate(rows):
        p = segs.count(PROMPT)
        c = segs.count(CHOSEN)
        rj = segs.count(REJECTED)
        pos = list(range(p + c)) + list(range(p, p + rj))
        position_ids[r, : len(pos)] = torch.tensor(pos, dtype=torch.long)

    if shared_prefix:
        block = torch.where(segments == PAD, -1, 0)  # one block per row: the pair
        attention_mask = shared_prefix_attention_mask(block, torch.where(segments == PAD, 0, segments))
    else:
        attention_mask = (segments != PAD).long()

    pred = torch.tensor(preds, dtype=torch.long)

    def reward(ex: dict, key: str) -> float:
        value = ex.get(key)
        return float("nan") if value is None else float(value)

    return PreferenceBatch(
        input_ids=input_ids,
        position_ids=position_ids,
        attention_mask=attention_mask,
        pred_row=pred[:, 0].contiguous(),
        pred_col=pred[:, 1].contiguous(),
        targets=pred[:, 2].contiguous(),
        seq_id=pred[:, 3].contiguous(),
        chosen_lengths=torch.tensor([len(ex["chosen_ids"]) for ex in examples], dtype=torch.long),
        rejected_lengths=torch.tensor([len(ex["rejected_ids"]) for ex in examples], dtype=torch.long),
        chosen_rewards=torch.tensor([reward(ex, "chosen_reward") for ex in examples], dtype=torch.float32),
        rejected_rewards=torch.tensor([reward(ex, "rejected_reward") for ex in examples], dtype=torch.float32),
        sample_index=torch.tensor([int(ex.get("index", -1)) for ex in examples], dtype=torch.long),
        num_tokens=num_tokens,
        shared_prefix=shared_prefix,
    )
