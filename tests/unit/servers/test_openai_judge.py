"""The separate judge's client (``model.spin.judge_endpoint``): what it sends an OpenAI-compatible server, the order
of its answers, the API key, and errors that name the URL."""

from __future__ import annotations

import re

import pytest

from nemo_aligner.algorithms.llm_judge import constrained_judgement_max_tokens, constrained_judgement_regex
from nemo_aligner.errors import ServerUnavailableError
from nemo_aligner.servers.client import ServerRequestError
from nemo_aligner.servers.openai_judge import OpenAIJudge

from tests.helpers import FakeJudgeServer


def test_judge_sends_one_chat_request_per_text_and_keeps_their_order(monkeypatch):
    monkeypatch.setenv("MY_JUDGE_KEY", "k-123")
    with FakeJudgeServer(lambda content, payload: f"echo {content}") as server:
        judge = OpenAIJudge(server.base_url, "big-judge", api_key_env="MY_JUDGE_KEY", max_concurrency=4)
        texts = [f"request {i}" for i in range(10)]
        answers = judge.judge(texts, seeds=list(range(100, 110)), temperature=0.7, top_p=0.9, max_tokens=33,
                              regex="[a-z]{0,4}Score: (0|1)")
        judge.close()
    assert answers == [f"echo request {i}" for i in range(10)]
    by_text = {p["messages"][0]["content"]: (p, h) for p, h in server.requests}
    assert len(by_text) == 10
    payload, headers = by_text["request 3"]
    assert payload["model"] == "big-judge" and payload["messages"] == [{"role": "user", "content": "request 3"}]
    assert (payload["seed"], payload["temperature"], payload["top_p"], payload["max_tokens"]) == (103, 0.7, 0.9, 33)
    assert payload["structured_outputs"] == {"regex": "[a-z]{0,4}Score: (0|1)"}
    assert headers["authorization"] == "Bearer k-123"


def test_judge_without_regex_or_key_sends_neither(monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("NEMO_ALIGNER_API_TOKEN", raising=False)
    with FakeJudgeServer(lambda content, payload: "Score: 3") as server:
        judge = OpenAIJudge(server.base_url, "m")
        assert judge.judge(["a"], [1], 0.0, 1.0, 8) == ["Score: 3"]
    payload, headers = server.requests[0]
    assert "structured_outputs" not in payload and "authorization" not in headers


def test_judge_errors_name_the_url():
    with pytest.raises(ValueError, match="judge_model"):
        OpenAIJudge("http://127.0.0.1:9/v1", "")
    judge = OpenAIJudge("http://127.0.0.1:9/v1", "m", timeout=1.0)
    judge.client.max_retries, judge.client.backoff = 0, 0.0
    with pytest.raises(ServerUnavailableError, match="127.0.0.1:9/v1/chat/completions"):
        judge.judge(["a"], [1], 0.0, 1.0, 8)
    with FakeJudgeServer(lambda content, payload: "x") as server:
        broken = OpenAIJudge(server.base_url.replace("/v1", "/nope"), "m")
        with pytest.raises(ServerRequestError, match="404"):
            broken.judge(["a"], [1], 0.0, 1.0, 8)


def test_constrained_judgement_regex_admits_bounded_justifications_ending_in_an_allowed_score():
    choices = [str(s) for s in range(6)]
    regex = re.compile(constrained_judgement_regex("Score: ", choices, 12))
    assert regex.fullmatch("Good answer\nScore: 4")  # 12 characters, then the prefix and a score
    assert regex.fullmatch("Score: 0")
    assert not regex.fullmatch("Good answer!\nScore: 4")  # 13 characters of justification
    assert not regex.fullmatch("ok Score: 6") and not regex.fullmatch("ok Score: 4 more")
    meta = re.compile(constrained_judgement_regex("Winner: Judgement ", ["A", "B"], 4))
    assert meta.fullmatch("A..  Winner: Judgement B") is None and meta.fullmatch("A.  Winner: Judgement B")
    # one token is at least one character: this many new tokens always reach the score
    assert constrained_judgement_max_tokens("Score: ", choices, 12) == 12 + 7 + 1
    assert constrained_judgement_regex("a.b (x)", ["1"], 0) == r"[\s\S]{0,0}a\.b \(x\)(1)"
