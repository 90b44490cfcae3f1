"""Prompt-file loader: formats, located errors, tokenisation consistent with the preference data."""

from __future__ import annotations

import gzip
import json

import pytest

from nemo_aligner.data.jsonl import DataFormatError
from nemo_aligner.data.prompts import load_prompts, parse_prompt_record, tokenize_prompt, tokenize_prompt_example
from nemo_aligner.data.sequences import tokenize_prompt_response

MESSAGES = [
    {"role": "user", "content": "hi"},
    {"role": "assistant", "content": "hello"},
    {"role": "user", "content": "bake bread?"},
    {"role": "assistant", "content": "Mix flour."},
]


def _write(path, records, gz=False):
    text = "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records)
    if gz:
        with gzip.open(path, "wt") as f:
            f.write(text)
    else:
        path.write_text(text)
    return path


def test_formats(tmp_path):
    path = _write(
        tmp_path / "p.jsonl.gz",
        [
            {"prompt": "plain"},
            {"prompt": MESSAGES[:1]},
            {"messages": MESSAGES},
            {"messages": MESSAGES[:1]},
            {"chosen": "\n\nHuman: a\n\nAssistant: b\n\nHuman: c\n\nAssistant: d", "rejected": "x"},
            {"chosen": MESSAGES, "rejected": MESSAGES[:3] + [{"role": "assistant", "content": "no"}]},
            {"chosen": "\n\nHuman: open\n\nAssistant:"},
        ],
        gz=True,
    )
    prompts = load_prompts(path)
    assert [p.prompt for p in prompts] == [
        "plain",
        MESSAGES[:1],
        MESSAGES[:3],
        MESSAGES[:1],
        "\n\nHuman: a\n\nAssistant: b\n\nHuman: c\n\nAssistant:",
        MESSAGES[:3],
        "\n\nHuman: open\n\nAssistant:",
    ]
    assert [p.line_no for p in prompts] == list(range(1, 8))
    assert [p.index for p in prompts] == list(range(7))
    two = load_prompts([path, path], max_prompts=9)
    assert [(p.prompt, p.line_no, p.index) for p in two[7:]] == [("plain", 1, 7), (MESSAGES[:1], 2, 8)]
    assert len(load_prompts(path, max_prompts=2)) == 2


@pytest.mark.parametrize(
    "record, field, words",
    [
        ({"prompt": 3}, "prompt", "expected a string"),
        ({"prompt": ""}, "prompt", "must not be empty"),
        ({"prompt": [{"role": "user"}]}, "prompt[0]", "string 'role' and 'content'"),
        ({"messages": [{"role": "assistant", "content": "x"}]}, "messages", "no messages before"),
        ({"chosen": "no turns here"}, "chosen", "no '\\n\\nAssistant:' turn"),
        ({"text": "x"}, None, "unrecognised prompt record"),
    ],
)
def test_errors_name_file_line_field(tmp_path, record, field, words):
    path = _write(tmp_path / "p.jsonl", [{"prompt": "fine"}, "", record])
    with pytest.raises(DataFormatError) as info:
        load_prompts(path)
    err = info.value
    assert (err.line_no, err.field) == (3, field)
    assert str(err).startswith(f"{path}:3: ")
    assert words in str(err)


def test_bad_json_and_missing_file(tmp_path):
    path = _write(tmp_path / "p.jsonl", [{"prompt": "ok"}, "{not json"])
    with pytest.raises(DataFormatError, match=r"p\.jsonl:2: invalid JSON"):
        load_prompts(path)
    with pytest.raises(FileNotFoundError):
        load_prompts(tmp_path / "missing.jsonl")
    with pytest.raises(ValueError, match="no prompts"):
        load_prompts(_write(tmp_path / "empty.jsonl", []))


def test_tokenisation_matches_preference_rules(tokenizer):
    for prompt in ("\n\nHuman: How do I bake bread?\n\nAssistant:", MESSAGES[:3]):
        expected, _ = tokenize_prompt_response(prompt, " Mix flour.", tokenizer)
        assert tokenize_prompt(prompt, tokenizer) == expected


def test_tokenize_example_truncates_left_and_locates_errors(tokenizer, tmp_path):
    path = _write(tmp_path / "p.jsonl", [{"prompt": "the quick brown fox jumps over the lazy dog"}, {"prompt": MESSAGES[:1]}])
    first, second = load_prompts(path)
    full, truncated = tokenize_prompt_example(first, tokenizer)
    assert not truncated and len(full) > 4
    cut, truncated = tokenize_prompt_example(first, tokenizer, max_length=4)
    assert truncated and cut == full[-4:]
    tok = tokenizer.__class__(tokenizer_object=tokenizer.backend_tokenizer, bos_token="<s>", eos_token="</s>")
    with pytest.raises(DataFormatError, match=r"p\.jsonl:2: field 'prompt': .*chat template"):
        tokenize_prompt_example(second, tok)  # same vocabulary, no chat template


def test_prompt_token_budget_is_capped_by_the_reward_model():
    """Online runs keep prompts to min(encoder_seq_length, RM max_seq_length) - response tokens (PPO and RS)."""
    from nemo_aligner.data.prompts import prompt_token_budget

    assert prompt_token_budget(1024, 64) == 960  # no reward-model limit (programmatic reward)
    assert prompt_token_budget(1024, 64, 256) == 192  # an RM export with max_seq_length 256
    assert prompt_token_budget(128, 64, 256) == 64  # the policy's limit is the smaller one
    with pytest.raises(ValueError, match="no room for a prompt"):
        prompt_token_budget(1024, 256, 256)


def test_load_prompt_ids_keeps_the_last_tokens(tokenizer, tmp_path):
    from nemo_aligner.data.prompts import load_prompt_ids

    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "a b c d e f g h i j k l"}\n{"prompt": "hi"}\n{"prompt": "third"}\n')
    full, cut = load_prompt_ids([str(path)], tokenizer, 10_000)
    assert cut == 0 and len(full) == 3
    ids, cut = load_prompt_ids(str(path), tokenizer, 3, max_prompts=2)
    assert len(ids) == 2 and cut == 1
    assert ids[0] == full[0][-3:] and ids[1] == full[1][-3:]
