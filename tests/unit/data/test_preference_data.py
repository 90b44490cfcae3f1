"""Tests for nemo_aligner.data.jsonl and nemo_aligner.data.preference (offline, CPU, fast)."""

import gzip
import json
import math
from pathlib import Path

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from nemo_aligner.data import preference
from nemo_aligner.data.jsonl import DataFormatError, iter_jsonl
from nemo_aligner.data.preference import (
    PreferenceExample,
    build_preference_dataset,
    load_preference_datasets,
    parse_preference_record,
    tokenize_example,
    truncate_pair,
)

from tests.helpers import SHARED_DATA

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
SPECIAL_TOKENS = ["<s>", "</s>", "<pad>", "<|user|>", "<|assistant|>", "<|system|>", "<|end|>"]
CORPUS = [
    "The quick brown fox jumps over the lazy dog. 123 456",
    "\n\nHuman: What is the capital of France?\n\nAssistant: Paris is the capital of France.",
    "Hello there, how are you today? I am fine, thank you very much.",
    "Please write a short poem about the sea and the sky.",
]
HH_DATA = SHARED_DATA / "validation.jsonl.gz"


def make_tokenizer(with_bos: bool = True, chat_template: str | None = CHAT_TEMPLATE) -> PreTrainedTokenizerFast:
    """A tiny byte-level BPE tokenizer trained in memory (BOS <s>, EOS </s>, PAD <pad>)."""
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=500,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(CORPUS, trainer=trainer)
    if with_bos:
        backend.post_processor = processors.TemplateProcessing(
            single="<s> $A", special_tokens=[("<s>", backend.token_to_id("<s>"))]
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        chat_template=chat_template,
    )


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


def write_jsonl(path: Path, lines: list) -> Path:
    """Write records (dicts are JSON-encoded, strings written verbatim) one per line."""
    text = "".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines)
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "wt", encoding="utf-8") as f:
        f.write(text)
    return path


def parse_file(path: Path) -> list[PreferenceExample]:
    return [parse_preference_record(record, path, line_no) for line_no, record in iter_jsonl(path)]


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


# --------------------------------------------------------------------------- jsonl


def test_data_format_error_message_and_attributes():
    err = DataFormatError("data/file.jsonl", 7, "chosen", "must not be empty")
    assert str(err) == "data/file.jsonl:7: field 'chosen': must not be empty"
    assert (err.path, err.line_no, err.field) == ("data/file.jsonl", 7, "chosen")
    assert str(DataFormatError("f.jsonl", 2, None, "invalid JSON")) == "f.jsonl:2: invalid JSON"
    assert isinstance(err, ValueError)


@pytest.mark.parametrize("name", ["file.jsonl", "file.jsonl.gz", "file.json"])
def test_iter_jsonl_skips_blank_lines_and_counts_from_one(tmp_path, name):
    path = write_jsonl(tmp_path / name, [{"a": 1}, "", "   ", {"b": 2}])
    assert list(iter_jsonl(path)) == [(1, {"a": 1}), (4, {"b": 2})]


def test_iter_jsonl_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        iter_jsonl(tmp_path / "missing.jsonl")
    path = write_jsonl(tmp_path / "file.jsonl", [{"a": 1}, "[1, 2]"])
    with pytest.raises(DataFormatError, match=r"file\.jsonl:2: expected a JSON object"):
        list(iter_jsonl(path))


# --------------------------------------------------------------------------- parsing


def test_parse_nemo_format_with_rewards():
    record = {"prompt": "Q?", "chosen_response": "good", "rejected_response": "bad", "chosen_reward": 2, "rejected_reward": -0.5}
    ex = parse_preference_record(record, "f.jsonl", 1)
    assert ex == PreferenceExample("Q?", "good", "bad", chosen_reward=2.0, rejected_reward=-0.5)
    assert isinstance(ex.chosen_reward, float)
    no_rewards = parse_preference_record({"prompt": "Q?", "chosen_response": "a", "rejected_response": "b"}, "f", 1)
    assert (no_rewards.chosen_reward, no_rewards.rejected_reward) == (None, None)


def test_parse_trl_explicit_prompt_text_and_conversational():
    ex = parse_preference_record({"prompt": "Q?", "chosen": "good", "rejected": "bad"}, "f", 1)
    assert (ex.prompt, ex.chosen, ex.rejected) == ("Q?", "good", "bad")
    record = {"prompt": [user("Q?")], "chosen": [assistant("good")], "rejected": [assistant("bad")]}
    ex = parse_preference_record(record, "f", 1)
    assert (ex.prompt, ex.chosen, ex.rejected) == ([user("Q?")], [assistant("good")], [assistant("bad")])


def test_parse_trl_implicit_prompt_uses_longest_common_prefix():
    shared = [user("Hi"), assistant("Hello!"), user("Capital of France?")]
    record = {"chosen": shared + [assistant("Paris.")], "rejected": shared + [assistant("Lyon."), user("Sure?")]}
    ex = parse_preference_record(record, "f", 1)
    assert ex.prompt == shared
    assert ex.chosen == [assistant("Paris.")]
    assert ex.rejected == [assistant("Lyon."), user("Sure?")]


def test_parse_hh_rlhf_splits_at_last_assistant_turn():
    context = "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Capital of France?\n\nAssistant:"
    ex = parse_preference_record({"chosen": context + " Paris.", "rejected": context + " Lyon."}, "f", 1)
    assert ex.prompt == context
    assert ex.chosen == " Paris."
    assert ex.rejected == " Lyon."


GOOD_LINE = {"prompt": "Q?", "chosen_response": "good", "rejected_response": "bad"}
HH = "\n\nHuman: Hi\n\nAssistant:"


@pytest.mark.parametrize(
    "bad_line, field, fragment",
    [
        ('{"prompt": "Q?", "chosen_response": ', None, "invalid JSON"),
        ({"prompt": "Q?", "chosen_response": "good"}, "rejected_response", "missing"),
        ({"prompt": "Q?", "chosen_response": 3, "rejected_response": "bad"}, "chosen_response", "expected a string"),
        ({"prompt": "Q?", "chosen_response": "", "rejected_response": "bad"}, "chosen_response", "empty"),
        ({**GOOD_LINE, "chosen_reward": "high"}, "chosen_reward", "expected a number"),
        ({"chosen": HH + " a", "rejected": "\n\nHuman: Other\n\nAssistant: b"}, "rejected", "share no conversation"),
        ({"chosen": "\n\nHuman: no answer marker", "rejected": HH + " b"}, "chosen", "Assistant:"),
        ({"prompt": [{"role": "user"}], "chosen": "a", "rejected": "b"}, "prompt[0]", "'role' and 'content'"),
        ({"chosen": [user("Q"), assistant("a")], "rejected": [user("Q")]}, "rejected", "no messages left"),
        ({"question": "Q?", "answer": "a"}, None, "accepted formats"),
    ],
    ids=[
        "bad-json",
        "missing-field",
        "wrong-type",
        "empty-response",
        "non-numeric-reward",
        "hh-prompt-mismatch",
        "hh-no-assistant",
        "message-without-content",
        "implicit-empty-response",
        "unknown-format",
    ],
)
def test_malformed_line_reports_file_line_and_field(tmp_path, bad_line, field, fragment):
    path = write_jsonl(tmp_path / "file.jsonl", [GOOD_LINE, GOOD_LINE, bad_line])
    with pytest.raises(DataFormatError) as info:
        parse_file(path)
    err = info.value
    assert "file.jsonl:3: " in str(err)
    assert (err.line_no, err.field) == (3, field)
    if field is not None:
        assert f"field '{field}'" in str(err)
    assert fragment in str(err)


# --------------------------------------------------------------------------- tokenisation


def test_tokenize_plain_text_adds_bos_to_prompt_and_eos_to_responses(tokenizer):
    ids = tokenize_example(PreferenceExample("Hello there", " fine", " thank you"), tokenizer)
    prompt_ids, chosen_ids, rejected_ids = ids
    assert prompt_ids == [tokenizer.bos_token_id] + tokenizer("Hello there", add_special_tokens=False)["input_ids"]
    assert chosen_ids == tokenizer(" fine", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert tokenizer.decode(rejected_ids) == " thank you</s>"


def test_tokenize_conversational_uses_chat_template_without_extra_eos(tokenizer):
    ex = PreferenceExample([user("Hi")], [assistant("fine")], [assistant("bad")])
    prompt_ids, chosen_ids, rejected_ids = tokenize_example(ex, tokenizer)
    assert tokenizer.decode(prompt_ids) == "<|user|>Hi<|end|><|assistant|>"
    assert tokenizer.decode(chosen_ids) == "fine<|end|>"
    assert tokenizer.decode(rejected_ids) == "bad<|end|>"
    # A plain-string prompt with message responses is wrapped as one user message.
    assert tokenize_example(PreferenceExample("Hi", [assistant("fine")], [assistant("bad")]), tokenizer) == (
        prompt_ids,
        chosen_ids,
        rejected_ids,
    )


def test_tokenize_errors():
    no_template = make_tokenizer(chat_template=None)
    with pytest.raises(ValueError, match="no chat template"):
        tokenize_example(PreferenceExample([user("Hi")], [assistant("a")], [assistant("b")]), no_template)
    with pytest.raises(ValueError, match="no tokens"):
        tokenize_example(PreferenceExample("", "a", "b"), make_tokenizer(with_bos=False))
    # With a BOS token an empty prompt is fine.
    assert tokenize_example(PreferenceExample("", "a", "b"), no_template)[0] == [no_template.bos_token_id]


# --------------------------------------------------------------------------- truncation


def test_truncate_pair_rules():
    prompt, chosen, rejected = list(range(10, 16)), [1, 2, 3], [4, 5]
    # Fits: unchanged.
    assert truncate_pair(prompt, chosen, rejected, 9, "truncate") == (prompt, chosen, rejected)
    # M=8, L=3: 8-3=5 >= 4 -> keep the last 5 prompt tokens, responses whole.
    assert truncate_pair(prompt, chosen, rejected, 8, "truncate") == ([11, 12, 13, 14, 15], [1, 2, 3], [4, 5])
    # M=8, L=7: 8-7=1 < 4 -> keep the last 4 prompt tokens, cut responses to 4.
    long_chosen = [1, 2, 3, 4, 5, 6, 7]
    assert truncate_pair(prompt, long_chosen, rejected, 8, "truncate") == ([12, 13, 14, 15], [1, 2, 3, 4], [4, 5])
    # Short prompt (2 < M//2): all of it is kept, responses cut to M-2.
    assert truncate_pair([10, 11], long_chosen, rejected, 5, "truncate") == ([10, 11], [1, 2, 3], [4, 5])


def test_truncate_pair_drop_and_bad_mode():
    assert truncate_pair([1, 2, 3], [4, 5], [6], 5, "drop") == ([1, 2, 3], [4, 5], [6])
    assert truncate_pair([1, 2, 3], [4, 5], [6, 7, 8], 5, "drop") is None
    with pytest.raises(ValueError, match="truncation mode"):
        truncate_pair([1], [2], [3], 5, "left")


# --------------------------------------------------------------------------- cached dataset

PAIRS = [
    {"prompt": "Hello there", "chosen_response": " fine", "rejected_response": " bad", "chosen_reward": 1.5},
    {"chosen": HH + " the quick brown fox", "rejected": HH + " lazy dog"},
    {"prompt": [user("Hi")], "chosen": [assistant("Paris")], "rejected": [assistant("Lyon")]},
    {"prompt": "Please write a short poem about the sea and the sky.", "chosen": " ok", "rejected": " no"},
]


def expected_ids(path, tokenizer):
    return [tokenize_example(ex, tokenizer) for ex in parse_file(path)]


@pytest.mark.parametrize("name", ["file.jsonl", "file.jsonl.gz"])
def test_build_round_trip_and_cache_hit(tmp_path, tokenizer, monkeypatch, name):
    path = write_jsonl(tmp_path / name, PAIRS)
    cache = tmp_path / "cache"
    dataset, stats = build_preference_dataset(path, tokenizer, max_seq_length=512, cache_dir=cache)

    rows = dataset.to_list()
    assert [(r["prompt_ids"], r["chosen_ids"], r["rejected_ids"]) for r in rows] == expected_ids(path, tokenizer)
    assert [r["line_no"] for r in rows] == [1, 2, 3, 4]
    assert rows[0]["chosen_reward"] == 1.5 and math.isnan(rows[0]["rejected_reward"])
    assert dataset.features["prompt_ids"].feature.dtype == "int32"
    assert stats == {
        "num_lines": 4,
        "num_pairs": 4,
        "num_truncated": 0,
        "num_dropped": 0,
        "path": str(path.absolute()),
        "cache_path": stats["cache_path"],
    }
    cache_path = Path(stats["cache_path"])
    assert cache_path.parent == cache and json.loads((cache_path / "stats.json").read_text()) == stats

    def must_not_tokenize(*args, **kwargs):
        raise AssertionError("cache miss: the file was tokenised again")

    monkeypatch.setattr(preference, "tokenize_example", must_not_tokenize)
    mtime = cache_path.stat().st_mtime_ns
    again, stats_again = build_preference_dataset(path, tokenizer, max_seq_length=512, cache_dir=cache)
    assert stats_again == stats
    assert again["chosen_ids"] == dataset["chosen_ids"] and again["line_no"] == dataset["line_no"]
    assert cache_path.stat().st_mtime_ns == mtime
    assert sorted(p.name for p in cache.iterdir()) == [cache_path.name]


def test_build_stats_truncate_drop_and_cache_key(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "file.jsonl", PAIRS)
    lengths = [len(p) + max(len(c), len(r)) for p, c, r in expected_ids(path, tokenizer)]
    limit = sorted(lengths)[1]  # exactly two pairs are longer than this
    too_long = sum(n > limit for n in lengths)
    assert too_long == 2

    truncated, stats = build_preference_dataset(path, tokenizer, limit, "truncate", cache_dir=tmp_path)
    assert (stats["num_pairs"], stats["num_truncated"], stats["num_dropped"]) == (4, too_long, 0)
    assert all(len(r["prompt_ids"]) + len(r["chosen_ids"]) <= limit for r in truncated.to_list())

    dropped, drop_stats = build_preference_dataset(path, tokenizer, limit, "drop", cache_dir=tmp_path)
    assert (drop_stats["num_lines"], drop_stats["num_pairs"], drop_stats["num_dropped"]) == (4, 2, too_long)
    assert [lengths[n - 1] <= limit for n in dropped["line_no"]] == [True, True]

    _, other_stats = build_preference_dataset(path, tokenizer, limit + 1, "truncate", cache_dir=tmp_path)
    assert len({stats["cache_path"], drop_stats["cache_path"], other_stats["cache_path"]}) == 3


def test_build_malformed_file_leaves_no_cache(tmp_path, tokenizer):
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "existing").mkdir()
    path = write_jsonl(tmp_path / "file.jsonl", [GOOD_LINE, GOOD_LINE, {**GOOD_LINE, "rejected_reward": [1]}])
    with pytest.raises(DataFormatError, match=r"file\.jsonl:3: field 'rejected_reward'"):
        build_preference_dataset(path, tokenizer, 64, cache_dir=cache)
    assert [p.name for p in cache.iterdir()] == ["existing"]


def test_build_with_worker_processes_matches_single_process(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "file.jsonl", PAIRS * 3)
    single, _ = build_preference_dataset(path, tokenizer, 512, cache_dir=tmp_path / "one")
    parallel, stats = build_preference_dataset(path, tokenizer, 512, cache_dir=tmp_path / "two", num_proc=2)
    assert parallel["line_no"] == single["line_no"] == list(range(1, 13))
    assert parallel["chosen_ids"] == single["chosen_ids"] and stats["num_pairs"] == 12

    bad = write_jsonl(tmp_path / "bad.jsonl", [GOOD_LINE, GOOD_LINE, {"prompt": "Q?"}])
    with pytest.raises(DataFormatError, match=r"bad\.jsonl:3: field 'chosen'"):
        build_preference_dataset(bad, tokenizer, 512, cache_dir=tmp_path / "two", num_proc=2)
    assert [p.name for p in (tmp_path / "two").iterdir()] == [Path(stats["cache_path"]).name]


def test_load_preference_datasets_concatenates_files(tmp_path, tokenizer):
    first = write_jsonl(tmp_path / "a.jsonl", PAIRS[:2])
    second = write_jsonl(tmp_path / "b.jsonl.gz", PAIRS[2:])
    dataset, stats = load_preference_datasets([first, second], tokenizer, 512, cache_dir=tmp_path / "cache")
    assert dataset["line_no"] == [1, 2, 1, 2]
    assert [s["path"] for s in stats] == [str(first), str(second)]
    assert [list(r) for r in zip(dataset["prompt_ids"], dataset["chosen_ids"], dataset["rejected_ids"])] == [
        list(ids) for ids in expected_ids(first, tokenizer) + expected_ids(second, tokenizer)
    ]


def test_build_without_pairs_raises(tmp_path, tokenizer):
    empty = write_jsonl(tmp_path / "empty.jsonl", ["", ""])
    with pytest.raises(ValueError, match="empty.jsonl"):
        build_preference_dataset(empty, tokenizer, 64, cache_dir=tmp_path / "cache")
    all_too_long = write_jsonl(tmp_path / "long.jsonl", PAIRS)
    with pytest.raises(ValueError, match="long.jsonl"):
        build_preference_dataset(all_too_long, tokenizer, 2, "drop", cache_dir=tmp_path / "cache")
    assert list((tmp_path / "cache").iterdir()) == []


# --------------------------------------------------------------------------- real data


@pytest.mark.skipif(not HH_DATA.is_file(), reason=f"{HH_DATA} not available")
def test_real_hh_rlhf_smoke():
    examples = []
    for line_no, record in iter_jsonl(HH_DATA):
        examples.append(parse_preference_record(record, HH_DATA, line_no))
        if len(examples) == 50:
            break
    assert len(examples) == 50
    for ex in examples:
        assert ex.prompt.startswith("\n\nHuman:") and ex.prompt.endswith("\n\nAssistant:")
        assert ex.chosen and ex.rejected


def test_hh_response_containing_the_assistant_marker_splits_at_the_shared_turn():
    # Real HH-RLHF quirk (train line 807): a response role-plays "Human: ... Assistant: ..." itself.
    chosen = "\n\nHuman: Hi\n\nAssistant: Human: ok\n\nAssistant: more"
    rejected = "\n\nHuman: Hi\n\nAssistant: no"
    example = parse_preference_record({"chosen": chosen, "rejected": rejected}, "f.jsonl", 1)
    assert example.prompt == "\n\nHuman: Hi\n\nAssistant:"
    assert example.chosen == " Human: ok\n\nAssistant: more"
    assert example.rejected == " no"
