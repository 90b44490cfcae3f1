"""examples/nlp/gpt/generate.py: data-parallel split, resume after an interruption, errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.helpers import REPO, compose_config, load_example_script
from nemo_aligner.data.jsonl import DataFormatError
from nemo_aligner.errors import MissingDependencyError
from nemo_aligner.utils.config import ConfigKeyError, ConfigValueError

NUM_PROMPTS = 7


@pytest.fixture(scope="module")
def script():
    return load_example_script("generate")


@pytest.fixture()
def prompt_file(tmp_path):
    path = tmp_path / "prompts.jsonl"
    with open(path, "w") as f:
        for i in range(NUM_PROMPTS):
            f.write(json.dumps({"chosen": f"\n\nHuman: question {i}?\n\nAssistant: answer {i}", "rejected": "x"}) + "\n")
    return path


def overrides(model_dir, prompts, output, *extra):
    return [
        f"pretrained_checkpoint.restore_from_path={model_dir}",
        f"data.prompt_file={prompts}",
        f"generation.output_file={output}",
        "trainer.accelerator=cpu",
        "model.micro_batch_size=4",
        "generation.num_responses_per_prompt=2",
        "generation.length_params.max_length=6",
        "generation.sampling_params.top_p=0.9",
        *extra,
    ]


def gen_cfg(*args):
    return compose_config("generation", list(args))


def read(path):
    return [json.loads(line) for line in open(path)]


def test_two_ranks_give_every_prompt_once_and_match_one_rank(tmp_path, tiny_model_dir, prompt_file, script):
    one = tmp_path / "one.jsonl"
    result = script.run(gen_cfg(*overrides(tiny_model_dir, prompt_file, one)))
    assert result["generated"] == NUM_PROMPTS
    lines = read(one)
    assert [r["prompt"] for r in lines] == [f"\n\nHuman: question {i}?\n\nAssistant:" for i in range(NUM_PROMPTS)]
    assert all(len(r["responses"]) == 2 and "rewards" not in r for r in lines)
    assert not (tmp_path / "one.jsonl.parts").exists()

    two = tmp_path / "two.jsonl"
    cmd = [sys.executable, str(REPO / "examples/nlp/gpt/generate.py"), *overrides(tiny_model_dir, prompt_file, two),
           "trainer.devices=2", "trainer.strategy=ddp"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "on 2 rank(s)" in proc.stderr
    assert read(two) == lines  # same prompts, once each, in order, and the same samples as on one rank


def test_interrupted_run_resumes_to_the_same_file(tmp_path, tiny_model_dir, prompt_file, script, monkeypatch):
    full = tmp_path / "full.jsonl"
    script.run(gen_cfg(*overrides(tiny_model_dir, prompt_file, full)))

    out = tmp_path / "out.jsonl"
    with monkeypatch.context() as patch:  # "killed" after generating, before the merge
        patch.setattr(script, "merge_parts", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt()))
        with pytest.raises(KeyboardInterrupt):
            script.run(gen_cfg(*overrides(tiny_model_dir, prompt_file, out)))
    part = tmp_path / "out.jsonl.parts" / "part-00000.jsonl"
    kept = part.read_text().splitlines(keepends=True)
    assert len(kept) == NUM_PROMPTS
    part.write_text("".join(kept[:3]) + kept[3][:25])  # 3 whole prompts (half of chunk 1) and a torn line
    result = script.run(gen_cfg(*overrides(tiny_model_dir, prompt_file, out)))
    assert result["generated"] == NUM_PROMPTS - 3
    assert out.read_text() == full.read_text()
    assert not part.parent.exists()


def test_user_errors(tmp_path, tiny_model_dir, prompt_file, script):
    out = tmp_path / "out.jsonl"
    with pytest.raises(ConfigKeyError, match="generation.sampling_params.topp"):
        script.run(gen_cfg(*overrides(tiny_model_dir, prompt_file, out), "+generation.sampling_params.topp=0.5"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "ok"}) + "\n" + json.dumps({"prompt": 5}) + "\n")
    with pytest.raises(DataFormatError, match=r"bad\.jsonl:2: field 'prompt'"):
        script.run(gen_cfg(*overrides(tiny_model_dir, bad, out)))
    (tmp_path / "out.jsonl.parts").mkdir()
    (tmp_path / "out.jsonl.parts" / "meta.json").write_text(json.dumps({"seed": 1}))
    with pytest.raises(FileExistsError, match="different settings"):
        script.run(gen_cfg(*overrides(tiny_model_dir, prompt_file, out)))
    out.write_text("{}\n")
    (tmp_path / "out.jsonl.parts" / "meta.json").unlink()
    (tmp_path / "out.jsonl.parts").rmdir()
    with pytest.raises(FileExistsError, match="already exists"):
        script.run(gen_cfg(*overrides(tiny_model_dir, prompt_file, out)))


BAD_INPUTS = [
    ("whitespace-prompt", (), DataFormatError, r"blank\.jsonl:2: field 'prompt': the prompt is only whitespace"),
    ("attention", ("model.attn_implementation=bogus",), ConfigValueError,
     r"^model\.attn_implementation='bogus': expected one of sdpa, eager"),
    ("gpu-without-cuda", ("trainer.accelerator=gpu",), ConfigValueError,
     r"^trainer\.accelerator=gpu but no CUDA device is visible on this machine; set trainer\.accelerator=auto or cpu"),
    ("tpu-without-torch_xla", ("trainer.accelerator=tpu",), MissingDependencyError,
     r"^trainer\.accelerator=tpu needs torch_xla, which is not installed"),
]


@pytest.mark.parametrize("case, extra, error, message", BAD_INPUTS, ids=[c for c, *_ in BAD_INPUTS])
def test_bad_inputs_of_issue_25_are_user_errors(tmp_path, tiny_model_dir, script, monkeypatch, case, extra, error,
                                                message):
    """generate.py checks only its keys up front: the accelerator, the attention implementation and the prompts are
    checked where they are used, each as one user error (they were lightning's / transformers' tracebacks, or a
    whitespace prompt that was generated from)."""
    import importlib.util

    import torch

    if case == "gpu-without-cuda" and torch.cuda.is_available():
        pytest.skip("a CUDA device is visible")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "torch_xla" else real(name, *a))
    prompts = tmp_path / "blank.jsonl"
    blank = json.dumps({"prompt": "   "}) if case == "whitespace-prompt" else json.dumps({"prompt": "fine"})
    prompts.write_text(json.dumps({"prompt": "ok"}) + "\n" + blank + "\n")
    out = tmp_path / "out.jsonl"
    with pytest.raises(error, match=message):
        script.run(gen_cfg(*overrides(tiny_model_dir, prompts, out), *extra))
    assert not out.exists()


def test_response_seed_is_stable():
    script = load_example_script("generate")
    assert script.response_seed(1, 2, 3) == script.response_seed(1, 2, 3)
    assert len({script.response_seed(1, i, j) for i in range(20) for j in range(5)}) == 100
