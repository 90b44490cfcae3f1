"""Supervised fine-tuning data: parsing, tokenisation with an assistant-token loss mask, truncation, caching.

Pipeline for one JSON-lines file::

    iter_jsonl -> parse_sft_record -> tokenize_sft_example -> truncate_sequence

:func:`build_sft_dataset` runs it once over the whole file (streaming) and stores ``input_ids`` and ``loss_mask``
as a memory-mapped Arrow dataset in the same cache as the preference data (see
:mod:`nemo_aligner.data.cache`), so later runs with the same file, tokenizer and settings load it without
re-tokenising. Rows feed :func:`nemo_aligner.data.sequences.collate_sequences` directly.

The loss mask is 1 exactly on assistant tokens: every assistant turn of a conversation (its content and whatever the
chat template closes the turn with, e.g. ``<|im_end|>``), or the response of a prompt/response pair (plus EOS for
plain text). System and user turns, and the template's assistant header (``<|im_start|>assistant\\n``), are 0.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets

from nemo_aligner.data.cache import build_tokenized_dataset, concatenate_files, iter_jsonl_shard
from nemo_aligner.data.chat import (
    Message,
    Turns,
    as_messages,
    check_messages,
    encode,
    render_chat,
    require_chat_template,
    require_turns,
    split_hh_transcript,
    tokenize_prompt_response,
)
from nemo_aligner.data.jsonl import DataFormatError
from nemo_aligner.utils.config import ConfigValueError

SFT_FORMAT_VERSION = 2
"""Bump whenever the cached SFT layout or the SFT tokenisation rules change (2: chat roles are lower-cased)."""

TRUNCATION_MODES = ("truncate", "drop")
TRUNCATION_METHODS = ("left", "right")

ACCEPTED_FORMATS = (
    "chat: {'messages': [{'role': 'system'|'user'|'assistant', 'content': str}, ...]}",
    "NeMo / ShareGPT: {'system': str (optional), 'conversations': [{'from': 'User'|'Assistant', 'value': str}, ...],"
    " 'mask': 'User' (optional)}",
    "{'input': str, 'output': str}",
    "{'prompt': str|[messages], 'response'|'completion'|'chosen': str|[messages]}",
    "Anthropic HH-RLHF: {'chosen': str (transcript), ...}: trains on the last assistant response",
)

#: NeMo / ShareGPT speaker names (case-insensitive) and the chat roles they become.
SPEAKER_ROLES = {"user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant", "system": "system"}

_FEATURES = datasets.Features(
    {
        "input_ids": datasets.Sequence(datasets.Value("int32")),
        "loss_mask": datasets.Sequence(datasets.Value("int8")),
        "line_no": datasets.Value("int64"),
    }
)

_STAT_COUNTERS = ("num_lines", "num_examples", "num_truncated", "num_dropped")


@dataclass
class SFTExample:
    """One SFT example before tokenisation: either a conversation or a prompt/response pair.

    Attributes:
        messages: chat messages ``{"role", "content"}`` (loss on every ``assistant`` message), or None.
        prompt: the masked context of a pair (plain text or messages), or None for a conversation.
        response: the target of a pair (plain text or messages), or None for a conversation.
    """

    messages: list[Message] | None = None
    prompt: Turns | None = None
    response: Turns | None = None


# --------------------------------------------------------------------------------------
# Parsing
# --------------------------------------------------------------------------------------


def parse_sft_record(record: dict, path: str | os.PathLike, line_no: int) -> SFTExample:
    """Turn one JSON record into an :class:`SFTExample`, whatever its (supported) format.

    Formats, detected from the keys in this order:

    * ``{"messages": [{"role", "content"}, ...]}``: a chat; loss on every assistant message.
    * ``{"system"?: str, "conversations": [{"from", "value"}, ...], "mask"?: "User"}`` (NeMo; ShareGPT's
      ``human``/``gpt`` speakers also work): becomes a chat with the system prompt first; ``mask`` must name the
      user speaker (the only masking NeMo-Aligner's SFT uses); loss on every assistant turn.
    * ``{"input", "output"}``; ``{"prompt", "response"}``; ``{"prompt", "completion"}``; ``{"prompt", "chosen"}``
      (TRL preference data, trained on the chosen side): a pair; prompt/response may be strings or message lists.
    * ``{"chosen": str}`` (Anthropic HH-RLHF transcript, any other keys ignored): split at the last
      ``"\\n\\nAssistant:"`` (the prompt keeps the marker, the response its leading space), as the preference data
      does; ``{"chosen": [messages]}`` is a chat.

    Raises:
        DataFormatError: naming ``path``, ``line_no`` and the offending field: a missing field, a wrong type, an
            empty response, a message without string role/content or with a role other than system, user or
            assistant (any capitalisation; see :func:`~nemo_aligner.data.chat.check_messages`), an unknown
            speaker, a ``mask`` other than the
            user speaker, a conversation without an assistant turn, an HH transcript without an assistant turn, or
            an unknown format (the message lists the accepted ones).
    """
    error = functools.partial(DataFormatError, path, line_no)
    if "messages" in record:
        messages = record["messages"]
        if not isinstance(messages, list) or not messages:
            raise error("messages", f"expected a non-empty list of chat messages, got {messages!r:.80}")
        messages = check_messages(messages, "messages", error)
        _require_assistant(messages, "messages", error)
        return SFTExample(messages=messages)
    if "conversations" in record:
        return SFTExample(messages=_nemo_conversation(record, error))
    if "input" in record or "output" in record:
        prompt = require_turns(record, "input", error, allow_empty=True)
        return SFTExample(prompt=prompt, response=require_turns(record, "output", error))
    if "prompt" in record:
        for key in ("response", "completion", "chosen"):
            if key in record:
                prompt = require_turns(record, "prompt", error, allow_empty=True)
                return SFTExample(prompt=prompt, response=require_turns(record, key, error))
        raise error("response", "missing required field (a 'prompt' needs a 'response', 'completion' or 'chosen')")
    if "chosen" in record:
        chosen = require_turns(record, "chosen", error)
        if isinstance(chosen, list):
            _require_assistant(chosen, "chosen", error)
            return SFTExample(messages=chosen)
        prompt, response = split_hh_transcript(chosen, "chosen", error)
        return SFTExample(prompt=prompt, response=response)
    accepted = "".join(f"\n  - {fmt}" for fmt in ACCEPTED_FORMATS)
    raise error(None, f"unrecognised SFT record with keys {sorted(record)}; accepted formats:{accepted}")


def _require_assistant(messages: list[Message], field_name: str, error) -> None:
    if not any(m["role"] == "assistant" for m in messages):
        raise error(field_name, "conversation has no assistant turn, so nothing to train on")


def _nemo_conversation(record: dict, error) -> list[Message]:
    turns = record["conversations"]
    if not isinstance(turns, list) or not turns:
        raise error("conversations", "expected a non-empty list of {'from', 'value'} turns")
    system = record.get("system", "")
    if not isinstance(system, str):
        raise error("system", f"expected a string, got {type(system).__name__}")
    mask = record.get("mask", "User")
    if not isinstance(mask, str) or SPEAKER_ROLES.get(mask.strip().lower()) != "user":
        raise error("mask", f"only masking the user speaker is supported (e.g. 'User'), got {mask!r}")
    messages = [{"role": "system", "content": system}] if system else []
    for i, turn in enumerate(turns):
        where = f"conversations[{i}]"
        if not (isinstance(turn, dict) and isinstance(turn.get("from"), str) and isinstance(turn.get("value"), str)):
            raise error(where, f"turn must be an object with string 'from' and 'value', got {turn!r:.80}")
        role = SPEAKER_ROLES.get(turn["from"].strip().lower())
        if role is None or role == "system":
            raise error(f"{where}.from", f"unknown speaker {turn['from']!r}; use 'User' or 'Assistant'")
        messages.append({"role": role, "content": turn["value"]})
    _require_assistant(messages, "conversations", error)
    return messages


# --------------------------------------------------------------------------------------
# Tokenisation and truncation
# --------------------------------------------------------------------------------------


def tokenize_sft_example(example: SFTExample, tokenizer, chat: bool = False) -> tuple[list[int], list[int]]:
    """Tokenise an example into ``(input_ids, loss_mask)``, two equally long lists; mask 1 = assistant token.

    * Conversation: let ``render(m, g)`` be ``tokenizer.apply_chat_template(m, tokenize=False,
      add_generation_prompt=g)``. Assistant turn ``k`` covers the characters from ``len(render(m[:k], True))``
      (after the template's assistant header) to ``len(render(m[:k+1], False))`` (its content and end-of-turn
      text) of ``render(m, False)``. The mask comes from rendering these prefixes, never from searching role
      names in the text. The text is cut at these boundaries and each piece is tokenised on its own with
      ``add_special_tokens=False``, so a token never straddles a boundary (the same rule as the preference data).
    * Pair: exactly :func:`nemo_aligner.data.chat.tokenize_prompt_response` (same tokens as DPO, reward
      models and PPO): plain text = prompt with special tokens (BOS) + response + EOS; with ``chat=True`` or
      message lists, rendered with the chat template as a user turn and an assistant turn. Mask = response tokens.

    Args:
        example: from :func:`parse_sft_record`.
        tokenizer: a Hugging Face tokenizer.
        chat: render plain-text pairs with the chat template (``model.data.chat``). HH transcripts carry their own
            ``Human:``/``Assistant:`` markers and are only rendered that way if ``chat`` is set.

    Raises:
        ValueError: conversational data with a tokenizer without a chat template; a chat template that does not
            render prefixes of a conversation as prefixes of its rendering; an assistant turn first in the
            conversation (nothing to render before it); an empty prompt without BOS; a response with no tokens.
    """
    if example.messages is None:
        prompt, response = example.prompt, example.response
        if chat or isinstance(prompt, list) or isinstance(response, list):
            prompt = as_messages(prompt, "user")
            if isinstance(response, str):
                response = [{"role": "assistant", "content": response}]
            if not prompt:
                return _tokenize_chat(response, tokenizer)
        prompt_ids, response_ids = tokenize_prompt_response(prompt, response, tokenizer)
        return prompt_ids + response_ids, [0] * len(prompt_ids) + [1] * len(response_ids)
    return _tokenize_chat(example.messages, tokenizer)


def _tokenize_chat(messages: list[Message], tokenizer) -> tuple[list[int], list[int]]:
    require_chat_template(tokenizer, "the example is a chat (a list of messages)",
                          "a plain-text format such as {'input': str, 'output': str}")
    render = functools.partial(render_chat, tokenizer)
    full = render(messages, add_generation_prompt=False)
    pieces: list[tuple[str, int]] = []  # (text, is_target)
    cursor = 0
    for k, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        if k == 0:
            raise ValueError("the conversation starts with an assistant turn; put a system or user message first")
        start_text = render(messages[:k], add_generation_prompt=True)
        end_text = render(messages[: k + 1], add_generation_prompt=False)
        start = len(start_text)
        if not (full.startswith(end_text) and end_text.startswith(start_text) and cursor <= start):
            raise ValueError(
                f"the chat template does not render message {k} as a continuation of the messages before it, so "
                "the assistant tokens cannot be located; convert the data to {'prompt', 'response'} pairs"
            )
        pieces += [(full[cursor:start], 0), (full[start : len(end_text)], 1)]
        cursor = len(end_text)
    pieces.append((full[cursor:], 0))
    input_ids: list[int] = []
    loss_mask: list[int] = []
    for text, is_target in pieces:
        if not text:
            continue
        ids = encode(tokenizer, text, add_special_tokens=False)
        input_ids += ids
        loss_mask += [is_target] * len(ids)
    if sum(loss_mask) == 0:
        raise ValueError("the assistant turns give no tokens")
    return input_ids, loss_mask


def _check_truncation_args(max_seq_length: int, truncation: str, method: str) -> None:
    if truncation not in TRUNCATION_MODES:
        raise ConfigValueError(f"model.data.truncation must be one of {TRUNCATION_MODES}, got {truncation!r}")
    if method not in TRUNCATION_METHODS:
        raise ConfigValueError(f"truncation_method must be one of {TRUNCATION_METHODS}, got {method!r}")
    if max_seq_length < 2:
        raise ConfigValueError(f"max_seq_length must be at least 2 tokens, got {max_seq_length}")


def truncate_sequence(
    input_ids: list[int], loss_mask: list[int], max_seq_length: int, truncation: str = "truncate", method: str = "left"
) -> tuple[list[int], list[int]] | None:
    """Fit a tokenised example into ``max_seq_length`` tokens.

    A sequence that fits is returned unchanged. A longer one is, by ``truncation``:

    * ``"drop"``: None (the caller skips and counts it).
    * ``"truncate"`` with ``method="left"``: keep the LAST ``max_seq_length`` tokens (the start of the conversation
      goes first, the final assistant response survives; a leading BOS / system prompt can be lost).
    * ``"truncate"`` with ``method="right"``: keep the FIRST ``max_seq_length`` tokens (the end of the last
      response goes first, with its EOS / end-of-turn tokens).

    A truncated sequence left with no target token at positions ``1..`` (position 0 can never be a target) is
    dropped too (None).

    Example (M = 4): ids ``[p, p, r, r, r]`` mask ``[0, 0, 1, 1, 1]`` -> left: ``[p, r, r, r]``; right:
    ``[p, p, r, r]``.

    Raises:
        ValueError: unknown ``truncation`` / ``method``, ``max_seq_length < 2``, or mask and ids of different
            lengths.
    """
    _check_truncation_args(max_seq_length, truncation, method)
    if len(input_ids) != len(loss_mask):
        raise ValueError(f"loss_mask has {len(loss_mask)} entries for {len(input_ids)} tokens")
    if len(input_ids) <= max_seq_length:
        return input_ids, loss_mask
    if truncation == "drop":
        return None
    keep = slice(-max_seq_length, None) if method == "left" else slice(0, max_seq_length)
    input_ids, loss_mask = input_ids[keep], loss_mask[keep]
    if sum(loss_mask[1:]) == 0:
        return None
    return input_ids, loss_mask


# --------------------------------------------------------------------------------------
# Cached Arrow dataset
# --------------------------------------------------------------------------------------


def build_sft_dataset(
    path: str | os.PathLike,
    tokenizer,
    max_seq_length: int,
    truncation: str = "truncate",
    truncation_method: str = "left",
    chat: bool = False,
    cache_dir: str | os.PathLike | None = None,
) -> tuple[datasets.Dataset, dict]:
    """Tokenise an SFT JSON-lines file once into a cached, memory-mapped Arrow dataset.

    The file is streamed (:func:`~nemo_aligner.data.jsonl.iter_jsonl`, ``.gz`` allowed); each line goes through
    :func:`parse_sft_record`, :func:`tokenize_sft_example` and :func:`truncate_sequence`. Rows are written by
    :func:`~nemo_aligner.data.cache.build_cached_dataset` into a temporary directory under the cache and renamed to
    ``<cache_dir>/<file stem>-sft-<key>/`` once complete. ``key`` covers the file (absolute path, size, mtime), the
    tokenizer fingerprint, the settings and :data:`SFT_FORMAT_VERSION`.

    Columns (one row per kept example, in file order): ``input_ids`` int32 ``[L]``, ``loss_mask`` int8 ``[L]``
    (1 = assistant token), ``line_no`` int64 (1-based source line).

    Args:
        path: the data file.
        tokenizer: a Hugging Face tokenizer.
        max_seq_length: token limit per example (at least 2).
        truncation, truncation_method: see :func:`truncate_sequence`.
        chat: see :func:`tokenize_sft_example`.
        cache_dir: default :func:`nemo_aligner.data.cache.default_cache_dir`.

    Returns:
        ``(dataset, stats)``, ``stats`` = ``{"num_lines", "num_examples", "num_truncated", "num_dropped", "path",
        "cache_path"}`` (``num_dropped``: too long with ``truncation="drop"``, or no target left after truncating).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        DataFormatError: a malformed line (``file:line: field '...': ...``); nothing is left in the cache.
        ValueError: bad settings, or no example survives.
    """
    _check_truncation_args(max_seq_length, truncation, truncation_method)
    settings = {
        "max_seq_length": int(max_seq_length),
        "truncation": truncation,
        "truncation_method": truncation_method,
        "chat": bool(chat),
    }
    return build_tokenized_dataset(
        path,
        tokenizer,
        _generate_rows,
        settings,
        SFT_FORMAT_VERSION,
        kind="sft",
        dir_name="{stem}-sft-{key}",
        features=_FEATURES,
        counters=_STAT_COUNTERS,
        kept="num_examples",
        missing_message="SFT data file not found: {path}",
        empty_message="{path}: no SFT examples ({num_lines} records read, {num_dropped} dropped as longer than "
        f"max_seq_length={settings['max_seq_length']} or without a target token after truncation)",
        cache_dir=cache_dir,
    )


def _generate_rows(
    shard: int, num_shards: int, path: Path, tokenizer, max_seq_length: int, truncation: str, truncation_method: str, chat: bool
):
    """The rows (None for a dropped example) of the lines of ``path`` in ``shard``."""
    for line_no, record in iter_jsonl_shard(path, shard, num_shards):
        example = parse_sft_record(record, path, line_no)
        try:
            ids, mask = tokenize_sft_example(example, tokenizer, chat=chat)
        except ValueError as err:
            raise DataFormatError(path, line_no, None, str(err)) from err
        kept = truncate_sequence(ids, mask, max_seq_length, truncation, truncation_method)
        if kept is None:
            yield None
            continue
        yield {"input_ids": kept[0], "loss_mask": kept[1], "line_no": line_no, "truncated": len(kept[0]) != len(ids)}


def load_sft_datasets(
    paths: list[str | os.PathLike], tokenizer, max_seq_length: int, **kwargs: Any
) -> tuple[datasets.Dataset, list[dict]]:
    """:func:`build_sft_dataset` for each file (keyword arguments passed on), concatenated in order.

    Returns:
        ``(dataset, stats)``: all rows (``line_no`` refers to each row's own file) and the per-file stats.

    Raises:
        ValueError: ``paths`` is empty; plus everything :func:`build_sft_dataset` raises.
    """
    build = functools.partial(build_sft_dataset, tokenizer=tokenizer, max_seq_length=max_seq_length, **kwargs)
    return concatenate_files(paths, build, "SFT")
