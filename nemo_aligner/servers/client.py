"""HTTP clients for the inference servers, usable from plain scripts (synchronous, thread-safe).

    from nemo_aligner.servers.client import RewardModelClient

    client = RewardModelClient("http://127.0.0.1:5555")            # token: argument or $NEMO_ALIGNER_API_TOKEN
    client.score(["What is 2+2?"], ["4."])                          # -> [0.73]
    client.score_token_ids([[1, 523, 87, 2]])                       # -> [-0.12]

Failures:

* the server cannot be reached (refused, reset, timed out): retried ``max_retries`` times with exponential backoff
  (``backoff * 2**attempt`` seconds), then :class:`ConnectionError` naming the URL;
* 5xx: retried the same way, then :class:`ServerRequestError` with the server's message;
* 4xx (bad request, auth, too long): :class:`ServerRequestError` at once (retrying cannot help), carrying the
  status code and the server's message.
"""

from __future__ import annotations

import time
from typing import Any, Sequence

import httpx
import torch

from nemo_aligner.data.rollouts import Rollouts
from nemo_aligner.errors import ServerUnavailableError
from nemo_aligner.servers.app import API_TOKEN_ENV, resolve_api_token

__all__ = ["HTTPClient", "RewardModelClient", "ServerRequestError", "post_per_token"]


class ServerRequestError(RuntimeError):
    """The server answered with an error status.

    Attributes:
        status_code: the HTTP status (e.g. 401, 422, 500).
        message: the server's error message (its ``error`` field, else the raw body).
        url: the requested URL.
    """

    def __init__(self, status_code: int, message: str, url: str):
        self.status_code, self.message, self.url = status_code, message, url
        super().__init__(f"{url} answered {status_code}: {message}")


def post_per_token(client: "HTTPClient", path: str, key: str, rollouts: Rollouts) -> torch.Tensor:
    """POST ``rollouts`` (:meth:`Rollouts.to_payload`: token ids and prompt lengths) to ``path`` in chunks of
    ``client.max_items_per_request`` rollouts, and return the answers' ``key`` lists (one float per response token)
    as one flat ``[N]`` float32 tensor, ``N`` the total number of response tokens. The PPO servers' clients use it:
    the critic's ``/infer`` (``values``) and the initial policy's ``/logprobs`` (``logprobs``).

    Raises:
        ValueError: an answer without one number per response token (:meth:`Rollouts.per_token`).
        ServerUnavailableError, APIError: as :meth:`HTTPClient.post`.
    """
    answers: list[list[float]] = []
    for chunk in rollouts.split(client.max_items_per_request):
        answers.extend(client.post(path, chunk.to_payload())[key])
    return rollouts.per_token(answers, key)


def _message(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return response.text.strip()[:2000] or response.reason_phrase
    if isinstance(body, dict):
        for key in ("error", "detail", "message"):
            if key in body:
                value = body[key]
                return value if isinstance(value, str) else str(value)
    return str(body)[:2000]


class HTTPClient:
    """JSON-over-HTTP client with bearer auth and bounded retries (see the module docstring).

    Args:
        base_url: e.g. ``http://127.0.0.1:5555``.
        api_token: bearer token; None falls back to ``$NEMO_ALIGNER_API_TOKEN``; neither = no header.
        timeout: seconds per attempt (connect and read).
        max_retries: retries after the first attempt on connection errors and 5xx (0 = try once).
        backoff: seconds before the first retry; doubled for each further one.

    Raises:
        ValueError: an empty ``base_url`` or negative ``max_retries``/``backoff``.
    """

    def __init__(
        self,
        base_url: str,
        api_token: str | None = None,
        timeout: float = 60.0,
        max_retries: int = 3,
        backoff: float = 0.5,
    ):
        if not base_url:
            raise ValueError("base_url is empty")
        if max_retries < 0 or backoff < 0:
            raise ValueError(f"max_retries ({max_retries}) and backoff ({backoff}) must be >= 0")
        self.base_url = base_url.rstrip("/")
        self.timeout, self.max_retries, self.backoff = float(timeout), int(max_retries), float(backoff)
        token = resolve_api_token(api_token)
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._client = httpx.Client(base_url=self.base_url, headers=headers, timeout=self.timeout, trust_env=False)

    def post(self, path: str, payload: Any) -> dict:
        """POST ``payload`` as JSON to ``path``; the decoded JSON answer.

        Raises:
            ConnectionError: the server could not be reached after all retries (names the URL).
            ServerRequestError: a 4xx answer (no retry), or a 5xx answer after all retries.
        """
        return self._request("POST", path, payload)

    def get(self, path: str) -> dict:
        """GET ``path``; the decoded JSON answer. Raises as :meth:`post`."""
        return self._request("GET", path, None)

    def _request(self, method: str, path: str, payload: Any) -> dict:
        url = f"{self.base_url}/{path.lstrip('/')}"
        last: Exception | None = None
        for attempt in range(self.max_retries + 1):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))
            try:
                response = self._client.request(method, url, json=payload)
            except httpx.TransportError as err:  # refused, reset, timed out, ...
                last = err
                continue
            if response.status_code >= 500:
                last = ServerRequestError(response.status_code, _message(response), url)
                continue
            if response.status_code >= 400:
                hint = ""
                if response.status_code == 401:
                    hint = f" (pass api_token= or set ${API_TOKEN_ENV})"
                raise ServerRequestError(response.status_code, _message(response) + hint, url)
            try:
                return response.json()
            except ValueError:
                raise ServerRequestError(response.status_code, f"answer is not JSON: {response.text[:200]!r}", url)
        if isinstance(last, ServerRequestError):
            raise last
        raise ServerUnavailableError(
            f"cannot reach the server at {url} after {self.max_retries + 1} attempt(s): "
            f"{type(last).__name__}: {last}. Is the server running and the URL right?"
        ) from last

    def wait_for_health(self, timeout: float, interval: float) -> dict:
        """Poll ``GET /health`` (one attempt each, no retries) every ``interval`` seconds until it answers JSON; that
        answer.

        Raises:
            ServerUnavailableError: no answer within ``timeout`` seconds (names the URL and the last error).
        """
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            try:
                return self._client.get(f"{self.base_url}/health").json()
            except Exception as err:  # noqa: BLE001 - not up yet
                last = err
                time.sleep(interval)
        raise ServerUnavailableError(f"server at {self.base_url} not ready after {timeout} s: {last}")

    def close(self) -> None:
        """Close the connection pool."""
        self._client.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class RewardModelClient(HTTPClient):
    """Client of the reward-model server (``serve_reward_model.py``, default ``http://127.0.0.1:5555``).

    Args:
        base_url: the server's URL; other arguments as :class:`HTTPClient`.
        max_items_per_request: larger inputs are sent in several requests of at most this many items (the
            server's own limit is in ``info()["max_items_per_request"]``).
    """

    def __init__(self, base_url: str = "http://127.0.0.1:5555", *args, max_items_per_request: int = 256, **kwargs):
        super().__init__(base_url, *args, **kwargs)
        self.max_items_per_request = max(1, int(max_items_per_request))

    def score(self, prompts: Sequence[Any], responses: Sequence[Any]) -> list[float]:
        """One reward per (prompt, response) pair, in order.

        Args:
            prompts, responses: equally long lists; each entry a string or a list of chat messages
                (``{"role": ..., "content": ...}``), tokenised on the server exactly as the RM was trained.

        Returns:
            ``len(prompts)`` floats (``[]`` for empty input, without a request).

        Raises:
            ValueError: different lengths; others as :meth:`HTTPClient.post` (e.g. 422 naming the item index of an
                input longer than the model's max_seq_length).
        """
        prompts, responses = list(prompts), list(responses)
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
        rewards: list[float] = []
        for start in range(0, len(prompts), self.max_items_per_request):
            end = start + self.max_items_per_request
            answer = self.post("/score", {"prompts": prompts[start:end], "responses": responses[start:end]})
            rewards.extend(float(r) for r in answer["rewards"])
        return rewards

    def score_token_ids(self, sequences: Sequence[Sequence[int]]) -> list[float]:
        """One reward per already tokenised sequence (prompt + response ids, the RM's tokenizer), in order.

        Returns ``[]`` for empty input. Raises as :meth:`score`.
        """
        sequences = [[int(t) for t in seq] for seq in sequences]
        rewards: list[float] = []
        for start in range(0, len(sequences), self.max_items_per_request):
            answer = self.post("/score", {"token_ids": sequences[start : start + self.max_items_per_request]})
            rewards.extend(float(r) for r in answer["rewards"])
        return rewards

    def health(self) -> dict:
        """``GET /health`` -> ``{"status": "ok"}`` (no token needed)."""
        return self.get("/health")

    def info(self) -> dict:
        """``GET /info`` -> model name, max_seq_length, micro_batch_size, batching counters, ..."""
        return self.get("/info")

    def wait_until_ready(self, timeout: float = 60.0, interval: float = 0.5) -> dict:
        """Poll :meth:`health` until it answers, for at most ``timeout`` seconds.

        Raises:
            ConnectionError: still unreachable after ``timeout`` seconds.
        """
        deadline = time.monotonic() + timeout
        while True:
            try:
                return self._request_once("GET", "/health")
            except (httpx.TransportError, ServerRequestError) as err:
                if time.monotonic() >= deadline:
                    raise ServerUnavailableError(f"server at {self.base_url} not ready after {timeout} s: {err}") from err
                time.sleep(interval)

    def _request_once(self, method: str, path: str) -> dict:
        url = f"{self.base_url}/{path.lstrip('/')}"
        response = self._client.request(method, url)
        if response.status_code >= 400:
            raise ServerRequestError(response.status_code, _message(response), url)
        return response.json()
