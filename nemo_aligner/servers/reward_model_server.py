"""The reward-model inference server: an HTTP API in front of a reward scorer, with dynamic batching.

API (JSON; errors are ``{"error": "<message>"}``):

* ``POST /score`` with ``{"prompts": [...], "responses": [...]}`` (each entry a string or a list of chat messages)
  or ``{"token_ids": [[int, ...], ...]}`` -> ``{"rewards": [float, ...]}``, one per item, in order.
* ``GET /health`` -> ``{"status": "ok"}`` (no token needed).
* ``GET /info`` -> ``model_name``, ``max_seq_length``, ``micro_batch_size``, ``max_wait_ms``,
  ``max_items_per_request``, ``max_request_bytes``, ``max_chars_per_item`` (the text length answered 422 without
  tokenising, None when the tokenizer allows no bound), ``vocab_size``, ``reward_standardization`` (the scorer's mean/std) and the batching
  ``counters``.

Status codes: 400 malformed or too deeply nested JSON; 401 missing/wrong bearer token; 408 body not received in
time; 413 body too large; 415 a body that is not ``application/json``; 422 wrong/missing/unknown fields, wrong
types, a chat role other than ``system``/``user``/``assistant``, empty lists, token ids outside the vocabulary, or an
item longer than ``max_seq_length`` (the message names the item index); 500 the model failed (only the requests of
that micro-batch).

Items of concurrent requests are gathered by :class:`~nemo_aligner.servers.batching.DynamicBatcher` into
micro-batches of ``micro_batch_size``; texts are tokenised in one separate thread (tokenizers are not thread-safe),
one item at a time, so tokenising the next request overlaps the model's forward pass and one request with many
items cannot hold the tokeniser while a concurrent small request waits.

Length check before tokenising: a text item whose characters cannot fit in ``max_seq_length`` tokens is answered
422 without being tokenised (:func:`max_chars_per_token`), so a huge prompt costs a ``len()``, not seconds of
tokenisation in the thread every other request needs.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import math
from typing import Any, Protocol, Sequence

from fastapi import Request

from nemo_aligner.data.chat import CHAT_ROLES, canonical_role
from nemo_aligner.servers.app import (
    DEFAULT_MAX_REQUEST_BYTES,
    APIError,
    ServerLimits,
    add_health_and_info,
    create_app,
    read_json,
)
from nemo_aligner.servers.batching import DynamicBatcher

__all__ = [
    "DEFAULT_MAX_ITEMS_PER_REQUEST",
    "RewardScorerLike",
    "build_reward_model_app",
    "default_max_request_bytes",
    "max_chars_per_token",
]

DEFAULT_MAX_ITEMS_PER_REQUEST = 1024
#: Body bytes budgeted per token by :func:`default_max_request_bytes`.
BYTES_PER_TOKEN = 16
_MIN_DEFAULT_REQUEST_BYTES = 1024 * 1024
_TEXT_FIELDS = {"prompts", "responses"}
_ALL_FIELDS = _TEXT_FIELDS | {"token_ids"}
#: The most code points that Unicode canonical composition (NFC/NFKC) merges into one: the longest full canonical
#: decomposition, ``max(len(unicodedata.normalize("NFD", chr(c))))`` over all code points, is 4 (e.g. U+1F82).
_MAX_COMPOSED = 4
_SAFE_PRE_TOKENIZERS = {"ByteLevel", "Metaspace", "Digits", "UnicodeScripts", "Split", "Punctuation", "Sequence"}


def _normalizer_shrink(spec: dict | None) -> float | None:
    """By how much a tokenizers-library normalizer can shrink a text's character count at most (1 = never), or
    None when it can delete characters without bound (e.g. ``StripAccents``, a regex ``Replace``, ``Precompiled``)."""
    if spec is None:
        return 1.0
    kind = spec.get("type")
    if kind == "Sequence":
        factor = 1.0
        for child in spec.get("normalizers", []):
            child_factor = _normalizer_shrink(child)
            if child_factor is None:
                return None
            factor *= child_factor
        return factor
    if kind in ("NFD", "NFKD", "Lowercase", "Prepend", "Strip"):  # Strip: texts are counted stripped
        return 1.0
    if kind in ("NFC", "NFKC"):
        return float(_MAX_COMPOSED)
    if kind == "Replace":
        pattern, content = spec.get("pattern", {}).get("String"), spec.get("content", "")
        if pattern is None or not content:
            return None
        return max(1.0, len(pattern) / len(content))
    return None


def _pre_tokenizer_is_lossless(spec: dict | None) -> bool:
    """Whether a pre-tokenizer keeps every character (splits but never drops, e.g. not ``Whitespace``)."""
    if spec is None:
        return True
    if spec.get("type") not in _SAFE_PRE_TOKENIZERS or spec.get("behavior") == "Removed":
        return False
    return all(_pre_tokenizer_is_lossless(child) for child in spec.get("pretokenizers", []))


def _has_byte_level(spec: dict | None) -> bool:
    if spec is None:
        return False
    return spec.get("type") == "ByteLevel" or any(_has_byte_level(c) for c in spec.get("pretokenizers", []))


def max_chars_per_token(tokenizer) -> float | None:
    """An upper bound on the characters of (stripped) input text that one token of ``tokenizer`` can stand for, or
    None when no bound can be justified.

    Why it holds: for a lossless tokenizer every character of the normalised text lies in the span of some token,
    and a token's span is at most as long as its vocabulary string (byte-level BPE: one vocabulary character per
    UTF-8 byte, and a character has >= 1 byte; SentencePiece BPE: ``▁`` stands for one space, byte-fallback tokens
    ``<0xAB>`` for part of one character; added tokens match their own text). So ``chars(normalised text) <=
    n_tokens * max_vocab_string_length``. Normalisation can shrink the text by at most the factor of
    :func:`_normalizer_shrink` (NFC/NFKC: 4), so ``chars(text) <= n_tokens * max_vocab_string_length * factor``:
    a text with more characters than ``max_seq_length *`` this bound has more than ``max_seq_length`` tokens.

    Lossy tokenizers get None: a normaliser or pre-tokenizer that deletes characters (``StripAccents``,
    ``BertNormalizer``, ``Whitespace``...), added tokens that swallow neighbouring whitespace (``lstrip``/
    ``rstrip``), models that map a whole run of unknown characters to one ``<unk>`` (WordPiece, WordLevel, Unigram
    without byte fallback, BPE with ``fuse_unk`` and neither byte fallback nor a byte-level pre-tokenizer), and slow
    (non-Rust) tokenizers, whose pipeline cannot be inspected.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    try:
        spec = json.loads(backend.to_str())
        vocab = tokenizer.get_vocab()
    except Exception:  # noqa: BLE001 - not a tokenizers-library tokenizer: no bound
        return None
    factor = _normalizer_shrink(spec.get("normalizer"))
    pre = spec.get("pre_tokenizer")
    if factor is None or not _pre_tokenizer_is_lossless(pre) or not vocab:
        return None
    if any(t.get("lstrip") or t.get("rstrip") for t in spec.get("added_tokens", [])):
        return None
    model = spec.get("model", {})
    kind = model.get("type")
    if kind == "BPE":
        if model.get("fuse_unk") and model.get("unk_token") and not model.get("byte_fallback") and not _has_byte_level(pre):
            return None
    elif kind == "Unigram":
        if not model.get("byte_fallback"):
            return None
    else:  # WordPiece, WordLevel: a whole unknown word becomes one token
        return None
    return float(max(len(token) for token in vocab)) * factor


def default_max_request_bytes(max_seq_length: int | None, max_items_per_request: int) -> int:
    """The default body cap: ``BYTES_PER_TOKEN (16) * max_seq_length * max_items_per_request``, clamped to
    [1 MiB, 64 MiB]; 64 MiB when there is no length limit.

    16 bytes per token holds a token id in JSON (at most 8 bytes, ``"131071, "``) or the text of a token (about 4
    characters of English, up to 3 UTF-8 bytes each) with room to spare, so a request of ``max_items_per_request``
    full-length items fits.
    """
    if not max_seq_length:
        return DEFAULT_MAX_REQUEST_BYTES
    wanted = BYTES_PER_TOKEN * int(max_seq_length) * int(max_items_per_request)
    return int(min(DEFAULT_MAX_REQUEST_BYTES, max(_MIN_DEFAULT_REQUEST_BYTES, wanted)))


class RewardScorerLike(Protocol):
    """What the server needs of a scorer (:class:`nemo_aligner.models.reward_model.RewardScorer` is one).

    Optional members the server reads when present: ``vocab_size`` (token ids must lie below it; default the
    tokenizer's length), ``name`` (``/info``'s ``model_name``; default the scorer's class name), ``mean``/``std``
    (``/info``'s ``reward_standardization``).
    """

    tokenizer: Any
    max_seq_length: int | None

    def encode(self, prompt, response) -> list[int]: ...

    def score(self, sequences: list[list[int]], micro_batch_size: int | None = None) -> list[float]: ...


def _vocab_size(scorer) -> int | None:
    """The number of token ids the model accepts: the scorer's ``vocab_size`` when it has one (a
    :class:`~nemo_aligner.models.reward_model.RewardScorer`: its embedding rows), else the tokenizer's length."""
    value = getattr(scorer, "vocab_size", None)
    if isinstance(value, int) and value > 0:
        return value
    tokenizer = getattr(scorer, "tokenizer", None)
    return len(tokenizer) if tokenizer is not None else None


def _check_messages(messages: list, where: str) -> None:
    """Raise 422 unless ``messages`` is a non-empty list of ``{"role": str, "content": str}`` messages whose role is
    one of the data layer's :data:`~nemo_aligner.data.chat.CHAT_ROLES`, written exactly so (the messages reach the
    chat template unchanged, so ``"Assistant"``, which data files may use, is refused here)."""
    if not messages:
        raise APIError(422, f"{where} must be a string or a non-empty list of {{'role': str, 'content': str}} "
                            "messages, got an empty list")
    for j, message in enumerate(messages):
        if not isinstance(message, dict):
            raise APIError(422, f"{where}[{j}] must be a {{'role': str, 'content': str}} message, "
                                f"got {type(message).__name__}")
        role, content = message.get("role"), message.get("content")
        if not isinstance(role, str):
            raise APIError(422, f"{where}[{j}].role must be a string, got {type(role).__name__}")
        if canonical_role(role) != role:
            raise APIError(422, f"{where}[{j}].role must be one of {list(CHAT_ROLES)}, got {role!r}")
        if not isinstance(content, str):
            raise APIError(422, f"{where}[{j}].content must be a string, got {type(content).__name__}")


def _check_text_list(body: dict, name: str) -> list:
    value = body.get(name)
    if not isinstance(value, list):
        raise APIError(422, f"'{name}' must be a list of strings or chat-message lists, got {type(value).__name__}")
    if not value:
        raise APIError(422, f"'{name}' is empty")
    for i, item in enumerate(value):
        if isinstance(item, list):
            _check_messages(item, f"{name}[{i}]")
        elif not isinstance(item, str):
            raise APIError(
                422,
                f"{name}[{i}] must be a string or a non-empty list of {{'role': str, 'content': str}} messages, "
                f"got {type(item).__name__}",
            )
    return value


def _text_chars(value) -> int:
    """Characters of a prompt or response that must become tokens: a string's, or the sum over its messages'
    contents, each stripped (a chat template may trim them; the tokenizer's normaliser may strip the text)."""
    if isinstance(value, str):
        return len(value.strip())
    return sum(len(m["content"].strip()) for m in value)


def _too_long(i: int, num_tokens: int, max_len: int) -> APIError:
    return APIError(422, f"item {i} has {num_tokens} tokens, more than the model's max_seq_length of {max_len}")


def _check_token_ids(value: Any, vocab_size: int | None, max_len: int | None = None) -> list[list[int]]:
    if not isinstance(value, list):
        raise APIError(422, f"'token_ids' must be a list of lists of ints, got {type(value).__name__}")
    if not value:
        raise APIError(422, "'token_ids' is empty")
    for i, seq in enumerate(value):
        if not isinstance(seq, list):
            raise APIError(422, f"token_ids[{i}] must be a list of ints, got {type(seq).__name__}")
        if not seq:
            raise APIError(422, f"token_ids[{i}] is empty")
        if max_len is not None and len(seq) > max_len:
            raise _too_long(i, len(seq), max_len)
        for j, tok in enumerate(seq):
            if isinstance(tok, bool) or not isinstance(tok, int):
                raise APIError(422, f"token_ids[{i}][{j}] must be an int, got {type(tok).__name__}")
            if tok < 0 or (vocab_size is not None and tok >= vocab_size):
                raise APIError(422, f"token_ids[{i}][{j}] = {tok} is outside the vocabulary [0, {vocab_size})")
    return value


def build_reward_model_app(
    scorer: RewardScorerLike,
    micro_batch_size: int = 4,
    max_wait_ms: float = 10.0,
    api_token: str | None = None,
    max_items_per_request: int = DEFAULT_MAX_ITEMS_PER_REQUEST,
    model_name: str | None = None,
    max_request_bytes: int | None = None,
    limits: ServerLimits | None = None,
):
    """A FastAPI app serving ``scorer`` (see the module docstring for the API).

    Args:
        scorer: encodes (prompt, response) texts to token ids (``encode``) and scores id sequences (``score``); only
            ever called from the batcher's worker thread (``score``) and one tokenising thread (``encode``).
        micro_batch_size: items per model forward (``inference.micro_batch_size``).
        max_wait_ms: how long a micro-batch waits for more items once it has one (milliseconds).
        api_token: bearer token to require (None: ``$NEMO_ALIGNER_API_TOKEN`` if set, else no auth).
        max_items_per_request: more items in one request are answered 422.
        model_name: reported by ``/info`` (default: the scorer's ``name_or_path`` if any).
        max_request_bytes: larger bodies are answered 413 (None: :func:`default_max_request_bytes` of the scorer's
            ``max_seq_length`` and ``max_items_per_request``).
        limits: read deadlines and connection limits (default :class:`~nemo_aligner.servers.app.ServerLimits`).

    Rewards are whatever ``scorer.score`` returns (a :class:`~nemo_aligner.models.reward_model.RewardScorer`
    applies its standardisation ``(raw - mean) / std``; ``/info`` reports the scorer's ``mean``/``std``).

    Returns:
        The app; ``app.state.batcher`` is its :class:`DynamicBatcher` (closed when the server shuts down).

    Raises:
        ValueError: ``micro_batch_size < 1``, ``max_wait_ms < 0`` or ``max_items_per_request < 1``.
    """
    if int(max_items_per_request) < 1:
        raise ValueError(f"max_items_per_request must be >= 1, got {max_items_per_request}")
    max_items_per_request = int(max_items_per_request)
    micro_batch_size = int(micro_batch_size)
    max_len = getattr(scorer, "max_seq_length", None)
    max_len = int(max_len) if max_len else None
    vocab_size = _vocab_size(scorer)
    if max_request_bytes is None:
        max_request_bytes = default_max_request_bytes(max_len, max_items_per_request)
    chars_per_token = max_chars_per_token(getattr(scorer, "tokenizer", None)) if max_len is not None else None
    max_chars = int(max_len * chars_per_token) if chars_per_token is not None else None
    if model_name is None:
        model_name = getattr(scorer, "name", None)
        model_name = str(model_name) if model_name else type(scorer).__name__

    def process(sequences: list[list[int]]) -> list[float]:
        return [float(r) for r in scorer.score(sequences, micro_batch_size=micro_batch_size)]

    batcher = DynamicBatcher(process, micro_batch_size=micro_batch_size, max_wait_ms=max_wait_ms)
    encoder = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="rm-encode")
    app = create_app(
        "NeMo-Aligner reward model server",
        api_token=api_token,
        max_request_bytes=max_request_bytes,
        on_shutdown=[batcher.close, lambda: encoder.shutdown(wait=False, cancel_futures=True)],
        limits=limits,
    )
    app.state.batcher = batcher
    app.state.scorer = scorer

    def encode_one(i: int, prompt, response) -> list[int]:
        try:
            return [int(t) for t in scorer.encode(prompt, response)]
        except Exception as err:  # noqa: BLE001 - a text the tokenizer rejects is the client's error
            raise APIError(422, f"item {i} cannot be tokenised: {type(err).__name__}: {err}") from None

    async def encode_all(prompts: Sequence, responses: Sequence) -> list[list[int]]:
        """Length pre-check of every item, then one item per trip to the tokeniser thread (so concurrent requests
        take turns), each checked against ``max_len`` as soon as it is tokenised."""
        if max_chars is not None:
            for i, (prompt, response) in enumerate(zip(prompts, responses)):
                chars = _text_chars(prompt) + _text_chars(response)
                if chars > max_chars:
                    raise APIError(
                        422,
                        f"item {i} has {chars} characters of text, more than the {max_chars} that "
                        f"max_seq_length={max_len} tokens can hold (at most {chars_per_token:g} characters per token "
                        "for this tokenizer); it was not tokenised",
                    )
        loop = asyncio.get_running_loop()
        out = []
        for i, (prompt, response) in enumerate(zip(prompts, responses)):
            ids = await loop.run_in_executor(encoder, encode_one, i, prompt, response)
            if max_len is not None and len(ids) > max_len:
                raise _too_long(i, len(ids), max_len)
            out.append(ids)
        return out

    add_health_and_info(app, lambda: {
        "model_name": model_name,
        "max_seq_length": max_len,
        "micro_batch_size": micro_batch_size,
        "max_wait_ms": float(max_wait_ms),
        "max_items_per_request": max_items_per_request,
        "max_request_bytes": int(max_request_bytes),
        "max_chars_per_item": max_chars,
        "vocab_size": vocab_size,
        "reward_standardization": {"mean": getattr(scorer, "mean", None), "std": getattr(scorer, "std", None)},
        "counters": batcher.stats(),
    })

    @app.post("/score")
    async def score(request: Request) -> dict:
        body = await read_json(request)
        if not isinstance(body, dict):
            raise APIError(422, f"request body must be a JSON object, got {type(body).__name__}")
        unknown = sorted(set(body) - _ALL_FIELDS)
        if unknown:
            raise APIError(422, f"unknown field(s) {unknown}; send 'prompts' and 'responses', or 'token_ids'")
        has_text = bool(_TEXT_FIELDS & set(body))
        if has_text and "token_ids" in body:
            raise APIError(422, "send either 'prompts' and 'responses', or 'token_ids', not both")
        if has_text:
            for name in sorted(_TEXT_FIELDS - set(body)):
                raise APIError(422, f"missing field '{name}'")
            prompts, responses = _check_text_list(body, "prompts"), _check_text_list(body, "responses")
            if len(prompts) != len(responses):
                raise APIError(422, f"{len(prompts)} prompts but {len(responses)} responses")
            count = len(prompts)
        elif "token_ids" in body:
            count = len(body["token_ids"]) if isinstance(body["token_ids"], list) else 0
        else:
            raise APIError(422, "missing fields: send 'prompts' and 'responses', or 'token_ids'")
        if count > max_items_per_request:
            raise APIError(422, f"{count} items in one request; the limit is {max_items_per_request}")

        if has_text:
            sequences = await encode_all(prompts, responses)
        else:
            sequences = _check_token_ids(body["token_ids"], vocab_size, max_len)
        try:
            rewards = await batcher.submit(sequences)
        except Exception as err:  # noqa: BLE001 - the model failed on this micro-batch; the server keeps serving
            raise APIError(500, f"scoring failed: {type(err).__name__}: {err}") from None
        bad = [i for i, r in enumerate(rewards) if not math.isfinite(r)]
        if bad:
            raise APIError(500, f"the model produced a non-finite reward for item(s) {bad[:10]}")
        return {"rewards": rewards}

    return app
