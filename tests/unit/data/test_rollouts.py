"""The typed rollout batch (nemo_aligner.data.rollouts.Rollouts): round trips (select, split, cat, the servers' JSON
payload), the model batch it builds, bad input, and the PPO / RS rollout metrics against hand computations."""

import json
import math
from types import SimpleNamespace

import pytest
import torch

from nemo_aligner.algorithms.online import score_rewards
from nemo_aligner.algorithms.ppo import rollout_metrics
from nemo_aligner.algorithms.rs import RSConfig, RSTrainer
from nemo_aligner.data.rollouts import TOKEN_FLOAT_FIELDS, PayloadError, Rollouts

PROMPTS = [[1, 5], [1, 6, 7], [1, 5]]
RESPONSES = [[9, 10, 2], [11], [12, 13]]


def example() -> Rollouts:
    """3 rollouts (responses of 3, 1 and 2 tokens) with every optional field set to distinct values."""
    torch.manual_seed(0)
    out = Rollouts.from_lists(PROMPTS, RESPONSES, ended=[True, False, True], prompt_index=[0, 1, 0],
                              sample_index=[0, 0, 1], rewards=[0.5, -1.25, 2.0])
    for name in TOKEN_FLOAT_FIELDS:
        setattr(out, name, torch.randn(6))
    return out


def assert_same(a: Rollouts, b: Rollouts) -> None:
    for name in a.__dataclass_fields__:
        x, y = getattr(a, name), getattr(b, name)
        assert (x is None and y is None) or (x.dtype == y.dtype and torch.equal(x, y)), name


# ---------------------------------------------------------------------------------------------------------------
# layout and round trips
# ---------------------------------------------------------------------------------------------------------------
def test_from_lists_layout_and_per_rollout_views():
    r = Rollouts.from_lists(PROMPTS, RESPONSES, ended=[True, False, True])
    assert len(r) == 3 and r.num_response_tokens == 6
    assert r.prompt_ids.tolist() == [1, 5, 1, 6, 7, 1, 5] and r.prompt_lengths.tolist() == [2, 3, 2]
    assert r.response_ids.tolist() == [9, 10, 2, 11, 12, 13] and r.response_lengths.tolist() == [3, 1, 2]
    assert r.prompts() == PROMPTS and r.responses() == RESPONSES
    assert r.sequences() == [p + q for p, q in zip(PROMPTS, RESPONSES)]
    assert r.token_seq_id().tolist() == [0, 0, 0, 1, 2, 2]
    assert r.ended.dtype == torch.bool and r.ended.tolist() == [True, False, True]
    assert r.prompt_index.tolist() == [0, 1, 2] and r.sample_index.tolist() == [0, 0, 0]  # the defaults
    assert r.rewards is None and all(getattr(r, name) is None for name in TOKEN_FLOAT_FIELDS)


def test_per_token_and_per_sequence_are_exact_inverses():
    r = Rollouts.from_lists(PROMPTS, RESPONSES)
    flat = torch.randn(6)  # float32 values: exact through Python floats
    lists = r.per_sequence(flat)
    assert [len(v) for v in lists] == [3, 1, 2]
    back = r.per_token(lists)
    assert back.dtype == torch.float32 and torch.equal(back, flat)
    with pytest.raises(ValueError, match=r"values\[1\] has 2 entries for a response of 1 tokens"):
        r.per_token([[0.0] * 3, [0.0, 0.0], [0.0] * 2])
    with pytest.raises(ValueError, match="2 lists for 3 rollouts"):
        r.per_token([[0.0] * 3, [0.0]])


def test_select_carries_every_field_in_the_given_order():
    r = example()
    picked = r.select([2, 0, 2])
    assert picked.prompts() == [PROMPTS[2], PROMPTS[0], PROMPTS[2]]
    assert picked.responses() == [RESPONSES[2], RESPONSES[0], RESPONSES[2]]
    assert picked.ended.tolist() == [True, True, True] and picked.sample_index.tolist() == [1, 0, 1]
    assert picked.rewards.tolist() == [2.0, 0.5, 2.0] and picked.rewards.dtype == torch.float64
    tokens = [4, 5, 0, 1, 2, 4, 5]  # rollout 2's tokens, rollout 0's, rollout 2's again
    for name in TOKEN_FLOAT_FIELDS:
        assert torch.equal(getattr(picked, name), getattr(r, name)[tokens]), name
    assert_same(r.select(range(3)), r)
    empty = r.select([])
    assert len(empty) == 0 and empty.num_response_tokens == 0 and empty.values.shape == (0,)
    assert empty.prompts() == [] and empty.to_payload() == {"token_ids": [], "prompt_lengths": []}
    assert len(Rollouts.from_lists([], [], rewards=[])) == 0


def test_split_then_cat_is_the_identity():
    r = example()
    parts = r.split(2)
    assert [len(p) for p in parts] == [2, 1]
    assert [p.num_response_tokens for p in parts] == [4, 2]
    assert parts[1].responses() == [RESPONSES[2]] and torch.equal(parts[1].values, r.values[4:])
    assert_same(Rollouts.cat(parts), r)
    assert_same(Rollouts.cat(r.split(1)), r)
    assert len(r.split(10)) == 1
    with pytest.raises(ValueError, match="micro_batch_size"):
        r.split(0)
    with pytest.raises(ValueError, match="at least one"):
        Rollouts.cat([])
    # a field that one part lacks is dropped
    bare = Rollouts.from_lists([[1]], [[4]])
    assert Rollouts.cat([r, bare]).values is None and len(Rollouts.cat([r, bare])) == 4


def test_sequence_batch_targets_are_the_response_tokens():
    r = example()
    batch = r.sequence_batch(pad_token_id=0)
    assert batch.targets.tolist() == r.response_ids.tolist()
    assert batch.target_lengths.tolist() == r.response_lengths.tolist()
    assert torch.equal(batch.seq_id, r.token_seq_id())
    assert batch.input_ids.tolist() == [[1, 5, 9, 10, 2], [1, 6, 7, 11, 0], [1, 5, 12, 13, 0]]
    # the position predicting response token t is the one before it (the last prompt token predicts the first)
    assert list(zip(batch.pred_row.tolist(), batch.pred_col.tolist())) == [(0, 1), (0, 2), (0, 3), (1, 2), (2, 1),
                                                                            (2, 2)]
    packed = r.sequence_batch(0, pack=True, max_row_length=12)
    assert packed.packed and sorted(packed.targets.tolist()) == sorted(r.response_ids.tolist())


def test_bad_shapes_are_refused():
    r = example()
    with pytest.raises(ValueError, match=r"values has shape \(5,\), expected \(6,\)"):
        Rollouts(**{**{k: getattr(r, k) for k in r.__dataclass_fields__}, "values": torch.zeros(5)})
    with pytest.raises(ValueError, match="rewards has shape"):
        Rollouts(**{**{k: getattr(r, k) for k in r.__dataclass_fields__}, "rewards": torch.zeros(2)})
    with pytest.raises(ValueError, match="at least one token"):
        Rollouts.from_lists([[1]], [[]])
    with pytest.raises(ValueError, match="2 prompts but 1 responses"):
        Rollouts.from_lists([[1], [2]], [[3]])
    with pytest.raises(ValueError, match="unknown per-token rollout fields"):
        Rollouts.from_lists([[1]], [[3]], value=[[0.5]])


# ---------------------------------------------------------------------------------------------------------------
# the servers' JSON payload
# ---------------------------------------------------------------------------------------------------------------
def test_payload_format_and_round_trip_through_json():
    r = example()
    payload = r.to_payload()
    assert payload == {"token_ids": [[1, 5, 9, 10, 2], [1, 6, 7, 11], [1, 5, 12, 13]], "prompt_lengths": [2, 3, 2]}
    with_floats = json.loads(json.dumps(r.to_payload(per_token=("values", "returns"))))
    assert with_floats["values"] == r.per_sequence(r.values)
    back = Rollouts.from_payload(with_floats, vocab_size=32, per_token=("values", "returns"))
    assert back.sequences() == r.sequences() and torch.equal(back.prompt_lengths, r.prompt_lengths)
    assert torch.equal(back.values, r.values) and torch.equal(back.returns, r.returns)  # float32 bits survive JSON
    assert back.logprobs is None and back.rewards is None and back.ended.tolist() == [False] * 3


@pytest.mark.parametrize("body, message", [
    ({}, "send non-empty lists 'token_ids' and 'prompt_lengths' of the same length"),
    ({"token_ids": [[1, 2]], "prompt_lengths": [1, 1]}, "of the same length"),
    ({"token_ids": [[1, 2.5]], "prompt_lengths": [1]}, r"token_ids\[0\] must be a list of integers"),
    ({"token_ids": [[1, 2], [1, True]], "prompt_lengths": [1, 1]}, r"token_ids\[1\] must be a list of integers"),
    ({"token_ids": [[1, 40]], "prompt_lengths": [1]}, r"token_ids\[0\] holds an id outside the vocabulary \[0, 32\)"),
    ({"token_ids": [[1, 2]], "prompt_lengths": [2]}, r"prompt_lengths\[0\]=2 must be an integer in \[1, 1\]"),
    ({"token_ids": [[1, 2, 3]], "prompt_lengths": [1]}, "'values' must be a list with one list of floats per sequence"),
    ({"token_ids": [[1, 2, 3]], "prompt_lengths": [1], "values": [[0.5]]},
     r"values\[0\] must hold 2 numbers \(one per response token\)"),
    ({"token_ids": [[1, 2, 3]], "prompt_lengths": [1], "values": [[0.5, "x"]]}, r"values\[0\] must hold 2 numbers"),
])
def test_bad_payloads_name_the_field(body, message):
    with pytest.raises(PayloadError, match=message):
        Rollouts.from_payload(body, vocab_size=32, per_token=("values",))


# ---------------------------------------------------------------------------------------------------------------
# rewards and metrics, by hand
# ---------------------------------------------------------------------------------------------------------------
def test_score_rewards_sets_float64_rewards_in_micro_batches():
    r = Rollouts.from_lists(PROMPTS, RESPONSES)
    calls = []

    def reward_fn(prompt_ids, response_ids):
        calls.append((prompt_ids, response_ids))
        return [len(p) + 0.1 * len(q) for p, q in zip(prompt_ids, response_ids)]

    assert score_rewards(reward_fn, r, micro_batch_size=2) == [2.3, 3.1, 2.2]
    assert calls == [(PROMPTS[:2], RESPONSES[:2]), (PROMPTS[2:], RESPONSES[2:])]
    assert r.rewards.dtype == torch.float64 and r.rewards.tolist() == [2.3, 3.1, 2.2]
    with pytest.raises(RuntimeError, match="returned 1 scores for 3 responses"):
        score_rewards(lambda p, q: [0.0], r)


def test_ppo_rollout_metrics_by_hand():
    r = example()  # rewards 0.5, -1.25, 2.0; response lengths 3, 1, 2; ended True, False, True
    m = rollout_metrics(r)
    mean = (0.5 - 1.25 + 2.0) / 3
    std = math.sqrt(((0.5 - mean) ** 2 + (-1.25 - mean) ** 2 + (2.0 - mean) ** 2) / 2)
    assert m["rewards_mean"] == pytest.approx(mean, rel=1e-6)
    assert m["rewards_std"] == pytest.approx(std, rel=1e-6)
    assert m["response_lengths_mean"] == 2.0 and m["response_lengths_max"] == 3.0
    assert m["ended_fraction"] == 2 / 3
    assert rollout_metrics(r.select([1]))["rewards_std"] == 0.0  # one rollout: no spread


def test_rs_selection_keeps_the_best_rollouts_of_each_prompt():
    """2 prompts x 3 samples; rewards [1, 3, 2] and [0, 0, 6]: top 2 are samples (1, 2) of prompt 0 and (2, 0)
    of prompt 1 (the tie between samples 0 and 1 goes to the first)."""
    responses = [[10], [11, 12], [13, 14, 15], [16], [17], [18, 19, 20, 21]]
    r = Rollouts.from_lists([[1, 2]] * 3 + [[1, 3]] * 3, responses, ended=[True, False, True, True, True, False],
                            prompt_index=[0, 0, 0, 1, 1, 1], sample_index=[0, 1, 2] * 2,
                            rewards=[1.0, 3.0, 2.0, 0.0, 0.0, 6.0])
    cfg = RSConfig(num_rollouts_per_prompt=3, top_n_rollouts=2)
    kept, m = RSTrainer.select(SimpleNamespace(cfg=cfg), r, num_prompts=2)
    assert kept.responses() == [responses[1], responses[2], responses[5], responses[3]]
    assert kept.sample_index.tolist() == [1, 2, 2, 0] and kept.prompt_index.tolist() == [0, 0, 1, 1]
    assert kept.rewards.tolist() == [3.0, 2.0, 6.0, 0.0]
    assert m["rewards_all_mean"] == pytest.approx(2.0)
    assert m["rewards_kept_mean"] == pytest.approx(11.0 / 4)
    assert m["rewards_best_mean"] == pytest.approx(4.5)
    assert m["reward_spread_mean"] == pytest.approx(4.0)  # ((3 - 1) + (6 - 0)) / 2
    assert m["response_lengths_all_mean"] == pytest.approx(12 / 6)
    assert m["response_lengths_kept_mean"] == pytest.approx((2 + 3 + 4 + 1) / 4)
    assert m["ended_fraction"] == 4 / 6
