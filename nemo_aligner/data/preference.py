"""Preference-pair data (DPO, IPO, RPO, reward models): parsing, tokenisation, truncation, caching.

Pipeline for one JSON-lines file::

    iter_jsonl -> parse_preference_record -> tokenize_example -> truncate_pair

``build_preference_dataset`` runs it once over the whole file (streaming) and stores
the token ids as a memory-mapped Arrow dataset in a cache directory, so later runs
with the same file, tokenizer and length settings load it without re-tokenising.
"""

from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass
from pathlib import Path

import datasets

from nemo_aligner.data.cache import build_tokenized_dataset, concatenate_files, iter_jsonl_shard
from nemo_aligner.data.chat import HH_ASSISTANT, Turns, finite_number, require_turns, split_hh_transcript, tokenize_pair
from nemo_aligner.data.jsonl import DataFormatError
from nemo_aligner.utils.config import ConfigValueError

FORMAT_VERSION = 2
"""Bump whenever the cached dataset layout or the tokenisation rules change (2: chat roles are lower-cased)."""

TRUNCATION_MODES = ("truncate", "drop")

IDENTICAL_PAIR = "identical to the chosen response: a preference pair must compare two different responses"

ACCEPTED_FORMATS = (
    "NeMo-Aligner: {'prompt': str, 'chosen_response': str, 'rejected_response': str}"
    " (+ optional numeric 'chosen_reward', 'rejected_reward')",
    "TRL explicit prompt: {'prompt', 'chosen', 'rejected'}, each a string or a list of chat messages",
    "TRL implicit prompt: {'chosen': [messages], 'rejected': [messages]}"
    " (prompt = longest common prefix of the two lists)",
    "Anthropic HH-RLHF: {'chosen': str, 'rejected': str}, full '\\n\\nHuman: ...\\n\\nAssistant: ...' transcripts",
)

_FEATURES = datasets.Features(
    {
        "prompt_ids": datasets.Sequence(datasets.Value("int32")),
        "chosen_ids": datasets.Sequence(datasets.Value("int32")),
        "rejected_ids": datasets.Sequence(datasets.Value("int32")),
        "chosen_reward": datasets.Value("float32"),
        "rejected_reward": datasets.Value("float32"),
        "line_no": datasets.Value("int64"),
    }
)

_STAT_COUNTERS = ("num_lines", "num_pairs", "num_truncated", "num_dropped")


@dataclass
class PreferenceExample:
    """One preference pair, before tokenisation.

    Attributes:
        prompt: plain text, or the chat messages preceding the responses (possibly multi-turn).
        chosen: the preferred response: plain text, or the assistant message(s) that follow ``prompt``.
        rejected: the dispreferred response, same kinds as ``chosen``.
        chosen_reward: optional scalar reward of ``chosen`` (None when the data has none).
        rejected_reward: optional scalar reward of ``rejected``.
    """

    prompt: Turns
    chosen: Turns
    rejected: Turns
    chosen_reward: float | None = None
    rejected_reward: float | None = None


# --------------------------------------------------------------------------------------
# Parsing
# --------------------------------------------------------------------------------------


def parse_preference_record(record: dict, path: str | os.PathLike, line_no: int) -> PreferenceExample:
    """Turn one JSON record into a :class:`PreferenceExample`, whatever its (supported) format.

    Supported formats (detected from the keys, in this order):

    * NeMo-Aligner: ``{"prompt": str, "chosen_response": str, "rejected_response": str}``.
    * TRL explicit prompt: ``{"prompt", "chosen", "rejected"}``, each a string or a list of
      ``{"role", "content"}`` messages (``chosen``/``rejected`` being the assistant turn(s)).
    * TRL implicit prompt: ``{"chosen": [messages], "rejected": [messages]}``; the prompt is the
      longest common prefix of the two lists, the responses are the remaining messages.
    * Anthropic HH-RLHF: ``{"chosen": str, "rejected": str}`` full transcripts, split at the last
      ``"\\n\\nAssistant:"``; the prompt keeps that marker, the response keeps its leading space.

    Any format may carry optional numeric ``chosen_reward`` / ``rejected_reward``.

    Args:
        record: the parsed JSON object.
        path, line_no: where the record comes from; used only in error messages.

    Raises:
        DataFormatError: naming the offending field, for a missing field, a wrong type, an empty
            response, a message without string ``role``/``content`` or with a role outside
            :data:`~nemo_aligner.data.chat.CHAT_ROLES`, a reward that is not a finite number within float32 range (NaN, inf,
            an integer too large for a float), ``rejected`` identical to ``chosen``, HH-RLHF transcripts
            without an assistant turn or whose prompts differ, or an unknown format (the message then
            lists the accepted formats).
    """
    error = functools.partial(DataFormatError, path, line_no)
    if not isinstance(record, dict):
        raise error(None, f"expected a JSON object, got {type(record).__name__}")

    if "chosen_response" in record or "rejected_response" in record:
        prompt = require_turns(record, "prompt", error, allow_messages=False, allow_empty=True)
        chosen = require_turns(record, "chosen_response", error, allow_messages=False)
        rejected = require_turns(record, "rejected_response", error, allow_messages=False)
    elif "prompt" in record:
        prompt = require_turns(record, "prompt", error, allow_empty=True)
        chosen = require_turns(record, "chosen", error)
        rejected = require_turns(record, "rejected", error)
    elif "chosen" in record or "rejected" in record:
        prompt, chosen, rejected = _split_implicit_prompt(record, error)
    else:
        accepted = "".join(f"\n  - {fmt}" for fmt in ACCEPTED_FORMATS)
        raise error(None, f"unrecognised preference record with keys {sorted(record)}; accepted formats:{accepted}")
    if chosen == rejected:
        raise error("rejected_response" if "rejected_response" in record else "rejected", IDENTICAL_PAIR)

    return PreferenceExample(
        prompt=prompt,
        chosen=chosen,
        rejected=rejected,
        chosen_reward=_optional_reward(record, "chosen_reward", error),
        rejected_reward=_optional_reward(record, "rejected_reward", error),
    )


def _split_implicit_prompt(record: dict, error) -> tuple[Turns, Turns, Turns]:
    """Split ``chosen``/``rejected`` (without an explicit prompt) into (prompt, chosen, rejected)."""
    chosen = require_turns(record, "chosen", error)
    rejected = require_turns(record, "rejected", error)
    if chosen == rejected:
        raise error("rejected", IDENTICAL_PAIR)
    if isinstance(chosen, str) and isinstance(rejected, str):
        return _split_hh_pair(chosen, rejected, error)
    if isinstance(chosen, list) and isinstance(rejected, list):
        return _split_common_prefix(chosen, rejected, error)
    raise error(
        "rejected",
        f"is a {type(rejected).__name__} but 'chosen' is a {type(chosen).__name__}; without a 'prompt' field both "
        "must be strings (HH-RLHF transcripts) or both message lists (TRL implicit prompt)",
    )


def _split_hh_pair(chosen: str, rejected: str, error) -> tuple[str, str, str]:
    """Split two HH-RLHF transcripts into (shared prompt, chosen response, rejected response).

    Normally both split at their last ``"\n\nAssistant:"`` into the same prompt. A few HH-RLHF responses contain
    the marker themselves (e.g. ``"Assistant: Human: ..."`` role-play), which makes the two last-marker prompts
    differ; then the prompt is the longest common prefix of the two transcripts cut back to the last marker inside
    it, and each response is the rest of its transcript.
    """
    chosen_prompt, chosen_response = split_hh_transcript(chosen, "chosen", error)
    rejected_prompt, rejected_response = split_hh_transcript(rejected, "rejected", error)
    if chosen_prompt == rejected_prompt:
        return chosen_prompt, chosen_response, rejected_response
    common = os.path.commonprefix([chosen, rejected])
    cut = common.rfind(HH_ASSISTANT)
    if cut < 0:
        raise error(
            "rejected",
            f"HH-RLHF transcripts of 'chosen' and 'rejected' share no conversation up to an {HH_ASSISTANT!r} turn "
            f"(they differ from character {len(common)}); both must continue the same conversation",
        )
    cut += len(HH_ASSISTANT)
    if cut == len(chosen) or cut == len(rejected):
        raise error("chosen" if cut == len(chosen) else "rejected", f"empty response after the shared {HH_ASSISTANT!r}")
    return chosen[:cut], chosen[cut:], rejected[cut:]


def _split_common_prefix(chosen: list, rejected: list, error) -> tuple[list, list, list]:
    shared = 0
    while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
        shared += 1
    if shared == 0:
        raise error(
            "chosen",
            "'chosen' and 'rejected' share no leading messages, so no prompt can be inferred; add a 'prompt' field",
        )
    for field, messages in (("chosen", chosen), ("rejected", rejected)):
        if shared == len(messages):
            raise error(field, "no messages left after the prompt (the common prefix of 'chosen' and 'rejected')")
    return chosen[:shared], chosen[shared:], rejected[shared:]


def _optional_reward(record: dict, field: str, error) -> float | None:
    value = record.get(field)
    if value is None:
        return None
    return finite_number(value, field, error)


# --------------------------------------------------------------------------------------
# Tokenisation and truncation
# --------------------------------------------------------------------------------------


def tokenize_example(example: PreferenceExample, tokenizer) -> tuple[list[int], list[int], list[int]]:
    """Tokenise a pair into ``(prompt_ids, chosen_ids, rejected_ids)`` (token ids, unpadded) with the rules of
    :func:`nemo_aligner.data.chat.tokenize_pair`: the chat template for conversational data (any of prompt, chosen,
    rejected a message list), else BOS on the prompt and EOS after each response.

    Raises:
        ValueError: conversational data with a tokenizer that has no chat template; a prompt that
            gives no tokens (empty prompt and no BOS); a response that gives no tokens.
    """
    return tokenize_pair(example.prompt, example.chosen, example.rejected, tokenizer)


def check_truncation_args(max_seq_length: int, mode: str) -> None:
    """Check the arguments of :func:`truncate_pair` (also those of the reward-model data, which truncates the same
    way).

    Raises:
        ValueError: ``mode`` not in :data:`TRUNCATION_MODES`, or ``max_seq_length < 2``.
    """
    if mode not in TRUNCATION_MODES:
        raise ConfigValueError(f"truncation mode must be one of {TRUNCATION_MODES}, got {mode!r}")
    if max_seq_length < 2:
        raise ConfigValueError(f"max_seq_length must be at least 2 tokens, got {max_seq_length}")


def truncate_pair(
    prompt_ids: list[int], chosen_ids: list[int], rejected_ids: list[int], max_seq_length: int, mode: str
) -> tuple[list[int], list[int], list[int]] | None:
    """Fit a tokenised pair so that prompt+chosen and prompt+rejected each have <= ``max_seq_length`` tokens.

    A pair that already fits is returned unchanged. Otherwise, with ``mode``:

    * ``"drop"``: return None (the caller skips the pair).
    * ``"truncate"``: let ``L = max(len(chosen_ids), len(rejected_ids))`` and ``M = max_seq_length``.
      If ``M - L >= M // 2``, keep the LAST ``M - L`` prompt tokens and both responses whole.
      Otherwise keep the last ``M // 2`` prompt tokens (all of them if the prompt is shorter) and
      cut each response at its end to ``M - len(kept prompt)`` tokens. Left-truncating the prompt
      keeps the turn closest to the responses; it can remove a leading BOS, and cutting a
      response can remove its EOS / end-of-turn tokens.

    Example (M = 8): prompt 6, chosen 3, rejected 2 -> prompt's last 5, responses whole;
    prompt 6, chosen 7, rejected 2 -> prompt's last 4, chosen's first 4, rejected whole.

    Args:
        prompt_ids, chosen_ids, rejected_ids: token ids.
        max_seq_length: the limit per side, in tokens (at least 2).
        mode: ``"truncate"`` or ``"drop"``.

    Returns:
        ``(prompt_ids, chosen_ids, rejected_ids)`` or None (dropped).

    Raises:
        ValueError: unknown ``mode`` or ``max_seq_length < 2``.
    """
    check_truncation_args(max_seq_length, mode)
    longest = max(len(chosen_ids), len(rejected_ids))
    if len(prompt_ids) + longest <= max_seq_length:
        return prompt_ids, chosen_ids, rejected_ids
    if mode == "drop":
        return None
    prompt_budget = max_seq_length - longest
    if prompt_budget >= max_seq_length // 2:
        return prompt_ids[-prompt_budget:], chosen_ids, rejected_ids
    kept_prompt = prompt_ids[-(max_seq_length // 2) :]
    response_budget = max_seq_length - len(kept_prompt)
    return kept_prompt, chosen_ids[:response_budget], rejected_ids[:response_budget]


# --------------------------------------------------------------------------------------
# Cached Arrow dataset
# --------------------------------------------------------------------------------------


def build_preference_dataset(
    path: str | os.PathLike,
    tokenizer,
    max_seq_length: int,
    truncation: str = "truncate",
    cache_dir: str | os.PathLike | None = None,
    num_proc: int | None = None,
) -> tuple[datasets.Dataset, dict]:
    """Tokenise a preference JSON-lines file once into a cached, memory-mapped Arrow dataset.

    The file is streamed line by line (never held in memory), each line goes through
    :func:`parse_preference_record`, :func:`tokenize_example` and :func:`truncate_pair`, and the
    rows are written to ``<cache_dir>/<file stem>-<key>/`` by
    :func:`~nemo_aligner.data.cache.build_cached_dataset` (through a temporary directory that is
    renamed into place only once complete). ``key`` (16 hex chars of a sha256) covers the absolute
    path, size and mtime of the file, the tokenizer (name, vocabulary size, chat template, BOS/EOS
    ids, ids of a probe sentence), ``max_seq_length``, ``truncation`` and :data:`FORMAT_VERSION`;
    a later call with the same inputs loads the directory with ``datasets.load_from_disk``.

    Columns (one row per kept pair, in file order):
        ``prompt_ids``, ``chosen_ids``, ``rejected_ids``: int32 token id sequences;
        ``chosen_reward``, ``rejected_reward``: float32, NaN when the data has none;
        ``line_no``: int64, 1-based line of the pair in the source file.

    Args:
        path: ``.jsonl`` / ``.jsonl.gz`` file in one of the formats of :func:`parse_preference_record`.
        tokenizer: a Hugging Face tokenizer (see :func:`tokenize_example`).
        max_seq_length: limit in tokens for prompt+chosen and for prompt+rejected.
        truncation: ``"truncate"`` or ``"drop"`` (see :func:`truncate_pair`).
        cache_dir: where cached datasets live; default :func:`~nemo_aligner.data.cache.default_cache_dir`.
        num_proc: tokenise with this many processes (each reads the file, keeps every
            ``num_proc``-th line); None or 1 for a single process.

    Returns:
        ``(dataset, stats)`` with ``stats`` = ``{"num_lines": records read, "num_pairs": rows,
        "num_truncated": rows shortened, "num_dropped": pairs skipped as too long, "path": source
        file, "cache_path": dataset directory}`` (also saved as ``stats.json`` in that directory).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        DataFormatError: a malformed line (``file:line: field '...': ...``); no cache is left behind.
        ValueError: bad ``truncation``/``max_seq_length``, or the file yields no pair at all.
    """
    check_truncation_args(max_seq_length, truncation)
    settings = {"max_seq_length": max_seq_length, "truncation": truncation}
    return build_tokenized_dataset(
        path,
        tokenizer,
        _generate_rows,
        settings,
        FORMAT_VERSION,
        kind="preference",
        dir_name="{stem}-{key}",
        features=_FEATURES,
        counters=_STAT_COUNTERS,
        kept="num_pairs",
        missing_message="preference data file not found: {path}",
        empty_message="{path}: no preference pairs ({num_lines} records read, {num_dropped} dropped as longer than "
        f"max_seq_length={max_seq_length})",
        cache_dir=cache_dir,
        num_proc=num_proc,
    )


def _generate_rows(shard: int, num_shards: int, path: Path, tokenizer, max_seq_length: int, truncation: str):
    """The rows (None for a dropped pair) of the lines of ``path`` in ``shard``."""
    for line_no, record in iter_jsonl_shard(path, shard, num_shards):
        yield _tokenize_row(record, path, line_no, tokenizer, max_seq_length, truncation)


def _tokenize_row(record: dict, path, line_no: int, tokenizer, max_seq_length: int, truncation: str) -> dict | None:
    """One dataset row (plus a ``truncated`` flag) for a record, or None when the pair is dropped."""
    example = parse_preference_record(record, path, line_no)
    try:
        token_ids = tokenize_example(example, tokenizer)
    except ValueError as err:
        raise DataFormatError(path, line_no, None, str(err)) from err
    kept = truncate_pair(*token_ids, max_seq_length, truncation)
    if kept is None:
        return None
    prompt_ids, chosen_ids, rejected_ids = kept
    return {
        "prompt_ids": prompt_ids,
        "chosen_ids": chosen_ids,
        "rejected_ids": rejected_ids,
        "chosen_reward": _reward_or_nan(example.chosen_reward),
        "rejected_reward": _reward_or_nan(example.rejected_reward),
        "line_no": line_no,
        "truncated": kept != token_ids,
    }


def _reward_or_nan(reward: float | None) -> float:
    return math.nan if reward is None else reward


def load_preference_datasets(
    paths: list[str | os.PathLike],
    tokenizer,
    max_seq_length: int,
    truncation: str = "truncate",
    cache_dir: str | os.PathLike | None = None,
    num_proc: int | None = None,
) -> tuple[datasets.Dataset, list[dict]]:
    """Build (or load from cache) one dataset per file with :func:`build_preference_dataset` and concatenate them.

    Returns:
        ``(dataset, stats)``: the rows of all files in order (``line_no`` refers to each row's own
        file), and the per-file stats dicts in the order of ``paths``.

    Raises:
        ValueError: ``paths`` is empty; plus everything :func:`build_preference_dataset` raises.
    """
    build = functools.partial(build_preference_dataset, tokenizer=tokenizer, max_seq_length=max_seq_length,
                              truncation=truncation, cache_dir=cache_dir, num_proc=num_proc)
    return concatenate_files(paths, build, "preference")
