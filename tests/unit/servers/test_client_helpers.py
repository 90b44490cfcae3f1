"""The client helpers the PPO servers' clients share (servers/client.py): the rollout payload and the health poll."""

import json
import socket
import time

import numpy as np
import pytest
import torch

from nemo_aligner.errors import ServerUnavailableError
from nemo_aligner.servers.client import HTTPClient, rollout_payload
from nemo_aligner.servers.critic_server import RemoteCritic
from nemo_aligner.servers.initial_policy_server import RemoteInitialPolicy


def test_rollout_payload_is_plain_json_of_the_token_ids_and_prompt_lengths():
    rollouts = [{"input_ids": torch.tensor([1, 5, 9]), "prompt_length": np.int64(2), "values": [0.1]},
                {"input_ids": np.array([1, 7], dtype=np.int32), "prompt_length": 1}]
    payload = rollout_payload(rollouts)
    assert payload == {"token_ids": [[1, 5, 9], [1, 7]], "prompt_lengths": [2, 1]}
    assert json.loads(json.dumps(payload)) == payload  # plain ints only
    assert rollout_payload([]) == {"token_ids": [], "prompt_lengths": []}


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
