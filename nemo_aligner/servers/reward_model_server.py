"""The reward-model inference server: an HTTP API in front of a reward scorer, with dynamic batching.

API (JSON; errors are ``{"error": "<message>"}``):

* ``POST /score`` with ``{"prompts": [...], "responses": [...]}`` (each entry a string or a list of chat messages)
  or ``{"token_ids": [[int, ...], ...]}`` -> ``{"rewards": [float, ...]}``, one per item, in order.
* ``GET /health`` -> ``{"status": "ok"}`` (no token needed).
* ``GET /info`` -> ``model_name``, ``max_seq_length``, ``micro_batch_size``, ``max_wait_ms``,
  ``max_items_per_request``, ``vocab_size``, ``reward_standardization`` (the scorer's mean/std) and the batching
  ``counters``.

Status codes: 400 malformed JSON; 401 missing/wrong bearer token; 413 body too large; 422 wrong/missing/unknown
fields, wrong types, empty lists, token ids outside the vocabulary, or an item longer than ``max_seq_length``
(the message names the item index); 500 the model failed (only the requests of that micro-batch).

Items of concurrent requests are gathered by :class:`~nemo_aligner.servers.batching.DynamicBatcher` into
micro-batches of ``micro_batch_size``; texts are tokenised in one separate thread (tokenizers are not thread-safe),
so tokenising the next request overlaps the model's forward pass.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import math
from typing import Any, Protocol, Sequence

from fastapi import Request

from nemo_aligner.servers.app import DEFAULT_MAX_REQUEST_BYTES, APIError, add_health_and_info, create_app, read_json
from nemo_aligner.servers.batching import DynamicBatcher

__all__ = ["RewardScorerLike", "build_reward_model_app", "DEFAULT_MAX_ITEMS_PER_REQUEST"]

DEFAULT_MAX_ITEMS_PER_REQUEST = 1024
_TEXT_FIELDS = {"prompts", "responses"}
_ALL_FIELDS = _TEXT_FIELDS | {"token_ids"}


class RewardScorerLike(Protocol):
    """What the server needs of a scorer (:class:`nemo_aligner.models.reward_model.RewardScorer` is one)."""

    tokenizer: Any
    max_seq_length: int | None

    def encode(self, prompt, response) -> list[int]: ...

    def score(self, sequences: list[list[int]], micro_batch_size: int | None = None) -> list[float]: ...


def _hf_model(scorer):
    """The transformers model inside ``scorer`` (``scorer.model``, unwrapping ``.model`` wrappers), or None."""
    model = getattr(scorer, "model", None)
    for _ in range(4):
        if model is None or hasattr(model, "get_input_embeddings"):
            return model
        model = getattr(model, "model", None)
    return None


def _vocab_size(scorer) -> int | None:
    """The number of token ids the model accepts: its embedding size if visible, else the tokenizer's length."""
    value = getattr(scorer, "vocab_size", None)
    if isinstance(value, int) and value > 0:
        return value
    model = _hf_model(scorer)
    if model is not None:
        try:
            return int(model.get_input_embeddings().num_embeddings)
        except Exception:  # noqa: BLE001 - fall back to the config / tokenizer
            value = getattr(getattr(model, "config", None), "vocab_size", None)
            if isinstance(value, int) and value > 0:
                return value
    tokenizer = getattr(scorer, "tokenizer", None)
    return len(tokenizer) if tokenizer is not None else None


def _is_message_list(value: Any) -> bool:
    return (
        isinstance(value, list)
        and len(value) > 0
        and all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in value
        )
    )


def _check_text_list(body: dict, name: str) -> list:
    value = body.get(name)
    if not isinstance(value, list):
        raise APIError(422, f"'{name}' must be a list of strings or chat-message lists, got {type(value).__name__}")
    if not value:
        raise APIError(422, f"'{name}' is empty")
    for i, item in enumerate(value):
        if not (isinstance(item, str) or _is_message_list(item)):
            raise APIError(
                422,
                f"{name}[{i}] must be a string or a non-empty list of {{'role': str, 'content': str}} messages, "
                f"got {type(item).__name__}",
            )
    return value


def _check_token_ids(value: Any, vocab_size: int | None) -> list[list[int]]:
    if not isinstance(value, list):
        raise APIError(422, f"'token_ids' must be a list of lists of ints, got {type(value).__name__}")
    if not value:
        raise APIError(422, "'token_ids' is empty")
    for i, seq in enumerate(value):
        if not isinstance(seq, list):
            raise APIError(422, f"token_ids[{i}] must be a list of ints, got {type(seq).__name__}")
        if not seq:
            raise APIError(422, f"token_ids[{i}] is empty")
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
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
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
        max_request_bytes: larger bodies are answered 413.

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
    if model_name is None:
        model = _hf_model(scorer)
        model_name = getattr(getattr(model, "config", None), "name_or_path", None) or getattr(scorer, "name", None)
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
    )
    app.state.batcher = batcher
    app.state.scorer = scorer

    def encode_all(prompts: Sequence, responses: Sequence) -> list[list[int]]:
        out = []
        for i, (prompt, response) in enumerate(zip(prompts, responses)):
            try:
                out.append([int(t) for t in scorer.encode(prompt, response)])
            except Exception as err:  # noqa: BLE001 - a text the tokenizer rejects is the client's error
                raise APIError(422, f"item {i} cannot be tokenised: {type(err).__name__}: {err}") from None
        return out

    add_health_and_info(app, lambda: {
        "model_name": model_name,
        "max_seq_length": max_len,
        "micro_batch_size": micro_batch_size,
        "max_wait_ms": float(max_wait_ms),
        "max_items_per_request": max_items_per_request,
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
            loop = asyncio.get_running_loop()
            sequences = await loop.run_in_executor(encoder, encode_all, prompts, responses)
        else:
            sequences = _check_token_ids(body["token_ids"], vocab_size)
        if max_len is not None:
            for i, seq in enumerate(sequences):
                if len(seq) > max_len:
                    raise APIError(
                        422, f"item {i} has {len(seq)} tokens, more than the model's max_seq_length of {max_len}"
                    )
        try:
            rewards = await batcher.submit(sequences)
        except Exception as err:  # noqa: BLE001 - the model failed on this micro-batch; the server keeps serving
            raise APIError(500, f"scoring failed: {type(err).__name__}: {err}") from None
        bad = [i for i, r in enumerate(rewards) if not math.isfinite(r)]
        if bad:
            raise APIError(500, f"the model produced a non-finite reward for item(s) {bad[:10]}")
        return {"rewards": rewards}

    return app
