"""SFT records as the SFT reader tokenises them."""

from __future__ import annotations

from nemo_aligner.data.sft import parse_sft_record, tokenize_sft_example


def encode_sft_record(tokenizer, record: dict, chat: bool = False) -> tuple[list[int], list[int]]:
    """``(input_ids, loss_mask)`` of one SFT JSONL record (any accepted format), parsed as line 1 of ``data.jsonl``
    and tokenised by :func:`nemo_aligner.data.sft.tokenize_sft_example`; ``loss_mask`` is 1 on the assistant tokens.
    Raises :class:`~nemo_aligner.data.jsonl.DataFormatError` for a malformed record."""
    return tokenize_sft_example(parse_sft_record(record, "data.jsonl", 1), tokenizer, chat=chat)
