"""The reward-model server (nemo_aligner.servers.reward_model_server) and its entry script, on a tiny saved RM.

Servers listen on 127.0.0.1 only; every request loop is bounded.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient
from omegaconf import OmegaConf

from tests.helpers import REPO, compose_config, load_example_script
from nemo_aligner.errors import UserError
from nemo_aligner.models.reward_model import MAX_SEQ_LENGTH_KEY, RewardScorer
from nemo_aligner.servers.app import API_TOKEN_ENV, BackgroundServer
from nemo_aligner.servers.client import RewardModelClient, ServerRequestError
from nemo_aligner.servers.reward_model_server import build_reward_model_app

MAX_LEN = 48
PROMPTS = [
    "Human: How do I bake bread?",
    "What is two plus two?",
    [{"role": "user", "content": "Tell me something rude."}],
    "the quick brown fox",
]
RESPONSES = [
    "Mix flour, water, yeast and salt, then bake.",
    "Two plus two is four.",
    [{"role": "assistant", "content": "I would rather not be rude."}],
    "jumps over the lazy dog",
]


@pytest.fixture(scope="module")
def rm_dir(tmp_path_factory, tokenizer):
    """A saved tiny LlamaForSequenceClassification (num_labels=1) plus tokenizer, max_seq_length 48."""
    from transformers import LlamaConfig, LlamaForSequenceClassification

    torch.manual_seed(0)
    cfg = LlamaConfig(
        num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=len(tokenizer), max_position_embeddings=512, bos_token_id=1, eos_token_id=2, pad_token_id=0,
        num_labels=1,
    )
    model = LlamaForSequenceClassification(cfg)
    torch.nn.init.normal_(model.score.weight, std=1.0)  # rewards spread well beyond float noise
    setattr(model.config, MAX_SEQ_LENGTH_KEY, MAX_LEN)
    path = tmp_path_factory.mktemp("tiny_rm")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


class CountingScorer:
    """Delegates to a RewardScorer and records every ``score`` call (the server's micro-batches)."""

    def __init__(self, scorer, fail_on_length: int | None = None):
        self.inner = scorer
        self.calls: list[int] = []
        self.fail_on_length = fail_on_length
        self.lock = threading.Lock()

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def score(self, sequences, micro_batch_size=None):
        with self.lock:
            self.calls.append(len(sequences))
        if self.fail_on_length is not None and any(len(s) == self.fail_on_length for s in sequences):
            raise RuntimeError("model exploded")
        return self.inner.score(sequences, micro_batch_size=micro_batch_size)


@pytest.fixture(scope="module")
def scorer(rm_dir):
    return RewardScorer.from_pretrained(str(rm_dir))


@pytest.fixture()
def no_env_token(monkeypatch):
    monkeypatch.delenv(API_TOKEN_ENV, raising=False)


def _sequences(scorer):
    texts = [scorer.encode(p, r) for p, r in zip(PROMPTS, RESPONSES)]
    plain = [[1, 7 + k, 20 + 3 * k, 40, 2][: 3 + k % 3] for k in range(12)]
    return texts, plain


def test_concurrent_clients_match_direct_scores_and_requests_are_batched(scorer, no_env_token):
    counting = CountingScorer(scorer)
    app = build_reward_model_app(counting, micro_batch_size=8, max_wait_ms=50, api_token="tok")
    texts, plain = _sequences(scorer)
    expected_text = [scorer.score([s])[0] for s in texts]  # one at a time: no padding at all
    expected_plain = [scorer.score([s])[0] for s in plain]
    assert len(set(round(r, 4) for r in expected_text + expected_plain)) > 8  # rewards really differ

    num_threads, per_thread = 16, 3
    results: dict[int, list] = {}
    errors: list[BaseException] = []
    barrier = threading.Barrier(num_threads, timeout=30)

    def worker(t):
        try:
            with RewardModelClient(url, api_token="tok", timeout=30, max_retries=0) as client:
                barrier.wait()
                out = []
                for k in range(per_thread):
                    if (t + k) % 2 == 0:
                        i = (t + k) % len(PROMPTS)
                        out.append(("text", i, client.score([PROMPTS[i]], [RESPONSES[i]])))
                    else:
                        i = (t * per_thread + k) % len(plain)
                        out.append(("ids", i, client.score_token_ids([plain[i], plain[(i + 1) % len(plain)]])))
                results[t] = out
        except BaseException as err:  # noqa: BLE001 - reported below
            errors.append(err)

    with BackgroundServer(app) as url:
        threads = [threading.Thread(target=worker, args=(t,)) for t in range(num_threads)]
        for th in threads:
            th.start()
        for th in threads:
            th.join(60)
        info = RewardModelClient(url, api_token="tok").info()
    assert not errors, errors
    assert len(results) == num_threads
    for out in results.values():
        for kind, i, rewards in out:
            if kind == "text":
                assert rewards == pytest.approx([expected_text[i]], abs=1e-4)
            else:
                assert rewards == pytest.approx([expected_plain[i], expected_plain[(i + 1) % len(plain)]], abs=1e-4)
    num_requests = num_threads * per_thread
    assert info["counters"]["requests"] == num_requests
    assert len(counting.calls) == info["counters"]["micro_batches"]
    assert len(counting.calls) < num_requests  # concurrent requests were gathered into shared micro-batches
    assert max(counting.calls) > 2 and max(counting.calls) <= 8


def test_chat_messages_and_token_ids_agree(scorer, no_env_token):
    client = TestClient(build_reward_model_app(scorer, micro_batch_size=4, max_wait_ms=1))
    r = client.post("/score", json={"prompts": PROMPTS, "responses": RESPONSES})
    assert r.status_code == 200, r.text
    by_text = r.json()["rewards"]
    ids = [scorer.encode(p, q) for p, q in zip(PROMPTS, RESPONSES)]
    by_ids = client.post("/score", json={"token_ids": ids}).json()["rewards"]
    assert by_text == pytest.approx(by_ids, abs=1e-5)
    assert by_text == pytest.approx(scorer.score(ids), abs=1e-4)


@pytest.mark.parametrize(
    "body, status, fragment",
    [
        (b"{not json", 400, "not valid JSON"),
        (b"", 400, "empty"),
        (b"[1, 2]", 422, "JSON object"),
        (b'{"prompts": ["a"], "responses": ["b"], "extra": 1}', 422, "unknown field(s) ['extra']"),
        (b'{"prompts": ["a"]}', 422, "missing field 'responses'"),
        (b'{"foo": 1}', 422, "unknown field"),
        (b"{}", 422, "missing fields"),
        (b'{"prompts": [], "responses": []}', 422, "'prompts' is empty"),
        (b'{"prompts": "a", "responses": "b"}', 422, "'prompts' must be a list"),
        (b'{"prompts": ["a", 3], "responses": ["b", "c"]}', 422, "prompts[1] must be a string"),
        (b'{"prompts": ["a"], "responses": [[{"role": "user"}]]}', 422, "responses[0]"),
        (b'{"prompts": ["a", "b"], "responses": ["c"]}', 422, "2 prompts but 1 responses"),
        (b'{"prompts": ["a"], "responses": ["b"], "token_ids": [[1]]}', 422, "not both"),
        (b'{"token_ids": []}', 422, "'token_ids' is empty"),
        (b'{"token_ids": [1, 2]}', 422, "token_ids[0] must be a list"),
        (b'{"token_ids": [[1, 2], []]}', 422, "token_ids[1] is empty"),
        (b'{"token_ids": [[1, "x"]]}', 422, "token_ids[0][1] must be an int"),
        (b'{"token_ids": [[1, 2.5]]}', 422, "token_ids[0][1] must be an int"),
        (b'{"token_ids": [[true]]}', 422, "token_ids[0][0] must be an int"),
        (b'{"token_ids": [[1, -4]]}', 422, "outside the vocabulary"),
        (b'{"token_ids": [[1], [2, 99999]]}', 422, "token_ids[1][1] = 99999 is outside the vocabulary"),
        (b'{"token_ids": [[1], [2, 3], ' + b"[" + b", ".join([b"5"] * (MAX_LEN + 1)) + b"]]}", 422,
         f"item 2 has {MAX_LEN + 1} tokens, more than the model's max_seq_length of {MAX_LEN}"),
    ],
)
def test_bad_requests_get_4xx_and_the_server_keeps_serving(scorer, no_env_token, body, status, fragment):
    client = TestClient(build_reward_model_app(scorer, micro_batch_size=2, max_wait_ms=1), raise_server_exceptions=False)
    r = client.post("/score", content=body, headers={"Content-Type": "application/json"})
    assert r.status_code == status, r.text
    assert fragment in r.json()["error"]
    good = client.post("/score", json={"token_ids": [[1, 5, 9]]})
    assert good.status_code == 200 and len(good.json()["rewards"]) == 1


def test_too_long_text_names_the_item_and_limits_are_enforced(scorer, no_env_token):
    app = build_reward_model_app(scorer, micro_batch_size=2, max_wait_ms=1, max_items_per_request=3,
                                 max_request_bytes=4000)
    client = TestClient(app)
    long_response = "the quick brown fox jumps over the lazy dog " * 10
    r = client.post("/score", json={"prompts": ["a", "b"], "responses": ["short", long_response]})
    assert r.status_code == 422 and r.json()["error"].startswith("item 1 has ")
    r = client.post("/score", json={"token_ids": [[1]] * 4})
    assert r.status_code == 422 and "4 items in one request; the limit is 3" in r.json()["error"]
    r = client.post("/score", json={"token_ids": [[1] * 40] * 3, "pad": "x" * 4000})
    assert r.status_code == 413
    assert client.post("/score", json={"prompts": ["a"], "responses": ["b"]}).status_code == 200


def test_auth_missing_or_wrong_token_is_401(scorer, no_env_token):
    client = TestClient(build_reward_model_app(scorer, micro_batch_size=2, max_wait_ms=1, api_token="k3y"))
    body = {"token_ids": [[1, 2, 3]]}
    assert client.post("/score", json=body).status_code == 401
    assert client.post("/score", json=body, headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert client.get("/info").status_code == 401
    assert client.get("/health").json() == {"status": "ok"}
    r = client.post("/score", json=body, headers={"Authorization": "Bearer k3y"})
    assert r.status_code == 200 and len(r.json()["rewards"]) == 1


def test_model_failure_is_500_for_its_request_only(scorer, no_env_token):
    failing = CountingScorer(scorer, fail_on_length=7)
    client = TestClient(build_reward_model_app(failing, micro_batch_size=2, max_wait_ms=1),
                        raise_server_exceptions=False)
    r = client.post("/score", json={"token_ids": [[1] * 7]})
    assert r.status_code == 500 and "model exploded" in r.json()["error"]
    assert client.post("/score", json={"token_ids": [[1] * 6]}).status_code == 200


def test_info_reports_model_and_counters(scorer, rm_dir, no_env_token):
    client = TestClient(build_reward_model_app(scorer, micro_batch_size=3, max_wait_ms=2.5))
    client.post("/score", json={"token_ids": [[1, 2], [3, 4], [5, 6], [7, 8]]})
    info = client.get("/info").json()
    assert info["max_seq_length"] == MAX_LEN and info["micro_batch_size"] == 3 and info["max_wait_ms"] == 2.5
    assert info["vocab_size"] == len(scorer.tokenizer)
    assert info["model_name"] == str(rm_dir)
    assert info["reward_standardization"] == {"mean": 0.0, "std": 1.0}
    assert info["counters"]["items"] == 4 and info["counters"]["micro_batches"] == 2


def test_client_short_circuits_and_checks_lengths(no_env_token):
    client = RewardModelClient("http://127.0.0.1:9", max_retries=0, timeout=1)  # nothing is sent
    assert client.score([], []) == [] and client.score_token_ids([]) == []
    with pytest.raises(ValueError, match="2 prompts but 1 responses"):
        client.score(["a", "b"], ["c"])


def test_client_splits_large_inputs(scorer, no_env_token):
    app = build_reward_model_app(scorer, micro_batch_size=4, max_wait_ms=1, max_items_per_request=3)
    seqs = [[1, 5 + k, 9] for k in range(8)]
    with BackgroundServer(app) as url:
        client = RewardModelClient(url, max_items_per_request=3)
        rewards = client.score_token_ids(seqs)
        assert client.info()["counters"]["requests"] == 3
        with pytest.raises(ServerRequestError) as err:
            RewardModelClient(url, max_items_per_request=10).score_token_ids(seqs)
        assert err.value.status_code == 422
    assert rewards == pytest.approx(scorer.score(seqs), abs=1e-4)


# ---- entry script --------------------------------------------------------------------------------------------------
def _cfg(**overrides):
    cfg = compose_config("inference_rm")
    for key, value in overrides.items():
        OmegaConf.update(cfg, key, value, force_add=True)
    return cfg


def test_entry_script_builds_a_working_server(rm_dir, no_env_token):
    module = load_example_script("serve_reward_model")
    app, serve = module.build(_cfg(rm_model_file=str(rm_dir), **{
        "inference.micro_batch_size": 2, "inference.api_token": "t", "trainer.accelerator": "cpu",
        "model.reward_standardization.enable": True, "model.reward_standardization.mean": 1.0,
        "model.reward_standardization.std": 2.0,
    }))
    assert serve == {"host": "127.0.0.1", "port": 5555, "allow_remote": False, "log_level": "warning"}
    raw = RewardScorer.from_pretrained(str(rm_dir)).score([[1, 5, 9]])[0]
    client = TestClient(app)
    r = client.post("/score", json={"token_ids": [[1, 5, 9]]}, headers={"Authorization": "Bearer t"})
    assert r.json()["rewards"] == pytest.approx([(raw - 1.0) / 2.0], abs=1e-5)


@pytest.mark.parametrize(
    "overrides, fragment",
    [
        ({"inference.micro_batch_sise": 2}, "unknown config key 'inference.micro_batch_sise'"),
        ({"inference.host": "0.0.0.0"}, "allow_remote"),
        ({"rm_model_file": None}, "no reward model given"),
        ({"rm_model_file": "/nonexistent/rm"}, "is not a directory"),
        ({"trainer.devices": 2}, "one replica per process"),
    ],
)
def test_entry_script_user_errors(rm_dir, overrides, fragment):
    module = load_example_script("serve_reward_model")
    overrides = {"rm_model_file": str(rm_dir), **overrides}
    with pytest.raises(UserError, match=fragment.replace("(", r"\(").replace("[", r"\[")):
        module.build(_cfg(**overrides))


def test_entry_script_command_line_error_exits_2(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(REPO / "examples/nlp/gpt/serve_reward_model.py"), "inference.host=0.0.0.0",
         "rm_model_file=/nonexistent"],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("error: refusing to listen on non-loopback host '0.0.0.0'")


@pytest.mark.slow
def test_real_rm_export_end_to_end(no_env_token, smollm2_rm_export):
    """A SmolLM2 RM export (the RM quick start's, or one trained by the fixture) served on loopback."""
    scorer = RewardScorer.from_pretrained(str(smollm2_rm_export))
    app = build_reward_model_app(scorer, micro_batch_size=4, max_wait_ms=5)
    with BackgroundServer(app) as url:
        client = RewardModelClient(url, timeout=120)
        rewards = client.score(PROMPTS[:2], RESPONSES[:2])
    assert rewards == pytest.approx(scorer.score_texts(PROMPTS[:2], RESPONSES[:2]), abs=1e-3)


# ---- hostile requests (issue 10 items 16 and 18) -------------------------------------------------------------------
def test_huge_prompt_gets_a_fast_422_and_does_not_delay_a_concurrent_request(scorer, no_env_token):
    import httpx

    app = build_reward_model_app(scorer, micro_batch_size=2, max_wait_ms=1, max_request_bytes=64 * 1024 * 1024)
    huge = "the quick brown fox jumps over the lazy dog " * (20_000_000 // 44)  # ~20 MB, ~13M tokens here
    out: dict[str, tuple[int, float, str]] = {}

    def post(name, payload, timeout):
        start = time.perf_counter()
        try:
            r = httpx.post(url + "/score", json=payload, timeout=timeout)
            out[name] = (r.status_code, time.perf_counter() - start, r.text)
        except httpx.TimeoutException:
            out[name] = (0, time.perf_counter() - start, "timed out")

    with BackgroundServer(app) as url:
        httpx.post(url + "/score", json={"prompts": ["a"], "responses": ["b"]}, timeout=30)  # warm up
        pair = {"prompts": [PROMPTS[0]], "responses": [RESPONSES[0]]}
        threads = [threading.Thread(target=post, args=("huge", {"prompts": [huge], "responses": ["ok"]}, 10))]
        threads += [threading.Thread(target=post, args=(f"small{k}", pair, 10)) for k in range(3)]
        threads[0].start()
        for th in threads[1:]:  # one-pair requests while the huge one is uploaded, parsed and (before) tokenised
            time.sleep(0.2)
            th.start()
        for th in threads:
            th.join(30)
    status, seconds, text = out["huge"]
    assert status == 422, text
    assert "item 0 has " in text and "it was not tokenised" in text
    assert seconds < 1.0, seconds  # before: the full 20 MB was tokenised first (tens of seconds)
    for k in range(3):
        status, seconds, text = out[f"small{k}"]
        assert status == 200, text
        assert seconds < 1.0, (k, seconds)  # before: queued behind the huge prompt's tokenisation


def test_char_bound_never_rejects_what_fits_and_lossy_tokenizers_get_none(tokenizer):
    import random

    from nemo_aligner.servers.reward_model_server import max_chars_per_token

    bound = max_chars_per_token(tokenizer)
    assert bound == max(len(t) for t in tokenizer.get_vocab())  # byte-level BPE, no normaliser: factor 1
    rng = random.Random(0)
    alphabet = list("abcxyz ABC\n\t  .,!?0123") + ["é", "e\u0301", "日本", "🙂", "\u00a0", "#" * 20, " " * 30, "<|user|>"]
    for _ in range(200):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 200)))
        n = len(tokenizer(text, add_special_tokens=False)["input_ids"])
        assert len(text.strip()) <= n * bound, (text, n)

    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    def fast(model, normalizer=None, pre=None):
        tok = Tokenizer(model)
        if normalizer is not None:
            tok.normalizer = normalizer
        if pre is not None:
            tok.pre_tokenizer = pre
        return PreTrainedTokenizerFast(tokenizer_object=tok)

    wordpiece = models.WordPiece({"[UNK]": 0, "a": 1}, unk_token="[UNK]")
    assert max_chars_per_token(fast(wordpiece)) is None  # a whole unknown word is one token
    bpe = models.BPE({"a": 0, "b": 1, "ab": 2}, [("a", "b")])
    assert max_chars_per_token(fast(bpe)) == 2.0
    assert max_chars_per_token(fast(bpe, normalizers.NFC())) == 8.0  # composition merges <= 4 code points
    assert max_chars_per_token(fast(bpe, normalizers.StripAccents())) is None
    assert max_chars_per_token(fast(bpe, pre=pre_tokenizers.Whitespace())) is None  # drops whitespace
    assert max_chars_per_token(fast(bpe, normalizers.Replace("  ", " "))) == 4.0
    assert max_chars_per_token(object()) is None


def test_body_over_the_default_cap_gets_413(scorer, no_env_token):
    import httpx

    from nemo_aligner.servers.reward_model_server import default_max_request_bytes

    cap = default_max_request_bytes(MAX_LEN, 1024)
    assert cap == 1024 * 1024  # 16 * 48 * 1024 = 768 KiB, raised to the 1 MiB floor
    assert default_max_request_bytes(2048, 1024) == 32 * 1024 * 1024
    assert default_max_request_bytes(None, 1024) == default_max_request_bytes(10**6, 1024) == 64 * 1024 * 1024
    app = build_reward_model_app(scorer, micro_batch_size=2, max_wait_ms=1)
    client = TestClient(app)
    assert client.get("/info").json()["max_request_bytes"] == cap
    assert client.get("/info").json()["max_chars_per_item"] == MAX_LEN * max(len(t) for t in scorer.tokenizer.get_vocab())
    r = client.post("/score", json={"prompts": ["a" * cap], "responses": ["b"]})
    assert r.status_code == 413 and f"exceeds the limit of {cap}" in r.json()["error"]
    with BackgroundServer(app) as url:  # a real socket: the answer closes the connection, the rest is never read
        r = httpx.post(url + "/score", content=b"x" * (cap + 1), headers={"Content-Type": "application/json"},
                       timeout=10)
        assert r.status_code == 413 and r.headers.get("connection") == "close"


@pytest.mark.parametrize(
    "body, fragment",
    [
        ({"prompts": [[{"role": "robot", "content": "hi"}]], "responses": ["b"]},
         "prompts[0][0].role must be one of ['system', 'user', 'assistant'], got 'robot'"),
        ({"prompts": ["a", "b"], "responses": ["c", [{"role": "assistant", "content": "x"},
                                                      {"role": "Assistant", "content": "y"}]]},
         "responses[1][1].role must be one of"),
        ({"prompts": [[{"role": 3, "content": "hi"}]], "responses": ["b"]}, "prompts[0][0].role must be a string"),
        ({"prompts": [[{"role": "user", "content": None}]], "responses": ["b"]},
         "prompts[0][0].content must be a string"),
        ({"prompts": [[]], "responses": ["b"]}, "prompts[0] must be a string or a non-empty list"),
        ({"prompts": [["hi"]], "responses": ["b"]}, "prompts[0][0] must be a {'role': str, 'content': str} message"),
    ],
)
def test_unknown_chat_role_is_422_naming_the_field(scorer, no_env_token, body, fragment):
    client = TestClient(build_reward_model_app(scorer, micro_batch_size=2, max_wait_ms=1))
    r = client.post("/score", json=body)
    assert r.status_code == 422 and fragment in r.json()["error"], r.text
    ok = {"prompts": [[{"role": "system", "content": "Be kind."}, {"role": "user", "content": "hi"}]],
          "responses": [[{"role": "assistant", "content": "hello"}]]}
    assert client.post("/score", json=ok).status_code == 200


def test_rm_server_rejects_nested_json_and_text_plain(scorer, no_env_token):
    client = TestClient(build_reward_model_app(scorer, micro_batch_size=2, max_wait_ms=1),
                        raise_server_exceptions=False)
    r = client.post("/score", content=b'{"prompts": ' + b"[" * 50_000 + b"]" * 50_000 + b"}",
                    headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and "nested too deeply" in r.json()["error"]
    r = client.post("/score", content=b'{"prompts": ["a"], "responses": ["b"]}', headers={"Content-Type": "text/plain"})
    assert r.status_code == 415 and "'text/plain'" in r.json()["error"]


def test_entry_script_limits_come_from_the_config(rm_dir, no_env_token):
    module = load_example_script("serve_reward_model")
    app, _ = module.build(_cfg(rm_model_file=str(rm_dir), **{
        "inference.request_timeout_s": 7, "inference.keep_alive_timeout_s": 2.5, "inference.max_connections": 9,
        "trainer.accelerator": "cpu",
    }))
    assert (app.state.limits.request_timeout_s, app.state.limits.keep_alive_timeout_s,
            app.state.limits.max_connections) == (7, 2.5, 9)
    assert app.state.max_request_bytes == 1024 * 1024  # null: derived from max_seq_length 48 and 1024 items
    app, _ = module.build(_cfg(rm_model_file=str(rm_dir), **{"inference.max_request_bytes": 5000,
                                                             "trainer.accelerator": "cpu"}))
    assert app.state.max_request_bytes == 5000
    for key, value in (("request_timeout_s", 0), ("max_connections", -3), ("max_request_bytes", 0),
                       ("keep_alive_timeout_s", "soon")):
        with pytest.raises(ValueError, match=f"inference.{key} must be"):
            module.build(_cfg(rm_model_file=str(rm_dir), **{f"inference.{key}": value}))


def test_rm_server_takes_its_chat_roles_from_the_data_layer(scorer, no_env_token, monkeypatch):
    """One role rule (nemo_aligner.data.chat): a role added there is accepted by the server too; the server still
    wants it written exactly (it passes messages to the chat template unchanged), and its 422 names the field."""
    from nemo_aligner.data import chat

    client = TestClient(build_reward_model_app(scorer, micro_batch_size=2, max_wait_ms=1))
    tool = {"prompts": [[{"role": "user", "content": "hi"}, {"role": "tool", "content": "42"}]], "responses": ["b"]}
    r = client.post("/score", json=tool)
    assert r.status_code == 422 and "prompts[0][1].role must be one of" in r.json()["error"], r.text
    monkeypatch.setattr(chat, "CHAT_ROLES", (*chat.CHAT_ROLES, "tool"))
    assert client.post("/score", json=tool).status_code == 200
    shouted = {"prompts": [[{"role": "Tool", "content": "42"}]], "responses": ["b"]}
    assert client.post("/score", json=shouted).status_code == 422


# ---- pipelined requests on one connection (issue 25 item 3) --------------------------------------------------------
def _score_request(token_ids: list[list[int]]) -> bytes:
    body = json.dumps({"token_ids": token_ids}).encode()
    return (b"POST /score HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(body), body))


def _read_responses(sock, count: int, limit_s: float) -> tuple[list[tuple[int, dict, bytes]], bool]:
    """Read HTTP/1.1 responses (status, lower-cased headers, body) until ``count`` have arrived or the server closes
    the connection; the second value says whether it closed. Raises ``socket.timeout`` past ``limit_s``."""
    sock.settimeout(limit_s)
    data, responses, closed = b"", [], False
    while len(responses) < count and not closed:
        chunk = sock.recv(65536)
        closed = not chunk
        data += chunk
        while b"\r\n\r\n" in data:
            head, rest = data.split(b"\r\n\r\n", 1)
            lines = head.decode("latin-1").split("\r\n")
            headers = dict(line.lower().split(": ", 1) for line in lines[1:])
            size = int(headers.get("content-length", 0))
            if len(rest) < size:
                break
            responses.append((int(lines[0].split()[1]), headers, rest[:size]))
            data = rest[size:]
    return responses, closed


@pytest.mark.parametrize("half_close", [False, True], ids=["keep-writing-side-open", "client-half-closes"])
def test_pipelined_requests_are_all_answered_in_order(scorer, no_env_token, half_close):
    """Two (then three) /score requests written back to back in one sendall before reading get one 200 each, in
    order. ``client-half-closes``: the client then shuts down its sending side (as ``nc -N`` or ``ncat`` do); before,
    that EOF made uvicorn close the connection and none of the requests was answered."""
    import socket

    batches = [[[1, 5, 9]], [[1, 5, 9, 11, 13]], [[2, 4], [6, 8, 10]]]
    expected = [scorer.score(b) for b in batches]
    app = build_reward_model_app(scorer, micro_batch_size=2, max_wait_ms=1)
    with BackgroundServer(app) as url:
        port = int(url.rsplit(":", 1)[1])
        for n in (2, 3):
            with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
                sock.sendall(b"".join(_score_request(b) for b in batches[:n]))
                if half_close:
                    sock.shutdown(socket.SHUT_WR)
                responses, _ = _read_responses(sock, n, 10.0)
                assert [status for status, _, _ in responses] == [200] * n, responses
                for (_, _, body), want in zip(responses, expected):
                    assert json.loads(body)["rewards"] == pytest.approx(want, abs=1e-5)
                if half_close:  # everything asked was answered: the server closes, with nothing more
                    assert _read_responses(sock, 1, 10.0) == ([], True)
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:  # EOF mid-body: closed at once
            sock.sendall(_score_request(batches[0])[:-3])
            sock.shutdown(socket.SHUT_WR)
            assert _read_responses(sock, 1, 5.0) == ([], True)
