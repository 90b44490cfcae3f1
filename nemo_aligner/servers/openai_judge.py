"""A judge behind an OpenAI-compatible chat-completions endpoint (``vllm serve``, SGLang, TGI, OpenAI itself), for
self-rewarding runs that judge with a larger model than the one they train (``model.spin.judge_endpoint``).

Each judge request is one user message (the rendered judge or meta-judge template); the answer's text is the
judgement, parsed by the trainer with ``judge_reward_regex`` as any other. Requests go out concurrently (at most
``max_concurrency`` at a time) so that the server can batch them, each with its row's ``seed``. With
``constrain_judge_output`` the request also carries vLLM's ``structured_outputs: {"regex": ...}``
(:func:`nemo_aligner.algorithms.llm_judge.constrained_judgement_regex`: a bounded justification, then the score
prefix, then an allowed score): a vLLM server then always answers in the score format;
servers without structured outputs may reject or ignore the field (set ``constrain_judge_output=false`` for them).
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from typing import Sequence

from nemo_aligner.servers.client import HTTPClient, ServerRequestError


class OpenAIJudge:
    """Judgements from an OpenAI-compatible ``/chat/completions`` endpoint.

    Args:
        base_url: the API root, e.g. ``http://127.0.0.1:8000/v1`` (``vllm serve <model>``).
        model: the served model's name (the request's ``model``).
        api_key_env: the environment variable holding the API key (sent as a bearer token; unset: no key).
        timeout: seconds per request attempt.
        max_concurrency: requests in flight at once.

    Raises:
        ValueError: an empty ``base_url`` or ``model``, or ``max_concurrency < 1``.
    """

    def __init__(self, base_url: str, model: str, api_key_env: str | None = "OPENAI_API_KEY", timeout: float = 300.0,
                 max_concurrency: int = 16):
        if not base_url or not model:
            raise ValueError("model.spin.judge_endpoint and model.spin.judge_model must both be set")
        if max_concurrency < 1:
            raise ValueError(f"model.spin.judge_max_concurrency={max_concurrency} must be >= 1")
        self.model = str(model)
        self.max_concurrency = int(max_concurrency)
        key = os.environ.get(api_key_env) if api_key_env else None
        self.client = HTTPClient(base_url, api_token=key or "", timeout=timeout)

    def judge(self, texts: Sequence[str], seeds: Sequence[int], temperature: float, top_p: float, max_tokens: int,
              regex: str | None = None) -> list[str]:
        """One completion per judge request text, in order.

        Args:
            texts: the rendered judge requests (each the content of one user message).
            seeds: one sampling seed per request.
            temperature: 0 is greedy; top_p: nucleus mass.
            max_tokens: new tokens per answer.
            regex: vLLM structured outputs (``structured_outputs.regex``), or None for free text.

        Raises:
            ServerUnavailableError / ServerRequestError: the endpoint cannot be reached or refuses a request (the
                message names the URL); ServerRequestError also for an answer without ``choices[0].message``.
        """
        def one(text_seed):
            text, seed = text_seed
            payload = {"model": self.model, "messages": [{"role": "user", "content": text}], "n": 1,
                       "max_tokens": int(max_tokens), "temperature": float(temperature), "top_p": float(top_p),
                       "seed": int(seed) & ((1 << 31) - 1)}
            if regex is not None:
                payload["structured_outputs"] = {"regex": regex}
            answer = self.client.post("chat/completions", payload)
            try:
                return str(answer["choices"][0]["message"]["content"] or "")
            except (KeyError, IndexError, TypeError):
                raise ServerRequestError(200, f"no choices[0].message.content in {str(answer)[:200]!r}",
                                         f"{self.client.base_url}/chat/completions")

        if len(seeds) != len(texts):
            raise ValueError(f"seeds has {len(seeds)} entries for {len(texts)} judge requests")
        with ThreadPoolExecutor(max_workers=min(self.max_concurrency, max(len(texts), 1))) as pool:
            return list(pool.map(one, zip(texts, seeds)))

    def close(self) -> None:
        self.client.close()
