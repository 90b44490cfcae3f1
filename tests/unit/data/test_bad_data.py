"""Bad data files and bad values: every reader (DPO, SFT, reward model, PPO prompts) stops with a located
``DataFormatError`` (``file:line: field '...': ...``, or ``file: ...`` for an error of the whole file) that the
recipes print as one line (it is a :class:`~nemo_aligner.errors.UserError`), never a raw traceback or a silently accepted value.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from nemo_aligner.data.jsonl import DataFormatError, iter_jsonl
from nemo_aligner.data.preference import build_preference_dataset, parse_preference_record
from nemo_aligner.data.prompts import load_prompt_ids, parse_prompt_record
from nemo_aligner.data.reward import build_reward_dataset
from nemo_aligner.data.sft import build_sft_dataset, parse_sft_record
from nemo_aligner.errors import MissingFileError, UserError

HUGE_INT = "1" + "0" * 400  # a JSON integer beyond float64 (float() raises OverflowError)

GOOD = {
    "dpo": {"prompt": "Hi", "chosen_response": "yes", "rejected_response": "no"},
    "rm": {"prompt": "Hi", "chosen_response": "yes", "rejected_response": "no"},
    "sft": {"input": "Hi", "output": "yes"},
    "ppo": {"prompt": "Hi"},
}
TEXT_FIELD = {"dpo": "chosen_response", "rm": "chosen_response", "sft": "output", "ppo": "prompt"}


def read(kind: str, path: Path, tokenizer, cache_dir: Path, num_proc: int | None = None):
    """Read a whole file with the reader a recipe of ``kind`` uses."""
    if kind == "dpo":
        return build_preference_dataset(path, tokenizer, 64, cache_dir=cache_dir, num_proc=num_proc)
    if kind == "sft":
        return build_sft_dataset(path, tokenizer, 64, cache_dir=cache_dir)
    if kind == "rm":
        return build_reward_dataset(path, tokenizer, 64, cache_dir=cache_dir)
    return load_prompt_ids([path], tokenizer, 64)


def lines_text(lines: list) -> str:
    return "".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines)


def read_error(kind: str, path: Path, tokenizer, tmp_path: Path, num_proc: int | None = None) -> DataFormatError:
    """The error reading ``path`` raises; checks it is a user error and that nothing is left in the cache."""
    cache = tmp_path / "cache"
    with pytest.raises(DataFormatError) as info:
        read(kind, path, tokenizer, cache, num_proc)
    assert isinstance(info.value, UserError)
    assert not cache.exists() or list(cache.iterdir()) == []
    return info.value


def assert_located(err: DataFormatError, path: Path, line_no: int | None, field: str | None, words: str) -> None:
    where = f"{path}: " if line_no is None else f"{path}:{line_no}: "
    assert str(err).startswith(where + ("" if field is None else f"field '{field}': ")), str(err)
    assert (err.line_no, err.field) == (line_no, field)
    assert words in str(err), str(err)


# --------------------------------------------------------------------------- damaged files (item 17)

KINDS = ["dpo", "sft", "rm", "ppo"]


@pytest.mark.parametrize("kind", KINDS)
def test_truncated_gzip_names_file_and_line(tmp_path, tokenizer, kind):
    data = gzip.compress(lines_text([GOOD[kind]] * 50).encode())
    path = tmp_path / "train.jsonl.gz"
    path.write_bytes(data[:-12])  # cut the trailer and the end of the deflate stream
    complete = 0
    with pytest.raises(EOFError), gzip.open(path, "rb") as f:  # what the reader used to raise (PPO: as is)
        for _ in f:
            complete += 1
    assert 0 < complete < 50
    err = read_error(kind, path, tokenizer, tmp_path)
    assert_located(err, path, complete + 1, None, f"truncated gzip file: the compressed data ends before the gzip "
                   f"end-of-stream marker, after {complete} complete lines")


@pytest.mark.parametrize("kind", KINDS)
def test_plain_text_named_gz(tmp_path, tokenizer, kind):
    path = tmp_path / "train.jsonl.gz"
    path.write_text(lines_text([GOOD[kind]] * 3))
    assert_located(read_error(kind, path, tokenizer, tmp_path), path, None, None, "not a gzip file")


def test_corrupt_gzip_data_names_file_and_line(tmp_path):
    data = bytearray(gzip.compress(lines_text([{"prompt": f"line {i}"} for i in range(30)]).encode()))
    data[-8:-4] = bytes(255 - b for b in data[-8:-4])  # a wrong CRC-32 in the trailer: gzip.BadGzipFile at the end
    path = tmp_path / "p.jsonl.gz"
    path.write_bytes(bytes(data))
    with pytest.raises(DataFormatError) as info:
        list(iter_jsonl(path))
    assert_located(info.value, path, 31, None, "corrupt gzip data (CRC check failed")
    assert "after 30 complete lines" in str(info.value)


@pytest.mark.parametrize("kind", KINDS)
def test_deeply_nested_json(tmp_path, tokenizer, kind):
    path = tmp_path / "train.jsonl"
    path.write_text(lines_text([GOOD[kind], "[" * 100_000 + "]" * 100_000]))  # RecursionError in json.loads
    assert_located(read_error(kind, path, tokenizer, tmp_path), path, 2, None, "nested too deeply")


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("line, column", [
    ('{"prompt": "Hi", "x": }', "at column 23: Expecting value"),
    ('{"prompt": "Hi",, "x": 1}', "at column 17: Expecting property name enclosed in double quotes"),
    ('{"prompt": "Hi"} trailing', "at column 18: Extra data"),
    ('{"prompt": ', "at column 12 (end of line): Expecting value"),
])
def test_invalid_json_gives_the_column_within_the_files_line(tmp_path, tokenizer, kind, line, column):
    """The decoder's own position ("line 2 column 1") counted the record's trailing newline as a line of its own."""
    path = tmp_path / "train.jsonl"
    path.write_text(lines_text([GOOD[kind]] * 4 + [line]))
    err = read_error(kind, path, tokenizer, tmp_path)
    assert_located(err, path, 5, None, f"invalid JSON {column}")
    assert "line 2" not in str(err) and "(char " not in str(err)


@pytest.mark.parametrize("kind", KINDS)
def test_a_directory_given_as_data_file_is_named_as_one(tmp_path, tokenizer, kind):
    folder = tmp_path / "hh-rlhf"
    folder.mkdir()
    (folder / "train.jsonl").write_text(lines_text([GOOD[kind]]))
    with pytest.raises(MissingFileError) as info:
        read(kind, folder, tokenizer, tmp_path / "cache")
    assert str(info.value) == (f"data file {folder} is a directory (it holds train.jsonl); give the path of a "
                               "JSON-lines file (.jsonl or .jsonl.gz) instead")
    assert isinstance(info.value, UserError)


@pytest.mark.parametrize("kind", KINDS)
def test_lone_surrogate_names_the_field(tmp_path, tokenizer, kind):
    field = TEXT_FIELD[kind]
    bad = json.dumps({**GOOD[kind], field: "ok SURROGATE"}).replace("SURROGATE", "\\ud800")
    path = tmp_path / "train.jsonl"
    path.write_text(lines_text([GOOD[kind], bad]))
    assert_located(read_error(kind, path, tokenizer, tmp_path), path, 2, field, "lone UTF-16 surrogate")


def test_lone_surrogate_field_path_in_messages_and_valid_pairs_pass(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text(
        '{"prompt": "\\ud83d\\ude00 a surrogate pair is one character"}\n'
        '{"prompt": [{"role": "user", "content": "fine"}, {"role": "user", "content": "bad \\udc00"}]}\n'
    )
    records = iter_jsonl(path)
    assert next(records) == (1, {"prompt": "\U0001F600 a surrogate pair is one character"})
    with pytest.raises(DataFormatError) as info:
        next(records)
    assert_located(info.value, path, 2, "prompt[1].content", "lone UTF-16 surrogate")


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("content", ["", "\n\n  \n"])
def test_empty_file(tmp_path, tokenizer, kind, content):
    path = tmp_path / "train.jsonl"
    path.write_text(content)
    words = "no prompts" if kind == "ppo" else "the file holds no JSON records"
    assert_located(read_error(kind, path, tokenizer, tmp_path), path, None, None, words)


def test_worker_processes_report_file_errors(tmp_path, tokenizer):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert_located(read_error("dpo", empty, tokenizer, tmp_path, num_proc=2), empty, None, None, "no JSON records")
    cut = tmp_path / "cut.jsonl.gz"
    cut.write_bytes(gzip.compress(lines_text([GOOD["dpo"]] * 50).encode())[:-12])
    assert "truncated gzip" in str(read_error("dpo", cut, tokenizer, tmp_path, num_proc=2))


# --------------------------------------------------------------------------- bad values (items 17 and 18)

PAIR = {"prompt": "Hi", "chosen_response": "yes", "rejected_response": "no"}
USER = {"role": "user", "content": "Hi"}
ASSISTANT_A = {"role": "assistant", "content": "yes"}
ASSISTANT_B = {"role": "assistant", "content": "no"}
HH = "\n\nHuman: Hi\n\nAssistant: yes"

BAD_VALUES = [
    # (readers, bad line (JSON text), field, words)
    (("dpo", "rm"), json.dumps(PAIR)[:-1] + f', "chosen_reward": {HUGE_INT}}}', "chosen_reward", "an integer of about 400 digits"),
    (("dpo", "rm"), json.dumps(PAIR)[:-1] + ', "chosen_reward": NaN}', "chosen_reward", "got nan"),
    (("dpo", "rm"), json.dumps(PAIR)[:-1] + ', "rejected_reward": -Infinity}', "rejected_reward", "got -inf"),
    (("dpo", "rm"), json.dumps(PAIR)[:-1] + ', "rejected_reward": 1e39}', "rejected_reward", "float32"),
    (("rm",), f'{{"prompt": "Hi", "responses": ["a", "b"], "scores": [{HUGE_INT}, 1]}}', "scores[0]", "400 digits"),
    (("rm",), f'{{"prompt": "Hi", "responses": ["a", "b"], "ranking": [0, {HUGE_INT}]}}', "ranking[1]", "400 digits"),
    (("rm",), '{"prompt": "Hi", "responses": ["a", "b"], "scores": [1e300, 1]}', "scores[0]", "float32"),
    # chosen == rejected
    (("dpo", "rm"), json.dumps({**PAIR, "rejected_response": "yes"}), "rejected_response", "identical to the chosen"),
    (("dpo", "rm"), json.dumps({"prompt": [USER], "chosen": [ASSISTANT_A], "rejected": [ASSISTANT_A]}), "rejected", "identical"),
    (("dpo", "rm"), json.dumps({"chosen": [USER, ASSISTANT_A], "rejected": [USER, ASSISTANT_A]}), "rejected", "identical"),
    (("dpo", "rm"), json.dumps({"chosen": HH, "rejected": HH}), "rejected", "identical"),
    (("rm",), json.dumps({"instruction": "Hi", "chosen": "yes", "rejected": "yes"}), "rejected", "identical"),
    (("rm",), json.dumps({"prompt": "Hi", "responses": ["a", "b", "a"], "ranking": [0, 1, 2]}), "responses[2]", "identical to responses[0]"),
    # unknown chat roles
    (("dpo", "rm"), json.dumps({"prompt": [{"role": "robot", "content": "Hi"}], "chosen": "yes", "rejected": "no"}), "prompt[0].role", "unknown chat role 'robot'"),
    (("dpo", "rm"), json.dumps({"chosen": [USER, {"role": "robot", "content": "a"}], "rejected": [USER, ASSISTANT_B]}), "chosen[1].role", "'robot'"),
    (("rm",), json.dumps({"prompt": [{"role": "robot", "content": "Hi"}], "responses": ["a", "b"], "scores": [1, 0]}), "prompt[0].role", "'robot'"),
    (("sft",), json.dumps({"messages": [USER, {"role": "robot", "content": "a"}, ASSISTANT_A]}), "messages[1].role", "'robot'"),
    (("sft",), json.dumps({"prompt": [{"role": "tool", "content": "Hi"}], "response": "yes"}), "prompt[0].role", "'tool'"),
    (("ppo",), json.dumps({"prompt": [{"role": "robot", "content": "Hi"}]}), "prompt[0].role", "'robot'"),
    (("ppo",), json.dumps({"messages": [{"role": "robot", "content": "Hi"}, ASSISTANT_A]}), "messages[0].role", "'robot'"),
    (("ppo",), json.dumps({"chosen": [{"role": "narrator", "content": "Hi"}, ASSISTANT_A]}), "chosen[0].role", "'narrator'"),
    # a prompt of whitespace only (issue 25): was counted and rolled out as an empty question
    (("ppo",), json.dumps({"prompt": "   "}), "prompt", "the prompt is only whitespace"),
    (("ppo",), json.dumps({"prompt": "\n\t "}), "prompt", "give the prompt text or remove the line"),
]
BAD_VALUE_CASES = [
    pytest.param(kind, line, field, words, id=f"{kind}-{i}-{field}")
    for i, (kinds, line, field, words) in enumerate(BAD_VALUES)
    for kind in kinds
]


@pytest.mark.parametrize("kind, line, field, words", BAD_VALUE_CASES)
def test_bad_value_names_file_line_and_field(tmp_path, tokenizer, kind, line, field, words):
    path = tmp_path / "train.jsonl"
    path.write_text(lines_text([GOOD[kind], line]))
    assert_located(read_error(kind, path, tokenizer, tmp_path), path, 2, field, words)


def test_rpo_reward_is_the_given_finite_value():
    """A finite reward is kept (the old NaN reward read as "no reward", i.e. default_chosen_reward)."""
    example = parse_preference_record({**PAIR, "chosen_reward": 10**30, "rejected_reward": -2.5}, "f.jsonl", 1)
    assert (example.chosen_reward, example.rejected_reward) == (1e30, -2.5)


def test_nemo_capitalised_roles_become_the_chat_roles(tmp_path, tokenizer):
    """``User``/``Assistant``/``System`` (NeMo style) are accepted and rendered as ``user``/``assistant``/``system``."""
    lower = [{"role": "system", "content": "Be brief."}, USER, ASSISTANT_A]
    upper = [{"role": "System", "content": "Be brief."}, {"role": "User", "content": "Hi"}, {"role": "ASSISTANT", "content": "yes"}]
    assert parse_sft_record({"messages": upper}, "f.jsonl", 1).messages == lower
    assert parse_prompt_record({"messages": upper}, "f.jsonl", 1) == lower[:2]
    pair = parse_preference_record({"prompt": upper[:2], "chosen": [upper[2]], "rejected": [ASSISTANT_B]}, "f.jsonl", 1)
    assert (pair.prompt, pair.chosen) == (lower[:2], [ASSISTANT_A])
    for kind, records in (
        ("sft", [{"messages": upper}, {"messages": lower}]),
        ("dpo", [{"prompt": upper[:2], "chosen": "yes", "rejected": "no"}, {"prompt": lower[:2], "chosen": "yes", "rejected": "no"}]),
    ):
        path = tmp_path / f"{kind}.jsonl"
        path.write_text(lines_text(records))
        dataset, _ = read(kind, path, tokenizer, tmp_path / "cache")
        column = "input_ids" if kind == "sft" else "prompt_ids"
        assert dataset[0][column] == dataset[1][column]
        assert "<|user|>" in tokenizer.decode(dataset[0][column])
