"""The PPO critic server (served mode): the critic infers values and trains on the actor's rollouts over HTTP.

API (JSON; errors are ``{"error": "<message>"}``, see :func:`nemo_aligner.servers.app.create_app`):

* ``POST /infer`` ``{"token_ids": [[int]], "prompt_lengths": [int]}`` -> ``{"values": [[float]]}``: one value per
  response token (the tokens after ``prompt_length``), read at the position that predicts it. Items of concurrent
  requests are gathered into micro-batches by :class:`~nemo_aligner.servers.batching.DynamicBatcher`.
* ``POST /train`` ``{"step": int, "seed": int, "run_id": str (optional), "token_ids", "prompt_lengths",
  "values": [[float]], "returns": [[float]]}`` -> ``{"metrics": {...}}``: one PPO step of clipped-value-loss
  training on the rollouts of every data-parallel rank of the actor (rank 0 gathers and sends them; ``step`` numbers
  the trainings of a run, critic warm-up included, see :class:`~nemo_aligner.algorithms.ppo.CriticHandle`) (:func:`~nemo_aligner.algorithms.ppo.update_critic`, the colocated critic's update too). Idempotent per ``(run_id, step)``: a
  retried request for the step just trained by the same actor run returns the stored metrics without training
  again; another run (a fresh actor process, which sends a new ``run_id``) is always trained, even at the same step.
* ``POST /save`` ``{"step": int}`` / ``POST /load`` ``{"step": int}``: checkpoint ``<checkpoint_dir>/step=<N>`` (the
  actor saves the critic before itself and restores it on resume).
* ``POST /reset`` (the body is ignored) -> ``{"reset": true}``: back to the state the server started in (weights
  re-read from the restore path, an optimizer without moments, the LR schedule at step 0, the RNG states of
  start-up) and an empty retry cache (:meth:`~nemo_aligner.models.critic.HFCritic.reset`). A fresh actor run (one
  that does not resume) sends it before its first step, so a server left running from an earlier run trains as a
  new one would; idempotent, so a retry is harmless.
* ``POST /prune`` ``{"keep_steps": [int]}`` -> ``{"removed": [path]}``: delete the critic checkpoints whose step is
  not listed (the actor sends the steps it kept after its own top-k pruning, so both keep the same steps).
* ``GET /health`` (no token), ``GET /info``.

Training, inference, ``/save``, ``/load``, ``/reset`` and ``/prune`` share one lock, so a request never sees
half-updated (or half-reset) weights and a reset never runs while a step trains.

:class:`RemoteCritic` is the actor-side client (a :class:`~nemo_aligner.algorithms.ppo.CriticHandle`).
"""

from __future__ import annotations

import asyncio
import shutil
import threading
import uuid
from pathlib import Path
from typing import Any, Sequence

import torch
from fastapi import Request

from nemo_aligner.algorithms.ppo import critic_values, update_critic
from nemo_aligner.data.rollouts import PayloadError, Rollouts
from nemo_aligner.servers.app import APIError, add_health_and_info, create_app, read_json
from nemo_aligner.servers.batching import DynamicBatcher
from nemo_aligner.servers.client import HTTPClient, post_per_token
from nemo_aligner.utils.checkpoint import CheckpointManager

__all__ = ["build_critic_app", "RemoteCritic", "parse_sequences"]


def parse_sequences(body: dict, vocab_size: int | None = None, per_token: Sequence[str] = ()) -> Rollouts:
    """The rollouts of a request: ``token_ids`` + ``prompt_lengths`` (and the per-token fields ``per_token``, e.g.
    ``("values", "returns")``), parsed by :meth:`~nemo_aligner.data.rollouts.Rollouts.from_payload`.

    Raises:
        APIError: 422 for missing/mismatched fields, non-integer ids, ids outside the vocabulary, a prompt length
            that leaves no response token, or a per-token field without one number per response token.
    """
    try:
        return Rollouts.from_payload(body, vocab_size, per_token)
    except PayloadError as err:
        raise APIError(422, str(err)) from None


def build_critic_app(
    critic,
    checkpoint_dir: str | Path,
    forward_micro_batch_size: int = 4,
    global_batch_size: int = 8,
    micro_batch_size: int = 1,
    epochs: int = 1,
    max_wait_ms: float = 2.0,
    api_token: str | None = None,
):
    """A FastAPI app serving an :class:`~nemo_aligner.models.critic.HFCritic` (see the module docstring).

    Args:
        critic: the critic model (trained in place).
        checkpoint_dir: where ``/save`` writes (and ``/prune`` deletes).
        forward_micro_batch_size: sequences per inference forward.
        global_batch_size, micro_batch_size, epochs: critic training batches per ``/train`` request.
        max_wait_ms: how long an inference micro-batch waits for more items.
        api_token: bearer token (None: ``$NEMO_ALIGNER_API_TOKEN`` or no auth).

    Returns:
        The app (``app.state.batcher``, ``app.state.critic``).
    """
    lock = threading.Lock()
    checkpoints = CheckpointManager(checkpoint_dir, save_top_k=-1)
    vocab_size = critic.vocab_size
    last_train: dict[str, Any] = {"run_id": None, "step": None, "metrics": None}

    def process(items: list[Rollouts]) -> list[list[float]]:  # one single-rollout batch per sequence
        rollouts = Rollouts.cat(items)
        with lock:
            return rollouts.per_sequence(critic_values(critic, rollouts, forward_micro_batch_size))

    batcher = DynamicBatcher(process, micro_batch_size=forward_micro_batch_size, max_wait_ms=max_wait_ms)
    app = create_app("NeMo-Aligner PPO critic server", api_token=api_token, on_shutdown=[batcher.close])
    app.state.batcher, app.state.critic = batcher, critic

    def _int(body: dict, key: str) -> int:
        value = body.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise APIError(422, f"'{key}' must be a non-negative integer")
        return value

    add_health_and_info(app, lambda: {
        "model": str(critic.source),
        "forward_micro_batch_size": forward_micro_batch_size,
        "global_batch_size": global_batch_size,
        "micro_batch_size": micro_batch_size,
        "last_trained_step": last_train["step"],
        "checkpoint_dir": str(checkpoint_dir),
    })

    @app.post("/infer")
    async def infer(request: Request) -> dict:
        rollouts = parse_sequences(await read_json(request), vocab_size)
        return {"values": await batcher.submit(rollouts.split(1))}

    def _train(run_id: str | None, step: int, seed: int, rollouts: Rollouts) -> dict:
        with lock:
            if last_train["step"] == step and last_train["run_id"] == run_id:
                return last_train["metrics"]  # a retry of the request just served
            metrics = update_critic(critic, rollouts, global_batch_size, micro_batch_size, epochs, seed)
            last_train.update(run_id=run_id, step=step, metrics=metrics)
            return metrics

    @app.post("/train")
    async def train(request: Request) -> dict:
        body = await read_json(request)
        step, seed = _int(body, "step"), _int(body, "seed")
        run_id = body.get("run_id")
        if run_id is not None and not isinstance(run_id, str):
            raise APIError(422, "'run_id' must be a string")
        rollouts = parse_sequences(body, vocab_size, per_token=("values", "returns"))
        return {"metrics": await asyncio.to_thread(_train, run_id, step, seed, rollouts)}

    def _save(step: int) -> str:
        with lock:
            path = checkpoints.path_for(step)
            critic.save_checkpoint(str(path), {"step": step})
            return str(path)

    def _load(step: int) -> str:
        path = checkpoints.path_for(step)
        if not path.is_dir():
            raise APIError(404, f"no critic checkpoint {path}")
        with lock:
            critic.load_checkpoint(str(path))
            last_train.update(run_id=None, step=None, metrics=None)
        return str(path)

    def _reset() -> None:
        with lock:
            critic.reset()
            last_train.update(run_id=None, step=None, metrics=None)

    def _prune(keep_steps: set[int]) -> list[str]:
        removed = []
        with lock:
            for path, meta in checkpoints.checkpoints():
                if int(meta.get("step", -1)) not in keep_steps:
                    shutil.rmtree(path, ignore_errors=True)
                    removed.append(str(path))
        return removed

    @app.post("/save")
    async def save(request: Request) -> dict:
        return {"path": await asyncio.to_thread(_save, _int(await read_json(request), "step"))}

    @app.post("/load")
    async def load(request: Request) -> dict:
        return {"path": await asyncio.to_thread(_load, _int(await read_json(request), "step"))}

    @app.post("/reset")
    async def reset() -> dict:
        await asyncio.to_thread(_reset)
        return {"reset": True}

    @app.post("/prune")
    async def prune(request: Request) -> dict:
        body = await read_json(request)
        keep = body.get("keep_steps") if isinstance(body, dict) else None
        if not isinstance(keep, list) or not all(isinstance(k, int) and not isinstance(k, bool) for k in keep):
            raise APIError(422, "'keep_steps' must be a list of integers")
        return {"removed": await asyncio.to_thread(_prune, set(keep))}

    return app


class RemoteCritic(HTTPClient):
    """Actor-side client of the critic server; a :class:`~nemo_aligner.algorithms.ppo.CriticHandle`.

    Args:
        base_url: e.g. ``http://127.0.0.1:5557``; other arguments as :class:`~nemo_aligner.servers.client.HTTPClient`.
        max_items_per_request: ``/infer`` requests are split into chunks this big.
        run_id: sent with every ``/train`` so that the server's retry cache never answers another run's request
            (default: a fresh random id per client, i.e. per actor process).

    ``shared = True``: one server serves every data-parallel rank of the actor, so the PPO trainer sends ``/train``
    (with all ranks' rollouts), ``/save``, ``/load`` and ``/reset`` from rank 0 only; the server then trains once per
    PPO step on the whole global batch (its ``model.global_batch_size``), as a one-process actor run would.
    """

    shared = True

    def __init__(self, base_url: str = "http://127.0.0.1:5557", *args, max_items_per_request: int = 256,
                 run_id: str | None = None, **kwargs):
        super().__init__(base_url, *args, **kwargs)
        self.max_items_per_request = int(max_items_per_request)
        self.run_id = run_id or uuid.uuid4().hex
        self._step = 0

    def infer(self, rollouts: Rollouts) -> torch.Tensor:
        """``[N]`` float32 values of the response tokens (``POST /infer`` in chunks of ``max_items_per_request``).

        Raises:
            ValueError: the server did not answer one value per response token.
        """
        return post_per_token(self, "/infer", "values", rollouts)

    def train(self, rollouts: Rollouts, seed: int, step: int | None = None) -> dict[str, float]:
        """Train on rollouts with ``values`` and ``returns``; ``step`` (default: a counter) makes retries safe."""
        step = self._step if step is None else step
        self._step = step + 1
        payload = rollouts.to_payload(per_token=("values", "returns"))
        payload.update(step=int(step), seed=int(seed), run_id=self.run_id)
        return {k: float(v) for k, v in self.post("/train", payload)["metrics"].items()}

    def save(self, step: int) -> None:
        self.post("/save", {"step": int(step)})

    def load(self, step: int) -> None:
        self.post("/load", {"step": int(step)})
        self._step = int(step)

    def reset(self) -> None:
        """``POST /reset``: bring the server's critic back to its start-up state (a fresh actor run calls this).

        Raises:
            ConnectionError: the server could not be reached.
            ServerRequestError: the server refused (e.g. 500 when it cannot re-read its restore path).
        """
        self.post("/reset", {})
        self._step = 0

    def prune(self, keep_steps: set[int]) -> list[str]:
        """Delete the server's critic checkpoints whose step is not in ``keep_steps``; returns the removed paths."""
        return list(self.post("/prune", {"keep_steps": sorted(int(k) for k in keep_steps)})["removed"])

    def wait_until_ready(self, timeout: float = 120.0, interval: float = 0.5) -> dict:
        """Poll ``/health`` until it answers (bounded by ``timeout`` seconds).

        Raises:
            ConnectionError: not ready in time.
        """
        return self.wait_for_health(timeout, interval)
