"""The client helpers the PPO servers' clients share (servers/client.py): the rollout payload and the health poll."""

import json
import socket
import time

import pytest
import torch

from nemo_aligner.errors import ServerUnavailableError
from nemo_aligner.data.rollouts import Rollouts
from nemo_aligner.servers.client import HTTPClient, post_per_token
from nemo_aligner.servers.critic_server import RemoteCritic
from nemo_aligner.servers.initial_policy_server import RemoteInitialPolicy


def test_post_per_token_chunks_the_payload_and_flattens_the_answers():
    rollouts = Rollouts.from_lists([[1, 5], [1], [2]], [[9], [7], [3, 4, 6]])
    sent = []

    class Client:
        max_items_per_request = 2

        def post(self, path, payload):
            assert json.loads(json.dumps(payload)) == payload  # plain JSON only
            sent.append((path, payload))
            return {"values": [[float(t) for t in ids[n:]] for ids, n in zip(payload["token_ids"],
                                                                              payload["prompt_lengths"])]}

    values = post_per_token(Client(), "/infer", "values", rollouts)
    assert [p for p, _ in sent] == ["/infer", "/infer"]
    assert [len(p["token_ids"]) for _, p in sent] == [2, 1]
    assert sent[0][1] == {"token_ids": [[1, 5, 9], [1, 7]], "prompt_lengths": [2, 1]}
    assert values.dtype == torch.float32 and values.tolist() == [9.0, 7.0, 3.0, 4.0, 6.0]


def test_post_per_token_rejects_an_answer_of_the_wrong_length():
    rollouts = Rollouts.from_lists([[1]], [[5, 9]])

    class Client:
        max_items_per_request = 8

        def post(self, path, payload):
            return {"logprobs": [[0.0]]}  # two response tokens, one answer

    with pytest.raises(ValueError, match="logprobs"):
        post_per_token(Client(), "/logprobs", "logprobs", rollouts)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("client_class", [HTTPClient, RemoteCritic, RemoteInitialPolicy], ids=lambda c: c.__name__)
def test_waiting_for_a_server_that_never_answers_is_bounded_and_names_it(client_class):
    url = f"http://127.0.0.1:{_free_port()}"  # nothing listens there
    client = client_class(url, timeout=0.2)
    start = time.monotonic()
    with pytest.raises(ServerUnavailableError, match=f"server at {url} not ready after 0.3 s"):
        if client_class is HTTPClient:
            client.wait_for_health(timeout=0.3, interval=0.05)
        else:
            client.wait_until_ready(timeout=0.3, interval=0.05)
    assert time.monotonic() - start < 5
    client.close()
