"""Reward-model batches: ``G`` examples of ``K`` responses each laid out as the ``S = sum K`` sequences one forward
pass scores (:class:`RewardBatch`, :func:`collate_reward_examples`). The rows come from
:mod:`nemo_aligner.data.reward`; the model reads one scalar at each sequence's last token.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from nemo_aligner.data.sequences import SequenceBatch, collate_sequences, first_fit_rows, shared_prefix_attention_mask


@dataclass
class RewardBatch:
    """``G`` examples flattened into ``S`` sequences (prompt + one response each), group-major.

    * ``sequences``: the :class:`~nemo_aligner.data.sequences.SequenceBatch` (padded or packed).
    * ``group``: ``[S]`` int64, which example each sequence belongs to (``0..G-1``).
    * ``preferences``: ``[S]`` float32, larger is better within a group.
    * ``num_groups``: ``G``; ``num_tokens``: real tokens (throughput unit).
    """

    sequences: SequenceBatch
    group: torch.Tensor
    preferences: torch.Tensor
    num_groups: int

    @property
    def num_tokens(self) -> int:
        return self.sequences.num_tokens

    def to(self, device) -> "RewardBatch":
        return RewardBatch(self.sequences.to(device), self.group.to(device), self.preferences.to(device), self.num_groups)


def collate_reward_examples(
    examples: Sequence[dict],
    pad_token_id: int,
    pack: bool = False,
    max_row_length: int | None = None,
    shared_prefix: bool = False,
) -> RewardBatch:
    """Lay out dataset rows (``prompt_ids``, ``response_ids``, ``preferences``, optional ``index``) as a
    :class:`RewardBatch`: sequence ``prompt_ids + response_ids[k]`` for each response, in row order.

    Layouts of the ``S`` sequences (all give the same rewards):

    * default: one sequence per row, right-padded (any attention kernel).
    * ``pack=True``: sequences packed first-fit into rows of at most ``max_row_length`` tokens (block-diagonal mask).
    * ``shared_prefix=True``: one block per example, ``[prompt | response 1 | ... | response K]``; each response
      attends to the prompt and to itself only and its position ids continue from the end of the prompt, so its
      last hidden state equals that of a separate ``[prompt | response k]`` forward while the prompt is computed
      once instead of ``K`` times (the layout DPO uses for pairs, see :mod:`nemo_aligner.data.preference_batch`). With
      ``pack=True`` too, blocks are packed first-fit into rows of ``max_row_length``. Needs a 4-D mask (SDPA or eager
      attention). ``num_tokens`` still counts ``sum(len(prompt) + len(response))``, the work of the other layouts.

    Raises:
        ValueError: no examples; an empty prompt with ``shared_prefix``; a block longer than ``max_row_length``;
            as :func:`~nemo_aligner.data.sequences.collate_sequences`.
    """
    if not examples:
        raise ValueError("collate_reward_examples needs at least one example")
    group, prefs = [], []
    for g, ex in enumerate(examples):
        for pref in ex["preferences"]:
            group.append(g)
            prefs.append(float(pref))
    if shared_prefix:
        sequences = _collate_shared_prefix(examples, pad_token_id, pack, max_row_length)
    else:
        seqs = []
        for ex in examples:
            prompt = list(ex["prompt_ids"])
            for response in ex["response_ids"]:
                ids = prompt + list(response)
                seqs.append({"input_ids": ids, "loss_mask": [0] * len(ids), "index": int(ex.get("index", -1))})
        sequences = collate_sequences(seqs, pad_token_id, pack=pack, max_row_length=max_row_length)
    return RewardBatch(
        sequences=sequences,
        group=torch.tensor(group, dtype=torch.long),
        preferences=torch.tensor(prefs, dtype=torch.float32),
        num_groups=len(examples),
    )


def _collate_shared_prefix(examples: Sequence[dict], pad_token_id: int, pack: bool, max_row_length: int | None):
    """The ``shared_prefix`` layout of :func:`collate_reward_examples` as a packed
    :class:`~nemo_aligner.data.sequences.SequenceBatch` (no targets; ``last_row``/``last_col`` at each response's
    last token)."""
    blocks = []  # per example: (token ids, segment codes 0 = prompt / k = response k, position ids, response ends)
    for g, ex in enumerate(examples):
        prompt = list(ex["prompt_ids"])
        if not prompt:
            raise ValueError(f"example {ex.get('index', g)} has an empty prompt; shared_prefix needs one")
        ids, segs, pos, ends = list(prompt), [0] * len(prompt), list(range(len(prompt))), []
        for k, response in enumerate(ex["response_ids"], start=1):
            response = list(response)
            if not response:
                raise ValueError(f"example {ex.get('index', g)} has an empty response")
            ids += response
            segs += [k] * len(response)
            pos += range(len(prompt), len(prompt) + len(response))
            ends.append(len(ids) - 1)
        blocks.append((ids, segs, pos, ends))
    lengths = [len(b[0]) for b in blocks]
    capacity = (max_row_length or max(lengths)) if pack else max(lengths)
    if max(lengths) > capacity:
        raise ValueError(f"an example of {max(lengths)} tokens (prompt + all responses) does not fit max_row_length={capacity}")
    rows = first_fit_rows(lengths, capacity) if pack else [[g] for g in range(len(blocks))]
    width = max(sum(lengths[g] for g in row) for row in rows)
    input_ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    position_ids = torch.zeros((len(rows), width), dtype=torch.long)
    block = torch.full((len(rows), width), -1, dtype=torch.long)  # example of each slot, -1 = pad
    segment = torch.full((len(rows), width), -1, dtype=torch.long)
    last = {}  # example -> (row, columns of its response ends)
    for r, row in enumerate(rows):
        col = 0
        for g in row:
            ids, segs, pos, ends = blocks[g]
            n = len(ids)
            input_ids[r, col : col + n] = torch.tensor(ids)
            position_ids[r, col : col + n] = torch.tensor(pos)
            block[r, col : col + n] = g
            segment[r, col : col + n] = torch.tensor(segs)
            last[g] = (r, [col + e for e in ends])
            col += n
    attention_mask = shared_prefix_attention_mask(block, segment)
    last_row = [last[g][0] for g in range(len(blocks)) for _ in last[g][1]]
    last_col = [c for g in range(len(blocks)) for c in last[g][1]]
    seq_lengths = [len(ex["prompt_ids"]) + len(r) for ex in examples for r in ex["response_ids"]]
    empty = torch.zeros(0, dtype=torch.long)
    as_long = lambda values: torch.tensor(values, dtype=torch.long)  # noqa: E731
    return SequenceBatch(
        input_ids=input_ids,
        position_ids=position_ids,
        attention_mask=attention_mask,
        pred_row=empty,
        pred_col=empty.clone(),
        targets=empty.clone(),
        seq_id=empty.clone(),
        last_row=as_long(last_row),
        last_col=as_long(last_col),
        seq_lengths=as_long(seq_lengths),
        target_lengths=torch.zeros(len(seq_lengths), dtype=torch.long),
        sample_index=as_long([int(ex.get("index", -1)) for ex in examples for _ in ex["response_ids"]]),
        num_tokens=sum(seq_lengths),
        packed=True,
    )
