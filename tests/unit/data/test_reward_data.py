"""Reward-model data: every accepted format, truncation/drop counting, the cache, and located errors."""

import gzip
import json

import pytest
import torch

from nemo_aligner.data.jsonl import DataFormatError
from nemo_aligner.data.reward import build_reward_dataset, iter_reward_rows, truncate_responses
from nemo_aligner.data.reward_batch import collate_reward_examples


def write(path, records):
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "wt") as f:
        for r in records:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return path


def ids(tokenizer, text, special=False):
    return list(tokenizer(text, add_special_tokens=special)["input_ids"])


def rows(path, tokenizer, max_len=512, mode="truncate"):
    return list(iter_reward_rows(path, tokenizer, max_len, mode))


def test_text_pairs_split_at_the_shared_token_prefix(tmp_path, tokenizer):
    data = write(tmp_path / "t.jsonl", [
        {"text": "Human: tea? Assistant: yes please"}, {"text": "Human: tea? Assistant: no"},
        "",  # blank lines are skipped
        {"text": "Human: rain? Assistant: wet"}, {"text": "Human: rain? Assistant: dry"},
    ])
    out = rows(data, tokenizer)
    assert [r["line_no"] for r in out] == [1, 4]
    eos = tokenizer.eos_token_id
    for r, (c, j) in zip(out, [("Human: tea? Assistant: yes please", "Human: tea? Assistant: no"),
                               ("Human: rain? Assistant: wet", "Human: rain? Assistant: dry")]):
        assert r["prompt_ids"] + r["response_ids"][0] == ids(tokenizer, c, True) + [eos]
        assert r["prompt_ids"] + r["response_ids"][1] == ids(tokenizer, j, True) + [eos]
        assert r["response_ids"][0][0] != r["response_ids"][1][0]  # prompt = the whole shared prefix
        assert r["preferences"] == [1.0, 0.0]


def test_instruction_format_equals_the_dpo_prompt_format(tmp_path, tokenizer):
    a = write(tmp_path / "a.jsonl", [{"instruction": "Q: sky?", "chosen": " blue", "rejected": " green"}])
    b = write(tmp_path / "b.jsonl", [{"prompt": "Q: sky?", "chosen": " blue", "rejected": " green"}])
    ra, rb = rows(a, tokenizer)[0], rows(b, tokenizer)[0]
    assert ra == rb
    assert ra["prompt_ids"] == ids(tokenizer, "Q: sky?", True)
    assert ra["response_ids"] == [ids(tokenizer, " blue") + [2], ids(tokenizer, " green") + [2]]


def test_hh_rlhf_transcripts_and_chat_messages(tmp_path, tokenizer):
    hh = write(tmp_path / "hh.jsonl.gz", [{"chosen": "\n\nHuman: hi\n\nAssistant: hello", "rejected": "\n\nHuman: hi\n\nAssistant: go"}])
    r = rows(hh, tokenizer)[0]
    assert r["prompt_ids"] == ids(tokenizer, "\n\nHuman: hi\n\nAssistant:", True)
    assert r["response_ids"][1] == ids(tokenizer, " go") + [2]
    chat = write(tmp_path / "chat.jsonl", [{
        "prompt": [{"role": "user", "content": "hi"}],
        "responses": [[{"role": "assistant", "content": "a"}], [{"role": "assistant", "content": "b"}], "c"],
        "scores": [0.5, 2.0, -1.0],
    }])
    r = rows(chat, tokenizer)[0]
    assert r["prompt_ids"] == ids(tokenizer, "<|user|>hi</s><|assistant|>")
    assert r["response_ids"][2] == ids(tokenizer, "c</s>")
    assert r["preferences"] == [0.5, 2.0, -1.0]


def test_ranking_is_turned_into_preferences_larger_is_better(tmp_path, tokenizer):
    data = write(tmp_path / "r.jsonl", [{"prompt": "Q", "responses": ["a", "b", "c", "d"], "ranking": [2, 0, 1, 1]}])
    assert rows(data, tokenizer)[0]["preferences"] == [-2.0, 0.0, -1.0, -1.0]


@pytest.mark.parametrize("records, line, field", [
    ([{"text": "a"}, {"text": "b"}, {"text": "c"}], 3, "text"),  # unpaired chosen text
    ([{"text": "a"}, {"prompt": "p", "chosen": "x", "rejected": "y"}], 2, None),  # format switch mid-pair
    ([{"text": "same"}, {"text": "same"}], 2, "text"),
    ([{"prompt": "p", "chosen": "x", "rejected": "y"}, {"prompt": "p", "responses": ["a"], "scores": [1]}], 2, "responses"),
    ([{"prompt": "p", "responses": ["a", "b"], "scores": [1, "x"]}], 1, "scores[1]"),
    ([{"prompt": "p", "responses": ["a", "b"], "scores": [1, 1]}], 1, "scores"),
    ([{"prompt": "p", "responses": ["a", "b"], "ranking": [0]}], 1, "ranking"),
    ([{"prompt": "p", "responses": ["a", ""], "ranking": [0, 1]}], 1, "responses[1]"),
    ([{"prompt": "p", "responses": ["a", "b"]}], 1, None),
    ([{"instruction": 3, "chosen": "x", "rejected": "y"}], 1, "instruction"),
    ([{"instruction": "i", "chosen": "x"}], 1, "rejected"),
])
def test_errors_name_file_line_and_field(tmp_path, tokenizer, records, line, field):
    data = write(tmp_path / "bad.jsonl", records)
    with pytest.raises(DataFormatError) as info:
        rows(data, tokenizer)
    err = info.value
    assert (err.line_no, err.field) == (line, field)
    assert str(err).startswith(f"{data}:{line}: ")


def test_truncate_responses_uses_the_longest_response():
    prompt, resp = list(range(6)), [[10] * 7, [20] * 2, [30] * 3]
    # M=8, longest 7: keep the last 4 prompt tokens, cut every response to 4
    assert truncate_responses(prompt, resp, 8, "truncate") == ([2, 3, 4, 5], [[10] * 4, [20] * 2, [30] * 3])
    assert truncate_responses(prompt, [[1], [2]], 8, "truncate") == (prompt, [[1], [2]])  # fits: unchanged
    assert truncate_responses(prompt, resp, 8, "drop") is None


def test_cache_counts_truncation_and_drops_and_is_reused(tmp_path, tokenizer):
    data = write(tmp_path / "d.jsonl", [
        {"prompt": "Human: hi Assistant:", "chosen": " ok", "rejected": " no"},
        {"prompt": "Human: " + "tell me more " * 20 + "Assistant:", "chosen": " ok", "rejected": " no"},
        {"prompt": "Q", "responses": ["a", "b", "c"], "ranking": [0, 1, 2]},
    ])
    ds, stats = build_reward_dataset(data, tokenizer, 24, "truncate", cache_dir=tmp_path / "cache")
    assert (stats["num_lines"], stats["num_examples"], stats["num_truncated"], stats["num_dropped"]) == (3, 3, 1, 0)
    assert stats["num_comparisons"] == 1 + 1 + 3
    assert all(len(ds[1]["prompt_ids"]) + len(r) <= 24 for r in ds[1]["response_ids"])
    assert ds[2]["preferences"] == [0.0, -1.0, -2.0] and ds["line_no"] == [1, 2, 3]
    again, stats2 = build_reward_dataset(data, tokenizer, 24, "truncate", cache_dir=tmp_path / "cache")
    assert stats2["cache_path"] == stats["cache_path"] and again["prompt_ids"] == ds["prompt_ids"]
    _, dropped = build_reward_dataset(data, tokenizer, 24, "drop", cache_dir=tmp_path / "cache")
    assert (dropped["num_examples"], dropped["num_dropped"]) == (2, 1)


def test_bad_file_leaves_no_cache(tmp_path, tokenizer):
    data = write(tmp_path / "bad.jsonl", [{"text": "a"}])
    with pytest.raises(DataFormatError, match=r"bad.jsonl:1: field 'text'"):
        build_reward_dataset(data, tokenizer, 64, cache_dir=tmp_path / "cache")
    assert not [p for p in (tmp_path / "cache").iterdir()]


def test_collate_is_group_major(tokenizer):
    batch = collate_reward_examples([
        {"prompt_ids": [1, 5], "response_ids": [[6, 2], [7, 7, 2]], "preferences": [1.0, 0.0], "index": 3},
        {"prompt_ids": [1], "response_ids": [[8, 2], [9, 2], [4, 2]], "preferences": [0.0, 2.0, 1.0], "index": 4},
    ], pad_token_id=0)
    assert batch.group.tolist() == [0, 0, 1, 1, 1] and batch.num_groups == 2
    assert batch.preferences.tolist() == [1.0, 0.0, 0.0, 2.0, 1.0]
    seq = batch.sequences
    assert seq.seq_lengths.tolist() == [4, 5, 3, 3, 3]
    assert seq.input_ids[1, : 5].tolist() == [1, 5, 7, 7, 2]
    assert seq.last_col.tolist() == [3, 4, 2, 2, 2]
    assert seq.sample_index.tolist() == [3, 3, 4, 4, 4]
    assert batch.num_tokens == 18 and torch.equal(seq.input_ids[0, 4:], torch.tensor([0]))
