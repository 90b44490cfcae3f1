"""Reward-model data: comparisons of two or more responses to one prompt, tokenised once into an Arrow cache.

Accepted JSON-lines formats (detected per record):

* NeMo-RLHF text pairs: ``{"text": prompt + response}`` on consecutive records, the chosen one first (records
  ``2k`` and ``2k+1``, counting from 0, are a pair). Each text is tokenised whole (BOS if the tokenizer adds one,
  EOS appended); the shared leading tokens of the two are the prompt (used only for truncation).
* llm-on-ray: ``{"instruction": str, "chosen": str, "rejected": str}`` (``instruction`` is the prompt).
* Every DPO format of :func:`nemo_aligner.data.preference.parse_preference_record`, raw Anthropic HH-RLHF
  transcripts included.
* Ranked lists: ``{"prompt": str | [messages], "responses": [r_0, ..., r_{K-1}], "ranking": [...]}`` where
  ``ranking[i]`` is the rank of ``responses[i]`` (smaller is better, 0 = best, equal ranks are ties), or
  ``"scores": [...]`` (larger is better). ``K >= 2`` and at least two responses must differ in rank/score; ranks
  and scores are finite numbers within float32 range, and two identical responses may not differ in rank/score.

Chat messages must have a role of system, user or assistant (:func:`nemo_aligner.data.chat.check_messages`),
and the two responses of a pair must differ (the ``text`` pair at the token level, the other formats as texts).

Every example becomes one row ``{"prompt_ids", "response_ids": [[...] * K], "preferences": [K floats, larger is
better], "line_no"}``; a pair is ``K = 2`` with preferences ``[1, 0]`` (chosen first). Tokenisation follows
:func:`nemo_aligner.data.preference.tokenize_example`; truncation follows
:func:`nemo_aligner.data.preference.truncate_pair` with the longest of the ``K`` responses. Batches of these rows are
laid out by :func:`nemo_aligner.data.reward_batch.collate_reward_examples`.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any, Sequence

import datasets

from nemo_aligner.data.cache import build_tokenized_dataset, concatenate_files
from nemo_aligner.data.chat import check_turns, encode, finite_number, require_turns, tokenize_prompt_response
from nemo_aligner.data.jsonl import DataFormatError, iter_jsonl
from nemo_aligner.data.preference import check_truncation_args, parse_preference_record, tokenize_example, truncate_pair

REWARD_FORMAT_VERSION = 2
"""Bump whenever the reward-data row layout or its tokenisation rules change (invalidates caches).
2: chat roles are lower-cased."""

FEATURES = datasets.Features(
    {
        "prompt_ids": datasets.Sequence(datasets.Value("int32")),
        "response_ids": datasets.Sequence(datasets.Sequence(datasets.Value("int32"))),
        "preferences": datasets.Sequence(datasets.Value("float32")),
        "line_no": datasets.Value("int64"),
    }
)

_COUNTERS = ("num_lines", "num_examples", "num_comparisons", "num_truncated", "num_dropped")


# --------------------------------------------------------------------------------------
# Parsing and tokenisation of one example
# --------------------------------------------------------------------------------------


def _as_data_error(path, line_no: int, field: str | None):
    """Context manager turning a tokenisation ``ValueError`` into a located :class:`DataFormatError`."""

    class _Ctx:
        def __enter__(self):
            return self

        def __exit__(self, kind, err, tb):
            if kind is not None and issubclass(kind, ValueError) and not issubclass(kind, DataFormatError):
                raise DataFormatError(path, line_no, field, str(err)) from err
            return False

    return _Ctx()


def _tokenize_text(text: str, tokenizer) -> list[int]:
    ids = encode(tokenizer, text, add_special_tokens=True)
    if tokenizer.eos_token_id is not None:
        ids.append(int(tokenizer.eos_token_id))
    return ids


def tokenize_text_pair(chosen: str, rejected: str, tokenizer, path="<memory>", line_no: int = 0) -> tuple[list[int], list[list[int]]]:
    """Tokenise a NeMo-RLHF ``{"text"}`` pair: ``(prompt_ids, [chosen_ids, rejected_ids])``.

    Each full text is tokenised with special tokens plus EOS; ``prompt_ids`` is their longest common token prefix
    (at most all but one token of the shorter one, so each response keeps at least one token), the responses are
    the rest.

    Raises:
        DataFormatError: (field ``text``, at ``line_no`` = the rejected record) the two texts tokenise identically.
    """
    a, b = _tokenize_text(chosen, tokenizer), _tokenize_text(rejected, tokenizer)
    if a == b:
        raise DataFormatError(path, line_no, "text", "chosen and rejected texts of this pair are identical")
    shared = 0
    limit = min(len(a), len(b)) - 1
    while shared < limit and a[shared] == b[shared]:
        shared += 1
    return a[:shared], [a[shared:], b[shared:]]


def tokenize_ranked(prompt, responses: Sequence, tokenizer, path="<memory>", line_no: int = 0) -> tuple[list[int], list[list[int]]]:
    """Tokenise one prompt with ``K`` responses: ``(prompt_ids, [response_ids] * K)`` with the rules of
    :func:`~nemo_aligner.data.chat.tokenize_prompt_response` (chat template for message lists).

    Raises:
        DataFormatError: a response that gives no tokens, or chat data without a chat template.
    """
    out, prompt_ids = [], None
    for k, response in enumerate(responses):
        with _as_data_error(path, line_no, f"responses[{k}]"):
            p, r = tokenize_prompt_response(prompt, response, tokenizer)
        prompt_ids = p if prompt_ids is None else prompt_ids
        out.append(list(r))
    return list(prompt_ids), out


def _parse_ranked(record: dict, error) -> tuple[Any, list, list[float]]:
    """``(prompt, responses, preferences)`` of a ranked-list record (preferences: larger is better)."""
    prompt = require_turns(record, "prompt", error, allow_empty=True)
    responses = record["responses"]
    if not isinstance(responses, list) or len(responses) < 2:
        raise error("responses", f"expected a list of at least 2 responses, got {responses!r:.80}")
    responses = [check_turns(response, f"responses[{k}]", error) for k, response in enumerate(responses)]
    has_rank, has_scores = "ranking" in record, "scores" in record
    if has_rank == has_scores:
        raise error(None, "a 'responses' record needs exactly one of 'ranking' (smaller is better) or 'scores' (larger is better)")
    field = "ranking" if has_rank else "scores"
    values = record[field]
    if not isinstance(values, list) or len(values) != len(responses):
        raise error(field, f"expected a list of {len(responses)} numbers (one per response), got {values!r:.80}")
    numbers = [finite_number(v, f"{field}[{i}]", error) for i, v in enumerate(values)]
    for i, v in enumerate(numbers):
        if has_rank and not v.is_integer():
            raise error(f"{field}[{i}]", f"ranks are integers, got {values[i]!r}")
    preferences = [-v for v in numbers] if has_rank else numbers
    if len(set(preferences)) < 2:
        raise error(field, "all responses are tied: nothing to compare")
    for k, response in enumerate(responses):
        for j in range(k):
            if responses[j] == response and preferences[j] != preferences[k]:
                raise error(
                    f"responses[{k}]",
                    f"identical to responses[{j}] but given a different {'rank' if has_rank else 'score'}: "
                    "a comparison must be between different responses",
                )
    return prompt, responses, preferences


def truncate_responses(
    prompt_ids: list[int], responses: list[list[int]], max_seq_length: int, mode: str
) -> tuple[list[int], list[list[int]]] | None:
    """Fit prompt + each response into ``max_seq_length`` tokens: the rule of
    :func:`~nemo_aligner.data.preference.truncate_pair` applied with the longest response (left-truncate the
    prompt, keeping at least ``max_seq_length // 2`` of it if needed, then cut each response at its end).

    Returns:
        ``(prompt_ids, responses)`` (unchanged when everything fits) or None (``mode="drop"`` and too long).

    Raises:
        ValueError: unknown ``mode`` or ``max_seq_length < 2``.
    """
    longest = max(responses, key=len)
    kept = truncate_pair(prompt_ids, longest, longest, max_seq_length, mode)
    if kept is None:
        return None
    prompt = kept[0]
    budget = max_seq_length - len(prompt)
    return prompt, [r[:budget] for r in responses]


def _example_row(prompt_ids, responses, preferences, line_no, max_seq_length, truncation) -> dict | None:
    kept = truncate_responses(prompt_ids, responses, max_seq_length, truncation)
    if kept is None:
        return None
    return {
        "prompt_ids": kept[0],
        "response_ids": kept[1],
        "preferences": preferences,
        "line_no": line_no,
        "truncated": kept != (prompt_ids, responses),
    }


def iter_reward_rows(path: str | os.PathLike, tokenizer, max_seq_length: int, truncation: str = "truncate"):
    """Stream the rows of a reward-model data file (see the module docstring), each with a ``truncated`` flag;
    ``None`` is yielded for a dropped example (so callers can count it).

    Raises:
        FileNotFoundError: no such file.
        DataFormatError: ``file:line: field '...': message`` for a malformed record, an unpaired ``text``
            record, or a ``text`` record mixed into a pair of another format.
    """
    path = Path(path)
    pending: tuple[int, str] | None = None  # first (chosen) "text" record awaiting its partner
    for line_no, record in iter_jsonl(path):
        error = functools.partial(DataFormatError, path, line_no)
        if "text" in record:
            text = record["text"]
            if not isinstance(text, str) or not text:
                raise error("text", f"expected a non-empty string, got {text!r:.80}")
            if pending is None:
                pending = (line_no, text)
                continue
            first_line, chosen = pending
            pending = None
            prompt_ids, responses = tokenize_text_pair(chosen, text, tokenizer, path, line_no)
            yield _example_row(prompt_ids, responses, [1.0, 0.0], first_line, max_seq_length, truncation)
            continue
        if pending is not None:
            raise error(
                None,
                f"expected the 'text' record pairing with line {pending[0]} (NeMo-RLHF format: chosen and rejected "
                f"'text' records alternate), got a record with keys {sorted(record)}",
            )
        if "responses" in record:
            prompt, responses, preferences = _parse_ranked(record, error)
            prompt_ids, response_ids = tokenize_ranked(prompt, responses, tokenizer, path, line_no)
            yield _example_row(prompt_ids, response_ids, preferences, line_no, max_seq_length, truncation)
            continue
        if "instruction" in record:
            if not isinstance(record["instruction"], str):
                raise error("instruction", f"expected a string, got {type(record['instruction']).__name__}")
            record = {"prompt": record["instruction"], **{k: v for k, v in record.items() if k != "instruction"}}
        example = parse_preference_record(record, path, line_no)
        with _as_data_error(path, line_no, None):
            prompt_ids, chosen_ids, rejected_ids = tokenize_example(example, tokenizer)
        yield _example_row(prompt_ids, [chosen_ids, rejected_ids], [1.0, 0.0], line_no, max_seq_length, truncation)
    if pending is not None:
        raise DataFormatError(
            path, pending[0], "text", "this chosen 'text' record has no rejected partner (odd number of 'text' records)"
        )


# --------------------------------------------------------------------------------------
# Arrow cache
# --------------------------------------------------------------------------------------


def build_reward_dataset(
    path: str | os.PathLike,
    tokenizer,
    max_seq_length: int,
    truncation: str = "truncate",
    cache_dir: str | os.PathLike | None = None,
) -> tuple[datasets.Dataset, dict]:
    """Tokenise a reward-model JSON-lines file once into a memory-mapped Arrow dataset (cached).

    Streams the file through :func:`iter_reward_rows` into ``<cache_dir>/rm-<file stem>-<key>/`` with
    :func:`~nemo_aligner.data.cache.build_cached_dataset`, via a temporary directory renamed into place when
    complete (``key`` covers the file's path/size/mtime, the tokenizer, ``max_seq_length``, ``truncation`` and
    :data:`REWARD_FORMAT_VERSION`); later calls load it.

    Returns:
        ``(dataset, stats)``: columns ``prompt_ids`` (int32), ``response_ids`` (K lists of int32),
        ``preferences`` (K float32, larger is better), ``line_no`` (int64, line of the example's first record);
        ``stats`` = ``{"num_lines", "num_examples", "num_comparisons" (ordered response pairs), "num_truncated",
        "num_dropped", "path", "cache_path"}``.

    Raises:
        FileNotFoundError: no such file. DataFormatError: a malformed line (no cache is left behind).
        ValueError: bad ``truncation``/``max_seq_length``, or no example survives.
    """
    check_truncation_args(max_seq_length, truncation)
    settings = {"max_seq_length": max_seq_length, "truncation": truncation}
    return build_tokenized_dataset(
        path,
        tokenizer,
        _generate_rows,
        settings,
        REWARD_FORMAT_VERSION,
        kind="reward",
        dir_name="rm-{stem}-{key}",
        features=FEATURES,
        counters=_COUNTERS,
        kept="num_examples",
        extra_counts=_count_comparisons,
        missing_message="reward-model data file not found: {path}",
        empty_message="{path}: no reward-model examples ({num_lines} read, {num_dropped} dropped as longer than "
        f"max_seq_length={max_seq_length})",
        cache_dir=cache_dir,
    )


def _generate_rows(shard: int, num_shards: int, path: Path, tokenizer, max_seq_length: int, truncation: str):
    """:func:`iter_reward_rows` of the whole file (one shard only: NeMo-RLHF pairs span two lines)."""
    if num_shards != 1:
        raise ValueError("reward-model data is read by one process (NeMo-RLHF 'text' pairs span two lines)")
    yield from iter_reward_rows(path, tokenizer, max_seq_length, truncation)


def _count_comparisons(row: dict) -> dict:
    """``num_comparisons`` of a row: its ordered pairs of responses with different preferences."""
    prefs = row["preferences"]
    return {"num_comparisons": sum(a > b for a in prefs for b in prefs)}


def load_reward_datasets(
    paths: list[str | os.PathLike],
    tokenizer,
    max_seq_length: int,
    truncation: str = "truncate",
    cache_dir: str | os.PathLike | None = None,
) -> tuple[datasets.Dataset, list[dict]]:
    """:func:`build_reward_dataset` for each file, concatenated; returns ``(dataset, per-file stats)``.

    Raises:
        ValueError: ``paths`` is empty; plus everything :func:`build_reward_dataset` raises.
    """
    build = functools.partial(build_reward_dataset, tokenizer=tokenizer, max_seq_length=max_seq_length,
                              truncation=truncation, cache_dir=cache_dir)
    return concatenate_files(paths, build, "reward-model")
