"""SFT data: assistant-token masks for every data format, caching, truncation and bad input. The SFT loss is
tests/unit/algorithms/test_sft_loss.py, end-to-end training tests/recipes/test_sft_training.py."""

import json

import pytest

from nemo_aligner.data.jsonl import DataFormatError
from nemo_aligner.data.chat import tokenize_prompt_response
from nemo_aligner.data.sft import (
    build_sft_dataset,
    truncate_sequence,
)

from tests.helpers import encode_sft_record as encode


def masked_runs(tokenizer, ids, mask):
    """Decoded text of each maximal run of mask-1 tokens."""
    runs, current = [], []
    for token, m in zip(ids, mask):
        if m:
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    return [tokenizer.decode(run) for run in runs]


# ---------------------------------------------------------------------------------------------------------------
# Masks: exactly the assistant tokens, per format
# ---------------------------------------------------------------------------------------------------------------


def test_multi_turn_chat_masks_every_assistant_turn_and_nothing_else(tokenizer):
    # The assistant says the same words as the user: a mask found by string search could not tell them apart.
    record = {"messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "two plus two"},
        {"role": "assistant", "content": "two plus two"},
        {"role": "user", "content": "and bread?"},
        {"role": "assistant", "content": "Mix flour."},
    ]}
    ids, mask = encode(tokenizer, record)
    assert len(ids) == len(mask)
    assert tokenizer.decode(ids) == (
        "<|system|>Be brief.</s><|user|>two plus two</s><|assistant|>two plus two</s>"
        "<|user|>and bread?</s><|assistant|>Mix flour.</s>"
    )
    assert masked_runs(tokenizer, ids, mask) == ["two plus two</s>", "Mix flour.</s>"]


def test_chat_ending_with_a_user_turn_trains_only_on_earlier_assistant_turns(tokenizer):
    record = {"messages": [
        {"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}, {"role": "user", "content": "bye"},
    ]}
    ids, mask = encode(tokenizer, record)
    assert masked_runs(tokenizer, ids, mask) == ["hello</s>"]
    assert tokenizer.decode(ids).endswith("<|user|>bye</s>") and mask[-1] == 0


def test_nemo_conversations_format(tokenizer):
    record = {
        "system": "You are kind.",
        "conversations": [
            {"from": "User", "value": "Tell me about tea."},
            {"from": "Assistant", "value": "Tea is lovely."},
            {"from": "User", "value": "More?"},
            {"from": "Assistant", "value": "It grows on bushes."},
        ],
        "mask": "User",
        "type": "VALUE_TO_TEXT",
    }
    ids, mask = encode(tokenizer, record)
    assert tokenizer.decode(ids).startswith("<|system|>You are kind.</s><|user|>Tell me about tea.</s>")
    assert masked_runs(tokenizer, ids, mask) == ["Tea is lovely.</s>", "It grows on bushes.</s>"]
    sharegpt = {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]}
    ids, mask = encode(tokenizer, sharegpt)
    assert masked_runs(tokenizer, ids, mask) == ["yo</s>"]


@pytest.mark.parametrize("record", [
    {"input": "What is two plus two?", "output": " Four."},
    {"prompt": "What is two plus two?", "response": " Four."},
    {"prompt": "What is two plus two?", "completion": " Four."},
    {"prompt": "What is two plus two?", "chosen": " Four.", "rejected": " Five."},
])
def test_plain_pairs_train_on_the_response_plus_eos(tokenizer, record):
    ids, mask = encode(tokenizer, record)
    assert tokenizer.decode(ids) == "What is two plus two? Four.</s>"
    assert masked_runs(tokenizer, ids, mask) == [" Four.</s>"]
    prompt_ids, response_ids = tokenize_prompt_response("What is two plus two?", " Four.", tokenizer)
    assert ids == prompt_ids + response_ids  # the same tokens DPO, reward models and PPO see


def test_pair_with_chat_flag_uses_the_chat_template(tokenizer):
    ids, mask = encode(tokenizer, {"input": "Hi", "output": "Hello"}, chat=True)
    assert tokenizer.decode(ids) == "<|user|>Hi</s><|assistant|>Hello</s>"
    assert masked_runs(tokenizer, ids, mask) == ["Hello</s>"]
    as_messages = encode(tokenizer, {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]})
    assert (ids, mask) == as_messages


def test_hh_transcript_trains_on_the_last_chosen_response(tokenizer):
    chosen = "\n\nHuman: How do I bake bread?\n\nAssistant: Knead it.\n\nHuman: Then?\n\nAssistant: Bake it."
    ids, mask = encode(tokenizer, {"chosen": chosen, "rejected": chosen[:-9] + " No."})
    assert tokenizer.decode(ids) == chosen + "</s>"
    assert masked_runs(tokenizer, ids, mask) == [" Bake it.</s>"]


# ---------------------------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------------------------

GOOD = {"input": "Hi", "output": "Hello"}


@pytest.mark.parametrize("bad, field", [
    ({"input": "Hi"}, "output"),
    ({"input": "Hi", "output": ""}, "output"),
    ({"input": "Hi", "output": 3}, "output"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant"}]}, "messages[1]"),
    ({"messages": [{"role": "user", "content": "hi"}]}, "messages"),
    ({"messages": "hi"}, "messages"),
    ({"conversations": [{"from": "User", "value": "a"}, {"from": "Bot", "value": "b"}]}, "conversations[1].from"),
    ({"conversations": [{"from": "User", "value": "a"}, {"from": "Assistant", "value": "b"}], "mask": "Assistant"}, "mask"),
    ({"conversations": [{"from": "User", "value": "a"}, {"from": "Assistant"}]}, "conversations[1]"),
    ({"conversations": [{"from": "User", "value": "a"}, {"from": "Assistant", "value": "b"}], "system": 1}, "system"),
    ({"chosen": "\n\nHuman: hi, no assistant turn"}, "chosen"),
    ({"prompt": "hi"}, "response"),
    ({"text": "hi"}, None),
])
def test_malformed_line_names_file_line_and_field(tmp_path, tokenizer, bad, field):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(GOOD) + "\n\n" + json.dumps(bad) + "\n")
    with pytest.raises(DataFormatError) as info:
        build_sft_dataset(path, tokenizer, 64, cache_dir=tmp_path / "cache")
    err = info.value
    assert (err.line_no, err.field) == (3, field)
    assert str(err).startswith(f"{path}:3: ")
    assert not [p for p in (tmp_path / "cache").iterdir() if not p.name.startswith(".")]  # nothing published


def test_invalid_json_and_missing_chat_template(tmp_path, tokenizer):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(GOOD) + "\n{not json\n")
    with pytest.raises(DataFormatError, match=r"bad.jsonl:2: invalid JSON"):
        build_sft_dataset(path, tokenizer, 64, cache_dir=tmp_path / "cache")
    from tests.helpers import build_tokenizer

    plain = build_tokenizer()
    plain.chat_template = None
    path.write_text(json.dumps(GOOD) + "\n" + json.dumps({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}) + "\n")
    with pytest.raises(DataFormatError, match=r"bad.jsonl:2: .*no chat template"):
        build_sft_dataset(path, plain, 64, cache_dir=tmp_path / "cache")


def test_chat_template_that_rewrites_earlier_turns_is_an_error(tmp_path, tokenizer):
    from tests.helpers import build_tokenizer

    odd = build_tokenizer()
    odd.chat_template = "{{ messages | length }}" + odd.chat_template  # the prefix changes with every turn
    path = tmp_path / "chat.jsonl"
    chat = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}
    path.write_text(json.dumps(chat) + "\n" + json.dumps({"messages": chat["messages"][::-1]}) + "\n")
    with pytest.raises(DataFormatError, match=r"chat.jsonl:1: .*does not render message 1 as a continuation"):
        build_sft_dataset(path, odd, 64, cache_dir=tmp_path / "cache")
    with pytest.raises(DataFormatError, match=r"chat.jsonl:2: .*starts with an assistant turn"):
        build_sft_dataset(path, tokenizer, 64, cache_dir=tmp_path / "cache")


# ---------------------------------------------------------------------------------------------------------------
# Truncation and the cache
# ---------------------------------------------------------------------------------------------------------------


def test_truncation_rules():
    ids, mask = [1, 2, 3, 4, 5], [0, 0, 1, 1, 1]
    assert truncate_sequence(ids, mask, 5) == (ids, mask)
    assert truncate_sequence(ids, mask, 4, "truncate", "left") == ([2, 3, 4, 5], [0, 1, 1, 1])
    assert truncate_sequence(ids, mask, 4, "truncate", "right") == ([1, 2, 3, 4], [0, 0, 1, 1])
    assert truncate_sequence(ids, mask, 4, "drop") is None
    assert truncate_sequence(ids, mask, 3, "truncate", "right") == ([1, 2, 3], [0, 0, 1])
    assert truncate_sequence([1, 2, 3, 4], [0, 0, 0, 1], 3, "truncate", "right") is None  # no target left
    assert truncate_sequence([1, 2, 3], [0, 1, 0], 2, "truncate", "left") is None  # a target at position 0 is none
    with pytest.raises(ValueError, match="truncation_method"):
        truncate_sequence(ids, mask, 4, "truncate", "middle")
    with pytest.raises(ValueError, match="truncation"):
        truncate_sequence(ids, mask, 4, "cut")


def test_cache_is_reused_and_keyed_on_settings(tmp_path, tokenizer, monkeypatch):
    import nemo_aligner.data.sft as sft

    path = tmp_path / "train.jsonl"
    rows = [{"input": "What is two plus two? " * k, "output": f" {k} four."} for k in range(1, 6)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    full, stats = build_sft_dataset(path, tokenizer, 512, cache_dir=tmp_path / "cache")
    assert (stats["num_lines"], stats["num_examples"], stats["num_truncated"], stats["num_dropped"]) == (5, 5, 0, 0)
    assert list(full["line_no"]) == [1, 2, 3, 4, 5]
    ids, mask = encode(tokenizer, rows[2])
    assert list(full[2]["input_ids"]) == ids and list(full[2]["loss_mask"]) == mask

    def boom(*args, **kwargs):
        raise AssertionError("re-tokenised although the cache is valid")
        yield

    monkeypatch.setattr(sft, "_generate_rows", boom)
    again, stats2 = build_sft_dataset(path, tokenizer, 512, cache_dir=tmp_path / "cache")
    assert stats2["cache_path"] == stats["cache_path"] and len(again) == 5
    monkeypatch.undo()

    limit = len(ids) - 1  # rows 3, 4, 5 are longer than this
    lengths = [len(r) for r in full["input_ids"]]
    dropped, dstats = build_sft_dataset(path, tokenizer, limit, truncation="drop", cache_dir=tmp_path / "cache")
    assert dstats["cache_path"] != stats["cache_path"]
    assert dstats["num_dropped"] == sum(n > limit for n in lengths) and len(dropped) == sum(n <= limit for n in lengths)
    cut, cstats = build_sft_dataset(path, tokenizer, limit, cache_dir=tmp_path / "cache")
    assert cstats["num_truncated"] == sum(n > limit for n in lengths) and len(cut) == 5
    assert all(len(r) <= limit for r in cut["input_ids"])
    assert list(cut[4]["loss_mask"])[-3:] == [1, 1, 1]  # left truncation keeps the response
