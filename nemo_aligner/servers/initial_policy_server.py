"""The PPO initial-policy server (served mode): frozen log-probabilities of response tokens for the KL penalty.

API (JSON; errors are ``{"error": "<message>"}``):

* ``POST /logprobs`` ``{"token_ids": [[int]], "prompt_lengths": [int]}`` -> ``{"logprobs": [[float]]}``: natural-log
  probabilities of each response token (the tokens after ``prompt_length``) under the initial policy. Items of
  concurrent requests are gathered into micro-batches by :class:`~nemo_aligner.servers.batching.DynamicBatcher`.
* ``GET /health`` (no token), ``GET /info``.

:class:`InitialPolicyScorer` is the frozen model, :class:`RemoteInitialPolicy` the actor-side client (an
:class:`~nemo_aligner.algorithms.ppo.InitialPolicyHandle`).
"""

from __future__ import annotations

from typing import Any

import torch
from fastapi import Request

from nemo_aligner.data.rollouts import Rollouts
from nemo_aligner.models.hf_causal_lm import ResponseLogprobs, load_causal_lm, load_tokenizer
from nemo_aligner.models.pretrained import resolve_pretrained
from nemo_aligner.servers.app import add_health_and_info, create_app, read_json
from nemo_aligner.servers.batching import DynamicBatcher
from nemo_aligner.servers.client import HTTPClient, post_per_token
from nemo_aligner.servers.critic_server import parse_sequences

__all__ = ["InitialPolicyScorer", "build_initial_policy_app", "RemoteInitialPolicy"]


class InitialPolicyScorer:
    """A frozen causal LM that returns response-token log-probabilities (no optimizer, no gradients).

    Args:
        lm: a transformers causal LM.
        pad_token_id: padding id for batches.
        device: where it runs.
    """

    def __init__(self, lm: torch.nn.Module, pad_token_id: int, device: str | torch.device = "cpu"):
        self.device = torch.device(device)
        self.module = ResponseLogprobs(lm).to(self.device).eval().requires_grad_(False)
        self.pad_token_id = int(pad_token_id)
        self.vocab_size = int(lm.config.vocab_size)
        self.source = lm.config.name_or_path

    @classmethod
    def from_pretrained(cls, source: str, model_cfg: Any = None, precision: str = "32-true", device: str = "cpu"):
        """Load with :func:`~nemo_aligner.models.hf_causal_lm.load_causal_lm` (``model_cfg`` may set
        ``attn_implementation``)."""
        source = resolve_pretrained(str(source))
        lm = load_causal_lm(source, model_cfg or {}, precision)
        return cls(lm, load_tokenizer(source).pad_token_id, device)

    @torch.no_grad()
    def logprobs(self, rollouts: Rollouts, micro_batch_size: int = 4) -> torch.Tensor:
        """``[N]`` float32 log-probabilities (nats, on the CPU) of the response tokens of ``rollouts``, in
        consecutive micro-batches of ``micro_batch_size`` rollouts."""
        out = []
        for chunk in rollouts.split(micro_batch_size):
            b = chunk.sequence_batch(self.pad_token_id).to(self.device)
            flat = self.module(b.input_ids, b.position_ids, b.attention_mask, b.pred_row, b.pred_col, b.targets)
            out.append(flat.float().cpu())
        return torch.cat(out)


def build_initial_policy_app(scorer: InitialPolicyScorer, micro_batch_size: int = 4, max_wait_ms: float = 2.0,
                             api_token: str | None = None):
    """A FastAPI app serving ``scorer`` (see the module docstring); ``app.state.batcher`` is its batcher."""

    def process(items: list[Rollouts]) -> list[list[float]]:  # one single-rollout batch per sequence
        rollouts = Rollouts.cat(items)
        return rollouts.per_sequence(scorer.logprobs(rollouts, micro_batch_size))

    batcher = DynamicBatcher(process, micro_batch_size=micro_batch_size, max_wait_ms=max_wait_ms)
    app = create_app("NeMo-Aligner PPO initial policy server", api_token=api_token, on_shutdown=[batcher.close])
    app.state.batcher = batcher

    add_health_and_info(app, lambda: {
        "model": str(scorer.source), "micro_batch_size": micro_batch_size, "vocab_size": scorer.vocab_size,
    })

    @app.post("/logprobs")
    async def logprobs(request: Request) -> dict:
        rollouts = parse_sequences(await read_json(request), scorer.vocab_size)
        return {"logprobs": await batcher.submit(rollouts.split(1))}

    return app


class RemoteInitialPolicy(HTTPClient):
    """Actor-side client of the initial-policy server (default ``http://127.0.0.1:5556``)."""

    def __init__(self, base_url: str = "http://127.0.0.1:5556", *args, max_items_per_request: int = 256, **kwargs):
        super().__init__(base_url, *args, **kwargs)
        self.max_items_per_request = int(max_items_per_request)

    def logprobs(self, rollouts: Rollouts) -> torch.Tensor:
        """``[N]`` float32 log-probabilities of the response tokens (``POST /logprobs`` in chunks of
        ``max_items_per_request``).

        Raises:
            ValueError: the server did not answer one log-probability per response token.
        """
        return post_per_token(self, "/logprobs", "logprobs", rollouts)

    def wait_until_ready(self, timeout: float = 120.0, interval: float = 0.5) -> dict:
        """Poll ``/health`` until it answers (bounded by ``timeout``). Raises ``ConnectionError`` when not ready."""
        return self.wait_for_health(timeout, interval)
